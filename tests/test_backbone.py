"""llama.cpp's last-token hidden state against transformers' Qwen2-VL on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PAIRS

from reranker.engine.backbone import Backbone
from reranker.engine.identity import with_identity_output
from reranker.engine.prompts import PromptBuilder


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fast", [False, True], ids=["embedding-mode", "fast"])
@pytest.mark.parametrize("outtype,tol", [("f32", 1e-3), ("f16", 1e-2)])
def test_last_hidden_state_matches_transformers(tiny_ggufs, oracle, outtype, tol, fast):
    from oracle import last_hidden

    path = with_identity_output(tiny_ggufs[outtype], "f32") if fast else tiny_ggufs[outtype]
    with Backbone(path, n_ctx=2048, n_batch=512, fast=fast) as backbone:
        builder = PromptBuilder(backbone.tokenizer)
        seqs = [builder.build(q, d).ids for q, d in PAIRS]
        got = backbone.embed(seqs)
    assert got.shape == (len(PAIRS), backbone.n_embd) and got.dtype == np.float32
    errors = [rel_err(got[i], last_hidden(oracle, ids)) for i, ids in enumerate(seqs)]
    assert max(errors) < tol, errors
    # Different prompts must give clearly different states, or the comparison proves little.
    assert min(rel_err(got[i], got[j]) for i in range(len(seqs)) for j in range(i)) > 0.05


def test_long_sequence_fed_in_chunks_matches_one_pass(tiny_ggufs, oracle):
    from oracle import last_hidden

    with Backbone(tiny_ggufs["f32"], n_ctx=2048, n_batch=128) as backbone:
        ids = PromptBuilder(backbone.tokenizer).build("chunked", "some words here " * 150).ids
        assert len(ids) > 3 * 128
        got = backbone.embed([ids, ids[:50]])
    assert rel_err(got[0], last_hidden(oracle, ids)) < 1e-3
    assert rel_err(got[1], last_hidden(oracle, ids[:50])) < 1e-3
