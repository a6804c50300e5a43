"""`reranker score`: SIGKILL at several points and resume gives the clean run's bytes; bad records; devices."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import WORDS, consumed, kill_when, run, run_here, score_args, score_cmd, write_nested


@pytest.mark.slow
@pytest.mark.parametrize("suffix,extra", [(".jsonl", []), (".trec", []), (".parquet", []), (".jsonl", ["--per", "pair"])],
                         ids=["jsonl-per-query", "trec", "parquet", "jsonl-per-pair"])
def test_sigkill_and_resume_equals_clean_run(model, tmp_path, suffix, extra):
    inp = tmp_path / "in.jsonl"
    write_nested(inp)
    clean = tmp_path / f"clean{suffix}"
    assert run_here(score_cmd(model, inp, clean, *extra)) == 0  # only the killed runs need processes of their own
    out = tmp_path / f"out{suffix}"
    kills = [(-1, 0.0), (5, 0.03), (15, 0.2)] if extra == [] and suffix == ".jsonl" else [(3, 0.01)]
    killed = 0
    for after, delay in kills:
        killed += kill_when(score_cmd(model, inp, out, *extra), out, after, delay) == -signal.SIGKILL
    assert killed >= 1, "no run was killed mid-way: the test proves nothing"
    assert run_here(score_cmd(model, inp, out, *extra)) == 0
    assert out.read_bytes() == clean.read_bytes()
    assert not out.with_name(out.name + ".partial").exists()
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    clean_summary = json.loads(clean.with_name(clean.name + ".summary.json").read_text())
    assert summary["pairs"] == clean_summary["pairs"] and summary["tokens"] == clean_summary["tokens"]


@pytest.mark.slow
def test_completed_job_is_not_redone_and_changes_are_refused(model, tmp_path, tiny_ggufs, capsys):
    from reranker.cli import main

    def score(*args):  # in this process: nothing here needs a process of its own (the kills above do)
        capsys.readouterr()
        return main(score_cmd(*args)[3:]), capsys.readouterr().err

    inp = tmp_path / "in.jsonl"
    write_nested(inp, n_queries=5)
    out = tmp_path / "out.jsonl"
    assert score(model, inp, out)[0] == 0
    rc, err = score(model, inp, out)
    assert rc == 0 and "already complete" in err
    # a changed model, input or head is refused without --restart
    rc, err = score(tiny_ggufs["f16"], inp, out)
    assert rc == 2 and "different model" in err and "--restart" in err
    write_nested(inp, n_queries=6)
    rc, err = score(model, inp, out)
    assert rc == 2 and "different input" in err
    rc, err = score(model, inp, out, "--restart")
    assert rc == 0, err
    assert len(out.read_text().splitlines()) == 6


def test_bad_records_fail_or_skip(model, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    good = json.dumps({"query": "q", "documents": ["a", "b"]})
    inp.write_bytes(b"\n".join([good.encode(), b"{not json", json.dumps({"query": "q"}).encode(),
                                json.dumps({"query": "q", "documents": [3]}).encode(), b'{"query": "\xff", "documents": ["x"]}',
                                json.dumps({"query": "q", "documents": ["  "]}).encode(), good.encode()]) + b"\n")
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert run_here(score_cmd(model, inp, out)) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2" in err and "malformed JSON" in err and "--on-error skip" in err, err
    assert run_here(score_cmd(model, inp, out, "--on-error", "skip")) == 0  # resumes the failed job
    rejects = [json.loads(line) for line in out.with_name("out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["source"].rsplit(":", 1)[1] for r in rejects] == ["2", "3", "4", "5"]
    assert [(r.get("query_id"), r.get("doc_index")) for r in rejects] == [(None, None), (None, None), ("3", 0), (None, None)]
    reasons = " | ".join(r["reason"] for r in rejects)
    for kind in ("malformed JSON", "missing field", "non-string text", "invalid UTF-8"):
        assert kind in reasons
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["query_id"], [(r["index"], r["document"]["text"]) for r in x["results"]]) for x in lines][1] == ("5", [(0, "  ")])
    assert len(lines) == 3  # the blank document (line 6) is scored
    assert json.loads(out.with_name("out.jsonl.summary.json").read_text())["skipped"] == 4


def test_a_job_stopped_before_its_first_window_follows_its_own_fix(model, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = json.dumps({"query": "q", "documents": ["a", "b"]})
    inp.write_bytes(b'{"query": "q", "documents": ["\xff"]}\n' + good.encode() + b"\n")
    capsys.readouterr()
    assert run_here(score_cmd(model, inp, out)) == 2
    assert "fix the record" in capsys.readouterr().err
    # The record fixed in place, as the error says: nothing was scored, so the job starts afresh (it used to be
    # refused as "started with a different input").
    inp.write_text(json.dumps({"query": "q", "documents": ["c"]}) + "\n" + good + "\n", encoding="utf-8")
    assert run_here(score_cmd(model, inp, out)) == 0, capsys.readouterr().err
    assert [json.loads(line)["query_id"] for line in out.read_text().splitlines()] == ["0", "1"]
    # A TREC run tag that cannot be one is refused before any checkpoint records it, so the corrected one runs.
    trec = tmp_path / "out.trec"
    assert run_here(score_cmd(model, inp, trec, "--run-tag", "my tag")) == 2
    assert "--run-tag 'my tag' must be one word" in capsys.readouterr().err
    assert not list(tmp_path.glob("out.trec*"))
    assert run_here(score_cmd(model, inp, trec, "--run-tag", "mytag")) == 0
    assert trec.read_text().split("\n")[0].endswith(" mytag")


def test_what_an_output_or_the_parser_cannot_take_is_a_reject_not_the_end_of_the_job(model, tmp_path, capsys):
    # A TREC run cannot carry ids with whitespace: such a document (or query) is a reject, and the rest is scored,
    # not a writer error that stopped the job on every rerun. An integer of more than 4300 digits is a reject too.
    inp = tmp_path / "in.jsonl"
    records = [{"query_id": "q1", "query": "one", "documents": [{"id": "d1", "text": "a"}, {"id": "d 2", "text": "b"},
                                                                {"id": "d3", "text": "c"}]},
               {"query_id": "q\t2", "query": "two", "documents": ["x"]},
               {"query_id": "q3", "query": "three", "documents": ["y"], "n": 0},
               {"query_id": "q4", "query": "four", "documents": ["z"]}]
    lines = [json.dumps(r) for r in records]
    lines[2] = lines[2].replace('"n": 0', '"n": ' + "9" * 5000)
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.trec"
    capsys.readouterr()
    assert run_here(score_cmd(model, inp, out)) == 2  # --on-error fail: the first reject stops it, in one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{inp}:1: bad TREC id: doc id 'd 2' is empty or holds whitespace" in err, err
    assert run_here(score_cmd(model, inp, out, "--on-error", "skip")) == 0
    run = out.read_text().splitlines()
    assert sorted((x.split()[0], x.split()[2]) for x in run) == [("q1", "d1"), ("q1", "d3"), ("q4", "0")]
    rejects = [json.loads(line) for line in out.with_name("out.trec.rejects.jsonl").read_text().splitlines()]
    assert [(r["source"].rsplit(":", 1)[1], r.get("query_id"), r.get("doc_index")) for r in rejects] == [
        ("1", "q1", 1), ("2", None, None), ("3", None, None)]
    assert rejects[1]["reason"].startswith("bad TREC id: query id 'q\\t2' is empty or holds whitespace")
    assert rejects[2]["reason"].startswith("malformed JSON: Exceeds the limit (4300 digits)")
    summary = json.loads(out.with_name("out.trec.summary.json").read_text())
    assert (summary["pairs"], summary["queries"], summary["skipped"]) == (3, 2, 3)


def test_flat_pairs_count_queries_and_default_ids_say_how_they_met(model, tmp_path):
    inp = tmp_path / "pairs.jsonl"
    inp.write_text("".join(json.dumps({"query_id": f"q{i // 3}", "query": f"query {i // 3}", "doc_id": f"d{i}",
                                       "document": "text"}) + "\n" for i in range(9)))
    out = tmp_path / "out.jsonl"
    assert run_here(score_cmd(model, inp, out)) == 0
    summary = json.loads(out.with_name("out.jsonl.summary.json").read_text())
    assert (summary["pairs"], summary["queries"]) == (9, 3)  # queries, not records
    assert [len(json.loads(x)["results"]) for x in out.read_text().splitlines()] == [3, 3, 3]  # one ranking per query
    # A record without query_id is given its record number, a document without id its index: a clash says so.
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({"query_id": "1", "query": "a", "documents": [{"id": "1", "text": "x"}, "y"]}) + "\n"
                     + json.dumps({"query": "b", "documents": ["z"]}) + "\n")
    assert run_here(score_cmd(model, clash, tmp_path / "c.jsonl", "--on-error", "skip")) == 0
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "c.jsonl.rejects.jsonl").read_text().splitlines()]
    assert "a document without an id is given its index: give every document of a record an id, or none" in reasons[0]
    assert 'a record without "query_id" is given its record number: give every record one, or none' in reasons[1]


MIXED = [  # good, empty and bad documents in one record; a record whose documents are all bad; an empty one
    {"query_id": "q1", "query": "rockets", "documents": ["a rocket launch", "", {"id": "bad", "text": 7}, {"id": "w", "text": "  "},
                                                       {"text": "a cake recipe"}, {"id": "w", "text": "dup"}]},
    {"query_id": "q2", "query": "cakes", "documents": [{"id": "x"}]},
    {"query_id": "q3", "query": "", "documents": ["", "\ud800"]},  # a lone surrogate: rejected, its raw text escaped
]


def test_bad_documents_fail_or_skip_alone_and_empty_ones_are_scored(model, tmp_path, capsys, tiny_reranker):
    from reranker.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in MIXED), encoding="utf-8")
    failed, out = tmp_path / "failed.jsonl", tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(score_cmd(model, inp, failed)[3:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"reranker score: error: {inp}:1: non-string text: \"documents[2].text\" is a number (query 'q1', document 2); ")
    assert "--on-error skip" in err and not failed.exists()

    assert main(score_cmd(model, inp, out, "--on-error", "skip")[3:]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [x["query_id"] for x in lines] == ["q1", "q3"]
    got = {(x["query"], r["index"], r["doc_id"], r["document"]["text"]): r["relevance_score"] for x in lines for r in x["results"]}
    assert list(got) == sorted(got, key=lambda k: (k[0] != "rockets", -got[k], k[1]))  # best first within a query
    assert sorted(got) == [("", 0, "0", ""), ("rockets", 0, "0", "a rocket launch"), ("rockets", 1, "1", ""),
                           ("rockets", 3, "w", "  "), ("rockets", 4, "4", "a cake recipe")]
    want = tiny_reranker.compute_score([[q, text] for q, _, _, text in got])
    assert list(got.values()) == pytest.approx(want, abs=1e-5)  # as test_api: batching moves scores by < 1e-5
    assert got[("rockets", 1, "1", "")] == pytest.approx(tiny_reranker.compute_score(["rockets", ""]), abs=1e-5)

    rejects = [json.loads(line) for line in out.with_name("out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert rejects == [
        {"source": f"{inp}:1", "query_id": "q1", "doc_index": 2,
         "reason": "non-string text: \"documents[2].text\" is a number (query 'q1', document 2)", "raw": '{"id": "bad", "text": 7}'},
        {"source": f"{inp}:1", "query_id": "q1", "doc_index": 5,
         "reason": "duplicate doc id: \"w\" in documents[3] and documents[5] (query 'q1', document 5)", "raw": '{"id": "w", "text": "dup"}'},
        {"source": f"{inp}:2", "query_id": "q2", "doc_index": 0,
         "reason": "missing field \"documents[0].text\" (query 'q2', document 0)", "raw": '{"id": "x"}'},
        {"source": f"{inp}:3", "query_id": "q3", "doc_index": 1,
         "reason": "invalid UTF-8: \"documents[1]\" holds a lone surrogate \\ud800 (query 'q3', document 1)", "raw": "\\ud800"},
    ]
    summary = json.loads(out.with_name("out.jsonl.summary.json").read_text())
    assert (summary["pairs"], summary["queries"], summary["skipped"]) == (5, 2, 4)


def write_mixed(path, n_queries=40, seed=0):
    """`write_nested`'s records with empty, blank and bad documents, all-bad records and bad lines mixed in."""
    rng = random.Random(seed)
    bad = [{"text": None}, 5, {"id": True, "text": "x"}, {"id": "x"}, ["x"], "\ud800"]
    with open(path, "wb") as f:
        for q in range(n_queries):
            if q % 9 == 4:
                f.write(b'{"query_id": "broken", "documents": [\n')
                continue
            docs: list = [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(rng.randint(1, 8))]
            for _ in range(rng.randint(0, 3)):
                docs.insert(rng.randint(0, len(docs)), rng.choice(["", " ", *bad]))
            if q % 7 == 3:
                docs = [rng.choice(bad) for _ in range(rng.randint(1, 3))]
            if q % 5 == 2 and isinstance(docs[0], str):
                docs = [{"id": "dup", "text": docs[0]}, *docs[1:], {"id": "dup", "text": "again"}]
            line = json.dumps({"query_id": f"q{q}", "query": " ".join(rng.choices(WORDS, k=3)), "documents": docs}, ensure_ascii=False)
            f.write(line.encode("utf-8", "backslashreplace") + b"\n")  # a lone surrogate as its JSON escape


@pytest.mark.slow
def test_sigkill_and_resume_with_empty_and_bad_documents(model, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_mixed(inp)
    clean, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    assert run_here(score_cmd(model, inp, clean, "--on-error", "skip")) == 0
    clean_rejects = clean.with_name("clean.jsonl.rejects.jsonl").read_bytes()
    rejected = [json.loads(line) for line in clean_rejects.decode().splitlines()]
    assert sum("doc_index" in r for r in rejected) >= 10 and sum("doc_index" not in r for r in rejected) >= 3
    texts = [r["document"]["text"] for line in clean.read_text(encoding="utf-8").splitlines() for r in json.loads(line)["results"]]
    assert "" in texts and " " in texts
    killed = 0
    for after, delay in [(3, 0.01), (12, 0.1)]:
        killed += kill_when(score_cmd(model, inp, out, "--on-error", "skip"), out, after, delay) == -signal.SIGKILL
    assert killed >= 1, "no run was killed mid-way: the test proves nothing"
    assert run_here(score_cmd(model, inp, out, "--on-error", "skip")) == 0
    assert out.read_bytes() == clean.read_bytes()
    assert out.with_name("out.jsonl.rejects.jsonl").read_bytes() == clean_rejects
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    clean_summary = json.loads(clean.with_name(clean.name + ".summary.json").read_text())
    for key in ("pairs", "tokens", "queries", "skipped"):
        assert summary[key] == clean_summary[key], key


@pytest.mark.slow
def test_two_cpu_processes_equal_one(model, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_nested(inp, n_queries=20, seed=3)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run_here(score_cmd(model, inp, one, "--threads", "1")) == 0
    res = run(score_cmd(model, inp, two, "--devices", "cpu,cpu", "--threads", "1"))
    assert res.returncode == 0, res.stderr
    assert two.read_bytes() == one.read_bytes()


# The job, in its own process, stops itself (SIGSTOP) right after its first checkpoint with progress;
# the test then sends Ctrl-C and SIGCONT. Stopped, the job cannot run ahead of the signal, and with
# windows of about one record it has tens of windows left: it can only end by the interrupt.
PAUSE_AFTER_FIRST_PROGRESS = """
import os, signal, sys
# Ctrl-C as in a terminal: under a shell's background job (no job control) SIGINT is inherited ignored, and
# Python then leaves it ignored, as it should; this job stands for one started in the foreground.
signal.signal(signal.SIGINT, signal.default_int_handler)
from reranker.jobs.resume import Checkpoint
save = Checkpoint.save
def save_then_pause(self, state):
    save(self, state)
    if state.get("consumed", 0) > 0 and not getattr(save_then_pause, "paused", False):
        save_then_pause.paused = True
        os.kill(os.getpid(), signal.SIGSTOP)
Checkpoint.save = save_then_pause
from reranker.cli import main
sys.exit(main(sys.argv[1:]))
"""


def stopped(pid: int) -> bool:
    """The process is stopped by a signal (state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(model, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_nested(inp)
    n_records = len(inp.read_text().splitlines())
    clean, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    assert run_here(score_cmd(model, inp, clean, "--window", "4")) == 0
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_PROGRESS, *score_args(model, inp, out, window=4)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not stopped(proc.pid):
            assert proc.poll() is None and time.time() < deadline, "the job never paused after its first checkpoint"
            time.sleep(0.01)
        at_interrupt = consumed(out)
        assert 0 < at_interrupt < n_records // 2, at_interrupt
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "reranker score: interrupted;" in err and "pairs are saved. Rerun the same command to resume." in err, err
    assert "Traceback" not in err
    assert at_interrupt <= consumed(out) < n_records and not out.exists()
    assert out.with_name(out.name + ".partial").exists()
    assert run_here(score_cmd(model, inp, out, "--window", "4")) == 0
    assert out.read_bytes() == clean.read_bytes()


def test_resume_with_another_head_is_refused_naming_the_head(model, head_path, tmp_path, capsys):
    """A head is part of a job's identity: resuming with another would mix two heads' scores in one output."""
    from reranker.cli import main

    other = tmp_path / "other" / "mlp_weights.npz"
    other.parent.mkdir()
    with np.load(head_path) as npz:
        arrays = dict(npz)
    arrays["b2"] = arrays["b2"] + np.float32(1.0)  # the same shapes, other scores
    np.savez(other, **arrays)
    inp = tmp_path / "in.jsonl"
    write_nested(inp, n_queries=6)
    with open(inp, "a") as f:
        f.write("{not json\n")  # the job stops here, unfinished, with its first records checkpointed
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(score_args(model, inp, out, "--window", "1")) == 2
    assert consumed(out) == 6
    capsys.readouterr()
    rc = main(score_args(model, inp, out, "--window", "1", "--head", other, "--on-error", "skip"))
    err = capsys.readouterr().err
    assert rc == 2 and f"{out} was started with a different head; rerun with --restart" in err, err
    assert main(score_args(model, inp, out, "--window", "1", "--head", head_path, "--on-error", "skip")) == 0
    assert len(out.read_text().splitlines()) == 6
