"""The head's tensors in one canonical layout, and the checks every loader shares.

Each file format has its own names and orientation; loaders convert into
`HeadWeights` (torch Linear layout, float32, CPU) after these checks, so the
module itself never sees a malformed tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reranker.defaults import LOGIT_BIAS

from .errors import HeadLoadError


@dataclass(frozen=True)
class HeadWeights:
    """Validated head tensors: fc1 (H,H) out-by-in, fc1 bias (H,), fc2 (1,H), fc2 bias (1,)."""

    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor
    logit_bias: float

    @property
    def hidden_size(self) -> int:
        return int(self.fc1_weight.shape[0])

    def check(self, source: str = "HeadWeights") -> None:
        """Refuse tensors that are not one head's (shapes, float dtype) or hold NaN/inf, and a non-finite bias."""
        names = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
        tensors = {n: getattr(self, n) for n in names}
        for n, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise HeadLoadError(f"{source}: '{n}' must be a float tensor, got "
                                    f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        hidden = hidden_size_from(source, "fc1_weight", self.fc1_weight)
        check_shape(source, "fc1_bias", self.fc1_bias, [(hidden,)], "fc1_weight", hidden)
        check_shape(source, "fc2_weight", self.fc2_weight, [(1, hidden)], "fc1_weight", hidden)
        check_shape(source, "fc2_bias", self.fc2_bias, [(1,)], "fc1_weight", hidden)
        for n, t in tensors.items():
            check_finite(source, n, t)
        check_finite(source, "logit_bias", torch.tensor(float(self.logit_bias)))


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def as_float_tensor(source: str, name: str, value: object) -> torch.Tensor:
    """Convert one loaded array to a float32 CPU tensor, rejecting non-float data."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise HeadLoadError(
            f"{source}: '{name}' is a {type(value).__name__}, not a numeric array; "
            "re-export the head with plain float tensors"
        ) from exc
    if not t.is_floating_point():
        raise HeadLoadError(
            f"{source}: '{name}' has dtype {t.dtype}, expected a float dtype (float16/bfloat16/float32/float64); "
            "re-export the head with float weights"
        )
    # float32 holds float16/bfloat16 exactly; float64 overflow shows up as inf in check_finite.
    return t.detach().to(device="cpu", dtype=torch.float32)


def hidden_size_from(source: str, name: str, t: torch.Tensor) -> int:
    """H from the first-layer matrix, which must be square (H, H)."""
    if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
        raise HeadLoadError(
            f"{source}: '{name}' has shape {_fmt(t.shape)}, expected a square (H, H) matrix; "
            "the file is not a jina-reranker scoring head or is truncated — re-export it"
        )
    return int(t.shape[0])


def check_shape(
    source: str, name: str, t: torch.Tensor, allowed: Sequence[tuple[int, ...]], ref: str, hidden: int
) -> None:
    """Reject tensors whose shape disagrees with the hidden size taken from `ref`."""
    if tuple(t.shape) not in [tuple(a) for a in allowed]:
        want = " or ".join(_fmt(a) for a in allowed)
        raise HeadLoadError(
            f"{source}: '{name}' has shape {_fmt(t.shape)}, expected {want} for hidden size H={hidden} "
            f"(taken from '{ref}'); the tensors do not belong to one head — re-export them from a single checkpoint"
        )


def check_finite(source: str, name: str, t: torch.Tensor) -> None:
    """NaN/inf weights would silently turn every score into NaN, so refuse them at load time."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise HeadLoadError(
            f"{source}: '{name}' contains {bad} non-finite value(s) (NaN or inf); the weights are corrupt "
            "or a fine-tune diverged — re-export the head from a good checkpoint"
        )


def scalar_bias(source: str, name: str, t: torch.Tensor) -> float:
    """The logit bias is stored as a scalar or a one-element array."""
    if t.numel() != 1 or t.dim() > 1:
        raise HeadLoadError(
            f"{source}: '{name}' has shape {_fmt(t.shape)}, expected a scalar or shape (1,); "
            f"re-export it, or pass logit_bias={LOGIT_BIAS} explicitly"
        )
    check_finite(source, name, t)
    return float(t.reshape(()))


def require_keys(source: str, present: Sequence[str], needed: Sequence[str], hint: str) -> None:
    """Name every missing key at once, so one re-export fixes them all."""
    missing = [k for k in needed if k not in present]
    if missing:
        have = ", ".join(f"'{k}'" for k in list(present)[:8]) or "nothing"
        more = " ..." if len(present) > 8 else ""
        raise HeadLoadError(f"{source}: missing {', '.join(repr(k) for k in missing)} (found {have}{more}); {hint}")
