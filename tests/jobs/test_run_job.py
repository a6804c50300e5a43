"""`reranker.jobs.run.run_job`: the job as a library call, shared by the local and the Ray engine; it prints nothing."""

from __future__ import annotations

import json

import pytest
from helpers import read_jsonl, score_args, write_nested

from reranker import RerankerError
from reranker.jobs.job import JobSpec
from reranker.jobs.run import preflight, run_job
from reranker.options import Chunking
from reranker.settings import LoadSettings


def test_run_job_returns_the_summary_and_prints_nothing(model, head_path, tiny_reranker, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_nested(inp, n_queries=6, max_words=12)
    settings = LoadSettings(model=str(model), n_ctx=1024)
    summary = run_job(JobSpec(input=inp, output=out, window=8, per="pair"), settings, devices="cpu", quiet=True)
    assert capsys.readouterr() == ("", "")
    assert not summary.already_complete
    assert summary.values == json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    rows = read_jsonl(out)
    assert summary["pairs"] == len(rows) > 6 and summary["queries"] == 6
    again = run_job(JobSpec(input=inp, output=out, window=8, per="pair"), settings, devices="cpu", quiet=True)
    assert again.already_complete and again["pairs"] == summary["pairs"]
    assert capsys.readouterr() == ("", "")
    # The fingerprint's settings part is LoadSettings.fingerprint(), with bf16 decided for the file.
    pre = preflight(JobSpec(input=inp, output=out), settings)
    assert pre.head == head_path and pre.settings.bf16 is False and pre.settings.head == str(head_path)
    assert json.loads((tmp_path / "out.jsonl.checkpoint.json").read_text())["fingerprint"]["settings"]["fast"] is True
    assert pre.fingerprint["settings"] == pre.settings.fingerprint()


def test_ray_refusals_come_before_the_model_loads(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_nested(inp, n_queries=1)
    missing = LoadSettings(model=str(tmp_path / "missing.gguf"))
    spec = JobSpec(input=inp, output=tmp_path / "out", chunking=Chunking())
    with pytest.raises(RerankerError, match="--chunk is not supported with --engine ray"):
        run_job(spec, missing, engine="ray")
    with pytest.raises(RerankerError, match="--devices chooses the local engine's processes"):
        run_job(JobSpec(input=inp, output=tmp_path / "out"), missing, engine="ray", devices="cpu")
    with pytest.raises(RerankerError, match="engine='spark' must be 'local' or 'ray'"):
        run_job(JobSpec(input=inp, output=tmp_path / "out"), missing, engine="spark")


def test_a_job_cuts_documents_to_max_doc_length_and_records_it(model, tiny_reranker, tmp_path):
    # --max-doc-length reaches the job's prompts (as compute_score's max_doc_length) and its settings.
    from reranker.cli import main

    inp = tmp_path / "in.jsonl"
    write_nested(inp, n_queries=6, max_words=60, max_docs=4)
    records = [json.loads(line) for line in inp.read_text().splitlines()]
    pairs = [[r["query"], d] for r in records for d in r["documents"]]
    out, default = tmp_path / "out.jsonl", tmp_path / "default.jsonl"
    assert main(score_args(model, inp, out, "--max-doc-length", "24")) == 0
    assert main(score_args(model, inp, default)) == 0

    def scores(path):
        return [r["relevance_score"] for line in read_jsonl(path) for r in sorted(line["results"], key=lambda r: r["index"])]

    cut = tiny_reranker.compute_score(pairs, max_doc_length=24)
    truncated = tiny_reranker.last_usage.truncated
    assert truncated > 3
    assert scores(out) == pytest.approx(cut, abs=1e-5) and scores(default) == pytest.approx(tiny_reranker.compute_score(pairs), abs=1e-5)
    assert scores(out) != pytest.approx(scores(default), abs=1e-3)
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["truncated"] == truncated
    settings = [json.loads((tmp_path / f"{p}.checkpoint.json").read_text())["fingerprint"]["settings"] for p in ("out.jsonl", "default.jsonl")]
    assert settings[0]["max_doc_length"] == 24 and "max_doc_length" not in settings[1]  # the default: as before it existed
    assert main(score_args(model, inp, out, "--max-doc-length", "30")) == 2  # another cap is another job
