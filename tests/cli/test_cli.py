"""The `reranker` command line: end to end as a real subprocess (`python -m reranker`), the rest in this process
(conftest's `cli_here`, output read at the file descriptors as a process's would be)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reranker", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_synth_convert_quantize_rerank(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run("synth", "--preset", "tiny", "--seed", "3", "-o", str(ckpt)).returncode == 0
    res = run("convert", str(ckpt), "-o", str(tmp_path / "out"), "--outtype", "f16")
    assert res.returncode == 0, res.stderr
    gguf = tmp_path / "out" / "ckpt-F16.gguf"
    assert gguf.is_file() and (tmp_path / "out" / "mlp_weights.npz").is_file()
    mmproj = tmp_path / "out" / "mmproj-ckpt-F16.gguf"  # the vision projector, F16 by default
    assert mmproj.is_file() and res.stdout.split() == [str(gguf), str(tmp_path / "out" / "mlp_weights.npz"), str(mmproj)]
    res = run("rerank", "-m", str(tmp_path / "out"), "-q", "rockets", "-d", "a rocket launch", "--json")
    assert res.returncode == 0, res.stderr  # the folder resolves to the backbone beside the projector
    assert json.loads(res.stdout)["model"] == str(tmp_path / "out")
    res = run("convert", str(ckpt), "-o", str(tmp_path / "q8"), "--outtype", "f32", "--mmproj-type", "q8_0")
    assert res.returncode == 0 and (tmp_path / "q8" / "mmproj-ckpt-Q8_0.gguf").is_file(), res.stderr
    res = run("quantize", str(gguf), str(tmp_path / "out" / "ckpt-Q8_0.gguf"), "--type", "Q8_0")
    assert res.returncode == 0, res.stderr
    res = run("rerank", "-m", str(gguf), "-q", "rockets", "-d", "a rocket launch", "-d", "a cake recipe", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["model"] == str(gguf) and out["usage"]["total_tokens"] > 10
    scores = [r["relevance_score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert {r["document"]["text"] for r in out["results"]} == {"a rocket launch", "a cake recipe"}
    assert sorted(r["index"] for r in out["results"]) == [0, 1]


@pytest.fixture()
def gguf(tiny_ggufs):
    return str(tiny_ggufs["f32"])


def test_rerank_table_and_files(gguf, tmp_path, cli_here):
    lines = tmp_path / "docs.txt"
    lines.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    res = cli_here("rerank", "-m", gguf, "-q", "query", "-f", str(lines), "--top-n", "1")
    assert res.returncode == 0, res.stderr
    rows = res.stdout.strip().splitlines()
    assert rows[0].split() == ["rank", "index", "score", "document"] and len(rows) == 2

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "multi\\nline doc"}\n{"text": "another"}\n', encoding="utf-8")
    res = cli_here("rerank", "-m", gguf, "-q", "query", "-f", str(jsonl), "--json")
    assert res.returncode == 0, res.stderr
    assert {r["document"]["text"] for r in json.loads(res.stdout)["results"]} == {"multi\nline doc", "another"}


def test_rerank_json_scores_are_compute_scores(gguf, tiny_reranker, tmp_path, capsys):
    """Each `rerank --json` score is `compute_score` of (the query, that document), bit for bit.

    Bit-equal, not close: with the fixture's n_ctx and n_batch the command loads the same GGUF with the
    same layout, and `rank` scores the pairs in input order in one call, so every prompt takes the same
    KV-cache cells and batch shapes as in `compute_score` on the same list; JSON writes floats exactly.
    """
    from conftest import PAIRS

    from reranker.cli import main

    query = "what is a reranker?"
    docs = [d for _, d in PAIRS]  # empty, multi-line, special-token and non-Latin documents
    file = tmp_path / "docs.jsonl"
    file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    capsys.readouterr()
    assert main(["rerank", "-m", gguf, "-q", query, "-f", str(file), "--json", "--device", "cpu",
                 "--n-ctx", "4096", "--n-batch", "1024"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    got = {r["index"]: r["relevance_score"] for r in results}
    assert sorted(got) == list(range(len(docs))) and all(r["document"]["text"] == docs[r["index"]] for r in results)
    want = tiny_reranker.compute_score([[query, d] for d in docs])
    assert [got[i] for i in range(len(docs))] == want
    # the comparison can tell the query apart: the same documents under another query score otherwise
    assert tiny_reranker.compute_score([["", d] for d in docs]) != want


def test_errors_are_one_clear_line(gguf, tmp_path, cli_here):
    res = cli_here("rerank", "-m", str(tmp_path / "missing.gguf"), "-q", "q", "-d", "d")
    assert res.returncode == 2 and "GGUF file not found" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n', encoding="utf-8")
    res = cli_here("rerank", "-m", gguf, "-q", "q", "-f", str(bad))
    assert res.returncode == 2 and f"{bad}:2" in res.stderr and "Traceback" not in res.stderr
    res = cli_here("rerank", "-m", gguf, "-q", "q")
    assert res.returncode == 2 and "no documents" in res.stderr
    npz = tmp_path / "mlp_weights.npz"
    np.savez(npz, W1=np.zeros((4, 4), np.float32))
    res = cli_here("rerank", "-m", gguf, "--head", str(npz), "-q", "q", "-d", "d")
    assert res.returncode == 2 and str(npz) in res.stderr and "b1" in res.stderr and "Traceback" not in res.stderr


def test_options_of_a_mode_not_asked_for_are_refused(tmp_path, cli_here):
    # Each refused before any file is read (the model and the input do not exist): an option that does nothing
    # where it is given is a mistake to name, not to ignore.
    model, inp, out = str(tmp_path / "m.gguf"), str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    cases = [(["score", "-m", model, "-i", inp, "-o", out, "--actor-cpus", "2"], "--actor-cpus applies to --engine ray"),
             (["score", "-m", model, "-i", inp, "-o", out, "--shard-windows", "4"], "--shard-windows applies to --engine ray"),
             (["score", "-m", model, "-i", inp, "-o", out, "--ray-address", "auto"], "--ray-address applies to --engine ray"),
             (["score", "-m", model, "-i", inp, "-o", out, "--hidden-dtype", "float16"], "--hidden-dtype applies to --save-hidden"),
             (["rerank", "-m", model, "-q", "q", "-d", "d", "--max-pages", "3"], "--max-pages applies to --pdf")]
    for argv, message in cases:
        res = cli_here(*argv)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (argv, res.stderr)


def test_rerank_reads_documents_from_stdin(gguf, tiny_reranker, cli_here, monkeypatch):
    import io

    docs = ["a rocket launch", "", "a cake recipe"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(docs).encode() + b"\n")))
    res = cli_here("rerank", "-m", gguf, "-q", "rockets", "-f", "-", "--json")
    assert res.returncode == 0, res.stderr
    got = {r["index"]: r["relevance_score"] for r in json.loads(res.stdout)["results"]}
    assert got == pytest.approx(dict(enumerate(tiny_reranker.compute_score([["rockets", d] for d in docs]))), abs=1e-6)


def test_documents_file_lines_end_at_newline_only(tmp_path):
    """A form feed, U+2028 or U+0085 inside a line (PDF-extracted text) is part of its document: indices stay put."""
    from reranker.cli.rerank import read_documents

    docs = ["page one\fpage two", "a\u2028b", "c\x85d", "plain"]
    lines = tmp_path / "docs.txt"
    lines.write_bytes(("\r\n".join(docs) + "\n").encode("utf-8"))
    assert read_documents(lines) == docs
    # A blank line is an empty document, not a gap: the index of "banana" is its line number - 1.
    (tmp_path / "gaps.txt").write_text("apple\n\n   \nbanana\n")
    assert read_documents(tmp_path / "gaps.txt") == ["apple", "", "   ", "banana"]
    (tmp_path / "no-newline.txt").write_text("apple\nbanana")
    assert read_documents(tmp_path / "no-newline.txt") == ["apple", "banana"]
    jsonl = tmp_path / "docs.jsonl"
    # json.dumps escapes U+2028; a raw one inside a JSON string is valid JSON and must reach the parser whole
    jsonl.write_bytes("".join('{"text": "%s"}\n' % d.replace("\f", "\\f") for d in docs).encode("utf-8"))
    assert read_documents(jsonl) == docs


def test_cache_list_says_what_a_stale_copy_is(tmp_path, cli_here):
    """A copy is found by its source's bytes: a moved GGUF's copy is listed stale (no source known) until the GGUF is
    loaded from its new place, which reuses it; the listing says so, not "never used again"."""
    import os

    from helpers import write_gguf

    from reranker.engine.identity import with_identity_output

    cache, moved = tmp_path / "cache", tmp_path / "moved"
    src = write_gguf(tmp_path / "m-F32.gguf", {"qwen2vl.embedding_length": 4, "tokenizer.ggml.model": "gpt2",
                                               "tokenizer.ggml.tokens": [f"t{i}" for i in range(8)]},
                     {"token_embd.weight": np.ones((8, 4), np.float32)})
    copy = with_identity_output(src, cache_dir=cache)
    moved.mkdir()
    os.replace(src, moved / src.name)
    res = cli_here("cache", "list", "--dir", cache)
    assert res.returncode == 0 and "stale" in res.stdout.splitlines()[0] and "1 stale" in res.stdout, res.stdout
    assert "never used again" not in res.stdout and "moved" in res.stdout and "reuses the copy" in res.stdout
    assert with_identity_output(moved / src.name, cache_dir=cache) == copy  # the same copy, nothing written
    assert [p.name for p in cache.glob("*.gguf")] == [copy.name]
    res = cli_here("cache", "list", "--dir", cache)
    assert "current" in res.stdout.splitlines()[0] and "0 stale" in res.stdout, res.stdout


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`reranker cache list | head -1`: the pipe closed under the command is no traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a pipe is by default
    try:
        res = subprocess.run([sys.executable, "-m", "reranker", "cache", "list", "--dir", str(tmp_path)], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=300, env=env)
    finally:
        os.close(write_end)
    assert res.returncode == 1 and res.stderr == "", res.stderr
