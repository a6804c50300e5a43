"""(query, document) pairs -> prompt token ids, with the original model's truncation rule.

A side that is an image (its `Embeddings`, or a `PendingImage` still to encode) makes the prompt `Segments`: the original's template
with `<|vision_start|>` image `<|vision_end|>` in that side's place (`build_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass

from reranker.defaults import DOC_PREFIX, MAX_LENGTH, MAX_QUERY_LENGTH, QUERY_PREFIX, SCORE_TOKEN_ID, VISION_END_ID, VISION_START_ID
from reranker.engine.segments import Image, Segments
from reranker.engine.tokenizer import GGUFTokenizer
from reranker.errors import RerankerError
from reranker.options import check_lengths


def format_prompt(query: str, document: str) -> str:
    """The prompt text of one pair, without the scoring token."""
    return f"{DOC_PREFIX}{document}{QUERY_PREFIX}{query}"


@dataclass(frozen=True)
class Prompt:
    """Token ids of one pair, ending with the scoring token (`Segments` when a side is an image)."""

    ids: list[int] | Segments
    truncated: bool


#: Last characters of a document after which the prompt's `QUERY_PREFIX` ("\n...") starts a new
#: pre-token: a letter run or a digit ends there, while punctuation or whitespace would take the
#: newline along. ASCII only, where llama.cpp's and Python's character classes surely agree.
_SEPARABLE_END = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


class PromptBuilder:
    """Tokenises pairs so the scoring token is the single last token and user text stays text.

    Truncation follows the original model, made strict: the query keeps at most
    `max_query_length` tokens, the document is cut to fit `max_length`, and the scoring
    token always survives.

    The query is tokenised once per builder and query (a call's, or a job window's, pairs share
    one): a prompt's ids are the ids of `DOC_PREFIX + document` followed by those of
    `QUERY_PREFIX + query` wherever that equals tokenising the whole prompt (the document ends in
    an ASCII letter or digit, `_SEPARABLE_END`), else the whole prompt is tokenised.
    """

    def __init__(self, tokenizer: GGUFTokenizer, max_length: int = MAX_LENGTH, max_query_length: int = MAX_QUERY_LENGTH) -> None:
        check_lengths(max_length, max_query_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_query_length = max_query_length
        # One entry each (a tuple, swapped whole, so threads sharing a builder see a consistent pair).
        self._fitted: tuple[str, tuple[str, bool]] | None = None  # (query, fit_query's answer)
        self._tail: tuple[str, list[int]] | None = None  # (fitted query, ids of QUERY_PREFIX + it)

    def prompt_ids(self, query: str, document: str) -> list[int]:
        """Ids of `format_prompt(query, document)` (no cut, no scoring token), the query's part tokenised once."""
        if document[-1:] not in _SEPARABLE_END:
            return self.tokenizer.encode(format_prompt(query, document))
        tail = self._tail
        if tail is None or tail[0] != query:
            tail = self._tail = (query, self.tokenizer.encode(QUERY_PREFIX + query))
        return self.tokenizer.encode(DOC_PREFIX + document) + tail[1]

    @property
    def budget(self) -> int:
        """Prompt tokens before the scoring token."""
        return self.max_length - 1

    def fit_query(self, query: str) -> tuple[str, bool]:
        """The query cut to `max_query_length` tokens, and whether it was cut."""
        memo = self._fitted
        if memo is not None and memo[0] == query:
            return memo[1]
        query_ids = self.tokenizer.encode(query)
        if len(query_ids) <= self.max_query_length:
            fitted = query, False
        else:
            fitted = self.tokenizer.decode(query_ids[: self.max_query_length]), True
        self._fitted = (query, fitted)
        return fitted

    def build(self, query: str, document: str) -> Prompt:
        """Prompt ids of one pair; for text that needs no cut they equal tokenising the whole prompt."""
        query, truncated = self.fit_query(query)
        return self.build_fitted(query, document, truncated)

    def build_fitted(self, query: str, document: str, truncated: bool = False) -> Prompt:
        """`build` for a query already cut by `fit_query` (`truncated`: it was)."""
        budget = self.budget
        ids = self.prompt_ids(query, document)
        if len(ids) > budget:
            truncated = True
            ids = self._cut_document(query, document, ids, budget)
        return Prompt(ids + [SCORE_TOKEN_ID], truncated)

    def _cut_document(self, query: str, document: str, ids: list[int], budget: int) -> list[int]:
        # Cut at a token boundary of the document alone, then re-tokenise the whole prompt:
        # tokens can merge across the document's edges, so repeat until it fits.
        doc_ids = self.tokenizer.encode(document)
        keep = len(doc_ids)
        while len(ids) > budget and keep > 0:
            keep = max(0, keep - (len(ids) - budget))
            ids = self.prompt_ids(query, self.tokenizer.decode(doc_ids[:keep]))
        # Only a query longer than the whole budget gets here still too long: cut its end.
        return ids[:budget]

    def build_parts(self, query: str | Image, document: str | Image) -> Prompt:
        """The prompt of a pair in which either side (or both) may be an image.

        The original's template with the image's rows between `<|vision_start|>` and `<|vision_end|>`
        in its side's place; the text between them tokenised span by span, as the original's tokenizer
        splits at special tokens. An image is never cut: a text query is cut to `max_query_length`
        tokens, then the text side to fit `max_length`; an image that cannot fit is a RerankerError.
        """
        if not isinstance(query, Image) and not isinstance(document, Image):
            return self.build(query, document)
        truncated = False
        if not isinstance(query, Image):
            query, truncated = self.fit_query(query)
        text = query if not isinstance(query, Image) else document if not isinstance(document, Image) else ""

        def with_text(t: str) -> Segments:  # the prompt with the text side (if any) replaced by `t`
            q = t if not isinstance(query, Image) else query
            d = t if not isinstance(document, Image) and isinstance(query, Image) else document
            return Segments(tuple(self._parts(q, d)))

        prompt = with_text(text)
        if len(prompt) > self.max_length:
            if len(with_text("")) > self.max_length:
                images = [e for e in (document, query) if isinstance(e, Image)]
                # A loaded image is named as its caller named it ("documents[1] image"); embeddings are not.
                sizes = " and ".join(f"{getattr(e, 'name', 'an image')} of {e.ny} x {e.nx}" for e in images)
                raise RerankerError(f"{sizes} merged patches ({sum(e.n_tokens for e in images)} tokens) does not fit "
                                    f"max_length={self.max_length} with the template: give the image fewer pixels, "
                                    "or raise max_length")
            ids = self.tokenizer.encode(text)
            keep = len(ids)
            while len(prompt) > self.max_length and keep > 0:  # tokens can merge at the cut: repeat until it fits
                keep = max(0, keep - (len(prompt) - self.max_length))
                prompt = with_text(self.tokenizer.decode(ids[:keep]))
            truncated = True
        return Prompt(prompt, truncated)

    def _parts(self, query: str | Image, document: str | Image) -> list:
        # Walk the template DOC_PREFIX, document, QUERY_PREFIX, query; an image flushes the text before it.
        parts, text = [], DOC_PREFIX
        for side, after in ((document, QUERY_PREFIX), (query, "")):
            if isinstance(side, Image):
                parts += [self.tokenizer.encode(text), [VISION_START_ID], side, [VISION_END_ID]]
                text = after
            else:
                text += side + after
        return [*parts, self.tokenizer.encode(text), [SCORE_TOKEN_ID]]
