"""The `reranker` command line: rerank, score, embed, head, bench-quant, synth, convert, quantize."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from head import HeadLoadError

from . import compat_embed, compat_head, job_cli
from .bench_quant_cli import add_parser as add_bench_quant_parser
from .errors import RerankerError
from .hub import DEFAULT_REPO


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_REPO,
                   help="a local .gguf, a folder, or a Hub id like jinaai/jina-reranker-m0-GGUF:Q8_0 (default: %(default)s)")
    p.add_argument("--head", help="mlp_weights.npz (default: the one beside the GGUF)")
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="layers to offload to the GPU; -1 all (default), 0 none")
    p.add_argument("--n-ctx", type=int, default=None, help="context size in tokens (default: --max-length)")
    p.add_argument("--n-batch", type=int, default=2048, help="tokens per decode call (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-length", type=int, default=None, help="prompt tokens at most (default: 10240, or --n-ctx if smaller)")
    p.add_argument("--max-query-length", type=int, default=512, help="query tokens at most (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device for the head (default: cuda if available)")


def _load(args: argparse.Namespace):
    from .api import Reranker

    return Reranker.from_pretrained(args.model, head=args.head, device=args.device, n_ctx=args.n_ctx,
                                    n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                                    max_length=args.max_length, max_query_length=args.max_query_length)


def cmd_rerank(args: argparse.Namespace) -> None:
    from .documents import read_documents

    docs = list(args.documents or []) + (read_documents(args.file) if args.file else [])
    if not docs:
        raise RerankerError("no documents: give -d DOC (repeatable) or -f FILE")
    reranker = _load(args)
    ranked = reranker.rank(args.query, docs, top_k=args.top_n, return_documents=True)
    if args.json:
        out = {"model": args.model, "usage": {"total_tokens": reranker.last_usage.tokens},
               "results": [{"index": r["corpus_id"], "relevance_score": r["score"], "document": {"text": r["text"]}}
                           for r in ranked]}
        json.dump(out, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return
    print(f"{'rank':>4}  {'index':>5}  {'score':>8}  document")
    for n, r in enumerate(ranked, 1):
        text = " ".join(r["text"].split())
        print(f"{n:>4}  {r['corpus_id']:>5}  {r['score']:8.4f}  {text[:100] + ('…' if len(text) > 100 else '')}")


def cmd_synth(args: argparse.Namespace) -> None:
    from .synth import synth_checkpoint

    print(synth_checkpoint(args.output, preset=args.preset, seed=args.seed))


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    gguf_path, npz_path = convert(args.checkpoint, args.output, outtype=args.outtype, name=args.name)
    print(gguf_path)
    print(npz_path)


def cmd_quantize(args: argparse.Namespace) -> None:
    from .quantize import quantize

    print(quantize(args.input, args.output, args.type, n_threads=args.threads))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reranker", description="jina-reranker-m0 from its GGUF release.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and llama.cpp messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rerank", help="rank documents for one query")
    _add_model_args(p)
    p.add_argument("-q", "--query", required=True)
    p.add_argument("-d", "--document", dest="documents", action="append", help="a document (repeatable)")
    p.add_argument("-f", "--file", help="documents, one per line, or a .jsonl of {\"text\": ...}")
    p.add_argument("--top-n", type=int, default=None, help="show only the best N")
    p.add_argument("--json", action="store_true", help="print the Jina rerank API's JSON response")
    p.set_defaults(func=cmd_rerank)

    p = sub.add_parser("synth", help="write a synthetic jina-reranker-m0 checkpoint (random weights, real tokenizer)")
    p.add_argument("--preset", choices=["tiny", "small", "m0"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="checkpoint folder -> <name>-<TYPE>.gguf + mlp_weights.npz, as the release")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f16")
    p.add_argument("--name", default=None, help="file name stem (default: the checkpoint folder's name)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="quantize an F32/F16/BF16 GGUF with llama.cpp")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--type", default="Q8_0", help="Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, ... (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_quantize)

    job_cli.add_parser(sub, _add_model_args)
    compat_embed.add_parser(sub)
    compat_head.add_parser(sub)
    add_bench_quant_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("reranker.job").setLevel(logging.INFO)  # progress lines when stderr is not a terminal
    if args.verbose:
        logging.getLogger("reranker.llama").setLevel(logging.INFO)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (RerankerError, HeadLoadError) as e:
        print(f"reranker {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reranker {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
