"""File-system helpers shared by the format modules."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import IO, Iterator

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path next to `path` and rename it into place on success,
    so a crash never leaves a half-written head where a good one was."""
    target = os.fspath(path)
    # A unique sibling name (not mkstemp) so the final file gets normal umask permissions, not 0600.
    tmp = os.path.join(os.path.dirname(os.path.abspath(target)), f".tmp-head-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """atomic_path for writers that take a file object (np.savez would otherwise append '.npz' to the name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh
