"""Files that appear whole or not at all: the one atomic-write helper, and command output.

Everything this package writes for the user (outputs, checkpoints, cached GGUF copies, heads,
quantized files) is written under a unique sibling temporary name, made durable, and renamed
into place, so a crash or an error midway never leaves a truncated file that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TextIO

from reranker.errors import RerankerError


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a folder's entries durable: a rename or a new file survives a crash only once they are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed onto `target`.

    The folder is fsynced too, so the rename survives a power loss. On any error the temporary
    file is removed and `target` is left as it was. The name is unique (pid and a random
    part), so concurrent writers of the same target never collide.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike[str], mode: str = "wb", **open_kw: object) -> Iterator[IO]:
    """`atomic_path` for callers that write through a file object."""
    with atomic_path(target) as tmp, open(tmp, mode, **open_kw) as fh:  # type: ignore[call-overload]
        yield fh


@contextlib.contextmanager
def open_output(path: str | None, *, binary: bool = False) -> Iterator[tuple[TextIO | None, str | None]]:
    """Yield (text stream, temporary path) for a command's `-o PATH`; `None` or '-' means stdout.

    With `binary`, the stream is None and the caller writes the temporary path itself.
    Write errors become a `RerankerError` naming `path`. A symbolic link is written through (the
    file it names is replaced, the link stays); a device or a pipe (`/dev/null`, a fifo) is written
    to directly, never replaced by a regular file (a binary output cannot go there).
    """
    if path is None or path == "-":
        if binary:
            raise RerankerError("binary output cannot go to stdout; give a file with -o FILE")
        if sys.stdout is None:
            raise RerankerError("standard output is closed; give a file with -o FILE")
        yield sys.stdout, None
        sys.stdout.flush()
        return
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise RerankerError(f"-o {path} is a directory; give a file name")
    try:
        if target.exists() and not target.is_file():  # a device, fifo or socket: there is nothing to replace atomically
            if binary:
                raise RerankerError(f"-o {path} is not a regular file; this output is a file written in place: "
                                    "give a file name")
            with open(target, "w", encoding="utf-8", newline="") as fh:
                yield fh, str(target)
            return
        with atomic_path(target) as tmp:
            if binary:
                yield None, str(tmp)
            else:
                with open(tmp, "w", encoding="utf-8", newline="") as fh:
                    yield fh, str(tmp)
    except OSError as e:
        raise RerankerError(f"cannot write {path}: {e.strerror or e}") from e
