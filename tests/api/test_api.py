"""End to end: `compute_score` against the original model's formula, batching, errors."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from conftest import PAIRS

from head import ScoringHead
from reranker import Reranker, RerankerError


def test_compute_score_matches_original_model(reference, tiny_reranker):
    # The reference builds its own prompts and runs transformers and the checkpoint's score MLP.
    from oracle import assert_scores_close

    got = np.array(tiny_reranker.compute_score(PAIRS))
    assert_scores_close(got, reference.scores(PAIRS), "f32", "compute_score vs the original model")
    assert got.std() > 0.02, "scores should spread, else the comparison proves little"


def test_single_pair_gives_float(tiny_reranker):
    s = tiny_reranker.compute_score(PAIRS[0])
    assert isinstance(s, float) and 0 < s < 1
    assert s == pytest.approx(tiny_reranker.compute_score([PAIRS[0]])[0], abs=1e-7)


@pytest.mark.slow
def test_batch_invariance(tiny_reranker):
    rng = random.Random(0)
    words = "alpha beta gamma delta 机器 学习 🎉 code() x=1\n".split(" ")
    pairs = [[" ".join(rng.choices(words, k=rng.randint(0, 8))), " ".join(rng.choices(words, k=rng.randint(0, 300)))]
             for _ in range(100)]
    batched = tiny_reranker.compute_score(pairs, batch_size=100)
    for i in (0, 17, 42, 99):
        alone = tiny_reranker.compute_score(pairs[i])
        assert alone == pytest.approx(batched[i], abs=1e-5)
    small_batches = tiny_reranker.compute_score(pairs, batch_size=7)
    np.testing.assert_allclose(small_batches, batched, atol=1e-5)


def test_rank_sorts_like_cross_encoder(tiny_reranker):
    query = PAIRS[0][0]
    docs = [d for _, d in PAIRS[:6]]
    ranked = tiny_reranker.rank(query, docs, return_documents=True)
    scores = tiny_reranker.compute_score([[query, d] for d in docs])
    assert [r["corpus_id"] for r in ranked] == sorted(range(6), key=lambda i: -scores[i])
    assert all(r["text"] == docs[r["corpus_id"]] for r in ranked)
    top = tiny_reranker.rank(query, docs, top_k=2)
    assert len(top) == 2 and set(top[0]) == {"corpus_id", "score"}


def test_embed_returns_last_hidden_states(tiny_reranker, reference):
    from oracle import assert_hidden_close

    emb = tiny_reranker.embed(PAIRS[:3])
    assert emb.shape == (3, tiny_reranker.backbone.n_embd)
    assert_hidden_close(emb, reference.hidden(PAIRS[:3]), "f32", "embed vs transformers")
    np.testing.assert_allclose(tiny_reranker.score_embeddings(emb), tiny_reranker.compute_score(PAIRS[:3]), atol=1e-7)


def test_long_document_is_truncated_and_counted(tiny_reranker):
    pairs = [["q", "word " * 5000], ["q", "short"]]
    scores = tiny_reranker.compute_score(pairs, max_length=256)
    assert all(0 < s < 1 for s in scores)
    assert tiny_reranker.last_usage.truncated == 1 and tiny_reranker.last_usage.pairs == 2
    short = len(tiny_reranker.prompt_builder().build("q", "short").ids)
    assert 256 - 8 <= tiny_reranker.last_usage.tokens - short <= 256


def test_a_long_document_is_cut_to_max_doc_length_as_the_original(tiny_reranker, reference, tiny_ggufs):
    # The original cuts the document to max_doc_length tokens first (default max(max_length - 512, 512)):
    # here 512 of its ~1100, where filling the room the query leaves would score ~500 more.
    from oracle import assert_hidden_close, assert_scores_close

    pairs = [["what is a reranker?", "A reranker scores how relevant a document is to a query. 机器学习 🎉 " * 60],
             ["q", "a short document"]]
    rr = tiny_reranker
    for limits in ({"max_length": 1024}, {"max_doc_length": 100}, {"max_length": 600, "max_doc_length": 300}):
        want = [reference.ids(q, d, **limits) for q, d in pairs]
        got = rr.compute_score(pairs, **limits)
        assert rr.last_usage.tokens == sum(map(len, want)) and rr.last_usage.truncated == 1, limits
        assert_scores_close(got, reference.scores(pairs, **limits), "f32", f"compute_score{limits} vs the original")
        assert_hidden_close(rr.embed(pairs, **limits), reference.hidden(pairs, **limits), "f32", f"embed{limits}")
        assert rr.last_usage.tokens == sum(map(len, want))
    assert rr.compute_score(pairs, max_length=1024) != rr.compute_score(pairs, max_length=1024, max_doc_length=900)
    assert rr.score_documents(pairs, max_doc_length=100).scores.tolist() == rr.compute_score(pairs, max_doc_length=100)
    single = rr.compute_score(pairs[0], max_doc_length=100, show_progress=True)  # the original's name of show_progress_bar
    assert single == pytest.approx(rr.compute_score(pairs, max_doc_length=100)[0], abs=1e-6)
    with pytest.raises(RerankerError, match=r"max_doc_length=0 is invalid"):
        rr.compute_score(pairs, max_doc_length=0)
    # A loading setting too: every call's default.
    with Reranker.from_pretrained(str(tiny_ggufs["f32"]), device="cpu", n_ctx=4096, n_batch=1024, max_doc_length=100) as capped:
        assert capped.prompt_builder().max_doc_length == 100 and capped.prompt_builder(1024).max_doc_length == 100
        assert capped.compute_score(pairs) == pytest.approx(rr.compute_score(pairs, max_doc_length=100), abs=1e-6)
        assert capped.compute_score(pairs, max_doc_length=512) == pytest.approx(rr.compute_score(pairs, max_length=1024), abs=1e-6)


@pytest.mark.parametrize("bad,match", [
    ([["q", 3]], "document must be a str"),
    ([["q", None]], "document must be a str"),
    ([[b"q", "d"]], "query must be a str"),
    ([["q"]], "length 1"),
    (["q", "d", "e"], "pair 0"),
])
def test_non_string_input_is_a_clear_error(tiny_reranker, bad, match):
    with pytest.raises(RerankerError, match=match):
        tiny_reranker.compute_score(bad)


def test_missing_gguf(tmp_path):
    with pytest.raises(RerankerError, match="not found"):
        Reranker.from_pretrained(str(tmp_path / "nope.gguf"))


def test_corrupt_gguf(tmp_path, tiny_ggufs):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(RerankerError, match="not a GGUF file"):
        Reranker.from_pretrained(str(bad), head=tiny_ggufs["f32"].parent / "mlp_weights.npz")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_ggufs["f32"].read_bytes()[:100_000])
    for fast in (True, False):
        with pytest.raises(RerankerError, match="corrupt"):
            Reranker.from_pretrained(str(truncated), head=tiny_ggufs["f32"].parent / "mlp_weights.npz", fast=fast)


def test_missing_head_names_the_fix(tmp_path, tiny_ggufs):
    lonely = tmp_path / "lonely-F32.gguf"
    shutil.copy(tiny_ggufs["f32"], lonely)
    with pytest.raises(RerankerError, match="mlp_weights.npz"):
        Reranker.from_pretrained(str(lonely))


def test_head_size_must_match_backbone(tmp_path, tiny_ggufs):
    wrong = tmp_path / "mlp_weights.npz"
    ScoringHead(32).save_npz(wrong)
    with pytest.raises(RerankerError, match="hidden size 32"):
        Reranker.from_pretrained(str(tiny_ggufs["f32"]), head=wrong)
