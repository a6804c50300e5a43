"""A level's scores against the reference's and against relevance judgements: the numbers of `bench-quant`.

`fidelity`: rank correlation, per-query top-10 overlap, score differences and order flips against
the reference's scores (used for every level, and by `recalibrate.py` before and after each
correction); `retrieval_metrics`: nDCG@10, MRR@10 and Recall@100 from ir-measures.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from reranker.errors import RerankerError
from reranker.extras import install_hint

TOP_K = 10


def require_module(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RerankerError(f"reranker bench-quant needs {module.split('.')[0]}, which is not installed: {install_hint('bench')}") from e


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def fidelity(reference: np.ndarray, scores: np.ndarray, groups: Sequence[int], k: int = TOP_K) -> dict[str, float | None]:
    """How closely `scores` follow `reference` (same pairs, queries in `groups` consecutive slices).

    - `spearman`, `kendall` (tau-b): rank correlation over all pairs pooled;
    - `mean_abs_diff`, `max_abs_diff`: of the scores;
    - `top10_overlap`: |top-k ∩ reference top-k| / k per query, averaged over the queries with
      more than k candidates (with fewer, every candidate is in the top k): None when none has;
    - `order_flips`: share of the within-query document pairs ordered differently from the
      reference, a pair tied in one ordering and not the other counting one half; None when
      no query has two candidates.
    """
    stats = require_module("scipy.stats")
    ref, got = np.asarray(reference, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if ref.shape != got.shape or ref.ndim != 1 or sum(groups) != len(ref):
        raise RerankerError(f"scores of shape {got.shape} do not match the reference {ref.shape} and groups totalling {sum(groups)}")
    diff = np.abs(ref - got)
    out: dict[str, float | None] = {"spearman": None, "kendall": None}
    if len(ref) > 1:
        out["spearman"] = _none_if_nan(stats.spearmanr(ref, got).statistic)
        out["kendall"] = _none_if_nan(stats.kendalltau(ref, got).statistic)
    overlaps, flips, n_pairs = [], 0.0, 0
    start = 0
    for n in groups:
        r, g = ref[start : start + n], got[start : start + n]
        start += n
        if n > k:  # stable sorts: ties keep input order, the same rule for both
            top_r = set(np.argsort(-r, kind="stable")[:k].tolist())
            top_g = set(np.argsort(-g, kind="stable")[:k].tolist())
            overlaps.append(len(top_r & top_g) / k)
        if n > 1:
            flips += _flips(r, g)
            n_pairs += n * (n - 1) // 2
    out.update({
        "top10_overlap": float(np.mean(overlaps)) if overlaps else None,
        "mean_abs_diff": float(diff.mean()) if len(diff) else None,
        "max_abs_diff": float(diff.max()) if len(diff) else None,
        "order_flips": flips / n_pairs if n_pairs else None,
    })
    return out


def _flips(r: np.ndarray, g: np.ndarray, block: int = 2**20) -> float:
    """Order flips within one query (see `fidelity`), over row blocks of the pair matrix: memory stays at
    about `block` pairs, not n^2 (some 50 MB; 30,000 candidates took ~20 GB at once)."""
    n, total = len(r), 0.0
    rows = max(1, block // n)
    for start in range(0, n - 1, rows):
        i = np.arange(start, min(start + rows, n - 1))[:, None]
        j = np.arange(n)[None, :]
        upper = j > i  # each unordered pair once
        a, b = np.sign(r[i] - r[j]), np.sign(g[i] - g[j])
        total += float(np.sum((a * b < 0) & upper) + 0.5 * np.sum(((a == 0) != (b == 0)) & upper))
    return total


#: Report key -> ir-measures measure name (MRR@10 is ir-measures' RR@10).
RETRIEVAL_MEASURES = {"ndcg_at_10": "nDCG@10", "mrr_at_10": "RR@10", "recall_at_100": "R@100"}


def retrieval_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """nDCG@10, MRR@10 and Recall@100 from ir-measures, with trec_eval's definitions (linear
    gains; grade >= 1 is relevant), averaged over every judged query: one without candidates
    in `run` counts 0, as with `trec_eval -c`. None when there are no judgements.

    Tied scores are ordered as trec_eval orders them (document id, descending) for every
    measure: ir-measures' providers break ties differently (its RR@10 by ascending id), so the
    run is handed over as ranks, with no ties left."""
    ir_measures = require_module("ir_measures")
    measures = {key: ir_measures.parse_measure(name) for key, name in RETRIEVAL_MEASURES.items()}
    if not qrels:
        return {key: None for key in measures}
    run = {q: _trec_order(docs) for q, docs in run.items()}
    agg = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {key: _none_if_nan(agg[m]) for key, m in measures.items()}


def _trec_order(docs: dict[str, float]) -> dict[str, float]:
    """`{doc_id: score}` as `{doc_id: n - rank}` in trec_eval's order: score descending, then id descending."""
    order = sorted(((float(score), doc_id) for doc_id, score in docs.items()), reverse=True)
    return {doc_id: float(len(order) - rank) for rank, (_, doc_id) in enumerate(order)}
