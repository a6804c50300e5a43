"""`reranker score` never destroys data, never silently mixes results, and fails in one line.

- data loss: outputs and their companions never alias an input, the head, the model or each
  other; only regular files are written; a lock keeps a second job off an output; `--restart`
  and fresh starts touch only the job's own files;
- silently wrong results: inputs are hashed whole; the query-id rule (`validate.py`) holds for
  every format, on resume too; a finished job whose output was deleted is redone;
- tracebacks: every user-caused problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
from helpers import score_args, write_jsonl

from reranker.errors import RerankerError
from reranker.jobs import paths, writers
from reranker.jobs.paths import JobFiles, JobLock, check_job_files
from reranker.jobs.readers import read_input
from reranker.jobs.records import Reject, Unit
from reranker.jobs.resume import input_fingerprint
from reranker.jobs.validate import one_run_per_query

NESTED = [{"query_id": f"q{i}", "query": f"query {i}", "documents": [f"doc {i} a", f"doc {i} b", f"doc {i} c"]} for i in range(6)]


def run(cli_args, **kw):
    """`python -m reranker CLI_ARGS` in a real process."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    return helpers.run([sys.executable, "-m", "reranker", *map(str, cli_args)], **kw)


def here(capsys, cli_args) -> subprocess.CompletedProcess:
    """`run` in this process (`reranker.cli.main`): for checks that need no process of their own, without its start-up."""
    from reranker.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in cli_args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(cli_args, rc, out, err)


def one_line_error(res, *needles):
    """The process failed as a user error: status 2, one line on stderr naming `needles`, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("reranker score: error: "), res.stderr
    for needle in needles:
        assert str(needle) in res.stderr, (needle, res.stderr)


def snapshot(folder):
    """{name: bytes or kind} of everything in `folder`, to show a refused job changed nothing."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        out[p.name] = p.read_bytes() if p.is_file() and not p.is_symlink() else ("link" if p.is_symlink() else "other")
    return out


# --- data loss: aliasing (each fails before the model loads) ----------------------------------------


@pytest.mark.parametrize("how", ["same path", "hard link", "symlinked folder"])
def test_output_that_is_the_input_is_refused_even_with_restart(model, tmp_path, how, cli_here):
    inp = write_jsonl(tmp_path / "d.jsonl", NESTED)
    out = {"same path": inp, "hard link": tmp_path / "link.jsonl", "symlinked folder": tmp_path / "alias" / "d.jsonl"}[how]
    if how == "hard link":
        os.link(inp, out)
    elif how == "symlinked folder":
        (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    before = snapshot(tmp_path)
    for extra in ([], ["--restart"]):
        res = cli_here(*score_args(model, inp, out, *extra))
        one_line_error(res, "is the input", "choose another -o")
        assert "--restart" not in res.stderr  # the old message suggested the flag that deleted the input
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["head", "input", "output", "summary"])
def test_rejects_file_that_names_another_file_is_refused(model, head_path, tmp_path, target, cli_here):
    inp = write_jsonl(tmp_path / "in.jsonl", NESTED)
    out = tmp_path / "out.jsonl"
    rejects = {"head": head_path, "input": inp, "output": out, "summary": tmp_path / "out.jsonl.summary.json"}[target]
    head_bytes = head_path.read_bytes()
    before = snapshot(tmp_path)
    res = cli_here(*score_args(model, inp, out, "--on-error", "skip", "--rejects", rejects, "--restart"))
    one_line_error(res, rejects, "choose another --rejects")
    assert head_path.read_bytes() == head_bytes and snapshot(tmp_path) == before


def test_special_files_are_never_written(model, tmp_path, cli_here):
    inp = write_jsonl(tmp_path / "in.jsonl", NESTED)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    before = snapshot(tmp_path)
    res = cli_here(*score_args(model, inp, "/dev/null", "--output-format", "jsonl", "--restart"))
    one_line_error(res, "/dev/null", "character device", "only regular files")
    assert Path("/dev/null").is_char_device() and not Path("/dev/null.lock").exists()
    for out, kind in ((fifo, "pipe"), (tmp_path / "folder.jsonl", "folder"), (tmp_path / "link.jsonl", "symbolic link")):
        one_line_error(cli_here(*score_args(model, inp, out, "--restart")), out, kind)
    one_line_error(cli_here(*score_args(model, inp, tmp_path / "o.jsonl", "--rejects", fifo, "--restart")), fifo, "pipe", "--rejects")
    assert snapshot(tmp_path) == before and fifo.is_fifo()


def test_check_job_files_aliases(tmp_path, head_path):
    inp = write_jsonl(tmp_path / "in.jsonl", NESTED)
    reads = [("input", inp), ("head", head_path)]
    check_job_files(JobFiles.of(tmp_path / "out.jsonl"), reads)  # a plain job passes
    (tmp_path / "sub").mkdir()
    (tmp_path / "ln.jsonl").symlink_to(inp)
    for output, rejects, needle in [
        (tmp_path / "sub" / ".." / "in.jsonl", None, "is the input"),
        (tmp_path / "out.jsonl", tmp_path / "ln.jsonl", "is a symbolic link"),
        (tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial", "rejects file .* is also the job's draft"),
        (tmp_path / "out.jsonl", tmp_path / "out.jsonl.lock", "rejects file .* is also the job's lock file .*--rejects"),
        (tmp_path / "in.jsonl.rejects", None, None),  # a companion-like name of another file is fine
    ]:
        files = JobFiles.of(output, rejects)
        if needle is None:
            check_job_files(files, reads)
        else:
            with pytest.raises(RerankerError, match=needle):
                check_job_files(files, reads)
    # a BEIR folder: outputs may live inside it, but its parts folder may not be the folder itself
    beir = tmp_path / "x.parts"
    beir.mkdir()
    check_job_files(JobFiles.of(beir / "out.trec"), [("input", beir)])
    with pytest.raises(RerankerError, match="parts folder .* is the input"):
        check_job_files(JobFiles.of(tmp_path / "x"), [("input", beir)])


# --- data loss: the lock ------------------------------------------------------------------------


def test_lock_is_exclusive_released_and_robust(tmp_path, monkeypatch):
    files = JobFiles.of(tmp_path / "out.jsonl")
    with JobLock(files):
        assert all(p.is_file() for p in files.locks)
        with pytest.raises(RerankerError, match=f"{files.output} is in use: another `reranker score` job \\(pid {os.getpid()}\\)"):
            JobLock(files).acquire()
        # another output sharing this job's rejects file is refused too
        with pytest.raises(RerankerError, match="the rejects file .* is in use"):
            JobLock(JobFiles.of(tmp_path / "other.jsonl", files.rejects)).acquire()
    assert not any(p.exists() for p in files.locks)  # removed on release

    # A job that locks a lock file just removed by a finishing job must notice and lock the new one.
    real_flock, raced = paths.fcntl.flock, []

    def flock(fd, op):
        real_flock(fd, op)
        if not raced:
            raced.append(fd)
            files.locks[0].unlink()  # the finishing job removes the file this job opened

    monkeypatch.setattr(paths.fcntl, "flock", flock)
    lock = JobLock(files)
    lock.acquire()
    assert raced and all(paths._names(p, fd) for p, fd in lock._held)
    lock.release()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    files = JobFiles.of(tmp_path / "out.jsonl")
    code = ("import sys, time; from reranker.jobs.paths import JobFiles, JobLock; "
            f"JobLock(JobFiles.of({str(files.output)!r})).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RerankerError, match="is in use"):
            JobLock(files).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert files.locks[0].exists()  # a SIGKILL leaves the file, but not the lock
    with JobLock(files):
        pass


@pytest.mark.slow
def test_two_jobs_on_one_output_one_fails_at_once(model, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", NESTED)
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "query": r["query"] + " (b)"} for r in NESTED[:4]])
    out = tmp_path / "out.jsonl"
    cmds = {inp: [sys.executable, "-m", "reranker", *score_args(model, inp, out)] for inp in (a, b)}
    start = time.monotonic()
    procs = {inp: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for inp, cmd in cmds.items()}
    ended = {}
    while len(ended) < 2 and time.monotonic() - start < 300:
        for inp, p in procs.items():
            if inp not in ended and p.poll() is not None:
                ended[inp] = time.monotonic() - start
        time.sleep(0.02)
    results = {inp: (p.returncode, p.communicate()[1]) for inp, p in procs.items()}
    winners = [inp for inp, (rc, _) in results.items() if rc == 0]
    losers = [inp for inp, (rc, _) in results.items() if rc != 0]
    assert len(winners) == len(losers) == 1, results
    rc, err = results[losers[0]]
    assert rc == 2 and err.count("\n") == 1 and f"{out} is in use" in err and "Traceback" not in err, err
    assert ended[losers[0]] < ended[winners[0]]  # at once: it did not wait for the model or the other job
    clean = tmp_path / "clean.jsonl"
    assert here(capsys, score_args(model, winners[0], clean)).returncode == 0
    assert out.read_bytes() == clean.read_bytes()
    assert not (tmp_path / "out.jsonl.lock").exists()
    # the loser's rerun now finds the winner's finished job, from another input
    one_line_error(here(capsys, score_args(model, losers[0], out)), "different input")


# --- data loss: what a fresh start or --restart may touch ---------------------------------------


def test_unrecorded_rejects_file_is_refused_without_restart(model, tmp_path, capsys):
    from reranker.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", NESTED[:2] + [{"query": "q", "documents": [5]}])
    out, rejects = tmp_path / "out.jsonl", tmp_path / "mine.jsonl"
    rejects.write_text("someone else's rejects\n")
    capsys.readouterr()
    assert main(score_args(model, inp, out, "--on-error", "skip", "--rejects", rejects)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"rejects file {rejects} exists" in err and "--restart" in err
    assert rejects.read_text() == "someone else's rejects\n" and not out.exists()
    assert main(score_args(model, inp, out, "--on-error", "skip", "--rejects", rejects, "--restart")) == 0
    assert [json.loads(x)["source"] for x in rejects.read_text().splitlines()] == [f"{inp}:3"]
    # resuming under another rejects file would cut the wrong file: refused
    (tmp_path / "out.jsonl.checkpoint.json").write_text(
        (tmp_path / "out.jsonl.checkpoint.json").read_text().replace('"done": true', '"done": false'))
    capsys.readouterr()
    assert main(score_args(model, inp, out, "--on-error", "skip")) == 2
    assert f"started with the rejects file {os.path.realpath(rejects)}" in capsys.readouterr().err


def test_fail_mode_leaves_no_rejects_file_and_restart_keeps_other_files(model, tmp_path):
    from reranker.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", NESTED[:2])
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.notes").write_text("mine")
    assert main(score_args(model, inp, out)) == 0
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()
    assert main(score_args(model, inp, out, "--restart")) == 0
    assert (tmp_path / "out.jsonl.notes").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.checkpoint.json",
                                                          "out.jsonl.notes", "out.jsonl.summary.json"]


def test_parquet_parts_folder_with_a_foreign_file_is_refused(tmp_path):
    parts = tmp_path / "o.parquet.parts"
    parts.mkdir()
    (parts / "notes.txt").write_text("mine")
    with pytest.raises(RerankerError, match="notes.txt, which this job did not write"):
        writers.open_writer(tmp_path / "o.parquet").resume({})
    assert (parts / "notes.txt").read_text() == "mine"


def test_finished_job_whose_output_was_deleted_is_redone(model, tmp_path, caplog):
    from reranker.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", NESTED[:3])
    out = tmp_path / "out.trec"
    assert main(score_args(model, inp, out)) == 0
    done = out.read_bytes()
    out.unlink()
    with caplog.at_level("WARNING"):
        assert main(score_args(model, inp, out)) == 0
    assert "missing although its checkpoint says the job finished; scoring it again" in caplog.text
    assert out.read_bytes() == done


# --- silently wrong results -------------------------------------------------------------------


def test_input_fingerprint_sees_a_change_in_the_middle_of_a_large_file(tmp_path):
    big = tmp_path / "big.jsonl"
    data = bytearray(b" " * (3 << 20))
    big.write_bytes(data)
    before = input_fingerprint([big])
    data[len(data) // 2] = ord("\t")
    big.write_bytes(data)
    assert input_fingerprint([big]) != before and input_fingerprint([big])[0]["size"] == 3 << 20


@pytest.mark.slow
def test_resume_refuses_an_input_changed_in_the_middle(model, tmp_path, capsys):
    # > 2 MiB: records at both ends and in the middle, blank lines between (not records, so it scores fast)
    inp, out = tmp_path / "big.jsonl", tmp_path / "out.jsonl"
    pad = b"\n" * (1 << 20) + b" \n" * (1 << 19)
    lines = [json.dumps(r).encode() + b"\n" for r in NESTED[:3]]
    inp.write_bytes(lines[0] + pad + lines[1] + pad + lines[2])
    assert inp.stat().st_size > 2 << 20
    res = here(capsys, score_args(model, inp, out))
    assert res.returncode == 0, res.stderr
    changed = inp.read_bytes().replace(b"doc 1 a", b"doc 1 Z")
    assert len(changed) == inp.stat().st_size
    inp.write_bytes(changed)
    one_line_error(here(capsys, score_args(model, inp, out)), "different input", "--restart")


FLAT = [  # (query_id, query, doc_id); line 4 is malformed
    ("q1", "one", "d1"), ("q1", "one", "d2"), ("q2", "two", "d1"), None,
    ("q1", "one", "d3"),   # 5: q1 again after q2: not contiguous
    ("q2", "two", "d1"),   # 6: a repeated pair (the rejected line 5 does not end q2's run)
    ("q2", "two", "d2"),   # 7: fine
    ("q3", "three", "d1"), ("q3", "THREE", "d2"),  # 9: another text for q3
]


def write_flat(path):
    with open(path, "w") as f:
        for row in FLAT:
            f.write("{broken\n" if row is None else json.dumps(dict(zip(("query_id", "query", "doc_id"), row), document=f"text of {row[2]}")) + "\n")
    return path


def test_query_id_rule_on_flat_pairs_and_nested_records(tmp_path):
    flat = write_flat(tmp_path / "pairs.jsonl")
    items = list(one_run_per_query(read_input(flat)))
    assert len(items) == len(FLAT)  # one item out per item in: resume counts stay aligned
    units = [x for x in items if isinstance(x, Unit)]
    assert [(u.index, u.query_id, u.docs[0][0]) for u in units] == [(0, "q1", "d1"), (1, "q1", "d2"), (2, "q2", "d1"),
                                                                     (3, "q2", "d2"), (4, "q3", "d1")]
    reasons = {r.source: r.reason for r in items if isinstance(r, Reject)}
    assert reasons[f"{flat}:5"].startswith(f'query id not contiguous: query "q1" had its pairs from {flat}:1 on')
    assert reasons[f"{flat}:6"] == f'duplicate pair: query "q2" with doc "d1" is already at {flat}:3'
    assert reasons[f"{flat}:9"].startswith(f"different query text: query \"q3\" is 'three' at {flat}:8, here 'THREE'")
    raw = [r.raw for r in items if isinstance(r, Reject) and r.source == f"{flat}:5"][0]
    assert json.loads(raw) == {"query_id": "q1", "query": "one", "doc_id": "d3", "document": "text of d3"}

    nested = write_jsonl(tmp_path / "nested.jsonl", [NESTED[0], NESTED[1], {**NESTED[0], "documents": ["other"]}])
    items = list(one_run_per_query(read_input(nested)))
    assert [type(x).__name__ for x in items] == ["Unit", "Unit", "Reject"]
    assert items[2].reason.startswith(f'duplicate query id: "q0" is already the query of {nested}:1')


def trec_lines(path):
    return [line.split() for line in path.read_text().splitlines()]


def test_query_id_rule_in_jobs_is_exact_across_resume(model, tmp_path, capsys):
    from reranker.cli import main

    inp = write_flat(tmp_path / "pairs.jsonl")
    clean, out = tmp_path / "clean.trec", tmp_path / "out.trec"
    skip = ["--on-error", "skip", "--window", "1"]
    assert main(score_args(model, inp, clean, *skip)) == 0
    lines = trec_lines(clean)
    assert sorted(x[0] for x in lines if x[3] == "1") == ["q1", "q2", "q3"]  # one rank 1 per query
    assert len({(x[0], x[2]) for x in lines}) == len(lines) == 5  # every (query, doc) once
    assert [x[0] for x in lines] == ["q1", "q1", "q2", "q2", "q3"]  # one run per query
    rejects = [json.loads(x) for x in (tmp_path / "clean.trec.rejects.jsonl").read_text().splitlines()]
    assert [r["source"].rsplit(":", 1)[1] for r in rejects] == ["4", "5", "6", "9"]

    # fail mode stops at the malformed line 4, after 3 records were written and checkpointed ...
    capsys.readouterr()
    assert main(score_args(model, inp, out, "--window", "1")) == 2
    assert f"{inp}:4: malformed JSON" in capsys.readouterr().err
    assert json.loads((tmp_path / "out.trec.checkpoint.json").read_text())["consumed"] == 3
    # ... and the resumed run still knows q1's run ended before line 5: it decides as the clean run did
    assert main(score_args(model, inp, out, *skip)) == 0
    assert out.read_bytes() == clean.read_bytes()
    assert (tmp_path / "out.trec.rejects.jsonl").read_bytes() == (tmp_path / "clean.trec.rejects.jsonl").read_bytes()

    capsys.readouterr()
    dup = write_jsonl(tmp_path / "dup.jsonl", [NESTED[0], NESTED[1], NESTED[0]])
    assert main(score_args(model, dup, tmp_path / "dup.trec")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f'{dup}:3: duplicate query id: "q0" is already the query of {dup}:1' in err


# --- one-line errors, never a traceback -------------------------------------------------------


@contextlib.contextmanager
def unwritable(folder):
    """`folder` made read-only (chmod 555); the job runs with `modes_hold`, so the mode binds root too."""
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(0o755)


def test_unwritable_output_folder_is_one_line(model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", NESTED)
    folder = tmp_path / "ro"
    folder.mkdir()
    with unwritable(folder):
        res = run(score_args(model, inp, folder / "out.jsonl"), preexec_fn=helpers.modes_hold)
        one_line_error(res, folder / "out.jsonl", "cannot write", "Permission denied", "the folder must be writable")
    assert list(folder.iterdir()) == []


CASES = {
    "no input": lambda t: ["-o", t / "o.jsonl"],
    "symlink loop as -i": lambda t: ["-i", t / "loop.jsonl", "-o", t / "o.jsonl"],
    "symlink loop as -o": lambda t: ["-i", t / "in.jsonl", "-o", t / "loop.jsonl"],
    "text in a .parquet": lambda t: ["-i", t / "fake.parquet", "-o", t / "o.jsonl"],
    "--window 0": lambda t: ["-i", t / "in.jsonl", "-o", t / "o.jsonl", "--window", "0"],
    "--window -1": lambda t: ["-i", t / "in.jsonl", "-o", t / "o.jsonl", "--window=-1"],
    "--depth 0": lambda t: ["-i", t / "in.jsonl", "-o", t / "o.jsonl", "--depth", "0"],
    "-i /dev/stdin (a pipe)": lambda t: ["-i", "/dev/stdin", "-o", t / "o.jsonl"],
    "-i -": lambda t: ["-i", "-", "-o", t / "o.jsonl"],
    "-i a fifo": lambda t: ["-i", t / "fifo.jsonl", "-o", t / "o.jsonl"],
    "-i a folder as jsonl": lambda t: ["-i", t, "--input-format", "jsonl", "-o", t / "o.jsonl"],
    "output in a file": lambda t: ["-i", t / "in.jsonl", "-o", t / "in.jsonl" / "o.jsonl"],
}
NEEDLES = {"no input": "give -i INPUT", "symlink loop as -i": "symbolic link loop", "symlink loop as -o": "symbolic link",
           "text in a .parquet": "not a readable Parquet file", "--window 0": "--window 0", "--window -1": "--window -1",
           "--depth 0": "--depth 0", "-i /dev/stdin (a pipe)": "write it to a file first", "-i -": "write it to a file first",
           "-i a fifo": "write it to a file first", "-i a folder as jsonl": "is a folder",
           "output in a file": "Not a directory"}


STDIN_CASES = {"-i /dev/stdin (a pipe)": {"stdin": subprocess.PIPE, "input": None}, "-i -": {}}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line(model, tmp_path, case, cli_here):
    write_jsonl(tmp_path / "in.jsonl", NESTED)
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    (tmp_path / "fake.parquet").write_text("this is not parquet\n" * 10)
    os.mkfifo(tmp_path / "fifo.jsonl")
    cli = ["score", "-m", model, "--quiet", *CASES[case](tmp_path)]
    if case in STDIN_CASES:  # standard input is the test process's own here: these get a process with their own
        one_line_error(run(cli, **STDIN_CASES[case]), NEEDLES[case])
    else:
        one_line_error(cli_here(*cli), NEEDLES[case])


def test_count_records_never_raises(tmp_path):
    from reranker.jobs.progress import count_records

    (tmp_path / "fake.parquet").write_text("this is not parquet\n" * 10)
    assert count_records(tmp_path / "fake.parquet", "parquet") is None


def enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("name", ["o.jsonl", "o.trec", "o.parquet"])
def test_full_disk_in_a_writer_is_an_error_naming_the_file(tmp_path, monkeypatch, name):
    unit = Unit(0, "q", "query", [("d", "text")], "in:1")
    w = writers.open_writer(tmp_path / name)
    w.resume({})
    w.write(unit, [0.5], 3)
    monkeypatch.setattr(writers.os, "fsync", enospc)
    part = "o.parquet.parts/part-000000.parquet" if name.endswith("parquet") else name + ".partial"
    if name.endswith("parquet"):
        monkeypatch.setattr(w.pq, "write_table", enospc)
    with pytest.raises(RerankerError, match=f"cannot write .*{part}: No space left on device; free some space, then rerun"):
        w.commit()
    w.close(final=False)  # closing after the failure does not raise again

    rejects = writers.RejectsWriter(tmp_path / "r.jsonl")
    monkeypatch.setattr(writers._LineFile, "_truncate", enospc)
    with pytest.raises(RerankerError, match=f"{tmp_path / 'r.jsonl'}: No space left on device"):
        rejects.resume({})


def test_full_disk_during_a_job_is_one_line_simulated(model, tmp_path, capsys, monkeypatch):
    """ENOSPC from the first write after a committed window, on any file system (the real one: below)."""
    from reranker.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", NESTED)
    out = tmp_path / "out.jsonl"
    real_write = writers._LineFile.write

    class Full:  # a file on a full disk: every write fails
        def __init__(self, f):
            self.f = f

        def write(self, data):
            enospc()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def write(self, data):  # the disk fills up once the first window is committed
        if self.path.name.endswith(".partial") and self.path.stat().st_size > 0 and not isinstance(self._f, Full):
            self._f = Full(self._f)
        real_write(self, data)

    monkeypatch.setattr(writers._LineFile, "write", write)
    capsys.readouterr()
    assert main(score_args(model, inp, out, "--window", "3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {out}.partial: No space left on device" in err and "rerun" in err
    monkeypatch.undo()
    assert main(score_args(model, inp, out, "--window", "3")) == 0  # space freed: the rerun resumes and finishes
    clean = tmp_path / "clean.jsonl"
    assert main(score_args(model, inp, clean, "--window", "3")) == 0
    assert out.read_bytes() == clean.read_bytes()


@contextlib.contextmanager
def small_file_system(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder`: a real disk that fills up (mounting needs root, as CI runs)."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk is a small tmpfs, and mounting one needs root (CI runs as root; "
                    "test_full_disk_during_a_job_is_one_line_simulated covers the same path without one)")
    folder.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"root could not mount a tmpfs on {folder}: {res.stderr.strip()}"
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.slow  # three jobs; the simulated test above covers the same path in the fast tier
def test_full_disk_for_real_is_one_line_and_the_rerun_resumes(model, tmp_path, capsys):
    """A job writing to a tmpfs that fills up mid-way: one line naming the file and the fix, then, space
    freed, the same command resumes from the checkpoint to the bytes of a clean run."""
    from reranker.cli import main

    inp = tmp_path / "in.jsonl"
    helpers.write_nested(inp, n_queries=40)
    clean = tmp_path / "clean.jsonl"
    assert main(score_args(model, inp, clean)) == 0
    assert clean.stat().st_size > 40_000  # several times the room left below
    with small_file_system(tmp_path / "disk", "1m") as disk:
        out, filler = disk / "out.jsonl", disk / "filler"
        st = os.statvfs(disk)
        room = 6 * st.f_frsize  # the lock, the checkpoint (twice, while it is replaced) and a few windows
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - room))
        capsys.readouterr()
        assert main(score_args(model, inp, out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("reranker score: error: cannot write ") and str(disk) in err, err
        assert "No space left on device; free some space, then rerun the same command to resume" in err, err
        assert 0 < helpers.consumed(out) < 40 and not out.exists()
        filler.unlink()
        assert main(score_args(model, inp, out)) == 0
        assert out.read_bytes() == clean.read_bytes()


@pytest.mark.parametrize("output", [".", "/"])
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_output_naming_a_folder_is_one_line(model, tmp_path, output, engine, cli_here):
    """`-o .` / `-o /` names no file to extend with `.partial`: a one-line error and exit 2, before any work."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"query": "q", "documents": ["a"]}])
    extra = ["--engine", "ray"] if engine == "ray" else ["--output-format", "jsonl"]  # ray writes a folder of parts
    res = cli_here(*score_args(model, inp, output, *extra), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"-o/--output {output} names a folder" in res.stderr
