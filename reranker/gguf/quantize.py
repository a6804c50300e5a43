"""GGUF quantisation through llama.cpp's own `llama_model_quantize`."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import llama_cpp

from reranker import llama_log
from reranker.atomic import atomic_path
from reranker.errors import RerankerError
from reranker.gguf.header import check_gguf_file, header_value

log = logging.getLogger(__name__)

# Level name -> llama.cpp file type, for every `LLAMA_FTYPE_*` this llama-cpp-python knows.
QUANT_TYPES: dict[str, int] = {
    name.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_ALL_"): value
    for name, value in vars(llama_cpp).items()
    if name.startswith(("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_")) and isinstance(value, int)
}

#: The levels the release publishes, best first.
RELEASE_LEVELS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")
#: `bench-quant`'s default levels: BF16 (exact for a bf16 checkpoint, and llama.cpp's fastest unquantized
#: type on CPUs with native bf16 dot products), then the release's.
BENCH_LEVELS = ("BF16", *RELEASE_LEVELS)
#: The `general.file_type`s `quantize` starts from: F32, F16, BF16 (a quantized file would be rounded twice).
UNQUANTIZED_TYPES = {QUANT_TYPES["F32"], QUANT_TYPES["F16"], QUANT_TYPES["BF16"]}


def level_in_name(name: str, extra: tuple[str, ...] = ()) -> str | None:
    """The level a GGUF file name ends with (`model-Q4_K_M.gguf` -> "Q4_K_M"), or None.

    The longest known level wins (Q4_K_M, not K_M); `extra` adds names to the known ones.
    """
    stem = name.upper().removesuffix(".GGUF")
    for level in sorted({*QUANT_TYPES, *(e.upper() for e in extra)}, key=len, reverse=True):
        if stem == level or stem.endswith(("-" + level, "." + level, "_" + level)):
            return level
    return None


def level_file_name(name: str, level: str) -> str:
    """`name` of another level: ("m0-F16.gguf", "Q8_0") -> "m0-Q8_0.gguf" (no level in `name`: one is added)."""
    stem = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    old = level_in_name(name)
    return f"{stem[: -len(old) - 1] if old and len(stem) > len(old) else stem}-{level}.gguf"


def quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str = "Q8_0", n_threads: int | None = None, *,
             explain: bool = True) -> Path:
    """Write `dst`, a `qtype` copy of the F32/F16/BF16 GGUF `src`; returns `dst`.

    llama.cpp's two warning lines per tensor that a K-quant cannot hold (rows not a multiple of 256) become one
    line saying what happened (`explain=False`: a debug line, for a caller that explained it already).
    """
    src_path = check_gguf_file(src)
    key = qtype.upper()
    if key not in QUANT_TYPES:
        raise RerankerError(f"unknown quantization type {qtype!r}; choose one of {', '.join(sorted(QUANT_TYPES))}")
    stored = header_value(src_path, "general.file_type")
    if stored is not None and stored not in UNQUANTIZED_TYPES:
        level = {v: k for k, v in QUANT_TYPES.items()}.get(stored, f"file type {stored}")
        raise RerankerError(f"{src_path} is already quantized ({level}); quantize the F32, F16 or BF16 GGUF it was made from "
                            "(`reranker convert` writes one): a quantized file quantized again is rounded twice")
    dst_path = Path(dst)
    if dst_path.is_dir():
        raise RerankerError(f"the output {dst_path} is a folder; give the file to write, e.g. {dst_path / level_file_name(src_path.name, key)}")
    if dst_path.exists() and os.path.samefile(src_path, dst_path):  # llama.cpp would truncate it while reading it
        raise RerankerError(f"the output {dst_path} is the input; write the quantized file to another path")
    try:
        dst_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission
        raise RerankerError(f"cannot make the output's folder {dst_path.parent} ({e.strerror or e}); give another output path") from e
    llama_log.install()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[key]
    params.nthread = n_threads or os.cpu_count() or 1
    # Into a temporary file renamed over `dst` on success: a failure or a Ctrl-C leaves `dst` as it was (a file
    # there before, or a process mapping it, is never cut short).
    with atomic_path(dst_path) as tmp:
        with llama_log.collect() as logged:
            rc = llama_cpp.llama_model_quantize(str(src_path).encode(), str(tmp).encode(), ctypes.byref(params))
        llama_log.raise_if_interrupted()
        if rc != 0:
            said = logged.errors[-1].split("failed to quantize: ", 1)[-1] if logged.errors else "it logged no reason"
            fix = ("; this level needs an importance matrix (llama.cpp's llama-imatrix), which reranker does not make: "
                   "choose another level (Q3_K_M and up), or quantize with llama.cpp's own tools") if "imatrix" in said else ""
            raise RerankerError(f"llama.cpp failed to quantize {src_path} to {key} (code {rc}): {said}{fix}")
    fell = logged.fallbacks
    if fell:
        used = sorted({f[4] or "another type" for f in fell})
        log.log(logging.WARNING if explain else logging.DEBUG, "%s: %d tensors were stored as %s, not %s: their rows (%s values) are not multiples of the %d that %s "
                    "needs, so this level differs little from %s (a model too small for K-quants; `reranker synth --preset small` "
                    "has rows that fit)", dst_path.name, len(fell), "/".join(used), key,
                    ", ".join(map(str, sorted({f[1] for f in fell}))), fell[0][2], key, "/".join(used))
    return dst_path

