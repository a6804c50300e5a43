"""One request's query and documents -> prompt ids, with the Reranker's own PromptBuilder.

Runs in a request's worker thread (the tokenizer holds no lock other requests wait on, so it
overlaps their tokenising and the decode calls), before anything is queued: a bad text is refused
here, alone. The handler stops it at the request's deadline or disconnect (`tokenizer.cancelled_by`).
The request becomes a `Prepared` through `engine.scoring.prepare` (with chunking, a long document
becomes one prompt per chunk), and `Prepared.pair_scores` folds the chunks' scores back into one per
document, as `Reranker.score_documents` does.

Images (Jina's `{"image": ...}`): `check_images` refuses, before anything is decoded, too many images,
URLs (unless the operator allowed their host: `serve.fetch`) and other URIs, and images over the byte cap;
`load_images` (in the worker thread, cancellable between images) downloads the allowed URLs, decodes base64
to bytes and loads and sizes them (`engine.vision.load`, the pixel cap checked from the header before
decoding). The library gets bytes or a data: URI string only: no request string reaches it as something it
would open as a path or fetch.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import fields, replace

from reranker.engine.prompts import PromptBuilder
from reranker.engine.scoring import Prepared, prepare
from reranker.engine.segments import PendingImage
from reranker.engine.tokenizer import check_cancelled
from reranker.engine.vision import load
from reranker.errors import RerankerError
from reranker.options import MIN_LENGTH, Chunking, ImageRef
from reranker.serve.fetch import ImageFetcher, is_url, uri_scheme
from reranker.serve.schemas import ImageField, ScoreOptions, Side
from reranker.serve.settings import ServeSettings

_SEND = "send the image file's bytes base64-encoded, or as a data: URI ('data:image/png;base64,...')"


def check_sizes(query: Side, documents: list[Side], settings: ServeSettings) -> None:
    """Characters per query and per document within the server's caps: checked before any tokenising,
    so a 15 MB document costs the server no more than reading it. (Images: `check_images`.)"""
    if isinstance(query, str) and len(query) > settings.max_query_chars:
        raise RerankerError(f"query: {len(query)} characters; this server takes at most {settings.max_query_chars} "
                            "(--max-query-chars): send a shorter query")
    long = [(i, len(d)) for i, d in enumerate(documents) if isinstance(d, str) and len(d) > settings.max_document_chars]
    if long:
        i, n = long[0]
        more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
        raise RerankerError(f"documents[{i}]: {n} characters{more}; this server takes at most {settings.max_document_chars} "
                            "per document (--max-document-chars): split or shorten it")


def images_of(query: Side, documents: list[Side]) -> list[ImageField]:
    return [s for s in (query, *documents) if isinstance(s, ImageField)]


def check_images(images: list[ImageField], settings: ServeSettings, fetcher: ImageFetcher | None = None) -> None:
    """What can be refused without decoding or fetching anything: too many images, URLs (fetched only by a `fetcher`,
    from the hosts its operator allowed), other URIs (`file:`, ...; never opened), and images over `max_image_bytes`."""
    if len(images) > settings.max_images:
        raise RerankerError(f"documents: {len(images)} images in one request; this server takes at most {settings.max_images} "
                            "(--max-images): split the request")
    for image in images:
        value = image.value
        scheme = uri_scheme(value)
        if is_url(value):
            if fetcher is None:
                raise RerankerError(f"{image.where}: image URLs are not fetched (this server makes no requests to other hosts: "
                                    f"its operator allowed none with --image-url-hosts); download the image yourself and {_SEND}")
            fetcher.check(image)
            continue
        if scheme is not None and scheme != "data":
            raise RerankerError(f"{image.where}: a {scheme}: URI is not an image this server reads "
                                f"(it opens no paths or URIs from requests); {_SEND}")
        payload = value.partition(",")[2] if scheme else value
        if scheme and ";base64" not in value[: len(value) - len(payload)].lower():
            size = len(payload)  # percent-encoded: at most one byte per character
        else:
            size = len(payload) // 4 * 3
        if size > settings.max_image_bytes:
            raise RerankerError(f"{image.where}: an image of about {size} bytes; this server takes at most "
                                f"{settings.max_image_bytes} per image (--max-image-bytes): send a smaller file")


def image_source(image: ImageField, settings: ServeSettings) -> bytes | str:
    """What the library loads for `image`: its bytes (base64 decoded strictly: no whitespace, no other alphabet), or
    its data: URI string, which `images.load` parses as one. Never any other string, which it would take for a path."""
    if image.value[:5].lower() == "data:":
        return image.value
    try:
        data = base64.b64decode(image.value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RerankerError(f"{image.where}: the image is neither a data: URI nor valid base64 ({e}; paths and URLs "
                            f"are not read); {_SEND}") from None
    if not data:
        raise RerankerError(f"{image.where}: the image is empty; {_SEND}")
    if len(data) > settings.max_image_bytes:
        raise RerankerError(f"{image.where}: an image of {len(data)} bytes; this server takes at most "
                            f"{settings.max_image_bytes} per image (--max-image-bytes): send a smaller file")
    return data


class PixelBudget:
    """The pixels of the images being decoded and sized at once, across requests, at most `total`.

    Decoding takes ~11 bytes a pixel at its peak (the decoded file, then its RGB copy), ~370 MB for an image at
    the default --max-image-pixels: without a bound, 12 such requests at once (2 MB of bodies) took 5.3 GB. An
    image waits for room in its request's thread; the request's deadline or disconnect ends the wait.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.total)  # an image the server takes is never refused for want of room
        with self._room:
            while self.used + pixels > self.total:
                check_cancelled()
                self._room.wait(0.05)  # and look again: a cancelled request must stop waiting
            self.used += pixels
        try:
            yield
        finally:
            with self._room:
                self.used -= pixels
                self._room.notify_all()


def load_images(reranker, query: Side, documents: list[Side], settings: ServeSettings,
                fetcher: ImageFetcher | None = None, deadline: float | None = None,
                budget: PixelBudget | None = None) -> tuple:
    """(query, documents) with every `ImageField` downloaded (a URL, by `fetcher`, before `deadline`) or decoded,
    then loaded and sized (`PendingImage`, encoded when scored).

    Runs in the request's worker thread; stops between two images once the request is given up. `budget`: the
    server's `PixelBudget`, held by each image from its decoding until it is sized (None: no bound)."""
    images = images_of(query, documents)
    if not images:
        return query, documents
    urls = [image for image in images if is_url(image.value)] if fetcher is not None else []
    fetched = fetcher.fetch_all(urls, deadline if deadline is not None else time.monotonic() + settings.request_timeout) \
        if urls else {}
    sizing = reranker.vision.sizing
    loaded: dict[ImageField, PendingImage] = {}
    for image in images:
        check_cancelled()
        source = fetched[image] if image in fetched else image_source(image, settings)
        try:
            from reranker.images.load import header_pixels

            held = budget.hold(header_pixels(source) or 0) if budget is not None else contextlib.nullcontext()
            with held:
                loaded[image] = load(ImageRef(source, f"{image.where} image"), sizing, max_pixels=settings.max_image_pixels)
        except RerankerError as e:
            # The library's fix names local paths and PIL images, which a request cannot send.
            from reranker.images.load import FIX

            raise RerankerError(str(e).replace(FIX, _SEND)) from None
        except ImportError as e:
            from reranker.extras import install_hint

            raise RerankerError(f"images need {e.name}, which this server does not have: {install_hint('images')}") from e
    return (loaded[query] if isinstance(query, ImageField) else query,
            [loaded[d] if isinstance(d, ImageField) else d for d in documents])


def check_prompts(prepared: Prepared, settings: ServeSettings) -> None:
    """The request's prompts (each chunk one) within the server's cap, counted before anything is queued."""
    cap, flag = settings.prompt_cap
    n = len(prepared.prompts)
    if n > cap:
        what = f"{len(prepared.docs)} documents make {n} prompts" + (" (each chunk is one)" if prepared.chunking else "")
        fix = "lower chunking.max_chunks, raise chunking.size, or send fewer documents" if prepared.chunking else "send fewer documents"
        raise RerankerError(f"documents: {what}; this server takes at most {cap} per request ({flag}): {fix}")


def request_chunking(options: ScoreOptions, default: Chunking | None, max_chunks: int | None = None) -> Chunking | None:
    """The request's `chunking` over the server's (`reranker serve --chunk ...`); a bad one is a RerankerError.

    `max_chunks`: the server's cap (`--max-request-chunks`); a request asking for more chunks per document gets this many.
    """
    chunking = _request_chunking(options, default)
    if chunking is not None and max_chunks is not None and chunking.max_chunks > max_chunks:
        chunking = replace(chunking, max_chunks=max_chunks)
    return chunking


def _request_chunking(options: ScoreOptions, default: Chunking | None) -> Chunking | None:
    field = options.chunking
    if field is None:
        return default
    if field is False:
        return None
    base = default or Chunking()
    if field is True:
        return base
    given = {f.name: getattr(field, f.name) for f in fields(Chunking) if getattr(field, f.name, None) is not None}
    try:
        return Chunking(**{**{f.name: getattr(base, f.name) for f in fields(Chunking)}, **given})
    except RerankerError as e:  # Chunking's checks: name the request's field
        raise RerankerError(f"chunking: {e}") from e


def build_prompts(reranker, query: Side, documents: list[Side], options: ScoreOptions,
                  default_chunking: Chunking | None = None, max_chunks: int | None = None,
                  settings: ServeSettings | None = None, fetcher: ImageFetcher | None = None,
                  deadline: float | None = None, budget: PixelBudget | None = None) -> Prepared:
    """Prompts of `(query, document)` for each document, in order, truncated (or chunked) as `compute_score` does;
    images (`ImageField`) loaded first, under `settings`' caps (default: the server's defaults), URLs fetched by
    `fetcher` (None: none are) by `deadline` (`time.monotonic()`; default: `settings.request_timeout` from now),
    each decoded within the server's `budget` of pixels (None: no bound).

    (A lone surrogate cannot reach here: the JSON parser refuses `"\\ud800"` with a 400.)
    """
    chunking = request_chunking(options, default_chunking, max_chunks)
    query, documents = load_images(reranker, query, documents, settings or ServeSettings(), fetcher, deadline, budget)
    builder = reranker.prompt_builder()
    if options.max_tokens_per_doc is not None:
        # The prompt without its document (template, cut query, scoring token), plus the document's allowance.
        base = len(builder.build(query, "").ids)
        limit = max(MIN_LENGTH, min(builder.max_length, base + options.max_tokens_per_doc))
        builder = PromptBuilder(builder.tokenizer, limit, builder.max_query_length, builder.max_doc_length)
    return prepare(builder, [(query, d) for d in documents], chunking)
