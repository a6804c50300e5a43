"""(query, document) pairs -> prompt token ids, with the original model's truncation rule.

A side that is an image (its `Embeddings`, or a `PendingImage` still to encode) makes the prompt `Segments`: the original's template
with `<|vision_start|>` image `<|vision_end|>` in that side's place (`build_parts`).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from reranker.defaults import DOC_PREFIX, MAX_LENGTH, MAX_QUERY_LENGTH, QUERY_PREFIX, SCORE_TOKEN_ID, VISION_END_ID, VISION_START_ID
from reranker.engine.segments import Image, Segments
from reranker.engine.tokenizer import SAFE_CUT, GGUFTokenizer
from reranker.errors import RerankerError
from reranker.options import check_lengths, default_max_doc_length


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

#: First characters of a document that `DOC_PREFIX`'s last pre-token (its punctuation run "**:" takes
#: every newline after it) would take in; after any other the document's own ids are the prompt's.
_INSEPARABLE_START = frozenset("\r\n")


class PromptBuilder:
    """Tokenises pairs so the scoring token is the single last token and user text stays text.

    Truncation follows the original model, made strict: the query keeps at most
    `max_query_length` tokens; a document of `max_doc_length` tokens or more is replaced by the
    text of its first `max_doc_length` tokens (the original's own step: default
    `max(max_length - max_query_length, max_query_length)`, 9728 at 10240 / 512); the document is
    then cut further if the prompt still does not fit `max_length`, and the scoring token always
    survives. The original instead cuts the whole prompt from the right at `max_length - 1`
    tokens, so a long query loses its end (and, when the capped document leaves it too little
    room, the query's end too). With a query of at most `max_query_length` tokens whose prompt
    fits after the document cap, the ids equal the original's exactly.

    The query is tokenised once per builder and query (a call's, or a job window's, pairs share
    one): a prompt's ids are the ids of `DOC_PREFIX + document` followed by those of
    `QUERY_PREFIX + query` wherever that equals tokenising the whole prompt (the document ends in
    an ASCII letter or digit, `_SEPARABLE_END`), else the whole prompt is tokenised. A document long
    enough to need its own ids for the cap (`document_ids`) is not tokenised again: unless it starts
    with a newline (`_INSEPARABLE_START`), they follow the ids of `DOC_PREFIX`, up to its last
    point where a text tokenises as its two sides (the tokenizer's `SAFE_CUT`) when its end is not separable.
    """

    def __init__(self, tokenizer: GGUFTokenizer, max_length: int = MAX_LENGTH, max_query_length: int = MAX_QUERY_LENGTH,
                 max_doc_length: int | None = None) -> None:
        check_lengths(max_length, max_query_length, max_doc_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_query_length = max_query_length
        #: Document tokens at most (None given: the original's default for these two lengths).
        self.max_doc_length = default_max_doc_length(max_length, max_query_length) if max_doc_length is None else max_doc_length
        # One entry each (a tuple, swapped whole, so threads sharing a builder see a consistent pair).
        self._fitted: tuple[str, tuple[str, bool]] | None = None  # (query, fit_query's answer)
        self._tail: tuple[str, list[int]] | None = None  # (fitted query, ids of QUERY_PREFIX + it)
        self._head: list[int] | None = None  # ids of DOC_PREFIX

    def prompt_ids(self, query: str, document: str, doc_ids: list[int] | None = None) -> list[int]:
        """Ids of `format_prompt(query, document)` (no cut, no scoring token), the query's part tokenised once;
        `doc_ids`: the document's own ids when known (used where they are the prompt's, else ignored)."""
        if document[-1:] not in _SEPARABLE_END:
            return self.tokenizer.encode(format_prompt(query, document))
        tail = self._tail
        if tail is None or tail[0] != query:
            tail = self._tail = (query, self.tokenizer.encode(QUERY_PREFIX + query))
        if doc_ids is not None and document[:1] not in _INSEPARABLE_START:
            return self._doc_prefix_ids() + doc_ids + tail[1]
        return self.tokenizer.encode(DOC_PREFIX + document) + tail[1]

    def _doc_prefix_ids(self) -> list[int]:
        head = self._head
        if head is None:
            head = self._head = self.tokenizer.encode(DOC_PREFIX)
        return head

    def _ids_with_own(self, query: str, document: str, doc_ids: list[int]) -> list[int]:
        """`prompt_ids` of a document whose own ids are known: tokenised again only after its last `SAFE_CUT`."""
        if document[-1:] in _SEPARABLE_END or document[:1] in _INSEPARABLE_START:
            return self.prompt_ids(query, document, doc_ids)
        text = unicodedata.normalize("NFC", document)  # what the tokenizer cuts into pieces, as here
        cuts = [m.start() for m in SAFE_CUT.finditer(text, max(0, len(text) - 4096))]
        if not cuts:  # no cut point near the end: the whole prompt
            return self.prompt_ids(query, document)
        rest = text[cuts[-1] :]
        kept = len(doc_ids) - len(self.tokenizer.encode(rest))
        return self._doc_prefix_ids() + doc_ids[:kept] + self.tokenizer.encode(format_prompt(query, rest)[len(DOC_PREFIX) :])

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

    def document_ids(self, document: str) -> list[int] | None:
        """The document's own ids, or None when it surely has fewer than `max_doc_length` tokens.

        A token holds at least one byte, so a document whose NFC-normalised UTF-8 (what the tokenizer
        reads) is shorter than `max_doc_length` bytes is not tokenised here.
        """
        if len(document) * 12 >= self.max_doc_length:  # NFC grows a character to 3 at most, 4 bytes each
            nfc = unicodedata.normalize("NFC", document)
            if len(nfc.encode("utf-8", "surrogatepass")) >= self.max_doc_length:  # the tokenizer names a lone surrogate
                return self.tokenizer.encode(document)
        return None

    def cap_document(self, document: str) -> tuple[str, bool]:
        """The document as the original cuts it before building the prompt, and whether that dropped tokens.

        A document of `max_doc_length` tokens or more becomes the text of its first `max_doc_length`
        tokens (an incomplete UTF-8 character at the cut decoded to U+FFFD, as the original's decode
        does); one of exactly that many tokens keeps its tokens and is not counted as truncated.
        """
        text, cut, _ = self._capped(document)
        return text, cut

    def _capped(self, document: str) -> tuple[str, bool, list[int] | None]:
        # `cap_document`, and the document's ids when they were read and it was not cut (None otherwise).
        ids = self.document_ids(document)
        if ids is None or len(ids) < self.max_doc_length:
            return document, False, ids
        text = self.tokenizer.decode_bytes(ids[: self.max_doc_length]).decode("utf-8", errors="replace")
        return text, len(ids) > self.max_doc_length, None

    def build(self, query: str, document: str) -> Prompt:
        """Prompt ids of one pair; for text that needs no cut they equal tokenising the whole prompt."""
        query, truncated = self.fit_query(query)
        return self.build_fitted(query, document, truncated)

    def build_fitted(self, query: str, document: str, truncated: bool = False) -> Prompt:
        """`build` for a query already cut by `fit_query` (`truncated`: it was)."""
        budget = self.budget
        document, capped, doc_ids = self._capped(document)
        truncated = truncated or capped
        ids = self.prompt_ids(query, document) if doc_ids is None else self._ids_with_own(query, document, doc_ids)
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
        tokens, a text document to `max_doc_length` (`cap_document`), then the text side to fit
        `max_length`; an image that cannot fit is a RerankerError.
        """
        if not isinstance(query, Image) and not isinstance(document, Image):
            return self.build(query, document)
        truncated = False
        if not isinstance(query, Image):
            query, truncated = self.fit_query(query)
        elif not isinstance(document, Image):
            document, truncated = self.cap_document(document)
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
