"""`reranker synth`: a synthetic jina-reranker-m0 checkpoint (real shapes and tokenizer, random weights)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic jina-reranker-m0 checkpoint (random weights, real tokenizer)")
    p.add_argument("--preset", choices=["tiny", "small", "m0"], default="tiny",
                   help="shapes: tiny (hidden 64, tests), small (hidden 512, every row a multiple of 256 as K-quants need: "
                        "benchmarks, bench-quant), m0 (the real model's, 1.5 B parameters) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights: the same seed, the same bytes (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--no-vision", dest="vision", action="store_false",
                   help="leave the vision tower (visual.*) out: a text-only checkpoint, no mmproj on convert")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from reranker.extras import require

    require("synth", "reranker synth")  # before the folder is made
    from reranker.synth.random_checkpoint import synth_checkpoint

    print(synth_checkpoint(args.output, preset=args.preset, seed=args.seed, vision=args.vision))
