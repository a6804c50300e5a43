"""Where command output goes: stdout, or a file that appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO

from .errors import RerankerError


@contextlib.contextmanager
def open_output(path: str | None, *, binary: bool = False) -> Iterator[tuple[TextIO | None, str | None]]:
    """Yield (text stream, temporary path) for `path`; `None` or '-' means stdout.

    A file is written under a sibling temporary name and renamed onto `path` only on
    success, so an error midway never leaves a truncated file that looks complete.
    With `binary`, the stream is None and the caller writes the temporary path itself.
    """
    if path is None or path == "-":
        if binary:
            raise RerankerError("binary output cannot go to stdout; give a file with -o FILE")
        yield sys.stdout, None
        sys.stdout.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise RerankerError(f"-o {path} is a directory; give a file name")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if binary:
            yield None, str(tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                yield fh, str(tmp)
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RerankerError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
