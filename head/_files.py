"""File checks shared by the format modules (writes go through `reranker.atomic`)."""

from __future__ import annotations

import os

from .errors import HeadLoadError, describe_source


def existing_file(path: str | os.PathLike[str], what: str, fix: str) -> str:
    """Return `path` as str, or raise HeadLoadError saying why it cannot be read."""
    p = os.fspath(path)
    src = describe_source(p)
    if not os.path.exists(p):
        raise HeadLoadError(f"{src}: file not found; {fix}")
    if os.path.isdir(p):
        raise HeadLoadError(f"{src}: is a directory, expected {what}; {fix}")
    return p
