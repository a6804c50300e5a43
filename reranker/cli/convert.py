"""`reranker convert`: a checkpoint folder -> `<name>-<TYPE>.gguf` + `mlp_weights.npz`, as the release
(+ `mmproj-<name>-<TYPE>.gguf`, the vision projector, when the checkpoint has `visual.*` weights)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="checkpoint folder -> <name>-<TYPE>.gguf + mlp_weights.npz (+ mmproj-*.gguf), as the release")
    p.add_argument("checkpoint", help="a jina-reranker-m0 checkpoint folder (config.json, safetensors, tokenizer), e.g. from `reranker synth`")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f16",
                   help="weights' storage type, as the release's files (default: %(default)s; f32 is the reference)")
    p.add_argument("--mmproj-type", choices=["f32", "f16", "q8_0"], default="f16",
                   help="the vision projector's type (written only when the checkpoint has visual.* weights; default: %(default)s)")
    p.add_argument("--name", default=None, help="file name stem (default: the checkpoint folder's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from reranker.gguf.convert import convert
    from reranker.gguf.mmproj import has_vision, mmproj_name

    # Every input (the projector's too) is checked before the first file is written.
    gguf_path, npz_path = convert(args.checkpoint, args.output, outtype=args.outtype, name=args.name, mmproj_type=args.mmproj_type)
    print(gguf_path)
    print(npz_path)
    if has_vision(args.checkpoint):
        print(gguf_path.parent / mmproj_name(args.name or Path(args.checkpoint).resolve().name, args.mmproj_type))
