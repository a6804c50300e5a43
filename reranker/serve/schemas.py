"""Requests and responses of the two hosted rerank APIs, field for field (pydantic).

- Jina `POST /v1/rerank`: `{model, query: str | {"text"} | {"image"}, documents: [str | {"text"} | {"image"}], top_n?,
  return_documents?}` -> `{model, usage: {total_tokens}, results: [{index, relevance_score, document?: {text} | {image}}]}`
  (an image: base64 or a data: URI string, as jina-reranker-m0's hosted API takes it; decoded in `prepare`);
- Cohere `POST /v2/rerank`: `{model, query, documents: [str | {"text"}], top_n?, max_tokens_per_doc?}`
  -> `{id, results: [{index, relevance_score}], meta: {api_version, billed_units, tokens}}`.

Types are strict (`"3"` is not a `top_n`) and unknown fields are ignored, as SDKs send extras.
Each request maps its scoring options to one `ScoreOptions` (`options()`): a new request field
that changes how pairs are scored is one field here and one line in `options()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


@dataclass(frozen=True, eq=False)
class ImageField:
    """An image as a request sent it (`value`: base64 or a data: URI, not yet decoded) and where (`documents[3]`, `query`).

    Only `serve.prepare` turns it into bytes; nothing of a request ever reaches the library as a path or a URL."""

    value: str
    where: str


Side = str | ImageField


class SideObject(BaseModel):
    """Jina's `{"text": ...}` or `{"image": base64 | data: URI}` (a query or a document): exactly one of them."""

    model_config = _STRICT
    text: str | None = None
    image: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SideObject:
        if (self.text is None) == (self.image is None):
            raise ValueError('an object here needs exactly one of a string "text" or a string "image" (base64 or a data: URI)')
        return self

    def side(self, where: str) -> Side:
        return self.text if self.image is None else ImageField(self.image, where)


class JinaRerankRequest(BaseModel):
    """Jina's rerank request (`POST /v1/rerank`): text and image (m0's shape) queries and documents."""

    model_config = _STRICT
    model: str | None = None
    query: str | SideObject
    documents: list[str | SideObject] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    chunking: bool | ChunkingField | None = None

    @field_validator("return_documents", mode="before")
    @classmethod
    def _null_is_default(cls, value: object) -> object:
        return True if value is None else value  # as null top_n means the default

    def query_side(self) -> Side:
        return self.query if isinstance(self.query, str) else self.query.side("query")

    def sides(self) -> list[Side]:
        return [d if isinstance(d, str) else d.side(f"documents[{i}]") for i, d in enumerate(self.documents)]

    def options(self) -> ScoreOptions:
        return ScoreOptions(chunking=self.chunking)


_TEXT_ONLY = ("/v2/rerank (Cohere's API) takes text only; send image documents and queries to /v1/rerank "
              '(Jina\'s shape: {"image": base64 or a data: URI})')


class CohereRerankRequest(BaseModel):
    """Cohere's v2 rerank request (`POST /v2/rerank`)."""

    model_config = _STRICT
    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    max_tokens_per_doc: int | None = Field(default=None, ge=1)
    chunking: bool | ChunkingField | None = None

    @field_validator("documents", mode="before")
    @classmethod
    def _no_images(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        for i, d in enumerate(value):
            if isinstance(d, dict) and "image" in d:
                raise ValueError(f"documents[{i}] is an image: {_TEXT_ONLY}")
        # Cohere's v1 shape, which LiteLLM and older SDKs still send: {"text": ...} objects.
        return [d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d for d in value]

    @field_validator("query", mode="before")
    @classmethod
    def _no_image_query(cls, value: object) -> object:
        if isinstance(value, dict) and "image" in value:
            raise ValueError(f"the query is an image: {_TEXT_ONLY}")
        return value

    def query_side(self) -> Side:
        return self.query

    def sides(self) -> list[Side]:
        return list(self.documents)

    def options(self) -> ScoreOptions:
        return ScoreOptions(max_tokens_per_doc=self.max_tokens_per_doc, chunking=self.chunking)


RerankRequest = JinaRerankRequest | CohereRerankRequest


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    """Indices best first (ties by index), the first `top_n` (all when None or larger than the list)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_n]


def jina_response(req: JinaRerankRequest, model: str, scores: list[float], tokens: int) -> dict:
    sides = req.sides()
    results = []
    for i in ranked(scores, req.top_n):
        r: dict = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:  # as sent: an image's base64 or data: URI, unchanged
            side = sides[i]
            r["document"] = {"image": side.value} if isinstance(side, ImageField) else {"text": side}
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
