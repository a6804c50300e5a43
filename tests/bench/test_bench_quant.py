"""`reranker bench-quant` on the `small` synthetic model: levels made and scored, every output checked; the vision
projector's levels on the `tiny` one."""

from __future__ import annotations

import json
from pathlib import Path

import ir_measures
import numpy as np
import pytest
from helpers import write_jsonl

from reranker import RerankerError
from reranker.bench.compare import fidelity, retrieval_metrics
from reranker.bench.quant import DEFAULT_LEVELS, gguf_level, make_level, plan_levels
from reranker.bench.report import COLUMNS
from reranker.bench.sets import beir_set, pairs_jsonl_set, synthetic_set
from reranker.cli import main as cli_main


def main(argv):
    return cli_main(["bench-quant", *argv])


LEVELS = ["F16", "Q8_0", "Q3_K_M"]
TOPICS = ["rocket launch", "cake recipe", "tax law"]
N_DOCS = 12  # more than 10, so the top-10 overlap is defined


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    """3 queries x 12 short documents, a run of all 12 per query, and qrels (grades 0-2)."""
    root = tmp_path_factory.mktemp("beir")
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": f"{t}?"} for i, t in enumerate(TOPICS)])
    write_jsonl(root / "corpus.jsonl", [{"_id": f"q{i}d{j}", "title": t if j < 3 else "", "text": f"note {j} about {t}"}
                                        for i, t in enumerate(TOPICS) for j in range(N_DOCS)])
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\tq{i}d{j}\t{2 - j}\n" for i in range(len(TOPICS)) for j in range(3)), encoding="utf-8")
    (root / "run.trec").write_text("".join(f"q{i} Q0 q{i}d{j} {j + 1} {100 - j} bm25\n"
                                           for i in range(len(TOPICS)) for j in range(N_DOCS)), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def bench_out(small_f16, beir_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main([str(small_f16), "--beir", str(beir_dir), "--levels", "Q8_0,Q3_K_M", "-o", str(out),
               "--n-ctx", "512", "--batch-size", "64", "--warmup", "4", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def report(bench_out):
    return json.loads((bench_out / "bench_quant.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_levels_are_made_and_scored(bench_out, report, small_f16):
    rows = {r["level"]: r for r in report["levels"]}
    assert list(rows) == LEVELS
    for name in ("Q8_0", "Q3_K_M"):
        made = bench_out / "gguf" / f"jina-reranker-m0-small-{name}.gguf"
        assert rows[name]["made"] and rows[name]["path"] == str(made) and gguf_level(made) == name
        assert rows[name]["file_bytes"] == made.stat().st_size < small_f16.stat().st_size
    assert rows["F16"]["path"] == str(small_f16) and not rows["F16"]["made"]
    for r in rows.values():
        assert r["pairs"] == len(TOPICS) * N_DOCS and r["tokens"] > r["pairs"] and r["truncated"] == 0
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > r["pairs_per_s"] and r["load_s"] > 0
        assert r["peak_host_mb"] > r["baseline_host_mb"] > 0
        assert r["gpu_mem_mb"] is None  # CPU-only test machine
    scores = np.load(bench_out / "scores.npz")
    assert list(scores["query_id"][:2]) == ["q0", "q0"] and scores["doc_id"][0] == "q0d0"
    for name in LEVELS:
        assert scores[name].shape == (len(TOPICS) * N_DOCS,) and np.all((scores[name] > 0) & (scores[name] < 1))
    ref = rows["F16"]
    assert ref["spearman"] == pytest.approx(1) and ref["kendall"] == pytest.approx(1) and ref["top10_overlap"] == 1
    assert ref["max_abs_diff"] == 0 and ref["order_flips"] == 0


@pytest.mark.slow
def test_table_and_json_carry_every_column(bench_out, report):
    for row in report["levels"]:
        assert {key for key, _, _ in COLUMNS} <= set(row)
        assert all(row[key] is not None for key, _, _ in COLUMNS if key != "gpu_mem_mb")
    assert report["eval_set"]["kind"] == "beir" and report["eval_set"]["queries"] == len(TOPICS)
    assert report["settings"]["reference"] == "F16" and report["settings"]["levels"] == LEVELS
    env = report["environment"]
    for key in ("device", "threads", "cpu", "llama_cpp_python", "llama_cpp", "llama_cpp_system_info", "torch"):
        assert key in env
    assert env["device"] == "cpu" and env["threads"] >= 1
    table = [line for line in (bench_out / "bench_quant.md").read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == [h for _, h, _ in COLUMNS]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["F16 (ref)", "Q8_0", "Q3_K_M"]
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS) and cells[header.index("GPU MB")] == "–"
        assert "–" not in cells[:header.index("GPU MB")] + cells[header.index("GPU MB") + 1:]


@pytest.mark.slow
def test_q8_0_is_more_faithful_than_q3_k_m(report):
    q8, q3 = (next(r for r in report["levels"] if r["level"] == name) for name in ("Q8_0", "Q3_K_M"))
    assert q8["spearman"] > q3["spearman"] and q8["kendall"] > q3["kendall"]
    assert q8["mean_abs_diff"] < q3["mean_abs_diff"] and q8["max_abs_diff"] < q3["max_abs_diff"]
    assert q8["order_flips"] < q3["order_flips"] and q8["top10_overlap"] >= q3["top10_overlap"]


@pytest.mark.slow
def test_report_metrics_equal_ir_measures(bench_out, report):
    scores = np.load(bench_out / "scores.npz")
    qrels = {f"q{i}": {f"q{i}d{j}": 2 - j for j in range(3)} for i in range(len(TOPICS))}  # as written in beir_dir
    for row in report["levels"]:
        run: dict[str, dict[str, float]] = {}
        for q, d, s in zip(scores["query_id"], scores["doc_id"], scores[row["level"]]):
            run.setdefault(str(q), {})[str(d)] = float(s)
        direct = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.RR @ 10, ir_measures.R @ 100], qrels, run)
        assert row["ndcg_at_10"] == pytest.approx(direct[ir_measures.nDCG @ 10])
        assert row["mrr_at_10"] == pytest.approx(direct[ir_measures.RR @ 10])
        assert row["recall_at_100"] == pytest.approx(1.0)  # every judged document is among the 12 candidates


@pytest.mark.slow
def test_plot_is_a_png(bench_out):
    import matplotlib.image

    data = (bench_out / "bench_quant.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    image = matplotlib.image.imread(bench_out / "bench_quant.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_retrieval_metrics_hand_checked():
    qrels = {"q1": {"d1": 2, "d2": 0, "d3": 1}, "q2": {"d4": 1}, "q3": {"d7": 1}}
    run = {"q1": {"d2": 0.9, "d3": 0.5, "d1": 0.1, "d9": 0.05},  # ranks: d2 (0), d3 (1), d1 (2), d9 (unjudged)
           "q2": {"d5": 0.8, "d6": 0.7, "d4": 0.6},  # d4 (1) third
           "q3": {"d8": 0.3},  # its relevant document is not retrieved
           "q4": {"d1": 1.0}}  # not judged: not evaluated
    # q1: DCG = 0/log2(2) + 1/log2(3) + 2/log2(4) = 1.630930; IDCG = 2/log2(2) + 1/log2(3) = 2.630930
    #     nDCG@10 = 0.619906, RR = 1/2 (d3 at rank 2), recall = 2/2
    # q2: DCG = 1/log2(4) = 0.5, IDCG = 1 -> nDCG@10 = 0.5, RR = 1/3, recall = 1
    # q3: nDCG = RR = recall = 0
    # means over 3 queries: nDCG@10 = 1.119906 / 3, MRR@10 = (1/2 + 1/3) / 3, Recall@100 = 2/3
    got = retrieval_metrics(qrels, run)
    assert got["ndcg_at_10"] == pytest.approx(1.1199062 / 3, abs=1e-6)
    assert got["mrr_at_10"] == pytest.approx((1 / 2 + 1 / 3) / 3)
    assert got["recall_at_100"] == pytest.approx(2 / 3)
    direct = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.RR @ 10, ir_measures.R @ 100], qrels, run)
    assert got == {"ndcg_at_10": direct[ir_measures.nDCG @ 10], "mrr_at_10": direct[ir_measures.RR @ 10],
                   "recall_at_100": direct[ir_measures.R @ 100]}
    # A judged query without candidates counts 0 (trec_eval -c), as in ir-measures.
    assert retrieval_metrics({**qrels, "q5": {"d1": 1}}, run)["mrr_at_10"] == pytest.approx((1 / 2 + 1 / 3) / 4)
    assert retrieval_metrics({}, run) == {"ndcg_at_10": None, "mrr_at_10": None, "recall_at_100": None}


def test_fidelity_hand_checked():
    ref = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8])
    got = np.array([0.1, 0.3, 0.2, 0.4, 0.8, 0.8])
    f = fidelity(ref, got, [4, 2])
    # query 1: of 6 document pairs, (2, 3) is swapped -> 1; query 2: 1 pair, tied in `got` only -> 0.5
    assert f["order_flips"] == pytest.approx(1.5 / 7)
    assert f["max_abs_diff"] == pytest.approx(0.1) and f["mean_abs_diff"] == pytest.approx(0.3 / 6)
    assert f["top10_overlap"] is None  # no query has more than 10 candidates
    assert fidelity(ref, ref, [4, 2])["spearman"] == pytest.approx(1)
    ranks = np.arange(12.0)
    swapped = ranks.copy()
    swapped[[1, 11]] = swapped[[11, 1]]  # doc 1 falls out of the top 10, doc 11 comes in
    assert fidelity(ranks, swapped, [12])["top10_overlap"] == pytest.approx(0.9)
    with pytest.raises(RerankerError, match="do not match"):
        fidelity(ref, got[:5], [5])


def test_retrieval_metrics_break_ties_as_trec_eval():
    import pytrec_eval

    # A tie: trec_eval puts the larger id first ("d6" > "d10"), for nDCG and MRR alike (ir-measures' own RR@10
    # takes the smaller first, which ranked the relevant d10 first for MRR and second for nDCG).
    got = retrieval_metrics({"q": {"d10": 1}}, {"q": {"d6": 0.5, "d10": 0.5}})
    assert got["mrr_at_10"] == pytest.approx(0.5) and got["ndcg_at_10"] == pytest.approx(1 / np.log2(3))
    got = retrieval_metrics({"q": {"d10": 1}}, {"q": {"a": 0.5, "d10": 0.5}})
    assert got["mrr_at_10"] == pytest.approx(1) and got["ndcg_at_10"] == pytest.approx(1)
    # Against trec_eval itself (pytrec_eval) on runs full of ties, 10 candidates a query (so RR@10 is trec_eval's RR).
    rng = np.random.default_rng(0)
    qrels = {f"q{i}": {f"d{j}": int(rng.integers(0, 3)) for j in rng.choice(30, 5, replace=False)} for i in range(40)}
    run = {q: {f"d{j}": float(rng.integers(0, 3)) / 2 for j in rng.choice(30, 10, replace=False)} for q in qrels}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recip_rank"}).evaluate(run)
    got = retrieval_metrics(qrels, run)
    assert got["ndcg_at_10"] == pytest.approx(np.mean([m["ndcg_cut_10"] for m in per_query.values()]))
    assert got["mrr_at_10"] == pytest.approx(np.mean([m["recip_rank"] for m in per_query.values()]))


def test_order_flips_in_bounded_memory():
    import tracemalloc

    from reranker.bench.compare import _flips

    rng = np.random.default_rng(1)
    ref, got = rng.integers(0, 6, 301).astype(float), rng.integers(0, 6, 301).astype(float)  # many ties on both sides
    i, j = np.triu_indices(301, 1)
    a, b = np.sign(ref[i] - ref[j]), np.sign(got[i] - got[j])
    brute = float(np.sum(a * b < 0) + 0.5 * np.sum((a == 0) != (b == 0)))
    assert _flips(ref, got) == _flips(ref, got, block=7) == _flips(ref, got, block=1) == brute
    assert fidelity(ref, got, [301])["order_flips"] == pytest.approx(brute / len(i))
    # 4,000 candidates of one query: the whole pair matrix took several n x n arrays at once.
    ref, got = rng.random(4000), rng.random(4000)
    tracemalloc.start()
    try:
        fidelity(ref, got, [4000])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # one n x n float64 array alone is 128 MB


@pytest.mark.slow
def test_default_levels_and_level_files(small_f16, bench_out, tmp_path):
    assert DEFAULT_LEVELS == ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")
    plan = plan_levels([str(small_f16)], tmp_path)
    assert [lv.name for lv in plan.levels] == ["F16", *DEFAULT_LEVELS] and plan.reference.path == small_f16
    assert all(lv.path is None for lv in plan.levels[1:]) and plan.head == small_f16.parent / "mlp_weights.npz"
    # A level made by an earlier run from the same reference is reused, not made again.
    plan = plan_levels([str(small_f16)], bench_out, levels=["Q8_0"])
    assert make_level(plan, plan.levels[1]) is None and plan.levels[1].path == bench_out / "gguf" / "jina-reranker-m0-small-Q8_0.gguf"
    plan = plan_levels([str(small_f16)], tmp_path / "fresh", levels=["Q8_0"])
    assert make_level(plan, plan.levels[1]) > 0
    stamp = tmp_path / "fresh" / "gguf" / "jina-reranker-m0-small-Q8_0.gguf.source"
    assert stamp.read_text(encoding="utf-8").startswith(str(small_f16.resolve()) + "|")
    stamp.write_text("another reference\n", encoding="utf-8")
    plan = plan_levels([str(small_f16)], tmp_path / "fresh", levels=["Q8_0"])
    assert make_level(plan, plan.levels[1]) > 0  # made again: the file on disk came from something else
    # A folder: the levels it holds are used, the others made.
    folder = tmp_path / "repo"
    folder.mkdir()
    for src in (small_f16, bench_out / "gguf" / "jina-reranker-m0-small-Q3_K_M.gguf", small_f16.parent / "mlp_weights.npz"):
        (folder / src.name).symlink_to(src)
    plan = plan_levels([str(folder)], tmp_path / "out", levels=["Q3_K_M", "Q4_K_M"])
    assert plan.reference.name == "F16" and plan.levels[1].path == folder / "jina-reranker-m0-small-Q3_K_M.gguf"
    assert plan.levels[2].name == "Q4_K_M" and plan.levels[2].path is None
    # Several files: the unquantized one is the reference, the others are the levels.
    plan = plan_levels([str(folder / "jina-reranker-m0-small-Q3_K_M.gguf"), str(small_f16)], tmp_path / "out")
    assert [lv.name for lv in plan.levels] == ["F16", "Q3_K_M"]
    with pytest.raises(RerankerError, match="none of the given GGUFs"):
        plan_levels([str(folder / "jina-reranker-m0-small-Q3_K_M.gguf"), str(bench_out / "gguf" / "jina-reranker-m0-small-Q8_0.gguf")],
                    tmp_path / "out", head=small_f16.parent / "mlp_weights.npz")
    with pytest.raises(RerankerError, match="F16, BF16 or F32"):
        plan_levels([str(folder / "jina-reranker-m0-small-Q3_K_M.gguf")], tmp_path / "out")
    with pytest.raises(RerankerError, match="unknown level 'Q9_X'"):
        plan_levels([str(small_f16)], tmp_path / "out", levels=["Q9_X"])


@pytest.mark.slow
def test_synthetic_run_speed_only(small_f16, bench_out, capsys):
    # Reuses bench_out's Q8_0 file; no judgements, so no retrieval numbers.
    rc = main([str(small_f16), "--synthetic", "8", "--levels", "Q8_0", "-o", str(bench_out / "synthetic"),
               "--n-ctx", "1024", "--batch-size", "64", "--warmup", "1", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| Q8_0 |" in text and "synthetic" in text
    report = json.loads((bench_out / "synthetic" / "bench_quant.json").read_text(encoding="utf-8"))
    assert [r["level"] for r in report["levels"]] == ["F16", "Q8_0"]
    assert all(r["ndcg_at_10"] is None and r["pairs"] == 8 for r in report["levels"])
    assert report["levels"][1]["spearman"] > 0.9 and (bench_out / "synthetic" / "bench_quant.png").is_file()


def test_eval_sets(tmp_path, beir_dir):
    s = synthetic_set(40, seed=3)
    assert s.groups() == [16, 16, 8] and s.qrels is None and s.pairs() == synthetic_set(40, seed=3).pairs()
    assert s.pairs() != synthetic_set(40, seed=4).pairs()

    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"query_id": "a", "query": "qa", "doc_id": "1", "document": "x", "label": 1},
                        {"query_id": "b", "query": "qb", "doc_id": "1", "document": "y", "label": 0},
                        {"query_id": "a", "query": "qa", "doc_id": "2", "document": "z", "label": True},
                        {"query_id": "a", "query": "qa", "doc_id": "3", "document": "w"},
                        {"query_id": "a", "query": "qa", "doc_id": "4", "document": ""},  # empty: scored
                        {"query_id": "a", "query": "qa", "doc_id": "5", "document": 7}])  # rejected: not text
    s = pairs_jsonl_set(path)
    assert [(q.query_id, [d for d, _ in q.docs]) for q in s.queries] == [("a", ["1", "2", "3", "4"]), ("b", ["1"])]
    assert s.qrels == {"a": {"1": 1, "2": 1}, "b": {"1": 0}}
    write_jsonl(path, [{"query_id": "a", "query": "qa", "doc_id": "1", "document": "x", "label": 0.5}])
    with pytest.raises(RerankerError, match="integer relevance grade"):
        pairs_jsonl_set(path)
    # One query id with two texts: the second pair would be scored against the first text.
    write_jsonl(path, [{"query_id": "a", "query": "rocket launch", "doc_id": "1", "document": "x"},
                        {"query_id": "a", "query": "cake recipe", "doc_id": "2", "document": "bake it"}])
    with pytest.raises(RerankerError, match=r'pairs.jsonl:2: query "a" has another text here'):
        pairs_jsonl_set(path)
    # Image documents: refused by name (backbone levels are measured on text), not a TypeError at the worker.
    write_jsonl(path, [{"query_id": "a", "query": "red", "doc_id": "1", "image": "red.png"}])
    with pytest.raises(RerankerError, match=r"pairs.jsonl:1: an image or PDF .* --mmproj"):
        pairs_jsonl_set(path)

    s = beir_set(beir_dir, max_queries=2)
    assert [q.query_id for q in s.queries] == ["q0", "q1"] and len(s.queries[0].docs) == N_DOCS
    assert s.queries[0].docs[0] == ("q0d0", "rocket launch note 0 about rocket launch")  # "title text"
    # Without a run: every judged document plus 4 random others, the same for the same seed.
    no_run = tmp_path / "beir"
    no_run.mkdir()
    for name in ("queries.jsonl", "corpus.jsonl"):
        (no_run / name).write_bytes((beir_dir / name).read_bytes())
    s = beir_set(no_run, qrels=beir_dir / "qrels" / "test.tsv", negatives=4, work_dir=tmp_path / "work")
    for q in s.queries:
        ids = {d for d, _ in q.docs}
        assert len(ids) == 7 and set(s.qrels[q.query_id]) <= ids
    again = beir_set(no_run, qrels=beir_dir / "qrels" / "test.tsv", negatives=4, work_dir=tmp_path / "work2")
    assert [q.docs for q in again.queries] == [q.docs for q in s.queries]
    with pytest.raises(RerankerError, match="qrels file not found"):
        beir_set(no_run)
    # A judged query the run has no candidates for stays in the qrels (it counts 0), with a note.
    partial = tmp_path / "partial.trec"
    partial.write_text("".join(line + "\n" for line in (beir_dir / "run.trec").read_text().splitlines()
                               if not line.startswith("q2 ")), encoding="utf-8")
    s = beir_set(beir_dir, run=partial)
    assert [q.query_id for q in s.queries] == ["q0", "q1"] and set(s.qrels) == {"q0", "q1", "q2"}
    assert any("1 of 3 judged queries have no candidates" in n for n in s.notes)


@pytest.mark.slow
def test_cli_errors(small_f16, tmp_path, capsys):
    assert main([str(small_f16), "--beir", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert "BEIR folder not found" in capsys.readouterr().err
    assert main([str(small_f16), "--synthetic", "4", "--levels", "Q8_0,Q9_X", "-o", str(tmp_path / "out")]) == 2
    assert "unknown level 'Q9_X'" in capsys.readouterr().err
    assert main([str(small_f16)]) == 2  # an evaluation set is required
    assert "give an evaluation set" in capsys.readouterr().err


def test_cli_checks_every_option_first(tmp_path, cli_here):
    # All refused before any model file is read (the model path does not exist).
    model = str(tmp_path / "model-F16.gguf")
    cases = [(["--synthetic", "4", "--warmup", "-1"], "--warmup -1 must be at least 0"),
             (["--beir", "x", "--negatives", "-3"], "--negatives -3 must be at least 0"),
             (["--beir", "x", "--max-queries", "-1"], "--max-queries -1 must be at least 1"),
             (["--synthetic", "0"], "--synthetic 0 must be at least 1"),
             (["--synthetic", "4", "--levels", ""], "--levels is empty"),
             (["--synthetic", "4", "--depth", "5"], "--depth applies to a BEIR set only"),
             (["--pairs", "p.jsonl", "--run", "r.trec"], "--run applies to a BEIR set only"),
             (["--synthetic", "4", "--bf16", "on"], "--bf16 does not apply to bench-quant"),
             (["--synthetic", "4", "--threads", "0"], "n_threads"),
             (["--synthetic", "4", "--max-length", "0"], "max_length"),
             (["--synthetic", "4", "--device", "bogus"], "'bogus' is not a torch device")]
    for argv, message in cases:
        r = cli_here("bench-quant", model, *argv, "-o", str(tmp_path / "out"))
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_quantization_gives_llama_cpps_reason(tiny_ggufs, tmp_path):
    from reranker.gguf.quantize import quantize

    # llama.cpp's own reason, not a guess (it used to blame K-quant row sizes for every failure).
    broken = tmp_path / "broken-F16.gguf"
    broken.write_bytes(tiny_ggufs["f16"].read_bytes()[: tiny_ggufs["f16"].stat().st_size * 3 // 4])
    with pytest.raises(RerankerError, match="to Q8_0 .*'token_embd.weight' data is not within the file bounds"):
        quantize(broken, tmp_path / "y.gguf", "Q8_0")
    assert not (tmp_path / "y.gguf").exists()
    # A failure leaves a file already at the output as it was (it used to be deleted), and no temporary beside it.
    kept = tmp_path / "kept.gguf"
    kept.write_bytes(b"someone else's file")
    with pytest.raises(RerankerError, match="failed to quantize"):
        quantize(broken, kept, "Q8_0")
    assert kept.read_bytes() == b"someone else's file" and sorted(p.name for p in tmp_path.iterdir()) == [
        "broken-F16.gguf", "kept.gguf"]
    # The input as the output (by its name, or through a link) is refused: llama.cpp truncated it while reading it.
    copy = tmp_path / "copy-F16.gguf"
    copy.write_bytes(tiny_ggufs["f16"].read_bytes())
    (tmp_path / "link.gguf").symlink_to(copy)
    for out in (copy, tmp_path / "link.gguf"):
        with pytest.raises(RerankerError, match="is the input; write the quantized file to another path"):
            quantize(copy, out, "Q8_0")
    assert copy.read_bytes() == tiny_ggufs["f16"].read_bytes()
    with pytest.raises(RerankerError, match="is a folder; give the file to write"):
        quantize(copy, tmp_path, "Q8_0")
    assert quantize(copy, kept, "Q8_0") == kept and kept.stat().st_size > 1000  # a good run replaces it


@pytest.mark.slow
def test_a_failed_level_costs_only_its_row(small_f16, tmp_path, cli_here):
    # IQ2_XXS needs an importance matrix where rows fit its blocks (the small model's do, the tiny one's fall back).
    out = tmp_path / "out"
    r = cli_here("bench-quant", str(small_f16), "--synthetic", "6", "--levels", "IQ2_XXS,Q8_0",
                 "-o", str(out), "--n-ctx", "512", "--warmup", "1", "--no-progress")
    assert r.returncode == 2 and "1 level(s) could not be made or measured: IQ2_XXS" in r.stderr
    report = json.loads((out / "bench_quant.json").read_text(encoding="utf-8"))
    rows = {r["level"]: r for r in report["levels"]}
    assert list(rows) == ["F16", "IQ2_XXS", "Q8_0"]  # the level after the failed one is measured too
    assert "importance matrix" in rows["IQ2_XXS"]["error"] and rows["Q8_0"]["pairs"] == 6 and rows["Q8_0"]["spearman"] > 0.5
    assert "IQ2_XXS failed: llama.cpp failed to quantize" in (out / "bench_quant.md").read_text(encoding="utf-8")
    assert set(np.load(out / "scores.npz").files) >= {"F16", "Q8_0"} and "IQ2_XXS" not in np.load(out / "scores.npz").files
    # Every worker ran at the thread count the report gives, decided once (not by each worker from the load then).
    specs = [json.loads((out / "work" / level / "spec.json").read_text(encoding="utf-8")) for level in ("F16", "Q8_0")]
    threads = report["environment"]["threads"]
    assert isinstance(threads, int) and [spec["n_threads"] for spec in specs] == [threads, threads]


# --- the vision projector's levels (tiny model: F32 backbone, projectors made from the checkpoint) ------------------

N_IMAGES = 5  # one of each synthetic size


@pytest.fixture(scope="module")
def projector_out(tiny_ggufs, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-mmproj")
    rc = main([str(tiny_ggufs["f32"]), "--mmproj-checkpoint", str(tiny_checkpoint), "--synthetic-images", str(N_IMAGES),
               "-o", str(out), "--n-ctx", "2048", "--warmup", "1", "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "bench_quant.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_projector_levels_are_made_and_measured(projector_out, tiny_ggufs, tiny_checkpoint, tmp_path):
    from reranker import Reranker
    from reranker.gguf.mmproj import convert_mmproj

    out, report = projector_out
    rows = {r["level"]: r for r in report["projector_levels"]}
    assert list(rows) == ["F32", "F16", "Q8_0"] and rows["F32"]["reference"] and report["levels"] == []
    for name, row in rows.items():  # made as `reranker convert --mmproj-type` writes them
        made = convert_mmproj(tiny_checkpoint, tmp_path / name, name.lower())
        assert row["made"] and Path(row["path"]).read_bytes() == made.read_bytes() and row["file_bytes"] == made.stat().st_size
        assert row["pairs"] == N_IMAGES and row["images_per_s"] == row["pairs_per_s"] > 0 and row["load_s"] > 0
        assert row["peak_host_mb"] > row["baseline_host_mb"] > 0 and row["tokens"] > N_IMAGES * 4
    # Q8_0 keeps the patch embedding in F32 (llama.cpp's rule), a large share of the tiny tower: no smaller than F16 here
    assert rows["F32"]["file_bytes"] > max(rows["F16"]["file_bytes"], rows["Q8_0"]["file_bytes"])
    # Each level's scores are those of the API with that projector, on the set's images.
    scores = np.load(out / "scores.npz")
    pairs = json.loads((out / "work" / "mmproj" / "pairs.json").read_text(encoding="utf-8"))
    assert len(pairs) == N_IMAGES and all(set(doc) == {"image"} for _, doc in pairs)
    assert list(scores["mmproj_doc_id"]) == [f"image-{i:05d}" for i in range(N_IMAGES)]
    for name, row in rows.items():
        with Reranker.from_pretrained(str(tiny_ggufs["f32"]), device="cpu", n_ctx=2048, mmproj=row["path"]) as rr:
            assert scores[f"mmproj_{name}"] == pytest.approx(rr.compute_score(pairs, batch_size=256), abs=1e-6)
        drift = np.abs(scores[f"mmproj_{name}"].astype(np.float64) - scores["mmproj_F32"])
        assert row["max_abs_diff"] == pytest.approx(drift.max()) and row["mean_abs_diff"] == pytest.approx(drift.mean())
    assert rows["F32"]["max_abs_diff"] == 0 and 0 < rows["F16"]["max_abs_diff"] < rows["Q8_0"]["max_abs_diff"] < 5e-2
    table = (out / "bench_quant.md").read_text(encoding="utf-8")
    assert "| level | file MB | load s | peak host MB | GPU MB | images/s | Spearman |" in table and "| F16 |" in table
    assert not (out / "bench_quant.png").exists()  # no backbone levels measured: no quality/throughput plot


def test_projector_plans_and_image_sets(tiny_ggufs, tiny_checkpoint, tmp_path):
    from reranker.bench.quant import MMPROJ_LEVELS, make_projector, mmproj_level, plan_projectors
    from reranker.bench.sets import SYNTHETIC_IMAGE_SIZES, image_folder_set, synthetic_image_set
    from reranker.gguf.mmproj import convert_mmproj

    gguf = tiny_ggufs["f32"]
    f16 = next(gguf.parent.glob("mmproj-*-F16.gguf"))  # convert's default, beside the model
    f32 = convert_mmproj(tiny_checkpoint, tmp_path / "given", "f32")
    assert MMPROJ_LEVELS == ("F32", "F16", "Q8_0") and mmproj_level(f16) == "F16" and mmproj_level(f32) == "F32"
    plan = plan_projectors(gguf, tmp_path / "out", files=[str(f16), str(f32)])
    assert [(lv.name, lv.path, lv.reference) for lv in plan.levels] == [("F32", f32, True), ("F16", f16, False)]
    plan = plan_projectors(gguf, tmp_path / "out", files=[str(f16)], checkpoint=tiny_checkpoint, levels=["q8_0"])
    assert [(lv.name, lv.path) for lv in plan.levels] == [("F32", None), ("F16", f16), ("Q8_0", None)]
    assert make_projector(plan, plan.levels[0]) > 0 and mmproj_level(plan.levels[0].path) == "F32"
    again = plan_projectors(gguf, tmp_path / "out", checkpoint=tiny_checkpoint, levels=["F32"])
    assert make_projector(again, again.levels[0]) is None and again.levels[0].path == plan.levels[0].path  # reused
    with pytest.raises(RerankerError, match=r"compared with the F32 projector: add it"):
        plan_projectors(gguf, tmp_path, files=[str(f16)])
    with pytest.raises(RerankerError, match=r"tiny-F32\.gguf is not a vision projector"):
        plan_projectors(gguf, tmp_path, files=[str(gguf)])
    with pytest.raises(RerankerError, match=r"are both F16 projectors"):
        plan_projectors(gguf, tmp_path, files=[str(f16), str(f16)])
    with pytest.raises(RerankerError, match=r"unknown projector level 'Q4_K_M'"):
        plan_projectors(gguf, tmp_path, checkpoint=tiny_checkpoint, levels=["Q4_K_M"])
    with pytest.raises(RerankerError, match=r"--mmproj-levels .* add --mmproj-checkpoint"):
        plan_projectors(gguf, tmp_path, files=[str(f32)], levels=["F16"])
    with pytest.raises(RerankerError, match=r"not a checkpoint with a vision tower"):
        plan_projectors(gguf, tmp_path, checkpoint=tmp_path)

    s = synthetic_image_set(7, tmp_path / "images", seed=1)
    docs = [doc for q in s.queries for _, doc in q.docs]
    from PIL import Image

    assert [Image.open(d["image"]).size for d in docs] == [SYNTHETIC_IMAGE_SIZES[i % 5] for i in range(7)]
    again = synthetic_image_set(7, tmp_path / "images2", seed=1)
    assert [Path(d["image"]).read_bytes() for d in docs] == [Path(d["image"]).read_bytes() for q in again.queries for _, d in q.docs]
    other = synthetic_image_set(1, tmp_path / "images3", seed=2)
    assert Path(other.queries[0].docs[0][1]["image"]).read_bytes() != Path(docs[0]["image"]).read_bytes()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    folder = image_folder_set(tmp_path / "images")
    assert [d for q in folder.queries for d, _ in q.docs] == [f"image-{i:05d}.png" for i in range(7)]
    with pytest.raises(RerankerError, match="holds no image files"):
        image_folder_set(tmp_path / "given")
    with pytest.raises(RerankerError, match="image folder not found"):
        image_folder_set(tmp_path / "missing")


def test_projector_cli_errors(tiny_ggufs, tmp_path, capsys):
    model = str(tiny_ggufs["f32"])
    assert main([model, "-o", str(tmp_path / "out")]) == 2
    assert "give an evaluation set" in capsys.readouterr().err
    assert main([model, "--synthetic", "4", "--synthetic-images", "4", "-o", str(tmp_path / "out")]) == 2
    assert "are for projector levels: add --mmproj FILE" in capsys.readouterr().err
    f16 = next(tiny_ggufs["f32"].parent.glob("mmproj-*-F16.gguf"))
    assert main([model, "--mmproj", str(f16), "--levels", "Q8_0", "-o", str(tmp_path / "out")]) == 2
    assert "--levels are backbone levels" in capsys.readouterr().err
    assert main([model, "--mmproj", str(f16), "-o", str(tmp_path / "out")]) == 2
    assert "compared with the F32 projector" in capsys.readouterr().err
    assert not (tmp_path / "out" / "work").exists()  # nothing scored
