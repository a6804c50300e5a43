"""Outputs of `reranker bench-quant`: a markdown table, a JSON file with every number, a PNG plot."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reranker.bench.quant import BenchReport
from reranker.errors import RerankerError
from reranker.extras import install_hint

JSON_VERSION = 1

#: (row key, column header, number format): the table's columns, in order.
COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("level", "level", str),
    ("file_mb", "file MB", "{:.1f}".format),
    ("load_s", "load s", "{:.2f}".format),
    ("peak_host_mb", "peak host MB", "{:.0f}".format),
    ("gpu_mem_mb", "GPU MB", "{:.0f}".format),
    ("pairs_per_s", "pairs/s", "{:.1f}".format),
    ("tokens_per_s", "tokens/s", "{:.0f}".format),
    ("spearman", "Spearman", "{:.4f}".format),
    ("kendall", "Kendall", "{:.4f}".format),
    ("top10_overlap", "top-10 overlap", "{:.3f}".format),
    ("mean_abs_diff", "mean abs diff", "{:.2e}".format),
    ("max_abs_diff", "max abs diff", "{:.2e}".format),
    ("order_flips", "order flips", "{:.4f}".format),
    ("ndcg_at_10", "nDCG@10", "{:.4f}".format),
    ("mrr_at_10", "MRR@10", "{:.4f}".format),
    ("recall_at_100", "Recall@100", "{:.4f}".format),
]
#: The vision projector's table: its levels measured with the reference backbone on image documents.
PROJECTOR_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    c for c in COLUMNS if c[0] in ("level", "file_mb", "load_s", "peak_host_mb", "gpu_mem_mb")
] + [("images_per_s", "images/s", "{:.2f}".format)] + [
    c for c in COLUMNS if c[0] in ("spearman", "kendall", "top10_overlap", "mean_abs_diff", "max_abs_diff", "order_flips")
]
OUTPUT_NAMES = {"markdown": "bench_quant.md", "json": "bench_quant.json", "plot": "bench_quant.png", "scores": "scores.npz"}


def _cell(value: Any, fmt: Callable[[Any], str]) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt(value)


def markdown_table(report: BenchReport, rows: list[dict[str, Any]] | None = None, columns=COLUMNS) -> str:
    """One row per level (default: the backbone's), every column of `columns` ("–" where a number does not apply)."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "| " + " | ".join("---" if key == "level" else "---:" for key, _, _ in columns) + " |"]
    for row in report.rows if rows is None else rows:
        name = row["level"] + (" (ref)" if row.get("reference") else "")
        cells = [name] + [_cell(row.get(key), fmt) for key, _, fmt in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [row for row in (report.rows if rows is None else rows) if row.get("error")]
    lines += [""] * bool(failed) + [f"{row['level']} failed: {row['error'].splitlines()[0]}" for row in failed]
    return "\n".join(lines) + "\n"


def failed_levels(report: BenchReport) -> list[str]:
    """The levels (backbone and projector) that could not be made or measured."""
    return [row["level"] for row in [*report.rows, *report.projector_rows] if row.get("error")]


def projector_table(report: BenchReport) -> str:
    """The vision projector's levels (`PROJECTOR_COLUMNS`) with a line on how they were measured; "" without."""
    if not report.projector_rows:
        return ""
    im, st = report.image_set, report.settings
    return "\n".join([
        f"Vision projector levels, each with the backbone `{Path(st['mmproj_backbone']).name}`, on {im['kind']} "
        f"`{im['source']}` ({im['pairs']} image documents, {im['queries']} queries); drift against the F32 projector. "
        "images/s: pairs with one image each, encoding and decoding.",
        "",
        markdown_table(report, report.projector_rows, PROJECTOR_COLUMNS),
    ])


RECALIBRATION_KEYS = ("spearman", "kendall", "top10_overlap", "order_flips", "mean_abs_diff", "max_abs_diff")


def recalibration_table(report: BenchReport) -> str:
    """Held-out fidelity of each quantized level before and after each correction (`--recalibrate`); "" without."""
    rows = [r for r in report.rows if r.get("recalibrated")]
    if not rows:
        return ""
    fmts = {key: fmt for key, _, fmt in COLUMNS}
    headers = {key: header for key, header, _ in COLUMNS}
    first = rows[0]["recalibrated"]
    lines = [f"Recalibrated towards the reference on {first['calibration_queries']} queries ({first['calibration_pairs']} "
             f"pairs), measured on the other {first['held_out_queries']} ({first['held_out_pairs']} pairs). affine: "
             "a * logit + b; fc2: the head's last layer refitted (ridge towards the original). Heads fitted on all pairs: "
             "recalibrated/LEVEL-CORRECTION-mlp_weights.npz.",
             "",
             "| level | correction | " + " | ".join(headers[k] for k in RECALIBRATION_KEYS) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in RECALIBRATION_KEYS) + " |"]
    for row in rows:
        for kind in ("before", "affine", "fc2"):
            got = row["recalibrated"][kind]
            lines.append(f"| {row['level']} | {kind} | " + " | ".join(_cell(got.get(k), fmts[k]) for k in RECALIBRATION_KEYS) + " |")
    return "\n".join(lines) + "\n"


def markdown(report: BenchReport) -> str:
    """The table with a short header: evaluation set, reference, machine."""
    env, ev, st = report.environment, report.eval_set, report.settings
    lines = []
    if ev is not None:
        judged = f", {ev['judgements']} judgements" if ev.get("judgements") else ", no judgements"
        lines += [f"Evaluation set: {ev['kind']} `{ev['source']}` ({ev['queries']} queries, {ev['pairs']} pairs{judged}).",
                  *[f"Note: {n}." for n in ev.get("notes", [])]]
    lines += [
        f"Reference: {st['reference']} `{Path(st['reference_path']).name}`. Device: {env['device']}; CPU: {env['cpu']} "
        f"({env['threads']} threads); llama-cpp-python {env['llama_cpp_python']}, torch {env['torch']}.",
        f"Scoring: `Reranker.compute_score`, batch_size={st['batch_size']}, n_batch={st['n_batch'] or 'the device default'}, "
        f"after a {st['warmup']}-pair warm-up; each level in a fresh process.",
    ]
    if report.rows:
        lines += ["", markdown_table(report)]
    recal = recalibration_table(report)
    projectors = projector_table(report)
    return "\n".join(lines + (["", recal] if recal else []) + (["", projectors] if projectors else []))


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(report: BenchReport) -> dict[str, Any]:
    """Every number of the run, with the evaluation set, the settings and the environment."""
    return _clean({
        "version": JSON_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "columns": {key: header for key, header, _ in COLUMNS},
        "eval_set": report.eval_set,
        "settings": report.settings,
        "environment": report.environment,
        "levels": report.rows,
        "projector_columns": {key: header for key, header, _ in PROJECTOR_COLUMNS},
        "image_set": report.image_set,
        "projector_levels": report.projector_rows,
    })


def plot(report: BenchReport, path: str | os.PathLike) -> Path:
    """Quality against throughput, one point per level, point area proportional to file size.

    Quality is nDCG@10 when the set has judgements, else Spearman correlation with the reference.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RerankerError(f"the bench-quant plot needs matplotlib, which is not installed: {install_hint('bench')}") from e
    rows = [r for r in report.rows if r.get("pairs_per_s") is not None]
    key, label = ("ndcg_at_10", "nDCG@10") if rows and all(r.get("ndcg_at_10") is not None for r in rows) \
        else ("spearman", "Spearman correlation with the reference")
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state
    ax = fig.add_subplot()
    biggest = max((r["file_mb"] for r in rows), default=1.0) or 1.0
    for r in rows:
        y = r.get(key)
        if y is None:
            continue
        ax.scatter(r["pairs_per_s"], y, s=40 + 1200 * r["file_mb"] / biggest, alpha=0.55,
                   edgecolors="black", linewidths=0.6)
        name = r["level"] + (" (ref)" if r.get("reference") else "")
        ax.annotate(f"{name}\n{r['file_mb']:.0f} MB", (r["pairs_per_s"], y), textcoords="offset points",
                    xytext=(8, 6), fontsize=8)
    ax.set_xlabel("throughput (pairs/s)")
    ax.set_ylabel(label)
    ax.set_title(f"Quantization levels: quality vs throughput ({report.environment['device']})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.2)
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def write_outputs(report: BenchReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """bench_quant.md, bench_quant.json, bench_quant.png (when backbone levels were measured) and scores.npz (every
    level's scores; the projector's as `mmproj_LEVEL`, with `mmproj_query_id` / `mmproj_doc_id`) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in OUTPUT_NAMES.items()}
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(to_json(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if report.rows:
        plot(report, paths["plot"])
    else:  # a plot left by an earlier run into this folder would read as this run's
        paths.pop("plot").unlink(missing_ok=True)
    ids = np.array(report.ids, dtype=str).reshape(-1, 2)
    image_ids = np.array(report.image_ids, dtype=str).reshape(-1, 2)
    extra = {"mmproj_query_id": image_ids[:, 0], "mmproj_doc_id": image_ids[:, 1]} if report.projector_rows else {}
    np.savez(paths["scores"], query_id=ids[:, 0], doc_id=ids[:, 1], **extra, **report.scores)
    return paths
