"""Generation mode with an identity output projection gives embedding mode's hidden states."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import PAIRS

from reranker import RerankerError
from reranker.engine.backbone import Backbone
from reranker.engine.identity import with_identity_output
from reranker.engine.prompts import PromptBuilder


def states(path, fast, n_batch=512):
    with Backbone(path, n_ctx=2048, n_batch=n_batch, fast=fast) as b:
        builder = PromptBuilder(b.tokenizer)
        seqs = [builder.build(q, d).ids for q, d in PAIRS] + [builder.build("long", "many words " * 300).ids]
        return b.embed(seqs)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_f32_identity_equals_embedding_mode(tiny_ggufs, outtype):
    ref = states(tiny_ggufs[outtype], fast=False)
    fast = states(with_identity_output(tiny_ggufs[outtype], "f32"), fast=True, n_batch=256)  # long one chunked
    np.testing.assert_allclose(fast, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_f16_identity_is_half_precision_rounding(tiny_ggufs):
    ref = states(tiny_ggufs["f32"], fast=False)
    fast = states(with_identity_output(tiny_ggufs["f32"], "f16"), fast=True)
    assert np.all(np.abs(fast - ref) <= 2.0**-11 * np.abs(ref) + 1e-7)
    assert np.any(fast != ref), "f16 rounding should be visible"


def test_identity_copy_is_cached(tiny_ggufs):
    first = with_identity_output(tiny_ggufs["f16"], "f32")
    mtime = os.stat(first).st_mtime_ns
    assert with_identity_output(tiny_ggufs["f16"], "f32") == first and os.stat(first).st_mtime_ns == mtime
    assert with_identity_output(first, "f32") == first  # already has one
    assert first.parent == __import__("pathlib").Path(os.environ["RERANKER_CACHE"])


def test_fast_needs_identity_output(tiny_ggufs):
    with pytest.raises(RerankerError, match="identity output"):
        Backbone(tiny_ggufs["f32"], n_ctx=512, fast=True)
