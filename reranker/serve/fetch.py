"""Image URLs: fetched for a request only from the hosts the operator named (`reranker serve --image-url-hosts`).

Who can make the server fetch what: without `--image-url-hosts` nothing (a URL is a 422, never contacted). With it,
any client that may call `/v1/rerank` can make the server GET `https://` URLs (and `http://` with `--image-url-http`)
on exactly those hosts and ports (`settings.HostRule`), nothing else: every redirect target is checked by the same
rule before it is contacted (at most `MAX_REDIRECTS` hops), no credentials are sent (no cookies kept between
fetches, no netrc, no proxy variables, a URL with `user@` refused), and TLS is verified (certifi's CAs, or
`--image-url-ca`). Host names are matched as spelled, not resolved: the operator trusts the allowed names' DNS.

What a fetch may cost: one GET per hop, `Accept-Encoding: identity` (an encoded body is refused, so the bytes
counted are the bytes held), streamed and dropped past `--max-image-bytes` (or at once from its Content-Length),
`--image-url-timeout` seconds from its start, never past the request's deadline. A request's URL images (at most
`--max-images`) are fetched concurrently, `CONCURRENCY` at a time, in threads its worker thread starts and waits
for; the worker answers as soon as one fails, times out, or the request is given up (client gone, 504), and
tells the others to stop, which they do at their next read (a read waits at most the time its fetch had left
when its hop began). The bytes then go through the same decoding and `--max-image-pixels` check as base64 ones.

httpx is imported only when a fetcher is made, so an app made without URL hosts runs without it (the
`reranker serve` command checks its whole extra, httpx included, before the model loads).
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reranker.engine.tokenizer import check_cancelled
from reranker.errors import RerankerError
from reranker.serve.schemas import ImageField
from reranker.serve.settings import DEFAULT_PORTS, ServeSettings

if TYPE_CHECKING:
    import httpx

MAX_REDIRECTS = 3
#: A request's downloads running at once (the rest wait for a thread; each one's timeout starts when it does).
CONCURRENCY = 8
#: How often the request's worker thread looks at its deadline and its cancellation while downloads run.
_POLL = 0.02
#: Content-Types taken as possibly an image (decoding decides); any other (text/html, ...) is refused unread.
_BINARY_TYPES = ("application/octet-stream", "binary/octet-stream")
_HEADERS = {"User-Agent": "jina-reranker-gguf (reranker serve image fetch)", "Accept": "image/*",
            "Accept-Encoding": "identity"}


#: A URI scheme (RFC 3986). Base64's alphabet has no ':', so a string that starts like this is never base64.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def uri_scheme(value: str) -> str | None:
    """The URI scheme `value` starts with, lowercased without its ':' ('https', 'data', 'file', ...), or None."""
    m = _SCHEME.match(value)
    return m.group()[:-1].lower() if m else None


def is_url(value: str) -> bool:
    """Whether `value` is an http(s) URL: what only a fetcher may take (`ImageFetcher.check` says if it will)."""
    return uri_scheme(value) in DEFAULT_PORTS


class _Stopped(Exception):
    """The request's worker gave up on this download (another failed, or the request ended); nobody reads it."""


@dataclass(eq=False)
class _Download:
    image: ImageField
    url: httpx.URL
    deadline: float | None = None  # set when its thread starts it
    future: Future = field(default=None)  # type: ignore[assignment]


class ImageFetcher:
    """The fetch policy of one server (`settings.image_url_*`) and the downloads of its requests."""

    def __init__(self, settings: ServeSettings) -> None:
        import certifi
        import httpx

        self._httpx = httpx
        self.rules = settings.url_rules
        self.http = settings.image_url_http
        self.timeout = settings.image_url_timeout
        self.max_bytes = settings.max_image_bytes
        try:
            self.ssl = ssl.create_default_context(cafile=settings.image_url_ca or certifi.where())
        except (OSError, ssl.SSLError) as e:
            raise RerankerError(f"--image-url-ca {settings.image_url_ca}: not a PEM file of CA certificates ({e})") from None

    def refusal(self, url: httpx.URL) -> str | None:
        """Why `url` may not be fetched; None when it may."""
        if url.scheme not in DEFAULT_PORTS:
            return f"a {url.scheme}: URL is not fetched"
        if url.scheme == "http" and not self.http:
            return "plain http:// URLs are not fetched by this server (https:// only; its operator can allow http with --image-url-http)"
        if url.userinfo:
            return "a URL with credentials (user@host) is not fetched"
        if not url.raw_host:
            return f"a URL without a host is not fetched (give it as {url.scheme}://host/path)"
        host = url.raw_host.decode("ascii").lower().rstrip(".")
        default = DEFAULT_PORTS[url.scheme]
        port = url.port or default
        if not any(rule.matches(host, port, default) for rule in self.rules):
            shown = f"[{host}]" if ":" in host else host
            return (f"host {shown}:{port} is not one this server fetches images from (--image-url-hosts "
                    f"{','.join(map(str, self.rules))})")
        return None

    def check(self, image: ImageField) -> httpx.URL:
        """`image`'s URL, parsed, when the policy allows it; else a RerankerError naming the image and the reason."""
        try:
            url = self._httpx.URL(image.value)
        except self._httpx.InvalidURL as e:
            raise RerankerError(f"{image.where}: {image.value[:200]!r} is not a valid URL ({e})") from None
        why = self.refusal(url)
        if why:
            raise RerankerError(f"{image.where}: {why}; or download the image yourself and send its bytes base64-encoded")
        return url

    def fetch_all(self, images: list[ImageField], deadline: float) -> dict[ImageField, bytes]:
        """Each URL image's body, downloaded concurrently; the first failure (by document order among those that
        failed) is a RerankerError naming its image. Runs in the request's worker thread, which it never leaves
        blocked past `deadline`, a download's own timeout, or its cancellation (`check_cancelled`)."""
        downloads = [_Download(image, self.check(image)) for image in images]
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(CONCURRENCY, len(downloads)), thread_name_prefix="image-url")
        try:
            for d in downloads:
                d.future = pool.submit(self._download, d, deadline, stop)
            pending = {d.future for d in downloads}
            while pending:
                check_cancelled()
                done, pending = wait(pending, timeout=_POLL, return_when=FIRST_COMPLETED)
                failed = [d for d in downloads if d.future in done and d.future.exception() is not None]
                if failed:
                    raise failed[0].future.exception()
                now = time.monotonic()
                late = [d for d in downloads if d.future in pending and (d.deadline or deadline) < now]
                if late:
                    raise self._timed_out(late[0], deadline)
            return {d.image: d.future.result() for d in downloads}
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def _timed_out(self, d: _Download, deadline: float) -> RerankerError:
        why = ("the request's --request-timeout" if d.deadline is None or d.deadline >= deadline
               else f"--image-url-timeout {self.timeout:g} s")
        return RerankerError(f"{d.image.where}: fetching {d.url} timed out ({why}); send the image's bytes instead, "
                             "or retry when its host answers faster")

    def _download(self, d: _Download, deadline: float, stop: threading.Event) -> bytes:
        """One image's body (its thread): hop by hop, each hop checked against the policy before it is contacted."""
        httpx = self._httpx
        d.deadline = min(time.monotonic() + self.timeout, deadline)
        url = d.url
        where = d.image.where
        with httpx.Client(verify=self.ssl, trust_env=False, follow_redirects=False, headers=_HEADERS) as client:
            for _ in range(MAX_REDIRECTS + 1):
                if stop.is_set():
                    raise _Stopped()
                remaining = d.deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out(d, deadline)
                try:
                    with client.stream("GET", url, timeout=remaining) as response:
                        if response.next_request is not None:  # a redirect with a Location
                            target = response.next_request.url
                            why = self.refusal(target)
                            if why:
                                raise RerankerError(f"{where}: {url} redirects to {target}, which is not fetched: {why}")
                            url = target
                            continue
                        return self._body(response, d, url, stop)
                except httpx.TimeoutException:
                    raise self._timed_out(d, deadline) from None
                except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
                    raise RerankerError(f"{where}: fetching {url} failed ({type(e).__name__}: {e})") from None
        raise RerankerError(f"{where}: {d.url} redirects more than {MAX_REDIRECTS} times; send the final URL")

    def _body(self, response: httpx.Response, d: _Download, url: httpx.URL, stop: threading.Event) -> bytes:
        where = d.image.where
        if response.status_code != 200:
            raise RerankerError(f"{where}: fetching {url} answered HTTP {response.status_code}, not 200 with an image")
        kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind and not kind.startswith("image/") and kind not in _BINARY_TYPES:
            raise RerankerError(f"{where}: {url} is not an image (Content-Type {kind}); send an image's URL or its bytes")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RerankerError(f"{where}: {url} came {encoding}-encoded though this server asked for none; "
                                "serve the image file as it is")
        too_big = RerankerError(f"{where}: the image at {url} exceeds {self.max_bytes} bytes (--max-image-bytes); "
                                "link or send a smaller file")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise too_big
        body = bytearray()
        for chunk in response.iter_raw():  # each network read as it comes (at most 64 KiB): no buffering to a size
            body += chunk
            if len(body) > self.max_bytes:
                raise too_big
            if stop.is_set():  # the worker gave up (at the latest at this download's deadline): stop reading
                raise _Stopped()
        if not body:
            raise RerankerError(f"{where}: {url} answered an empty body, not an image")
        return bytes(body)
