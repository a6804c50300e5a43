"""Score one window of prompts: sort by length so decode calls pack tightly, then restore order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reranker.engine.prompts import Prompt


def score_prompts(reranker, prompts: Sequence[Prompt], *, keep_hidden: bool = False):
    """Relevance scores (float32) of `prompts`, in their order, through `reranker`'s backbone and head.

    `keep_hidden`: return (scores, hidden states (n, n_embd) in the same order), from the same decode.
    """
    lengths = np.fromiter((len(p.ids) for p in prompts), dtype=np.int64, count=len(prompts))
    order = np.argsort(-lengths, kind="stable")
    embeddings = reranker.backbone.embed([prompts[i].ids for i in order])
    scores = np.empty(len(prompts), dtype=np.float32)
    scores[order] = reranker.score_embeddings(embeddings)
    if keep_hidden:
        hidden = np.empty_like(embeddings)
        hidden[order] = embeddings
        return scores, hidden
    return scores
