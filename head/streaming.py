"""Score large embedding arrays in chunks without holding them (or their activations) in memory at once.

On CUDA, host chunks are staged through two pinned buffers and copied on a
side stream, so reading chunk i+1 from disk/RAM and copying it overlap with
the matmuls of chunk i; elsewhere the data is simply chunked.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from reranker.errors import RerankerError

from .fused import FoldedHead, FusedScorer, get_scorer

if TYPE_CHECKING:
    from .model import ScoringHead

Embeddings = Union[np.ndarray, torch.Tensor, str, "os.PathLike[str]"]  # noqa: UP007 (a runtime alias on Python 3.10)
Rows = Union[np.ndarray, torch.Tensor, "_GatheredRows"]  # noqa: UP007


def _load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    # mmap: a 10M x 1536 file must not be read into RAM up front.
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise RerankerError(
            f"score_embeddings: cannot read '{os.fspath(path)}' as a .npy array ({exc}); pass an existing float .npy "
            "file of shape (..., H), a numpy array or a torch tensor"
        ) from exc
    if not isinstance(data, np.ndarray):
        data.close()
        raise RerankerError(
            f"score_embeddings reads a .npy file, but '{os.fspath(path)}' is an .npz archive; pass one array from it "
            "(np.load(path)[name])"
        )
    return data


def _as_rows(data: Embeddings, hidden: int) -> tuple[Rows, tuple[int, ...]]:
    """View any accepted input as (N, H) rows plus the leading shape to restore on output."""
    if isinstance(data, (str, os.PathLike)):
        data = _load_npy(data)
    if isinstance(data, np.ndarray):
        if data.dtype.kind != "f" or data.dtype.itemsize > 8:  # torch has no long double
            raise RerankerError(f"score_embeddings needs float16/32/64 embeddings, got dtype {data.dtype}; "
                                "convert them first (e.g. a.astype(np.float32))")
    elif isinstance(data, torch.Tensor):
        if not data.is_floating_point():
            raise RerankerError(f"score_embeddings needs float embeddings, got dtype {data.dtype}; "
                                "convert them first (e.g. t.float())")
    else:
        raise RerankerError(
            f"score_embeddings takes a numpy array, a torch tensor or a .npy path, got {type(data).__name__}; "
            "convert it first (e.g. np.asarray(embeddings, dtype=np.float32))"
        )
    if data.ndim == 0 or data.shape[-1] != hidden:
        raise RerankerError(
            f"score_embeddings expected embeddings of shape (..., {hidden}), got shape {tuple(data.shape)}; "
            f"pass the hidden states of the backbone this head belongs to (hidden size {hidden})"
        )
    lead = tuple(data.shape[:-1])
    on_host = isinstance(data, np.ndarray) or data.device.type == "cpu"
    if on_host and not _rows_view(lead, tuple(data.stride() if isinstance(data, torch.Tensor) else data.strides)):
        return _GatheredRows(data, lead), lead
    return data.reshape(-1, hidden), lead


def _rows_view(lead: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether (..., H) data with these leading dimensions and strides can be seen as (N, H) rows without a copy."""
    dims = [(d, st) for d, st in zip(lead, strides) if d != 1]
    return all(outer == inner * d for (_, outer), (d, inner) in zip(dims, dims[1:]))


class _GatheredRows:
    """(N, H) rows of an array whose layout no view can flatten (a Fortran-order (B, T, H) memmap, a strided
    slice): each chunk is gathered alone, where a reshape would copy the whole array into memory first."""

    def __init__(self, data: np.ndarray | torch.Tensor, lead: tuple[int, ...]) -> None:
        self.data, self.lead = data, lead
        self.shape = (int(np.prod(lead, dtype=np.int64)), data.shape[-1])

    def __getitem__(self, rows: slice) -> np.ndarray | torch.Tensor:
        index = np.unravel_index(np.arange(*rows.indices(self.shape[0])), self.lead)
        if isinstance(self.data, torch.Tensor):
            return self.data[tuple(torch.from_numpy(i) for i in index)]
        return self.data[index]


def _device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this process can use, else a RerankerError naming it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RerankerError(f"score_embeddings: device={device!r} is not a torch device ({exc}); "
                            "pass e.g. 'cpu', 'cuda' or 'cuda:0'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RerankerError(f"score_embeddings: device={device!r} but torch sees no CUDA device; pass device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RerankerError(f"score_embeddings: device={device!r} but torch sees {torch.cuda.device_count()} CUDA "
                            "device(s); pass one of them")
    return dev


def _host_chunk(rows: Rows, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) as a tensor, without copying when possible."""
    chunk = rows[start:stop]
    if isinstance(chunk, torch.Tensor):
        return chunk
    if not chunk.dtype.isnative:
        chunk = chunk.astype(chunk.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        # Read-only memmaps warn in from_numpy; the view is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(chunk)


def _score_chunked(
    rows: Rows, out: torch.Tensor, batch: int, device: torch.device, folded: FoldedHead, scorer: FusedScorer
) -> None:
    for start in range(0, rows.shape[0], batch):
        stop = min(start + batch, rows.shape[0])
        x = _host_chunk(rows, start, stop).to(device)
        out[start:stop].copy_(scorer(x, folded))


def _score_cuda_streamed(
    rows: Rows, out: torch.Tensor, batch: int, device: torch.device, folded: FoldedHead, scorer: FusedScorer
) -> None:
    """Double-buffered host->device pipeline: stage chunk i+1 while the GPU scores chunk i."""
    n, hidden = rows.shape
    src_dtype = _host_chunk(rows, 0, 0).dtype
    stage_dtype = torch.float32 if src_dtype == torch.float64 else src_dtype  # halve float64 traffic on the bus
    already_pinned = isinstance(rows, torch.Tensor) and rows.is_pinned() and rows.dtype == stage_dtype
    pinned = (
        [] if already_pinned else [torch.empty((batch, hidden), dtype=stage_dtype, pin_memory=True) for _ in range(2)]
    )
    staged = [torch.empty((batch, hidden), dtype=stage_dtype, device=device) for _ in range(2)]
    copied = [torch.cuda.Event() for _ in range(2)]
    consumed = [torch.cuda.Event() for _ in range(2)]
    compute = torch.cuda.current_stream(device)
    copier = torch.cuda.Stream(device)

    for i, start in enumerate(range(0, n, batch)):
        stop, k = min(start + batch, n), i % 2
        m = stop - start
        if already_pinned:
            host = rows[start:stop]
        else:
            if i >= 2:
                copied[k].synchronize()  # the DMA reading pinned[k] two chunks ago must finish before we refill it
            host = pinned[k][:m]
            host.copy_(_host_chunk(rows, start, stop))  # CPU-side work, overlapping the GPU's work on chunk i-1
        with torch.cuda.stream(copier):
            if i >= 2:
                copier.wait_event(consumed[k])  # staged[k] may still be read by the matmuls of chunk i-2
            staged[k][:m].copy_(host, non_blocking=True)
            copied[k].record(copier)
        compute.wait_event(copied[k])
        out[start:stop].copy_(scorer(staged[k][:m], folded))
        consumed[k].record(compute)


def score_embeddings(
    head: "ScoringHead",
    data: Embeddings,
    batch_size: int = 65536,
    device: str | torch.device | None = None,
    compile: bool | None = None,
) -> np.ndarray:
    """Float32 probabilities for embeddings of shape (..., H), returned with shape (...) in input order.

    `data` is a numpy array, a torch tensor (any device) or a path to a .npy file (memory-mapped).
    `device` defaults to the head's device; `compile` defaults to True on CUDA (falls back to eager).
    Runs under inference_mode and honours an enclosing torch.autocast.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise RerankerError(f"score_embeddings: batch_size={batch_size!r} is invalid; it must be an integer >= 1")
    dev = _device(device) if device is not None else head.fc1.weight.device
    rows, lead = _as_rows(data, head.hidden_size)
    n = int(rows.shape[0])
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    result = np.empty(n, dtype=np.float32)
    if n == 0:
        return result.reshape(lead)
    batch = min(batch_size, n)
    scorer = get_scorer(dev.type == "cuda" if compile is None else compile)

    with torch.inference_mode():
        folded = FoldedHead.from_head(head, dev)
        on_device = isinstance(rows, torch.Tensor) and rows.device == dev
        if dev.type == "cuda" and not on_device:
            out = torch.empty(n, dtype=torch.float32, device=dev)
            with torch.cuda.device(dev):
                _score_cuda_streamed(rows, out, batch, dev, folded, scorer)
            result[:] = out.cpu().numpy()
        elif dev.type == "cpu":
            _score_chunked(rows, torch.from_numpy(result), batch, dev, folded, scorer)
        else:
            out = torch.empty(n, dtype=torch.float32, device=dev)
            _score_chunked(rows, out, batch, dev, folded, scorer)
            result[:] = out.cpu().numpy()
    return result.reshape(lead)
