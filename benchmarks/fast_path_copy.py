"""The fast path's one-time copy of a GGUF (identity output projection, BF16 re-encode) against gguf-py's way.

Ours (`reranker.engine.identity.with_identity_output`) reads the file's layout and moves entries and
tensors as bytes; the baseline decodes every entry with gguf-py's `GGUFReader` (the 150k-token
vocabulary and merges included) and writes them back with `GGUFWriter`, as the fast path did before.
Both make the same bytes (checked here, and in tests/gguf/test_layout.py).

    python benchmarks/fast_path_copy.py                 # the synthetic `tiny` model (the real vocabulary)
    python benchmarks/fast_path_copy.py --model path/to/model-F16.gguf --rounds 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an F16 GGUF (default: the synthetic tiny model, built here)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each side is reported")
    args = ap.parse_args()

    from helpers import gguf_py_identity_copy

    from reranker.engine.identity import with_identity_output

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = args.model
        if src is None:
            from reranker.gguf.convert import convert
            from reranker.synth.random_checkpoint import synth_checkpoint

            src, _ = convert(synth_checkpoint(tmp / "jina-reranker-m0-tiny", preset="tiny", seed=0), tmp / "gguf", outtype="f16")
        best = {"ours": float("inf"), "gguf-py": float("inf")}
        for r in range(args.rounds):
            t = time.perf_counter()
            ours = with_identity_output(src, "f32", tmp / f"cache{r}", bf16=True)
            best["ours"] = min(best["ours"], time.perf_counter() - t)
            t = time.perf_counter()
            theirs = tmp / f"gguf-py{r}.gguf"
            gguf_py_identity_copy(src, theirs, "f32", reencode=True)
            best["gguf-py"] = min(best["gguf-py"], time.perf_counter() - t)
            assert ours.read_bytes() == theirs.read_bytes(), "the two copies differ"
            ours.unlink()
            theirs.unlink()
        size = src.stat().st_size / 1e6
        print(f"{src.name} ({size:.0f} MB), F32 identity + BF16 re-encode, best of {args.rounds}, same bytes:")
        for name, s in best.items():
            print(f"  {name:8s} {s:7.2f} s")
        print(f"  ours / gguf-py: {best['gguf-py'] / best['ours']:.1f}x faster")


if __name__ == "__main__":
    main()
