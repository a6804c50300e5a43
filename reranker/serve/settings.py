"""The server's limits and identity, checked before the model loads."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from reranker.defaults import MAX_CHUNKS
from reranker.errors import RerankerError
from reranker.options import Chunking, require_int

API_KEY_ENV = "RERANKER_API_KEY"
#: `reranker.images.load.MAX_PIXELS`, restated so that settings are checked without importing PIL (tested equal).
MAX_IMAGE_PIXELS = 2**27
#: The port an image URL's host rule means when it names none: the scheme's own.
DEFAULT_PORTS = {"https": 443, "http": 80}


@dataclass(frozen=True)
class HostRule:
    """One `--image-url-hosts` entry: a host name or IP address, or `*.suffix` (any name under the suffix, not the
    suffix itself), and a port (None: the URL scheme's default port only, so an allowed host's other services stay
    out of reach). Names are compared as ASCII strings (IDNs in punycode), case-insensitively, without a trailing
    dot; anything spelled otherwise (another name for the same address, `2130706433` for 127.0.0.1) is refused."""

    host: str
    port: int | None
    wildcard: bool

    def matches(self, host: str, port: int, default_port: int) -> bool:
        if port != (self.port if self.port is not None else default_port):
            return False
        return host.endswith("." + self.host) if self.wildcard else host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return ("*." if self.wildcard else "") + host + (f":{self.port}" if self.port is not None else "")


def parse_host_rule(entry: str) -> HostRule:
    """`entry` ('example.com', '*.example.com', 'example.com:8443', '10.0.0.5:8080', '[::1]:8080') as a `HostRule`."""
    bad = (f"--image-url-hosts: {entry!r} is not a host; give host names or IP addresses, each optionally ':PORT', "
           "or '*.example.com' for the names under example.com (comma-separated)")
    text = entry.strip().lower()
    wildcard = text.startswith("*.")
    rest = text[2:] if wildcard else text
    if not rest or not rest.isascii() or any(c in rest for c in "*/?#@\\ \t"):
        raise RerankerError(bad + ("; write an international name in punycode (xn--...)" if not rest.isascii() else ""))
    split = urllib.parse.urlsplit("//" + rest)
    try:
        port = split.port
    except ValueError:
        raise RerankerError(bad + ": its port is not 0-65535") from None
    host = (split.hostname or "").rstrip(".")
    if not host or (wildcard and (":" in host or "." not in host)):
        raise RerankerError(bad + ("; a wildcard needs a domain of at least two labels ('*.example.com')" if wildcard else ""))
    return HostRule(host, port, wildcard)


@dataclass(frozen=True)
class ServeSettings:
    """What `reranker serve` enforces.

    - `model_name`: the id in `/v1/models` and in responses when a request names none;
    - `api_key`: when set, every endpoint but `/health` needs `Authorization: Bearer <key>`;
    - `max_documents`: documents per request; `max_request_bytes`: request body size;
    - `max_queue`: pairs waiting for the scheduler before new requests get 503 + Retry-After;
    - `request_timeout`: seconds from a request's arrival to its answer, else 504 (its work is dropped);
    - `header_timeout`: seconds a connection may take to send a request's line and headers (from connecting, or
      from its previous answer), else it is closed: a client that sends nothing, or a header a second, holds none;
    - `batch_tokens`: prompt tokens per scheduler batch (None: 4 x the backbone's n_batch);
    - `retry_after`: the Retry-After seconds of an overload answer;
    - `chunking`: long documents chunked by default (`--chunk ...`); a request's `chunking` field overrides it;
    - `max_document_chars`, `max_query_chars`: characters per document and per query, checked before tokenising;
    - `max_prompts`: prompts (a document's chunks each count) per request, counted before anything is queued
      (at most `max_queue`, so even a request into an empty queue is bounded);
    - `max_chunks`: chunks per document a request may ask for; a request's larger `chunking.max_chunks` is cut to it;
    - `max_images`: images per request (documents and the query), counted before any is decoded;
    - `max_image_bytes`: an image's encoded size (after base64), refused before decoding it;
    - `max_image_pixels`: an image's width x height, read from its header before its pixels are decoded
      (decompression bombs); at most the library's own limit, `reranker.images.load.MAX_PIXELS`;
    - `max_decoding_pixels`: the pixels of the images being decoded at once, across requests (None: twice
      `max_image_pixels`, ~740 MB at the defaults); at least `max_image_pixels`;
    - `image_url_hosts`: the hosts whose `https://` image URLs requests may make the server fetch (`HostRule`s;
      empty: no URL is ever fetched); `image_url_http`: `http://` URLs to those hosts too; `image_url_timeout`: seconds
      one image's download may take (redirects included), within `request_timeout`; `image_url_ca`: a PEM bundle of
      the CAs that https image hosts are verified against (None: certifi's). See `serve.fetch`.
    """

    model_name: str = "jina-reranker-m0"
    api_key: str | None = None
    max_documents: int = 1024
    max_request_bytes: int = 16 * 2**20
    max_queue: int = 8192
    request_timeout: float = 60.0
    header_timeout: float = 10.0
    batch_tokens: int | None = None
    retry_after: int = 1
    chunking: Chunking | None = None
    max_document_chars: int = 200_000
    max_query_chars: int = 10_000
    max_prompts: int = 4096
    max_chunks: int = MAX_CHUNKS
    max_images: int = 64
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 2**25
    max_decoding_pixels: int | None = None
    image_url_hosts: tuple[str, ...] = ()
    image_url_http: bool = False
    image_url_timeout: float = 10.0
    image_url_ca: str | None = None

    def check(self) -> None:
        require_int("max_documents", self.max_documents, 1)
        require_int("max_request_bytes", self.max_request_bytes, 64)
        require_int("max_queue", self.max_queue, 1)
        require_int("retry_after", self.retry_after, 1)
        require_int("max_document_chars", self.max_document_chars, 1)
        require_int("max_query_chars", self.max_query_chars, 1)
        require_int("max_prompts", self.max_prompts, 1)
        require_int("max_chunks", self.max_chunks, 1)
        require_int("max_images", self.max_images, 0)
        require_int("max_image_bytes", self.max_image_bytes, 1)
        require_int("max_image_pixels", self.max_image_pixels, 1)
        if self.max_image_pixels > MAX_IMAGE_PIXELS:
            raise RerankerError(f"--max-image-pixels {self.max_image_pixels} exceeds the library's decompression-bomb limit "
                                f"of {MAX_IMAGE_PIXELS} pixels; lower it")
        if self.max_decoding_pixels is not None:
            require_int("max_decoding_pixels", self.max_decoding_pixels, 1)
            if self.max_decoding_pixels < self.max_image_pixels:
                raise RerankerError(f"--max-decoding-pixels {self.max_decoding_pixels} is less than --max-image-pixels "
                                    f"{self.max_image_pixels}, the largest image a request may send; raise it")
        if self.chunking is not None and self.chunking.max_chunks > self.max_chunks:
            raise RerankerError(f"--max-chunks {self.chunking.max_chunks} (the default for requests) exceeds "
                                f"--max-request-chunks {self.max_chunks}; lower it or raise --max-request-chunks")
        rules = self.url_rules  # a bad entry fails here, before the model loads
        if not (isinstance(self.image_url_timeout, (int, float)) and self.image_url_timeout > 0):
            raise RerankerError(f"--image-url-timeout {self.image_url_timeout!r} is invalid; it must be > 0 seconds")
        if not rules and (self.image_url_http or self.image_url_ca):
            flag = "--image-url-http" if self.image_url_http else "--image-url-ca"
            raise RerankerError(f"{flag} applies to image URLs, which this server fetches only from --image-url-hosts: "
                                "name the hosts too, or drop the flag")
        if self.batch_tokens is not None:
            require_int("batch_tokens", self.batch_tokens, 1)
        if not self.request_timeout > 0:
            raise RerankerError(f"request_timeout={self.request_timeout!r} is invalid; it must be > 0 seconds")
        if not (isinstance(self.header_timeout, (int, float)) and self.header_timeout > 0):
            raise RerankerError(f"--header-timeout {self.header_timeout!r} is invalid; it must be > 0 seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise RerankerError(f"the API key is empty; give a non-empty --api-key (or {API_KEY_ENV}), or none to turn auth off")
        if self.api_key is not None:
            # Clients send the key in an HTTP header, stripped and ASCII: any other key would be refused to everyone.
            if self.api_key != self.api_key.strip():
                raise RerankerError(f"the API key has leading or trailing whitespace ({self.api_key[:1]!r}...{self.api_key[-1:]!r}; "
                                    f"a newline from $(cat file)?): no client can send it; strip it from --api-key / {API_KEY_ENV}")
            if not (self.api_key.isascii() and self.api_key.isprintable()):
                raise RerankerError("the API key has non-ASCII or control characters, which an HTTP header cannot carry "
                                    f"unchanged; use printable ASCII in --api-key / {API_KEY_ENV}")

    @property
    def url_rules(self) -> tuple[HostRule, ...]:
        """`image_url_hosts` parsed (a bad entry is a RerankerError naming it)."""
        return tuple(parse_host_rule(e) for e in self.image_url_hosts)

    @property
    def decoding_pixels(self) -> int:
        """The pixels of the images being decoded at once, across requests (`max_decoding_pixels` or its default)."""
        return self.max_decoding_pixels or 2 * self.max_image_pixels

    @property
    def prompt_cap(self) -> tuple[int, str]:
        """(prompts per request at most, the flag that sets it): a request larger than the queue never fits beside others."""
        return (self.max_prompts, "--max-prompts") if self.max_prompts <= self.max_queue else (self.max_queue, "--max-queue")
