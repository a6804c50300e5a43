"""The Python API: `Reranker.from_pretrained(...)`, then `compute_score`, `rank`, `embed`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from head import ScoringHead
from reranker.defaults import BATCH_SIZE, DEFAULT_REPO, HEAD_FILE, IDENTITY_DTYPE, MAX_LENGTH, MAX_QUERY_LENGTH, N_BATCH, N_SEQ_MAX
from reranker.engine.backbone import Backbone, check_settings
from reranker.engine.chunking import Chunker, aggregate
from reranker.engine.identity import fast_path_gguf, use_bf16, weights_description
from reranker.engine.prompts import PromptBuilder
from reranker.errors import RerankerError
from reranker.gguf.header import check_file
from reranker.gguf.hub import resolve
from reranker.options import Chunking, as_chunking, check_lengths, check_pairs, require_int

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when there is one, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for the head: `device` checked (a RerankerError when unusable), else `default_device()`."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RerankerError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:1 or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RerankerError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU; use cpu or install torch's CUDA build")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise RerankerError(f"device {device!r}: torch sees only {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RerankerError(f"device {device!r}: MPS is not available here; use cpu")
    return dev


def check_options(max_length: int | None = None, max_query_length: int | None = None, batch_size: int | None = None,
                  top_k: int | None = None) -> None:
    """The per-call settings (None: the default); `top_k` must be None (all) or at least 1."""
    check_lengths(max_length, max_query_length)
    if batch_size is not None:
        require_int("batch_size", batch_size, 1)
    if top_k is not None:
        require_int("top_k", top_k, 1)


@dataclass
class Usage:
    """What the last call did: pairs scored, prompt tokens decoded, prompts truncated, and the
    backbone's weight encoding (`Reranker.weights_dtype`: "BF16", "F16", "Q8_0", ...)."""

    pairs: int = 0
    tokens: int = 0
    truncated: int = 0
    weights: str = ""
    #: With chunking: documents split into chunks, documents that hit `max_chunks`, and per pair its
    #: number of chunks and the index of its best-scoring chunk (None without chunking).
    chunked: int = 0
    capped: int = 0
    chunks: list[int] | None = None
    best_chunk: list[int] | None = None


class Reranker:
    """jina-reranker-m0 from a GGUF backbone (llama.cpp) and a torch scoring head.

    One instance may be shared by many threads: the backbone serialises llama.cpp and the
    tokenizer, the head runs concurrently. `last_usage` is that of the last call to finish.
    After `close()` every call raises a `RerankerError`.
    """

    def __init__(self, backbone: Backbone, head: ScoringHead, *, max_length: int = MAX_LENGTH,
                 max_query_length: int = MAX_QUERY_LENGTH, device: str | torch.device | None = None,
                 batch_size: int = BATCH_SIZE) -> None:
        check_options(max_length, max_query_length, batch_size)
        if head.hidden_size != backbone.n_embd:
            raise RerankerError(f"the head has hidden size {head.hidden_size} but the backbone {backbone.path.name} "
                                f"gives {backbone.n_embd}: use the mlp_weights.npz released with this GGUF")
        self.backbone = backbone
        self.device = resolve_device(device)
        self.head = head.to(self.device).eval()
        self.max_length = max_length
        self.max_query_length = max_query_length
        self.batch_size = batch_size
        #: The weights as llama.cpp runs them: "BF16" (also when the fast path re-encoded an F16 file), "F16", "Q8_0", ...
        self.weights_dtype = weights_description(backbone.metadata)
        #: Scores independent of the batch: each prompt decoded alone, the head run one row at a time.
        self.deterministic = backbone.deterministic
        self.last_usage = Usage(weights=self.weights_dtype)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_REPO, quant: str | None = None, head: str | os.PathLike | ScoringHead | None = None,
                        *, device: str | torch.device | None = None, n_ctx: int | None = None, n_batch: int = N_BATCH,
                        n_seq_max: int = N_SEQ_MAX, n_gpu_layers: int = -1, n_threads: int | None = None,
                        flash_attn: bool | None = None, kv_type: str | None = None, fast: bool = True,
                        identity_dtype: str = IDENTITY_DTYPE, bf16: bool | None = None, max_length: int | None = None,
                        max_query_length: int = MAX_QUERY_LENGTH, batch_size: int = BATCH_SIZE,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                        deterministic: bool = False) -> "Reranker":
        """Load a GGUF (a path, or a Hub id such as `jinaai/jina-reranker-m0-GGUF:Q8_0`) and its head.

        `head` defaults to the `mlp_weights.npz` beside the GGUF (or in the Hub repo).
        All layers are offloaded to the GPU when llama.cpp was built with CUDA or Metal.
        `max_length` defaults to 10240 tokens, or `n_ctx` when that is given and smaller.

        `fast=True` (the default) reads hidden states in llama.cpp's generation mode through a
        cached copy of the GGUF with an identity output projection (`identity_dtype` f32: embedding
        mode's states, bit-equal on the CPU at the same batch layout; f16: half the memory,
        states rounded to half precision). `fast=False` uses embedding mode, the upstream recipe's path.

        `bf16` (fast path, F16 GGUFs): that copy also stores each F16 tensor whose values are
        exact in BF16 as BF16, for llama.cpp's native bf16 mat-muls (the same weights; activations
        rounded to bf16 instead of f16). None (default): automatic, when the layers run on a CPU
        with avx512_bf16/amx_bf16 (`RERANKER_BF16=0/1` overrides); True: always; False: never.
        `weights_dtype` (and `last_usage.weights`) says what was chosen.

        `deterministic=True`: every prompt is decoded on its own from an empty KV cache and the head
        runs one row at a time, so a pair's score does not depend on the other pairs of a call
        (bit-identical alone or in any batch, on the CPU); slower, see README "Deterministic mode".

        Every setting is checked before any file is read. `quant` with a local .gguf file may
        only restate that file's level (it selects a file in a folder or a Hub repo).
        """
        check_options(max_length, max_query_length, batch_size)
        check_settings(n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max, n_threads=n_threads,
                       n_gpu_layers=n_gpu_layers, kv_type=kv_type)
        if bf16 and not fast:
            raise RerankerError("bf16=True re-encodes the fast path's cached copy; it needs fast=True")
        if not isinstance(deterministic, bool):
            raise RerankerError(f"deterministic={deterministic!r} must be True or False")
        device = resolve_device(device)
        files = resolve(model, quant, cache_dir=cache_dir, local_files_only=local_files_only)
        if head is None:
            if files.head is None:
                raise RerankerError(f"no {HEAD_FILE} beside {files.gguf}; pass head='path/to/{HEAD_FILE}'")
            head = files.head
        if not isinstance(head, ScoringHead) and not os.path.isdir(head):  # a folder may hold a checkpoint
            check_file(head, "head file", f"pass the {HEAD_FILE} released with the GGUF")
        scoring_head = head if isinstance(head, ScoringHead) else ScoringHead.load(head)
        if max_length is None:
            max_length = min(MAX_LENGTH, n_ctx) if n_ctx else MAX_LENGTH
        want_bf16, why = use_bf16(bf16, n_gpu_layers, files.gguf)
        gguf_path = fast_path_gguf(files.gguf, identity_dtype, want_bf16, n_gpu_layers) if fast else files.gguf
        backbone = Backbone(gguf_path, fast=fast, n_ctx=n_ctx or max_length, n_batch=n_batch, n_seq_max=n_seq_max,
                            n_gpu_layers=n_gpu_layers, n_threads=n_threads, flash_attn=flash_attn, kv_type=kv_type,
                            deterministic=deterministic)
        rr = cls(backbone, scoring_head, max_length=max_length, max_query_length=max_query_length,
                 device=device, batch_size=batch_size)
        log.info("%s: weights %s%s", files.gguf.name, rr.weights_dtype,
                 f" (BF16 re-encode of F16 tensors {'on' if want_bf16 else 'off'}: {why})" if fast else "")
        return rr

    def _check_open(self) -> None:
        if self.backbone.closed:
            raise RerankerError("this Reranker is closed; load a new one with Reranker.from_pretrained(...)")

    def prompt_builder(self, max_length: int | None = None, max_query_length: int | None = None) -> PromptBuilder:
        """The tokeniser for pairs, with the length limits of this call (capped by the context)."""
        self._check_open()
        check_options(max_length, max_query_length)
        max_length = max_length or self.max_length
        if max_length > self.backbone.n_ctx:
            log.warning("max_length=%d exceeds the context (n_ctx=%d); prompts are cut to %d tokens",
                        max_length, self.backbone.n_ctx, self.backbone.n_ctx)
            max_length = self.backbone.n_ctx
        return PromptBuilder(self.backbone.tokenizer, max_length, max_query_length or self.max_query_length)

    def embed(self, pairs: Iterable[Sequence[str]], *, batch_size: int | None = None, max_length: int | None = None,
              max_query_length: int | None = None, show_progress_bar: bool = False) -> np.ndarray:
        """Last-token hidden states of `[query, document]` pairs, shape (n, hidden), float32.

        `pairs` is any iterable of [query, document] lists or tuples (a generator is read once).
        """
        self._check_open()
        check_options(batch_size=batch_size)
        pairs = check_pairs(pairs)
        builder = self.prompt_builder(max_length, max_query_length)
        batch_size = batch_size or self.batch_size
        usage = Usage(weights=self.weights_dtype)
        out = np.empty((len(pairs), self.backbone.n_embd), dtype=np.float32)
        with tqdm(total=len(pairs), disable=not show_progress_bar, unit="pair", desc="Reranking") as bar:
            for start in range(0, len(pairs), batch_size):
                prompts = [builder.build(q, d) for q, d in pairs[start : start + batch_size]]
                out[start : start + len(prompts)] = self.backbone.embed([p.ids for p in prompts])
                usage.pairs += len(prompts)
                usage.tokens += sum(len(p.ids) for p in prompts)
                usage.truncated += sum(p.truncated for p in prompts)
                bar.update(len(prompts))
        if usage.truncated:
            log.info("%d of %d prompts were truncated to max_length=%d / max_query_length=%d",
                     usage.truncated, usage.pairs, builder.max_length, builder.max_query_length)
        self.last_usage = usage
        return out

    @torch.inference_mode()
    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """Relevance scores in (0, 1) from last-token hidden states, through the torch head."""
        x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        if self.deterministic and len(x) > 1:  # torch picks its mat-mul kernel by row count: one row at a time
            return torch.cat([self.head(row) for row in x.split(1)]).float().cpu().numpy()
        return self.head(x).float().cpu().numpy()

    def compute_score(self, pairs: Iterable[Sequence[str]] | Sequence[str], *, batch_size: int | None = None,
                      max_length: int | None = None, max_query_length: int | None = None,
                      show_progress_bar: bool = False, chunking: bool | Chunking | None = None) -> list[float] | float:
        """Scores of `[query, document]` pairs, like the original model's `compute_score`.

        A single pair (a list or tuple of two strings) gives a float; any other iterable of
        pairs (a generator too) a list of floats in input order; `[]` gives `[]`. A non-finite
        score (a broken GGUF or head) is a `RerankerError`, never a silent `nan`.

        `chunking` (True or a `Chunking`): a document too long for `max_length` is split into
        chunks, each scored as its own prompt, and its score is their max (or mean, or first);
        `last_usage.chunks` and `.best_chunk` then say, per pair, how many chunks it had and
        which scored best. Default: truncation, as the original model.
        """
        single = isinstance(pairs, (list, tuple)) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs)
        batch = [pairs] if single else pairs
        chunks = as_chunking(chunking)
        if chunks is not None:
            scores, _ = self._score_chunked(batch, chunks, batch_size, max_length, max_query_length, show_progress_bar)
        else:
            embeddings = self.embed(batch, batch_size=batch_size, max_length=max_length,
                                    max_query_length=max_query_length, show_progress_bar=show_progress_bar)
            scores = self._finite_scores(embeddings, np.arange(len(embeddings)))
        return scores.tolist()[0] if single else scores.tolist()

    def _finite_scores(self, embeddings: np.ndarray, pair_of_row: np.ndarray) -> np.ndarray:
        """The head's scores of `embeddings`; a non-finite one is an error naming its pair (`pair_of_row[row]`)."""
        scores = self.score_embeddings(embeddings)
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = int(bad[0])
            part = "GGUF (its hidden state is not finite)" if not np.isfinite(embeddings[i]).all() else "head"
            raise RerankerError(f"the model returned a non-finite score ({scores[i]}) for pair {int(pair_of_row[i])}; "
                                f"the {part} is likely broken")
        return scores

    def _score_chunked(self, pairs: Iterable[Sequence[str]], chunking: Chunking, batch_size: int | None,
                       max_length: int | None, max_query_length: int | None,
                       show_progress_bar: bool) -> tuple[np.ndarray, Usage]:
        """Scores with long documents chunked (see `compute_score`); also sets `last_usage`."""
        self._check_open()
        check_options(batch_size=batch_size)
        pairs = check_pairs(pairs)
        chunker = Chunker(self.prompt_builder(max_length, max_query_length), chunking)
        batch_size = batch_size or self.batch_size
        usage = Usage(weights=self.weights_dtype, chunks=[], best_chunk=[])
        scores = np.empty(len(pairs), dtype=np.float32)
        with tqdm(total=len(pairs), disable=not show_progress_bar, unit="pair", desc="Reranking") as bar:
            for start in range(0, len(pairs), batch_size):
                docs = [chunker.prompts(q, d) for q, d in pairs[start : start + batch_size]]
                prompts = [p for doc in docs for p in doc.prompts]
                counts = [len(doc.prompts) for doc in docs]
                embeddings = self.backbone.embed([p.ids for p in prompts])  # every chunk packed with the rest
                chunk_scores = self._finite_scores(embeddings, start + np.repeat(np.arange(len(docs)), counts))
                result = aggregate(chunk_scores, counts, chunking.aggregate)
                scores[start : start + len(docs)] = result.scores
                usage.pairs += len(docs)
                usage.tokens += sum(len(p.ids) for p in prompts)
                usage.truncated += sum(doc.truncated for doc in docs)
                usage.chunked += sum(doc.split for doc in docs)
                usage.capped += sum(doc.capped for doc in docs)
                usage.chunks += result.chunks.tolist()
                usage.best_chunk += result.best.tolist()
                bar.update(len(docs))
        if usage.capped:
            log.warning("%d of %d documents had more than max_chunks=%d chunks; their ends were not scored",
                        usage.capped, usage.pairs, chunking.max_chunks)
        self.last_usage = usage
        return scores, usage

    def rank(self, query: str, documents: Iterable[str], *, top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, show_progress_bar: bool = False,
             chunking: bool | Chunking | None = None) -> list[dict]:
        """Documents sorted by relevance to `query`, like sentence-transformers' `CrossEncoder.rank`.

        Each result is `{"corpus_id": index, "score": float}` (plus `"text"` with `return_documents`,
        and `"chunks"`, `"best_chunk"` with `chunking`, see `compute_score`).
        `documents` is any iterable of strings; `top_k` is None (all) or at least 1.
        """
        self._check_open()
        check_options(batch_size=batch_size, top_k=top_k)
        if isinstance(documents, (str, bytes)):
            raise RerankerError("documents must be a list of strings, not one string; wrap it: [document]")
        if isinstance(documents, dict) or not isinstance(documents, Iterable):
            raise RerankerError(f"documents must be a list of strings, got {type(documents).__name__} ({documents!r:.60})")
        documents = list(documents)
        chunks = as_chunking(chunking)
        extra: dict[int, dict] = {}
        if chunks is not None:
            values, usage = self._score_chunked([[query, d] for d in documents], chunks, batch_size, None, None,
                                                show_progress_bar)
            scores = values.tolist()
            extra = {i: {"chunks": usage.chunks[i], "best_chunk": usage.best_chunk[i]} for i in range(len(scores))}
        else:
            scores = self.compute_score([[query, d] for d in documents], batch_size=batch_size,
                                        show_progress_bar=show_progress_bar) if documents else []
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_k]
        return [{"corpus_id": i, "score": scores[i], **({"text": documents[i]} if return_documents else {}), **extra.get(i, {})}
                for i in order]

    def close(self) -> None:
        """Free the llama.cpp model and context; later calls raise a `RerankerError`. Closing twice is fine."""
        self.backbone.close()

    def __enter__(self) -> "Reranker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
