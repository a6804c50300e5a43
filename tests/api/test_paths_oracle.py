"""Every engine path against the independent reference, not only against another path.

The same pairs (conftest.PAIRS) go through the API (`compute_score`, `rank`, `embed`; the fast path,
embedding mode, deterministic mode; F32 and F16), a `reranker score` job (one process, two device
processes, `--save-hidden`), the Ray engine, the rerank server and chunking, and each result is
compared with tests/oracle.py (its own prompt ids, transformers, the checkpoint's score MLP) within
the tolerance stated there once. `pytest -s` prints the errors measured on each path.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PAIRS
from helpers import read_jsonl, run, score_args, score_cmd, write_jsonl
from oracle import assert_hidden_close, assert_scores_close

from reranker import Chunking, Reranker
from reranker.engine.chunking import Chunker

RECORDS = [{"query_id": f"q{i}", "query": q, "documents": [d]} for i, (q, d) in enumerate(PAIRS)]


def report(path: str, **errors: float) -> None:
    print(f"\n{path}: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))


def job_scores(out) -> np.ndarray:
    """A per-pair JSONL job output's scores in PAIRS order."""
    by_query = {r["query_id"]: r["score"] for r in read_jsonl(out)}
    return np.array([by_query[f"q{i}"] for i in range(len(PAIRS))])


@pytest.fixture(scope="module")
def pairs_input(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("paths") / "pairs.jsonl", RECORDS)


# --- the Python API ------------------------------------------------------------------------------


def test_api_compute_score_rank_and_embed(tiny_reranker, reference):
    want = reference.scores(PAIRS)
    assert want.std() > 0.02, "the reference's scores must spread, or the comparison proves little"
    score_err = assert_scores_close(tiny_reranker.compute_score(PAIRS), want, "f32", "compute_score")
    hidden_err = assert_hidden_close(tiny_reranker.embed(PAIRS), reference.hidden(PAIRS), "f32", "embed")
    query = PAIRS[0][0]
    docs = [d for _, d in PAIRS]
    ranked = tiny_reranker.rank(query, docs)
    want_rank = reference.scores([[query, d] for d in docs])
    assert [r["corpus_id"] for r in ranked] == sorted(range(len(docs)), key=lambda i: -want_rank[i])
    rank_err = assert_scores_close([r["score"] for r in sorted(ranked, key=lambda r: r["corpus_id"])], want_rank, "f32",
                                   "rank")
    report("API f32 fast", score=score_err, hidden=hidden_err, rank=rank_err)


@pytest.mark.parametrize("outtype,fast,deterministic", [
    ("f32", False, False), ("f32", True, True), ("f32", False, True), ("f16", True, False), ("f16", True, True),
], ids=["f32-embedding", "f32-deterministic", "f32-embedding-deterministic", "f16", "f16-deterministic"])
def test_api_modes(tiny_ggufs, reference, outtype, fast, deterministic):
    with Reranker.from_pretrained(str(tiny_ggufs[outtype]), device="cpu", n_ctx=2048, fast=fast,
                                  deterministic=deterministic) as rr:
        assert rr.deterministic == deterministic and rr.weights_dtype == outtype.upper()
        hidden = rr.embed(PAIRS)
        scores = rr.compute_score(PAIRS)
        alone = [rr.compute_score(p) for p in PAIRS[:3]]
    name = f"API {outtype} fast={fast} deterministic={deterministic}"
    hidden_err = assert_hidden_close(hidden, reference.hidden(PAIRS), outtype, name)
    score_err = assert_scores_close(scores, reference.scores(PAIRS), outtype, name)
    assert_scores_close(alone, reference.scores(PAIRS[:3]), outtype, name + ", one pair a call")
    report(name, hidden=hidden_err, score=score_err)


def test_deterministic_long_prompts_in_chunks(tiny_ggufs, reference):
    # Prompts longer than n_batch: deterministic mode feeds them alone, in chunks of n_batch.
    pairs = [["long", "many words here " * 120], ["机器", "学习 🎉 " * 150], PAIRS[0]]
    assert max(len(reference.ids(q, d)) for q, d in pairs) > 2 * 128
    with Reranker.from_pretrained(str(tiny_ggufs["f32"]), device="cpu", n_ctx=2048, n_batch=128,
                                  deterministic=True) as rr:
        scores = rr.compute_score(pairs)
    report("API f32 deterministic n_batch=128", score=assert_scores_close(scores, reference.scores(pairs), "f32",
                                                                          "deterministic, prompts fed in chunks"))


# --- chunking --------------------------------------------------------------------------------


CHUNK_MAX_LENGTH = 64
LONG_PAIRS = [["what is a reranker?", "A reranker scores how relevant a document is to a query. " * 12],
              ["机器学习", "机器学习是人工智能的一个分支，研究计算机如何从数据中学习。🎉 " * 6],
              ["short one", "a short document"], ["", "x"]]


def test_chunked_scores_are_the_references_on_each_chunk(tiny_ggufs, reference):
    # Deterministic, so a prompt scores the same whatever else its call packs (exact equality below).
    with Reranker.from_pretrained(str(tiny_ggufs["f32"]), device="cpu", n_ctx=512, max_length=CHUNK_MAX_LENGTH,
                                  deterministic=True) as rr:
        chunking = Chunking(size=16, overlap=4)
        texts = [Chunker(rr.prompt_builder(), chunking).chunk_texts(q, d) for q, d in LONG_PAIRS]
        assert [len(t) > 1 for t in texts] == [True, True, False, False]
        best = rr.compute_score(LONG_PAIRS, chunking=chunking)
        best_chunk = rr.last_usage.best_chunk
        first = rr.compute_score(LONG_PAIRS, chunking=Chunking(size=16, overlap=4, aggregate="first"))
        plain = rr.compute_score(LONG_PAIRS)
    per_chunk = [reference.scores([[q, t] for t in ts]) for (q, _), ts in zip(LONG_PAIRS, texts)]
    err_first = assert_scores_close(first, [s[0] for s in per_chunk], "f32", "the first chunk's score")
    err_best = assert_scores_close(best, [s[b] for s, b in zip(per_chunk, best_chunk)], "f32", "the best chunk's score")
    assert_scores_close(best, [s.max() for s in per_chunk], "f32", "the max over the chunks")
    # A document that fits: exactly the unchunked score, and that is the reference's on the whole prompt.
    assert best[2:] == plain[2:]
    assert_scores_close(plain[2:], reference.scores(LONG_PAIRS[2:]), "f32", "documents that fit")
    report("chunked f32", first=err_first, best=err_best)


# --- `reranker score` ---------------------------------------------------------------------------


def test_score_job_and_saved_hidden_states(model, reference, pairs_input, tmp_path):
    from reranker.cli import main

    out, hid = tmp_path / "out.jsonl", tmp_path / "hidden.npy"
    assert main(score_args(model, pairs_input, out, "--per", "pair", "--save-hidden", hid)) == 0
    score_err = assert_scores_close(job_scores(out), reference.scores(PAIRS), "f32", "reranker score")
    rows = {r["query_id"]: i for i, r in enumerate(read_jsonl(out))}
    saved = np.load(hid)[[rows[f"q{i}"] for i in range(len(PAIRS))]]
    hidden_err = assert_hidden_close(saved, reference.hidden(PAIRS), "f32", "--save-hidden rows")
    # The saved states through the streaming head (`reranker head`, score_embeddings: the fused path).
    from head import ScoringHead, score_embeddings

    head = ScoringHead.from_npz(model.parent / "mlp_weights.npz")
    head_err = assert_scores_close(score_embeddings(head, saved), reference.scores(PAIRS), "f32",
                                   "score_embeddings on the saved states")
    report("reranker score", score=score_err, hidden=hidden_err, head=head_err)


def test_deterministic_and_chunked_score_job(model, reference, pairs_input, tmp_path):
    from reranker.cli import main

    out = tmp_path / "det.jsonl"
    assert main(score_args(model, pairs_input, out, "--per", "pair", "--deterministic", "--chunk")) == 0
    # Every pair fits (max_length 10240): chunking changes nothing, each pair is its whole prompt.
    assert all(r["chunks"] == 1 for r in read_jsonl(out))
    report("reranker score --deterministic --chunk",
           score=assert_scores_close(job_scores(out), reference.scores(PAIRS), "f32", "reranker score --deterministic"))


@pytest.mark.slow
def test_score_job_on_two_device_processes(model, reference, pairs_input, tmp_path):
    out = tmp_path / "two.jsonl"
    res = run(score_cmd(model, pairs_input, out, "--per", "pair", "--devices", "cpu,cpu", "--window", "4"))
    assert res.returncode == 0, res.stderr
    report("reranker score --devices cpu,cpu",
           score=assert_scores_close(job_scores(out), reference.scores(PAIRS), "f32", "--devices cpu,cpu"))


@pytest.mark.slow
def test_ray_engine(ray_cluster, model, reference, pairs_input, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from reranker.cli import main

    out = tmp_path / "ray"
    assert main([*score_args(model, pairs_input, out, "--threads", "1"), "--engine", "ray", "--actors", "1",
                 "--shard-windows", "2"]) == 0
    table = pq.read_table(out).to_pylist()
    by_query = {r["query_id"]: r["score"] for r in table}
    got = [by_query[f"q{i}"] for i in range(len(PAIRS))]
    report("--engine ray", score=assert_scores_close(got, reference.scores(PAIRS), "f32", "--engine ray"))


# --- the rerank server ------------------------------------------------------------------------------


def test_server_jina_and_cohere_shapes(tiny_reranker, reference):
    pytest.importorskip("uvicorn")
    import httpx
    from helpers import running_server

    query = PAIRS[0][0]
    docs = [d for _, d in PAIRS]
    want = reference.scores([[query, d] for d in docs])
    with running_server(tiny_reranker) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        jina = client.post("/v1/rerank", json={"model": "m", "query": query, "documents": docs})
        cohere = client.post("/v2/rerank", json={"model": "m", "query": query, "documents": docs})
        single = [client.post("/v1/rerank", json={"model": "m", "query": q, "documents": [d]}) for q, d in PAIRS]
    errors = {}
    for name, r in (("v1", jina), ("v2", cohere)):
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == sorted(range(len(docs)), key=lambda i: -want[i])
        got = [x["relevance_score"] for x in sorted(results, key=lambda x: x["index"])]
        errors[name] = assert_scores_close(got, want, "f32", f"/{name}/rerank")
    assert all(r.status_code == 200 for r in single)
    got = [r.json()["results"][0]["relevance_score"] for r in single]
    errors["one pair a request"] = assert_scores_close(got, reference.scores(PAIRS), "f32", "/v1/rerank, one pair")
    report("server", **errors)

