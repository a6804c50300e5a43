"""What callers pass in, checked without loading llama.cpp: counts, truncation limits, pairs, `Chunking`.

Everything here is pure Python on top of `reranker.defaults` and `reranker.errors`, so the API,
the CLI, the server's settings and request schemas, and the job's settings check their options
before (or without) any model or llama.cpp import. A bad value raises `RerankerError` naming the
option and the rule.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from reranker.defaults import CHUNK_AGGREGATE, CHUNK_AGGREGATES, CHUNK_OVERLAP, MAX_CHUNKS, N_SEQ_MAX
from reranker.errors import RerankerError

#: The prompt template and the scoring token need this many tokens; `max_length` may not be less.
MIN_LENGTH = 16


def require_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """The rule for every count-like setting: an int (not a bool) of at least `low` (and at most `high`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"from {low} to {high}"
        raise RerankerError(f"{name}={value!r} is invalid; it must be an integer {rule}")


#: What llama.cpp's C structs hold: int32 counts (larger values wrap, then abort the process), and
#: ggml's thread limit (GGML_MAX_N_THREADS; more threads crash it).
INT32_MAX = 2**31 - 1
MAX_THREADS = 512


def check_lengths(max_length: int | None, max_query_length: int | None, max_doc_length: int | None = None) -> None:
    """Truncation limits, checked before any work (None: the default)."""
    if max_length is not None:
        require_int("max_length", max_length, MIN_LENGTH)
    if max_query_length is not None:
        require_int("max_query_length", max_query_length, 1)
    if max_doc_length is not None:
        require_int("max_doc_length", max_doc_length, 1)


def default_max_doc_length(max_length: int, max_query_length: int) -> int:
    """The original model's document cap when `max_doc_length` is not given (its `compute_score`'s formula)."""
    return max(max_length - max_query_length, max_query_length)


#: The smallest chunk, in tokens; a prompt with less room than this (a query filling max_length) is truncated.
#: The KV cache types a Backbone takes, by name: their GGML_TYPE_* ids.
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}


def check_settings(*, n_ctx: int | None = None, n_batch: int | None = None, n_seq_max: int = N_SEQ_MAX,
                   n_threads: int | None = None, n_gpu_layers: int = -1, kv_type: str | None = None) -> None:
    """The backbone's settings, checked before any file is read (None: the default)."""
    if kv_type is not None and kv_type not in KV_TYPES:
        raise RerankerError(f"kv_type={kv_type!r} is not one of {', '.join(KV_TYPES)}")
    if n_ctx is not None:
        require_int("n_ctx", n_ctx, MIN_LENGTH, INT32_MAX)
    if n_batch is not None:
        require_int("n_batch", n_batch, 1, INT32_MAX)
    require_int("n_seq_max", n_seq_max, 1, INT32_MAX)
    if n_threads is not None:
        require_int("n_threads", n_threads, 1, MAX_THREADS)
    require_int("n_gpu_layers", n_gpu_layers, -1, INT32_MAX)


MIN_CHUNK = 8


def lone_surrogate(text: str) -> str | None:
    """'a lone surrogate \\ud800 at character 5' when `text` has no UTF-8 form, else None.

    Such text comes from bytes decoded with `errors="surrogateescape"` or from JSON's `"\\ud800"`.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}"
    return None


SURROGATE_FIX = "such text has no UTF-8 form: fix how it was decoded (or drop that character)"


SIDE_TYPES = ("text", "image")


@dataclass(frozen=True, eq=False)
class ImageRef:
    """An image side of a pair, as given (a path, bytes, a PIL image, a data: URI or a `PdfPage`): loaded when scored."""

    source: object
    name: str


@dataclass(frozen=True)
class PdfPage:
    """Page `page` of the PDF at `path`, counted from 1 as a viewer numbers pages; rendered when scored
    (reranker.images.pdf). Its id, `str()`, is ``path#page``."""

    path: str | os.PathLike
    page: int

    def __str__(self) -> str:
        return f"{os.fspath(self.path)}#{self.page}"


def check_pdf_side(value: dict, name: str) -> ImageRef:
    """`{"pdf": path, "page": n}` -> an `ImageRef` to that page (the file is read when the pair is scored)."""
    path, page = value.get("pdf"), value.get("page")
    if set(value) != {"pdf", "page"}:
        raise RerankerError(f"{name} must be {{\"pdf\": path, \"page\": n}} (pages count from 1), got keys {sorted(map(str, value))}; "
                            "for every page of a file use reranker.pdf_pages(path)")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise RerankerError(f"{name}: \"pdf\" must be a local file path (str or pathlib.Path), got {path!r:.60}")
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise RerankerError(f"{name}: \"page\" must be an integer >= 1 (pages count from 1, as a PDF viewer shows them), "
                            f"got {page!r:.60}")
    ref = PdfPage(path, page)
    return ImageRef(ref, f"{name} {ref}")


def check_side(value: object, kind: str, name: str) -> str | ImageRef:
    """One side of a pair: text (a str), or an image when `kind` is "image" or the value is `{"image": ...}`
    (`{"text": ...}` is text whatever `kind` says), or a PDF page, `{"pdf": path, "page": n}`."""
    if isinstance(value, dict):
        if "pdf" in value:
            return check_pdf_side(value, name)
        if len(value) != 1 or next(iter(value)) not in SIDE_TYPES:
            raise RerankerError(f"{name} must be {{\"text\": str}}, {{\"image\": ...}} or {{\"pdf\": path, \"page\": n}}, "
                                f"got keys {sorted(map(str, value))}")
        kind, value = next(iter(value.items()))
    if kind == "image":
        if value is None or isinstance(value, (int, float, list, tuple, dict)):
            raise RerankerError(f"{name} must be an image (a path, bytes, a PIL.Image or a data: URI), got {type(value).__name__}")
        return ImageRef(value, f"{name} image")
    if not isinstance(value, str):
        raise RerankerError(f"{name} must be a str, got {type(value).__name__} ({value!r:.60}); convert it to text first, "
                            "or pass doc_type=\"image\" / query_type=\"image\" (or {\"image\": ...}) for an image")
    if problem := lone_surrogate(value):
        raise RerankerError(f"{name} holds {problem}; {SURROGATE_FIX}")
    return value


def check_pair(pair: object, index: int, doc_type: str = "text", query_type: str = "text") -> tuple[str | ImageRef, str | ImageRef]:
    """Validate one `[query, document]` pair and return it as a tuple (image sides as `ImageRef`)."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise RerankerError(
            f"pair {index} must be a [query, document] list or tuple of two strings, got {type(pair).__name__}"
            f"{'' if not isinstance(pair, (list, tuple)) else f' of length {len(pair)}'}"
        )
    query, document = pair
    return check_side(query, query_type, f"pair {index}: the query"), check_side(document, doc_type, f"pair {index}: the document")


def check_pairs(pairs: object, doc_type: str = "text", query_type: str = "text") -> list[tuple[str | ImageRef, str | ImageRef]]:
    """Validate `[query, document]` pairs: any iterable of them (a generator is read once, here).

    `doc_type` / `query_type` ("text" or "image") say what the documents / queries are, as the original's
    `compute_score`; a side given as `{"text": ...}` or `{"image": ...}` says it for itself."""
    for what, kind in (("doc_type", doc_type), ("query_type", query_type)):
        if kind not in SIDE_TYPES:
            raise RerankerError(f"{what}={kind!r} must be \"text\" or \"image\"")
    if isinstance(pairs, (str, bytes, dict)) or not isinstance(pairs, Iterable):
        raise RerankerError(f"pairs must be a list (or other iterable) of [query, document] pairs, "
                            f"got {type(pairs).__name__} ({pairs!r:.60})")
    return [check_pair(p, i, doc_type, query_type) for i, p in enumerate(pairs)]


@dataclass(frozen=True)
class Chunking:
    """How documents that do not fit are split, and how their chunks' scores combine.

    `size`: tokens per chunk (None: all the room a prompt leaves, so the first chunk is about
    what truncation keeps); `overlap`: tokens shared by consecutive chunks (None: 256; at most
    half a chunk, unless `size` is given too and a prompt leaves room for it, when it must only be
    less than `size`: an overlap as large as the room would move each chunk on by one token);
    `max_chunks`: chunks per document at most, the rest of a
    longer document is not scored and the document counts as capped; `aggregate`: "max",
    "mean" or "first".
    """

    size: int | None = None
    overlap: int | None = None
    max_chunks: int = MAX_CHUNKS
    aggregate: str = CHUNK_AGGREGATE

    def __post_init__(self) -> None:
        if self.size is not None:
            require_int("chunk size", self.size, MIN_CHUNK)
        if self.overlap is not None:
            require_int("chunk overlap", self.overlap, 0)
        require_int("max_chunks", self.max_chunks, 1)
        if self.aggregate not in CHUNK_AGGREGATES:
            raise RerankerError(f"chunk aggregate {self.aggregate!r} is not one of {', '.join(CHUNK_AGGREGATES)}")
        if self.size is not None and self.overlap is not None and self.overlap >= self.size:
            raise RerankerError(f"chunk overlap {self.overlap} must be less than the chunk size {self.size}")

    def overlap_for(self, size: int) -> int:
        """The overlap used for chunks of `size` tokens."""
        if self.overlap is not None and size == self.size:
            return self.overlap  # less than size (__post_init__)
        return min(CHUNK_OVERLAP if self.overlap is None else self.overlap, size // 2)

    def settings(self) -> dict:
        """The settings as a JSON-able dict (a job's fingerprint)."""
        return asdict(self)


def as_chunking(value: object) -> Chunking | None:
    """`chunking=` as the API takes it: None/False (truncate), True (the defaults) or a `Chunking`."""
    if value is None or value is False:
        return None
    if value is True:
        return Chunking()
    if isinstance(value, Chunking):
        return value
    raise RerankerError(f"chunking={value!r:.60} must be True, False, None or a reranker.Chunking(...)")
