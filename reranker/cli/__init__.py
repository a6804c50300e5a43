"""The `reranker` command line: one module per command, each with `add_parser` and `run`.

Every error a user can cause is a `RerankerError`: printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from reranker.cli import bench_quant, cache, convert, embed, head, quantize, rerank, score, serve, synth
from reranker.errors import RerankerError

COMMANDS = (rerank, score, serve, embed, head, bench_quant, synth, convert, quantize, cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reranker", description="jina-reranker-m0 from its GGUF release.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and llama.cpp messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def non_utf8_argument(argv: list[str]) -> str | None:
    """A one-line error for the first argument that was not UTF-8 (Python keeps its bytes as lone surrogates)."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:
            name = (arg.split("=", 1)[0] if arg.startswith("-") else
                    f"the value of {argv[i - 1]}" if i and argv[i - 1].startswith("-") else f"argument {i + 1}")
            return f"{name} is not valid UTF-8 (at character {e.start}: {arg!a:.60}); pass it as UTF-8"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if problem := non_utf8_argument(argv):
        print(f"reranker: error: {problem}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("reranker.jobs").setLevel(logging.INFO)  # progress lines when stderr is not a terminal
    if args.verbose:
        logging.getLogger("reranker.llama").setLevel(logging.INFO)
    try:
        args.func(args)
        sys.stdout.flush()  # a reader gone (`reranker cache list | head -1`) shows here, not in Python's exit
    except BrokenPipeError:
        # The reader of stdout closed it: stop quietly. stdout points at /dev/null so Python's own flush at exit
        # does not fail again (the recipe of Python's documentation of SIGPIPE).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except RerankerError as e:
        print(f"reranker {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reranker {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
