"""Route llama.cpp's C-level logging through Python's `logging` (quiet by default)."""

from __future__ import annotations

import ctypes
import logging

import llama_cpp

logger = logging.getLogger("reranker.llama")

# GGML log levels: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 cont
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]
# Warnings every Qwen2 GGUF triggers, and the pooling type this project sets on purpose.
_BENIGN = (b"control-looking token", b"model default pooling_type")


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Level 5 continues the previous line, so it keeps that line's level.
    if level != 5:
        _last_level[0] = _LEVELS.get(level, logging.DEBUG)
        if any(b in text for b in _BENIGN):
            _last_level[0] = logging.DEBUG
    if logger.isEnabledFor(_last_level[0]):
        logger.log(_last_level[0], text.decode("utf-8", errors="replace").rstrip("\n"))


_installed = False


def install() -> None:
    """Install the callback once per process (llama.cpp otherwise prints everything on stderr)."""
    global _installed
    if not _installed:
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        _installed = True
