"""Tokenising in pieces and the query tokenised once: the ids equal whole-text tokenisation.

Long text goes to llama.cpp in pieces (so a request can stop between two, and no lock is held
for a whole document), and a prompt's ids are those of `DOC_PREFIX + document` followed by the
query's part, tokenised once per query. Both are checked on hostile text (trailing whitespace,
newlines, combining characters, special-token strings, CJK, emoji, digits, contractions) against
one llama_tokenize call over the whole text and against the checkpoint's own `tokenizer.json`
(the `tokenizers` library, tests/oracle.py).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from oracle import hf_tokenizer, prompt_ids

from reranker.engine.prompts import PromptBuilder, format_prompt
from reranker.engine.tokenizer import Cancelled, cancelled_by, text_pieces

WHOLE = 10**12  # piece_chars that never cuts: one llama_tokenize call

FRAGMENTS = ["rank", "Document", "检索", "🎉", "café", "e\u0301", "x\u0301\u0302", "ﬁ", "Ω", "ß", "it's", "'ll", "I'D",
             " ", "  ", "   ", "\n", "\n\n", " \n", "\r\n", "\t", "\u00a0", "\u2028", "\u200b", "\u3000", "\f",
             ".", "...", "!?", "**", ":", "'", "\"", "12345", "3.14", "0x7f", "٣", "<|box_end|>", "<|endoftext|>",
             "<|im_start|>", "<#sep#>", "ç§", "𝒧", "-", "_", "a", "Z", "9"]


def hostile_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 60))
        out.append("".join(FRAGMENTS[i] for i in rng.integers(len(FRAGMENTS), size=k)))
    return out


@pytest.fixture(scope="module")
def hf_tok(tiny_checkpoint):
    return hf_tokenizer(tiny_checkpoint)


def test_text_in_pieces_tokenises_as_the_whole(tokenizer, hf_tok):
    texts = hostile_texts(300, seed=0)
    cut = 0
    for text in texts:
        whole = tokenizer.encode(text, piece_chars=WHOLE)
        assert whole == hf_tok.encode(text).ids, repr(text)
        for size in (1, 2, 5, 17):
            cut += len(text_pieces(text, size)) - 1
            assert tokenizer.encode(text, piece_chars=size) == whole, (size, repr(text))
    assert cut > 1000, "the texts were hardly cut: the test would prove little"


def test_pieces_join_to_the_text_and_are_bounded_where_a_cut_is_possible():
    text = " ".join(f"word{i}" for i in range(10_000))
    pieces = text_pieces(text, 1000)
    assert "".join(pieces) == text and len(pieces) > 50
    assert max(len(p) for p in pieces) <= 1000 + len(" word9999")
    assert text_pieces("x" * 5000, 100) == ["x" * 5000], "no safe cut in one long pre-token: kept whole"


def test_prompt_ids_with_the_query_tokenised_once_equal_the_whole_prompt(tokenizer, hf_tok):
    queries = hostile_texts(12, seed=1) + ["what is a reranker?", "", " trailing ", "<|box_end|>"]
    docs = hostile_texts(80, seed=2) + ["ends in a", "ends in 7", "ends in .", "ends in space ", "ends in newline\n",
                                        "ends in é", "ends in e\u0301", "ends in x\u0301", "ends in <|box_end|>", "",
                                        # starts the prefix's last pre-token ":\n" would take in (or not)
                                        "\nstarts with a newline", "\n\nstarts with two", "\r\nstarts with CRLF", "\rCR",
                                        " \nspace then newline", "\tTAB", "\u2028LS", "\u0301mark", "'s contraction 1",
                                        "long " * 1000 + "e\u0301 \u0958 é.\n", "x" * 5000 + ".", " ".join(hostile_texts(300, 3))]
    separable = 0
    for query in queries:
        builder = PromptBuilder(tokenizer)
        for doc in docs:
            text = format_prompt(query, doc)
            want = tokenizer.encode(text, piece_chars=WHOLE)
            assert builder.prompt_ids(query, doc) == want, (repr(query), repr(doc))
            # A document's own ids (read for the document cap) stand for its part of the prompt.
            assert builder.prompt_ids(query, doc, tokenizer.encode(doc)) == want, (repr(query), repr(doc))
            assert builder._ids_with_own(query, doc, tokenizer.encode(doc)) == want, (repr(query), repr(doc))
            assert builder.build(query, doc).ids == prompt_ids(hf_tok, query, doc), (repr(query), repr(doc))
            separable += doc[-1:].isascii() and doc[-1:].isalnum()
    assert separable > 100, "few documents took the query-once path: the test would prove little"


def test_the_query_is_tokenised_once_per_builder(tokenizer):
    calls = []
    encode = tokenizer.encode

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text, *a, **k):
            calls.append(text)
            return encode(text, *a, **k)

    query = "a long query about rerankers " * 20
    builder = PromptBuilder(Counting())
    docs = [f"document {i} about retrieval" for i in range(50)]
    prompts = [builder.build(query, d) for d in docs]
    assert sum(query.strip() in c for c in calls) == 2, "the query: once to fit it, once with its prefix"
    fresh = PromptBuilder(tokenizer)
    assert [p.ids for p in prompts] == [fresh.build_fitted(query, d).ids for d in docs]


def test_a_set_event_stops_tokenising_between_pieces(tokenizer):
    text = " ".join(["rerank"] * 200_000)
    event = threading.Event()
    event.set()
    with cancelled_by(event), pytest.raises(Cancelled):
        tokenizer.encode(text)
    assert len(tokenizer.encode("still works")) > 0, "outside the block nothing is cancelled"


def test_threads_tokenise_at_once_and_get_the_ids_of_one_at_a_time(tokenizer):
    """No lock serialises llama_tokenize (each call has its own buffer): eight threads at once get what one
    thread alone gets, and a long text in one thread does not hold the others back until it ends."""
    from concurrent.futures import ThreadPoolExecutor

    texts = hostile_texts(64, seed=3) + [" ".join(["rerank"] * 50_000)]
    want = [tokenizer.encode(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(tokenizer.encode, texts * 4))
    assert got == want * 4
