"""Image URLs through `reranker serve --image-url-hosts`: fetched only from the hosts the operator named.

Everything runs for real on loopback: uvicorn serving the tiny model, httpx as the client, and `ImageHost`, an
http.server (https with a self-signed certificate made by openssl) that records every request it gets, how many
bytes it managed to send and when its client went away. "Never contacted" is that recorder seeing no hit.
Scores are compared with the same bytes sent as base64 (tests/serve/test_serve_images.py compares those with
`compute_score`, and tests/api/test_images.py those with transformers).
"""

from __future__ import annotations

import base64
import gzip
import http.server
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse

import httpx
import pytest
from helpers import picture, png_bytes, running_server

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from reranker.errors import RerankerError  # noqa: E402
from reranker.serve.settings import HostRule, ServeSettings, parse_host_rule  # noqa: E402

QUERY = "a chart of the quarterly sales"
PNGS = [png_bytes(picture(300, 60, 1)), png_bytes(picture(56, 200, 2)), png_bytes(picture(40, 30, 0))]
BIG_PIXELS = png_bytes(Image.new("L", (1001, 1000)))
MAX_BYTES = 200_000
URL_TIMEOUT = 1.0
LIMITS = dict(max_images=4, max_image_bytes=MAX_BYTES, max_image_pixels=1_000_000, max_request_bytes=2**20)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ImageHost(http.server.ThreadingHTTPServer):
    """Serves PNGs, redirects and misbehaving answers by path; records what happened to each request."""

    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.hits: list[str] = []
        self.sent: dict[str, int] = {}  # path -> body bytes written before the client went away
        self.gone_after: dict[str, float] = {}  # path -> seconds from the request to the client going away
        self.finished = threading.Condition()
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.server_address[1]}"

    def wait_finished(self, path: str, timeout: float = 15) -> None:
        with self.finished:
            assert self.finished.wait_for(lambda: path in self.sent, timeout), f"{path}: the handler did not finish"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ImageHost

    def log_message(self, *args):
        pass

    def answer(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        given = {k.replace("_", "-"): v for k, v in headers.items()}  # Content_Type="" drops the header
        for k, v in {"Content-Type": "image/png", "Content-Length": str(len(body)), **given}.items():
            if v:
                self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        start = time.monotonic()
        self.server.hits.append(self.path)
        path, _, query = self.path.partition("?")
        sent = 0
        try:
            if path.startswith("/png/"):
                self.answer(200, PNGS[int(path[5:])])
            elif path == "/redirect":
                self.answer(302, Location=urllib.parse.parse_qs(query)["to"][0])
            elif path.startswith("/chain/"):  # /chain/N: N redirects, then a PNG
                n = int(path[7:])
                self.answer(302, Location=f"/chain/{n - 1}") if n else self.answer(200, PNGS[0])
            elif path == "/big":  # no Content-Length: only the bytes read can stop it
                self.answer(200, Content_Length="")
                for _ in range(1024):
                    self.wfile.write(b"\0" * 65536)
                    sent += 65536
            elif path == "/big-declared":
                self.answer(200, b"\0" * (MAX_BYTES + 1))
            elif path == "/late-headers":  # headers just inside the timeout, then a body that never comes
                time.sleep(0.9 * URL_TIMEOUT)
                self.answer(200, Content_Length="1000")
                time.sleep(3 * URL_TIMEOUT)
            elif path == "/drip":  # a byte every 50 ms: no read ever times out, only the whole download
                self.answer(200, Content_Length="")
                for _ in range(200):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    sent += 1
                    time.sleep(0.05)
            elif path == "/html":
                self.answer(200, b"<html>not a picture</html>", Content_Type="text/html; charset=utf-8")
            elif path == "/octet":
                self.answer(200, b"hello, world", Content_Type="application/octet-stream")
            elif path == "/gzip":
                self.answer(200, gzip.compress(PNGS[0]), Content_Encoding="gzip")
            elif path == "/pixels":
                self.answer(200, BIG_PIXELS)
            elif path == "/empty":
                self.answer(200, b"")
            else:
                self.answer(404, b"no such image", Content_Type="text/plain")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        finally:
            with self.server.finished:
                self.server.sent[path] = sent
                self.server.gone_after[path] = time.monotonic() - start
                self.server.finished.notify_all()


@pytest.fixture(scope="module")
def hosts():
    """(the allowed image host, another host on a port no rule names)."""
    with ImageHost() as allowed, ImageHost() as other:
        yield allowed, other


@pytest.fixture(autouse=True)
def _fresh_records(hosts):
    for h in hosts:
        h.hits.clear(), h.sent.clear(), h.gone_after.clear()


@pytest.fixture(scope="module")
def server(tiny_reranker, hosts):
    allowed, _ = hosts
    settings = ServeSettings(**LIMITS, image_url_hosts=(f"127.0.0.1:{allowed.server_address[1]}", "*.example.invalid"),
                             image_url_http=True, image_url_timeout=URL_TIMEOUT)
    with running_server(tiny_reranker, settings) as (url, _):
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def rerank(client, documents, query=QUERY, **extra) -> httpx.Response:
    return client.post("/v1/rerank", json={"query": query, "documents": documents, **extra})


def scores_of(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return [x["relevance_score"] for x in sorted(response.json()["results"], key=lambda x: x["index"])]


def refused(response: httpx.Response, start: str, *also: str) -> str:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith(start) and all(a in detail for a in also), detail
    return detail


def test_a_url_image_scores_bit_equal_to_its_bytes_in_base64(client, hosts):
    allowed, _ = hosts
    urls = [f"{allowed.base}/png/0", f"{allowed.base}/png/1"]
    docs = [{"image": urls[0]}, "plain text about sales", {"image": urls[1]}]
    r = rerank(client, docs)
    by_url = scores_of(r)
    assert sorted(allowed.hits) == ["/png/0", "/png/1"]
    assert by_url == scores_of(rerank(client, [{"image": b64(PNGS[0])}, docs[1], {"image": b64(PNGS[1])}]))
    assert abs(by_url[0] - by_url[2]) > 1e-4, "the two images should score apart, else equality proves little"
    assert [x["document"] for x in sorted(r.json()["results"], key=lambda x: x["index"])] == \
        [{"image": urls[0]}, {"text": docs[1]}, {"image": urls[1]}]  # echoed as sent
    # An image query by URL, against text and an image document.
    query_url = scores_of(rerank(client, ["text about sales", {"image": b64(PNGS[0])}], query={"image": f"{allowed.base}/png/2"}))
    assert query_url == scores_of(rerank(client, ["text about sales", {"image": b64(PNGS[0])}], query={"image": b64(PNGS[2])}))


def test_urls_outside_the_allowed_hosts_are_422_and_never_contacted(client, hosts):
    allowed, other = hosts
    port, other_port = allowed.server_address[1], other.server_address[1]
    rules = f"(--image-url-hosts 127.0.0.1:{port},*.example.invalid)"
    for url, why in [
        (f"{other.base}/png/0", f"host 127.0.0.1:{other_port} is not one this server fetches images from {rules}"),
        (f"http://localhost:{port}/png/0", f"host localhost:{port} is not one"),  # the allowed server under another name
        (f"http://2130706433:{port}/png/0", f"host 2130706433:{port} is not one"),  # 127.0.0.1 spelt as a number
        ("http://127.0.0.1/png/0", "host 127.0.0.1:80 is not one"),  # an entry with a port allows that port only
        ("https://example.invalid/png/0", "host example.invalid:443 is not one"),  # '*.example.invalid' is only below it
        (f"http://user:pw@127.0.0.1:{port}/png/0", "a URL with credentials (user@host) is not fetched"),
        # A scheme without '//': still a URL, so the fetcher's policy answers, not the 'no hosts allowed' refusal.
        (f"http:127.0.0.1:{port}/png/0", "a URL without a host is not fetched (give it as http://host/path)"),
    ]:
        # One allowed URL beside it: nothing is fetched before every URL of the request passed the policy.
        r = rerank(client, [{"image": f"{allowed.base}/png/1"}, "text", {"image": url}])
        refused(r, "documents[2]: ", why, "send its bytes base64-encoded")
    refused(rerank(client, ["text"], query={"image": f"{other.base}/png/0"}), "query: host")
    time.sleep(0.2)  # a fetch the server had started would have landed by now
    assert allowed.hits == [] and other.hits == []


def test_redirects_are_followed_only_to_allowed_hosts_and_a_few_hops(client, hosts):
    allowed, other = hosts
    port = allowed.server_address[1]

    def via(target: str) -> dict:
        return {"image": f"{allowed.base}/redirect?to={urllib.parse.quote(target, safe='')}"}

    want = scores_of(rerank(client, [{"image": b64(PNGS[0])}]))
    assert scores_of(rerank(client, [via("/png/0")])) == want  # relative, same host
    assert scores_of(rerank(client, [{"image": f"{allowed.base}/chain/3"}])) == want
    allowed.hits.clear()
    refused(rerank(client, ["text", via(f"{other.base}/png/0")]), "documents[1]: ", f"redirects to {other.base}/png/0",
            f"host 127.0.0.1:{other.server_address[1]} is not one")
    refused(rerank(client, [via(f"http://localhost:{port}/png/0")]), "documents[0]: ", "host localhost")
    refused(rerank(client, [via("file:///etc/hostname")]), "documents[0]: ", "a file: URL is not fetched")
    refused(rerank(client, [{"image": f"{allowed.base}/chain/4"}]), "documents[0]: ", "redirects more than 3 times")
    time.sleep(0.2)
    assert other.hits == [] and [h for h in allowed.hits if not h.startswith(("/redirect", "/chain/"))] == []
    assert sorted(h for h in allowed.hits if h.startswith("/chain/")) == [f"/chain/{n}" for n in (1, 2, 3, 4)]


def test_an_oversized_body_is_aborted_while_streaming(client, hosts):
    allowed, _ = hosts
    refused(rerank(client, [{"image": f"{allowed.base}/big"}]), "documents[0]: the image at", f"exceeds {MAX_BYTES} bytes")
    allowed.wait_finished("/big")
    # 64 MiB were on offer; the client hung up after --max-image-bytes (what socket buffers held came on top).
    assert allowed.sent["/big"] < 16 * 2**20, allowed.sent
    start = time.monotonic()  # a declared Content-Length over the cap is refused without reading the body
    refused(rerank(client, [{"image": f"{allowed.base}/big-declared"}]), "documents[0]: the image at", "--max-image-bytes")
    assert time.monotonic() - start < URL_TIMEOUT


def test_a_slow_host_is_given_up_at_the_timeout(client, hosts):
    allowed, _ = hosts
    for path in ("/late-headers", "/drip"):
        start = time.monotonic()
        refused(rerank(client, ["text", {"image": f"{allowed.base}{path}"}]), "documents[1]: fetching",
                f"timed out (--image-url-timeout {URL_TIMEOUT:g} s)")
        took = time.monotonic() - start
        # /late-headers: its body read alone could wait a whole timeout more; the request is answered at the timeout.
        assert URL_TIMEOUT * 0.9 < took < URL_TIMEOUT * 1.45, (path, took)
    # The dripping download stopped with the request (the host saw its client go), not after its 10 s.
    allowed.wait_finished("/drip", timeout=5)
    assert allowed.gone_after["/drip"] < URL_TIMEOUT * 1.5, allowed.gone_after


def test_the_request_timeout_bounds_the_downloads(tiny_reranker, hosts):
    allowed, _ = hosts
    settings = ServeSettings(**LIMITS, image_url_hosts=(f"127.0.0.1:{allowed.server_address[1]}",), image_url_http=True,
                             image_url_timeout=30, request_timeout=0.6)
    with running_server(tiny_reranker, settings) as (url, _):
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": [{"image": f"{allowed.base}/drip"}]}, timeout=30)
        took = time.monotonic() - start
        assert r.status_code in (504, 422) and "--request-timeout" in r.json()["detail"], r.text
        assert took < 1.2, took
        allowed.wait_finished("/drip", timeout=5)
        assert allowed.gone_after["/drip"] < 1.2, allowed.gone_after


@pytest.mark.parametrize(("path", "start", "also"), [
    ("/html", "documents[0]: ", "is not an image (Content-Type text/html)"),
    ("/octet", "documents[0] image (bytes) is not an image PIL can read", "send the image file's bytes"),
    ("/missing", "documents[0]: fetching", "answered HTTP 404"),
    ("/gzip", "documents[0]: ", "came gzip-encoded"),
    ("/pixels", "documents[0] image (bytes) is 1001x1000 = 1001000 pixels", "over the limit of 1000000"),
    ("/empty", "documents[0]: ", "an empty body"),
])
def test_what_is_not_an_image_is_a_clean_422(client, hosts, path, start, also):
    refused(rerank(client, [{"image": f"{hosts[0].base}{path}"}]), start, also)


def test_url_images_count_in_max_images_and_cohere_stays_text_only(client, hosts):
    allowed, _ = hosts
    image = {"image": f"{allowed.base}/png/0"}
    refused(rerank(client, [image] * 4, query=image), "documents: 5 images in one request", "--max-images")
    r = client.post("/v2/rerank", json={"query": QUERY, "documents": ["text", image]})
    refused(r, "documents: ", "/v2/rerank (Cohere's API) takes text only")
    time.sleep(0.2)
    assert allowed.hits == []


@pytest.fixture(scope="module")
def tls_host(tmp_path_factory):
    """(an https ImageHost with a self-signed certificate for 127.0.0.1, that certificate's PEM path)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with ImageHost(context) as host:
        yield host, cert


def test_https_is_verified_and_plain_http_needs_its_flag(tiny_reranker, tls_host, hosts):
    host, cert = tls_host
    plain, _ = hosts
    plain.hits.clear()
    allow = (f"127.0.0.1:{host.server_address[1]}", f"127.0.0.1:{plain.server_address[1]}")
    with running_server(tiny_reranker, ServeSettings(**LIMITS, image_url_hosts=allow, image_url_ca=str(cert))) as (url, _), \
            httpx.Client(base_url=url, timeout=60) as c:
        assert scores_of(rerank(c, [{"image": f"{host.base}/png/1"}])) == scores_of(rerank(c, [{"image": b64(PNGS[1])}]))
        refused(rerank(c, [{"image": f"{plain.base}/png/0"}]), "documents[0]: plain http:// URLs are not fetched",
                "--image-url-http")
        redirect = f"{host.base}/redirect?to={urllib.parse.quote(f'{plain.base}/png/0', safe='')}"
        refused(rerank(c, [{"image": redirect}]), "documents[0]: ", "redirects to http://", "plain http://")
    # Without the test CA, the self-signed host is refused: certificates are verified (against certifi's CAs).
    with running_server(tiny_reranker, ServeSettings(**LIMITS, image_url_hosts=allow)) as (url, _):
        r = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": [{"image": f"{host.base}/png/0"}]}, timeout=30)
        refused(r, "documents[0]: fetching", "CERTIFICATE_VERIFY_FAILED")
    time.sleep(0.2)
    assert plain.hits == []


@pytest.mark.parametrize(("entry", "host", "port", "scheme_port", "want"), [
    ("example.com", "example.com", 443, 443, True),
    ("Example.COM.", "example.com", 443, 443, True),
    ("example.com", "example.com", 8443, 443, False),  # no port in the entry: the scheme's own only
    ("example.com", "www.example.com", 443, 443, False),
    ("example.com:8443", "example.com", 8443, 443, True),
    ("example.com:8443", "example.com", 443, 443, False),
    ("*.example.com", "img.example.com", 443, 443, True),
    ("*.example.com", "a.b.example.com", 80, 80, True),
    ("*.example.com", "example.com", 443, 443, False),
    ("*.example.com", "evilexample.com", 443, 443, False),
    ("*.example.com", "example.com.evil.org", 443, 443, False),
    ("[::1]:8080", "::1", 8080, 80, True),
    ("10.0.0.5", "10.0.0.5", 443, 443, True),
])
def test_host_rules(entry, host, port, scheme_port, want):
    assert parse_host_rule(entry).matches(host, port, scheme_port) is want


def test_bad_host_entries_and_flags_without_hosts_fail_at_start(capsys):
    for entry in ("", "*", "*.com", "https://example.com", "example.com/images", "user@example.com", "example.com:99999",
                  "*.*.example.com", "bücher.de", "a b"):
        with pytest.raises(RerankerError, match="--image-url-hosts"):
            ServeSettings(image_url_hosts=(entry,)).check()
    assert parse_host_rule("*.Example.com:8443") == HostRule("example.com", 8443, True)
    for flags, message in ((dict(image_url_http=True), "--image-url-http applies"), (dict(image_url_ca="ca.pem"), "--image-url-ca"),
                           (dict(image_url_hosts=("a.example",), image_url_timeout=0), "--image-url-timeout")):
        with pytest.raises(RerankerError, match=message):
            ServeSettings(**flags).check()
    from reranker.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--image-url-hosts HOST[,HOST...]", "--image-url-http", "--image-url-timeout", "--image-url-ca PEM"):
        assert flag in out
    assert main(["serve", "-m", "no-such-model.gguf", "--image-url-hosts", "a.example,*.b.example", "--image-url-ca", "no-ca.pem"]) == 2
    assert "CA file not found: no-ca.pem" in capsys.readouterr().err
    assert main(["serve", "-m", "no-such-model.gguf", "--image-url-hosts", "a.example,https://b.example"]) == 2
    assert "'https://b.example' is not a host" in capsys.readouterr().err


@pytest.mark.slow  # a real process
def test_serve_command_fetches_from_its_image_url_hosts(tiny_ggufs, hosts, tmp_path):
    from helpers import serve_process

    allowed, other = hosts
    rules = f"*.example.invalid,127.0.0.1:{allowed.server_address[1]}"
    log = tmp_path / "serve.log"
    with serve_process(tiny_ggufs["f32"], log, "--image-url-hosts", rules, "--image-url-http", "--image-url-timeout", "5") as (_, url), \
            httpx.Client(base_url=url, timeout=60) as c:
        assert f"image URLs from {rules})" in log.read_text()
        assert scores_of(rerank(c, [{"image": f"{allowed.base}/png/0"}])) == scores_of(rerank(c, [{"image": b64(PNGS[0])}]))
        refused(rerank(c, [{"image": f"{other.base}/png/0"}]), "documents[0]: host 127.0.0.1:")
    assert allowed.hits == ["/png/0"] and other.hits == []
