"""The cost of `deterministic=True` against default packing: same pairs, same process, ratio printed.

Deterministic mode decodes every prompt alone from an empty KV cache (and runs the head one row
at a time), so a pair's score is bit-identical alone or in any batch; default packing shares
decode calls among prompts. Also checks, on the same pairs, that deterministic scores in one
batch equal those of the reversed batch, and reports how far default scores move between the two.

    python benchmarks/deterministic.py                      # the `small` synthetic model, F16 and Q8_0
    python benchmarks/deterministic.py --model path/to/model.gguf --pairs 64
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# benchmarks/head.py would shadow the `head` package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("bench_compute_score", HERE / "compute_score.py")
compute_score = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compute_score)


def measure(gguf: Path, pairs: list[list[str]], deterministic: bool, threads: int | None, rounds: int) -> tuple[float, int, np.ndarray, np.ndarray]:
    """(best seconds for all pairs in one call, prompt tokens, scores, scores of the reversed batch)."""
    from reranker import Reranker

    rr = Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=4096, n_threads=threads, deterministic=deterministic)
    try:
        rr.compute_score(pairs[:4])  # warm-up
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            scores = np.array(rr.compute_score(pairs, batch_size=len(pairs)))
            best = min(best, time.perf_counter() - t)
        tokens = rr.last_usage.tokens
        reversed_ = np.array(rr.compute_score(pairs[::-1], batch_size=len(pairs))[::-1])
    finally:
        rr.close()
    return best, tokens, scores, reversed_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", help="a GGUF with mlp_weights.npz beside it (repeatable; "
                    "default: the synthetic `small` model at F16 and Q8_0)")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    args = ap.parse_args()

    import os

    from reranker.gguf.quantize import quantize

    models = args.model
    if not models:
        f16 = compute_score.small_model(args.cache)
        q8 = f16.with_name(f16.name.replace("F16", "Q8_0"))
        if not q8.is_file():
            quantize(f16, q8, "Q8_0")
        models = [f16, q8]
    pairs = compute_score.synthetic_pairs(args.pairs)
    print(f"{args.pairs} pairs, {args.rounds} rounds (best kept), load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':<36}{'mode':<15}{'pairs/s':>9}{'tokens/s':>10}{'max |batch - reversed|':>24}")
    for gguf in models:
        runs = {}
        for deterministic in (False, True):
            seconds, tokens, scores, reversed_ = measure(gguf, pairs, deterministic, args.threads, args.rounds)
            runs[deterministic] = seconds
            mode = "deterministic" if deterministic else "default"
            moved = float(np.abs(scores - reversed_).max())
            print(f"{gguf.name:<36}{mode:<15}{len(pairs) / seconds:>9.1f}{tokens / seconds:>10.0f}{moved:>24.3g}")
            if deterministic and moved != 0.0:
                print("  !! deterministic scores moved with the batch order")
        print(f"{gguf.name:<36}deterministic / default time: {runs[True] / runs[False]:.2f}x")


if __name__ == "__main__":
    main()
