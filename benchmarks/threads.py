"""The CPU thread default (`reranker.engine.cpu.default_threads`) against the best fixed thread count, same run.

Two situations a default must handle (issue 21, item 14):
- idle after other work: a job has just ended (the 1-minute load average still counts it), nothing runs now;
  the old load-average rule chose one thread fewer here and lost ~40%;
- a core kept busy by another process: llama.cpp's spinning threads stall behind it, so one thread fewer wins.
In each, the script asks the default what it chooses, then scores the same pairs with every thread count
(1..cores, fresh model each, rounds interleaved) and prints tokens/s and default / best.

    python benchmarks/threads.py                 # the `small` synthetic F16 model, built once
    python benchmarks/threads.py --pairs 64 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from compute_score import small_model, synthetic_pairs  # noqa: E402


def tokens_per_s(gguf: Path, pairs, threads: int) -> float:
    from reranker import Reranker

    with Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=4096, n_threads=threads, bf16=False) as rr:
        rr.compute_score(pairs[:4])  # warm-up
        t = time.perf_counter()
        rr.compute_score(pairs)
        return rr.last_usage.tokens / (time.perf_counter() - t)


def situation(name: str, gguf: Path, pairs, rounds: int, cores: int, before) -> None:
    from reranker.engine.cpu import default_threads

    best: dict[int, float] = {}
    chosen = []
    for _ in range(rounds):
        for n in range(1, cores + 1):
            before()
            chosen.append(default_threads())  # what a load right now would choose
            best[n] = max(best.get(n, 0.0), tokens_per_s(gguf, pairs, n))
    default = max(set(chosen), key=chosen.count)
    top = max(best.values())
    load = os.getloadavg()[0]
    print(f"{name}: the default chose {default} thread(s) (choices {sorted(set(chosen))}, 1-min load {load:.2f})")
    for n, v in sorted(best.items()):
        print(f"  {n} thread(s): {v:8.0f} tokens/s{'   <- default' if n == default else ''}")
    print(f"  default / best: {best[default] / top:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an F16 GGUF with mlp_weights.npz beside it (default: synthetic small)")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    args = ap.parse_args()

    from reranker.engine.cpu import _physical_cores

    gguf = args.model or small_model(args.cache)
    pairs = synthetic_pairs(args.pairs)
    cores = min(len(os.sched_getaffinity(0)), _physical_cores() or os.cpu_count() or 1)

    def other_work() -> None:  # a job that has just ended: both cores busy for 10 s, then nothing
        end = time.time() + 10
        procs = [subprocess.Popen([sys.executable, "-c", f"import time\nwhile time.time() < {end}: pass"]) for _ in range(cores)]
        for p in procs:
            p.wait()

    situation("idle after other work", gguf, pairs, args.rounds, cores, other_work)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        situation("one core kept busy by another process", gguf, pairs, args.rounds, cores, lambda: None)
    finally:
        spinner.kill()


if __name__ == "__main__":
    main()
