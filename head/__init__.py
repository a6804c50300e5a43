"""PyTorch scoring head of jina-reranker-m0: load, run, fine-tune and export it.

head = ScoringHead.from_npz("mlp_weights.npz")
probs = head(embeddings)                   # (..., H) -> (...)
scores = score_embeddings(head, "emb.npy")  # large arrays, streamed in chunks
states = load_hidden("hidden.npy")          # `reranker score --save-hidden`: states + ids, memory-mapped
"""

from .errors import HeadLoadError
from .hidden_states import HiddenStates, load_hidden
from .model import ScoringHead
from .streaming import score_embeddings
from .weights import LOGIT_BIAS, HeadWeights

__all__ = ["LOGIT_BIAS", "HeadLoadError", "HeadWeights", "HiddenStates", "ScoringHead", "load_hidden", "score_embeddings"]
