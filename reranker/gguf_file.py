"""Checks on a GGUF path before llama.cpp or gguf-py sees it, so errors name the file."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RerankerError

GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Fail early, with the path in the message, on a missing or non-GGUF file."""
    p = Path(path)
    if not p.is_file():
        raise RerankerError(f"GGUF file not found: {p}. Pass a local .gguf path or a Hub id like 'jinaai/jina-reranker-m0-GGUF:Q8_0'")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise RerankerError(f"{p} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); it may be truncated or another format")
    return p
