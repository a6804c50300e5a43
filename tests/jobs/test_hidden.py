"""`reranker score --save-hidden`: the hidden states beside the scores, read back by the head, crash-safe."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from helpers import kill_when, read_jsonl, run, run_here, score_args, score_cmd, write_jsonl, write_nested
from oracle import assert_hidden_close

from head import ScoringHead, score_embeddings
from head.hidden_states import index_path, load_hidden
from reranker.errors import RerankerError
from reranker.jobs.hidden import HiddenWriter
from reranker.jobs.records import Unit

NESTED = [{"query_id": f"q{i}", "query": f"query {i} résumé", "documents": [f"doc {i} a", "", f"doc {i} c 机器 " * i]}
          for i in range(7)]


# --- the writer's resume protocol, without a model ---------------------------------------------


def _units(n, width, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        unit = Unit(i, f"q{i}", "query", [(f"d{j}", "text") for j in range(k)], f"in.jsonl:{i + 1}")
        out.append((unit, rng.random(k).astype(np.float32).tolist(), rng.standard_normal((k, width)).astype(np.float32)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_writer_cut_back_to_its_checkpoint_gives_the_clean_bytes(tmp_path, dtype):
    units = _units(12, 8)
    clean = tmp_path / "clean.npy"
    w = HiddenWriter(clean, 8, dtype)
    w.resume({})
    for u in units:
        w.write(*u)
    w.commit()
    w.close(final=True)
    got = np.load(clean)
    assert got.dtype == np.dtype(dtype) and got.shape == (sum(len(u[0].docs) for u in units), 8)
    np.testing.assert_array_equal(got, np.concatenate([u[2] for u in units]).astype(dtype))
    assert [(r["query_id"], r["doc_id"]) for r in read_jsonl(index_path(clean))] == [(u[0].query_id, d) for u in units for d, _ in u[0].docs]

    # a run that commits after unit 4, writes three more (uncommitted, flushed or not), then dies
    out = tmp_path / "out.npy"
    w = HiddenWriter(out, 8, dtype)
    w.resume({})
    for u in units[:5]:
        w.write(*u)
    state = json.loads(json.dumps(w.commit()))  # what the checkpoint holds
    for u in units[5:8]:
        w.write(*u)
    w.rows._f.flush()
    w.close(final=False)
    assert out.with_name("out.npy.partial").stat().st_size > 128 + state["rows"]["rows"] * 8 * np.dtype(dtype).itemsize
    w = HiddenWriter(out, 8, dtype)
    w.resume(state)
    for u in units[5:]:
        w.write(*u)
    w.commit()
    w.close(final=True)
    assert out.read_bytes() == clean.read_bytes()
    assert index_path(out).read_bytes() == index_path(clean).read_bytes()
    assert not out.with_name("out.npy.partial").exists()


def test_writer_refuses_a_changed_draft_and_float16_overflow(tmp_path):
    units = _units(3, 4)
    path = tmp_path / "h.npy"
    w = HiddenWriter(path, 4, "float32")
    w.resume({})
    w.write(*units[0])
    state = w.commit()
    w.close(final=False)
    draft = tmp_path / "h.npy.partial"
    with open(draft, "r+b") as f:
        f.truncate(100)
    with pytest.raises(RerankerError, match="changed since"):
        HiddenWriter(path, 4, "float32").resume(state)
    with pytest.raises(RerankerError, match="started as float32 rows of 4"):
        HiddenWriter(path, 4, "float16").resume(state)
    w = HiddenWriter(tmp_path / "f16.npy", 4, "float16")
    w.resume({})
    unit, scores, rows = units[0]
    with pytest.raises(RerankerError, match=r"does not fit float16.*--hidden-dtype float32"):
        w.write(unit, scores, rows * 1e6)
    with pytest.raises(RerankerError, match="ending in .npy"):
        HiddenWriter(tmp_path / "h.bin", 4)


# --- a job: the states of the same decode, read back by the head ---------------------------------


def test_save_hidden_round_trip_gives_the_jobs_scores(model, head_path, tmp_path, capsys, reference):
    from reranker.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", NESTED)
    out, hid = tmp_path / "out.jsonl", tmp_path / "h32.npy"
    assert main(score_args(model, inp, out, "--per", "pair", "--save-hidden", hid)) == 0
    assert index_path(hid).read_bytes() == out.read_bytes()  # the index is the per-pair output, row for row
    states = load_hidden(hid)
    assert isinstance(states.embeddings, np.memmap) and states.embeddings.dtype == np.float32
    job = read_jsonl(out)
    assert states.query_ids == [r["query_id"] for r in job] and states.doc_ids == [r["doc_id"] for r in job]
    # the states are the model's: transformers' on the reference's own prompts, within the F32 tolerance
    pairs = [[r["query"], d] for r in NESTED for d in r["documents"]]
    assert_hidden_close(states.embeddings, reference.hidden(pairs), "f32", "--save-hidden rows")
    # the head on the saved states gives the job's scores (float32 head arithmetic, other batch shapes)
    head = ScoringHead.from_npz(head_path)
    job_scores = np.array([r["score"] for r in job], dtype=np.float32)
    np.testing.assert_allclose(score_embeddings(head, hid), job_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(head(torch.from_numpy(np.asarray(states.embeddings))).detach().numpy(), job_scores,
                               rtol=0, atol=1e-6)
    # `reranker head` keyed by the index: the job's lines, scores within the same rounding
    rescored = tmp_path / "rescored.jsonl"
    assert main(["head", str(hid), "--head", str(head_path), "-o", str(rescored)]) == 0
    again = read_jsonl(rescored)
    assert [(r["query_id"], r["doc_id"]) for r in again] == [(r["query_id"], r["doc_id"]) for r in job]
    np.testing.assert_allclose([r["score"] for r in again], job_scores, rtol=0, atol=1e-6)

    # float16: the float32 states rounded to nearest, and the head on them within that rounding
    out16, hid16 = tmp_path / "out16.jsonl", tmp_path / "h16.npy"
    assert main(score_args(model, inp, out16, "--per", "pair", "--save-hidden", hid16, "--hidden-dtype", "float16")) == 0
    assert out16.read_bytes() == out.read_bytes()  # the scores do not depend on how states are saved
    h16 = np.load(hid16)
    assert h16.dtype == np.float16
    np.testing.assert_array_equal(h16, np.load(hid).astype(np.float16))
    s16 = score_embeddings(head, hid16)
    np.testing.assert_allclose(s16, head(torch.from_numpy(h16.astype(np.float32))).detach().numpy(), rtol=0, atol=1e-6)
    assert 0 < np.abs(s16 - job_scores).max() < 1e-3
    capsys.readouterr()
    assert main(["head", str(tmp_path / "h32.npy"), "--head", str(head_path), "--format", "jsonl"]) == 0
    assert [json.loads(x)["doc_id"] for x in capsys.readouterr().out.splitlines()] == states.doc_ids


def test_save_hidden_paths_are_checked_and_owned(model, head_path, tmp_path, capsys):
    from reranker.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", NESTED[:2])
    out = tmp_path / "out.jsonl"

    def refused(*extra, needle):
        capsys.readouterr()
        assert main(score_args(model, inp, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err

    refused("--save-hidden", tmp_path / "h.bin", needle="ending in .npy")
    (tmp_path / "in.npy").symlink_to(inp)
    refused("--save-hidden", tmp_path / "in.npy", "--restart", needle="symbolic link")
    (tmp_path / "x.npy").hardlink_to(inp)
    refused("--save-hidden", tmp_path / "x.npy", "--restart", needle=f"is the input {inp}")
    refused("--save-hidden", tmp_path / "out.npy", "-o", tmp_path / "out.ids.jsonl", needle="--save-hidden")
    assert not out.exists() and not (tmp_path / "out.ids.jsonl").exists()

    # a file the job did not record is never emptied without --restart; --restart replaces it
    hid = tmp_path / "h.npy"
    hid.write_bytes(b"someone else's")
    refused("--save-hidden", hid, needle=f"hidden-state file {hid} exists")
    assert hid.read_bytes() == b"someone else's"
    assert main(score_args(model, inp, out, "--save-hidden", hid, "--restart")) == 0
    assert np.load(hid).shape == (6, load_hidden(hid).embeddings.shape[1])
    # adding or changing --save-hidden is a changed setting; losing the file redoes the job
    done = hid.read_bytes()
    refused("--save-hidden", hid, "--hidden-dtype", "float16", needle="different settings")
    hid.unlink()
    assert main(score_args(model, inp, out, "--save-hidden", hid)) == 0
    assert hid.read_bytes() == done
    # `reranker head --format jsonl` needs the index beside the .npy
    plain = tmp_path / "plain.npy"
    np.save(plain, np.load(hid))
    capsys.readouterr()
    assert main(["head", str(plain), "--head", str(head_path), "-o", str(tmp_path / "s.jsonl")]) == 2
    assert f"needs a hidden-state .npy with its index {tmp_path / 'plain.ids.jsonl'}" in capsys.readouterr().err


# --- SIGKILL of a real job: the files of an uninterrupted run -----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype,devices", [("float32", []), ("float16", ["--devices", "cpu,cpu"])], ids=["f32", "f16-2proc"])
def test_sigkill_and_resume_give_the_clean_hidden_files(model, tmp_path, dtype, devices):
    inp = tmp_path / "in.jsonl"
    write_nested(inp)
    clean, clean_h = tmp_path / "clean.jsonl", tmp_path / "clean.npy"
    assert run_here(score_cmd(model, inp, clean, "--save-hidden", clean_h, "--hidden-dtype", dtype)) == 0
    out, out_h = tmp_path / "out.jsonl", tmp_path / "out.npy"
    cmd = score_cmd(model, inp, out, "--save-hidden", out_h, "--hidden-dtype", dtype, *devices)
    # Three kill points for the one-process float32 job; the two-process float16 one (the pool's path, the other
    # dtype) needs one, as test_job's other output formats: each kill there restarts three processes.
    kills = [(3, 0.0), (12, 0.05), (25, 0.02)] if not devices else [(3, 0.0)]
    killed = 0
    for after, delay in kills:
        killed += kill_when(cmd, out, after, delay) == -signal.SIGKILL
    assert killed >= 1, "no run was killed mid-way: the test proves nothing"
    if devices:  # the pool spawns its device processes: from a process of its own, not from this test's worker
        res = run(cmd)
        assert res.returncode == 0, res.stderr
    else:
        assert run_here(cmd) == 0
    assert out.read_bytes() == clean.read_bytes()
    assert out_h.read_bytes() == clean_h.read_bytes()
    assert index_path(out_h).read_bytes() == index_path(clean_h).read_bytes()
    assert not (tmp_path / "out.npy.partial").exists() and not (tmp_path / "out.ids.jsonl.partial").exists()
    assert len(np.load(out_h)) == len(read_jsonl(index_path(out_h)))


@pytest.mark.slow
def test_example_finetunes_on_saved_states_and_a_fresh_job_agrees(model, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "hidden_states_finetune.py"
    res = subprocess.run([sys.executable, str(script), "-m", str(model), "--work", str(tmp_path), "--queries", "30",
                          "--epochs", "5"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rescored from saved states vs a fresh job with the fine-tuned head: max |diff|" in res.stdout
    tuned = ScoringHead.from_npz(tmp_path / "finetuned" / "mlp_weights.npz")
    assert not torch.equal(tuned.fc1.weight, ScoringHead.from_npz(model.parent / "mlp_weights.npz").fc1.weight)
    fresh = read_jsonl(tmp_path / "finetuned.jsonl")
    np.testing.assert_allclose(score_embeddings(tuned, tmp_path / "hidden.npy"), [r["score"] for r in fresh], rtol=0, atol=1e-6)


def test_save_hidden_with_chunking_keeps_the_scoring_chunks_state(model, head_path, tmp_path, capsys):
    """With --chunk, row i is the state of the chunk pair i's score comes from: the head on it gives the job's score."""
    from reranker.cli import main

    long_doc = " ".join(f"passage {i} about rerankers and 检索 number {i}." for i in range(60))
    records = [{"query_id": "q0", "query": "what is a reranker?", "documents": [long_doc, "short one", long_doc[::-1]]}]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    head = ScoringHead.from_npz(head_path)
    for how in ("max", "first"):
        out, hid = tmp_path / f"{how}.jsonl", tmp_path / f"{how}.npy"
        assert main(score_args(model, inp, out, "--per", "pair", "--max-length", "128", "--chunk", "--chunk-size", "48",
                         "--aggregate", how, "--save-hidden", hid)) == 0
        job = read_jsonl(out)
        assert max(r["chunks"] for r in job) > 1  # the long documents were chunked
        np.testing.assert_allclose(score_embeddings(head, hid), [r["score"] for r in job], rtol=0, atol=1e-6)
    capsys.readouterr()
    assert main(score_args(model, inp, tmp_path / "mean.jsonl", "--chunk", "--aggregate", "mean", "--save-hidden", tmp_path / "m.npy")) != 0
    assert "--aggregate mean" in capsys.readouterr().err and not (tmp_path / "mean.jsonl").exists()
