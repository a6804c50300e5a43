"""One scoring path: `compute_score`, `rank`, a job's windows and a server request score the same call the same way.

`compute_score(pairs, batch_size=N)` and `reranker score --window N --per pair` on the same flat pairs
both score windows of N pairs as one `engine.scoring.score_prepared` call each (length sort, packing,
chunk expansion and aggregation), so on the CPU their scores are the same float32 bits; a server
request alone is one such call too.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from helpers import read_jsonl, score_args, write_jsonl

from reranker import Chunking, Reranker, RerankerError
from reranker.cli import main as cli_main

WORDS = "rerank model query document relevance 检索 排序 🎉 code() x=1 résumé the of and".split()
N_CTX = 1024
THREADS = 2


def mixed_pairs(n: int, seed: int = 0, max_words: int = 60) -> list[list[str]]:
    """`n` pairs whose documents run from 1 to `max_words` words, so packing order matters."""
    rng = random.Random(seed)
    return [[" ".join(rng.choices(WORDS, k=rng.randint(1, 8))), " ".join(rng.choices(WORDS, k=rng.randint(1, max_words)))]
            for _ in range(n)]


@pytest.fixture(scope="module")
def f16_reranker(tiny_ggufs):
    """The tiny F16 model with the settings `reranker score --n-ctx 1024 --threads 2` loads."""
    rr = Reranker.from_pretrained(str(tiny_ggufs["f16"]), device="cpu", n_ctx=N_CTX, n_threads=THREADS)
    yield rr
    rr.close()


def job_scores(tiny_ggufs, tmp_path, pairs, window: int, *extra) -> list[dict]:
    inp = write_jsonl(tmp_path / "pairs.jsonl", [{"query_id": f"q{i}", "query": q, "doc_id": f"d{i}", "document": d}
                                                 for i, (q, d) in enumerate(pairs)])
    out = tmp_path / "out.jsonl"
    assert cli_main(score_args(tiny_ggufs["f16"], inp, out, "--per", "pair", "--threads", THREADS, *extra,
                               n_ctx=N_CTX, window=window)) == 0
    return read_jsonl(out)


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32)


def test_compute_score_equals_the_job_window_for_window_bit_for_bit(f16_reranker, tiny_ggufs, tmp_path):
    pairs = mixed_pairs(120)
    rows = job_scores(tiny_ggufs, tmp_path, pairs, 40)
    api = np.asarray(f16_reranker.compute_score(pairs, batch_size=40), dtype=np.float32)
    assert np.array_equal(f32([r["score"] for r in rows]), api)
    # The job's token count is the call's: the same prompts.
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["tokens"] == f16_reranker.last_usage.tokens and summary["pairs"] == 120
    # Another batch layout moves some scores (F16), so the equality above says something.
    other = np.asarray(f16_reranker.compute_score(pairs[:40], batch_size=7), dtype=np.float32)
    assert not np.array_equal(other, api[:40])
    np.testing.assert_allclose(other, api[:40], rtol=0, atol=2e-3)


def test_chunked_compute_score_rank_and_job_agree_bit_for_bit(f16_reranker, tiny_ggufs, tmp_path):
    pairs = mixed_pairs(12, seed=1, max_words=120)
    chunking = Chunking(size=48, overlap=8)
    rows = job_scores(tiny_ggufs, tmp_path, pairs, 5, "--chunk", "--chunk-size", 48, "--chunk-overlap", 8,
                      "--max-length", 96)
    api = np.asarray(f16_reranker.compute_score(pairs, batch_size=5, chunking=chunking, max_length=96), dtype=np.float32)
    usage = f16_reranker.last_usage
    assert max(usage.chunks) > 2, "no document was chunked: the test would not exercise chunk aggregation"
    assert np.array_equal(f32([r["score"] for r in rows]), api)
    assert [r["chunks"] for r in rows] == usage.chunks and [r["best_chunk"] for r in rows] == usage.best_chunk

    result = f16_reranker.score_documents(pairs, chunking=chunking, batch_size=5, max_length=96, keep_hidden=True)
    assert np.array_equal(result.scores, api) and result.chunks.tolist() == usage.chunks
    # The kept state of a pair is its best chunk's: the head on it gives the pair's score (torch picks
    # its mat-mul kernel by row count, so within float32 rounding).
    np.testing.assert_allclose(f16_reranker.score_embeddings(result.hidden), api, rtol=0, atol=1e-6)


def test_rank_and_embed_are_the_same_call(f16_reranker):
    query = "rerank 检索"
    docs = [d for _, d in mixed_pairs(20, seed=2)]
    want = np.asarray(f16_reranker.compute_score([[query, d] for d in docs]), dtype=np.float32)
    ranked = f16_reranker.rank(query, docs)
    assert [r["corpus_id"] for r in ranked] == sorted(range(len(docs)), key=lambda i: (-want[i], i))
    assert np.array_equal(np.array([r["score"] for r in sorted(ranked, key=lambda r: r["corpus_id"])], dtype=np.float32), want)
    states = f16_reranker.embed([[query, d] for d in docs])
    np.testing.assert_allclose(f16_reranker.score_embeddings(states), want, rtol=0, atol=1e-6)


def test_a_server_request_alone_equals_compute_score_and_the_job(f16_reranker, tiny_ggufs, tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from helpers import running_server

    query = "rerank the model 检索"
    docs = [d for _, d in mixed_pairs(24, seed=3)]
    pairs = [[query, d] for d in docs]
    api = np.asarray(f16_reranker.compute_score(pairs, batch_size=len(docs)), dtype=np.float32)
    rows = job_scores(tiny_ggufs, tmp_path, pairs, len(docs))
    assert np.array_equal(f32([r["score"] for r in rows]), api)
    with running_server(f16_reranker) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/rerank", json={"query": query, "documents": docs, "return_documents": False})
        assert r.status_code == 200, r.text
    got = np.empty(len(docs), dtype=np.float32)
    for item in r.json()["results"]:
        got[item["index"]] = item["relevance_score"]
    assert np.array_equal(got, api)


def test_embed_reads_states_through_a_broken_head_which_scoring_refuses(tiny_reranker):
    import torch

    from head import ScoringHead

    head = ScoringHead(tiny_reranker.backbone.n_embd)
    with torch.no_grad():
        head.fc2.bias.fill_(float("nan"))
    broken = Reranker(tiny_reranker.backbone, head, device="cpu")
    pairs = mixed_pairs(6, seed=4)
    np.testing.assert_array_equal(broken.embed(pairs), tiny_reranker.embed(pairs))
    with pytest.raises(RerankerError, match=r"non-finite score \(nan\) for pair 0; the head is likely broken"):
        broken.score_documents(pairs)
