"""Route llama.cpp's C-level logging through Python's `logging` (quiet by default)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import llama_cpp

logger = logging.getLogger("reranker.llama")

# GGML log levels: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 cont
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]
# Warnings every Qwen2 GGUF triggers, and the pooling type this project sets on purpose.
_BENIGN = (b"control-looking token", b"model default pooling_type", b"required fallback quantization")
# The quantizer's two lines per tensor whose rows do not fit a K-quant's 256-value blocks (14 tensors x 2 lines
# per level on the tiny model): collected and summed up in one line by `reranker.gguf.quantize` instead.
_FALLBACK = re.compile(rb"^warning: (\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\w+)\)")
_FELL_BACK = re.compile(rb"^-> falling back to\s+(\w+)")


@dataclass
class Collected:
    """What llama.cpp said while `collect` ran: the quantizer's fallbacks ([tensor, ncols, block, wanted type,
    type used] each) and its error lines (such as why a quantization failed)."""

    fallbacks: list[list] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


_collected: Collected | None = None  # while `collect` runs


_interrupted = False  # a Ctrl-C that arrived inside a log callback, for `raise_if_interrupted`


def interruptible(callback: Callable[..., None]) -> Callable[..., None]:
    """`callback` (a C-called log callback) with a Ctrl-C kept instead of lost.

    Python runs a signal's handler in the first Python code it meets; while llama.cpp loads a model that is
    its log callback, where ctypes would print the KeyboardInterrupt and drop it, and the load would go on.
    It is kept here, and `raise_if_interrupted` raises it once llama.cpp has returned."""

    @functools.wraps(callback)
    def guarded(*args):
        global _interrupted
        try:
            callback(*args)
        except KeyboardInterrupt:
            _interrupted = True

    return guarded


def raise_if_interrupted(cleanup: Callable[[], object] | None = None) -> None:
    """Raise the KeyboardInterrupt a log callback kept (after `cleanup`, which frees what the call made)."""
    global _interrupted
    if _interrupted:
        _interrupted = False
        if cleanup is not None:
            cleanup()
        raise KeyboardInterrupt


@llama_cpp.llama_log_callback
@interruptible
def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    collected = _collected
    # Level 5 continues the previous line, so it keeps that line's level.
    if level != 5:
        _last_level[0] = _LEVELS.get(level, logging.DEBUG)
        if any(b in text for b in _BENIGN):
            _last_level[0] = logging.DEBUG
        elif m := _FALLBACK.match(text):
            _last_level[0] = logging.DEBUG
            if collected is not None:
                collected.fallbacks.append([m.group(1).decode(), int(m.group(2)), int(m.group(3)), m.group(4).decode().upper(), None])
    if m := _FELL_BACK.match(text.strip()):  # its own line or a continuation (level 5), depending on the build
        _last_level[0] = logging.DEBUG
        if collected is not None and collected.fallbacks and collected.fallbacks[-1][4] is None:
            collected.fallbacks[-1][4] = m.group(1).decode().upper()
    if collected is not None and _last_level[0] >= logging.ERROR:
        line, errors = text.decode("utf-8", errors="replace").strip(), collected.errors
        if level == 5 and errors:
            errors[-1] += line
        elif line:
            errors.append(line)
    if logger.isEnabledFor(_last_level[0]):
        logger.log(_last_level[0], text.decode("utf-8", errors="replace").rstrip("\n"))


@contextlib.contextmanager
def collect() -> Iterator[Collected]:
    """The quantizer's fallbacks and llama.cpp's error lines while the block runs."""
    global _collected
    found = Collected()
    _collected = found
    try:
        yield found
    finally:
        _collected = None


_installed = False


def install() -> None:
    """Install the callback once per process (llama.cpp otherwise prints everything on stderr)."""
    global _installed
    if not _installed:
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        _installed = True
