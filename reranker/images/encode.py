"""The vision projector (an mmproj GGUF) in llama.cpp's libmtmd: a prepared image -> its embeddings.

`VisionEncoder(mmproj, model)` loads the projector for a loaded llama.cpp model (the backbone's;
libmtmd checks its hidden size against the projector's output, and takes ``<|vision_start|>`` /
``<|vision_end|>`` from its vocabulary). `encode(prepared)` runs the vision tower on one image
(Qwen2-VL's vision graph takes one image per call) and returns the image's embeddings, one row of
the backbone's hidden size per merged token, row-major over the (ny, nx) grid, which is the order
transformers' ``model.visual`` returns and the order of the ``<|image_pad|>`` tokens they replace.

The image must come from `preprocess.prepare`: at its smart_resize size, llama.cpp copies it
unchanged (see preprocess.py); anything else it would resize itself, so a mismatch is an error.
libmtmd is loaded when this module is imported (``llama_cpp.mtmd_cpp`` loads ``libmtmd``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp

from reranker import llama_log
from reranker.errors import RerankerError
from reranker.gguf.header import check_file, header_value
from reranker.images.preprocess import PreparedImage, Sizing

logger = logging.getLogger("reranker.llama")

MMPROJ_FIX = ("pass the vision projector converted from the same checkpoint as the GGUF "
              "(llama.cpp's `convert_hf_to_gguf.py --mmproj`, or the mmproj-*.gguf beside the model)")
# The projector types of Qwen2-VL's vision tower + merger (2.5-VL's adds window attention; m0 is 2-VL).
QWEN2VL_PROJECTORS = ("qwen2vl_merger",)
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
# libmtmd's advice for Qwen-VL grounding (at least 1024 image tokens) on every load: the original reranker sizes
# images from 4 tokens, as we do, so the advice does not apply; it goes to DEBUG.
_NOT_FOR_RERANKING = ("require at minimum 1024 image tokens", "try adding --image-min-tokens", "llama.cpp/issues/16842")


@dataclass(frozen=True)
class ImageEmbedding:
    """One image's embeddings (n_tokens x n_embd float32, row-major over the grid), its grid, and the
    M-RoPE positions libmtmd gives its tokens (the backbone computes its own, `engine.segments.Embeddings`;
    tests/images/test_encode.py checks the two and transformers' agree)."""

    embeddings: np.ndarray
    nx: int  # merged tokens per row
    ny: int  # rows
    rel_positions: np.ndarray  # (4, n_tokens) int32 for an image starting at position 0: t, y, x, 0

    @property
    def n_tokens(self) -> int:
        return self.nx * self.ny


class _MtmdLog:
    """libmtmd's log lines go to the `reranker.llama` logger; errors are kept for the next exception."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._level = logging.DEBUG
        self.callback = llama_cpp.llama_log_callback(llama_log.interruptible(self._log))

    def _log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != 5:  # 5 continues the previous line at its level
            self._level = _GGML_LEVELS.get(level, logging.DEBUG)
        line = text.decode("utf-8", errors="replace").rstrip("\n")
        if self._level == logging.WARNING and any(a in line for a in _NOT_FOR_RERANKING):
            self._level = logging.DEBUG
        if self._level >= logging.ERROR and line.strip():
            self.errors = (self.errors + [line.strip()])[-5:]
        if logger.isEnabledFor(self._level):
            logger.log(self._level, line)

    def take(self) -> str:
        msg, self.errors = "; ".join(self.errors), []
        return msg


_log = _MtmdLog()
_log_installed = False
_log_lock = threading.Lock()


def _install_log() -> None:
    global _log_installed
    with _log_lock:
        if not _log_installed:
            mtmd_cpp.mtmd_log_set(_log.callback, ctypes.c_void_p(0))
            mtmd_cpp.mtmd_helper_log_set(_log.callback, ctypes.c_void_p(0))
            _log_installed = True


def check_mmproj(path: str | os.PathLike, n_embd: int) -> Path:
    """`path` when it is a Qwen2-VL vision projector whose output size is `n_embd`, else a clear error.

    Read from the header, before libmtmd sees the file: a text GGUF, another projector type or a
    projector made for another backbone (``clip.vision.projection_dim``) each say so.
    """
    p = check_file(path, "mmproj file", MMPROJ_FIX)
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise RerankerError(f"{p} is not a GGUF file (starts with {magic!r}); {MMPROJ_FIX}")
    arch = header_value(p, "general.architecture")
    if arch != "clip":
        raise RerankerError(f"{p} has architecture {arch!r}, so it is not a vision projector (mmproj GGUFs are 'clip'); {MMPROJ_FIX}")
    if not header_value(p, "clip.has_vision_encoder"):
        raise RerankerError(f"{p} has no vision encoder (clip.has_vision_encoder is not true); {MMPROJ_FIX}")
    proj = header_value(p, "clip.projector_type")
    if proj not in QWEN2VL_PROJECTORS:
        raise RerankerError(f"{p} is a {proj!r} projector; jina-reranker-m0 needs Qwen2-VL's ({', '.join(QWEN2VL_PROJECTORS)}); "
                            f"{MMPROJ_FIX}")
    dim = header_value(p, "clip.vision.projection_dim")
    if dim != n_embd:
        raise RerankerError(f"{p} projects images to {dim} dimensions but the backbone's hidden size is {n_embd}: the projector "
                            f"belongs to another model; {MMPROJ_FIX}")
    return p


class VisionEncoder:
    """An mmproj GGUF in libmtmd, bound to a loaded llama.cpp model; a context manager.

    `model` is the ``llama_model`` pointer the backbone loaded (it must outlive this object).
    `sizing` gives the token limits libmtmd is told (the original's 4 to 768 by default), so an
    image prepared with the same sizing is never resized by llama.cpp. `warmup` runs libmtmd's
    warm-up encode (a 46x46-token image for Qwen2-VL) at load, which reserves the compute buffer
    up front; off by default, since the first real image reserves what it needs. `n_threads`
    None keeps libmtmd's default (4). `flash_attn`: None fuses attention except for an F32 projector,
    which is a reference: libmtmd's fused attention rounds Q, K and V to F16 (on the tiny test tower
    the embeddings' error against transformers goes from 5.7e-4 to 8.4e-4 relative; tests/images/test_encode.py).

    Thread-safe: a lock serialises `encode` and `close`; after `close` every call raises.
    """

    def __init__(self, mmproj: str | os.PathLike, model, *, sizing: Sizing = Sizing(), n_threads: int | None = None,
                 use_gpu: bool = True, warmup: bool = False, flash_attn: bool | None = None) -> None:
        self._lock = threading.Lock()
        self._ctx = None
        if not model:
            raise RerankerError("VisionEncoder needs a loaded llama.cpp model (the backbone's), got none")
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        self.path = check_mmproj(mmproj, self.n_embd)
        self.sizing = sizing
        _install_log()
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = bool(use_gpu) and llama_cpp.llama_supports_gpu_offload()
        params.print_timings = False
        if n_threads:
            params.n_threads = n_threads
        params.warmup = warmup
        params.image_min_tokens = sizing.min_tokens
        params.image_max_tokens = sizing.max_tokens
        if flash_attn is None:
            flash_attn = header_value(self.path, "general.file_type") != 0  # 0: ALL_F32
        # libmtmd's "auto" turns fused attention on wherever the backend has it (the CPU included).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        _log.take()
        ctx = mtmd_cpp.mtmd_init_from_file(str(self.path).encode(), model, params)
        llama_log.raise_if_interrupted(lambda: ctx and mtmd_cpp.mtmd_free(ctx))
        if not ctx:
            reason = _log.take() or "no reason logged"
            raise RerankerError(f"llama.cpp's libmtmd could not load the vision projector {self.path} ({reason}); {MMPROJ_FIX}")
        self._ctx = ctx
        if not mtmd_cpp.mtmd_support_vision(ctx):
            self.close()
            raise RerankerError(f"{self.path} has no vision encoder libmtmd can use; {MMPROJ_FIX}")
        # M-RoPE: the decoder gives image tokens (t, x, y) positions (see ImageEmbedding.nx / ny).
        self.uses_mrope = bool(mtmd_cpp.mtmd_decode_use_mrope(ctx))
        self._marker = mtmd_cpp.mtmd_default_marker()

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def encode(self, prepared: PreparedImage, name: str = "image") -> ImageEmbedding:
        """The embeddings of one image from `preprocess.prepare` (n_tokens x n_embd float32)."""
        img = prepared.image
        w, h = img.size
        f = self.sizing.factor
        if img.mode != "RGB" or w != prepared.grid_w * f or h != prepared.grid_h * f:
            raise RerankerError(f"{name} is not prepared for the vision tower ({img.mode} {w}x{h}, grid "
                                f"{prepared.grid_w}x{prepared.grid_h}); pass it through reranker.images.preprocess.prepare")
        if not self.sizing.min_tokens <= prepared.n_tokens <= self.sizing.max_tokens:
            raise RerankerError(f"{name} has {prepared.n_tokens} image tokens, outside this projector's limits "
                                f"({self.sizing.min_tokens} to {self.sizing.max_tokens}); prepare it with the same Sizing")
        rgb = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
        with self._lock:
            if self._ctx is None:
                raise RerankerError(f"the vision encoder for {self.path} is closed")
            bitmap = mtmd_cpp.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            try:
                if not bitmap or not chunks:
                    raise RerankerError(f"libmtmd could not allocate {name} ({w}x{h})")
                text = mtmd_cpp.mtmd_input_text(self._marker, len(self._marker), False, True)
                bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
                rc = mtmd_cpp.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
                if rc != 0:
                    raise RerankerError(f"libmtmd could not preprocess {name} ({w}x{h}, code {rc}: {_log.take() or 'no reason logged'})")
                chunk = self._image_chunk(chunks, name)
                tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk)
                nx = mtmd_cpp.mtmd_image_tokens_get_nx(tokens)
                ny = mtmd_cpp.mtmd_image_tokens_get_ny(tokens)
                n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                if (nx, ny) != (prepared.grid_w, prepared.grid_h) or n != nx * ny:
                    # llama.cpp resized the image: its sizing and ours disagree, and the pixels are no longer the original's.
                    raise RerankerError(f"llama.cpp sized {name} as {nx}x{ny} tokens where the original's preprocessing gives "
                                        f"{prepared.grid_w}x{prepared.grid_h}; the projector {self.path} is not Qwen2-VL's")
                rel = np.zeros((4, n), dtype=np.int32)
                for i in range(n):  # llama.cpp's own positions, so the decoder gets what libmtmd would give it
                    d = mtmd_cpp.mtmd_image_tokens_get_decoder_pos(tokens, 0, i)
                    rel[:, i] = (d.t, d.y, d.x, d.z)
                rc = mtmd_cpp.mtmd_encode_chunk(self._ctx, chunk)
                if rc != 0:
                    raise RerankerError(f"libmtmd could not encode {name} (code {rc}: {_log.take() or 'no reason logged'})")
                out = mtmd_cpp.mtmd_get_output_embd(self._ctx)
                emb = np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
            finally:
                if chunks:
                    mtmd_cpp.mtmd_input_chunks_free(chunks)
                if bitmap:
                    mtmd_cpp.mtmd_bitmap_free(bitmap)
        return ImageEmbedding(emb, nx, ny, rel)

    @staticmethod
    def _image_chunk(chunks, name: str):
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunk
        raise RerankerError(f"libmtmd produced no image tokens for {name}")

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                mtmd_cpp.mtmd_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> VisionEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self.close()
