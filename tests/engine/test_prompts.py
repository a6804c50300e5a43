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


# --- the document cap (the original's `max_doc_length`) ---------------------------------------

def long_document(n_words: int, seed: int = 0) -> str:
    """Mixed text (English, CJK, emoji, code, newlines) of about 2.5 tokens a word: cuts land inside characters too."""
    import random

    rng = random.Random(seed)
    words = ["reranker", "scores", "documents", "机器学习", "人工智能", "🎉", "👩‍👩‍👧", "résumé", "x=1;", "\n\n", "Ω", "δ", "the"]
    return " ".join(rng.choice(words) for _ in range(n_words)) + " end"


@pytest.fixture(scope="module")
def long_doc(hf_tok):
    doc = long_document(5000)
    assert 11_000 < len(hf_tok.encode(doc).ids) < 14_000  # longer than the default cap, 9728, and than max_length
    return doc


@pytest.mark.parametrize("max_length", [10240, 1024, 600])
@pytest.mark.parametrize("query", ["what is a reranker?", "机器学习 🎉", ""])
def test_long_document_ids_equal_the_originals(tokenizer, hf_tok, long_doc, max_length, query):
    # The document is cut to max(max_length - 512, 512) tokens first, as the original's compute_score
    # does; before that cap it filled all the room the query left (~500 tokens more than the original's).
    prompt = PromptBuilder(tokenizer, max_length).build(query, long_doc)
    want = prompt_ids(hf_tok, query, long_doc, max_length=max_length)
    assert prompt.ids == want and prompt.truncated
    assert len(want) < max_length  # the capped prompt fits: the original cut nothing more (its query is whole)


def test_an_explicit_max_doc_length_and_the_truncated_flag(tokenizer, hf_tok):
    from reranker.engine.chunking import char_boundaries

    doc = long_document(400, seed=1)
    doc_ids = tokenizer.encode(doc)
    _, _, safe = char_boundaries(tokenizer.pieces(doc_ids))
    mid_char = next(k for k in range(50, len(doc_ids)) if not safe[k])  # a cut inside a character: U+FFFD, as the original
    for cap in (mid_char, 100, len(doc_ids) - 1):
        builder = PromptBuilder(tokenizer, max_doc_length=cap)
        assert builder.max_doc_length == cap
        p = builder.build("a query", doc)
        assert p.ids == prompt_ids(hf_tok, "a query", doc, max_doc_length=cap) and p.truncated, cap
    assert "\ufffd" in hf_tok.decode(hf_tok.encode(doc).ids[:mid_char])
    for cap in (len(doc_ids), len(doc_ids) + 1, 10**6):  # the whole document: nothing dropped, not truncated
        p = PromptBuilder(tokenizer, max_doc_length=cap).build("a query", doc)
        assert p.ids == prompt_ids(hf_tok, "a query", doc, max_doc_length=cap) and not p.truncated, cap
    # The default is the original's formula of the two other lengths.
    assert PromptBuilder(tokenizer).max_doc_length == 9728
    assert PromptBuilder(tokenizer, 1024).max_doc_length == PromptBuilder(tokenizer, 600).max_doc_length == 512
    assert PromptBuilder(tokenizer, 4096, 1000).max_doc_length == 3096


def test_max_doc_length_is_checked(tokenizer):
    from reranker import RerankerError
    from reranker.settings import LoadSettings

    for bad in (0, -1, 1.5, True, "100"):
        with pytest.raises(RerankerError, match=r"max_doc_length=.* must be an integer >= 1"):
            PromptBuilder(tokenizer, max_doc_length=bad)
        with pytest.raises(RerankerError, match="max_doc_length"):
            LoadSettings(model="x.gguf", max_doc_length=bad)
    assert LoadSettings(model="x.gguf", max_doc_length=1).max_doc_length == 1


def test_a_text_document_beside_an_image_query_is_capped(tokenizer, hf_tok, long_doc):
    import numpy as np

    from reranker.defaults import DOC_PREFIX, QUERY_PREFIX
    from reranker.engine.segments import Embeddings

    query = Embeddings(np.zeros((4, 8), np.float32), nx=2, ny=2)
    for max_length, cap in ((10240, None), (1024, None), (10240, 300)):
        p = PromptBuilder(tokenizer, max_length, max_doc_length=cap).build_parts(query, long_doc)
        cap = cap or max(max_length - 512, 512)
        doc = hf_tok.decode(hf_tok.encode(long_doc).ids[:cap])  # the original's cut
        parts = p.ids.parts
        assert p.truncated and parts[1] == [151652] and parts[2] is query and parts[-1] == [SCORE_TOKEN_ID]
        assert list(parts[0]) == hf_tok.encode(DOC_PREFIX + doc + QUERY_PREFIX).ids, (max_length, cap)


def test_a_document_whose_own_ids_were_read_but_not_cut_gives_the_whole_prompts_ids(tokenizer, hf_tok):
    # Its ids, read for the cap, stand for its part of the prompt (re-tokenised only after its last cut point).
    base = long_document(300, seed=2)
    for doc in (base, base + ".", base + "\n", "\n" + base + ".", base + " 🎉", base + " e\u0301.", "x" * 3000 + "."):
        n = len(tokenizer.encode(doc))
        builder = PromptBuilder(tokenizer, max_doc_length=n + 1)
        assert builder.document_ids(doc) is not None, "the document's own ids must be read, or this proves nothing"
        p = builder.build("a query", doc)
        assert p.ids == prompt_ids(hf_tok, "a query", doc) and not p.truncated, repr(doc[-20:])
