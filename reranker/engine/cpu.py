"""The fast path's weight encoding, and the CPU thread default.

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
weights are unchanged; the activations are rounded to bf16 instead of f16 inside the mat-muls,
as in transformers' bf16 mode. On random-weight models that moves scores by up to 7.6e-3 from
fp32 (F16: 6.3e-4; transformers bf16: 1.7e-2); `bf16=False` / `--bf16 off` keeps F16.

Threads: `default_threads()`, see its docstring.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

BF16_ENV = "RERANKER_BF16"
THREADS_ENV = "RERANKER_THREADS"
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native bf16 flags among avx512_bf16 / amx_bf16 (Linux /proc/cpuinfo; elsewhere none)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return tuple(f for f in _BF16_FLAGS if f in flags)
    return ()


def native_bf16() -> tuple[bool, str]:
    """(whether llama.cpp gets native bf16 dot products on this CPU, why)."""
    flags = cpu_bf16_flags()
    if not flags:
        return False, "the CPU reports no avx512_bf16/amx_bf16"
    import llama_cpp

    if not built_with_bf16(llama_cpp.llama_print_system_info()):
        return False, f"the CPU has {'/'.join(flags)} but llama.cpp was built without AVX512_BF16"
    return True, f"the CPU has {'/'.join(flags)}"


def build_features(system_info: bytes) -> set[str]:
    """The features llama.cpp was built with, from `llama_print_system_info()` (it lists only the
    features a build has, as `NAME = 1`)."""
    text = system_info.decode(errors="replace")
    return {k.strip().rpartition(":")[2].strip() for k, _, v in (x.partition("=") for x in text.split("|")) if v.strip() == "1"}


def built_with_bf16(system_info: bytes) -> bool:
    """Whether llama.cpp's CPU backend was compiled with AVX512_BF16."""
    return "AVX512_BF16" in build_features(system_info)


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
        import llama_cpp

        if llama_cpp.llama_supports_gpu_offload():
            return False, "layers are offloaded to the GPU"
    return native_bf16()


def fast_path_gguf(src: str | os.PathLike, identity_dtype: str, bf16: bool | None = None, n_gpu_layers: int = -1) -> Path:
    """The fast path's GGUF for `src` (the cached identity copy, BF16 where `use_bf16` says so): what
    `Reranker.from_pretrained(fast=True)` loads; call it beforehand to write the copy up front."""
    from reranker.engine.identity import with_identity_output

    want, why = use_bf16(bf16, n_gpu_layers, src)
    path = with_identity_output(src, identity_dtype, bf16=want)
    log.debug("fast path copy %s (bf16 re-encode %s: %s)", path.name, "on" if want else "off", why)
    return path


def weights_description(metadata) -> str:
    """The weights' encoding from a GGUF's metadata (`metadata(key) -> str | None`): "BF16", "F16",
    "Q8_0", ..., or "F16+BF16" when only some F16 tensors could be re-encoded."""
    from reranker.engine.identity import BF16_TENSORS_KEY
    from reranker.gguf.quantize import QUANT_TYPES

    ftype = metadata("general.file_type")
    names = {str(v): k for k, v in QUANT_TYPES.items()}
    name = names.get(ftype or "", f"file type {ftype}" if ftype else "unknown")
    n_bf16 = int(metadata(BF16_TENSORS_KEY) or 0)
    return f"{name}+BF16" if n_bf16 and name != "BF16" else name


def file_weights(path: str | os.PathLike) -> str:
    """`weights_description` of a GGUF file, from its header (no model load)."""
    from reranker.gguf.header import header_value

    def metadata(key: str) -> str | None:
        value = header_value(path, key)
        return None if value is None else str(value)

    return weights_description(metadata)


def default_threads() -> int:
    """CPU threads for llama.cpp when none are given: the physical cores this process may use,
    one fewer when the 1-minute load average says other processes keep at least one core busy.

    llama.cpp's threads spin at barriers, so a thread whose core is taken stalls all the others:
    on a shared 2-core VM, 2 threads ran 3-10x slower than 1 while another process used a core
    (benchmarks/RESULTS.md). `RERANKER_THREADS=N` overrides the choice.
    """
    forced = os.environ.get(THREADS_ENV, "")
    if forced.isdigit() and int(forced) > 0:
        return int(forced)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores = min(usable, _physical_cores() or usable)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    # A load of >= 0.75 runnable threads (before ours start: someone else's, or a run that just ended)
    # means a core is mostly taken.
    return max(1, cores - 1) if load >= 0.75 else cores


def _physical_cores() -> int | None:
    seen = set()
    phys = core = None
    for line in _cpuinfo().splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key and core is not None:
            seen.add((phys, core))
            phys = core = None
    return len(seen) or None
