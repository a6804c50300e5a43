"""The FastAPI app: the Jina and Cohere rerank endpoints over one `Reranker` and its `Scheduler`.

A rerank request is read (at most `max_request_bytes`), validated (400 for a body that is not
JSON, 422 naming the field otherwise), refused early when the queue is full (503 + Retry-After),
tokenised in a worker thread (images fetched, decoded and sized there too), queued, and awaited until its scores arrive, its client leaves
(its work is cancelled) or its time is up (504, work cancelled). Tokenising too stops when the
client leaves or the time is up (between two llama.cpp calls), and never holds a lock other
requests need. A handler cancelled by the server's shutdown (uvicorn's graceful timeout) answers
503, never a 500. Errors are `{"detail": "..."}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from reranker.engine.tokenizer import cancelled_by
from reranker.engine.vision import find_mmproj
from reranker.errors import RerankerError
from reranker.serve.fetch import ImageFetcher
from reranker.serve.metrics import Metrics
from reranker.serve.prepare import PixelBudget, build_prompts, check_images, check_prompts, check_sizes, images_of
from reranker.serve.scheduler import Closed, Overloaded, Scheduler
from reranker.serve.schemas import CohereRerankRequest, JinaRerankRequest, cohere_response, jina_response
from reranker.serve.settings import ServeSettings

log = logging.getLogger(__name__)

#: The status recorded for a request whose client left before its answer (nginx's convention).
CLIENT_CLOSED = 499


class ServerStats:
    """Rerank requests taken by a handler and answered, by status: equal at a clean shutdown."""

    def __init__(self) -> None:
        self.accepted = 0
        self.answered: Counter[int] = Counter()

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.answered.items()))
        return f"{self.accepted} rerank requests accepted, {sum(self.answered.values())} answered ({codes or 'none'})"


def create_app(reranker, settings: ServeSettings | None = None) -> FastAPI:
    """The server's app over a loaded `reranker`; the scheduler runs between startup and shutdown."""
    settings = settings or ServeSettings()
    settings.check()
    batch_tokens = settings.batch_tokens or 4 * reranker.backbone.n_batch
    scheduler: Scheduler
    metrics = Metrics(lambda: scheduler.pending, lambda: scheduler.scoring)
    scheduler = Scheduler(reranker, batch_tokens, settings.max_queue, on_batch=metrics.observe_batch)
    stats = ServerStats()
    # Images need the vision projector; a server without one refuses image requests before decoding them.
    projector = (reranker.settings.mmproj if reranker.settings else None) or find_mmproj(reranker.gguf_source)
    # Image URLs are fetched only from the hosts the operator named (serve.fetch); without them, none is.
    fetcher = ImageFetcher(settings) if settings.image_url_hosts else None
    budget = PixelBudget(settings.decoding_pixels)  # images decoded at once, across requests

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        log.info("scheduler started: batches of up to %d tokens, queue of %d pairs", batch_tokens, settings.max_queue)
        yield
        await run_in_threadpool(scheduler.stop)  # in-flight requests have finished; anything queued is scored

    app = FastAPI(title="jina-reranker-gguf", description="Jina- and Cohere-compatible rerank API for jina-reranker-m0 GGUFs",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.stats, app.state.settings = scheduler, metrics, stats, settings

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    async def handled(endpoint: str, request: Request, handler, rerank: bool = False) -> Response:
        """Auth, then `handler()`; every answer (errors too) is counted and timed under `endpoint`."""
        start = time.perf_counter()
        code = 500
        if rerank:
            stats.accepted += 1
        try:
            authorize(request)
            response = await handler()
            code = response.status_code
            return response
        except HTTPException as e:
            code = e.status_code
            raise
        except ClientDisconnect:  # the client left mid-body: nobody reads an answer, and nothing failed here
            code = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        except asyncio.CancelledError:
            # uvicorn cancels the handlers still running when its graceful shutdown times out: the request
            # is answered as one the stopping server cannot take, not as a server failure.
            code = 503
            log.warning("%s: the server stopped before this request was answered (503)", endpoint)
            return JSONResponse({"detail": "the server is shutting down; retry"}, status_code=503,
                                headers={"Retry-After": str(settings.retry_after)})
        except Exception as e:
            log.exception("%s failed", endpoint)
            raise HTTPException(500, f"internal error: {type(e).__name__}: {e}") from e
        finally:
            metrics.requests.labels(endpoint, str(code)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            if rerank:
                stats.answered[code] += 1

    @app.get("/health")
    async def health() -> Response:
        ok = scheduler.running
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": settings.model_name}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def handler():
            return JSONResponse({"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                                              "created": 0, "owned_by": "jina-reranker-gguf"}]})
        return await handled("/v1/models", request, handler)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        async def handler():
            return Response(metrics.render(), media_type=metrics.content_type)
        return await handled("/metrics", request, handler)

    async def rerank(request: Request, schema: type[BaseModel], endpoint: str, respond) -> Response:
        async def handler():
            deadline = time.monotonic() + settings.request_timeout
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":  # never decompressed: a few KB of gzip can expand to gigabytes
                raise HTTPException(415, f"Content-Encoding {encoding!r} is not accepted; send the JSON body uncompressed")
            try:
                body = await asyncio.wait_for(read_body(request, settings.max_request_bytes), settings.request_timeout)
            except asyncio.TimeoutError:
                raise HTTPException(408, "the request body did not arrive within --request-timeout") from None
            req = parse(schema, body)
            n = len(req.documents)
            if n > settings.max_documents:
                raise HTTPException(422, f"documents: {n} documents; this server takes at most {settings.max_documents} "
                                         "per request (--max-documents): split the request")
            query, sides = req.query_side(), req.sides()
            images = images_of(query, sides)
            if images and projector is None:
                raise HTTPException(400, f"{images[0].where} is an image, and this server has no vision projector: start it "
                                         "with --mmproj path/to/mmproj-...gguf (or put the one mmproj-*.gguf beside the GGUF)")
            try:
                check_sizes(query, sides, settings)
                check_images(images, settings, fetcher)
            except RerankerError as e:
                raise HTTPException(422, str(e)) from e
            if not scheduler.running:
                raise HTTPException(503, "the server is shutting down", headers={"Retry-After": str(settings.retry_after)})
            if not scheduler.has_room(n):
                raise overloaded(f"{scheduler.pending} pairs are queued")
            metrics.in_flight.inc()
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                try:
                    prepared = await tokenised(gone, deadline, build_prompts, reranker, query, sides, req.options(),
                                               settings.chunking, settings.max_chunks, settings, fetcher, deadline, budget)
                    if prepared is None:  # the client left while its texts were tokenised
                        return Response(status_code=CLIENT_CLOSED)
                    check_prompts(prepared, settings)
                except RerankerError as e:
                    raise HTTPException(422, str(e)) from e
                try:
                    ticket = scheduler.submit(prepared.prompts, prepared.counts.tolist() if prepared.chunking else None)
                except Overloaded as e:
                    raise overloaded(str(e)) from e
                except Closed as e:
                    raise HTTPException(503, str(e), headers={"Retry-After": str(settings.retry_after)}) from e
                scores = await wait_for(gone, scheduler, ticket, deadline)
            finally:
                gone.cancel()
                metrics.in_flight.dec()
            if scores is None:  # the client left: nobody reads this
                return Response(status_code=CLIENT_CLOSED)
            return JSONResponse(respond(req, prepared.pair_scores(scores).tolist(), ticket.tokens))
        return await handled(endpoint, request, handler, rerank=True)

    def overloaded(why: str) -> HTTPException:
        return HTTPException(503, f"overloaded: {why}; retry after {settings.retry_after} s",
                             headers={"Retry-After": str(settings.retry_after)})

    @app.post("/v1/rerank")
    async def rerank_jina(request: Request) -> Response:
        return await rerank(request, JinaRerankRequest, "/v1/rerank",
                            lambda req, scores, tokens: jina_response(req, settings.model_name, scores, tokens))

    @app.post("/v2/rerank")
    async def rerank_cohere(request: Request) -> Response:
        return await rerank(request, CohereRerankRequest, "/v2/rerank",
                            lambda req, scores, tokens: cohere_response(req, str(uuid.uuid4()), scores, tokens))

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_big = HTTPException(413, f"the request body exceeds {limit} bytes (--max-request-bytes); send fewer or shorter documents")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


_UNION_TAGS = {"str", "SideObject", "bool", "ChunkingField"}


def parse(schema: type[BaseModel], body: bytes) -> BaseModel:
    """The request as `schema`: 400 when the body is not JSON, 422 naming each bad field otherwise."""
    try:
        # RFC 8259 lets a parser ignore a UTF-8 byte-order mark, which some Windows tools write.
        return schema.model_validate_json(body.removeprefix(b"\xef\xbb\xbf"))
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(x["type"] == "json_invalid" for x in errors):
            raise HTTPException(400, f"the body is not valid JSON ({errors[0]['msg']}); send a JSON object") from None
        by_field: dict[str, list[dict]] = {}
        for x in errors:
            # A union's errors carry the member's name ('str', 'SideObject') in their location: merge them.
            loc = ".".join(str(p) for p in x["loc"] if str(p) not in _UNION_TAGS and not str(p).startswith("function-")) or "body"
            by_field.setdefault(loc, []).append(x)
        # A union member that got further (chunking.size) says more than one that failed at once (chunking: not a bool).
        by_field = {loc: xs for loc, xs in by_field.items() if not any(k.startswith(loc + ".") for k in by_field)}
        parts = [f"{loc}: {_message(loc, xs)}" for loc, xs in by_field.items()]
        raise HTTPException(422, "; ".join(parts[:5]) + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")) from None


def _message(loc: str, errors: list[dict]) -> str:
    """One field's message; of a union's, our own validator's (an object's problem) when there is one."""
    own = [x["msg"].removeprefix("Value error, ") for x in errors if x["type"] == "value_error"]
    if own or len(errors) == 1:
        return (own or [errors[0]["msg"]])[0]
    if loc == "chunking":
        return "must be true, false or an object with size, overlap, max_chunks and aggregate"
    return 'must be a string, {"text": string} or {"image": base64 or a data: URI}'


async def tokenised(gone: asyncio.Future, deadline: float, fn, *args):
    """`fn(*args)` in a worker thread, its tokenising cancellable; None when the client left first;
    504 when the deadline comes first. Either way the thread stops at its next llama.cpp call."""
    cancel = threading.Event()

    def run():
        with cancelled_by(cancel):
            return fn(*args)

    work = asyncio.ensure_future(run_in_threadpool(run))
    # Once given up, the thread ends on its own with `Cancelled`; nobody awaits it then.
    work.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        done, _ = await asyncio.wait({work, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            cancel.set()
    if work in done:
        return work.result()
    if gone in done:
        return None
    raise HTTPException(504, "the request timed out while its texts were tokenised or its images loaded (--request-timeout); "
                             "send shorter documents or fewer of them")


async def wait_for(gone: asyncio.Future, scheduler: Scheduler, ticket, deadline: float):
    """The ticket's scores; None when the client left first (`gone` done); 504 when the deadline comes first (work cancelled)."""
    result = asyncio.wrap_future(ticket.future)
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if result in done:
            return result.result()
        scheduler.cancel(ticket)
        if gone in done:
            return None
        raise HTTPException(504, "the request timed out waiting for the model (--request-timeout); retry later or send fewer documents")
    finally:
        if not ticket.future.done():  # this task was cancelled (e.g. a forced shutdown): drop the work too
            scheduler.cancel(ticket)


async def _disconnected(request: Request) -> None:
    # After the body, the server's next ASGI message for this request is http.disconnect, sent when the client leaves.
    while (await request.receive())["type"] != "http.disconnect":
        pass
