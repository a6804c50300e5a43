"""jina-reranker-m0 from its GGUF release: a llama.cpp backbone and a PyTorch scoring head.

The package follows a pair through the model:
- `engine/`: pairs -> prompt ids (tokenizer, prompts) -> packed decode calls (batching) ->
  last hidden states (backbone, and the fast path's identity output) -> scores (scoring);
- `api.py`: `Reranker`, the Python API over the engine and the torch head (`head` package);
- `jobs/`: offline jobs: input records -> windows of scores -> crash-safe outputs;
- `gguf/`: model files: header checks, Hub resolution, conversion, quantization;
- `bench/`, `compat/`, `synth/`, `cli/`: the quantization benchmark, llama-embedding
  compatibility, synthetic checkpoints, and the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reranker.errors import RerankerError
from reranker.options import Chunking

if TYPE_CHECKING:
    from reranker.api import Reranker, Usage
    from reranker.engine.prompts import format_prompt
    from reranker.engine.scoring import ScoredDocuments
    from reranker.images.pdf import pdf_pages
    from reranker.settings import LoadSettings

__all__ = ["Chunking", "LoadSettings", "Reranker", "RerankerError", "ScoredDocuments", "Usage", "format_prompt", "pdf_pages"]
__version__ = "0.1.0"

# Loaded on first use, so `import reranker.errors` (the `head` package does) needs no llama.cpp.
_LAZY = {"Reranker": "reranker.api", "Usage": "reranker.api", "format_prompt": "reranker.engine.prompts",
         "LoadSettings": "reranker.settings", "ScoredDocuments": "reranker.engine.scoring", "pdf_pages": "reranker.images.pdf"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reranker' has no attribute {name!r}")
