"""What the model commands share: the model options, loading a `Reranker`, the head's device."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from reranker.defaults import DEFAULT_REPO, MAX_LENGTH, MAX_QUERY_LENGTH, N_BATCH
from reranker.errors import RerankerError

if TYPE_CHECKING:
    import torch

    from reranker.api import Reranker


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp and truncation options, and the head's torch device."""
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="layers to offload to the GPU; -1 all (default), 0 none")
    p.add_argument("--n-ctx", type=int, default=None, help="context size in tokens (default: --max-length)")
    p.add_argument("--n-batch", type=int, default=N_BATCH, help="tokens per decode call (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"prompt tokens at most (default: {MAX_LENGTH}, or --n-ctx if smaller)")
    p.add_argument("--max-query-length", type=int, default=MAX_QUERY_LENGTH, help="query tokens at most (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device for the head (default: cuda if available, else cpu)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """`-m MODEL`, `--head` and the backbone options."""
    p.add_argument("-m", "--model", default=DEFAULT_REPO,
                   help="a local .gguf, a folder, or a Hub id like jinaai/jina-reranker-m0-GGUF:Q8_0 (default: %(default)s)")
    p.add_argument("--head", help="mlp_weights.npz (default: the one beside the GGUF)")
    add_backbone_args(p)


def load_reranker(args: argparse.Namespace) -> "Reranker":
    """The `Reranker` the model options describe."""
    from reranker.api import Reranker

    return Reranker.from_pretrained(args.model, head=args.head, device=resolve_device(args.device), n_ctx=args.n_ctx,
                                    n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                                    max_length=args.max_length, max_query_length=args.max_query_length)


def resolve_device(device: str | None) -> "torch.device":
    """The torch device for the head: the one asked for, checked, else CUDA/MPS when present."""
    import torch

    from reranker.api import default_device

    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise RerankerError(f"--device {device}: not a torch device ({e}); use cpu, cuda, cuda:1 or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RerankerError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu "
                            "or install torch's CUDA build")
    return dev
