"""Long documents: split into overlapping token chunks, score each as its own prompt, aggregate.

A document longer than the room a prompt leaves (`max_length` minus the template, the query and
the scoring token), or than `max_doc_length` (the builder's document cap, which would otherwise cut it),
is cut on token boundaries into chunks of `size` tokens (never more than that room or cap allows), consecutive chunks
sharing `overlap` tokens. m0 puts the document first, so every chunk's prompt still ends with the
query and the scoring token; chunks are ordinary prompts (`PromptBuilder`), packed into decode
calls with everything else. The document's score is the max (or mean, or first) of its chunks'.

A boundary never splits a character: Qwen2's byte-level BPE has tokens that hold part of a
UTF-8 character (CJK, emoji), so a boundary moves down to the nearest token boundary that is
also a character boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reranker.engine.prompts import Prompt, PromptBuilder, format_prompt
from reranker.engine.segments import Image
from reranker.options import MIN_CHUNK, Chunking

#: Tokens kept free in each prompt: a chunk's text may tokenise into a few more tokens than its
#: span (BPE merges differ at its edges), and a prompt that still does not fit loses the excess.
MARGIN = 8


@dataclass(frozen=True)
class DocumentPrompts:
    """The prompts of one pair: one, or one per chunk when the document did not fit.

    `split`: the document was chunked; `capped`: it had more than `max_chunks` chunks, and its
    end was not scored.
    """

    prompts: list[Prompt]
    split: bool = False
    capped: bool = False

    @property
    def truncated(self) -> bool:
        """Some of the pair was not scored: a cut query, a capped document, or a cut chunk."""
        return self.capped or any(p.truncated for p in self.prompts)


def char_boundaries(pieces: Sequence[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The text's bytes, each token boundary's byte offset (n + 1), and which boundaries start a character."""
    data = b"".join(pieces)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    raw = np.frombuffer(data + b"\0", dtype=np.uint8)  # the sentinel makes the end a boundary
    safe = (raw[offsets] & 0xC0) != 0x80  # not a UTF-8 continuation byte
    return data, offsets, safe


def token_spans(safe: np.ndarray, size: int, overlap: int, max_chunks: int) -> tuple[list[tuple[int, int]], bool]:
    """Chunks `[start, end)` of the tokens whose boundaries `safe` (n + 1 flags) may be cut at.

    Each chunk holds at most `size` tokens (more only when one character spans more tokens than
    that) and starts `overlap` tokens before the previous one ends, moved down to a character
    boundary. Returns the spans and whether `max_chunks` stopped them before the end.
    """
    n = len(safe) - 1
    spans: list[tuple[int, int]] = []
    start = previous_end = 0
    while True:
        low = max(start, previous_end) + 1  # each chunk reaches past the one before
        end = max(min(start + size, n), low)
        while end > low and not safe[end]:
            end -= 1
        while not safe[end]:  # no character boundary in reach: take the character whole
            end += 1
        spans.append((start, end))
        previous_end = end
        if end >= n:
            return spans, False
        if len(spans) == max_chunks:
            return spans, True
        nxt = end - overlap
        while nxt > start and not safe[nxt]:
            nxt -= 1
        start = nxt if nxt > start else end


class Chunker:
    """Pairs -> `DocumentPrompts`: the builder's prompt when the document fits, else one per chunk."""

    def __init__(self, builder: PromptBuilder, chunking: Chunking) -> None:
        self.builder = builder
        self.chunking = chunking
        self._base: tuple[str, int] | None = None  # (fitted query, tokens of its prompt with no document)

    def prompts(self, query: str, document: str) -> DocumentPrompts:
        """The prompts of one pair (a document that fits gives exactly `builder.build`'s prompt)."""
        query, query_cut = self.builder.fit_query(query)
        texts, capped = self._texts(query, document)
        if texts is None:
            return DocumentPrompts([self.builder.build_fitted(query, document, query_cut)])
        return DocumentPrompts([self.builder.build_fitted(query, t, query_cut) for t in texts], split=True, capped=capped)

    def image_query_prompts(self, query: Image, document: str) -> DocumentPrompts:
        """The prompts of an image query and a text document: the document's chunks, each after the same image."""
        full = self.builder.build_parts(query, document)
        texts, capped = self._image_query_texts(query, document) if full.truncated else (None, False)
        if texts is None:
            return DocumentPrompts([full])
        return DocumentPrompts([self.builder.build_parts(query, t) for t in texts], split=True, capped=capped)

    def _image_query_texts(self, query: Image, document: str) -> tuple[list[str] | None, bool]:
        room = self._room(self.builder.max_length - len(self.builder.build_parts(query, "").ids))
        return self._split(document, min(self.chunking.size or room, room))

    def _room(self, free: int) -> int:
        """Tokens a chunk may hold when `free` tokens of the prompt are left for it: no more than the
        builder's document cap either (less `MARGIN` from each), so no chunk is cut by that cap."""
        return min(free, self.builder.max_doc_length) - MARGIN

    def chunk_texts(self, query: str | Image, document: str) -> list[str]:
        """The text of each chunk (`[document]` when it fits): what each chunk's prompt holds as its document."""
        if isinstance(query, Image):
            full = self.builder.build_parts(query, document)
            texts = self._image_query_texts(query, document)[0] if full.truncated else None
        else:
            texts, _ = self._texts(self.builder.fit_query(query)[0], document)
        return [document] if texts is None else texts

    def _texts(self, query: str, document: str) -> tuple[list[str] | None, bool]:
        builder = self.builder
        tokenizer, budget = builder.tokenizer, builder.budget
        doc_ids = builder.document_ids(document)
        over_cap = doc_ids is not None and len(doc_ids) > builder.max_doc_length
        if not over_cap and len(builder.prompt_ids(query, document, doc_ids)) <= budget:
            return None, False
        base = self._base  # read once: a chunker may be shared by threads
        if base is None or base[0] != query:  # the query once per chunker, not per document
            base = self._base = (query, len(tokenizer.encode(format_prompt(query, ""))))
        room = self._room(budget - base[1])
        return self._split(document, min(self.chunking.size or room, room), doc_ids)

    def _split(self, document: str, size: int, ids: list[int] | None = None) -> tuple[list[str] | None, bool]:
        """The document's chunks of `size` tokens (None: too little room to chunk: truncate as without chunking);
        `ids`: the document's ids when already known."""
        if size < MIN_CHUNK:  # the query leaves no useful room
            return None, False
        tokenizer = self.builder.tokenizer
        data, offsets, safe = char_boundaries(tokenizer.pieces(tokenizer.encode(document) if ids is None else ids))
        spans, capped = token_spans(safe, size, self.chunking.overlap_for(size), self.chunking.max_chunks)
        return [data[offsets[a] : offsets[b]].decode("utf-8") for a, b in spans], capped


@dataclass
class ChunkScores:
    """Per document: its score, its number of chunks and the index of its best-scoring chunk."""

    scores: np.ndarray
    chunks: np.ndarray
    best: np.ndarray


def aggregate(chunk_scores: np.ndarray, counts: Sequence[int], how: str) -> ChunkScores:
    """Combine consecutive runs of `counts` chunk scores: "max", "mean" (in float64) or "first".

    `best` is the run's highest-scoring chunk (the first of equals) whatever `how` is.
    """
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    scores = np.empty(len(counts), dtype=np.float32)
    best = np.empty(len(counts), dtype=np.int64)
    for i, (a, k) in enumerate(zip(starts, counts)):
        run = chunk_scores[a : a + k]
        best[i] = int(np.argmax(run))
        scores[i] = run[best[i]] if how == "max" else run[0] if how == "first" else run.astype(np.float64).mean()
    return ChunkScores(scores, counts, best)
