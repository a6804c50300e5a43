"""A GGUF file's layout: its metadata entries as raw byte ranges, its tensor table, where data starts.

What the fast path needs to copy a GGUF with a few entries and tensors changed, without decoding
the rest: gguf-py's reader turns each of the 150k vocabulary strings and merges into numpy views,
so its copy of the tiny model took 22.9 s on a 2-core EPYC; read here and moved as bytes, 0.9 s
(the same bytes: tests/gguf/test_layout.py). Little-endian GGUF v2/v3, as llama.cpp writes them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf

from reranker.errors import RerankerError
from reranker.gguf.header import _ARRAY, _SCALAR_FORMATS, _SCALAR_SIZES, _STRING, GGUF_MAGIC, _read, _skip

DEFAULT_ALIGNMENT = 32  # GGUF's, unless general.alignment says otherwise


@dataclass(frozen=True)
class Entry:
    """One metadata entry: its key, value type, the byte range of the whole entry in the file, and
    its value when it is a scalar or a string (`count`: the length of an array)."""

    key: str
    vtype: int
    start: int
    end: int
    value: int | float | bool | str | None = None
    count: int | None = None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: name, dimensions in GGML order (fastest first), GGML type, offset from the data start, size."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Where everything of one GGUF file lies."""

    path: Path
    entries: dict[str, Entry]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int

    def value(self, key: str) -> int | float | bool | str | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.value


def tensor_nbytes(dims: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of a tensor of GGML type `ggml_type` with `dims` elements."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    if dims and dims[0] % block:
        raise ValueError(f"a row of {dims[0]} is not a whole number of {block}-element blocks")
    return n // block * size


def read_layout(path: str | os.PathLike) -> Layout:
    """The layout of the GGUF at `path`; a RerankerError naming the file when it is not a readable one."""
    p = Path(path)
    try:
        with open(p, "rb", buffering=1 << 20) as f:
            return _parse(p, f)
    except (EOFError, ValueError, KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise RerankerError(f"{p} is a corrupt or truncated GGUF file ({e or type(e).__name__}); download or convert it again") from e


def _parse(p: Path, f: BinaryIO) -> Layout:
    magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", _read(f, 24))
    if magic != GGUF_MAGIC or version not in (2, 3):
        raise ValueError(f"magic {magic!r} version {version}: expected a little-endian GGUF v2 or v3")
    entries: dict[str, Entry] = {}
    for _ in range(n_kv):
        start = f.tell()
        key = _read(f, struct.unpack("<Q", _read(f, 8))[0]).decode("utf-8")
        (vtype,) = struct.unpack("<I", _read(f, 4))
        value = count = None
        if vtype == _STRING:
            value = _read(f, struct.unpack("<Q", _read(f, 8))[0]).decode("utf-8")
        elif vtype in _SCALAR_FORMATS:
            (value,) = struct.unpack(_SCALAR_FORMATS[vtype], _read(f, _SCALAR_SIZES[vtype]))
        elif vtype == _ARRAY:
            pos = f.tell()
            count = struct.unpack("<IQ", _read(f, 12))[1]
            f.seek(pos)
            _skip(f, vtype)
        else:
            raise ValueError(f"entry {key!r} has unknown value type {vtype}")
        entries[key] = Entry(key, vtype, start, f.tell(), value, count)
    tensors = []
    for _ in range(n_tensors):
        name = _read(f, struct.unpack("<Q", _read(f, 8))[0]).decode("utf-8")
        (n_dims,) = struct.unpack("<I", _read(f, 4))
        dims = struct.unpack(f"<{n_dims}Q", _read(f, 8 * n_dims))
        ggml_type, offset = struct.unpack("<IQ", _read(f, 12))
        tensors.append(TensorInfo(name, dims, ggml_type, offset, tensor_nbytes(dims, ggml_type)))
    alignment = entries["general.alignment"].value if "general.alignment" in entries else DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise ValueError(f"general.alignment {alignment!r} is not a positive multiple of 8")
    data_start = _align(f.tell(), alignment)
    size = os.fstat(f.fileno()).st_size
    for t in tensors:
        if t.offset % alignment or data_start + t.offset + t.nbytes > size:
            raise ValueError(f"tensor {t.name} ({t.nbytes} bytes at data offset {t.offset}) lies outside the "
                             f"{size}-byte file or off its {alignment}-byte alignment")
    return Layout(p, entries, tensors, alignment, data_start)


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# Writing: the pieces of a GGUF v3 file, in the byte order `read_layout` reads.

def encode_string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def encode_entry(key: str, vtype: int, value: int | float | bool | str) -> bytes:
    """A scalar or string metadata entry."""
    head = encode_string(key) + struct.pack("<I", vtype)
    return head + (encode_string(value) if vtype == _STRING else struct.pack(_SCALAR_FORMATS[vtype], value))


def encode_tensor_info(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return encode_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def file_header(n_tensors: int, n_entries: int) -> bytes:
    return struct.pack("<4sIQQ", GGUF_MAGIC, 3, n_tensors, n_entries)


def padding(n: int, alignment: int) -> bytes:
    """The zero bytes that take offset `n` to the next multiple of `alignment`."""
    return bytes(_align(n, alignment) - n)
