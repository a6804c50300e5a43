"""Ours at F16, BF16 and Q8_0 against transformers at its best, in one process, as ratios.

The peer is transformers' Qwen2-VL text model + the checkpoint's score head (the original
computation) in its strongest configuration on the machine at hand: every dtype it supports
(bf16 and fp32; on the CPU bf16 is fast only with avx512_bf16/AMX, so both are tried), SDPA
attention, prompts sorted by length (less padding), the best of several batch sizes. The weaker
configurations are printed beside it. Ours is `Reranker.compute_score` (the fast path) on the
same pairs, warm, best of `--rounds`:

  F16    the F16 GGUF as stored (`bf16=False`)
  BF16   the same F16 GGUF with the fast path's automatic BF16 re-encode (`bf16=True`: only
         exact tensors; the same scores as a `convert --outtype bf16` GGUF)
  Q8_0   llama.cpp's quantizer on the F16 GGUF

The synthetic checkpoint is bf16, as the real one is; models are built once into --cache.

    python benchmarks/peer.py                          # `small` shape (hidden 512, 4 layers)
    python benchmarks/peer.py --preset m0 --pairs 16   # the real shapes: ~3 GB per GGUF, minutes to build
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import numpy as np  # noqa: E402
from flops import fraction, matmul_rate, matmul_shape, useful_flops  # noqa: E402
from job import load_average, synthetic_pairs  # noqa: E402
from tf_peer import run_transformers  # noqa: E402


def build(cache: Path, preset: str) -> tuple[Path, Path]:
    """(F16 GGUF, bf16 checkpoint dir), built once; BF16/Q8_0 files are made beside the F16 one."""
    from reranker.gguf.convert import convert
    from reranker.synth.random_checkpoint import synth_checkpoint

    root = cache / f"{preset}-bf16ckpt"
    ckpt = root / f"jina-reranker-m0-{preset}"
    f16 = root / "gguf" / f"jina-reranker-m0-{preset}-F16.gguf"
    if not f16.is_file():
        print(f"building the synthetic `{preset}` model (bf16 checkpoint, F16 GGUF) in {root} ...", file=sys.stderr, flush=True)
        if not (ckpt / "model.safetensors").is_file():
            synth_checkpoint(ckpt, preset=preset, seed=0, dtype="bfloat16")
        convert(ckpt, root / "gguf", outtype="f16")
    return f16, ckpt


def level_file(f16: Path, level: str) -> Path:
    from reranker.gguf.quantize import quantize

    path = f16.with_name(f16.name.replace("-F16", f"-{level}"))
    if not path.is_file():
        print(f"quantizing {path.name} ...", file=sys.stderr, flush=True)
        quantize(f16, path, level)
    return path


def run_ours(path: Path, pairs, threads: int, bf16: bool, rounds: int) -> dict:
    from reranker import Reranker

    rr = Reranker.from_pretrained(str(path), device="cpu", n_ctx=4096, n_threads=threads, bf16=bf16)
    rr.compute_score(pairs[:4])  # warm: pages in the weights, sizes the buffers
    best, scores = None, None
    for _ in range(rounds):
        t = time.perf_counter()
        scores = rr.compute_score(pairs, batch_size=len(pairs))
        wall = time.perf_counter() - t
        best = wall if best is None else min(best, wall)
    out = {"weights": rr.weights_dtype, "tokens": rr.last_usage.tokens, "seconds": best,
           "tokens_per_s": rr.last_usage.tokens / best, "scores": np.array(scores)}
    rr.close()
    return out


def llama_cpp_features() -> str:
    """The SIMD features llama.cpp's CPU backend was built with, of those that decide its mat-mul speed."""
    import llama_cpp

    from reranker.engine.cpu import build_features

    have = build_features(llama_cpp.llama_print_system_info())
    return ",".join(f for f in ("AVX2", "F16C", "FMA", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8") if f in have)


def torch_isa() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def main() -> None:
    from reranker.engine.cpu import cpu_bf16_flags, default_threads
    from reranker.engine.identity import use_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "m0"])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 120), metavar=("MIN", "MAX"))
    ap.add_argument("--threads", type=int, default=None, help="all paths (default: reranker's default_threads())")
    ap.add_argument("--rounds", type=int, default=3, help="timed repeats per configuration, best kept")
    ap.add_argument("--batch-sizes", default="4,8,16", help="transformers batch sizes tried")
    ap.add_argument("--tf-dtypes", default="bf16,fp32")
    ap.add_argument("--tf-attn", default="sdpa,eager")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    ap.add_argument("--ours", default="F16,BF16,Q8_0", help="our paths to run, of F16, BF16, Q8_0 (F16 always runs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    threads = args.threads or default_threads()

    f16, ckpt = build(args.cache, args.preset)
    q8 = level_file(f16, "Q8_0") if "Q8_0" in args.ours.upper() else None
    pairs = [list(p) for p in synthetic_pairs(args.pairs, tuple(args.doc_words))]
    loads = [load_average()]
    wanted = {"F16", *args.ours.upper().split(",")}
    runs = {"F16": (f16, False), "BF16": (f16, True), "Q8_0": (q8, False)}
    ours = {name: run_ours(path, pairs, threads, bf16, args.rounds) for name, (path, bf16) in runs.items() if name in wanted}
    loads.append(load_average())

    from reranker import Reranker
    from reranker.defaults import MAX_QUERY_LENGTH
    from reranker.engine.prompts import PromptBuilder

    rr = Reranker.from_pretrained(str(f16), device="cpu", n_ctx=4096, n_threads=threads, bf16=False)
    builder = PromptBuilder(rr.backbone.tokenizer, 4096, MAX_QUERY_LENGTH)
    ids = [builder.build(q, d).ids for q, d in pairs]
    rr.close()
    tf = run_transformers(ckpt, ids, threads, args.tf_dtypes.split(","), args.tf_attn.split(","),
                          [int(b) for b in args.batch_sizes.split(",")], args.rounds)
    loads.append(load_average())
    best = max(tf, key=lambda r: r["tokens_per_s"])
    tokens = ours["F16"]["tokens"]
    print(f"preset {args.preset}; {len(pairs)} pairs of {args.doc_words[0]}-{args.doc_words[1]} words, {tokens} prompt tokens; "
          f"{threads} threads; CPU bf16 flags: {','.join(cpu_bf16_flags()) or 'none'}; load average {loads[0]} at start, "
          f"{loads[-1]} at end (shared machine: compare ratios)")
    isa = {k: os.environ[k] for k in ("LLAMA_CPP_LIB_PATH", "RERANKER_CPU_EXTRA_BUFFERS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                      "MKL_ENABLE_INSTRUCTIONS")
           if k in os.environ}
    print(f"llama.cpp: {llama_cpp_features()}; torch: {torch_isa()}" + (f"; environment {isa}" if isa else ""))
    auto, why = use_bf16(None, 0, f16)
    print(f"the default (--bf16 auto) runs the F16 file as {'BF16' if auto else 'F16'} here ({why})")
    print(f"transformers best: {best['dtype']} {best['attn']} {'sorted' if best['sorted'] else 'input order'} batch "
          f"{best['batch']}: {best['tokens_per_s']:.1f} tok/s")
    shape = matmul_shape(ckpt)
    rates = {dt: matmul_rate(shape, dt, threads) for dt in ("bf16", "fp32")}
    per_token = useful_flops(ckpt, 1) / 1e9
    print(f"torch mat-mul {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]} on {threads} threads: bf16 {rates['bf16']:.0f} GFLOP/s, "
          f"fp32 {rates['fp32']:.0f} GFLOP/s; GFLOP/s below = 2 x non-embedding params x prompt tokens / wall")

    def rate(tps: float) -> str:
        g = tps * per_token
        return f"{g:>9.1f}{fraction(g, rates, 'bf16'):>9}{fraction(g, rates, 'fp32'):>9}"

    print(f"{'path':<44}{'tok/s':>9}{'vs tf best':>12}{'GFLOP/s':>9}{'of bf16':>9}{'of fp32':>9}")
    for name, r in ours.items():
        print(f"{'ours ' + name + ' (runs as ' + r['weights'] + ')':<44}{r['tokens_per_s']:>9.1f}"
              f"{r['tokens_per_s'] / best['tokens_per_s']:>11.2f}x{rate(r['tokens_per_s'])}")
    for dt in dict.fromkeys(r["dtype"] for r in tf):
        for attn in dict.fromkeys(r["attn"] for r in tf):
            sub = [r for r in tf if r["dtype"] == dt and r["attn"] == attn]
            if sub:
                b = max(sub, key=lambda r: r["tokens_per_s"])
                print(f"{'transformers ' + dt + ' ' + attn + ' (best batch ' + str(b['batch']) + (', sorted' if b['sorted'] else '') + ')':<44}"
                      f"{b['tokens_per_s']:>9.1f}{b['tokens_per_s'] / best['tokens_per_s']:>11.2f}x{rate(b['tokens_per_s'])}")
    ref = next(r for r in tf if r["dtype"] == "fp32") if any(r["dtype"] == "fp32" for r in tf) else best
    print(f"scores, max |diff| vs transformers {ref['dtype']}: " + ", ".join(
        f"{n} {np.abs(r['scores'] - ref['scores']).max():.1e}" for n, r in ours.items())
        + f", transformers {best['dtype']} {np.abs(best['scores'] - ref['scores']).max():.1e}")
    exact = max(r["tokens_per_s"] for n, r in ours.items() if n in ("F16", "BF16"))
    print(f"our best exact path / transformers' best: {exact / best['tokens_per_s']:.2f}x")
    if args.json:
        strip = lambda r: {k: v for k, v in r.items() if k != "scores"}  # noqa: E731
        args.json.write_text(json.dumps({"preset": args.preset, "pairs": len(pairs), "threads": threads, "load_average": loads,
                                         "matmul_gflops": rates, "gflop_per_token": per_token,
                                         "ours": {k: strip(v) for k, v in ours.items()}, "transformers": [strip(r) for r in tf]},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
