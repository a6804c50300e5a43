"""The scoring head as a torch module: probability = sigmoid(fc2(relu(fc1(h))) - logit_bias)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import DTypeLike
from safetensors import SafetensorError, safe_open
from torch import nn

from reranker.errors import RerankerError

from .errors import HeadLoadError
from .hf_checkpoint import SUFFIXES, read_checkpoint
from .npz_format import read_npz, write_npz
from .safetensors_format import read_safetensors, write_safetensors
from .weights import LOGIT_BIAS, HeadWeights

PathLike = str | os.PathLike[str]


class ScoringHead(nn.Module):
    """jina-reranker-m0 relevance head: maps (..., H) last-token hidden states to (...) probabilities.

    `state_dict()` uses natural names (fc1.*, fc2.*, logit_bias); `original_state_dict()`
    and `from_checkpoint()` speak the HF checkpoint's `score.0.*` / `score.2.*` names.
    """

    logit_bias: torch.Tensor

    def __init__(self, hidden_size: int, logit_bias: float = LOGIT_BIAS) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise RerankerError(f"ScoringHead: hidden_size={hidden_size!r} is invalid; it must be an integer >= 1 "
                                "(the backbone's hidden size, 1536 for jina-reranker-m0)")
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, 1)
        # A buffer, not a parameter: it is a fixed calibration constant that fine-tuning must not move.
        self.register_buffer("logit_bias", torch.tensor(_finite_bias(logit_bias), dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        bias = self.logit_bias
        super()._apply(fn, recurse)
        # Devices apply, dtypes do not: `.bfloat16()` would round 2.65 to 2.65625 for good (and into saved files).
        if self.logit_bias.dtype != bias.dtype:
            self._buffers["logit_bias"] = bias.to(self.logit_bias.device)
        return self

    @property
    def hidden_size(self) -> int:
        """H, the embedding size the head accepts."""
        return self.fc1.in_features

    def extra_repr(self) -> str:
        bias = "(meta)" if self.logit_bias.is_meta else f"{float(self.logit_bias):.4g}"
        return f"hidden_size={self.hidden_size}, logit_bias={bias}"

    # -- compute ---------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise RerankerError(f"ScoringHead takes a torch tensor of shape (..., {self.hidden_size}), got "
                                f"{type(x).__name__}; wrap a numpy array with torch.from_numpy, or use head.score_embeddings")
        if not x.is_floating_point():
            raise RerankerError(f"ScoringHead takes float embeddings, got dtype {x.dtype}; convert them first (x.float())")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            got = "a scalar" if x.dim() == 0 else f"last dimension {x.shape[-1]} (shape {tuple(x.shape)})"
            raise RerankerError(f"ScoringHead expected inputs of shape (..., {self.hidden_size}), got {got}; pass the hidden "
                                f"states of the backbone this head belongs to (hidden size {self.hidden_size})")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw scores of shape (...): fc2(relu(fc1(x))) - logit_bias, before the sigmoid, in the head's dtype."""
        z = self._logits32(x)
        return z.to(self.fc1.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Relevance probabilities of shape (...) for embeddings of shape (..., H), in the head's dtype."""
        return torch.sigmoid(self._logits32(x)).to(self.fc1.weight.dtype)

    def _logits32(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        w = self.fc1.weight
        # The mat-muls in the head's dtype, so e.g. fp16 embeddings work on an fp32 head; the bias and the
        # sigmoid in float32 at least, so a bf16 head rounds once, at the end, not the bias and the logit too.
        z = self.fc2(F.relu(self.fc1(x.to(device=w.device, dtype=w.dtype)))).squeeze(-1)
        return z.to(torch.promote_types(z.dtype, torch.float32)) - self.logit_bias

    # -- conversion ------------------------------------------------------------------------

    def weights(self) -> HeadWeights:
        """The current parameters in the canonical layout the file writers take."""
        return HeadWeights(
            fc1_weight=self.fc1.weight.detach(),
            fc1_bias=self.fc1.bias.detach(),
            fc2_weight=self.fc2.weight.detach(),
            fc2_bias=self.fc2.bias.detach(),
            logit_bias=float(self.logit_bias),
        )

    @classmethod
    def from_weights(cls, weights: HeadWeights) -> "ScoringHead":
        """Build a float32 CPU head holding exactly `weights` (checked: shapes of one head, finite values)."""
        weights.check()
        # fork_rng: the throwaway random init must not advance the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            head = cls(weights.hidden_size, weights.logit_bias)
        with torch.no_grad():
            head.fc1.weight.copy_(weights.fc1_weight)
            head.fc1.bias.copy_(weights.fc1_bias)
            head.fc2.weight.copy_(weights.fc2_weight)
            head.fc2.bias.copy_(weights.fc2_bias)
        return head

    def original_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters under the HF names (`score.0.weight` ...), for loading back into the original model."""
        w = self.weights()
        tensors = (w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias)
        return {prefix + name: t.clone() for name, t in zip(SUFFIXES, tensors)}

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_npz(cls, path: PathLike, logit_bias: float | None = None) -> "ScoringHead":
        """Load the release `mlp_weights.npz` (float16/32/64, plain or compressed, W2 as (H,1) or (H,))."""
        return cls.from_weights(read_npz(path, logit_bias))

    @classmethod
    def from_safetensors(cls, path: PathLike) -> "ScoringHead":
        """Load a head written by `save_safetensors`."""
        return cls.from_weights(read_safetensors(path))

    @classmethod
    def from_checkpoint(
        cls,
        path_or_state_dict: PathLike | Mapping[str, torch.Tensor],
        logit_bias: float | None = None,
        prefix: str | None = None,
    ) -> "ScoringHead":
        """Load `score.0.*`/`score.2.*` from a state dict, model.safetensors, its directory or a sharded index.

        Other keys are ignored; a module prefix such as `model.` is found automatically or given by `prefix`.
        `logit_bias`: None takes the one `save_checkpoint` stored in the file's metadata, else 2.65 (the model's).
        """
        return cls.from_weights(read_checkpoint(path_or_state_dict, logit_bias, prefix))

    @classmethod
    def load(cls, path: PathLike) -> "ScoringHead":
        """Load any supported file: .npz, this package's .safetensors, or an original checkpoint."""
        p = os.fspath(path)
        if p.endswith(".npz"):
            return cls.from_npz(p)
        if p.endswith(".safetensors") and os.path.isfile(p) and _is_own_safetensors(p):
            return cls.from_safetensors(p)
        return cls.from_checkpoint(p)

    # -- saving ----------------------------------------------------------------------------

    def save_safetensors(self, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write the natural state_dict (fc1.*, fc2.*, logit_bias) with optional string metadata."""
        meta = {"head": "jina-reranker-m0 scoring head", "hidden_size": str(self.hidden_size), **(metadata or {})}
        write_safetensors(path, self.state_dict(), meta)

    def save_checkpoint(self, path: PathLike, prefix: str = "") -> None:
        """Write `score.*` tensors as safetensors, ready to merge into the original model's weights."""
        write_safetensors(path, self.original_state_dict(prefix), {"logit_bias": str(float(self.logit_bias))})

    def save_npz(self, path: PathLike, dtype: DTypeLike = np.float32, compressed: bool = False) -> None:
        """Write the release npz layout (W1 = fc1.weight.T, W2 (H,1), b2 (1,), logit_bias (1,))."""
        write_npz(path, self.weights(), dtype, compressed)


def _finite_bias(value: object) -> float:
    try:
        bias = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        bias = float("nan")
    if not np.isfinite(bias):
        raise RerankerError(f"ScoringHead: logit_bias={value!r} is not a finite number; pass a float "
                            f"(jina-reranker-m0's is {LOGIT_BIAS})")
    return bias


def _is_own_safetensors(path: str) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            return "fc1.weight" in f.keys()
    except (SafetensorError, OSError) as exc:
        raise HeadLoadError(
            f"'{path}': is not a readable safetensors file ({exc}); pass a head or checkpoint .safetensors file"
        ) from exc
