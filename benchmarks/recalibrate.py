"""Does recalibrating the head on a quantized level's hidden states make its scores track F16's?

For each level (made from the `small` synthetic F16 model with llama.cpp's quantizer), the same
synthetic pairs are embedded with the level and with F16 (the fast path, as the job runs it);
`reranker.bench.recalibrate.recalibrate` fits an affine logit correction and a ridge refit of the
head's last layer on half of the queries and reports fidelity to F16 on the other half, before
and after, with bench-quant's measures. Several seeds of the split are averaged.

Random weights: the synthetic model's logits are not trained to separate anything, so its score
spread is small and quantization noise is large relative to it (a trained model's ranking is more
robust); the numbers say whether a correction helps, not how good a level is.

    python benchmarks/recalibrate.py                                # small model, Q8_0,Q4_K_M,Q3_K_M
    python benchmarks/recalibrate.py --pairs 2048 --levels Q4_K_M --model F16.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# The repo root first, so this checkout's packages are imported (installed or not); this folder last, for sibling scripts.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

KEYS = ("spearman", "kendall", "top10_overlap", "order_flips", "mean_abs_diff", "max_abs_diff")


def small_model(work: Path) -> Path:
    from reranker.gguf.convert import convert
    from reranker.synth.random_checkpoint import synth_checkpoint

    out = work / "small-gguf"
    existing = sorted(out.glob("*-F16.gguf"))
    if existing:
        return existing[0]
    ckpt = synth_checkpoint(work / "jina-reranker-m0-small", preset="small", seed=1)
    gguf, _ = convert(ckpt, out, outtype="f16")
    return gguf


def embed(gguf: Path, head: Path, pairs: list, threads: int | None) -> np.ndarray:
    from reranker import Reranker

    rr = Reranker.from_pretrained(str(gguf), head=str(head), device="cpu", n_threads=threads, bf16=False)
    try:
        return rr.embed(pairs, batch_size=256)
    finally:
        rr.close()


def main() -> None:
    from head import ScoringHead
    from reranker.bench.recalibrate import recalibrate
    from reranker.bench.sets import synthetic_set
    from reranker.gguf.quantize import quantize

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an F16 GGUF with mlp_weights.npz beside it (default: the small synthetic one)")
    p.add_argument("--levels", default="Q8_0,Q4_K_M,Q3_K_M")
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--seeds", type=int, default=5, help="calibration/held-out splits averaged")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("bench-recalibrate"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ref = args.model or small_model(args.work)
    head_path = ref.parent / "mlp_weights.npz"
    head = ScoringHead.from_npz(head_path)
    eval_set = synthetic_set(args.pairs, seed=0)
    pairs, groups = eval_set.pairs(), eval_set.groups()
    t = time.perf_counter()
    ref_h = embed(ref, head_path, pairs, args.threads)
    print(f"F16: {len(pairs)} pairs embedded in {time.perf_counter() - t:.1f} s")
    results = {}
    for level in [x.strip() for x in args.levels.split(",") if x.strip()]:
        path = args.work / f"{ref.stem.rsplit('-', 1)[0]}-{level}.gguf"
        if not path.is_file():
            quantize(ref, path, level, n_threads=args.threads)
        t = time.perf_counter()
        lvl_h = embed(path, head_path, pairs, args.threads)
        print(f"{level}: embedded in {time.perf_counter() - t:.1f} s")
        runs = [recalibrate(head, ref_h, lvl_h, groups, seed=s) for s in range(args.seeds)]
        mean = {kind: {k: float(np.mean([r[kind][k] for r in runs])) for k in KEYS} for kind in ("before", "affine", "fc2")}
        mean["fc2"]["lambda"] = [r["fc2"]["lambda"] for r in runs]
        results[level] = {"runs": runs, "mean": mean}
        print(f"\n{level} (held-out, mean of {args.seeds} splits of {runs[0]['calibration_queries']}+"
              f"{runs[0]['held_out_queries']} queries)")
        print("| correction | " + " | ".join(KEYS) + " |")
        print("|---" * (len(KEYS) + 1) + "|")
        for kind in ("before", "affine", "fc2"):
            print(f"| {kind} | " + " | ".join(f"{mean[kind][k]:.4g}" for k in KEYS) + " |")
        print(f"fc2 lambdas chosen: {mean['fc2']['lambda']}")
    info = {"pairs": len(pairs), "queries": len(groups), "model": str(ref), "threads": args.threads,
            "load": os.getloadavg(), "results": results}
    (args.work / "recalibrate.json").write_text(json.dumps(info, indent=1))
    print(f"\nload average {os.getloadavg()}; wrote {args.work / 'recalibrate.json'}")


if __name__ == "__main__":
    main()
