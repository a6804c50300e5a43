"""`bench-quant --recalibrate`: a small fit on a quantized level's hidden states so its scores track the reference's.

Also run by `benchmarks/recalibrate.py` (several splits). The pairs' queries are split in two
(seeded); on the calibration half a correction is fitted from the level's hidden states
towards the reference's (F16) logits, and both are compared on the held-out half with
`compare.fidelity`:

- `affine`: `a * logit + b` (least squares on the logits). Monotone, so it can only move
  score differences, never a ranking;
- `fc2`: the head's last layer refitted on the level's features `relu(fc1 h)`, ridge-regularised
  towards the released `fc2` (the strength picked by 4-fold validation, whole queries per fold, on the
  calibration half): it can reorder documents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from reranker.bench.compare import fidelity

LAMBDAS = tuple(10.0**k for k in range(-3, 5))


def query_split(groups: Sequence[int], seed: int = 0, share: float = 0.5) -> tuple[np.ndarray, list[int], list[int]]:
    """(per-pair mask of the calibration queries, calibration group sizes, held-out group sizes)."""
    rng = np.random.default_rng(seed)
    n_q = len(groups)
    calib_q = np.zeros(n_q, dtype=bool)
    calib_q[rng.permutation(n_q)[: max(1, int(round(share * n_q)))]] = True
    mask = np.repeat(calib_q, groups)
    return mask, [g for g, c in zip(groups, calib_q) if c], [g for g, c in zip(groups, calib_q) if not c]


def head_parts(head) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(W1 (H, H) out-by-in, b1, w2 (H,), b2, logit_bias) of a `ScoringHead`, float64."""
    w = head.weights()
    return (w.fc1_weight.double().numpy(), w.fc1_bias.double().numpy(), w.fc2_weight.double().numpy().reshape(-1),
            float(w.fc2_bias.double().numpy().reshape(-1)[0]), float(w.logit_bias))


def features(head, hidden: np.ndarray) -> np.ndarray:
    w1, b1, *_ = head_parts(head)
    return np.maximum(np.asarray(hidden, dtype=np.float64) @ w1.T + b1, 0.0)


def logits(head, hidden: np.ndarray) -> np.ndarray:
    _, _, w2, b2, bias = head_parts(head)
    return features(head, hidden) @ w2 + b2 - bias


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fit_affine(level_logits: np.ndarray, ref_logits: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising sum (a * level + b - ref)^2."""
    x = np.stack([level_logits, np.ones_like(level_logits)], axis=1)
    (a, b), *_ = np.linalg.lstsq(x, ref_logits, rcond=None)
    return float(a), float(b)


def _ridge(phi: np.ndarray, target: np.ndarray, w0: np.ndarray, b0: float, lam: float) -> tuple[np.ndarray, float]:
    """w, b minimising |phi w + b - target|^2 + lam |w - w0|^2 (the bias unpenalised)."""
    mu_phi, mu_t = phi.mean(axis=0), target.mean()
    pc, tc = phi - mu_phi, target - mu_t
    h = pc.shape[1]
    w = np.linalg.solve(pc.T @ pc + lam * np.eye(h), pc.T @ tc + lam * w0)
    return w, float(mu_t - mu_phi @ w)


def fit_fc2(phi: np.ndarray, target: np.ndarray, w0: np.ndarray, b0: float, groups: Sequence[int],
            lambdas: Sequence[float] = LAMBDAS, folds: int = 4) -> tuple[np.ndarray, float, float]:
    """Ridge refit of the last layer towards `target` logits; lambda by grouped k-fold validation."""
    fold_of_q = np.arange(len(groups)) % folds
    fold = np.repeat(fold_of_q, groups)
    best = None
    for lam in lambdas:
        err = 0.0
        for k in range(folds):
            tr, va = fold != k, fold == k
            if not va.any() or not tr.any():
                continue
            w, b = _ridge(phi[tr], target[tr], w0, b0, lam)
            err += float(np.sum((phi[va] @ w + b - target[va]) ** 2))
        if best is None or err < best[0]:
            best = (err, lam)
    lam = best[1]
    w, b = _ridge(phi, target, w0, b0, lam)
    return w, b, lam


def recalibrate(head, ref_hidden: np.ndarray, level_hidden: np.ndarray, groups: Sequence[int], seed: int = 0) -> dict:
    """Fidelity to the reference on held-out queries: before, after `affine`, after `fc2` (see the module doc)."""
    mask, calib_groups, held_groups = query_split(groups, seed)
    _, _, w2, b2, bias = head_parts(head)
    ref_l = logits(head, ref_hidden)
    phi = features(head, level_hidden)
    lvl_l = phi @ w2 + b2 - bias
    ref_held = sigmoid(ref_l[~mask])
    out: dict = {"calibration_pairs": int(mask.sum()), "held_out_pairs": int((~mask).sum()),
                 "calibration_queries": len(calib_groups), "held_out_queries": len(held_groups),
                 "before": fidelity(ref_held, sigmoid(lvl_l[~mask]), held_groups)}
    a, b = fit_affine(lvl_l[mask], ref_l[mask])
    out["affine"] = {"a": a, "b": b, **fidelity(ref_held, sigmoid(a * lvl_l[~mask] + b), held_groups)}
    w, c, lam = fit_fc2(phi[mask], ref_l[mask] + bias, w2, b2, calib_groups)
    out["fc2"] = {"lambda": lam, "relative_change": float(np.linalg.norm(w - w2) / np.linalg.norm(w2)),
                  **fidelity(ref_held, sigmoid(phi[~mask] @ w + c - bias), held_groups)}
    return out


def corrected_head(head, w2: np.ndarray, b2: float):
    """A copy of `head` whose last layer is `w2`, `b2` (float64 in, the head's float32 out)."""
    import torch

    from head import ScoringHead

    w = head.weights()
    return ScoringHead.from_weights(dataclasses.replace(
        w, fc2_weight=torch.as_tensor(w2, dtype=torch.float64).reshape(1, -1).float(),
        fc2_bias=torch.tensor([b2], dtype=torch.float64).float()))


def affine_head(head, a: float, b: float):
    """`head` with `a * logit + b` folded into its last layer: sigmoid(a * (fc2(.) - bias) + b)."""
    _, _, w2, b2, bias = head_parts(head)
    return corrected_head(head, a * w2, a * (b2 - bias) + b + bias)


def fit_corrections(head, ref_hidden: np.ndarray, level_hidden: np.ndarray, groups: Sequence[int]) -> dict:
    """Both corrections fitted on all of the given pairs, as heads: {"affine": head, "fc2": head}."""
    _, _, w2, b2, bias = head_parts(head)
    phi = features(head, level_hidden)
    ref_l = logits(head, ref_hidden)
    a, b = fit_affine(phi @ w2 + b2 - bias, ref_l)
    w, c, _ = fit_fc2(phi, ref_l + bias, w2, b2, groups)
    return {"affine": affine_head(head, a, b), "fc2": corrected_head(head, w, c)}
