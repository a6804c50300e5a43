"""Tokens per decode call (`n_batch`) on the CPU: the masked attention of packed prompts against call overhead.

Packed prompts share one KV cache per decode call, so each physical batch (`n_ubatch`, 512 on the CPU)
attends over every cell already filled in the call, masked, not only over its own prompt: work that
grows with the call's length squared. A call of `n_ubatch` tokens has none of that waste but more calls
(and fuller packing matters more). This scores the same pairs with each `n_batch` in a fresh model,
rounds interleaved, best kept, and prints tokens/s and the ratio to the first value given (the baseline).

    python benchmarks/n_batch.py                                  # `small` shape, F16
    python benchmarks/n_batch.py --preset m0 --pairs 16 --rounds 3
    python benchmarks/n_batch.py --doc-words 200 400              # longer documents
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from job import load_average, synthetic_pairs  # noqa: E402
from peer import build  # noqa: E402


def run(gguf: Path, pairs, n_batch: int, threads: int, bf16: bool) -> tuple[float, list[float]]:
    """(tokens/s, scores) of one window of `pairs` in a fresh model."""
    from reranker import Reranker

    with Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=4096, n_threads=threads, n_batch=n_batch, bf16=bf16) as rr:
        rr.compute_score(pairs[:2])  # warm-up
        t = time.perf_counter()
        scores = rr.compute_score(pairs, batch_size=len(pairs))
        return rr.last_usage.tokens / (time.perf_counter() - t), scores


def main() -> None:
    from reranker.engine.cpu import default_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "m0"])
    ap.add_argument("--n-batch", default="2048,1024,512", help="values to compare; the first is the baseline")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 120), metavar=("MIN", "MAX"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="the BF16 re-encode (the default on a bf16 CPU)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    args = ap.parse_args()

    gguf, _ = build(args.cache, args.preset)
    pairs = [list(p) for p in synthetic_pairs(args.pairs, tuple(args.doc_words))]
    threads = args.threads or default_threads()
    values = [int(v) for v in args.n_batch.split(",")]
    print(f"preset {args.preset}, {'BF16' if args.bf16 else 'F16'}, {len(pairs)} pairs of {args.doc_words[0]}-"
          f"{args.doc_words[1]} words, {threads} threads, load average {load_average()}", flush=True)
    best: dict[int, float] = {}
    scores: dict[int, list[float]] = {}
    for r in range(args.rounds):
        for v in values:
            rate, scores[v] = run(gguf, pairs, v, threads, args.bf16)
            best[v] = max(best.get(v, 0.0), rate)
            print(f"  round {r + 1}: n_batch {v:>5}: {rate:9.1f} tokens/s   load {load_average()}", flush=True)
    base = values[0]
    for v in values:
        drift = max(abs(a - b) for a, b in zip(scores[v], scores[base]))
        print(f"n_batch {v:>5}: {best[v]:9.1f} tokens/s  {best[v] / best[base]:.3f}x n_batch {base}   "
              f"max |score diff| vs it {drift:.1e}")


if __name__ == "__main__":
    main()
