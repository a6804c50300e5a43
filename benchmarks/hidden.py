"""What `reranker score --save-hidden` costs: the same job without it, with float32 and with float16 states.

Each variant runs `--rounds` times, alternating, in subprocesses (`--restart` each time); the best
pairs/s of each (from OUTPUT.summary.json: the streaming loop, model load excluded) is compared with the
plain job's in the same run, and the hidden-state file sizes are printed.

    python benchmarks/hidden.py                      # the tiny synthetic model, 2048 pairs
    python benchmarks/hidden.py --model m.gguf --pairs 4096 --threads 2
    python benchmarks/hidden.py --writer-only 1536     # the writer alone, at m0's width
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

WORDS = "alpha beta gamma delta epsilon code data model query document ranking search index token".split()


def write_input(path: Path, pairs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for q in range(0, pairs, 16):
            docs = [" ".join(rng.choices(WORDS, k=rng.randint(20, 120))) for _ in range(min(16, pairs - q))]
            f.write(json.dumps({"query_id": f"q{q}", "query": " ".join(rng.choices(WORDS, k=5)), "documents": docs}) + "\n")


def writer_cost(work: Path, width: int, windows: int, window: int = 2048) -> None:
    """Seconds per window that `--save-hidden` adds on the writer thread: rows + index written and fsynced."""
    import time

    import numpy as np

    from reranker.jobs.hidden import HiddenWriter
    from reranker.jobs.records import Unit

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((window, width)).astype(np.float32)
    units = [Unit(i, f"q{i}", "query", [(f"d{j}", "") for j in range(16)], f"in:{i}") for i in range(window // 16)]
    scores = rng.random(16).tolist()
    for dtype in ("float32", "float16"):
        w = HiddenWriter(work / f"writer-{dtype}.npy", width, dtype)
        w.resume({})
        t = time.perf_counter()
        for _ in range(windows):
            for k, u in enumerate(units):
                w.write(u, scores, rows[16 * k : 16 * (k + 1)])
            w.commit()
        per = (time.perf_counter() - t) / windows
        w.close(final=True)
        mb = (work / f"writer-{dtype}.npy").stat().st_size / 2**20
        print(f"writer {dtype}, width {width}: {per * 1e3:.1f} ms per {window}-pair window "
              f"({per / window * 1e6:.1f} us/pair), {mb:.0f} MiB written")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a GGUF with mlp_weights.npz beside it (default: tiny synthetic, made here)")
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("bench-hidden"))
    p.add_argument("--writer-only", type=int, metavar="WIDTH", default=None,
                   help="only time the hidden-state writer alone at this width (1536: m0), 10 windows of 2048 pairs")
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.writer_only:
        writer_cost(work, args.writer_only, 10)
        return
    model = args.model
    if model is None:
        from reranker.gguf.convert import convert
        from reranker.synth.random_checkpoint import synth_checkpoint

        model = next(iter(sorted((work / "gguf").glob("*.gguf"))), None)
        if model is None:
            model, _ = convert(synth_checkpoint(work / "tiny", preset="tiny", seed=0), work / "gguf", outtype="f16")
    inp = work / "in.jsonl"
    write_input(inp, args.pairs)
    variants = {"plain": [], "float32": ["--save-hidden", str(work / "h32.npy")],
                "float16": ["--save-hidden", str(work / "h16.npy"), "--hidden-dtype", "float16"]}
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, extra in variants.items():
            out = work / f"{name}.jsonl"
            cmd = [sys.executable, "-m", "reranker", "score", "-m", str(model), "-i", str(inp), "-o", str(out),
                   "--restart", "--quiet", *extra] + (["--threads", str(args.threads)] if args.threads else [])
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": _ROOT})
            pps = json.loads(out.with_name(out.name + ".summary.json").read_text())["pairs_per_second"]
            best[name] = max(best.get(name, 0.0), pps)
    print(f"{args.pairs} pairs, model {model.name}, best of {args.rounds}, load average {os.getloadavg()}")
    for name in variants:
        size = ""
        if name != "plain":
            f = work / ("h32.npy" if name == "float32" else "h16.npy")
            size = f", {f.stat().st_size / 2**20:.1f} MiB"
        print(f"{name:>8}: {best[name]:8.1f} pairs/s  ({best[name] / best['plain']:.3f}x plain{size})")


if __name__ == "__main__":
    main()
