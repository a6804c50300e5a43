"""Deterministic mode: a pair's score is bit-identical alone and inside any batch.

Without it a pair's score moves with its batch neighbours (F16 and quantized GGUFs): another
packing puts its prompt at other KV cells (attention sums over cells in SIMD lanes and 64-cell
tiles), splits it at other physical-batch boundaries, or leaves its output alone in the last
layer's mat-mul (a one-row kernel that sums in another order); and torch picks the head's
mat-mul kernel by row count. Deterministic mode decodes each prompt alone from an empty cache
and runs the head one row at a time.
"""

from __future__ import annotations

import random

import pytest
from oracle import assert_scores_close

from reranker import Reranker, RerankerError
from reranker.gguf.quantize import quantize

WORDS = "alpha beta gamma delta 机器 学习 🎉 code() x=1 résumé rerank query".split()


def mixed_pairs(n, seed=0):
    rng = random.Random(seed)
    return [[" ".join(rng.choices(WORDS, k=rng.randint(0, 8))), " ".join(rng.choices(WORDS, k=rng.randint(0, 300)))]
            for _ in range(n)]


def load(path, deterministic):
    return Reranker.from_pretrained(str(path), device="cpu", n_ctx=2048, deterministic=deterministic)


def scores_alone_and_batched(path, pairs, deterministic):
    rr = load(path, deterministic)
    try:
        assert rr.deterministic == deterministic
        batched = rr.compute_score(pairs, batch_size=100)
        alone = [rr.compute_score(p) for p in pairs]
        reversed_ = rr.compute_score(pairs[::-1], batch_size=100)[::-1]
    finally:
        rr.close()
    return batched, alone, reversed_


def test_deterministic_scores_do_not_depend_on_the_batch_f16(tiny_ggufs, reference):
    pairs = mixed_pairs(40)
    batched, alone, reversed_ = scores_alone_and_batched(tiny_ggufs["f16"], pairs, True)
    assert batched == alone == reversed_  # bit for bit
    # ... and right, not only the same: the reference's scores within the F16 tolerance.
    assert_scores_close(batched, reference.scores(pairs), "f16", "deterministic F16 vs transformers")


def test_deterministic_must_be_a_bool(tiny_ggufs):
    with pytest.raises(RerankerError, match="deterministic='yes' must be True or False"):
        Reranker.from_pretrained(str(tiny_ggufs["f16"]), deterministic="yes")


@pytest.fixture(scope="module")
def tiny_q8_0(tiny_ggufs, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "jina-reranker-m0-tiny-Q8_0.gguf"
    quantize(tiny_ggufs["f16"], out, "Q8_0")
    (out.parent / "mlp_weights.npz").write_bytes((tiny_ggufs["f16"].parent / "mlp_weights.npz").read_bytes())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("level", ["f16", "q8_0"])
def test_deterministic_scores_are_bit_identical_in_batches_of_100(tiny_ggufs, tiny_q8_0, reference, level):
    path = tiny_q8_0 if level == "q8_0" else tiny_ggufs["f16"]
    pairs = mixed_pairs(100, seed=1)
    batched, alone, _ = scores_alone_and_batched(path, pairs, False)
    # The default packing moves scores here: what the deterministic mode must remove.
    assert batched != alone, "the default mode showed no batch dependence: the test below proves nothing"
    batched, alone, reversed_ = scores_alone_and_batched(path, pairs, True)
    assert batched == alone == reversed_
    if level == "f16":  # Q8_0 has no float reference to meet: test_quantized bounds it against F16
        assert_scores_close(batched, reference.scores(pairs), "f16", "deterministic F16 vs transformers")
