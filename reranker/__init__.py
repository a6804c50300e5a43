"""jina-reranker-m0 from its GGUF release: a llama.cpp backbone and a PyTorch scoring head."""

from .api import Reranker, Usage
from .errors import RerankerError
from .prompts import format_prompt

__all__ = ["Reranker", "RerankerError", "Usage", "format_prompt"]
__version__ = "0.1.0"
