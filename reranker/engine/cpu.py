"""What this CPU and llama.cpp's build offer: native bf16 dot products, and the thread default.

BF16: llama.cpp's BF16 mat-muls use the CPU's native bf16 dot products (AVX512_BF16) when the
CPU reports `avx512_bf16` or `amx_bf16` in /proc/cpuinfo (Linux only; elsewhere none is assumed)
and llama.cpp was built with AVX512_BF16 (`native_bf16`). The fast path's copy re-encodes F16
weights as BF16 when that holds (`reranker.engine.identity.use_bf16`).

Threads: `default_threads()`, see its docstring.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import llama_cpp

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
