"""Tokens per decode call (`n_batch`): its default by device, and scores that stay the reference's at any value.

On the CPU a call is one physical batch (512 tokens), since the prompts packed in one call share its
KV cache and llama.cpp's CPU attention visits every cell filled earlier in the call
(benchmarks/profile.py --n-batch 2048,512). Packing other prompts together must not move a score
beyond the oracle's tolerance: checked on 24 mixed pairs (up to ~580 tokens, so some calls hold one
long prompt, others several short ones, and the longest are fed in chunks) at the new default and
at the old 2048.
"""

from __future__ import annotations

import numpy as np
import pytest
from oracle import assert_scores_close
from test_deterministic import mixed_pairs

from reranker import Reranker
from reranker.defaults import N_BATCH_CPU
from reranker.engine.backbone import Backbone


def test_the_cpu_default_is_one_physical_batch_per_call(tiny_ggufs):
    with Backbone(tiny_ggufs["f16"], n_ctx=2048, n_gpu_layers=0) as b:
        assert b.n_batch == N_BATCH_CPU == 512
    with Backbone(tiny_ggufs["f16"], n_ctx=2048, n_batch=1024, n_gpu_layers=0) as b:
        assert b.n_batch == 1024  # a given value is kept
    with Backbone(tiny_ggufs["f16"], n_ctx=256, n_gpu_layers=0) as b:
        assert b.n_batch == 256  # and capped by n_ctx, as a given one is


@pytest.mark.parametrize("level", ["f32", "f16"])
def test_scores_are_the_references_at_the_default_and_at_2048(tiny_ggufs, reference, level):
    pairs = mixed_pairs(24, seed=1)  # 8053 tokens; six prompts of 477-577
    want = reference.scores(pairs)
    errors = {}
    for n_batch in (None, 2048):
        with Reranker.from_pretrained(str(tiny_ggufs[level]), device="cpu", n_ctx=2048, n_batch=n_batch) as rr:
            assert rr.backbone.n_batch == (n_batch or N_BATCH_CPU)
            scores = rr.compute_score(pairs, batch_size=len(pairs))
            assert rr.last_usage.tokens > 4 * N_BATCH_CPU  # several calls at either value
        errors[n_batch] = assert_scores_close(scores, want, level, f"{level} n_batch={n_batch or 'default'}")
    print(f"\n{level}: max |score - reference| at the default n_batch {errors[None]:.3g}, at 2048 {errors[2048]:.3g}")


def test_a_long_prompt_is_fed_in_equal_chunks(tiny_ggufs):
    """572 tokens at n_batch 512 go in as 286 + 286, not 512 + 60: a chunk under 64 tokens takes llama.cpp's
    CPU attention for few query rows, which rounds the queries to F16 (twice the score error on such prompts)."""
    ids = [int(i) for i in np.random.default_rng(0).integers(200, 5000, size=572)]
    states = {}
    for n_batch in (512, 286, 300):
        with Backbone(tiny_ggufs["f16"], n_ctx=2048, n_batch=n_batch, n_gpu_layers=0) as b:
            states[n_batch] = b.embed([ids])
    # The same two chunks of 286 (each one physical batch) at all three, so the same bits.
    np.testing.assert_array_equal(states[512], states[286])
    np.testing.assert_array_equal(states[300], states[286])
