"""What this CPU and llama.cpp's build offer: native bf16 dot products, and the thread default.

BF16: llama.cpp's BF16 mat-muls use the CPU's native bf16 dot products (AVX512_BF16) when the
CPU reports `avx512_bf16` or `amx_bf16` in /proc/cpuinfo (Linux only; elsewhere none is assumed)
and llama.cpp was built with AVX512_BF16 (`native_bf16`). The fast path's copy re-encodes F16
weights as BF16 when that holds (`reranker.engine.identity.use_bf16`).

Threads: `default_threads()`, see its docstring.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from pathlib import Path

import llama_cpp

from reranker.errors import RerankerError
from reranker.options import MAX_THREADS

THREADS_ENV = "RERANKER_THREADS"
BUSY_SAMPLE_S = 0.25  # /proc/stat ticks 100 times a second: 25 ticks per core, enough to tell a busy core from an idle one
_BUSY_TTL_S = 5.0  # loads within this long reuse the sample (a test suite or a server loads many models in a row)
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
    """CPU threads for llama.cpp when none are given: the physical cores this process may use (its CPU
    affinity, capped by its cgroup's CPU quota), less the cores other processes keep busy right now.

    llama.cpp's threads spin at barriers, so a thread whose core is taken stalls all the others:
    on a shared 2-core VM, 2 threads ran 3-10x slower than 1 while another process used a core
    (benchmarks/RESULTS.md). "Right now" is a 0.25 s sample of /proc/stat (this process's own CPU time
    taken out), not the 1-minute load average, which still counts work that has just ended (a previous
    job): there, right after one job, the next chose 1 thread on an idle 2-core machine and ran 40% slower.
    Elsewhere (no /proc/stat) the load average decides. `RERANKER_THREADS=N` overrides the choice.
    """
    forced = os.environ.get(THREADS_ENV, "").strip()
    if forced:  # a typo silently ignored, or 1000 threads on 2 cores, would cost the whole run its speed
        if not (forced.isdigit() and 1 <= int(forced) <= MAX_THREADS):
            raise RerankerError(f"{THREADS_ENV}={forced!r} is not a thread count: set it to 1 .. {MAX_THREADS}, or unset it")
        return int(forced)
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    cores = min(len(cpus), _physical_cores() or len(cpus), cgroup_cpu_limit() or len(cpus))
    busy = _busy_now(frozenset(cpus))
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return threads_for(cores, busy)


def threads_for(cores: int, busy: float) -> int:
    """Threads for `cores` usable cores when other processes keep `busy` cores' worth of them running: a core
    at least 3/4 taken is left to them (llama.cpp's spinning threads stall behind a shared core), one at least."""
    return max(1, cores - math.floor(busy + 0.25))


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """Whole CPUs this process's cgroup quota allows (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), None without one.

    A quota of 1.5 CPUs with 2 threads throttles both mid-barrier, so the quota is rounded down (at least 1)."""
    base = Path(root)
    try:
        quota, _, period = (base / "cpu.max").read_text().strip().partition(" ")
    except OSError:
        try:
            quota = (base / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (base / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if not quota.lstrip("-").isdigit() or not period.isdigit() or int(quota) <= 0 or int(period) <= 0:
        return None  # "max" or -1: no quota
    return max(1, int(quota) // int(period))


def _busy_ticks(cpus: frozenset[int], stat: str | os.PathLike = "/proc/stat") -> int | None:
    """Ticks `cpus` spent on anything but idle and iowait (steal counts: the hypervisor took the core), from /proc/stat."""
    try:
        text = Path(stat).read_text()
    except OSError:
        return None
    busy = seen = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (list(map(int, rest.split()[:8])) + [0] * 8)[:8]
            busy += user + nice + system + irq + softirq + steal
            seen += 1
    return busy if seen else None


def busy_cores(cpus: frozenset[int], interval: float = BUSY_SAMPLE_S) -> float | None:
    """How many of `cpus` other processes keep busy, measured over `interval` seconds: their busy ticks
    less this process's own CPU time, per second. None where /proc/stat cannot be read."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    t0, own0, busy0 = time.monotonic(), sum(os.times()[:2]), _busy_ticks(cpus)
    if busy0 is None:
        return None
    time.sleep(interval)
    t1, own1, busy1 = time.monotonic(), sum(os.times()[:2]), _busy_ticks(cpus)
    if busy1 is None:
        return None
    return max(0.0, ((busy1 - busy0) / hz - (own1 - own0)) / (t1 - t0))


_busy_lock = threading.Lock()
_busy_cache: dict[frozenset[int], tuple[float, float | None]] = {}


def _busy_now(cpus: frozenset[int]) -> float | None:
    with _busy_lock:  # one sample at a time, shared by the loads of the next few seconds
        now = time.monotonic()
        hit = _busy_cache.get(cpus)
        if hit is not None and now - hit[0] < _BUSY_TTL_S:
            return hit[1]
        value = busy_cores(cpus)
        _busy_cache[cpus] = (time.monotonic(), value)
        return value


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
