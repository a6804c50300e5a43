"""Score pairs: expand them into prompts (chunks too), sort by length so decode calls pack tightly, aggregate.

Every caller goes through here (`Reranker.score_documents`, the job's windows, the device
processes, Ray actors, the server), so one set of pairs scored as one call gives the same bits
wherever it is scored:

- `prepare`: pairs -> `Prepared` (one prompt per pair, or one per chunk with chunking); cheap to
  pickle, so a job tokenises on a reader thread and scores in another process;
- `score_prepared`: one call of `score_prompts` over all of a `Prepared`'s prompts, the
  non-finite check, chunk scores aggregated per pair, the usage counts;
- `score_prompts`: the kernel: sort by length, decode, head, restore order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from reranker.engine.chunking import Chunker, DocumentPrompts, aggregate
from reranker.engine.prompts import Prompt, PromptBuilder
from reranker.engine.segments import Embeddings, Image, PendingImage, Segments
from reranker.errors import RerankerError
from reranker.options import Chunking


@dataclass(frozen=True)
class Scored:
    """A window's scores (float32, n) and, when kept, its prompts' last hidden states (n, n_embd), in prompt order."""

    scores: np.ndarray
    hidden: np.ndarray | None = None


def score_prompts(reranker, prompts: Sequence[Prompt], *, keep_hidden: bool = False,
                  name: Callable[[int], str] | None = None) -> Scored:
    """Relevance scores of `prompts`, in their order, through `reranker`'s backbone and head.

    `keep_hidden`: also the hidden states the scores come from (the same decode), else `hidden` is None.
    `name`: a non-finite score is a RerankerError naming `name(i)` for prompt i (None: no check).
    """
    lengths = np.fromiter((len(p.ids) for p in prompts), dtype=np.int64, count=len(prompts))
    order = np.argsort(-lengths, kind="stable")
    sequences = [prompts[i].ids for i in order]
    if any(isinstance(s, Segments) and s.pending for s in sequences):  # images built as pixels: project them now
        # One image in many prompts (a server request's image query) is projected once.
        encoded: dict[PendingImage, Embeddings] = {}

        def encode(image: PendingImage) -> Embeddings:
            if image not in encoded:
                encoded[image] = reranker.vision.encode(image)
            return encoded[image]

        sequences = [s.encoded(encode) if isinstance(s, Segments) else s for s in sequences]
    embeddings = reranker.backbone.embed(sequences)
    scores = np.empty(len(prompts), dtype=np.float32)
    scores[order] = reranker.score_embeddings(embeddings)
    if name is not None:
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:  # the first in prompt order, as a caller counts
            i = int(bad[0])
            row = int(np.flatnonzero(order == i)[0])
            part = "GGUF (its hidden state is not finite)" if not np.isfinite(embeddings[row]).all() else "head"
            raise RerankerError(f"the model returned a non-finite score ({scores[i]}) for {name(i)}; "
                                f"the {part} is likely broken")
    hidden = None
    if keep_hidden:
        hidden = np.empty_like(embeddings)
        hidden[order] = embeddings
    return Scored(scores, hidden)


@dataclass
class Usage:
    """What the last call did: pairs scored, prompt tokens decoded, prompts truncated, and the
    backbone's weight encoding (`Reranker.weights_dtype`: "BF16", "F16", "Q8_0", ...)."""

    pairs: int = 0
    tokens: int = 0
    truncated: int = 0
    weights: str = ""
    #: With chunking: documents split into chunks, documents that hit `max_chunks`, and per pair its
    #: number of chunks and the index of its best-scoring chunk (None without chunking).
    chunked: int = 0
    capped: int = 0
    chunks: list[int] | None = None
    best_chunk: list[int] | None = None

    def add(self, other: Usage) -> None:
        """Add `other`'s counts (the pairs of a later batch of the same call)."""
        self.pairs += other.pairs
        self.tokens += other.tokens
        self.truncated += other.truncated
        self.chunked += other.chunked
        self.capped += other.capped
        if other.chunks is not None:
            self.chunks = (self.chunks or []) + other.chunks
            self.best_chunk = (self.best_chunk or []) + other.best_chunk


@dataclass
class Prepared:
    """Pairs as prompts: per pair its `DocumentPrompts` (one prompt, or one per chunk with `chunking`)."""

    docs: list[DocumentPrompts]
    chunking: Chunking | None = None
    #: Per pair, how an error names it (e.g. the job's query and doc ids); None: "pair i".
    names: list[str] | None = None
    prompts: list[Prompt] = field(init=False, repr=False)  # every pair's prompts, flat, in pair order

    def __post_init__(self) -> None:
        self.prompts = [p for d in self.docs for p in d.prompts]

    @property
    def counts(self) -> np.ndarray:
        """Prompts per pair."""
        return np.fromiter((len(d.prompts) for d in self.docs), dtype=np.int64, count=len(self.docs))

    @property
    def tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    def usage(self, weights: str = "") -> Usage:
        """The counts of scoring these pairs (chunks and best chunks are filled by `score_prepared`)."""
        u = Usage(pairs=len(self.docs), tokens=self.tokens, truncated=sum(d.truncated for d in self.docs), weights=weights)
        if self.chunking is not None:
            u.chunked = sum(d.split for d in self.docs)
            u.capped = sum(d.capped for d in self.docs)
        return u

    def document_of(self, prompt: int) -> int:
        """The pair that prompt `prompt` belongs to."""
        return int(np.searchsorted(np.cumsum(self.counts), prompt, side="right"))

    def pair_scores(self, prompt_scores: np.ndarray) -> np.ndarray:
        """One score per pair from the scores of `prompts` (with chunking, its chunks' aggregate)."""
        return prompt_scores if self.chunking is None else self.aggregate(prompt_scores).scores

    def aggregate(self, prompt_scores: np.ndarray):
        """Per pair: its score from its prompts' scores, its number of chunks and its best chunk (`ChunkScores`)."""
        return aggregate(prompt_scores, self.counts, self.chunking.aggregate if self.chunking is not None else "first")


def prepare(builder: PromptBuilder, pairs: Sequence[tuple[str | Image, str | Image]],
            chunking: Chunking | None = None, names: list[str] | None = None) -> Prepared:
    """Pairs -> prompts, truncated as the original model (or, with `chunking`, a long text document split into chunks).

    Either side of a pair may be an image (`Embeddings`, or a `PendingImage` that `score_prompts` encodes;
    `PromptBuilder.build_parts`); such a pair is one prompt."""
    if chunking is None:
        return Prepared([DocumentPrompts([builder.build_parts(q, d)]) for q, d in pairs], names=names)
    chunker = Chunker(builder, chunking)
    return Prepared([chunker.prompts(q, d) if isinstance(q, str) and isinstance(d, str) else
                     chunker.image_query_prompts(q, d) if isinstance(d, str) else
                     DocumentPrompts([builder.build_parts(q, d)]) for q, d in pairs], chunking, names)


@dataclass
class ScoredDocuments:
    """Per pair, in order: `scores` (float32); with chunking its number of `chunks` and its `best_chunk`
    (else None); with `keep_hidden` the hidden state its score comes from (`hidden`, (n, n_embd)); `usage`."""

    scores: np.ndarray
    chunks: np.ndarray | None = None
    best_chunk: np.ndarray | None = None
    hidden: np.ndarray | None = None
    usage: Usage = field(default_factory=Usage)


def check_keep_hidden(chunking: Chunking | None, keep_hidden: bool) -> None:
    if keep_hidden and chunking is not None and chunking.aggregate == "mean":
        raise RerankerError("hidden states with chunking aggregate 'mean': a mean of chunk scores is no one hidden "
                            "state's score; use aggregate 'max' or 'first' (the state is then the scoring chunk's)")


def score_prepared(reranker, prepared: Prepared, *, keep_hidden: bool = False, first: int = 0,
                   pair_name: Callable[[int], str] | None = None, check_finite: bool = True) -> ScoredDocuments:
    """Score `prepared` as one call: all its prompts (chunks too) length-sorted and packed together.

    A non-finite score is a RerankerError naming its pair (`pair_name(i)`; default "pair {first + i}"),
    unless `check_finite` is False.
    With chunking a pair's hidden state is its scoring chunk's: the best for "max", the first for "first".
    """
    check_keep_hidden(prepared.chunking, keep_hidden)
    names = prepared.names
    name = pair_name or ((lambda i: names[i]) if names is not None else (lambda i: f"pair {first + i}"))
    counts = prepared.counts
    chunked = prepared.chunking is not None
    if not check_finite:
        name = None
    elif chunked:
        name = (lambda p, pair=name: pair(prepared.document_of(p)))
    scored = score_prompts(reranker, prepared.prompts, keep_hidden=keep_hidden, name=name)
    usage = prepared.usage(reranker.weights_dtype)
    if not chunked:
        return ScoredDocuments(scored.scores, hidden=scored.hidden, usage=usage)
    result = prepared.aggregate(scored.scores)
    usage.chunks, usage.best_chunk = result.chunks.tolist(), result.best.tolist()
    hidden = None
    if keep_hidden:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        hidden = scored.hidden[starts + (result.best if prepared.chunking.aggregate == "max" else 0)]
    return ScoredDocuments(result.scores, result.chunks, result.best, hidden, usage)
