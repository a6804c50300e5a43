"""A cached copy of a GGUF whose output projection is the identity, for the fast path.

In embedding mode llama.cpp marks every token as an output and computes and copies the
full-vocabulary logits of each one. In generation mode only the tokens we mark produce
logits; with an output matrix whose first H rows are the identity, those logits' first H
values are the final-norm hidden state. The release's GGUFs tie the output to the token
embeddings, so they are rewritten once, with the identity added, into a cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import gguf
import numpy as np

from reranker.atomic import atomic_path
from reranker.defaults import IDENTITY_DTYPE
from reranker.errors import RerankerError
from reranker.gguf.header import check_gguf_file, header_value

log = logging.getLogger(__name__)

MARKER_KEY = "jina_reranker.identity_output"
_VERSION = "1"
_DTYPES = {"f16": np.float16, "f32": np.float32}


def default_cache_dir() -> Path:
    """`$RERANKER_CACHE` or `~/.cache/jina-reranker-gguf`."""
    root = os.environ.get("RERANKER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jina-reranker-gguf"
    return Path(root)


def identity_marker(path: Path) -> str | None:
    """The marker's value: `_write` puts it right after the architecture, so only the first entries are read."""
    value = header_value(path, MARKER_KEY, within=4)
    return value if isinstance(value, str) else None


def _cache_path(src: Path, dtype: str, cache_dir: Path) -> Path:
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{_VERSION}".encode()).hexdigest()[:16]
    return cache_dir / f"{src.stem}.identity-{dtype}-{key}.gguf"


def with_identity_output(src: str | os.PathLike, dtype: str = IDENTITY_DTYPE, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a GGUF equal to `src` but with an identity output projection (`dtype` f16 or f32).

    `src` itself when it already has one; otherwise a cached copy, written once (atomically,
    so concurrent processes are safe) and reused while `src` is unchanged.
    """
    if dtype not in _DTYPES:
        raise RerankerError(f"identity output dtype {dtype!r} must be one of {', '.join(_DTYPES)}")
    src = check_gguf_file(src)
    if identity_marker(src) == dtype:
        return src
    dst = _cache_path(src, dtype, Path(cache_dir) if cache_dir else default_cache_dir())
    if dst.is_file():
        return dst
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, IndexError, OSError) as e:
        raise RerankerError(f"{src} is a corrupt or truncated GGUF file ({e}); download or convert it again") from e
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing %s (one-time copy of %s with an identity output projection)", dst, src.name)
    with atomic_path(dst) as tmp:
        _write(reader, tmp, dtype)
    return dst


def _write(reader: gguf.GGUFReader, dst: Path, dtype: str) -> None:
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    n_vocab = len(reader.fields[gguf.Keys.Tokenizer.LIST].data)
    if n_vocab < n_embd:
        raise RerankerError(f"the vocabulary ({n_vocab}) is smaller than the hidden size ({n_embd}): not a jina-reranker-m0 GGUF")
    writer = gguf.GGUFWriter(str(dst), arch)
    writer.add_key_value(MARKER_KEY, dtype, gguf.GGUFValueType.STRING)  # first, so identity_marker() finds it fast
    for field in reader.fields.values():
        # GGUFWriter writes the architecture and GGUF.* header fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name == MARKER_KEY:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)

    tensors = [t for t in reader.tensors if t.name != "output.weight"]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    eye = np.zeros((n_vocab, n_embd), dtype=_DTYPES[dtype])
    eye[np.arange(n_embd), np.arange(n_embd)] = 1
    writer.add_tensor_info("output.weight", eye.shape, eye.dtype, eye.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.write_tensor_data(eye)
    writer.close()
