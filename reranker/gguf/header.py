"""A GGUF file's header: checked before llama.cpp or gguf-py sees the file, and read entry by entry.

gguf-py's reader parses every metadata entry, the 150k-token vocabulary included (seconds
per file); `header_value` reads only up to the entry it wants.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

from reranker.errors import RerankerError

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: scalar sizes in bytes, then the two variable-size types.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


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
        except (EOFError, ValueError, struct.error, UnicodeDecodeError):
            return None
    return None


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _skip(f: BinaryIO, vtype: int) -> None:
    if vtype == _STRING:
        f.seek(struct.unpack("<Q", _read(f, 8))[0], 1)
    elif vtype == _ARRAY:
        sub, count = struct.unpack("<IQ", _read(f, 12))
        if sub in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[sub] * count, 1)
        else:
            for _ in range(count):
                _skip(f, sub)
    elif vtype in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[vtype], 1)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")
