"""A cached copy of a GGUF whose output projection is the identity, for the fast path.

In embedding mode llama.cpp marks every token as an output and computes and copies the
full-vocabulary logits of each one. In generation mode only the tokens we mark produce
logits; with an output matrix whose first H rows are the identity, those logits' first H
values are the final-norm hidden state. The release's GGUFs tie the output to the token
embeddings, so they are rewritten once, with the identity added, into a cache folder.

Copies are keyed by the source's content (its SHA-256), not its path and mtime: rerunning `reranker synth` +
`convert` rewrites a byte-identical GGUF with a new mtime, and its copy is reused instead of written again
beside an orphan. A source is hashed once per (path, size, mtime, ctime, inode) and remembered in the cache's
`.sources.json` (a 3 GB F16 file hashes in a few seconds, against ~4 GB written for its copy). Each copy
records its source's hash and the path it was made from; `cached_copies` lists them and `clear_cache`
removes them (all, or the stale ones: no source known to the cache has that content now; a moved source,
loaded from its new place, is hashed and reuses its copy).

BF16: an F16 GGUF whose tensors hold bf16 values (the release's do: the checkpoint is bf16) can be
run as BF16 with the same weights, and llama.cpp's BF16 mat-muls use the CPU's native bf16 dot
products (AVX512_BF16): 1.7x its F16 on a 2-core AMD EPYC, 1.1x on an Intel Xeon with AMX
(benchmarks/RESULTS.md). `fast_path_gguf` makes the fast path's cached copy with that re-encode
when `use_bf16` says so:

- only for an F16 file (`general.file_type` MOSTLY_F16): other files have nothing to re-encode;
- an explicit `bf16=True/False` wins; then `RERANKER_BF16=1` or `0`;
- otherwise (auto, the default) yes when the layers run on the CPU (no GPU offload) and the CPU
  reports `avx512_bf16` or `amx_bf16` in /proc/cpuinfo (Linux only; elsewhere, e.g. macOS arm64,
  auto keeps F16) and llama.cpp was built with AVX512_BF16.

Only tensors whose every value is exact in BF16 are re-encoded (checked per tensor), so the
weights are unchanged; when none is, the copy would equal the plain one, so the plain one is used (the count,
`bf16_tensor_counts`, is remembered per content); the activations are rounded to bf16 instead of f16 inside the mat-muls,
as in transformers' bf16 mode. On random-weight models that moves scores by up to 7.6e-3 from
fp32 (F16: 6.3e-4; transformers bf16: 1.7e-2); `bf16=False` / `--bf16 off` keeps F16.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from reranker.atomic import atomic_path
from reranker.defaults import IDENTITY_DTYPE
from reranker.engine import cpu
from reranker.errors import RerankerError
from reranker.gguf.header import check_architecture, check_gguf_file, header_value
from reranker.gguf.layout import (
    Entry,
    Layout,
    TensorInfo,
    encode_entry,
    encode_tensor_info,
    file_header,
    padding,
    read_layout,
    tensor_nbytes,
)
from reranker.gguf.quantize import QUANT_TYPES

log = logging.getLogger(__name__)

MARKER_KEY = "jina_reranker.identity_output"
SOURCE_KEY = "jina_reranker.identity_source"  # the absolute path of the GGUF the copy was made from
CONTENT_KEY = "jina_reranker.identity_content"  # the SHA-256 of that GGUF's bytes: what the copy is keyed by
REENCODE_KEY = "jina_reranker.identity_reencode"  # "bf16" when F16 tensors were asked to become BF16 (absent: none)
BF16_TENSORS_KEY = "jina_reranker.bf16_tensors"  # how many F16 tensors became BF16 in the copy
BF16_ENV = "RERANKER_BF16"
_PATTERN = "*.identity-*-*.gguf"
_VERSION = "2"  # 2: keyed by the source's content (1: by its path, size and mtime; such copies are stale)
_MEMO = ".sources.json"
_WITHIN = 6  # `_write` puts the copy's own entries first: header reads stop after them
_HASH_BLOCK = 1 << 23
_DTYPES = {"f16": np.float16, "f32": np.float32}


def default_cache_dir() -> Path:
    """`$RERANKER_CACHE` or `~/.cache/jina-reranker-gguf`."""
    root = os.environ.get("RERANKER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jina-reranker-gguf"
    return Path(root)


def identity_marker(path: Path) -> str | None:
    """The marker's value: `_write` puts it right after the architecture, so only the first entries are read."""
    value = header_value(path, MARKER_KEY, within=4)
    return value if isinstance(value, str) else None


def _copy_key(content: str, dtype: str, reencode: str | None) -> str:
    return hashlib.sha256(f"{content}|{dtype}|{_VERSION}|{reencode or ''}".encode()).hexdigest()[:16]


def _copy_name(stem: str, dtype: str, reencode: str | None, key: str) -> str:
    return f"{stem}.identity-{dtype}{'-' + reencode if reencode else ''}-{key}.gguf"


def _header_str(copy: Path, key: str) -> str | None:
    value = header_value(copy, key, within=_WITHIN)
    return value if isinstance(value, str) else None


def _reencode_of(copy: Path) -> str | None:
    return _header_str(copy, REENCODE_KEY)


def _source_of(copy: Path) -> Path | None:
    value = _header_str(copy, SOURCE_KEY)
    return None if value is None else Path(value)


class _Memo:
    """The cache's `.sources.json`: each source path's SHA-256 under its stat, and each content's BF16-exact count.

    Read-modify-write without a lock: two processes saving at once may drop each other's new entry,
    which only costs a second hash later; the file itself is replaced atomically.
    """

    def __init__(self, folder: Path) -> None:
        self.folder, self.changed = folder, False
        try:
            data = json.loads((folder / _MEMO).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or unreadable: hashes are recomputed
            data = {}
        ok = isinstance(data, dict) and data.get("version") == 1
        self.paths: dict[str, dict] = data.get("paths", {}) if ok else {}
        self.bf16: dict[str, list[int]] = data.get("bf16", {}) if ok else {}

    @staticmethod
    def _stat(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]  # ctime: a rewrite that restores the mtime

    def content(self, path: Path) -> str:
        """The SHA-256 of `path`'s bytes: remembered while its stat is unchanged, else hashed once."""
        key = str(path.resolve())
        stat = self._stat(path)
        known = self.paths.get(key)
        if isinstance(known, dict) and known.get("stat") == stat and isinstance(known.get("sha256"), str):
            return known["sha256"]
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
        self.paths[key] = {"stat": stat, "sha256": digest.hexdigest()}
        self.changed = True
        return self.paths[key]["sha256"]

    def save(self) -> None:
        if not self.changed:
            return
        live = {p: e for p, e in self.paths.items() if os.path.exists(p)}  # bounded: gone sources are dropped
        shas = {e.get("sha256") for e in live.values() if isinstance(e, dict)}
        data = {"version": 1, "paths": live, "bf16": {k: v for k, v in self.bf16.items() if k in shas}}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / _MEMO) as tmp:
                tmp.write_text(json.dumps(data, indent=0), encoding="utf-8")
        except OSError as e:  # a read-only cache still works, it just hashes again next time
            log.debug("cannot save %s: %s", self.folder / _MEMO, e)
        self.changed = False


def _bf16_split(layout: Layout) -> tuple[set[str], int]:
    """(names of the F16 tensors whose every value is exact in BF16, how many F16 tensors there are)."""
    data = np.memmap(layout.path, dtype=np.uint8, mode="r")
    f16 = [t for t in layout.tensors if t.ggml_type == _F16 and t.name != "output.weight"]
    start = layout.data_start
    exact = {t.name for t in f16 if bf16_exact(data[start + t.offset : start + t.offset + t.nbytes].view(np.uint16))}
    return exact, len(f16)


def _bf16_counts(src: Path, content: str, memo: _Memo) -> tuple[int, int, set[str] | None]:
    """(BF16-exact F16 tensors, F16 tensors, their names when they were just computed) of the source `content`."""
    known = memo.bf16.get(content)
    if isinstance(known, list) and len(known) == 2:
        return known[0], known[1], None
    exact, n = _bf16_split(read_layout(src))  # reads every F16 tensor once (a table lookup per value)
    memo.bf16[content] = [len(exact), n]
    memo.changed = True
    return len(exact), n, exact


def bf16_tensor_counts(src: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """(k, n): k of the n F16 tensors of `src` are exact in BF16, so the fast path's BF16 copy re-encodes k.
    Remembered per content in the cache, so only a new file is read."""
    src = check_gguf_file(src)
    memo = _Memo(Path(cache_dir) if cache_dir else default_cache_dir())
    k, n, _ = _bf16_counts(src, memo.content(src), memo)
    memo.save()
    return k, n


@dataclass(frozen=True)
class CachedCopy:
    """One cached identity copy: its file, size, source GGUF (None when not recorded) and whether it is stale."""

    path: Path
    size: int
    source: Path | None
    stale: bool  # no known source has its bytes now (moved, changed, deleted; loading one with them reuses it), or an old version's


def _live_source(content: str, recorded: Path | None, memo: _Memo) -> Path | None:
    """A source GGUF whose bytes are `content` now: the recorded one or any other remembered with that content."""
    candidates = [Path(p) for p, e in memo.paths.items() if isinstance(e, dict) and e.get("sha256") == content]
    for path in dict.fromkeys(([recorded] if recorded else []) + candidates):
        try:
            if memo.content(path) == content:
                return path
        except OSError:  # gone or unreadable
            continue
    return None


def cached_copies(cache_dir: str | os.PathLike | None = None) -> list[CachedCopy]:
    """The identity copies in `cache_dir` (default: `default_cache_dir()`), sorted by path.

    Only files carrying the copy's own marker: another file that merely matches the name is left alone.
    A copy is stale when no source known to the cache has its content now (a source whose stat changed is hashed
    again; a moved one is known again once loaded from its new place),
    or when an older version of this package made it (keyed otherwise: it is never found again).
    """
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    memo = _Memo(folder)
    out = []
    for path in sorted(folder.glob(_PATTERN)):
        dtype = identity_marker(path)
        if dtype is None:  # named like a copy, but without the marker every copy carries: not ours to list or delete
            continue
        recorded, content = _source_of(path), _header_str(path, CONTENT_KEY)
        source = None
        if content is not None and dtype in _DTYPES and path.name.endswith(f"-{_copy_key(content, dtype, _reencode_of(path))}.gguf"):
            source = _live_source(content, recorded, memo)
        out.append(CachedCopy(path, path.stat().st_size, source or recorded, source is None))
    memo.save()
    return out


def clear_cache(cache_dir: str | os.PathLike | None = None, *, stale_only: bool = False) -> list[CachedCopy]:
    """Delete the cached identity copies (only the stale ones with `stale_only`); returns what was deleted.

    A copy in use elsewhere stays readable by that process until it closes it (POSIX unlink).
    """
    removed = [c for c in cached_copies(cache_dir) if c.stale or not stale_only]
    for c in removed:
        try:
            c.path.unlink(missing_ok=True)
        except OSError as e:  # a read-only cache, a folder without write permission
            raise RerankerError(f"cannot remove {c.path} ({e.strerror or e}); the cache folder {c.path.parent} must be "
                                "writable to clear it") from e
    return removed


def with_identity_output(src: str | os.PathLike, dtype: str = IDENTITY_DTYPE, cache_dir: str | os.PathLike | None = None,
                         *, bf16: bool = False) -> Path:
    """Path of a GGUF equal to `src` but with an identity output projection (`dtype` f16 or f32).

    `src` itself when it already has one; otherwise a cached copy, written once (atomically,
    so concurrent processes are safe) and reused for any source with the same bytes (found by its SHA-256,
    which is remembered per path and stat, so an unchanged source is not read again).

    `bf16=True` with an F16 `src` (`general.file_type` MOSTLY_F16): each F16 tensor whose every
    value is exactly representable in BF16 is written as BF16 (the same values; checked per
    tensor while copying), the others stay F16. The choice is part of the cache key.
    """
    if dtype not in _DTYPES:
        raise RerankerError(f"identity output dtype {dtype!r} must be one of {', '.join(_DTYPES)}")
    src = check_gguf_file(src)
    check_architecture(src)  # before the file is hashed or copied: another model's GGUF may be gigabytes
    if identity_marker(src) == dtype:
        return src
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    memo = _Memo(folder)
    content = memo.content(src)
    as_bf16 = None
    reencode = None
    if bf16 and header_value(src, gguf.Keys.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_F16:
        k, _, as_bf16 = _bf16_counts(src, content, memo)
        reencode = "bf16" if k else None  # none exact: the copy would be the plain one, byte for byte but its markers
    key = _copy_key(content, dtype, reencode)
    for found in sorted(folder.glob(_copy_name("*", dtype, reencode, key))):  # any source's name: same content, same copy
        if identity_marker(found) == dtype and _header_str(found, CONTENT_KEY) == content:
            memo.save()
            return found
    dst = folder / _copy_name(src.stem, dtype, reencode, key)
    layout = read_layout(src)
    dims = _dims(layout)  # checked once, before the size it sets is asked of the disk
    need = _copy_size(layout, dims, dtype)
    log.info("writing %s (one-time copy of %s with an identity output projection%s)", dst, src.name,
             ", F16 tensors as BF16 where exact" if reencode else "")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < need:  # refused before gigabytes are written
            raise _cache_error(folder, src, need, f"{_gb(free)} free")
        with atomic_path(dst) as tmp:
            _write(layout, dims, tmp, dtype, reencode, content, as_bf16)
    except OSError as e:
        why = ("it is a file, not a folder" if folder.exists() and not folder.is_dir() else
               "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e))
        raise _cache_error(folder, src, need, f"{why}: {e}") from e
    memo.save()
    return dst


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _copy_size(layout: Layout, dims: tuple[str, int, int], dtype: str) -> int:
    """About the bytes of `layout`'s copy (`dims`: its `_dims`): its file, less any output matrix, plus the identity one."""
    _, n_embd, n_vocab = dims
    output = sum(t.nbytes for t in layout.tensors if t.name == "output.weight")
    return layout.path.stat().st_size - output + n_embd * n_vocab * np.dtype(_DTYPES[dtype]).itemsize


def _cache_error(folder: Path, src: Path, need: int, why: str) -> RerankerError:
    """The fast path's cache cannot take the copy (full, a file, not writable): what to do instead."""
    return RerankerError(f"the fast path's cache folder {folder} cannot take its copy of {src} ({why}); the copy needs about "
                         f"{_gb(need)} there: free space (`reranker cache clear --stale` removes the copies of GGUFs no longer known), point "
                         "RERANKER_CACHE at a folder with room, or load without the copy: fast=False in Python (slower: "
                         "every token's logits are computed; the command line has no such option)")


def use_bf16(bf16: bool | None = None, n_gpu_layers: int = -1, src: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(whether the fast path's copy of `src` re-encodes F16 tensors as BF16, why): see the module docstring.
    Without `src` the answer is for an F16 file."""
    if src is not None:
        stored = file_weights(src)
        if stored != "F16":
            return False, f"the GGUF stores {stored}, not F16"
    if bf16 is not None:
        return bool(bf16), "requested" if bf16 else "turned off"
    forced = os.environ.get(BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{BF16_ENV}={forced}"
    if n_gpu_layers != 0:
        if llama_cpp.llama_supports_gpu_offload():
            return False, "layers are offloaded to the GPU"
    return cpu.native_bf16()


def fast_path_gguf(src: str | os.PathLike, identity_dtype: str, bf16: bool | None = None, n_gpu_layers: int = -1) -> Path:
    """The fast path's GGUF for `src` (the cached identity copy, BF16 where `use_bf16` says so): what
    `Reranker.from_pretrained(fast=True)` loads; call it beforehand to write the copy up front."""
    want, why = use_bf16(bf16, n_gpu_layers, src)
    path = with_identity_output(src, identity_dtype, bf16=want)
    log.debug("fast path copy %s (%s)", path.name, bf16_note(src, want, why))
    return path


def bf16_note(src: str | os.PathLike, want: bool, why: str) -> str:
    """What the BF16 re-encode did to `src`'s copy, for the log: "BF16 re-encode: k of n F16 tensors, why"."""
    if not want:
        return f"BF16 re-encode off: {why}"
    k, n = bf16_tensor_counts(src)
    return f"BF16 re-encode: {k} of {n} F16 tensors, {why}{'; none is exact in BF16, so the copy stays F16' if not k else ''}"


def weights_description(metadata) -> str:
    """The weights' encoding from a GGUF's metadata (`metadata(key) -> str | None`): "BF16", "F16",
    "Q8_0", ..., or "F16+BF16" when only some F16 tensors could be re-encoded."""
    ftype = metadata("general.file_type")
    names = {str(v): k for k, v in QUANT_TYPES.items()}
    name = names.get(ftype or "", f"file type {ftype}" if ftype else "unknown")
    n_bf16 = int(metadata(BF16_TENSORS_KEY) or 0)
    return f"{name}+BF16" if n_bf16 and name != "BF16" else name


def file_weights(path: str | os.PathLike) -> str:
    """`weights_description` of a GGUF file, from its header (no model load)."""
    def metadata(key: str) -> str | None:
        value = header_value(path, key)
        return None if value is None else str(value)

    return weights_description(metadata)


# Every F16 bit pattern -> whether its value is exact in BF16, and its BF16 bits (via float32, whose upper
# half is the BF16 encoding: exact when the lower half is zero). F16 subnormals are normal in BF16.
_F32_OF_F16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
_BF16_EXACT = (_F32_OF_F16 & 0xFFFF) == 0
_BF16_OF_F16 = (_F32_OF_F16 >> 16).astype(np.uint16)
_CHUNK = 1 << 22  # elements per step: bounds the temporaries to a few MB


def _f16_bits(data: np.ndarray, endianess: gguf.GGUFEndian) -> np.ndarray:
    bits = data.reshape(-1).view(np.uint16)
    native = gguf.GGUFEndian.LITTLE if np.little_endian else gguf.GGUFEndian.BIG
    return bits if endianess == native else bits.byteswap()


def bf16_exact(data: np.ndarray, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> bool:
    """Whether every value of an F16 array is exactly representable in BF16 (NaN payloads included)."""
    bits = _f16_bits(data, endianess)
    return all(_BF16_EXACT[bits[i : i + _CHUNK]].all() for i in range(0, bits.size, _CHUNK))


def to_bf16(data: np.ndarray, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> np.ndarray:
    """The BF16 bits (uint16, native order, `data`'s shape) of an F16 array: exact where `bf16_exact` holds."""
    bits = _f16_bits(data, endianess)
    out = np.empty(bits.size, dtype=np.uint16)
    for i in range(0, bits.size, _CHUNK):
        out[i : i + _CHUNK] = _BF16_OF_F16[bits[i : i + _CHUNK]]
    return out.reshape(data.shape)


def _required(layout: Layout, key: str) -> Entry:
    if key not in layout.entries:
        raise RerankerError(f"{layout.path} has no {key} entry: not a complete jina-reranker-m0 GGUF; "
                            "download the release's file or run `reranker convert` again")
    return layout.entries[key]


def _check_shapes(layout: Layout, arch: str, n_embd: int, n_vocab: int) -> None:
    """The header's sizes agree with the token embeddings, before the n_vocab x n_embd matrix is made.

    A header that lies (`embedding_length` 3000 on a small model) would otherwise make the copy write
    gigabytes before llama.cpp checks anything.
    """
    embd = next((t for t in layout.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise RerankerError(f"{layout.path} has no token_embd.weight tensor: not a complete jina-reranker-m0 GGUF; "
                            "download the release's file or run `reranker convert` again")
    if list(embd.dims) != [n_embd, n_vocab]:  # GGML order: (n_embd, n_vocab)
        raise RerankerError(f"{layout.path}'s header disagrees with its tensors: {arch}.embedding_length={n_embd} and "
                            f"{n_vocab} vocabulary tokens, but token_embd.weight is {embd.dims[0]} x {embd.dims[-1]}; "
                            "the file is corrupt: download or convert it again (nothing was written to the cache)")


_F16, _BF16 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16
_OUTPUT_TYPES = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32}
_OWN_KEYS = (gguf.Keys.General.ARCHITECTURE, MARKER_KEY, SOURCE_KEY, CONTENT_KEY, REENCODE_KEY, BF16_TENSORS_KEY)


def _dims(layout: Layout) -> tuple[str, int, int]:
    """(architecture, hidden size, vocabulary size) of a source GGUF, checked against its token embeddings."""
    arch = _required(layout, gguf.Keys.General.ARCHITECTURE).value
    n_embd = _required(layout, f"{arch}.embedding_length").value
    n_vocab = _required(layout, gguf.Keys.Tokenizer.LIST).count
    if not isinstance(arch, str) or not isinstance(n_embd, int) or n_vocab is None:
        raise RerankerError(f"{layout.path}'s header has a malformed architecture, embedding_length or token list; "
                            "the file is corrupt: download or convert it again")
    if n_vocab < n_embd:
        raise RerankerError(f"the vocabulary ({n_vocab}) is smaller than the hidden size ({n_embd}): not a jina-reranker-m0 GGUF")
    _check_shapes(layout, arch, n_embd, n_vocab)
    return arch, n_embd, n_vocab


def _write(layout: Layout, dims: tuple[str, int, int], dst: Path, dtype: str, reencode: str | None, content: str,
           as_bf16: set[str] | None = None) -> None:
    """Write the copy: the source's entries and tensors as bytes, except the ones that change.

    The file is laid out as gguf-py's GGUFWriter lays it out (the architecture first, then our markers;
    each tensor aligned), but no entry is decoded and no matrix is held whole in memory.
    """
    src = layout.path
    arch, n_embd, n_vocab = dims  # `_dims(layout)`
    data = np.memmap(src, dtype=np.uint8, mode="r")

    def raw(t: TensorInfo) -> np.ndarray:
        return data[layout.data_start + t.offset : layout.data_start + t.offset + t.nbytes]

    tensors = [t for t in layout.tensors if t.name != "output.weight"]
    f16 = [t for t in tensors if t.ggml_type == _F16]
    # Tensors that would lose bits stay F16 (`as_bf16`: passed when the caller just checked them).
    if reencode != "bf16":
        as_bf16 = set()
    elif as_bf16 is None:
        as_bf16, _ = _bf16_split(layout)
    all_bf16 = bool(f16) and len(as_bf16) == len(f16)

    entries = [encode_entry(gguf.Keys.General.ARCHITECTURE, gguf.GGUFValueType.STRING, arch),
               encode_entry(MARKER_KEY, gguf.GGUFValueType.STRING, dtype),  # early, so identity_marker() finds it fast
               encode_entry(SOURCE_KEY, gguf.GGUFValueType.STRING, str(src.resolve())),
               encode_entry(CONTENT_KEY, gguf.GGUFValueType.STRING, content)]
    if reencode:
        entries += [encode_entry(REENCODE_KEY, gguf.GGUFValueType.STRING, reencode),  # within the first _WITHIN entries
                    encode_entry(BF16_TENSORS_KEY, gguf.GGUFValueType.UINT32, len(as_bf16))]
        log.info("%s: %d of %d F16 tensors written as BF16 (exact)%s", src.name, len(as_bf16), len(f16),
                 "" if len(as_bf16) == len(f16) else "; the others would lose bits and stay F16")
    for e in layout.entries.values():
        if e.key in _OWN_KEYS:
            continue
        if e.key == gguf.Keys.General.FILE_TYPE and all_bf16:  # stays truthful: every F16 weight is now BF16
            entries.append(encode_entry(e.key, e.vtype, int(gguf.LlamaFileType.MOSTLY_BF16)))
        else:
            entries.append(data[e.start : e.end].tobytes())

    out_type = _OUTPUT_TYPES[dtype]
    infos = [(t.name, t.dims, _BF16 if t.name in as_bf16 else t.ggml_type, t.nbytes) for t in tensors]
    infos.append(("output.weight", (n_embd, n_vocab), out_type, tensor_nbytes((n_embd, n_vocab), out_type)))
    table, offset = [], 0
    for name, dims, ggml_type, nbytes in infos:
        table.append(encode_tensor_info(name, dims, ggml_type, offset))
        offset += len(padding(nbytes, layout.alignment)) + nbytes

    with open(dst, "wb") as out:
        head = file_header(len(infos), len(entries)) + b"".join(entries) + b"".join(table)
        out.write(head + padding(len(head), layout.alignment))
        for t in tensors:
            if t.name in as_bf16:
                bits = raw(t).view(np.uint16)
                for i in range(0, bits.size, _CHUNK):  # one chunk at a time: a few MB of temporaries
                    out.write(_BF16_OF_F16[bits[i : i + _CHUNK]].tobytes())
            else:
                out.write(memoryview(raw(t)))
            out.write(padding(t.nbytes, layout.alignment))
        _write_identity(out, n_vocab, n_embd, _DTYPES[dtype])
        out.write(padding(infos[-1][3], layout.alignment))


def _write_identity(out, n_vocab: int, n_embd: int, dtype: type) -> None:
    """The n_vocab x n_embd output matrix whose first n_embd rows are the identity, a block of rows at a time."""
    rows = max(1, _CHUNK // n_embd)
    for r0 in range(0, n_vocab, rows):
        block = np.zeros((min(rows, n_vocab - r0), n_embd), dtype=dtype)
        diag = np.arange(r0, min(r0 + len(block), n_embd))
        block[diag - r0, diag] = 1
        out.write(block.tobytes())
