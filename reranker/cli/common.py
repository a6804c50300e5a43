"""What the model commands share: the model options, loading a `Reranker`, the head's device."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from reranker.defaults import (
    CHUNK_AGGREGATE,
    CHUNK_AGGREGATES,
    CHUNK_OVERLAP,
    DEFAULT_REPO,
    MAX_CHUNKS,
    MAX_LENGTH,
    MAX_QUERY_LENGTH,
    N_BATCH_CPU,
    N_BATCH_GPU,
)
from reranker.errors import RerankerError
from reranker.options import Chunking

if TYPE_CHECKING:
    import torch

    from reranker.api import Reranker


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp and truncation options, and the head's torch device."""
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="layers to offload to the GPU; -1 all (default), 0 none")
    p.add_argument("--n-ctx", type=int, default=None, help="context size in tokens (default: --max-length)")
    p.add_argument("--n-batch", type=int, default=None,
                   help=f"tokens per decode call (default: {N_BATCH_CPU} on the CPU, {N_BATCH_GPU} on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the physical cores less those other processes keep busy now, "
                        "a 0.25 s sample of /proc/stat; "
                        "RERANKER_THREADS overrides)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="store an F16 GGUF's bf16-exact tensors as BF16 in the fast path's copy: auto (default: when the "
                        "layers run on a CPU with avx512_bf16/amx_bf16), on, or off (keep F16)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"prompt tokens at most (default: {MAX_LENGTH}, or --n-ctx if smaller)")
    p.add_argument("--max-query-length", type=int, default=MAX_QUERY_LENGTH, help="query tokens at most (default: %(default)s)")
    p.add_argument("--max-doc-length", type=int, default=None,
                   help="document tokens at most, as the original model cuts them "
                        "(default: the larger of max-length minus max-query-length and max-query-length)")
    p.add_argument("--device", default=None, help="torch device for the head (default: cuda if available, else mps, else cpu)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """`-m MODEL`, `--head` and the backbone options."""
    p.add_argument("-m", "--model", default=DEFAULT_REPO,
                   help="a local .gguf, a folder, or a Hub id like jinaai/jina-reranker-m0-GGUF:Q8_0 (default: %(default)s)")
    p.add_argument("--head", help="mlp_weights.npz (default: the one beside the GGUF)")
    add_backbone_args(p)
    p.add_argument("--deterministic", action="store_true",
                   help="a pair's score independent of the other pairs: each prompt decoded alone (slower)")


def load_reranker(args: argparse.Namespace) -> "Reranker":
    """The `Reranker` the model options describe (`from_pretrained` checks them all before any heavy work)."""
    from reranker.api import Reranker
    from reranker.settings import LoadSettings

    return Reranker.from_settings(LoadSettings.from_args(args))


def bf16_option(args: argparse.Namespace) -> bool | None:
    """`--bf16 auto|on|off` as `from_pretrained`'s `bf16` (None, True, False)."""
    return {"auto": None, "on": True, "off": False}[getattr(args, "bf16", "auto")]


def resolve_device(device: str | None) -> "torch.device":
    """The torch device for the head: `reranker.api.resolve_device`, imported only when a command needs it."""
    from reranker.api import resolve_device

    return resolve_device(device)


def add_chunk_args(p: argparse.ArgumentParser) -> None:
    """`--chunk` and its settings: long documents split, every chunk scored, scores aggregated."""
    g = p.add_argument_group("long documents (default: truncated to --max-length, as the original model)")
    g.add_argument("--chunk", action="store_true",
                   help="split a document too long for --max-length into chunks, score each, and aggregate")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per chunk (default: all the room a prompt leaves after the template and the query)")
    g.add_argument("--chunk-overlap", type=int, default=None,
                   help=f"tokens shared by consecutive chunks (default: {CHUNK_OVERLAP}, at most half a chunk)")
    g.add_argument("--max-chunks", type=int, default=MAX_CHUNKS,
                   help="chunks per document at most; the rest of a longer document is not scored (default: %(default)s)")
    g.add_argument("--aggregate", choices=CHUNK_AGGREGATES, default=CHUNK_AGGREGATE,
                   help="a document's score from its chunks' (default: %(default)s)")


def mode_options(args: argparse.Namespace, defaults: dict[str, object], on: bool, refusal: str) -> dict[str, object]:
    """The options of a mode (`defaults`: each one's dest and default; their parser defaults are None, so that one
    given is told apart from one left out), defaults filled in; when the mode is not `on`, one given is a
    RerankerError `--OPTION {refusal}`, not silently ignored."""
    if not on and (given := [name for name in defaults if getattr(args, name) is not None]):
        raise RerankerError(f"--{given[0].replace('_', '-')} {refusal}")
    return {name: default if getattr(args, name) is None else getattr(args, name) for name, default in defaults.items()}


def chunking_option(args: argparse.Namespace) -> Chunking | None:
    """The `Chunking` of `--chunk ...` (checked), or None without `--chunk`."""
    if not args.chunk:
        given = [flag for flag, value, default in (("--chunk-size", args.chunk_size, None),
                                                   ("--chunk-overlap", args.chunk_overlap, None),
                                                   ("--max-chunks", args.max_chunks, MAX_CHUNKS),
                                                   ("--aggregate", args.aggregate, CHUNK_AGGREGATE)) if value != default]
        if given:
            one = len(given) == 1
            raise RerankerError(f"without --chunk, {', '.join(given)} {'has' if one else 'have'} no effect; "
                                f"add --chunk, or drop {'it' if one else 'them'}")
        return None
    return Chunking(args.chunk_size, args.chunk_overlap, args.max_chunks, args.aggregate)
