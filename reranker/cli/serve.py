"""`reranker serve`: the Jina- and Cohere-compatible rerank server (uvicorn), with graceful shutdown."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from reranker.cli.common import add_chunk_args, add_model_args, chunking_option, load_reranker
from reranker.errors import RerankerError
from reranker.extras import require
from reranker.gguf.header import check_file
from reranker.serve.settings import API_KEY_ENV, MAX_IMAGE_PIXELS, ServeSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = ServeSettings()
    p = sub.add_parser("serve", help="serve /v1/rerank (Jina) and /v2/rerank (Cohere) over HTTP",
                       description="A rerank server: requests in the Jina and Cohere API shapes, batched across clients. "
                                   "SIGTERM or Ctrl-C stops accepting, finishes what is in flight, then exits.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any free port, printed at start)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--served-model-name", default=d.model_name, help="model id in /v1/models and responses (default: %(default)s)")
    p.add_argument("--max-documents", type=int, default=d.max_documents, help="documents per request (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="request body size (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="pairs waiting for the model before requests get 503 + Retry-After (default: %(default)s)")
    p.add_argument("--max-document-chars", type=int, default=d.max_document_chars,
                   help="characters per document, checked before tokenising; beyond, 422 (default: %(default)s)")
    p.add_argument("--max-query-chars", type=int, default=d.max_query_chars,
                   help="characters per query, checked before tokenising; beyond, 422 (default: %(default)s)")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help="prompts per request, each chunk of a document one, at most --max-queue; beyond, 422 "
                        "(default: %(default)s)")
    p.add_argument("--max-request-chunks", type=int, default=d.max_chunks,
                   help="chunks per document a request may ask for; a larger chunking.max_chunks is cut to it "
                        "(default: %(default)s)")
    g = p.add_argument_group("images (Jina's {\"image\": base64 | data: URI | URL} queries and documents on /v1/rerank; "
                             "paths are never read, URLs fetched only from --image-url-hosts)")
    g.add_argument("--mmproj", metavar="PATH",
                   help="the vision projector (default: the one mmproj-*.gguf beside the GGUF; without one, image requests get 400)")
    g.add_argument("--max-images", type=int, default=d.max_images,
                   help="images per request, the query included, counted before any is decoded; beyond, 422 (default: %(default)s)")
    g.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes,
                   help="an image file's size (decoded from base64), checked before decoding; beyond, 422 (default: %(default)s)")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="an image's width x height, read from its header before its pixels are decoded (decompression "
                        f"bombs); beyond, 422 (default: %(default)s; at most {MAX_IMAGE_PIXELS})")
    g.add_argument("--max-decoding-pixels", type=int, default=None,
                   help="the pixels of the images decoded at once, across requests (~11 bytes each at the peak); an "
                        "image waits for room (default: twice --max-image-pixels)")
    g.add_argument("--image-url-hosts", metavar="HOST[,HOST...]", action="append", default=[],
                   help="fetch https:// image URLs from these hosts only: names or IP addresses as written, '*.example.com' "
                        "for any name under example.com, each optionally ':PORT' (without one, the scheme's default port "
                        "only); redirects are followed only to them. Default: none, every URL is a 422 and never contacted")
    g.add_argument("--image-url-http", action="store_true",
                   help="also fetch plain http:// URLs (and redirects) from --image-url-hosts (default: https only)")
    g.add_argument("--image-url-timeout", type=float, default=d.image_url_timeout,
                   help="seconds one image's download may take, redirects included, within --request-timeout; beyond, 422 "
                        "(default: %(default)s)")
    g.add_argument("--image-url-ca", metavar="PEM",
                   help="verify https image hosts against the CA certificates in this PEM file instead of certifi's")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds from arrival to answer, else 504 (default: %(default)s)")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection may take to send a request's line and headers, else it is closed "
                        "(slow or silent clients hold no connection; default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="prompt tokens per batch across requests (default: 4 x --n-batch)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections at most; beyond, uvicorn answers 503 (default: %(default)s)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    add_chunk_args(p)  # the default for requests; a request's "chunking" field overrides it
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    require("serve", "reranker serve")  # the whole extra, httpx included: one install line, before the model loads
    import uvicorn

    from reranker.serve.app import create_app
    settings = ServeSettings(model_name=args.served_model_name, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                             max_documents=args.max_documents, max_request_bytes=args.max_request_bytes,
                             max_queue=args.max_queue, request_timeout=args.request_timeout,
                             header_timeout=args.header_timeout, batch_tokens=args.batch_tokens,
                             chunking=chunking_option(args), max_document_chars=args.max_document_chars,
                             max_query_chars=args.max_query_chars, max_prompts=args.max_prompts,
                             max_chunks=args.max_request_chunks, max_images=args.max_images,
                             max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                             max_decoding_pixels=args.max_decoding_pixels,
                             image_url_hosts=tuple(h for arg in args.image_url_hosts for h in arg.split(",") if h.strip()),
                             image_url_http=args.image_url_http, image_url_timeout=args.image_url_timeout,
                             image_url_ca=args.image_url_ca)
    settings.check()
    if args.image_url_ca:
        check_file(args.image_url_ca, "CA file", "pass --image-url-ca a PEM file of CA certificates")
    if not 0 <= args.port <= 65535:
        raise RerankerError(f"--port {args.port} is not a port; use 0-65535 (0: any free one)")
    if args.mmproj:  # a wrong path fails at once; a file that is no projector fails when it loads, still before listening
        check_file(args.mmproj, "mmproj file", "pass --mmproj the mmproj-*.gguf that `reranker convert` wrote beside the GGUF")
    sock = bind(args.host, args.port)  # before the model loads: a taken port fails at once
    reranker = load_reranker(args)
    try:
        vision = images_on(reranker)
        app = create_app(reranker, settings)
    except BaseException:
        reranker.close()
        raise
    from reranker.serve.protocol import header_deadline_protocol

    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning", access_log=args.access_log,
                            http=header_deadline_protocol(settings.header_timeout),
                            limit_concurrency=args.max_connections, lifespan="on",
                            timeout_graceful_shutdown=int(settings.request_timeout) + 5)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    print(f"reranker serve: listening on http://{host if ':' not in host else f'[{host}]'}:{port} "
          f"(model {args.model}, weights {reranker.weights_dtype}, "
          f"auth {'on' if settings.api_key else 'off'}, images {f'on ({vision})' if vision else 'off (no --mmproj)'}"
          f"{', image URLs from ' + ','.join(map(str, settings.url_rules)) if vision and settings.url_rules else ''})",
          file=sys.stderr, flush=True)
    # uvicorn turns SIGTERM / SIGINT into a graceful stop, then raises the signal again once done:
    # these handlers take that second one, so the process exits 0 after a clean stop.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        reranker.close()
    print(f"reranker serve: stopped; {app.state.stats.summary()}", file=sys.stderr, flush=True)
    if not server.started:
        raise RerankerError("the server did not start (see the messages above)")


def images_on(reranker) -> str | None:
    """The vision projector's file name, loaded now when there is one (a broken file fails at start, and the first
    image request does not wait for it); None: image requests are refused."""
    from reranker.engine.vision import find_mmproj

    if not ((reranker.settings.mmproj if reranker.settings else None) or find_mmproj(reranker.gguf_source)):
        return None
    return reranker.vision.path.name


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (uvicorn listens once the model is ready)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise RerankerError(f"--host {host!r} cannot be resolved ({e.strerror})") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RerankerError(f"cannot bind {host}:{port} ({e.strerror}); choose another --port or stop what uses it") from e
    sock.set_inheritable(True)
    return sock
