"""Image queries and documents through `reranker serve` (uvicorn on a real loopback socket, httpx as the client).

Scores are compared with `Reranker.compute_score` on the same images (the tiny F32 model with the F16 projector
`reranker convert` wrote beside it; tests/api/test_images.py checks those against transformers). What a request
may not do is shown on real files and a real HTTP server: a path is never opened (a PNG at that path would score,
and its atime would move) and a URL is never fetched (the server records every hit).
"""

from __future__ import annotations

import base64
import http.server
import os
import shutil
import threading
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
from helpers import picture, png_bytes, running_server, serve_process

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from reranker.serve.settings import MAX_IMAGE_PIXELS, ServeSettings  # noqa: E402

QUERY = "a chart of the quarterly sales"
TOL = 1e-5
PNGS = [png_bytes(picture(300, 60, 1)), png_bytes(picture(56, 200, 2)), png_bytes(picture(40, 30, 0))]
SETTINGS = ServeSettings(max_images=4, max_image_bytes=200_000, max_image_pixels=1_000_000, max_request_bytes=2**20)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


@pytest.fixture(scope="module")
def server(tiny_reranker):
    with running_server(tiny_reranker, SETTINGS) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def scores_of(response: httpx.Response) -> dict[int, float]:
    assert response.status_code == 200, response.text
    return {x["index"]: x["relevance_score"] for x in response.json()["results"]}


def test_image_documents_mixed_with_text_equal_compute_score(client, tiny_reranker):
    docs = [{"image": b64(PNGS[0])}, "plain text about sales", {"image": data_uri(PNGS[1])},
            {"text": "a text document"}, {"image": b64(PNGS[2])}]
    r = client.post("/v1/rerank", json={"model": "jina-reranker-m0", "query": QUERY, "documents": docs})
    got = scores_of(r)
    want = tiny_reranker.compute_score([[QUERY, {"image": PNGS[0]}], [QUERY, docs[1]], [QUERY, {"image": PNGS[1]}],
                                        [QUERY, docs[3]], [QUERY, {"image": PNGS[2]}]])
    assert got == pytest.approx(dict(enumerate(want)), abs=TOL)
    images = [got[0], got[2], got[4]]
    assert np.ptp(images) > 1e-4, "the images should score apart, else the comparison proves little"
    # Image tokens count as the prompt's tokens (the usage and the scheduler's batches alike).
    assert r.json()["usage"]["total_tokens"] == tiny_reranker.last_usage.tokens
    assert tiny_reranker.last_usage.tokens > sum(len(tiny_reranker.prompt_builder().build(QUERY, "").ids) for _ in docs) + 30
    # `document` echoes what was sent (images as their base64 or data: URI), and only with return_documents.
    for x in r.json()["results"]:
        sent = docs[x["index"]]
        assert x["document"] == (sent if isinstance(sent, dict) else {"text": sent})
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "return_documents": False, "top_n": 2})
    assert [set(x) for x in r.json()["results"]] == [{"index", "relevance_score"}] * 2


def test_an_image_query_is_projected_once_and_equals_compute_score(client, tiny_reranker, monkeypatch):
    vision = tiny_reranker.vision
    calls = []

    def counted(image):
        calls.append(image.name)
        return type(vision).encode(vision, image)

    monkeypatch.setattr(vision, "encode", counted)
    texts = ["a text document about sales", "Bananas are yellow.", "quarterly revenue rose"]
    r = client.post("/v1/rerank", json={"query": {"image": b64(PNGS[1])}, "documents": [*texts, {"image": data_uri(PNGS[0])}]})
    got = scores_of(r)
    query = {"image": PNGS[1]}
    want = tiny_reranker.compute_score([[query, t] for t in texts] + [[query, {"image": PNGS[0]}]])
    assert got == pytest.approx(dict(enumerate(want)), abs=TOL)
    # The request's 4 prompts share its query image: projected once, beside the image document; so does
    # compute_score, whose pairs share the query's bytes object.
    assert sorted(set(calls[:2])) == ["documents[3] image", "query image"] and len(calls) == 2 + 2


def test_images_beside_chunked_text_documents(client, tiny_reranker):
    """With `chunking`, a long text document is scored chunk by chunk and an image document as its one prompt."""
    long_doc = " ".join(f"passage {i} about quarterly sales and 检索." for i in range(360))  # > 4096 tokens
    docs = [{"image": b64(PNGS[0])}, long_doc, {"image": b64(PNGS[2])}]
    want = tiny_reranker.compute_score([[QUERY, {"image": PNGS[0]}], [QUERY, long_doc], [QUERY, {"image": PNGS[2]}]],
                                       chunking=True)
    assert tiny_reranker.last_usage.chunks == [1, tiny_reranker.last_usage.chunks[1], 1] and tiny_reranker.last_usage.chunks[1] > 1
    got = scores_of(client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "chunking": True}))
    assert got == pytest.approx(dict(enumerate(want)), abs=TOL)


@pytest.fixture
def untouched_png(tmp_path):
    """(a PNG's path, a check that it was not read since): its atime set before its mtime, so a read moves it
    (relatime too); where the file system keeps no atime (noatime), the check only says so."""
    path = tmp_path / "page.png"
    path.write_bytes(PNGS[0])
    st = os.stat(path)
    os.utime(path, ns=(st.st_mtime_ns - 3600 * 10**9, st.st_mtime_ns))
    before = os.stat(path).st_atime_ns

    def not_read() -> None:
        assert os.stat(path).st_atime_ns == before, f"{path} was read"
        path.read_bytes()  # the check can see a read here (else it proves nothing on this file system)
        if os.stat(path).st_atime_ns == before:
            pytest.skip("this file system records no atime; the 422s above still show no path was scored")

    return path, not_read


def test_a_path_or_file_uri_is_refused_and_never_read(client, untouched_png, tmp_path, monkeypatch):
    path, not_read = untouched_png
    # A file named like base64 ("AAAA" decodes to 3 zero bytes) in the server's working directory: a server that
    # tried strings as paths would score it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "AAAA").write_bytes(PNGS[0])
    for body, where, message in [
        ({"query": QUERY, "documents": ["text", {"image": str(path)}]}, "documents[1]", "neither a data: URI nor valid base64"),
        ({"query": {"image": str(path)}, "documents": ["text"]}, "query", "neither a data: URI nor valid base64"),
        ({"query": QUERY, "documents": [{"image": f"file://{path}"}]}, "documents[0]", "a file: URI is not an image"),
        ({"query": QUERY, "documents": [{"image": "AAAA"}]}, "documents[0] image (bytes)", "not an image PIL can read"),
        ({"query": QUERY, "documents": [{"pdf": str(path), "page": 1}]}, "documents.0", "exactly one of"),
    ]:
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"].startswith(where) and message in r.json()["detail"], r.text
    not_read()
    assert (tmp_path / "AAAA").read_bytes() == PNGS[0]


class Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        Recorder.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNGS[0])))
        self.end_headers()
        self.wfile.write(PNGS[0])

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host():
    """(base URL, hits): a real HTTP server on loopback that serves a PNG at any path and records each request."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Recorder.hits = []
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", Recorder.hits
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()


def test_urls_are_refused_and_never_fetched(client, image_host):
    base, hits = image_host
    assert httpx.get(f"{base}/control.png").content == PNGS[0] and hits == ["/control.png"]  # the recorder sees a fetch
    hits.clear()
    for body, where in [
        ({"query": QUERY, "documents": ["text", {"image": f"{base}/doc.png"}]}, "documents[1]"),
        ({"query": {"image": f"{base}/query.png"}, "documents": ["text"]}, "query"),
        ({"query": QUERY, "documents": [{"image": f"HTTP://{base[7:]}/upper.png"}]}, "documents[0]"),
        ({"query": QUERY, "documents": [{"image": f"https://{base[7:]}/tls.png"}]}, "documents[0]"),
        ({"query": QUERY, "documents": [{"image": f"http:{base[7:]}/no-slashes.png"}]}, "documents[0]"),
    ]:
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(f"{where}: image URLs are not fetched"), r.text
    time.sleep(0.2)  # a fetch started by the server would have landed by now
    assert hits == []


LIMITS = [
    # More images than --max-images: refused before any is decoded (these are not even base64).
    ({"query": {"image": "!"}, "documents": [{"image": "!"}] * 4}, "documents: 5 images in one request", "--max-images"),
    ({"query": QUERY, "documents": ["t", {"image": b64(b"x" * 200_001)}]}, "documents[1]: an image of about 200001 bytes",
     "--max-image-bytes"),
    ({"query": QUERY, "documents": [{"image": data_uri(png_bytes(Image.new("L", (1001, 1000))))}]},
     "documents[0] image (data: URI) is 1001x1000 = 1001000 pixels", "over the limit of 1000000"),
    ({"query": QUERY, "documents": [{"image": "not base64!"}]}, "documents[0]: the image is neither a data: URI nor valid base64",
     "base64-encoded"),
    ({"query": QUERY, "documents": [{"image": b64(PNGS[0])[:-2] + "\n" + b64(PNGS[0])[-2:]}]}, "documents[0]: the image is neither",
     "base64"),
    ({"query": QUERY, "documents": ["t", {"image": b64(b"hello, world")}]}, "documents[1] image (bytes) is not an image PIL can read",
     "send the image file's bytes base64-encoded"),
    ({"query": QUERY, "documents": [{"image": b64(PNGS[0][:200])}]}, "documents[0] image (bytes)", "truncated or corrupt"),
    ({"query": QUERY, "documents": [{"image": "data:text/plain;base64," + b64(b"hi")}]}, "documents[0] image (data: URI) has media type",
     "not an image"),
    ({"query": QUERY, "documents": [{"image": ""}]}, "documents[0]: the image is empty", "base64"),
    ({"query": QUERY, "documents": [{"image": 7}]}, "documents.0.image", "string"),
]


@pytest.mark.parametrize(("body", "start", "also"), LIMITS)
def test_bad_and_oversized_images_are_422_naming_the_document(client, body, start, also):
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(start) and also in detail, detail
    assert "local path" not in detail and "PIL.Image" not in detail  # no fix a client cannot use


def test_image_loading_stops_at_the_request_timeout(tiny_reranker, monkeypatch):
    """Images are loaded in the request's thread, which stops between two images once the request is answered 504."""
    import reranker.serve.prepare as prepare

    loaded = []

    def slow_load(*args, **kwargs):  # the real load, made slow enough that 20 images outlast the timeout
        time.sleep(0.1)
        loaded.append(1)
        return real_load(*args, **kwargs)

    real_load = prepare.load
    monkeypatch.setattr(prepare, "load", slow_load)
    with running_server(tiny_reranker, ServeSettings(request_timeout=0.5, max_images=20)) as (url, _):
        r = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": [{"image": b64(PNGS[2])}] * 20}, timeout=30)
        assert r.status_code == 504, r.text
        time.sleep(1.0)  # the 10 images left would take as long again
        stopped = len(loaded)
        time.sleep(0.5)
    assert 1 <= stopped == len(loaded) < 10, (stopped, len(loaded))


def test_images_decoded_at_once_stay_within_the_pixel_budget(tiny_reranker, monkeypatch):
    """Decoding takes ~11 bytes a pixel: 12 requests at once, one large image each, took 5.3 GB. The server's
    PixelBudget lets an image in while the pixels being decoded fit (here one large image, beside small ones),
    and a request waiting for room stops at its deadline (504) without decoding afterwards."""
    import reranker.serve.prepare as prepare
    from reranker.images.load import header_pixels

    lock, now, peak = threading.Lock(), [0, 0], [0, 0]

    def watched_load(image, *args, **kwargs):  # the real load, slowed so that requests overlap
        pixels = header_pixels(image.source)
        with lock:
            now[0], now[1] = now[0] + pixels, now[1] + 1
            peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
        try:
            time.sleep(0.3)
            return real_load(image, *args, **kwargs)
        finally:
            with lock:
                now[0], now[1] = now[0] - pixels, now[1] - 1

    real_load = prepare.load
    monkeypatch.setattr(prepare, "load", watched_load)
    big, small = png_bytes(picture(1000, 900, 3)), PNGS[2]  # 900,000 and 1,200 pixels
    settings = ServeSettings(max_images=4, max_image_bytes=2**22, max_image_pixels=1_000_000,
                             max_decoding_pixels=1_000_000)
    with running_server(tiny_reranker, settings) as (url, _):
        def post(image: bytes) -> int:
            body = {"query": QUERY, "documents": [{"image": b64(image)}]}
            return httpx.post(f"{url}/v1/rerank", json=body, timeout=60).status_code

        threads = [threading.Thread(target=lambda img=img: codes.append(post(img))) for img in [big] * 4 + [small] * 4]
        codes: list[int] = []
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 8
        assert 900_000 <= peak[0] <= 1_000_000, peak  # never two large images at once ...
        assert peak[1] >= 2, peak  # ... while small ones went in beside one

    calls = []

    def slower_load(image, *args, **kwargs):  # holds the budget past both requests' deadlines
        calls.append(time.monotonic())
        time.sleep(2.5)
        return real_load(image, *args, **kwargs)

    monkeypatch.setattr(prepare, "load", slower_load)
    with running_server(tiny_reranker, replace(settings, request_timeout=1.0)) as (url, _):
        codes = []
        first = threading.Thread(target=lambda: codes.append(post(big)))
        first.start()
        while not calls:
            time.sleep(0.01)
        assert post(big) == 504  # it waited for room until its deadline
        first.join()
        time.sleep(0.5)  # the budget is free now: a request still waiting would load
        assert codes == [504] and len(calls) == 1, (codes, calls)


def test_without_a_projector_image_requests_get_400_and_text_still_works(tiny_ggufs, tmp_path):
    from reranker import Reranker

    gguf = tiny_ggufs["f32"]
    shutil.copy(gguf, tmp_path / gguf.name)
    shutil.copy(gguf.parent / "mlp_weights.npz", tmp_path / "mlp_weights.npz")
    with Reranker.from_pretrained(str(tmp_path / gguf.name), device="cpu", n_ctx=512) as rr, \
            running_server(rr, ServeSettings()) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        assert len(scores_of(c.post("/v1/rerank", json={"query": QUERY, "documents": ["text"]}))) == 1
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": ["text", {"image": b64(PNGS[0])}]})
        assert r.status_code == 400
        assert r.json()["detail"].startswith("documents[1] is an image, and this server has no vision projector: start it with --mmproj")
        assert rr._vision is None  # nothing was loaded for it


def test_serve_documents_its_image_flags_and_checks_them(capsys):
    from reranker.cli import main
    from reranker.images.load import MAX_PIXELS

    assert MAX_IMAGE_PIXELS == MAX_PIXELS  # settings restate the library's limit so that they load without PIL
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--mmproj PATH", "--max-images", "--max-image-bytes", "--max-image-pixels",
                 "URLs fetched only from --image-url-hosts"):
        assert flag in out
    # A missing --mmproj is named before the model is even looked for.
    assert main(["serve", "-m", "no-such-model.gguf", "--mmproj", "no-such-mmproj.gguf"]) == 2
    assert "mmproj file not found: no-such-mmproj.gguf" in capsys.readouterr().err
    for field, value in (("max_image_pixels", MAX_PIXELS + 1), ("max_image_bytes", 0), ("max_images", -1)):
        with pytest.raises(Exception, match=field if field != "max_image_pixels" else "--max-image-pixels"):
            ServeSettings(**{field: value}).check()


@pytest.mark.slow  # a real process
def test_serve_command_loads_mmproj_at_start_and_scores_images(tiny_ggufs, tiny_reranker, tmp_path, capsys):
    from reranker.cli import main

    gguf = tiny_ggufs["f32"]
    alone = tmp_path / "alone"  # the GGUF without a projector beside it: images come from --mmproj only
    alone.mkdir()
    shutil.copy(gguf, alone / gguf.name)
    shutil.copy(gguf.parent / "mlp_weights.npz", alone / "mlp_weights.npz")
    mmproj = next(gguf.parent.glob("mmproj-*.gguf"))
    log = tmp_path / "serve.log"
    with serve_process(alone / gguf.name, log, "--mmproj", str(mmproj)) as (_, url):
        assert f"images on ({mmproj.name})" in log.read_text()
        docs = [{"image": data_uri(PNGS[0])}, "a text document", {"image": b64(PNGS[1])}]
        got = scores_of(httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": docs}, timeout=60))
        want = tiny_reranker.compute_score([[QUERY, {"image": PNGS[0]}], [QUERY, docs[1]], [QUERY, {"image": PNGS[1]}]])
        assert got == pytest.approx(dict(enumerate(want)), abs=TOL)
    # A file that is no projector stops the command at start, in one line, before it listens.
    assert main(["serve", "-m", str(alone / gguf.name), "--port", "0", "--n-ctx", "512",
                 "--mmproj", str(alone / "mlp_weights.npz")]) == 2
    err = capsys.readouterr().err
    assert "mlp_weights.npz is not a GGUF file" in err and "listening" not in err
