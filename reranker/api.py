"""The Python API: `Reranker.from_pretrained(...)`, then `compute_score`, `rank`, `embed`."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from head import ScoringHead
from reranker.defaults import BATCH_SIZE, DEFAULT_REPO, HEAD_FILE, IDENTITY_DTYPE, MAX_LENGTH, MAX_QUERY_LENGTH, N_SEQ_MAX
from reranker.engine.backbone import Backbone
from reranker.engine.identity import bf16_note, fast_path_gguf, use_bf16, weights_description
from reranker.engine.prompts import PromptBuilder
from reranker.engine.scoring import ScoredDocuments, Usage, check_keep_hidden, prepare, score_prepared
from reranker.engine.vision import Vision, find_mmproj, load
from reranker.errors import RerankerError
from reranker.gguf.header import check_file
from reranker.gguf.hub import HubSource, mmproj_from_hub, resolve
from reranker.options import Chunking, ImageRef, as_chunking, check_lengths, check_pairs, require_int
from reranker.settings import LoadSettings

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
    if dev.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: usable only if a tensor makes the round trip
        try:
            torch.zeros(1, device=dev).cpu()
        except Exception as e:  # noqa: BLE001 (each backend fails its own way: NotImplementedError, AssertionError, ...)
            raise RerankerError(f"device {device!r} cannot run the head here ({type(e).__name__}: {e}); use cpu, cuda or mps") from e
    return dev


def check_options(max_length: int | None = None, max_query_length: int | None = None, batch_size: int | None = None,
                  top_k: int | None = None, max_doc_length: int | None = None) -> None:
    """The per-call settings (None: the default); `top_k` must be None (all) or at least 1."""
    check_lengths(max_length, max_query_length, max_doc_length)
    if batch_size is not None:
        require_int("batch_size", batch_size, 1)
    if top_k is not None:
        require_int("top_k", top_k, 1)


class Reranker:
    """jina-reranker-m0 from a GGUF backbone (llama.cpp) and a torch scoring head.

    One instance may be shared by many threads: the backbone serialises llama.cpp and the
    tokenizer, the head runs concurrently. `last_usage` is that of the last call to finish.
    After `close()` every call raises a `RerankerError`.
    """

    def __init__(self, backbone: Backbone, head: ScoringHead, *, max_length: int = MAX_LENGTH,
                 max_query_length: int = MAX_QUERY_LENGTH, device: str | torch.device | None = None,
                 batch_size: int = BATCH_SIZE, max_doc_length: int | None = None) -> None:
        check_options(max_length, max_query_length, batch_size, max_doc_length=max_doc_length)
        if head.hidden_size != backbone.n_embd:
            raise RerankerError(f"the head has hidden size {head.hidden_size} but the backbone {backbone.path.name} "
                                f"gives {backbone.n_embd}: use the mlp_weights.npz released with this GGUF")
        self.backbone = backbone
        self.device = resolve_device(device)
        self.head = head.to(self.device).eval()
        self.max_length = max_length
        self.max_query_length = max_query_length
        #: Document tokens at most; None: the original's `max(max_length - max_query_length, max_query_length)`.
        self.max_doc_length = max_doc_length
        self.batch_size = batch_size
        #: The weights as llama.cpp runs them: "BF16" (also when the fast path re-encoded an F16 file), "F16", "Q8_0", ...
        self.weights_dtype = weights_description(backbone.metadata)
        #: Scores independent of the batch: each prompt decoded alone, the head run one row at a time.
        self.deterministic = backbone.deterministic
        self.last_usage = Usage(weights=self.weights_dtype)
        #: The `LoadSettings` it was loaded with (None when built from a backbone and a head directly).
        self.settings: LoadSettings | None = None
        #: The GGUF it was loaded from (not the fast path's copy): where `mmproj-*.gguf` is looked for.
        self.gguf_source: Path = backbone.path
        #: For a Hub model, its repo and commit: the vision projector is fetched from there on the first image.
        self.hub_source: HubSource | None = None
        self._vision: Vision | None = None
        self._vision_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_REPO, quant: str | None = None, head: str | os.PathLike | ScoringHead | None = None,
                        *, device: str | torch.device | None = None, n_ctx: int | None = None, n_batch: int | None = None,
                        n_seq_max: int = N_SEQ_MAX, n_gpu_layers: int = -1, n_threads: int | None = None,
                        flash_attn: bool | None = None, kv_type: str | None = None, fast: bool = True,
                        identity_dtype: str = IDENTITY_DTYPE, bf16: bool | None = None, max_length: int | None = None,
                        max_query_length: int = MAX_QUERY_LENGTH, batch_size: int = BATCH_SIZE,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                        deterministic: bool = False, mmproj: str | os.PathLike | None = None,
                        max_doc_length: int | None = None) -> "Reranker":
        """Load a GGUF (a path, or a Hub id such as `jinaai/jina-reranker-m0-GGUF:Q8_0`) and its head.

        `head` defaults to the `mlp_weights.npz` beside the GGUF (or in the Hub repo).
        All layers are offloaded to the GPU when llama.cpp was built with CUDA or Metal.
        `max_length` defaults to 10240 tokens, or `n_ctx` when that is given and smaller.
        `max_doc_length` (the original's keyword): a document is cut to this many tokens before the
        prompt is built; default `max(max_length - max_query_length, max_query_length)`, as the original.

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

        `mmproj`: the vision projector for image pairs (`doc_type="image"`, ...); default: the one
        `mmproj-*.gguf` beside the GGUF, or for a Hub model the repo's one `mmproj*.gguf` at the GGUF's
        commit (downloaded then). It is found and loaded on the first image: text-only use never does either.

        Every setting is checked before any file is read. `quant` with a local .gguf file may
        only restate that file's level (it selects a file in a folder or a Hub repo).
        The keywords are those of `reranker.settings.LoadSettings`; see `from_settings`.
        """
        return cls.from_settings(LoadSettings(model=model, quant=quant, head=head, device=device, n_ctx=n_ctx,
                                              n_batch=n_batch, n_seq_max=n_seq_max, n_gpu_layers=n_gpu_layers,
                                              n_threads=n_threads, flash_attn=flash_attn, kv_type=kv_type, fast=fast,
                                              identity_dtype=identity_dtype, bf16=bf16, max_length=max_length,
                                              max_query_length=max_query_length, batch_size=batch_size,
                                              cache_dir=cache_dir, local_files_only=local_files_only,
                                              deterministic=deterministic, mmproj=mmproj, max_doc_length=max_doc_length))

    @classmethod
    def from_settings(cls, settings: LoadSettings) -> "Reranker":
        """Load the model `settings` describe (checked when they were built); see `from_pretrained`."""
        s = settings
        device = resolve_device(s.device)
        files = resolve(s.model, s.quant, cache_dir=s.cache_dir, local_files_only=s.local_files_only)
        head = s.head
        if head is None:
            if files.head is None:
                raise RerankerError(f"no {HEAD_FILE} beside {files.gguf}; pass head='path/to/{HEAD_FILE}'")
            head = files.head
        if not isinstance(head, ScoringHead) and not os.path.isdir(head):  # a folder may hold a checkpoint
            check_file(head, "head file", f"pass the {HEAD_FILE} released with the GGUF")
        scoring_head = head if isinstance(head, ScoringHead) else ScoringHead.load(head)
        max_length = s.prompt_length
        want_bf16, why = use_bf16(s.bf16, s.n_gpu_layers, files.gguf)
        gguf_path = fast_path_gguf(files.gguf, s.identity_dtype, want_bf16, s.n_gpu_layers) if s.fast else files.gguf
        backbone = Backbone(gguf_path, fast=s.fast, n_ctx=s.n_ctx or max_length, n_batch=s.n_batch, n_seq_max=s.n_seq_max,
                            n_gpu_layers=s.n_gpu_layers, n_threads=s.n_threads, flash_attn=s.flash_attn, kv_type=s.kv_type,
                            deterministic=s.deterministic)
        rr = cls(backbone, scoring_head, max_length=max_length, max_query_length=s.max_query_length,
                 device=device, batch_size=s.batch_size, max_doc_length=s.max_doc_length)
        rr.settings = s
        rr.gguf_source = files.gguf
        rr.hub_source = files.hub
        log.info("%s: weights %s%s", files.gguf.name, rr.weights_dtype, f" ({bf16_note(files.gguf, want_bf16, why)})" if s.fast else "")
        return rr

    def _check_open(self) -> None:
        if self.backbone.closed:
            raise RerankerError("this Reranker is closed; load a new one with Reranker.from_pretrained(...)")

    def prompt_builder(self, max_length: int | None = None, max_query_length: int | None = None,
                       max_doc_length: int | None = None) -> PromptBuilder:
        """The tokeniser for pairs, with the length limits of this call (capped by the context; an unset
        `max_doc_length` is the original's formula of the lengths in effect)."""
        self._check_open()
        check_options(max_length, max_query_length, max_doc_length=max_doc_length)
        max_length = max_length or self.max_length
        if max_length > self.backbone.n_ctx:
            log.warning("max_length=%d exceeds the context (n_ctx=%d); prompts are cut to %d tokens",
                        max_length, self.backbone.n_ctx, self.backbone.n_ctx)
            max_length = self.backbone.n_ctx
        return PromptBuilder(self.backbone.tokenizer, max_length, max_query_length or self.max_query_length,
                             max_doc_length or self.max_doc_length)

    @property
    def vision(self) -> Vision:
        """The vision projector, loaded on first use: `mmproj=`, else a Hub model's `mmproj*.gguf` (downloaded now
        from the GGUF's repo and commit), else the `mmproj-*.gguf` beside the GGUF."""
        with self._vision_lock:
            self._check_open()
            if self._vision is None:
                path = self.settings.mmproj if self.settings else None
                if path is None:
                    path = mmproj_from_hub(self.hub_source) if self.hub_source else find_mmproj(self.gguf_source)
                if path is None:
                    raise RerankerError(f"image pairs need the vision projector, and there is no mmproj-*.gguf beside "
                                        f"{self.gguf_source}; pass mmproj='path/to/mmproj-...gguf' (CLI: --mmproj), made "
                                        "by `reranker convert` from a checkpoint with its visual.* weights")
                self._vision = Vision(path, self.backbone, self.settings.n_threads if self.settings else None)
            return self._vision

    def _with_images(self, pairs: list) -> list:
        """`pairs` with each image side (`ImageRef`) loaded and sized (`PendingImage`; encoded when scored)."""
        if not any(isinstance(x, ImageRef) for pair in pairs for x in pair):
            return pairs
        from reranker.images.pdf import PdfDocuments  # Pillow and PDFium load only when images are scored

        sizing = self.vision.sizing  # a missing projector is an error before any image is read
        loaded: dict[int, object] = {}  # by the source object: `rank`'s image query is loaded (and projected) once

        def side(x, pdfs):
            if not isinstance(x, ImageRef):
                return x
            if id(x.source) not in loaded:
                loaded[id(x.source)] = load(x, sizing, pdfs=pdfs)
            return loaded[id(x.source)]

        with PdfDocuments() as pdfs:  # the pages of one file, as `pdf_pages` gives them, share one open of it
            return [tuple(side(x, pdfs) for x in pair) for pair in pairs]

    def score_documents(self, query_or_pairs: str | Iterable[Sequence[str]], documents: Iterable[str] | None = None, *,
                        chunking: bool | Chunking | None = None, keep_hidden: bool = False, batch_size: int | None = None,
                        max_length: int | None = None, max_query_length: int | None = None,
                        show_progress_bar: bool = False, check_finite: bool = True, doc_type: str = "text",
                        query_type: str = "text", max_doc_length: int | None = None) -> ScoredDocuments:
        """Score `[query, document]` pairs, or one query against `documents`: what every other call runs.

        Pairs go in batches of `batch_size`; each batch is scored as one call (`engine.scoring`): its
        prompts (every chunk of a long document with `chunking`) sorted by length and packed into
        decode calls, the head run once, chunk scores aggregated per pair. A job's window of the
        same pairs is the same call, so `batch_size=N` gives the scores of `reranker score --window N`
        bit for bit. A non-finite score is a `RerankerError` naming its pair (unless `check_finite`
        is False: `embed` reads states whatever the head makes of them). `keep_hidden`: also
        each pair's last hidden state (with chunking, its scoring chunk's). Sets `last_usage`.
        `doc_type` / `query_type` "image": the documents / queries are images (see `compute_score`).
        """
        self._check_open()
        check_options(batch_size=batch_size)
        chunks = as_chunking(chunking)
        check_keep_hidden(chunks, keep_hidden)
        if documents is None:
            pairs = check_pairs(query_or_pairs, doc_type, query_type)
        else:
            pairs = check_pairs([[query_or_pairs, d] for d in _documents(documents)], doc_type, query_type)
        builder = self.prompt_builder(max_length, max_query_length, max_doc_length)
        batch_size = batch_size or self.batch_size
        usage = Usage(weights=self.weights_dtype, **({"chunks": [], "best_chunk": []} if chunks is not None else {}))
        scores = np.empty(len(pairs), dtype=np.float32)
        hidden = np.empty((len(pairs), self.backbone.n_embd), dtype=np.float32) if keep_hidden else None
        with tqdm(total=len(pairs), disable=not show_progress_bar, unit="pair", desc="Reranking") as bar:
            for start in range(0, len(pairs), batch_size):
                part = score_prepared(self, prepare(builder, self._with_images(pairs[start : start + batch_size]), chunks),
                                      keep_hidden=keep_hidden, first=start, check_finite=check_finite)
                scores[start : start + len(part.scores)] = part.scores
                if hidden is not None:
                    hidden[start : start + len(part.scores)] = part.hidden
                usage.add(part.usage)
                bar.update(len(part.scores))
        if usage.truncated:
            log.info("%d of %d prompts were truncated to max_length=%d / max_query_length=%d / max_doc_length=%d",
                     usage.truncated, usage.pairs, builder.max_length, builder.max_query_length, builder.max_doc_length)
        if usage.capped:
            log.warning("%d of %d documents had more than max_chunks=%d chunks; their ends were not scored",
                        usage.capped, usage.pairs, chunks.max_chunks)
        self.last_usage = usage
        if chunks is None:
            return ScoredDocuments(scores, hidden=hidden, usage=usage)
        return ScoredDocuments(scores, np.asarray(usage.chunks, dtype=np.int64), np.asarray(usage.best_chunk, dtype=np.int64),
                               hidden, usage)

    def embed(self, pairs: Iterable[Sequence[str]], *, batch_size: int | None = None, max_length: int | None = None,
              max_query_length: int | None = None, show_progress_bar: bool = False, doc_type: str = "text",
              query_type: str = "text", max_doc_length: int | None = None) -> np.ndarray:
        """Last-token hidden states of `[query, document]` pairs, shape (n, hidden), float32.

        `pairs` is any iterable of [query, document] lists or tuples (a generator is read once).
        The states are those `compute_score` scores with the same `batch_size` (`score_documents`).
        """
        return self.score_documents(pairs, keep_hidden=True, batch_size=batch_size, max_length=max_length,
                                    max_query_length=max_query_length, show_progress_bar=show_progress_bar,
                                    check_finite=False, doc_type=doc_type, query_type=query_type,
                                    max_doc_length=max_doc_length).hidden

    @torch.inference_mode()
    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """Relevance scores in (0, 1) from last-token hidden states, through the torch head."""
        x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        if self.deterministic and len(x) > 1:  # torch picks its mat-mul kernel by row count: one row at a time
            return torch.cat([self.head(row) for row in x.split(1)]).float().cpu().numpy()
        return self.head(x).float().cpu().numpy()

    def compute_score(self, pairs: Iterable[Sequence[str]] | Sequence[str], *, batch_size: int | None = None,
                      max_length: int | None = None, max_query_length: int | None = None,
                      show_progress_bar: bool = False, chunking: bool | Chunking | None = None, doc_type: str = "text",
                      query_type: str = "text", max_doc_length: int | None = None,
                      show_progress: bool = False) -> list[float] | float:
        """Scores of `[query, document]` pairs, like the original model's `compute_score`.

        A single pair (a list or tuple of a query and a document) gives a float; any other iterable of
        pairs (a generator too) a list of floats in input order; `[]` gives `[]`. A non-finite
        score (a broken GGUF or head) is a `RerankerError`, never a silent `nan`.

        `chunking` (True or a `Chunking`): a document too long for `max_length` is split into
        chunks, each scored as its own prompt, and its score is their max (or mean, or first);
        `last_usage.chunks` and `.best_chunk` then say, per pair, how many chunks it had and
        which scored best. Default: truncation, as the original model.

        `max_doc_length`, as the original: a document is cut to this many tokens before its prompt is
        built (default `max(max_length - max_query_length, max_query_length)`); `show_progress` is the
        original's name of `show_progress_bar`.

        `doc_type="image"` / `query_type="image"`, as the original: the documents / queries are images (a
        local path, `pathlib.Path`, `PIL.Image`, bytes or a `data:` URI; URLs are not fetched), scored
        through the vision projector (`mmproj`); a side given as `{"image": ...}` or `{"text": ...}`
        says its own kind, so one call can mix them. An image is never cut; its text side is.
        """
        single = isinstance(pairs, (list, tuple)) and len(pairs) == 2 and not isinstance(pairs[0], (list, tuple))
        scores = self.score_documents([pairs] if single else pairs, chunking=chunking, batch_size=batch_size,
                                      max_length=max_length, max_query_length=max_query_length,
                                      show_progress_bar=show_progress_bar or show_progress, doc_type=doc_type,
                                      query_type=query_type, max_doc_length=max_doc_length).scores
        return scores.tolist()[0] if single else scores.tolist()

    def rank(self, query: str | object, documents: Iterable[object], *, top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, show_progress_bar: bool = False,
             chunking: bool | Chunking | None = None, doc_type: str = "text", query_type: str = "text") -> list[dict]:
        """Documents sorted by relevance to `query`, like sentence-transformers' `CrossEncoder.rank`.

        Each result is `{"corpus_id": index, "score": float}` (plus, with `return_documents`, the document as given:
        `"text"`, `"image"`, or a PDF page's `"pdf"` and `"page"`; and `"chunks"`, `"best_chunk"` with `chunking`,
        see `compute_score`).
        `documents` is any iterable of strings (images with `doc_type="image"`, or `{"image": ...}` items;
        see `compute_score`); `top_k` is None (all) or at least 1.
        """
        self._check_open()
        check_options(batch_size=batch_size, top_k=top_k)
        documents = _documents(documents)
        result = self.score_documents(query, documents, chunking=chunking, batch_size=batch_size,
                                      show_progress_bar=show_progress_bar, doc_type=doc_type, query_type=query_type)
        scores = result.scores.tolist()
        extra: dict[int, dict] = {}
        if result.chunks is not None:
            extra = {i: {"chunks": int(result.chunks[i]), "best_chunk": int(result.best_chunk[i])} for i in range(len(scores))}
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_k]
        return [{"corpus_id": i, "score": scores[i], **(_echo(documents[i], doc_type) if return_documents else {}),
                 **extra.get(i, {})} for i in order]

    def close(self) -> None:
        """Free the llama.cpp model and context; later calls raise a `RerankerError`. Closing twice is fine."""
        # The lock is held until the model is gone: a thread asking for the projector meanwhile would
        # otherwise load a new one on the model being freed (a use after free, seen as a segfault).
        with self._vision_lock:
            if self._vision is not None:  # the projector is bound to the model: it goes first
                self._vision.close()
                self._vision = None
            self.backbone.close()

    def __enter__(self) -> "Reranker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _echo(document: object, doc_type: str) -> dict:
    """`rank`'s `return_documents` entry: `{"text": ...}` or `{"image": ...}`, as the document was given."""
    if isinstance(document, dict):
        return dict(document)
    return {"image": document} if doc_type == "image" else {"text": document}


def _documents(documents: object) -> list:
    """`rank`'s documents as a list (a generator is read once); one string or a mapping is an error."""
    if isinstance(documents, (str, bytes)):
        raise RerankerError("documents must be a list of strings, not one string; wrap it: [document]")
    if isinstance(documents, dict) or not isinstance(documents, Iterable):
        raise RerankerError(f"documents must be a list of strings, got {type(documents).__name__} ({documents!r:.60})")
    return list(documents)
