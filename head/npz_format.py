"""The release `mlp_weights.npz` layout: W1 (H,H) in-by-out, b1 (H,), W2 (H,1) or (H,), b2 (1,), logit_bias (1,)."""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np
import torch
from numpy.typing import DTypeLike

from reranker.atomic import atomic_write
from reranker.errors import RerankerError

from ._files import existing_file
from .errors import HeadLoadError, describe_source
from .weights import (
    HeadWeights,
    as_float_tensor,
    check_finite,
    check_shape,
    hidden_size_from,
    require_keys,
    scalar_bias,
)

_FIX = "pass the release 'mlp_weights.npz' or a file written by ScoringHead.save_npz"
_CORRUPT = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError)


def _open(path: str) -> "np.lib.npyio.NpzFile":
    src = describe_source(path)
    with open(path, "rb") as fh:
        magic = fh.read(6)
    # np.load would fall back to unpickling anything that is neither zip nor .npy; classify first.
    if magic.startswith(b"\x93NUMPY"):
        raise HeadLoadError(
            f"{src}: is a single .npy array, not an .npz archive with W1, b1, W2, b2, logit_bias; {_FIX}"
        )
    if not magic.startswith(b"PK"):
        raise HeadLoadError(
            f"{src}: is not an .npz archive (no zip signature; empty, corrupt or another format); {_FIX}"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except _CORRUPT as exc:
        raise HeadLoadError(f"{src}: is a corrupt .npz archive ({exc}); download or export it again") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise HeadLoadError(f"{src}: is not an .npz archive; {_FIX}")
    return data


def _check_size(data: "np.lib.npyio.NpzFile", src: str, key: str) -> None:
    """The member's .npy header claims no more bytes than the member holds.

    np.load allocates the header's shape before reading a byte, so a crafted header claiming
    (200000, 200000) would be a MemoryError (or 160 GB of memory) instead of a clear error.
    """
    name = key + ".npy" if key + ".npy" in data.zip.namelist() else key
    try:
        info = data.zip.getinfo(name)
        with data.zip.open(name) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                return  # another .npy version: np.load checks it
            header = fh.tell()
    except _CORRUPT as exc:
        raise HeadLoadError(f"{src}: '{key}' is corrupt ({exc}); download or export the file again") from exc
    if dtype.hasobject:
        return  # pickled objects: _member refuses them with its own message
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed > info.file_size - header:
        raise HeadLoadError(f"{src}: '{key}' claims shape {tuple(shape)} ({claimed} bytes of {dtype}) but holds "
                            f"{info.file_size - header} bytes; the file is corrupt or crafted: download or export it again")


def _member(data: "np.lib.npyio.NpzFile", src: str, key: str) -> np.ndarray:
    _check_size(data, src, key)
    try:
        return data[key]
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise HeadLoadError(
                f"{src}: '{key}' holds pickled Python objects (dtype=object), which are never unpickled for safety; "
                "re-save it with np.savez from plain float arrays"
            ) from exc
        raise HeadLoadError(f"{src}: '{key}' is corrupt ({exc}); download or export the file again") from exc
    except _CORRUPT as exc:
        raise HeadLoadError(f"{src}: '{key}' is corrupt ({exc}); download or export the file again") from exc


def read_npz(path: str | os.PathLike[str], logit_bias: float | None = None) -> HeadWeights:
    """Load and validate a release-layout npz; `logit_bias` overrides (or replaces a missing) stored value."""
    p = existing_file(path, "an .npz file", _FIX)
    src = describe_source(p)
    needed = ["W1", "b1", "W2", "b2"] + ([] if logit_bias is not None else ["logit_bias"])
    with _open(p) as data:
        hint = "this is not a jina-reranker head npz" + (
            ""
            if "logit_bias" in data.files or logit_bias is not None
            else " (or pass logit_bias=2.65 if only the bias is missing)"
        )
        require_keys(src, data.files, needed, hint)
        t = {k: as_float_tensor(src, k, _member(data, src, k)) for k in needed}

    hidden = hidden_size_from(src, "W1", t["W1"])
    check_shape(src, "b1", t["b1"], [(hidden,)], "W1", hidden)
    check_shape(src, "W2", t["W2"], [(hidden, 1), (hidden,)], "W1", hidden)
    check_shape(src, "b2", t["b2"], [(1,), ()], "W1", hidden)
    for k in ("W1", "b1", "W2", "b2"):
        check_finite(src, k, t[k])
    bias = float(logit_bias) if logit_bias is not None else scalar_bias(src, "logit_bias", t["logit_bias"])
    return HeadWeights(
        fc1_weight=t["W1"].T.contiguous(),  # npz multiplies x @ W1; torch Linear stores the transpose
        fc1_bias=t["b1"],
        fc2_weight=t["W2"].reshape(1, hidden),
        fc2_bias=t["b2"].reshape(1),
        logit_bias=bias,
    )


def write_npz(
    path: str | os.PathLike[str], weights: HeadWeights, dtype: DTypeLike = np.float32, compressed: bool = False
) -> None:
    """Write the exact release layout, readable by the upstream numpy snippet."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise RerankerError(f"save_npz: dtype {dtype!r} is not a numpy dtype ({exc}); pass np.float32 (default) or np.float16") from exc
    if dt.kind != "f":
        raise RerankerError(f"save_npz: dtype {dt} is not a float dtype; pass np.float32 (default) or np.float16, "
                            "as the release's mlp_weights.npz")

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().astype(dt)

    arrays = {
        "W1": arr(weights.fc1_weight).T.copy(),
        "b1": arr(weights.fc1_bias),
        "W2": arr(weights.fc2_weight).reshape(-1, 1),
        "b2": arr(weights.fc2_bias).reshape(1),
        # Kept at least float32: a float16 2.65 would shift every logit by 4e-4.
        "logit_bias": np.array([weights.logit_bias], dtype=np.promote_types(dt, np.float32)),
    }
    with atomic_write(path) as fh:
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)
