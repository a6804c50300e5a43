"""`reranker quantize`: llama.cpp's own quantizer on an F32/F16/BF16 GGUF."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize an F32/F16/BF16 GGUF with llama.cpp")
    p.add_argument("input", help="the F32, F16 or BF16 GGUF to quantize")
    p.add_argument("output", help="the GGUF to write")
    p.add_argument("--type", default="Q8_0", help="BF16 (exact from a bf16-valued F16), Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, ... (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="quantizing threads (default: every CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from reranker.gguf.quantize import quantize

    print(quantize(args.input, args.output, args.type, n_threads=args.threads))
