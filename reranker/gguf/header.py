"""A GGUF file's header: checked before llama.cpp or gguf-py sees the file, and read entry by entry.

gguf-py's reader parses every metadata entry, the 150k-token vocabulary included (seconds
per file); `header_value` reads only up to the entry it wants.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import BinaryIO

from reranker.errors import RerankerError

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: scalar sizes in bytes, then the two variable-size types.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


GGUF_FIX = "pass an existing .gguf path or a Hub id like 'jinaai/jina-reranker-m0-GGUF:Q8_0'"
#: The architectures a jina-reranker-m0 GGUF may declare: llama.cpp's Qwen2-VL text model (the release's, and
#: `reranker convert`'s), and plain Qwen2, which llama.cpp runs with the same layers (accepted on purpose).
SUPPORTED_ARCHS = ("qwen2vl", "qwen2")
_STAT_ERRORS = {errno.ENOENT: "not found", errno.ENOTDIR: "not found", errno.ELOOP: "is a symlink loop"}


def check_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """`path` when it is a readable regular file, else a RerankerError saying why not:
    not found, a broken symlink, a symlink loop, a directory, or not readable."""
    if not os.fspath(path):  # Path("") is ".", the current folder: say what was given
        raise RerankerError(f"{what} is an empty path; {fix}")
    if "\0" in str(os.fspath(path)):  # os.stat raises ValueError for these
        raise RerankerError(f"{what} {os.fspath(path)!r} is not a path (it holds a NUL character); {fix}")
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        reason = _STAT_ERRORS.get(e.errno, f"cannot be read ({e.strerror})")
        if e.errno == errno.ENOENT and p.is_symlink():
            reason = "is a broken symlink"
    else:
        if stat.S_ISREG(st.st_mode) and os.access(p, os.R_OK):
            return p
        reason = ("is a directory, not a file" if stat.S_ISDIR(st.st_mode) else
                  "is not readable (permission denied)" if stat.S_ISREG(st.st_mode) else "is not a regular file")
    raise RerankerError(f"{what} {reason}: {p}; {fix}")


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Fail early, with the path in the message, on a missing, unreadable or non-GGUF file, or one without a tokenizer."""
    p = check_file(path, "GGUF file", GGUF_FIX)
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise RerankerError(f"{p} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); it may be truncated or another format")
    if header_value(p, "tokenizer.ggml.model") is None:
        raise RerankerError(f"{p} has no tokenizer (no tokenizer.ggml.model in its header, or the header is corrupt), so it is "
                            "not a complete jina-reranker-m0 GGUF; download the release's file or run `reranker convert` again")
    return p


def check_architecture(path: Path) -> str:
    """`path`'s `general.architecture` when jina-reranker-m0 can have it (SUPPORTED_ARCHS), else a RerankerError naming
    `path`: read from the header, before any copy of the file is made or llama.cpp loads it."""
    arch = header_value(path, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        what = f"architecture {arch!r}" if isinstance(arch, str) else "no general.architecture"
        raise RerankerError(f"{path} is a GGUF of {what}, not jina-reranker-m0's {SUPPORTED_ARCHS[0]!r} (a Qwen2-VL text "
                            f"model); {GGUF_FIX}")
    return arch


def header_value(path: str | os.PathLike, key: str, *, within: int | None = None) -> int | float | bool | str | None:
    """The scalar or string value of metadata `key`, or None when absent, unreadable, or not
    among the first `within` entries (a writer that puts a key first can be checked in microseconds)."""
    want = key.encode()
    with open(path, "rb", buffering=1 << 16) as f:
        try:
            magic, version, _, n_kv = struct.unpack("<4sIQQ", _read(f, 24))
            if magic != GGUF_MAGIC or version < 2:
                return None
            for _ in range(n_kv if within is None else min(n_kv, within)):
                name = _read(f, struct.unpack("<Q", _read(f, 8))[0])
                (vtype,) = struct.unpack("<I", _read(f, 4))
                if name == want:
                    if vtype == _STRING:
                        return _read(f, struct.unpack("<Q", _read(f, 8))[0]).decode("utf-8")
                    if vtype in _SCALAR_FORMATS:
                        return struct.unpack(_SCALAR_FORMATS[vtype], _read(f, _SCALAR_SIZES[vtype]))[0]
                    return None
                _skip(f, vtype)
        except (EOFError, ValueError, struct.error, UnicodeDecodeError, OverflowError, MemoryError):
            return None  # OverflowError, MemoryError: a corrupt length the checks below did not catch
    return None


_SMALL_READ = 1 << 20  # reads up to this size are made as asked; larger claims are checked against the file first


def _check_left(f: BinaryIO, n: int) -> None:
    """EOFError when a (corrupt) length field claims more than the bytes left in the file: reading it would ask
    for gigabytes of memory (MemoryError) or more than an index holds (OverflowError)."""
    if n > _SMALL_READ and n > os.fstat(f.fileno()).st_size - f.tell():
        raise EOFError(f"a length of {n} bytes runs past the end of the file")


def _read(f: BinaryIO, n: int) -> bytes:
    """`n` bytes, or EOFError (also, without reading, for a length longer than the rest of the file)."""
    _check_left(f, n)
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _seek_ahead(f: BinaryIO, n: int) -> None:
    """Skip `n` bytes (EOFError for a length longer than the rest of the file)."""
    _check_left(f, n)
    f.seek(n, 1)


def _skip(f: BinaryIO, vtype: int) -> None:
    if vtype == _STRING:
        _seek_ahead(f, struct.unpack("<Q", _read(f, 8))[0])
    elif vtype == _ARRAY:
        sub, count = struct.unpack("<IQ", _read(f, 12))
        if sub in _SCALAR_SIZES:
            _seek_ahead(f, _SCALAR_SIZES[sub] * count)
        else:
            for _ in range(count):
                _skip(f, sub)
    elif vtype in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[vtype], 1)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")
