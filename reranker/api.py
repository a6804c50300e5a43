"""The Python API: `Reranker.from_pretrained(...)`, then `compute_score`, `rank`, `embed`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from head import ScoringHead
from reranker.defaults import BATCH_SIZE, DEFAULT_REPO, HEAD_FILE, IDENTITY_DTYPE, MAX_LENGTH, MAX_QUERY_LENGTH, N_BATCH, N_SEQ_MAX
from reranker.engine.backbone import Backbone
from reranker.engine.identity import with_identity_output
from reranker.engine.prompts import PromptBuilder, check_pair
from reranker.errors import RerankerError
from reranker.gguf.hub import resolve

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when there is one, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Usage:
    """What the last call did: pairs scored, prompt tokens decoded, prompts truncated."""

    pairs: int = 0
    tokens: int = 0
    truncated: int = 0


class Reranker:
    """jina-reranker-m0 from a GGUF backbone (llama.cpp) and a torch scoring head."""

    def __init__(self, backbone: Backbone, head: ScoringHead, *, max_length: int = MAX_LENGTH,
                 max_query_length: int = MAX_QUERY_LENGTH, device: str | torch.device | None = None,
                 batch_size: int = BATCH_SIZE) -> None:
        if head.hidden_size != backbone.n_embd:
            raise RerankerError(f"the head has hidden size {head.hidden_size} but the backbone {backbone.path.name} "
                                f"gives {backbone.n_embd}: use the mlp_weights.npz released with this GGUF")
        self.backbone = backbone
        self.device = torch.device(device) if device is not None else default_device()
        self.head = head.to(self.device).eval()
        self.max_length = max_length
        self.max_query_length = max_query_length
        self.batch_size = batch_size
        self.last_usage = Usage()

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_REPO, quant: str | None = None, head: str | os.PathLike | ScoringHead | None = None,
                        *, device: str | torch.device | None = None, n_ctx: int | None = None, n_batch: int = N_BATCH,
                        n_seq_max: int = N_SEQ_MAX, n_gpu_layers: int = -1, n_threads: int | None = None,
                        flash_attn: bool | None = None, kv_type: str | None = None, fast: bool = True,
                        identity_dtype: str = IDENTITY_DTYPE, max_length: int | None = None,
                        max_query_length: int = MAX_QUERY_LENGTH, batch_size: int = BATCH_SIZE,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None) -> "Reranker":
        """Load a GGUF (a path, or a Hub id such as `jinaai/jina-reranker-m0-GGUF:Q8_0`) and its head.

        `head` defaults to the `mlp_weights.npz` beside the GGUF (or in the Hub repo).
        All layers are offloaded to the GPU when llama.cpp was built with CUDA or Metal.
        `max_length` defaults to 10240 tokens, or `n_ctx` when that is given and smaller.

        `fast=True` (the default) reads hidden states in llama.cpp's generation mode through a
        cached copy of the GGUF with an identity output projection (`identity_dtype` f32: the
        same numbers as embedding mode; f16: half the memory, states rounded to half
        precision). `fast=False` uses embedding mode, the upstream recipe's path.
        """
        files = resolve(model, quant, cache_dir=cache_dir, local_files_only=local_files_only)
        if head is None:
            if files.head is None:
                raise RerankerError(f"no {HEAD_FILE} beside {files.gguf}; pass head='path/to/{HEAD_FILE}'")
            head = files.head
        scoring_head = head if isinstance(head, ScoringHead) else ScoringHead.load(head)
        if max_length is None:
            max_length = min(MAX_LENGTH, n_ctx) if n_ctx else MAX_LENGTH
        gguf_path = with_identity_output(files.gguf, identity_dtype) if fast else files.gguf
        backbone = Backbone(gguf_path, fast=fast, n_ctx=n_ctx or max_length, n_batch=n_batch, n_seq_max=n_seq_max,
                            n_gpu_layers=n_gpu_layers, n_threads=n_threads, flash_attn=flash_attn, kv_type=kv_type)
        return cls(backbone, scoring_head, max_length=max_length, max_query_length=max_query_length,
                   device=device, batch_size=batch_size)

    def prompt_builder(self, max_length: int | None = None, max_query_length: int | None = None) -> PromptBuilder:
        """The tokeniser for pairs, with the length limits of this call (capped by the context)."""
        max_length = max_length or self.max_length
        if max_length > self.backbone.n_ctx:
            log.warning("max_length=%d exceeds the context (n_ctx=%d); prompts are cut to %d tokens",
                        max_length, self.backbone.n_ctx, self.backbone.n_ctx)
            max_length = self.backbone.n_ctx
        return PromptBuilder(self.backbone.tokenizer, max_length, max_query_length or self.max_query_length)

    def embed(self, pairs: Sequence[Sequence[str]], *, batch_size: int | None = None, max_length: int | None = None,
              max_query_length: int | None = None, show_progress_bar: bool = False) -> np.ndarray:
        """Last-token hidden states of `[query, document]` pairs, shape (n, hidden), float32."""
        pairs = [check_pair(p, i) for i, p in enumerate(pairs)]
        builder = self.prompt_builder(max_length, max_query_length)
        batch_size = batch_size or self.batch_size
        usage = Usage()
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
        return self.head(x).float().cpu().numpy()

    def compute_score(self, pairs: Sequence[Sequence[str]] | Sequence[str], *, batch_size: int | None = None,
                      max_length: int | None = None, max_query_length: int | None = None,
                      show_progress_bar: bool = False) -> list[float] | float:
        """Scores of `[query, document]` pairs, like the original model's `compute_score`.

        A single pair gives a float; a list of pairs a list of floats in input order.
        """
        single = len(pairs) == 2 and all(isinstance(x, str) for x in pairs)
        batch = [pairs] if single else pairs
        embeddings = self.embed(batch, batch_size=batch_size, max_length=max_length,
                                max_query_length=max_query_length, show_progress_bar=show_progress_bar)
        scores = self.score_embeddings(embeddings).tolist()
        return scores[0] if single else scores

    def rank(self, query: str, documents: Sequence[str], *, top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, show_progress_bar: bool = False) -> list[dict]:
        """Documents sorted by relevance to `query`, like sentence-transformers' `CrossEncoder.rank`.

        Each result is `{"corpus_id": index, "score": float}` (plus `"text"` with `return_documents`).
        """
        if isinstance(documents, str):
            raise RerankerError("documents must be a list of strings, not one string; wrap it: [document]")
        scores = self.compute_score([[query, d] for d in documents], batch_size=batch_size,
                                    show_progress_bar=show_progress_bar) if documents else []
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_k]
        return [{"corpus_id": i, "score": scores[i], **({"text": documents[i]} if return_documents else {})} for i in order]

    def close(self) -> None:
        """Free the llama.cpp model and context."""
        self.backbone.close()
