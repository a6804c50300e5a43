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
import os
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_compute_score", HERE / "compute_score.py")
compute_score = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compute_score)


def measure(gguf: Path, pairs: list[list[str]], threads: int | None, rounds: int) -> dict[bool, tuple[float, int, float]]:
    """Per mode (deterministic or not): best seconds for all pairs in one call, prompt tokens, and
    max |scores - scores of the reversed batch|. Rounds alternate between the modes, so a shared
    machine's load falls on both alike."""
    from reranker import Reranker

    rrs = {d: Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=4096, n_threads=threads, deterministic=d)
           for d in (False, True)}
    try:
        best = {d: float("inf") for d in rrs}
        scores = {}
        for rr in rrs.values():
            rr.compute_score(pairs[:4])  # warm-up
        for _ in range(rounds):
            for d, rr in rrs.items():
                t = time.perf_counter()
                scores[d] = np.array(rr.compute_score(pairs, batch_size=len(pairs)))
                best[d] = min(best[d], time.perf_counter() - t)
        out = {}
        for d, rr in rrs.items():
            tokens = rr.last_usage.tokens
            reversed_ = np.array(rr.compute_score(pairs[::-1], batch_size=len(pairs))[::-1])
            out[d] = (best[d], tokens, float(np.abs(scores[d] - reversed_).max()))
    finally:
        for rr in rrs.values():
            rr.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", help="a GGUF with mlp_weights.npz beside it (repeatable; "
                    "default: the synthetic `small` model at F16 and Q8_0)")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    args = ap.parse_args()

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
        runs = measure(gguf, pairs, args.threads, args.rounds)
        for deterministic, (seconds, tokens, moved) in runs.items():
            mode = "deterministic" if deterministic else "default"
            print(f"{gguf.name:<36}{mode:<15}{len(pairs) / seconds:>9.1f}{tokens / seconds:>10.0f}{moved:>24.3g}")
        if runs[True][2] != 0.0:
            print("  !! deterministic scores moved with the batch order")
        print(f"{gguf.name:<36}deterministic / default time: {runs[True][0] / runs[False][0]:.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
