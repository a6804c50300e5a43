"""The one exception type raised when a head cannot be loaded."""

from __future__ import annotations

import os


class HeadLoadError(ValueError):
    """A head file or state dict is unusable; the message names the source, the problem and the fix."""


def describe_source(source: object) -> str:
    """How error messages refer to a file path or an in-memory state dict."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    return "the given state dict"
