"""PyTorch scoring head of jina-reranker-m0: load, run, fine-tune and export it.

head = ScoringHead.from_npz("mlp_weights.npz")
probs = head(embeddings)                   # (..., H) -> (...)
scores = score_embeddings(head, "emb.npy")  # large arrays, streamed in chunks
"""

from .errors import HeadLoadError
from .model import ScoringHead
from .streaming import score_embeddings
from .weights import LOGIT_BIAS, HeadWeights

__all__ = ["LOGIT_BIAS", "HeadLoadError", "HeadWeights", "ScoringHead", "score_embeddings"]
