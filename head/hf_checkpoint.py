"""The original HF checkpoint naming: `score.0.*` (Linear H->H) and `score.2.*` (Linear H->1).

Reads only those tensors from a state dict, a `model.safetensors` file, a
directory holding one, a sharded `model.safetensors.index.json`, or a torch
`.bin`/`.pt` file; every other key (the backbone) is ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from .errors import HeadLoadError, describe_source
from .weights import (
    LOGIT_BIAS,
    HeadWeights,
    as_float_tensor,
    check_finite,
    check_shape,
    hidden_size_from,
    require_keys,
)

SUFFIXES = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
_SCORE_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)score\.[02]\.(?:weight|bias)$")
_FIX = (
    "pass the jina-reranker-m0 checkpoint (model.safetensors, its directory or model.safetensors.index.json) "
    "or a head written by ScoringHead.save_checkpoint"
)
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, KeyError, EOFError)

Getter = Callable[[str], object]
StateDictLike = Mapping[str, object]
#: A source's keys, how to read one, and its file metadata (a safetensors file's; {} for other sources).
Opened = tuple[list[str], Getter, Mapping[str, str]]


def _prefixes(keys: Sequence[str]) -> list[str]:
    return sorted({m["prefix"] for m in map(_SCORE_KEY.match, keys) if m})


def _pick_prefix(src: str, keys: Sequence[str], prefix: str | None) -> str:
    """Find the module prefix of the score tensors (e.g. '' or 'model.'), refusing to guess between several."""
    if prefix is not None:
        return prefix
    found = _prefixes(keys)
    if not found:
        raise HeadLoadError(
            f"{src}: no scoring-head tensors among its {len(keys)} keys (looked for "
            f"{', '.join(repr(s) for s in SUFFIXES)}, with any module prefix); {_FIX}"
        )
    if len(found) > 1:
        raise HeadLoadError(
            f"{src}: scoring-head tensors under several prefixes {found}; pass prefix=... to choose one"
        )
    return found[0]


def _safetensors_getter(src: str, path: str) -> Opened:
    try:
        with safe_open(path, framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
    except _READ_ERRORS as exc:
        raise HeadLoadError(f"{src}: is not a readable safetensors file ({exc}); {_FIX}") from exc

    def get(key: str) -> object:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)

    return keys, get, metadata


def _index_getter(src: str, index_path: str) -> Opened:
    try:
        with open(index_path, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        keys = list(weight_map)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadLoadError(
            f"{src}: is not a valid safetensors index (needs a JSON object with 'weight_map'): {exc}; {_FIX}"
        ) from exc
    root = os.path.dirname(os.path.abspath(index_path))

    def get(key: str) -> object:
        shard = os.path.join(root, weight_map[key])
        if not os.path.isfile(shard):
            raise HeadLoadError(f"{src}: shard '{shard}' holding '{key}' is missing; download it next to the index")
        return _safetensors_getter(describe_source(shard), shard)[1](key)

    return keys, get, {}


def _torch_getter(src: str, path: str) -> Opened:
    try:
        # weights_only: never run arbitrary pickled code from a downloaded checkpoint.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for a bad pickle
        raise HeadLoadError(f"{src}: cannot be read as a torch state dict ({exc}); {_FIX}") from exc
    if not isinstance(sd, Mapping):
        raise HeadLoadError(f"{src}: holds a {type(sd).__name__}, not a state dict; {_FIX}")
    return list(sd), sd.__getitem__, {}


def _resolve(source: str) -> tuple[str, list[str], Getter, Mapping[str, str]]:
    src = describe_source(source)
    if os.path.isdir(source):
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"):
            candidate = os.path.join(source, name)
            if os.path.isfile(candidate):
                return _resolve(candidate)
        raise HeadLoadError(
            f"{src}: directory holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin; {_FIX}"
        )
    if not os.path.exists(source):
        raise HeadLoadError(f"{src}: file not found; {_FIX}")
    if source.endswith(".json"):
        return (src, *_index_getter(src, source))
    if source.endswith((".bin", ".pt", ".pth")):
        return (src, *_torch_getter(src, source))
    return (src, *_safetensors_getter(src, source))


def _stored_bias(src: str, metadata: Mapping[str, str]) -> float | None:
    """The logit bias `ScoringHead.save_checkpoint` keeps in a safetensors file's metadata, or None."""
    value = metadata.get("logit_bias")
    if value is None:
        return None
    try:
        bias = float(value)
    except ValueError:
        bias = float("nan")
    if not math.isfinite(bias):
        raise HeadLoadError(f"{src}: its metadata holds logit_bias={value!r}, not a finite number; "
                            f"pass logit_bias=... to override it ({LOGIT_BIAS} is the model's)")
    return bias


def read_checkpoint(
    source: StateDictLike | str | os.PathLike[str], logit_bias: float | None = None, prefix: str | None = None
) -> HeadWeights:
    """Load and validate the `score.*` tensors; `prefix` picks e.g. 'model.' when several are present.

    `logit_bias` None: the one `ScoringHead.save_checkpoint` stored in the file's metadata, else the model's 2.65.
    """
    if isinstance(source, (str, os.PathLike)):
        src, keys, get, metadata = _resolve(os.fspath(source))
        if logit_bias is None:
            logit_bias = _stored_bias(src, metadata)
    elif isinstance(source, Mapping):
        src, keys, get = describe_source(source), list(source), source.__getitem__
    else:
        raise HeadLoadError(f"from_checkpoint expects a path or a state dict, got {type(source).__name__}; {_FIX}")

    pre = _pick_prefix(src, keys, prefix)
    names = [pre + s for s in SUFFIXES]
    require_keys(src, keys, names, f"a complete head needs all four score tensors; {_FIX}")
    try:
        t = {s: as_float_tensor(src, n, get(n)) for s, n in zip(SUFFIXES, names)}
    except HeadLoadError:
        raise
    except _READ_ERRORS as exc:
        raise HeadLoadError(f"{src}: failed to read the score tensors ({exc}); {_FIX}") from exc

    w1, b1, w2, b2 = names
    hidden = hidden_size_from(src, w1, t["score.0.weight"])
    check_shape(src, b1, t["score.0.bias"], [(hidden,)], w1, hidden)
    check_shape(src, w2, t["score.2.weight"], [(1, hidden)], w1, hidden)
    check_shape(src, b2, t["score.2.bias"], [(1,)], w1, hidden)
    for s, n in zip(SUFFIXES, names):
        check_finite(src, n, t[s])
    return HeadWeights(
        fc1_weight=t["score.0.weight"],
        fc1_bias=t["score.0.bias"],
        fc2_weight=t["score.2.weight"],
        fc2_bias=t["score.2.bias"],
        logit_bias=float(LOGIT_BIAS if logit_bias is None else logit_bias),
    )
