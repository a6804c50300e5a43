"""Inference-only scoring in one function: relu, both matmuls, the folded bias and the sigmoid.

Folding `logit_bias` into the last bias removes one elementwise pass, and
keeping the whole head in one function lets torch.compile fuse the relu and
sigmoid into the matmul epilogues on CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import ScoringHead


def fused_scores(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """sigmoid(relu(x @ w1.T + b1) @ w2.T + b2) for x (n, H); `b2` already has the logit bias subtracted."""
    # In-place relu: the (n, H) activation is the largest tensor here; a second one costs ~5% on CPU.
    h = F.linear(x.to(w1.dtype), w1, b1).relu_()
    return torch.sigmoid(F.linear(h, w2, b2)).squeeze(-1)


@dataclass(frozen=True)
class FoldedHead:
    """A head's parameters detached on one device, with `b2 - logit_bias` precomputed."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @classmethod
    def from_head(cls, head: "ScoringHead", device: torch.device) -> "FoldedHead":
        dtype = head.fc1.weight.dtype
        # Fold in float64 so the subtraction adds no rounding beyond the final cast.
        b2 = head.fc2.bias.detach().cpu().double() - float(head.logit_bias)
        return cls(
            w1=head.fc1.weight.detach().to(device),
            b1=head.fc1.bias.detach().to(device),
            w2=head.fc2.weight.detach().to(device),
            b2=b2.to(device=device, dtype=dtype),
        )

    def __call__(self, x: torch.Tensor, fn: Callable[..., torch.Tensor] = fused_scores) -> torch.Tensor:
        return fn(x, self.w1, self.b1, self.w2, self.b2)


class FusedScorer:
    """`fused_scores`, optionally through torch.compile, dropping to eager for good if compilation fails."""

    def __init__(self, compile: bool) -> None:
        self._fn: Callable[..., torch.Tensor] = fused_scores
        self.compiled = False
        if compile:
            try:
                self._fn = torch.compile(fused_scores, dynamic=None)
                self.compiled = True
            except Exception as exc:  # e.g. an unsupported Python; scoring must still work
                warnings.warn(f"torch.compile unavailable ({exc}); scoring in eager mode", RuntimeWarning, stacklevel=2)

    def __call__(self, x: torch.Tensor, folded: FoldedHead) -> torch.Tensor:
        if self.compiled:
            try:
                return folded(x, self._fn)
            except Exception as exc:  # compilation happens lazily, on the first call
                warnings.warn(f"torch.compile failed ({exc}); scoring in eager mode", RuntimeWarning, stacklevel=2)
                self._fn, self.compiled = fused_scores, False
        return folded(x)


_SCORERS: dict[bool, FusedScorer] = {}


def get_scorer(compile: bool) -> FusedScorer:
    """One scorer per mode per process, so compiled graphs are reused across calls."""
    if compile not in _SCORERS:
        _SCORERS[compile] = FusedScorer(compile)
    return _SCORERS[compile]
