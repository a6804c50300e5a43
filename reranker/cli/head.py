"""`reranker head`: score existing embeddings (llama-embedding's JSON, or a .npy) with the torch head."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from reranker.atomic import open_output
from reranker.cli.common import resolve_device
from reranker.compat.embedding_files import (
    JSON_CHUNK,
    JSON_FIX,
    NPY_CHUNK,
    OUTPUT_FORMATS,
    first_non_finite,
    format_scores,
    is_npy,
    iter_json_rows,
    keyed_scores,
    open_npy,
)
from reranker.errors import RerankerError
from reranker.gguf.header import check_file

if TYPE_CHECKING:
    from head import ScoringHead


def load_head(path: str) -> "ScoringHead":
    """The scoring head from an mlp_weights.npz (or any file `ScoringHead.load` reads)."""
    from head import ScoringHead

    return ScoringHead.load(check_file(path, "head file", "pass the mlp_weights.npz released with the GGUF"))


def run(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from head import score_embeddings

    if args.batch_size <= 0:
        raise RerankerError(f"--batch-size {args.batch_size} must be positive")
    out_name = args.output or ""
    fmt = args.format or ("npy" if out_name.endswith(".npy") else "json" if out_name.endswith(".json") else
                          "jsonl" if out_name.endswith(".jsonl") else "txt")
    if fmt == "npy" and (args.output is None or args.output == "-"):
        raise RerankerError("--format npy writes a binary file; give it with -o FILE.npy")
    device = resolve_device(args.device)
    if args.embeddings != "-":
        check_file(args.embeddings, "embeddings file", JSON_FIX)
    if fmt == "jsonl":
        from head.hidden_states import index_path

        index = index_path(args.embeddings)
        if not is_npy(args.embeddings) or not index.is_file():
            raise RerankerError(f"--format jsonl keys each score by its pair: it needs a hidden-state .npy with its index "
                                f"{index} beside it (`reranker score --save-hidden`); use txt, json or npy otherwise")
    if args.embeddings == "-" and sys.stdin is None:
        raise RerankerError("standard input is closed; give the embeddings file instead of -")
    head = load_head(args.head)
    hidden = head.hidden_size
    source = "stdin" if args.embeddings == "-" else args.embeddings

    with contextlib.ExitStack() as stack:
        if is_npy(args.embeddings):
            data = open_npy(args.embeddings, hidden, args.head)
            step = max(args.batch_size, NPY_CHUNK)
            rows: Iterable[np.ndarray] = (data[i : i + step] for i in range(0, len(data), step))
            total: int | None = len(data)
        else:
            fh = sys.stdin.buffer if args.embeddings == "-" else stack.enter_context(open(args.embeddings, "rb"))
            rows = iter_json_rows(fh, source, hidden, args.head, chunk_rows=min(args.batch_size, JSON_CHUNK))
            total = None
        bar = stack.enter_context(tqdm(total=total, unit="row", desc="Scoring", file=sys.stderr,
                                       disable=args.quiet or not sys.stderr.isatty()))

        def scores() -> Iterator[np.ndarray]:
            done = 0
            for chunk in rows:
                if (bad := first_non_finite(chunk)) is not None:
                    raise RerankerError(f"{source}: embedding {done + bad} holds NaN or inf; the model that wrote it "
                                        "is likely broken: check its GGUF and re-run the embedding")
                out = score_embeddings(head, chunk, batch_size=args.batch_size, device=device, compile=args.compile)
                if (bad := first_non_finite(out)) is not None:
                    raise RerankerError(f"the head {args.head} gave a non-finite score for embedding {done + bad}; "
                                        "the head file is likely broken")
                done += len(chunk)
                bar.update(len(chunk))
                yield out

        with open_output(args.output, binary=fmt == "npy") as (stream, tmp):
            if fmt == "npy":
                # Scores are 4 bytes a row: holding them is fine even when the embeddings are not.
                parts = list(scores())
                with open(tmp, "wb") as out:
                    np.save(out, np.concatenate(parts) if parts else np.empty(0, np.float32))
            else:
                pieces = keyed_scores(scores(), str(index)) if fmt == "jsonl" else format_scores(scores(), fmt)
                for piece in pieces:
                    stream.write(piece)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the `head` command (score llama-embedding output with the torch head) to `reranker`'s subparsers."""
    p = sub.add_parser(
        "head", help="score llama-embedding JSON (or a .npy) with the scoring head, streaming",
        description="The upstream recipe's numpy MLP step on existing embeddings, in torch (GPU when present), "
                    "streaming so files larger than memory work. Prints one score per row, in file order.")
    p.add_argument("embeddings", help="llama-embedding --embd-output-format json (or array) output, '-' for stdin, or a .npy "
                                      "(float32 or float16, e.g. from reranker score --save-hidden)")
    p.add_argument("--head", required=True, help="mlp_weights.npz released with the GGUF")
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout); written whole or not at all")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="txt: one score per line (default); json: a list; npy: float32 array (needs -o); "
                        "jsonl: {query_id, doc_id, score} lines, for a `reranker score --save-hidden` .npy (ids from "
                        "its index). Default from -o's suffix")
    p.add_argument("--batch-size", type=int, default=65536, help="rows per head call (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device for the head (default: cuda if available, else mps, else cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the head (pays off only for huge .npy inputs on CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")
    p.set_defaults(func=run)
