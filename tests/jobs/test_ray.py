"""`reranker score --engine ray` and the Ray Data callable: the local job's scores, actors and drivers killed.

One local Ray cluster (2 CPUs, CPU actors, one llama.cpp thread each) is shared by every test here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import write_nested

from reranker import RerankerError
from reranker.cli import main
from reranker.jobs.job import Window
from reranker.jobs.records import Unit

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SHARD = ["--window", "16", "--shard-windows", "2"]


def local_args(model, inp, out, *extra):
    return ["score", "-m", str(model), "-i", str(inp), "-o", str(out), "--n-ctx", "1024", "--window", "16",
            "--threads", "1", "--quiet", *extra]


def ray_args(model, inp, out, actors=1, *extra):
    return [*local_args(model, inp, out), "--engine", "ray", "--actors", str(actors), "--shard-windows", "2", *extra]


def write_flat_parquet(nested_jsonl, path, bad_row=False):
    rows = {"query_id": [], "query": [], "doc_id": [], "document": []}
    if bad_row:  # a null document: a reject
        rows = {"query_id": ["q-bad"], "query": ["x"], "doc_id": ["d0"], "document": [None]}
    for line in open(nested_jsonl, encoding="utf-8"):
        rec = json.loads(line)
        for i, d in enumerate(rec["documents"]):
            rows["query_id"].append(rec["query_id"])
            rows["query"].append(rec["query"])
            rows["doc_id"].append(f"d{i}")
            rows["document"].append(d)
    pq.write_table(pa.table(rows), path)


def write_beir(nested_jsonl, folder):
    """A BEIR folder with the same queries and documents, a run ranking them in input order, one unknown doc id."""
    folder.mkdir()
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as qf, open(folder / "corpus.jsonl", "w", encoding="utf-8") as cf, \
            open(folder / "run.trec", "w") as rf:
        for line in open(nested_jsonl, encoding="utf-8"):
            rec = json.loads(line)
            qf.write(json.dumps({"_id": rec["query_id"], "text": rec["query"]}, ensure_ascii=False) + "\n")
            for i, d in enumerate(rec["documents"]):
                cf.write(json.dumps({"_id": f"{rec['query_id']}-d{i}", "title": "", "text": d}, ensure_ascii=False) + "\n")
                rf.write(f"{rec['query_id']} Q0 {rec['query_id']}-d{i} {i + 1} {100 - i} bm25\n")
        rf.write("q0 Q0 nowhere 99 0.5 bm25\n")


def _raylet_pid() -> int:
    import ray

    return ray._private.worker._global_node.all_processes["raylet"][0].process.pid


def actor_pids() -> list[int]:
    """Processes of this cluster's scoring actors: children of its raylet named after `RayReranker`."""
    raylet, pids = _raylet_pid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet and b"RayReranker" in cmd:
            pids.append(int(d))
    return pids


def parts(out):
    return sorted(p.name for p in out.glob("part-*.parquet")) if out.is_dir() else []


# --- fast tier -------------------------------------------------------------------------------


def test_without_ray_the_error_says_how_to_install(monkeypatch, tmp_path, capsys, model):
    monkeypatch.setitem(sys.modules, "ray", None)
    from reranker.extras import install_hint
    from reranker.jobs.ray_data import require_ray

    with pytest.raises(RerankerError, match=re.escape(install_hint("ray"))):
        require_ray()
    (tmp_path / "in.jsonl").write_text('{"query": "q", "documents": ["d"]}\n')
    assert main(ray_args(model, tmp_path / "in.jsonl", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and install_hint("ray") in err[0]


def test_output_must_be_a_folder(tmp_path, capsys, model):
    pytest.importorskip("ray")
    (tmp_path / "in.jsonl").write_text('{"query": "q", "documents": ["d"]}\n')
    assert main(ray_args(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl")) == 2
    assert "folder of Parquet parts" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(ray_args(model, tmp_path / "in.jsonl", tmp_path / "out")) == 2
    assert "notes.txt, which this job did not write" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flags", [["--chunk"], ["--save-hidden", "h.npy"]], ids=["chunk", "save-hidden"])
def test_local_only_options_are_refused_at_once(tmp_path, capsys, model, flags):
    (tmp_path / "in.jsonl").write_text('{"query": "q", "documents": ["d"]}\n')
    assert main(ray_args(model, tmp_path / "in.jsonl", tmp_path / "out") + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flags[0]} is not supported with --engine ray" in err[0]
    assert not (tmp_path / "out").exists()


def test_shards_are_cut_between_queries_only():
    from reranker.jobs.ray_job import _shards

    def window(*qids):
        return Window(0, [Unit(0, q, "query", [("d", "t")], "src", pair=True) for q in qids], [])

    windows = [window("a", "a"), window("a", "b"), window("b"), window("c"), window(), window("c", "d"), window("e")]
    got = [[len(w.units) for w in ws] for _, ws in _shards(iter(windows), 2)]
    # "b" goes on into the third window and "c" into the sixth, so no shard ends there.
    assert got == [[2, 2, 1], [1, 0, 2], [1]]
    assert [i for i, _ in _shards(iter(windows), 2)] == [0, 1, 2]


def test_the_callable_scores_like_the_engine_and_ranks_per_query(tiny_ggufs, tiny_reranker):
    """`RayReranker` called directly (what each actor runs): one batch is one window of `score_prompts`."""
    from conftest import PAIRS

    from reranker.engine.scoring import score_prompts
    from reranker.jobs.ray_data import RayReranker

    scorer = RayReranker(str(tiny_ggufs["f32"]), load={"n_ctx": 4096, "n_batch": 1024},
                         columns={"query_id": "qid", "document": "text"}, rank=True, stats=True, drop=("text",))
    qids = [f"q{i // 4}" for i in range(len(PAIRS))]
    batch = pa.table({"qid": qids, "query": [q for q, _ in PAIRS], "text": [d for _, d in PAIRS]})
    out = scorer(batch)
    builder = tiny_reranker.prompt_builder()
    prompts = [builder.build(q, d) for q, d in PAIRS]
    assert out.column_names == ["qid", "query", "score", "rank", "_tokens", "_truncated"]
    assert np.array_equal(out.column("score").to_numpy(), score_prompts(tiny_reranker, prompts).scores)
    assert out.column("_tokens").to_pylist() == [len(p.ids) for p in prompts]
    scores, ranks = out.column("score").to_numpy(), out.column("rank").to_numpy()
    for q in set(qids):
        rows = [i for i, x in enumerate(qids) if x == q]
        assert [int(ranks[i]) for i in sorted(rows, key=lambda i: (-scores[i], i))] == list(range(1, len(rows) + 1))
    with pytest.raises(RerankerError, match="row 1 of the batch: 'text' is None"):
        scorer(pa.table({"qid": ["a", "a"], "query": ["q", "q"], "text": ["d", None]}))
    with pytest.raises(RerankerError, match="lacks the column"):
        scorer(pa.table({"qid": ["a"], "query": ["q"]}))


def test_an_actors_error_reaches_the_user_as_its_one_line():
    from reranker.jobs.ray_job import _cause

    class Wrapped(Exception):  # what Ray raises when an actor's __init__ failed: the traceback as text
        pass

    text = ("The actor died because of an error raised in its creation task, ray::MapWorker(...).__init__()\n"
            '  File "reranker/api.py", line 86, in __init__\n    raise RerankerError(...)\n'
            "reranker.errors.RerankerError: the head has hidden size 72 but the backbone x.gguf gives 64: use the "
            "mlp_weights.npz released with this GGUF")
    try:
        try:
            raise RuntimeError("")
        except RuntimeError as inner:
            raise Wrapped(text) from inner
    except Wrapped as e:
        assert _cause(e).startswith("the head has hidden size 72 but")
    try:
        try:
            raise RerankerError("input missing")
        except RerankerError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as e:
        assert _cause(e) == "input missing"
    assert _cause(OSError("disk\ngone")) == "OSError: gone"


@pytest.mark.slow  # writes a fresh identity copy of the tiny model: ~20 s on two busy cores
def test_fast_path_copy_is_made_once_per_node(model, tmp_path, monkeypatch):
    from reranker.jobs.ray_data import prepare_model

    monkeypatch.setenv("RERANKER_CACHE", str(tmp_path / "cache"))
    results: list = []
    barrier = threading.Barrier(3)

    def actor() -> None:
        barrier.wait()
        results.append(prepare_model(str(model)))

    threads = [threading.Thread(target=actor) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and sum(wrote for _, _, wrote in results) == 1
    assert len(list((tmp_path / "cache").glob("*.gguf"))) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


# --- slow tier: one local cluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-in")
    write_nested(d / "in.jsonl", n_queries=40)
    write_flat_parquet(d / "in.jsonl", d / "in.parquet", bad_row=True)
    write_beir(d / "in.jsonl", d / "beir")
    with open(d / "in.jsonl", "a", encoding="utf-8") as f:  # bad records follow --on-error
        f.write('{"query": "no documents"}\n{not json\n{"query_id": "q99", "query": "x", "documents": ["ok", 7]}\n')
    return d


@pytest.mark.slow
@pytest.mark.parametrize("fmt,actors", [("jsonl", 1), ("parquet", 1), ("parquet", 2), ("beir", 2)])  # JSONL, 2: the driver test
def test_ray_job_equals_the_local_job(ray_cluster, model, small_input, tmp_path, fmt, actors):
    inp = small_input / ("beir" if fmt == "beir" else f"in.{fmt}")
    local = tmp_path / "local.parquet"
    assert main(local_args(model, inp, local, "--on-error", "skip")) == 0
    out = tmp_path / "ray"
    assert main(ray_args(model, inp, out, actors, "--on-error", "skip")) == 0
    want, got = pq.read_table(local), pq.read_table(out)
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    assert got.equals(want), "scores differ from the local job's"  # the same windows: bit for bit on the CPU
    assert len(parts(out)) > 1
    local_rejects = local.with_name(local.name + ".rejects.jsonl")
    ray_rejects = out.with_name(out.name + ".rejects.jsonl")
    assert ray_rejects.read_bytes() == local_rejects.read_bytes() and ray_rejects.stat().st_size > 0
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    local_summary = json.loads(local.with_name(local.name + ".summary.json").read_text())
    for key in ("pairs", "tokens", "truncated", "skipped", "queries"):
        assert summary[key] == local_summary[key], key
    assert summary["actors"] == actors
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["done"] and manifest["shards"] == len(parts(out))
    # A rerun finds every shard complete and scores nothing.
    assert main(ray_args(model, inp, out, actors, "--on-error", "skip")) == 0
    assert json.loads(out.with_name(out.name + ".summary.json").read_text())["pairs_this_run"] == 0
    assert pq.read_table(out).equals(want)
    if fmt == "jsonl":  # a rerun that --on-error fail stops at a bad record leaves the rejects as they were (it emptied them)
        assert main(ray_args(model, inp, out, actors)) == 2
        assert ray_rejects.read_bytes() == local_rejects.read_bytes()
        assert not list(tmp_path.glob(".ray.rejects.jsonl.tmp-*"))


@pytest.mark.slow
def test_on_error_fail_stops_before_scoring(ray_cluster, model, small_input, tmp_path, capsys):
    out = tmp_path / "ray"
    assert main(ray_args(model, small_input / "in.jsonl", out)) == 2
    err = capsys.readouterr().err
    assert 'missing field "documents"' in err and "in.jsonl:41" in err
    assert parts(out) == []


@pytest.mark.slow
def test_recipe_read_parquet_map_batches(ray_cluster, model, tiny_reranker, tmp_path):
    """The README's recipe: ray.data.read_parquet, map_batches(RayReranker), write_parquet; own column names, ranks."""
    import ray

    from reranker.jobs.ray_data import RayReranker, actor_options, map_batches_quietly

    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta 机器 学习 🎉 code() résumé".split()
    rows = {"qid": [], "q": [], "did": [], "text": []}
    for q in range(6):
        for d in range(5):
            rows["qid"].append(f"q{q}")
            rows["q"].append(" ".join(rng.choice(words, 3)))
            rows["did"].append(f"d{d}")
            rows["text"].append(" ".join(rng.choice(words, int(rng.integers(1, 30)))))
    rows["q"] = [rows["q"][i - i % 5] for i in range(len(rows["q"]))]  # one text per query
    pq.write_table(pa.table(rows), tmp_path / "pairs.parquet")

    ds = ray.data.read_parquet(str(tmp_path / "pairs.parquet"))
    ds = map_batches_quietly(ds, RayReranker, fn_constructor_kwargs={
        "model": str(model), "load": {"n_ctx": 1024, "n_threads": 1},
        "columns": {"query_id": "qid", "query": "q", "doc_id": "did", "document": "text"}, "rank": True},
        batch_format="pyarrow", batch_size=None, **actor_options(1))
    ds.write_parquet(str(tmp_path / "scored"))
    got = pq.read_table(tmp_path / "scored").to_pandas().sort_values(["qid", "did"]).reset_index(drop=True)
    assert len(got) == 30 and set(got.columns) >= {"qid", "q", "did", "text", "score", "rank"}
    want = np.array(tiny_reranker.compute_score([[q, d] for q, d in zip(got["q"], got["text"])]))
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-5, atol=1e-6)  # other batches: other packing
    for _, g in got.groupby("qid"):
        order = np.argsort(-g["score"].to_numpy(), kind="stable")
        assert sorted(g["rank"]) == [1, 2, 3, 4, 5] and list(g["rank"].to_numpy()[order]) == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def big(model, tmp_path_factory):
    """An input long enough to kill things part-way, and the local job's output for it."""
    d = tmp_path_factory.mktemp("ray-big")
    write_nested(d / "in.jsonl", n_queries=160, seed=3)
    assert main(local_args(model, d / "in.jsonl", d / "local.parquet")) == 0
    return d / "in.jsonl", pq.read_table(d / "local.parquet")


@pytest.mark.slow
def test_sigkilled_actor_is_restarted_and_its_blocks_redone(ray_cluster, model, big, tmp_path):
    inp, want = big
    out = tmp_path / "ray"
    result: list = []
    job = threading.Thread(target=lambda: result.append(main(ray_args(model, inp, out, 1))))
    job.start()
    killed: list[int] = []
    deadline = time.time() + 240
    while job.is_alive() and time.time() < deadline and not killed:
        pids = actor_pids()
        if pids and 1 <= len(parts(out)):  # part-way: some shards written, the actor busy with the next
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    written_at_kill = len(parts(out))
    job.join(300)
    assert killed, "no actor was found to kill: the test proves nothing"
    assert result == [0]
    total = json.loads((out / "_manifest.json").read_text())["shards"]
    assert written_at_kill < total, "the job had finished before the kill"
    got = pq.read_table(out)
    assert got.num_rows == want.num_rows
    keys = list(zip(got.column("query_id").to_pylist(), got.column("doc_id").to_pylist()))
    assert len(set(keys)) == len(keys), "a pair was written twice"
    assert got.equals(want)
    assert not set(actor_pids()) & set(killed)


@pytest.mark.slow
def test_killed_driver_reruns_and_skips_complete_shards(ray_cluster, model, big, tmp_path):
    inp, want = big
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "reranker", *ray_args(model, inp, out, 2, "--ray-address", ray_cluster)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(parts(out)) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the driver was not killed mid-way: {err[-2000:]}"
    done_before = len(parts(out))
    assert main(ray_args(model, inp, out, 2)) == 0
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    assert summary["shards_skipped"] >= done_before >= 2 and summary["shards_skipped"] < summary["shards"]
    assert summary["pairs_this_run"] < summary["pairs"] == want.num_rows
    assert pq.read_table(out).equals(want)
    # The same folder with a changed input is refused, not resumed into.
    changed = tmp_path / "in.jsonl"
    changed.write_bytes(inp.read_bytes() + b'{"query": "one more", "documents": ["d"]}\n')
    assert main(ray_args(model, changed, out, 2)) == 2
    assert pq.read_table(out).equals(want)
