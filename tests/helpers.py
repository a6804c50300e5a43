"""Plain helpers the test modules share (fixtures are in conftest.py): input files, `reranker score` command lines, GGUFs."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np

WORDS = "alpha beta gamma delta 机器 学习 🎉 code() x=1 résumé".split()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def write_nested(path: Path, n_queries=40, seed=0, words=WORDS, max_words=40, max_docs=8) -> None:
    """`n_queries` nested records of random words: 1 to `max_docs` documents of 1 to `max_words` words each."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for q in range(n_queries):
            docs = [" ".join(rng.choices(words, k=rng.randint(1, max_words))) for _ in range(rng.randint(1, max_docs))]
            f.write(json.dumps({"query_id": f"q{q}", "query": " ".join(rng.choices(words, k=3)), "documents": docs},
                               ensure_ascii=False) + "\n")


def score_args(model, inp, out, *extra, n_ctx=1024, window=4) -> list[str]:
    """`reranker score` arguments for a small quiet job; `extra` come last, so they override."""
    return ["score", "-m", str(model), "-i", str(inp), "-o", str(out), "--n-ctx", str(n_ctx), "--window", str(window),
            "--quiet", *map(str, extra)]


def score_cmd(model, inp, out, *extra) -> list[str]:
    """`score_args` (16 records a window) as a `python -m reranker` command line."""
    return [sys.executable, "-m", "reranker", *score_args(model, inp, out, *extra, window=16)]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def consumed(out: Path) -> int:
    """How many input records the job writing `out` has checkpointed (-1: no checkpoint yet)."""
    try:
        return json.loads(out.with_name(out.name + ".checkpoint.json").read_text())["consumed"]
    except (OSError, ValueError, KeyError):
        return -1


def kill_when(cmd, out: Path, after_consumed: int, delay: float) -> int:
    """Start the job, wait until its checkpoint passes `after_consumed`, wait `delay`, SIGKILL it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while consumed(out) <= after_consumed and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def write_gguf(path: Path, kv: dict, tensors: dict[str, np.ndarray], arch: str = "qwen2vl") -> Path:
    """A GGUF written by gguf-py (the reference writer), its entries in `kv`'s order.

    A value's GGUF type follows its Python type (an int is UINT32, as GGUF's counts and ids are);
    `(value, gguf.GGUFValueType.X)` gives another.
    """
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, tuple):
            value, vtype = value
        else:
            vtype = gguf.GGUFValueType.UINT32 if type(value) is int else gguf.GGUFValueType.get_type(value)
        w.add_key_value(key, value, vtype)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Linux's prctl(PR_CAPBSET_DROP) and the two capabilities that let root ignore file modes.
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def modes_hold() -> None:
    """A `preexec_fn`: the program it runs obeys file modes even as root.

    Root reads a chmod 000 file and writes into a chmod 555 folder through CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH; dropped from the bounding set before exec, the program is root without them
    (CI runs as root, so a permission test must not depend on the user). A user process keeps its
    modes anyway, so nothing is dropped there.
    """
    if os.geteuid() != 0:
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed: root without CAP_SETPCAP "
                                              "cannot drop the capabilities that ignore file modes")


@contextlib.contextmanager
def running_server(reranker, settings=None, **config):
    """(base URL, app) of a uvicorn server on an ephemeral loopback port, in a thread; stopped on exit.

    `config`: more `uvicorn.Config` settings; the `uvicorn.Server` is `app.state.uvicorn`."""
    import uvicorn

    from reranker.serve.app import create_app
    from reranker.serve.settings import ServeSettings

    app = create_app(reranker, settings or ServeSettings())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    app.state.uvicorn = server
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
