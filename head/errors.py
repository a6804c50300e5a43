"""The exception raised when a head cannot be loaded: a `reranker.RerankerError`."""

from __future__ import annotations

import os

from reranker.errors import RerankerError


class HeadLoadError(RerankerError):
    """A head file or state dict is unusable; the message names the source, the problem and the fix."""


def describe_source(source: object) -> str:
    """How error messages refer to a file path or an in-memory state dict."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    return "the given state dict"
