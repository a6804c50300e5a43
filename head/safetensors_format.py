"""This package's own safetensors layout: the module's natural state_dict keys plus `logit_bias`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from reranker.atomic import atomic_path

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

KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "logit_bias")
_FIX = "pass a file written by ScoringHead.save_safetensors"
_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def read_safetensors(path: str | os.PathLike[str]) -> HeadWeights:
    """Load and validate a head saved by `write_safetensors`."""
    p = existing_file(path, "a .safetensors file", _FIX)
    src = describe_source(p)
    try:
        with safe_open(p, framework="pt") as f:
            present = list(f.keys())
            hint = "this is not a head saved by ScoringHead.save_safetensors"
            if any(k.endswith("score.0.weight") for k in present):
                hint = "it looks like an original checkpoint with score.* names — use ScoringHead.from_checkpoint"
            require_keys(src, present, KEYS, hint)
            raw = {k: f.get_tensor(k) for k in KEYS}
    except HeadLoadError:
        raise
    except _ERRORS as exc:
        raise HeadLoadError(f"{src}: is not a readable safetensors file ({exc}); {_FIX}") from exc
    t = {k: as_float_tensor(src, k, v) for k, v in raw.items()}

    hidden = hidden_size_from(src, "fc1.weight", t["fc1.weight"])
    check_shape(src, "fc1.bias", t["fc1.bias"], [(hidden,)], "fc1.weight", hidden)
    check_shape(src, "fc2.weight", t["fc2.weight"], [(1, hidden)], "fc1.weight", hidden)
    check_shape(src, "fc2.bias", t["fc2.bias"], [(1,)], "fc1.weight", hidden)
    for k in KEYS[:4]:
        check_finite(src, k, t[k])
    return HeadWeights(
        fc1_weight=t["fc1.weight"],
        fc1_bias=t["fc1.bias"],
        fc2_weight=t["fc2.weight"],
        fc2_bias=t["fc2.bias"],
        logit_bias=scalar_bias(src, "logit_bias", t["logit_bias"]),
    )


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors (CPU, contiguous copies) with string metadata, atomically."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=meta)
