"""Requests and responses of the two hosted rerank APIs, field for field (pydantic).

- Jina `POST /v1/rerank`: `{model, query, documents: [str | {"text"}], top_n?, return_documents?}`
  -> `{model, usage: {total_tokens}, results: [{index, relevance_score, document?: {text}}]}`;
- Cohere `POST /v2/rerank`: `{model, query, documents: [str], top_n?, max_tokens_per_doc?}`
  -> `{id, results: [{index, relevance_score}], meta: {api_version, billed_units, tokens}}`.

Types are strict (`"3"` is not a `top_n`) and unknown fields are ignored, as SDKs send extras.
Each request maps its scoring options to one `ScoreOptions` (`options()`): a new request field
that changes how pairs are scored is one field here and one line in `options()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reranker.defaults import CHUNK_AGGREGATES
from reranker.options import MIN_CHUNK

_STRICT = ConfigDict(strict=True, extra="ignore")


@dataclass(frozen=True)
class ScoreOptions:
    """How one request's pairs become prompts (None: the server's setting).

    `max_tokens_per_doc`: each document is cut to about this many tokens (Cohere's field).
    `chunking`: our extension, the API's `chunking=`: False (truncate), True (the server's
    `--chunk` settings, else the defaults) or a `ChunkingField`; None: the server's setting.
    The deterministic mode is a load-time setting of the model: `reranker serve --deterministic`.
    """

    max_tokens_per_doc: int | None = None
    chunking: bool | ChunkingField | None = None


class ChunkingField(BaseModel):
    """The `chunking` request field as an object (an extension of both APIs): `reranker.Chunking`'s fields, each
    optional (a missing one is the server's). Bounds are Chunking's own; the merged result is checked by Chunking."""

    model_config = ConfigDict(strict=True, extra="forbid")
    size: int | None = Field(default=None, ge=MIN_CHUNK)
    overlap: int | None = Field(default=None, ge=0)
    max_chunks: int | None = Field(default=None, ge=1)
    aggregate: Literal[CHUNK_AGGREGATES] | None = None


class TextObject(BaseModel):
    """Jina's `{"text": ...}` document (an `{"image": ...}` one is refused: the GGUF backbone reads text only)."""

    model_config = _STRICT
    text: str | None = None
    image: object | None = None

    @model_validator(mode="after")
    def _text_only(self) -> TextObject:
        if self.image is not None:
            raise ValueError("image documents are not supported by the GGUF backbone (text only); send {\"text\": ...}")
        if self.text is None:
            raise ValueError('an object here needs a string "text" field')
        return self

    def as_text(self) -> str:
        return self.text or ""


class JinaRerankRequest(BaseModel):
    """Jina's rerank request (`POST /v1/rerank`)."""

    model_config = _STRICT
    model: str | None = None
    query: str | TextObject
    documents: list[str | TextObject] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    chunking: bool | ChunkingField | None = None

    def query_text(self) -> str:
        return self.query if isinstance(self.query, str) else self.query.as_text()

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.as_text() for d in self.documents]

    def options(self) -> ScoreOptions:
        return ScoreOptions(chunking=self.chunking)


class CohereRerankRequest(BaseModel):
    """Cohere's v2 rerank request (`POST /v2/rerank`)."""

    model_config = _STRICT
    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    max_tokens_per_doc: int | None = Field(default=None, ge=1)
    chunking: bool | ChunkingField | None = None

    def query_text(self) -> str:
        return self.query

    def texts(self) -> list[str]:
        return list(self.documents)

    def options(self) -> ScoreOptions:
        return ScoreOptions(max_tokens_per_doc=self.max_tokens_per_doc, chunking=self.chunking)


RerankRequest = JinaRerankRequest | CohereRerankRequest


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    """Indices best first (ties by index), the first `top_n` (all when None or larger than the list)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_n]


def jina_response(req: JinaRerankRequest, model: str, scores: list[float], tokens: int) -> dict:
    texts = req.texts()
    results = []
    for i in ranked(scores, req.top_n):
        r: dict = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            r["document"] = {"text": texts[i]}
        results.append(r)
    return {"model": req.model or model, "usage": {"total_tokens": tokens}, "results": results}


def cohere_response(req: CohereRerankRequest, request_id: str, scores: list[float], tokens: int) -> dict:
    return {
        "id": request_id,
        "results": [{"index": i, "relevance_score": scores[i]} for i in ranked(scores, req.top_n)],
        # Cohere bills one search unit per query with up to 100 documents.
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": math.ceil(len(scores) / 100)},
                 "tokens": {"input_tokens": tokens, "output_tokens": 0}},
    }
