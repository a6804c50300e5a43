"""The recalibration experiment's fits (`reranker.bench.recalibrate`), on data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from head import ScoringHead
from reranker.bench.recalibrate import fit_affine, fit_fc2, head_parts, logits, query_split, recalibrate

pytest.importorskip("scipy")


def test_query_split_keeps_queries_whole():
    groups = [3, 5, 2, 4, 6, 1]
    mask, calib, held = query_split(groups, seed=1)
    assert len(mask) == sum(groups) and sorted(calib + held) == sorted(groups) and len(calib) == 3
    start = 0
    for g in groups:
        assert len(set(mask[start : start + g].tolist())) == 1
        start += g


def test_logits_equal_the_torch_head():
    torch.manual_seed(0)
    head = ScoringHead(16)
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    np.testing.assert_allclose(logits(head, x), head.logits(torch.from_numpy(x)).detach().double().numpy(), atol=1e-5)


def test_fits_recover_a_known_correction():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(400)
    a, b = fit_affine(x, 0.7 * x - 0.3)
    assert a == pytest.approx(0.7) and b == pytest.approx(-0.3)
    phi = np.maximum(rng.standard_normal((400, 8)), 0)
    w0, w_true = rng.standard_normal(8), rng.standard_normal(8)
    w, c, lam = fit_fc2(phi, phi @ w_true + 0.5, w0, 0.0, [20] * 20)
    assert lam <= 1e-2 and np.allclose(w, w_true, atol=1e-3) and c == pytest.approx(0.5, abs=1e-3)


def test_recalibrate_undoes_a_systematic_shift_but_not_noise():
    torch.manual_seed(0)
    head = ScoringHead(16)
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((640, 16)).astype(np.float32)
    groups = [16] * 40
    # a level whose states are shrunk and shifted along the head's own direction: an affine error in the logit
    w2 = head_parts(head)[2]
    shifted = ref * 0.9 + 0.05
    out = recalibrate(head, ref, shifted, groups, seed=0)
    assert out["affine"]["mean_abs_diff"] < 0.5 * out["before"]["mean_abs_diff"]
    assert out["affine"]["spearman"] == pytest.approx(out["before"]["spearman"])  # monotone: the ranking stays
    assert len(w2) == 16 and out["calibration_queries"] == out["held_out_queries"] == 20
    # pure per-pair noise cannot be learned from other pairs: nothing improves much on held-out queries
    noisy = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)
    out = recalibrate(head, ref, noisy, groups, seed=0)
    assert out["fc2"]["spearman"] < out["before"]["spearman"] + 0.02


def test_corrections_fold_into_a_head():
    from reranker.bench.recalibrate import affine_head, fit_corrections

    torch.manual_seed(0)
    head = ScoringHead(16)
    x = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
    np.testing.assert_allclose(logits(affine_head(head, 0.8, 0.25), x), 0.8 * logits(head, x) + 0.25, atol=1e-5)
    heads = fit_corrections(head, x, x * 0.9, [16] * 4)
    for fitted in heads.values():  # fitted towards the reference: closer than the uncorrected level, in-sample
        assert np.abs(logits(fitted, x * 0.9) - logits(head, x)).mean() < np.abs(logits(head, x * 0.9) - logits(head, x)).mean()


@pytest.mark.slow
def test_bench_quant_recalibrate_reports_and_writes_heads(small_f16, tmp_path):
    import json

    from reranker.cli import main

    out = tmp_path / "bench"
    assert main(["bench-quant", str(small_f16), "--synthetic", "64", "--levels", "Q4_K_M", "--recalibrate", "-o", str(out),
                 "--batch-size", "64", "--warmup", "0", "--no-progress", "--threads", "1"]) == 0
    report = json.loads((out / "bench_quant.json").read_text())
    ref, q4 = report["levels"]
    assert "recalibrated" not in ref and q4["recalibrated"]["held_out_queries"] == 2
    for kind in ("before", "affine", "fc2"):
        assert 0 < q4["recalibrated"][kind]["mean_abs_diff"] < 1
    assert "| Q4_K_M | affine |" in (out / "bench_quant.md").read_text()
    # the written affine head is the level's head with the fitted a*logit+b folded in
    head = ScoringHead.from_npz(small_f16.parent / "mlp_weights.npz")
    fitted = ScoringHead.from_npz(q4["recalibrated"]["affine"]["head"])
    hidden = np.load(out / "work" / "Q4_K_M" / "hidden.npy")
    scores = np.load(out / "work" / "Q4_K_M" / "scores.npy")
    np.testing.assert_allclose(torch.sigmoid(head.logits(torch.from_numpy(hidden))).detach().numpy(), scores, atol=1e-6)
    ref_scores = np.load(out / "work" / "F16" / "scores.npy")
    after = torch.sigmoid(fitted.logits(torch.from_numpy(hidden))).detach().numpy()
    assert np.abs(after - ref_scores).mean() < np.abs(scores - ref_scores).mean()
