"""Route llama.cpp's C-level logging through Python's `logging` (quiet by default)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from collections.abc import Iterator

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
_fallbacks: list[list] | None = None  # [tensor, ncols, block, wanted, used] while `collect_fallbacks` runs


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Level 5 continues the previous line, so it keeps that line's level.
    if level != 5:
        _last_level[0] = _LEVELS.get(level, logging.DEBUG)
        if any(b in text for b in _BENIGN):
            _last_level[0] = logging.DEBUG
        elif m := _FALLBACK.match(text):
            _last_level[0] = logging.DEBUG
            if _fallbacks is not None:
                _fallbacks.append([m.group(1).decode(), int(m.group(2)), int(m.group(3)), m.group(4).decode().upper(), None])
    if m := _FELL_BACK.match(text.strip()):  # its own line or a continuation (level 5), depending on the build
        _last_level[0] = logging.DEBUG
        if _fallbacks and _fallbacks[-1][4] is None:
            _fallbacks[-1][4] = m.group(1).decode().upper()
    if logger.isEnabledFor(_last_level[0]):
        logger.log(_last_level[0], text.decode("utf-8", errors="replace").rstrip("\n"))


@contextlib.contextmanager
def collect_fallbacks() -> Iterator[list[list]]:
    """The quantizer's fallbacks while the block runs: [tensor, ncols, block, wanted type, type used] each."""
    global _fallbacks
    found: list[list] = []
    _fallbacks = found
    try:
        yield found
    finally:
        _fallbacks = None


_installed = False


def install() -> None:
    """Install the callback once per process (llama.cpp otherwise prints everything on stderr)."""
    global _installed
    if not _installed:
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        _installed = True
