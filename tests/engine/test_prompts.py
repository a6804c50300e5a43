"""Prompt token ids against the reference's (tests/oracle.py: its own template, the checkpoint's
tokenizer in the `tokenizers` library), and the truncation rule."""

from __future__ import annotations

import pytest
from conftest import PAIRS
from oracle import hf_tokenizer, prompt_ids

from reranker.defaults import SCORE_TOKEN_ID
from reranker.engine.backbone import Backbone
from reranker.engine.prompts import PromptBuilder

# Characters whose UTF-8 ends in a lone 0xA7 byte token: the byte token that was id 100
# before the release swapped `<|box_end|>` onto it.
RANK_100_TEXT = "ç§ 𝒧"


@pytest.fixture(scope="module")
def backbone(tiny_ggufs):
    with Backbone(tiny_ggufs["f32"], n_ctx=2048, n_batch=512) as b:
        yield b


@pytest.fixture(scope="module")
def hf_tok(tiny_checkpoint):
    return hf_tokenizer(tiny_checkpoint)  # user text is text: no special-token parsing


@pytest.mark.parametrize("pair", PAIRS, ids=range(len(PAIRS)))
def test_ids_equal_the_references(backbone, hf_tok, pair):
    query, doc = pair
    prompt = PromptBuilder(backbone.tokenizer).build(query, doc)
    want = prompt_ids(hf_tok, query, doc)
    assert want[-1] == 100 and want.count(100) == 1
    assert prompt.ids == want
    assert not prompt.truncated


def test_reference_prompt_is_the_model_cards_text(hf_tok):
    # The reference's template, checked on its own: document first, then the query, no special tokens.
    ids = prompt_ids(hf_tok, "slm markdown", "We present ReaderLM-v2")
    assert hf_tok.decode(ids[:-1]) == "**Document**:\nWe present ReaderLM-v2\n**Query**:\nslm markdown"


def test_special_strings_stay_text(backbone):
    prompt = PromptBuilder(backbone.tokenizer).build("q <|box_end|>", "d <|endoftext|> <|box_end|>")
    assert prompt.ids.count(SCORE_TOKEN_ID) == 1 and prompt.ids[-1] == SCORE_TOKEN_ID
    assert 151643 not in prompt.ids and 151649 not in prompt.ids


def test_swapped_byte_token_maps_back_to_original_id(backbone, hf_tok):
    # The release moved the old text of id 100 to 151649; the original model sees 100.
    ids = backbone.tokenizer.encode(RANK_100_TEXT)
    reference = hf_tok.encode(RANK_100_TEXT).ids
    assert SCORE_TOKEN_ID in reference, "test text must exercise the swapped byte token"
    assert ids == reference


def test_truncation_keeps_scoring_token_and_counts(backbone):
    builder = PromptBuilder(backbone.tokenizer, max_length=128, max_query_length=16)
    long_doc = "lorem ipsum dolor sit amet. " * 500
    long_query = "why " * 100
    p = builder.build(long_query, long_doc)
    assert p.truncated and len(p.ids) <= 128 and p.ids[-1] == SCORE_TOKEN_ID
    text = backbone.tokenizer.decode(p.ids[:-1])
    assert text.startswith("**Document**:\nlorem ipsum")
    query_part = text.split("\n**Query**:\n", 1)[1]
    assert len(backbone.tokenizer.encode(query_part)) <= 16
    short = builder.build("short", "short doc")
    assert not short.truncated


def test_query_longer_than_budget_still_ends_with_scoring_token(backbone):
    builder = PromptBuilder(backbone.tokenizer, max_length=32, max_query_length=512)
    p = builder.build("word " * 200, "doc")
    assert p.truncated and len(p.ids) == 32 and p.ids[-1] == SCORE_TOKEN_ID
