"""The GGUF language backbone: packed token sequences -> last-token hidden states."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Sequence

import llama_cpp
import numpy as np

from reranker import llama_log
from reranker.defaults import MAX_LENGTH, N_BATCH_CPU, N_BATCH_GPU, N_SEQ_MAX, N_UBATCH_CPU, N_UBATCH_GPU
from reranker.engine.batching import pack
from reranker.engine.cpu import default_threads
from reranker.engine.identity import MARKER_KEY
from reranker.engine.segments import Embeddings, Segments
from reranker.engine.tokenizer import GGUFTokenizer
from reranker.errors import RerankerError
from reranker.gguf.header import SUPPORTED_ARCHS, check_gguf_file
from reranker.options import KV_TYPES, check_settings

CPU_EXTRA_BUFFERS_ENV = "RERANKER_CPU_EXTRA_BUFFERS"


def cpu_extra_buffers() -> bool:
    """Whether llama.cpp may put CPU weights in its extra buffer types (AMX, repacked layouts).

    Off when llama.cpp was built with AMX: in llama-cpp-python 0.3.36 its AMX kernels die with
    SIGILL when GCC < 13 built them (the tile config's stores are optimised away) and after any
    torch bf16 op on the decoding thread (oneDNN releases the tiles; llama.cpp loads the config
    once per thread). A crash costs more than the speed-up (about 4x for Q8_0).
    benchmarks/amx/ has the cause, a patch and a build script; with a patched build set
    `RERANKER_CPU_EXTRA_BUFFERS=1` (`0` forces them off everywhere).
    """
    forced = os.environ.get(CPU_EXTRA_BUFFERS_ENV, "").strip()
    if forced not in ("", "0", "1"):
        raise RerankerError(f"{CPU_EXTRA_BUFFERS_ENV}={forced!r} is not a switch: set it to 1 (on) or 0 (off), or unset it")
    if forced:
        return forced == "1"
    return b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()


def _load_model(path, n_gpu_layers: int = 0, vocab_only: bool = False):
    llama_log.install()
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = n_gpu_layers
    mparams.vocab_only = vocab_only
    mparams.use_extra_bufts = cpu_extra_buffers()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    llama_log.raise_if_interrupted(lambda: model and llama_cpp.llama_model_free(model))
    if not model:
        raise RerankerError(f"llama.cpp could not load {path}: the file is corrupt or not a supported model "
                            "(enable logging.getLogger('reranker.llama') at DEBUG for llama.cpp's reason)")
    return model


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


class _BatchBuffers:
    """A `llama_batch` whose arrays are numpy buffers of `capacity` entries (`pos_per_entry` positions each):
    the positions, sequence ids and output flags; the input (tokens or embedding rows) is the subclass's."""

    def __init__(self, capacity: int, pos_per_entry: int = 1) -> None:
        self.pos = np.zeros(pos_per_entry * capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        # seq_id is an array of pointers, one per entry, each into `self.seq`.
        self.seq_ptr = self.seq.ctypes.data + 4 * np.arange(capacity, dtype=np.uint64)
        self.struct = llama_cpp.llama_batch()
        self.struct.token = ctypes.POINTER(llama_cpp.llama_token)()
        self.struct.embd = ctypes.POINTER(ctypes.c_float)()
        self.struct.pos = _ptr(self.pos, llama_cpp.llama_pos)
        self.struct.n_seq_id = _ptr(self.n_seq_id, ctypes.c_int32)
        self.struct.seq_id = self.seq_ptr.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id)))
        self.struct.logits = _ptr(self.logits, ctypes.c_int8)


class _PackedBatch(_BatchBuffers):
    """A batch of tokens, filled without per-token Python loops."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.token = np.zeros(capacity, dtype=np.int32)
        self.struct.token = _ptr(self.token, llama_cpp.llama_token)

    def fill(self, chunks: Sequence[tuple[Sequence[int], int, int, bool]], all_outputs: bool) -> list[int]:
        """Lay out (ids, seq_id, first position, output last token) chunks one after another.

        Returns the batch index of each chunk's last token.
        """
        n = 0
        last = []
        for ids, seq, start, output_last in chunks:
            k = len(ids)
            self.token[n : n + k] = ids
            self.pos[n : n + k] = np.arange(start, start + k, dtype=np.int32)
            self.seq[n : n + k] = seq
            self.logits[n : n + k] = 1 if all_outputs else 0
            self.logits[n + k - 1] = 1 if all_outputs or output_last else 0
            n += k
            last.append(n - 1)
        self.struct.n_tokens = n
        return last


class _EmbeddingBatch(_BatchBuffers):
    """A batch of embedding rows (an image's; token stays NULL) with M-RoPE positions: 4 per row, section-major."""

    def __init__(self, capacity: int, n_embd: int) -> None:
        super().__init__(capacity, pos_per_entry=4)
        self.embd = np.zeros((capacity, n_embd), dtype=np.float32)
        self.struct.embd = _ptr(self.embd, ctypes.c_float)

    def fill(self, chunks: Sequence[tuple[Embeddings, int, int, int, int]], all_outputs: bool) -> None:
        """Lay out (image, first row, rows, seq_id, the image's first position) chunks one after another."""
        total = sum(k for _, _, k, _, _ in chunks)
        n = 0
        for image, first, k, seq, start in chunks:
            self.embd[n : n + k] = image.rows[first : first + k]
            pos = image.positions(start, first, k)
            for j in range(4):  # llama.cpp reads pos[j * n_tokens + i]
                self.pos[j * total + n : j * total + n + k] = pos[j]
            self.seq[n : n + k] = seq
            n += k
        self.logits[:n] = 1 if all_outputs else 0  # the scoring token is text: no image row is an output
        self.struct.n_tokens = n


def _equal_piece(n: int, cap: int) -> int:
    """How much of `n` remaining rows to feed now, at most `cap`: all of them, or the first of equal pieces.

    Equal, since a short last piece would take llama.cpp's CPU attention for under 64 query rows, which
    rounds the queries to F16 (twice the score error, tests/engine/test_n_batch.py): 572 rows at 512 go
    in as 286 + 286, not 512 + 60.
    """
    return -(-n // -(-n // cap))  # ceil(n / ceil(n / cap)), which is n when n <= cap


class _Cursor:
    """Where one prompt of `Segments` is in its feeding: its part, the offset into it, the part's first position."""

    def __init__(self, segments: Segments) -> None:
        self.parts = segments.parts
        self.starts = segments.starts()
        self.index = self.offset = 0

    @property
    def done(self) -> bool:
        return self.index == len(self.parts)

    @property
    def part(self):
        return self.parts[self.index]

    @property
    def is_image(self) -> bool:
        return isinstance(self.part, Embeddings)

    @property
    def start(self) -> int:
        return self.starts[self.index]

    @property
    def remaining(self) -> int:
        return len(self.part.rows if self.is_image else self.part) - self.offset

    def ends_with(self, k: int) -> bool:
        """Whether feeding `k` more of the current part feeds the prompt's last token."""
        return self.index == len(self.parts) - 1 and k == self.remaining

    def advance(self, k: int) -> None:
        self.offset += k
        if not self.remaining:
            self.index, self.offset = self.index + 1, 0


class Backbone:
    """A jina-reranker-m0 GGUF in llama.cpp: token sequences -> last-token hidden states.

    Two ways to read the hidden state, the same function up to summation order (bit-equal on
    the CPU at the same batch layout, except a sequence that ends alone in a physical batch):
    - embedding mode (`fast=False`, the reference): pooling LAST, no normalisation; llama.cpp
      then outputs every token, computing and copying full-vocabulary logits for each;
    - generation mode (`fast=True`): only each sequence's last token is an output, and the
      GGUF's output projection must be the identity (see `identity.py`), so the
      first `n_embd` logits are the hidden state.

    Many sequences share each `llama_decode` call (one sequence id each, up to `n_batch`
    tokens: by default 512 on the CPU, one physical batch, and 2048 on a GPU); the KV cache is
    cleared between calls. A sequence longer than `n_batch` is fed alone in equal chunks of at
    most `n_batch`: causal attention makes that the same function, though llama.cpp's kernels
    sum in an order that depends on the chunk size (tests/engine/test_fast_path.py bounds it).

    Packing makes a sequence's state depend slightly on its neighbours (its KV cells, ubatch
    split points, and whether its output is alone in a ubatch pick the summation order).
    `deterministic=True` decodes each sequence alone from cell 0 of an empty cache, so its
    state is a function of the sequence alone (tests/engine/test_deterministic.py).

    Thread-safe: a lock serialises `embed` and `close`; the tokenizer needs no lock but its own
    (many threads tokenise at once, while another decodes); `close` takes both, waits for the
    tokenising in progress, and after it every call raises a `RerankerError`.

    `eval_callback`: a `llama_cpp.ggml_backend_sched_eval_callback` given to llama.cpp's scheduler
    (ggml's per-node hook; `benchmarks/profile.py` times each op with it). None: none.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = MAX_LENGTH,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        n_seq_max: int = N_SEQ_MAX,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        flash_attn: bool | None = None,
        kv_type: str | None = None,
        fast: bool = False,
        deterministic: bool = False,
        eval_callback=None,
    ) -> None:
        self._lock = threading.RLock()  # first, so close() (and __del__) always has it
        self._ctx = None
        check_settings(n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                       kv_type=kv_type)
        self.path = check_gguf_file(path)
        self._model = _load_model(self.path, n_gpu_layers=n_gpu_layers)
        self.arch = self.metadata("general.architecture")
        if self.arch not in SUPPORTED_ARCHS:
            self.close()
            raise RerankerError(f"{self.path} has architecture {self.arch!r}; jina-reranker-m0 GGUFs are 'qwen2vl'")
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.fast = fast
        self.deterministic = deterministic
        if fast and self.metadata(MARKER_KEY) is None:
            self.close()
            raise RerankerError(f"{self.path} has no identity output projection, which fast=True needs; "
                                "pass the path from reranker.engine.identity.with_identity_output()")
        # Not under this lock: the job tokenises the next window, and the server its requests, while one decodes.
        self.tokenizer = GGUFTokenizer(llama_cpp.llama_model_get_vocab(self._model))

        on_gpu = self.on_gpu = n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        n_batch = min(n_batch or (N_BATCH_GPU if on_gpu else N_BATCH_CPU), n_ctx)
        n_seq_max = max(1, min(n_seq_max, 256, n_batch))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch or (N_UBATCH_GPU if on_gpu else N_UBATCH_CPU), n_batch)
        cparams.n_seq_max = n_seq_max
        if fast:
            cparams.n_outputs_max = n_seq_max  # sizes the host logits buffer: n_vocab floats per output
        cparams.kv_unified = True  # all sequences share the cache, so one may use all of it
        cparams.embeddings = not fast
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE if fast else llama_cpp.LLAMA_POOLING_TYPE_LAST
        threads = n_threads or default_threads()  # physical cores, one fewer when the load says one is busy
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # An F32 GGUF is a reference: keep the KV cache in F32 and attention unfused, since
        # an F16 cache or CPU flash attention alone costs ~1e-3 relative error.
        reference = self.metadata("general.file_type") == str(llama_cpp.LLAMA_FTYPE_ALL_F32)
        kv_type = kv_type or ("f32" if reference else "f16")
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        if flash_attn is None and reference:
            flash_attn = False
        cparams.flash_attn_type = {None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        if eval_callback is not None:  # kept referenced: llama.cpp calls it for as long as the context lives
            self._eval_callback = eval_callback
            cparams.cb_eval = eval_callback
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        llama_log.raise_if_interrupted(self.close)
        if not self._ctx:
            head_dim = self.n_embd // max(1, llama_cpp.llama_model_n_head(self._model))
            self.close()
            if kv_type == "q8_0" and head_dim % 32:  # ggml stores q8_0 in blocks of 32 values per head row
                raise RerankerError(f"kv_type='q8_0' needs a head size that is a multiple of 32, and {self.path.name}'s is "
                                    f"{head_dim}; use kv_type='f16' (or 'bf16', 'f32')")
            raise RerankerError(f"llama.cpp could not create a context for {self.path} (n_ctx={n_ctx}, n_batch={n_batch}); "
                                "try a smaller n_ctx or n_batch")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = _PackedBatch(n_batch)
        self._embd_batch: _EmbeddingBatch | None = None  # made on the first image

    @property
    def closed(self) -> bool:
        return getattr(self, "_model", None) is None

    @property
    def llama_model(self):
        """The `llama_model` pointer (for libmtmd's vision projector, which must be closed before this backbone)."""
        self._check_open()
        return self._model

    def _check_open(self) -> None:
        if self.closed:
            raise RerankerError(f"this Backbone ({self.path.name}) is closed; create a new one")

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when absent."""
        buf = ctypes.create_string_buffer(1024)
        with self._lock:
            self._check_open()
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def embed(self, sequences: Sequence[Sequence[int] | Segments]) -> np.ndarray:
        """Final-norm hidden state of each sequence's last token, shape (len(sequences), n_embd), float32.

        A sequence is token ids, or `Segments` (token ids and image embeddings, see `segments.py`)."""
        with self._lock:
            self._check_open()
            return self._embed(sequences)

    def _embed(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        out = np.empty((len(sequences), self.n_embd), dtype=np.float32)
        n_vocab = self.tokenizer.n_vocab
        for i, seq in enumerate(sequences):
            if not 0 < len(seq) <= self.n_ctx:
                raise RerankerError(f"sequence {i} has {len(seq)} tokens; it must have 1 to n_ctx={self.n_ctx}")
            for part in seq.parts if isinstance(seq, Segments) else (seq,):
                if isinstance(part, Embeddings):
                    if part.rows.shape[1] != self.n_embd or not np.isfinite(part.rows).all():
                        raise RerankerError(f"sequence {i} has image embeddings of width {part.rows.shape[1]} or non-finite "
                                            f"values; the backbone takes finite rows of {self.n_embd}")
                elif min(part) < 0 or max(part) >= n_vocab:  # llama.cpp would abort the process
                    raise RerankerError(f"sequence {i} has a token id outside the vocabulary [0, {n_vocab})")
        if any(isinstance(seq, Segments) for seq in sequences):
            self._embed_segments([seq if isinstance(seq, Segments) else Segments((seq,)) for seq in sequences], out)
            return out
        if self.deterministic:
            for i, ids in enumerate(sequences):
                out[i] = self._hidden(0, self._decode_alone(ids))
            return out
        for group in pack([len(s) for s in sequences], self.n_batch, self.n_seq_max):
            if len(group) == 1:
                last = [self._decode_alone(sequences[group[0]])]
            else:
                self._clear()
                last = self._decode([(sequences[idx], seq, 0, True) for seq, idx in enumerate(group)])
            for seq, idx in enumerate(group):
                out[idx] = self._hidden(seq, last[seq])
        return out

    def _embed_segments(self, sequences: Sequence[Segments], out: np.ndarray) -> None:
        """Feed prompts with images part by part: in each round, one decode of the text parts due next,
        then one of the image parts due next (llama.cpp takes tokens or embeddings in a batch, not both).

        The same packing as text (`deterministic`: each prompt alone from cell 0); a part longer than
        n_batch (only a prompt alone in its group has one) is fed in equal pieces of at most n_batch.
        Its state is read right after the decode holding its last token.
        """
        groups = [[i] for i in range(len(sequences))] if self.deterministic else \
            pack([len(s) for s in sequences], self.n_batch, self.n_seq_max)
        for group in groups:
            self._clear()
            cursors = [_Cursor(sequences[idx]) for idx in group]
            while not all(c.done for c in cursors):
                for images in (False, True):
                    budget, chunks = self.n_batch, []
                    for seq, c in enumerate(cursors):
                        if not c.done and c.is_image == images and budget:
                            chunks.append((seq, c, _equal_piece(c.remaining, budget)))
                            budget -= chunks[-1][2]
                    if chunks:
                        self._decode_parts(chunks, images, group, out)

    def _decode_parts(self, chunks: list[tuple[int, _Cursor, int]], images: bool, group: list[int], out: np.ndarray) -> None:
        if images:
            if self._embd_batch is None:
                self._embd_batch = _EmbeddingBatch(self.n_batch, self.n_embd)
            self._embd_batch.fill([(c.part, c.offset, k, seq, c.start) for seq, c, k in chunks], all_outputs=not self.fast)
            batch = self._embd_batch.struct
        else:
            ends = [c.ends_with(k) for _, c, k in chunks]
            last = self._batch.fill([(c.part[c.offset : c.offset + k], seq, c.start + c.offset, end)
                                     for (seq, c, k), end in zip(chunks, ends)], all_outputs=not self.fast)
            batch = self._batch.struct
        rc = llama_cpp.llama_decode(self._ctx, batch)
        llama_log.raise_if_interrupted()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on {batch.n_tokens} {'image rows' if images else 'tokens'}")
        if not images:
            for (seq, _, _), end, index in zip(chunks, ends, last):
                if end:  # the next decode overwrites the outputs: read the state now
                    out[group[seq]] = self._hidden(seq, index)
        for _, c, k in chunks:
            c.advance(k)

    def _decode_alone(self, ids: Sequence[int]) -> int:
        # One sequence in an empty cache from cell 0, fed in equal chunks of at most n_batch: its KV
        # cells, ubatch split points and kernels are then a function of the sequence alone.
        self._clear()
        size = _equal_piece(len(ids), self.n_batch)
        for start in range(0, len(ids), size):
            end = start + size
            last = self._decode([(ids[start:end], 0, start, end >= len(ids))])
        return last[-1]

    def _decode(self, chunks: Sequence[tuple[Sequence[int], int, int, bool]]) -> list[int]:
        last = self._batch.fill(chunks, all_outputs=not self.fast)
        rc = llama_cpp.llama_decode(self._ctx, self._batch.struct)
        llama_log.raise_if_interrupted()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on {self._batch.struct.n_tokens} tokens")
        return last

    def _hidden(self, seq: int, batch_index: int) -> np.ndarray:
        if self.fast:
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, batch_index)
        else:
            ptr = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
        if not ptr:
            raise RuntimeError(f"llama.cpp returned no output for sequence {seq}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,))

    def _clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        """Free the context and the model (also done when the object is collected); closing twice is fine."""
        tokenizer = getattr(self, "tokenizer", None)
        with self._lock, (tokenizer.lock if tokenizer is not None else contextlib.nullcontext()):
            if tokenizer is not None:
                tokenizer.release()
            if getattr(self, "_ctx", None):
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
            if getattr(self, "_model", None):
                llama_cpp.llama_model_free(self._model)
                self._model = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "Backbone":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VocabOnly:
    """Just the GGUF's tokenizer (no weights, no context): for processes that only tokenise."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = check_gguf_file(path)
        self._model = _load_model(self.path, vocab_only=True)
        self.tokenizer = GGUFTokenizer(llama_cpp.llama_model_get_vocab(self._model))
        self.tokenizer.owner = self  # the vocabulary lives as long as the model does

    def close(self) -> None:
        """Free the model; the tokenizer then raises a `RerankerError` when used."""
        if getattr(self, "_model", None):
            with self.tokenizer.lock:
                self.tokenizer.release()
                llama_cpp.llama_model_free(self._model)
                self._model = None

    def __del__(self) -> None:
        self.close()
