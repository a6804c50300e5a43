"""Score one window of prompts: sort by length so decode calls pack tightly, then restore order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reranker.engine.prompts import Prompt


@dataclass(frozen=True)
class Scored:
    """A window's scores (float32, n) and, when kept, its prompts' last hidden states (n, n_embd), in prompt order."""

    scores: np.ndarray
    hidden: np.ndarray | None = None


def score_prompts(reranker, prompts: Sequence[Prompt], *, keep_hidden: bool = False) -> Scored:
    """Relevance scores of `prompts`, in their order, through `reranker`'s backbone and head.

    `keep_hidden`: also the hidden states the scores come from (the same decode), else `hidden` is None.
    """
    lengths = np.fromiter((len(p.ids) for p in prompts), dtype=np.int64, count=len(prompts))
    order = np.argsort(-lengths, kind="stable")
    embeddings = reranker.backbone.embed([prompts[i].ids for i in order])
    scores = np.empty(len(prompts), dtype=np.float32)
    scores[order] = reranker.score_embeddings(embeddings)
    hidden = None
    if keep_hidden:
        hidden = np.empty_like(embeddings)
        hidden[order] = embeddings
    return Scored(scores, hidden)
