"""`reranker serve` through real HTTP on loopback (uvicorn on a real socket, httpx as the client).

Scores are compared with `Reranker.compute_score` on the tiny F32 model: within 1e-5 where the
server packs a request with others (a pair's score may move with its batch neighbours), and
exactly where the layout is the same (one request alone, in the engine's length order).
To hold work in the queue, a test takes the backbone's lock: the scheduler's worker then
blocks in its next decode, as it would behind a long batch.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import PAIRS
from helpers import running_server, serve_process

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from reranker.serve.settings import API_KEY_ENV, ServeSettings  # noqa: E402

QUERY = "what is a reranker?"
DOCS = [d for _, d in PAIRS]
TOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_reranker):
    with running_server(tiny_reranker, ServeSettings(max_documents=16, max_request_bytes=64 * 1024)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c


@contextlib.contextmanager
def model_busy(reranker):
    """Hold the backbone's lock: the scheduler's next decode waits until the block ends."""
    lock = reranker.backbone._lock
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def wait_until(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def in_background(fn, *args):
    """Run `fn(*args)` in a thread; the returned function joins it and gives its result (or raises)."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def result(timeout: float = 60):
        t.join(timeout)
        assert not t.is_alive(), "the background request did not finish"
        if "error" in out:
            raise out["error"]
        return out["value"]

    return result


# --- the two API shapes --------------------------------------------------------------------------


def test_jina_shape_and_scores_equal_compute_score(client, tiny_reranker):
    r = client.post("/v1/rerank", json={"model": "jina-reranker-m0", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "usage", "results"} and body["model"] == "jina-reranker-m0"
    want = tiny_reranker.compute_score([[QUERY, d] for d in DOCS])
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCS)))
    for x in results:
        assert set(x) == {"index", "relevance_score", "document"}
        assert x["document"] == {"text": DOCS[x["index"]]}
        assert x["relevance_score"] == pytest.approx(want[x["index"]], abs=TOL)
    got = [x["relevance_score"] for x in results]
    assert got == sorted(got, reverse=True), "results must be best first"
    assert np.std(got) > 0.01, "scores should spread, else the comparison proves little"
    builder = tiny_reranker.prompt_builder()
    assert body["usage"]["total_tokens"] == sum(len(builder.build(QUERY, d).ids) for d in DOCS)


def test_one_request_alone_is_bit_equal_at_the_same_layout(client, tiny_reranker):
    """Alone in its batch, a request is decoded in the engine's length order: compute_score on the
    pairs in that order, in one batch, has the same layout and so the same bits."""
    builder = tiny_reranker.prompt_builder()
    lengths = np.array([len(builder.build(QUERY, d).ids) for d in DOCS])
    order = np.argsort(-lengths, kind="stable")
    want = dict(zip(order.tolist(), tiny_reranker.compute_score([[QUERY, DOCS[i]] for i in order], batch_size=len(DOCS))))
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == want


def test_cohere_shape_and_scores(client, tiny_reranker):
    docs = DOCS[:7]
    r = client.post("/v2/rerank", json={"model": "rerank-v3.5", "query": QUERY, "documents": docs, "top_n": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "results", "meta"} and isinstance(body["id"], str) and body["id"]
    want = tiny_reranker.compute_score([[QUERY, d] for d in docs])
    best = sorted(range(len(docs)), key=lambda i: -want[i])[:3]
    assert [x["index"] for x in body["results"]] == best
    for x in body["results"]:
        assert set(x) == {"index", "relevance_score"}
        assert x["relevance_score"] == pytest.approx(want[x["index"]], abs=TOL)
    builder = tiny_reranker.prompt_builder()
    assert body["meta"]["billed_units"] == {"search_units": 1}
    assert body["meta"]["tokens"] == {"input_tokens": sum(len(builder.build(QUERY, d).ids) for d in docs), "output_tokens": 0}
    assert body["meta"]["api_version"]["version"] == "2"


def test_top_n_return_documents_and_text_objects(client, tiny_reranker):
    docs = DOCS[:6]
    r = client.post("/v1/rerank", json={"query": {"text": QUERY}, "documents": [{"text": d} for d in docs],
                                        "top_n": 2, "return_documents": False})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    want = tiny_reranker.compute_score([[QUERY, d] for d in docs])
    assert [x["index"] for x in results] == sorted(range(6), key=lambda i: -want[i])[:2]
    assert all(set(x) == {"index", "relevance_score"} for x in results)
    # top_n beyond the documents gives them all, as the hosted APIs do.
    assert len(client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "top_n": 99}).json()["results"]) == 6


def test_what_clients_send_beside_the_spec_is_read_or_refused_by_name(client, tiny_reranker):
    docs = DOCS[:3]
    want = {i: pytest.approx(x, abs=TOL) for i, x in enumerate(tiny_reranker.compute_score([[QUERY, d] for d in docs]))}
    # Cohere's v1 {"text"} objects on v2 (LiteLLM, older SDKs); a null return_documents as a null top_n: the default.
    r = client.post("/v2/rerank", json={"query": QUERY, "documents": [{"text": d} for d in docs]})
    assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == want
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "return_documents": None, "top_n": None})
    assert r.status_code == 200 and all(x["document"]["text"] == docs[x["index"]] for x in r.json()["results"]), r.text
    # A UTF-8 byte-order mark before the JSON (RFC 8259: a parser may ignore it).
    body = json.dumps({"query": QUERY, "documents": docs}).encode()
    r = client.post("/v1/rerank", content=b"\xef\xbb\xbf" + body, headers={"content-type": "application/json"})
    assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == want
    # A compressed body is refused, never decompressed (a few KB of gzip can expand to gigabytes).
    r = client.post("/v1/rerank", content=gzip.compress(body), headers={"content-type": "application/json",
                                                                        "content-encoding": "gzip"})
    assert r.status_code == 415 and r.json()["detail"] == "Content-Encoding 'gzip' is not accepted; send the JSON body uncompressed"


def test_max_tokens_per_doc_cuts_documents(client, tiny_reranker):
    long_doc = " ".join(["relevance ranking of long documents"] * 200)
    docs = [long_doc, DOCS[0]]
    r = client.post("/v2/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 40})
    assert r.status_code == 200, r.text
    base = len(tiny_reranker.prompt_builder().build(QUERY, "").ids)
    full = len(tiny_reranker.prompt_builder().build(QUERY, long_doc).ids)
    cut = r.json()["meta"]["tokens"]["input_tokens"] - len(tiny_reranker.prompt_builder().build(QUERY, DOCS[0]).ids)
    assert cut <= base + 40 < full
    want = tiny_reranker.compute_score([[QUERY, d] for d in docs], max_length=base + 40)
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert got == pytest.approx(dict(enumerate(want)), abs=TOL)


def test_chunking_field_scores_long_documents_as_compute_score_does(client, tiny_reranker):
    """The `chunking` extension field: a document longer than max_length is scored chunk by chunk and
    aggregated, as `compute_score(chunking=...)` does; `false` (or no field) truncates as before."""
    from reranker import Chunking

    long_doc = " ".join(f"passage {i} about rerankers, retrieval and 检索." for i in range(400))  # 6.7k tokens: > n_ctx 4096
    docs = [DOCS[0], long_doc]
    pairs = [[QUERY, d] for d in docs]
    for field, chunking in [({"size": 512, "overlap": 64, "aggregate": "mean"}, Chunking(512, 64, aggregate="mean")),
                            (True, Chunking()), (False, None)]:
        want = tiny_reranker.compute_score(pairs, chunking=chunking)
        if chunking is not None:
            assert tiny_reranker.last_usage.chunks[1] > 1  # the long document was chunked
        for path in ("/v1/rerank", "/v2/rerank"):
            r = client.post(path, json={"query": QUERY, "documents": docs, "chunking": field})
            assert r.status_code == 200, r.text
            got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            assert got == pytest.approx(dict(enumerate(want)), abs=TOL)
    truncated = tiny_reranker.compute_score(pairs)
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": docs})
    assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(dict(enumerate(truncated)), abs=TOL)


# --- errors ---------------------------------------------------------------------------------------

ERRORS = [
    ("/v1/rerank", b'{"query": "q", "documents": ["a"', 400, "not valid JSON"),
    ("/v1/rerank", b"", 400, "not valid JSON"),
    ("/v1/rerank", b"\xff\xfe not utf-8", 400, "not valid JSON"),
    ("/v1/rerank", [1, 2], 422, "body"),
    ("/v1/rerank", {"documents": ["a"]}, 422, "query"),
    ("/v1/rerank", {"query": "q", "documents": []}, 422, "documents"),
    ("/v1/rerank", {"query": "q", "documents": "just one string"}, 422, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a", 7]}, 422, "documents.1"),
    ("/v1/rerank", {"query": "q", "documents": ["a", {"image": "http://x/y.png"}]}, 422, "documents[1]: image URLs are not fetched"),
    ("/v1/rerank", {"query": "q", "documents": ["a", {"text": "a", "image": "aGk="}]}, 422, "documents.1: an object here needs exactly one"),
    ("/v2/rerank", {"query": "q", "documents": ["a", {"image": "aGk="}]}, 422, "documents[1] is an image: /v2/rerank (Cohere's API) takes text only"),
    ("/v2/rerank", {"query": {"image": "aGk="}, "documents": ["a"]}, 422, "the query is an image"),
    ("/v1/rerank", {"query": "q", "documents": ["a", {"txt": "a"}]}, 422, "documents.1"),
    ("/v1/rerank", {"query": 5, "documents": ["a"]}, 422, "query"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "3"}, 422, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "yes"}, 422, "return_documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"] * 17}, 422, "documents: 17 documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a", "lone \ud800 surrogate"]}, 400, "not valid JSON"),  # no UTF-8 form
    ("/v1/rerank", {"query": "q", "documents": ["x" * 70000]}, 413, "exceeds 65536 bytes"),
    ("/v2/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 422, "documents.0"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, 422, "max_tokens_per_doc"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 422, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "chunking": "yes"}, 422, "chunking: must be true, false or an object"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "chunking": {"size": 4}}, 422, "chunking.size"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "chunking": {"aggregate": "median"}}, 422, "chunking.aggregate"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "chunking": {"sise": 64}}, 422, "chunking.sise"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "chunking": {"size": 64, "overlap": 64}}, 422, "chunking: chunk overlap 64"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), ERRORS)
def test_bad_requests_get_a_status_and_a_message_naming_the_field(client, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_bad_requests_do_not_disturb_good_ones(server, tiny_reranker):
    want = tiny_reranker.compute_score([[QUERY, d] for d in DOCS[:5]])

    def good():
        with httpx.Client(base_url=server[0], timeout=30) as c:
            return [c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:5]}) for _ in range(5)]

    def bad():
        with httpx.Client(base_url=server[0], timeout=30) as c:
            return [c.post(p, content=b if isinstance(b, bytes) else json.dumps(b).encode()) for p, b, _, _ in ERRORS]

    jobs = [in_background(good), in_background(bad), in_background(good), in_background(bad)]
    for i, job in enumerate(jobs):
        for r in job():
            if i % 2 == 0:
                assert r.status_code == 200, r.text
                got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
                assert got == pytest.approx(dict(enumerate(want)), abs=TOL)
            else:
                assert r.status_code in (400, 413, 422)


# --- auth, health, models, metrics ------------------------------------------------------------------


def test_api_key_is_checked_on_every_endpoint_but_health(tiny_reranker):
    with running_server(tiny_reranker, ServeSettings(api_key="s3cret")) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        body = {"query": QUERY, "documents": DOCS[:2]}
        assert c.get("/health").status_code == 200
        for method, path, kw in (("POST", "/v1/rerank", {"json": body}), ("POST", "/v2/rerank", {"json": body}),
                                 ("GET", "/v1/models", {}), ("GET", "/metrics", {})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
                r = c.request(method, path, headers=headers, **kw)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers, r.text)
                assert "API key" in r.json()["detail"]
            r = c.request(method, path, headers={"Authorization": "Bearer s3cret"}, **kw)
            assert r.status_code == 200, (path, r.text)


def test_more_than_100_documents_up_to_max_documents(tiny_reranker):
    """The hosted APIs' 100-document unit is billing only: a request may carry up to --max-documents (1024)."""
    docs = [f"document {i}: " + DOCS[i % len(DOCS)] for i in range(1025)]
    with running_server(tiny_reranker) as (url, _), httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v2/rerank", json={"query": QUERY, "documents": docs[:250]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert sorted(x["index"] for x in body["results"]) == list(range(250))
        assert body["meta"]["billed_units"] == {"search_units": 3}
        want = tiny_reranker.compute_score([[QUERY, d] for d in docs[:250]])
        assert {x["index"]: x["relevance_score"] for x in body["results"]} == pytest.approx(dict(enumerate(want)), abs=TOL)
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": docs})
        assert r.status_code == 422 and "1025 documents" in r.json()["detail"] and "--max-documents" in r.json()["detail"]


def test_cohere_sdk_against_v2_rerank(tiny_reranker):
    """README's Cohere example, run with the official SDK (`cohere.ClientV2`) against a keyed server."""
    cohere = pytest.importorskip("cohere")
    docs = ["We present ReaderLM-v2", "Bananas"]
    with running_server(tiny_reranker, ServeSettings(api_key="s3cret")) as (url, _):
        co = cohere.ClientV2(api_key="s3cret", base_url=url)
        res = co.rerank(model="jina-reranker-m0", query="slm markdown", documents=docs, top_n=1)
        want = tiny_reranker.compute_score([["slm markdown", d] for d in docs])
        assert [x.index for x in res.results] == [int(np.argmax(want))]
        assert res.results[0].relevance_score == pytest.approx(max(want), abs=TOL)
        assert res.meta.billed_units.search_units == 1
        res = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, max_tokens_per_doc=512)
        want = tiny_reranker.compute_score([[QUERY, d] for d in DOCS])
        assert {x.index: x.relevance_score for x in res.results} == pytest.approx(dict(enumerate(want)), abs=TOL)
        with pytest.raises(cohere.core.ApiError) as refused:
            cohere.ClientV2(api_key="wrong", base_url=url).rerank(model="m", query="q", documents=["d"])
        assert refused.value.status_code == 401


def test_without_a_key_every_endpoint_is_open(client):
    assert client.get("/health").json() == {"status": "ok", "model": "jina-reranker-m0"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["jina-reranker-m0"]
    assert client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:1]}).status_code == 200


def test_metrics_count_requests_pairs_tokens_and_batches(client):
    before = client.get("/metrics").text
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:4]})
    client.post("/v1/rerank", json={"query": QUERY, "documents": []})
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert metric(text, "reranker_pairs_total") - metric(before, "reranker_pairs_total") == 4
    assert metric(text, "reranker_tokens_total") - metric(before, "reranker_tokens_total") == r.json()["usage"]["total_tokens"]
    for name in ('reranker_requests_total{code="200",endpoint="/v1/rerank"}', 'reranker_requests_total{code="422",endpoint="/v1/rerank"}',
                 'reranker_request_seconds_count{endpoint="/v1/rerank"}', "reranker_batch_pairs_count", "reranker_batch_tokens_count",
                 "reranker_batch_seconds_count"):
        assert metric(text, name) >= 1, name
    assert metric(text, "reranker_queue_pairs") == 0 and metric(text, "reranker_requests_in_flight") == 0


# --- batching, overload, timeouts, disconnects -------------------------------------------------------


def test_concurrent_requests_share_batches(server, tiny_reranker):
    url, app = server
    sched = app.state.scheduler
    post = lambda docs: httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": docs}, timeout=30)
    metrics = lambda: httpx.get(f"{url}/metrics").text
    before = metric(metrics(), "reranker_batch_pairs_count")
    with model_busy(tiny_reranker):
        first = in_background(post, DOCS[:1])
        wait_until(lambda: sched.scoring == 1, "the first request is being decoded")
        second, third = in_background(post, DOCS[1:4]), in_background(post, DOCS[4:9])
        wait_until(lambda: sched.pending == 8, "both later requests are queued")
    responses = [first(), second(), third()]
    assert metric(metrics(), "reranker_batch_pairs_count") - before == 2, "the two queued requests should share one batch"
    for r, docs in zip(responses, (DOCS[:1], DOCS[1:4], DOCS[4:9])):
        want = tiny_reranker.compute_score([[QUERY, d] for d in docs])
        assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(dict(enumerate(want)), abs=TOL)


def test_a_full_queue_answers_503_with_retry_after(tiny_reranker):
    with running_server(tiny_reranker, ServeSettings(max_queue=4, retry_after=2)) as (url, app):
        sched = app.state.scheduler
        post = lambda docs: httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": docs}, timeout=30)
        with model_busy(tiny_reranker):
            first = in_background(post, DOCS[:1])
            wait_until(lambda: sched.scoring == 1, "the first request is being decoded")
            second = in_background(post, DOCS[1:5])
            wait_until(lambda: sched.pending == 4, "the second request fills the queue")
            r = post(DOCS[5:6])
            assert r.status_code == 503 and r.headers["retry-after"] == "2" and "overloaded" in r.json()["detail"]
        assert first().status_code == 200 and second().status_code == 200
        assert post(DOCS[5:6]).status_code == 200, "once the queue drains, requests are taken again"


def test_caps_on_characters_prompts_and_chunks_are_checked_before_queueing(tiny_reranker):
    """Per-request caps: characters per query and document (before tokenising), prompts per request (each chunk
    one, before queueing), and a request's chunking.max_chunks cut to the server's; each refusal names its field."""
    from reranker import Chunking

    settings = ServeSettings(max_document_chars=50_000, max_query_chars=100, max_prompts=10, max_chunks=3)
    doc = " ".join(f"passage {i} about rerankers, retrieval and 检索." for i in range(900))  # > max_length: chunked
    with running_server(tiny_reranker, settings) as (url, app):
        post = lambda body: httpx.post(f"{url}/v1/rerank", json=body, timeout=30)
        pairs = lambda: metric(httpx.get(f"{url}/metrics").text, "reranker_pairs_total")
        for body, field, flag in (({"query": QUERY, "documents": [DOCS[0], "x" * 50_001]}, "documents[1]", "--max-document-chars"),
                                  ({"query": "q" * 101, "documents": [DOCS[0]]}, "query", "--max-query-chars"),
                                  ({"query": QUERY, "documents": [doc] * 4, "chunking": {"size": 8}}, "documents", "--max-prompts"),
                                  ({"query": QUERY, "documents": DOCS[:11]}, "documents", "--max-prompts")):
            r = post(body)
            assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: ") and flag in r.json()["detail"], r.text
        assert pairs() == 0, "a refused request is never scored"
        # the chunking bomb of issue 21: max_chunks of a billion becomes the server's 3
        r = post({"query": QUERY, "documents": [doc, DOCS[0]], "chunking": {"size": 8, "max_chunks": 1_000_000_000}})
        assert r.status_code == 200, r.text
        assert pairs() == 3 + 1
        want = tiny_reranker.compute_score([[QUERY, doc], [QUERY, DOCS[0]]], chunking=Chunking(size=8, max_chunks=3))
        assert tiny_reranker.last_usage.capped == 1
        assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(dict(enumerate(want)), abs=TOL)
    # a request may not be larger than the queue: it could never be queued beside another
    assert ServeSettings(max_queue=4).prompt_cap == (4, "--max-queue")


def test_a_request_past_its_timeout_gets_504_and_its_work_is_dropped(tiny_reranker):
    with running_server(tiny_reranker, ServeSettings(request_timeout=0.5)) as (url, app):
        sched = app.state.scheduler
        post = lambda docs: httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": docs}, timeout=30)
        with model_busy(tiny_reranker):
            first = in_background(post, DOCS[:1])
            wait_until(lambda: sched.scoring == 1, "the first request is being decoded")
            r = post(DOCS[1:6])
            assert r.status_code == 504 and "timed out" in r.json()["detail"]
            assert sched.pending == 0, "the timed-out request's pairs must leave the queue"
        assert first().status_code == 504  # it too waited past its time, inside its decode
        pairs = metric(httpx.get(f"{url}/metrics").text, "reranker_pairs_total")
        assert pairs == 1, "only the pair already in the decode call is scored"


def test_a_client_that_disconnects_frees_its_work(server, tiny_reranker):
    url, app = server
    sched = app.state.scheduler
    metrics = lambda: httpx.get(f"{url}/metrics").text
    before = metric(metrics(), "reranker_pairs_total")
    body = json.dumps({"query": QUERY, "documents": DOCS[1:8]}).encode()
    with model_busy(tiny_reranker):
        first = in_background(lambda: httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": DOCS[:1]}, timeout=30))
        wait_until(lambda: sched.scoring == 1, "the first request is being decoded")
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: sched.pending == 7, "the request is queued")
        wait_until(lambda: sched.pending == 0, "the disconnected request's pairs leave the queue")
    assert first().status_code == 200
    assert metric(metrics(), "reranker_pairs_total") - before == 1, "the disconnected request must not be scored"
    assert 'code="499"' in metrics()


def test_a_client_that_disconnects_mid_body_is_a_499_not_an_error(server, caplog):
    """A client that sends half its body and closes is counted 499 (nginx's "client closed"), never a 500 with a traceback."""
    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b'Content-Length: 1000\r\n\r\n{"query": "q", "docu')
        time.sleep(0.2)  # the handler is reading the body when the client leaves
    count = lambda t, code: float((re.search(rf'reranker_requests_total\{{code="{code}",endpoint="/v1/rerank"\}} (\S+)', t) or [0, 0])[1])
    metrics = lambda: httpx.get(f"{url}/metrics").text
    wait_until(lambda: count(metrics(), 499) + count(metrics(), 500) > count(before, 499) + count(before, 500), "the request is counted")
    text = metrics()
    assert count(text, 499) == count(before, 499) + 1 and count(text, 500) == count(before, 500) == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a client leaving is no server error"


# --- the command ------------------------------------------------------------------------------------


def test_serve_command_refuses_bad_settings_before_loading(tiny_ggufs, capsys, monkeypatch):
    from reranker.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        for argv, message in ((["--port", str(port)], "cannot bind"), (["--max-documents", "0"], "max_documents=0"),
                              (["--request-timeout", "0"], "request_timeout"), (["--port", "70000"], "not a port"),
                              (["--max-prompts", "0"], "max_prompts=0"), (["--max-document-chars", "0"], "max_document_chars=0"),
                              (["--chunk", "--max-chunks", "100", "--max-request-chunks", "10"], "--max-request-chunks 10"),
                              (["--api-key", " "], "API key is empty"), (["--api-key", "k\n"], "trailing whitespace"),
                              (["--api-key", " k"], "leading or trailing whitespace"), (["--api-key", "clé"], "non-ASCII"),
                              (["--api-key", "k\x00k"], "control characters")):
            assert main(["serve", "-m", str(tiny_ggufs["f32"]), *argv]) == 2
            err = capsys.readouterr().err
            assert err.startswith("reranker serve: error:") and message in err and err.count("\n") == 1, err
        monkeypatch.setenv(API_KEY_ENV, "k\n")  # RERANKER_API_KEY=$(cat keyfile) keeps no newline, but $'k\n' does
        assert main(["serve", "-m", str(tiny_ggufs["f32"]), "--port", "0"]) == 2
        assert "trailing whitespace" in capsys.readouterr().err
    finally:
        taken.close()


# --- the real command under load (slow tier) -------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_process(tiny_ggufs, tmp_path_factory):
    """`reranker serve --max-connections 4 --header-timeout 3` whose API key comes only from RERANKER_API_KEY:
    (base URL, log path)."""
    log_path = tmp_path_factory.mktemp("keyed") / "serve.log"
    with serve_process(tiny_ggufs["f32"], log_path, "--max-connections", "4", "--header-timeout", "3",
                       env={API_KEY_ENV: "env-s3cret"}) as (_, url):
        yield url, log_path


@pytest.mark.slow  # a real process
def test_serve_takes_the_api_key_from_the_environment(keyed_process):
    url, log_path = keyed_process
    assert "auth on" in log_path.read_text()
    body = {"query": QUERY, "documents": DOCS[:2]}
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200  # open, for load balancers
        for method, path, kw in (("POST", "/v1/rerank", {"json": body}), ("POST", "/v2/rerank", {"json": body}),
                                 ("GET", "/v1/models", {}), ("GET", "/metrics", {})):
            r = c.request(method, path, **kw)
            assert r.status_code == 401 and "API key" in r.json()["detail"], (path, r.text)
            r = c.request(method, path, headers={"Authorization": "Bearer env-s3cret"}, **kw)
            assert r.status_code == 200, (path, r.text)


@pytest.mark.slow  # a real process
def test_max_connections_answers_503_beyond_it(keyed_process):
    """uvicorn counts open connections, idle keep-alive ones too: a request on the 4th of 4 gets 503."""
    url, _ = keyed_process
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(httpx.Client(base_url=url, timeout=30)) for _ in range(4)]
        for c in held[:3]:  # each keeps its connection open after its answer
            assert c.get("/health").status_code == 200
        r = held[3].get("/health")
        assert r.status_code == 503 and "Service Unavailable" in r.text
        held[0].close()
        wait_until(lambda: held[3].get("/health").status_code == 200, "a freed connection lets the next one in")


@pytest.mark.slow  # a real process
def test_silent_and_slow_header_clients_are_closed_at_the_header_timeout(keyed_process):
    """uvicorn arms no timer until a request's head is in, so 4 clients that send nothing, or a header line every
    half second (slowloris), would hold all of --max-connections 4 for ever; --header-timeout 3 closes them."""
    url, _ = keyed_process
    port = int(url.rsplit(":", 1)[1])
    socks = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(4)]
    slow = socks[2:]
    for s in slow:
        s.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\n")
    stop = threading.Event()

    def trickle() -> None:
        for i in itertools.count():
            if stop.wait(0.5):
                return
            for s in slow:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow-%d: 1\r\n" % i)

    thread = threading.Thread(target=trickle, daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 503  # all four connections are held
        for s in socks:
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(4096) == b"", "the server answered instead of closing"
        assert 2.5 < time.monotonic() - start < 12, time.monotonic() - start
        wait_until(lambda: httpx.get(f"{url}/health", timeout=30).status_code == 200, "the freed connections let others in")
    finally:
        stop.set()
        thread.join()
        for s in socks:
            s.close()


def http_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the one HTTP/1.1 response on `sock`, read until the server closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.slow  # a real process
def test_sigterm_stops_listening_then_answers_the_request_it_took(tiny_ggufs, tiny_reranker, tmp_path):
    """After SIGTERM the listening socket closes at once (health checks, like every new connection, are refused),
    while a request already taken (here: its body still arriving) is answered in full before the exit."""
    log_path = tmp_path / "serve.log"
    body = json.dumps({"query": QUERY, "documents": DOCS[:3]}).encode()
    with serve_process(tiny_ggufs["f32"], log_path) as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))
            # A round trip on another connection: the server's loop has read the request above by then.
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                except ConnectionRefusedError:
                    return True
                return False

            wait_until(refused, "the server stops listening")
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health", timeout=5)
            time.sleep(2)  # a slow client: the server waits for a request it took (up to --request-timeout + 5 s)
            assert proc.poll() is None, "the server must wait for the request it took"
            s.sendall(body[10:])
            status, answer = http_response(s)
        assert status == 200, answer
        want = tiny_reranker.compute_score([[QUERY, d] for d in DOCS[:3]])
        got = {x["index"]: x["relevance_score"] for x in json.loads(answer)["results"]}
        assert got == pytest.approx(dict(enumerate(want)), abs=TOL)
        assert proc.wait(60) == 0
    assert "stopped; 1 rerank requests accepted, 1 answered (200: 1)" in log_path.read_text()


def request_pool(tiny_reranker, n: int, seed: int = 0) -> list[tuple[dict, dict[int, float]]]:
    """`n` varied Jina requests (1-8 documents from PAIRS and longer texts) with their expected scores."""
    rng = np.random.default_rng(seed)
    queries = [q for q, _ in PAIRS[:4]]
    docs = DOCS + [" ".join(rng.choice(["rank", "doc", "检索", "🎉", "query", "token"], size=int(k))) for k in rng.integers(20, 150, 12)]
    want = {q: tiny_reranker.compute_score([[q, d] for d in docs]) for q in queries}
    pool = []
    for _ in range(n):
        q = queries[int(rng.integers(len(queries)))]
        idx = rng.choice(len(docs), size=int(rng.integers(1, 9)), replace=False).tolist()
        pool.append(({"query": q, "documents": [docs[i] for i in idx]}, {j: want[q][i] for j, i in enumerate(idx)}))
    return pool


def check_response(r: httpx.Response, want: dict[int, float]) -> None:
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert got == pytest.approx(want, abs=TOL)


@pytest.mark.slow
def test_32_concurrent_clients_get_every_answer_right(tiny_ggufs, tiny_reranker, tmp_path):
    pool = request_pool(tiny_reranker, 256)
    with serve_process(tiny_ggufs["f32"], tmp_path / "serve.log") as (_, url):
        def client(k: int) -> int:
            with httpx.Client(base_url=url, timeout=120) as c:
                for body, want in pool[k::32]:
                    check_response(c.post("/v1/rerank", json=body), want)
            return len(pool[k::32])

        jobs = [in_background(client, k) for k in range(32)]
        assert sum(job(300) for job in jobs) == len(pool)
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, 'reranker_requests_total{code="200",endpoint="/v1/rerank"}') == len(pool)
        assert metric(text, "reranker_pairs_total") == sum(len(b["documents"]) for b, _ in pool)
        batches = metric(text, "reranker_batch_pairs_count")
        assert batches < len(pool) / 2, f"{batches} batches for {len(pool)} concurrent requests: they should share batches"


@pytest.mark.slow
def test_sigterm_under_load_loses_no_accepted_request(tiny_ggufs, tiny_reranker, tmp_path):
    pool = request_pool(tiny_reranker, 64, seed=1)
    log_path = tmp_path / "serve.log"
    with serve_process(tiny_ggufs["f32"], log_path) as (proc, url):
        answered: list[tuple[float, float]] = []
        stop_at = {"t": None}
        lock = threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(10**6):
                    body, want = pool[(k + 16 * i) % len(pool)]
                    t0 = time.monotonic()
                    try:
                        r = c.post("/v1/rerank", json=body)
                    except httpx.TransportError:
                        return  # refused or cut before the server took it: checked against the server's count below
                    check_response(r, want)
                    with lock:
                        answered.append((t0, time.monotonic()))

        jobs = [in_background(client, k) for k in range(16)]
        wait_until(lambda: len(answered) >= 40, "40 answers before the SIGTERM", timeout=120)
        stop_at["t"] = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for job in jobs:
            job(60)
    log = log_path.read_text()
    m = re.search(r"stopped; (\d+) rerank requests accepted, (\d+) answered \((.*)\)", log)
    assert m, log
    accepted, n_answered, codes = int(m.group(1)), int(m.group(2)), m.group(3)
    assert accepted == n_answered == len(answered) and codes == f"200: {accepted}", log
    in_flight = sum(t0 < stop_at["t"] < t1 for t0, t1 in answered)
    assert in_flight > 0, "no request was in flight at the SIGTERM: the test proved nothing"


def test_a_failing_batch_costs_only_its_bad_request(tiny_reranker):
    """The scheduler alone: a prompt the backbone refuses (an id outside the vocabulary) shares a batch with a
    good request; the batch fails, each request is retried alone, and only the bad one gets the error."""
    from reranker.engine.prompts import Prompt
    from reranker.errors import RerankerError
    from reranker.serve.scheduler import Scheduler

    sched = Scheduler(tiny_reranker, batch_tokens=4096, max_queue=100)
    sched.start()
    try:
        builder = tiny_reranker.prompt_builder()
        good = [builder.build(QUERY, d) for d in DOCS[:4]]
        with model_busy(tiny_reranker):
            first = sched.submit(good[:1])
            wait_until(lambda: sched.scoring == 1, "the first ticket is being decoded")
            bad = sched.submit([good[1], Prompt([10**9], False)])
            other = sched.submit(good[2:])
        assert first.future.result(30) == pytest.approx(tiny_reranker.compute_score([[QUERY, DOCS[0]]]), abs=TOL)
        with pytest.raises(RerankerError, match="outside the vocabulary"):
            bad.future.result(30)
        want = tiny_reranker.compute_score([[QUERY, d] for d in DOCS[2:4]])
        assert other.future.result(30).tolist() == pytest.approx(want, abs=TOL)
    finally:
        sched.stop(30)
    assert not sched.running


def test_a_non_finite_chunk_score_names_the_requests_document(tiny_reranker):
    """With chunking a prompt is a chunk: the error names the document (its index in the request), not the prompt.

    The head gives NaN exactly where hidden coordinate k is positive (two fc1 rows of weight inf on it, fc2 +1
    and -1: inf - inf); k is one on which every chunk of the long document 0 is negative and document 1 positive.
    """
    import torch

    from head import ScoringHead
    from reranker import Reranker
    from reranker.serve.prepare import build_prompts
    from reranker.serve.schemas import CohereRerankRequest

    long_doc = " ".join(f"passage {i} about rerankers and 检索." for i in range(6))
    body = {"query": QUERY, "documents": [long_doc, "A reranker scores documents.", "Bananas are yellow."],
            "max_tokens_per_doc": 48, "chunking": {"size": 16, "overlap": 0}}
    plain = {**body, "chunking": False}
    prompts = {}
    for name, b in (("chunked", body), ("plain", plain)):
        req = CohereRerankRequest(**b)
        prompts[name] = build_prompts(tiny_reranker, req.query_side(), req.sides(), req.options()).prompts
    n0 = len(prompts["chunked"]) - 2
    assert n0 > 2, "document 0 was not chunked: the test would not tell documents from prompts"
    # Finite: document 0's chunks and its truncated prompt; NaN: document 1's prompt.
    h = tiny_reranker.backbone.embed([p.ids for p in prompts["chunked"][:n0] + prompts["plain"][:2]])
    margin, k, sign = max(((float(np.abs(h[:, k]).min()), k, s) for k in range(h.shape[1]) for s in (1, -1)
                           if (s * h[:-1, k] < 0).all() and s * h[-1, k] > 0), default=(0, 0, 0))
    assert margin > 1e-3, "no hidden coordinate separates document 1 from document 0's prompts"
    head = ScoringHead(tiny_reranker.backbone.n_embd)
    with torch.no_grad():
        head.fc1.weight[:2] = 0
        head.fc1.weight[:2, k] = sign * float("inf")
        head.fc1.bias[:2] = 0
        head.fc2.weight[0, :2] = torch.tensor([1.0, -1.0])
    broken = Reranker(tiny_reranker.backbone, head, device="cpu")
    with running_server(broken) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v2/rerank", json=body)
        assert r.status_code == 500, r.text
        assert "non-finite score for document 1 (its chunk 0);" in r.json()["detail"], r.text
        r = c.post("/v2/rerank", json=plain)  # without chunking, prompt i is document i
        assert r.status_code == 500 and "non-finite score for document 1;" in r.json()["detail"], r.text


# --- hostile load (issue 21) ---------------------------------------------------------------------------


def test_a_small_request_sent_after_a_huge_one_finishes_first(tiny_reranker):
    """Batches are shared round-robin between queued requests: the small one rides the next batch
    instead of waiting for every batch of the huge one (first come first served would finish it last)."""
    docs = [f"{DOCS[i % len(DOCS)]} (copy {i})" for i in range(120)]
    with running_server(tiny_reranker, ServeSettings(max_documents=200, batch_tokens=256)) as (url, app):
        sched = app.state.scheduler
        done: dict[str, float] = {}

        def post(name, body):
            r = httpx.post(f"{url}/v1/rerank", json=body, timeout=60)
            done[name] = time.monotonic()
            return r

        with model_busy(tiny_reranker):
            huge = in_background(post, "huge", {"query": QUERY, "documents": docs})
            wait_until(lambda: sched.scoring > 0, "the huge request's first batch is being decoded")
            left = sched.pending
            assert left > 3 * sched.scoring, "the huge request must span several batches"
            small = in_background(post, "small", {"query": QUERY, "documents": DOCS[:1]})
            wait_until(lambda: sched.pending == left + 1, "the small request is queued behind the huge one")
        r_small, r_huge = small(), huge()
        assert done["small"] < done["huge"], "the small request must not wait for the whole huge one"
        check_response(r_small, dict(enumerate(tiny_reranker.compute_score([[QUERY, DOCS[0]]]))))
        check_response(r_huge, dict(enumerate(tiny_reranker.compute_score([[QUERY, d] for d in docs]))))


def test_a_handler_cancelled_at_shutdown_answers_503_not_a_500_traceback(tiny_reranker, caplog):
    """uvicorn cancels the handlers still running when its graceful shutdown times out (a SIGTERM's second
    phase): a request waiting for the model then gets 503 + Retry-After, never a 500 with a CancelledError."""
    with running_server(tiny_reranker, timeout_graceful_shutdown=1) as (url, app):
        sched = app.state.scheduler
        post = lambda docs: httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": docs}, timeout=30)
        with model_busy(tiny_reranker):
            first = in_background(post, DOCS[:1])
            wait_until(lambda: sched.scoring == 1, "the first request is being decoded")
            second = in_background(post, DOCS[1:3])
            wait_until(lambda: sched.pending == 2, "the second request is queued")
            app.state.uvicorn.should_exit = True  # what SIGTERM does
            answers = [first(), second()]  # answered while the model is still held: by the cancellation
        for r in answers:
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "shutting down" in r.json()["detail"], r.text
    assert app.state.stats.answered == {503: 2}
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a shutdown is no server error"


def hostile_document(chars: int, seed: int = 0) -> str:
    """About `chars` characters of words, spaces and newlines: text a tokenizer spends seconds on."""
    rng = np.random.default_rng(seed)
    words = np.array(["rerank", "document", "检索", "query", "the", "token", "café", "1234", "🎉", "of\n"])
    return " ".join(words[rng.integers(len(words), size=chars // 6)].tolist())[:chars]


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow  # a real process
def test_sigterm_while_a_huge_request_tokenises_answers_it_and_exits_cleanly(tiny_ggufs, tmp_path):
    """A SIGTERM while a 15 MB document is tokenised: the request is answered (504 at --request-timeout: its
    tokenising stops there), never a 500 with a CancelledError traceback, and the server exits 0."""
    log_path = tmp_path / "serve.log"
    body = json.dumps({"query": QUERY, "documents": [hostile_document(15_000_000)]}).encode()
    with serve_process(tiny_ggufs["f32"], log_path, "--request-timeout", "2", "--max-document-chars", "16000000",
                       "--max-request-bytes", str(32 * 2**20)) as (proc, url):
        start = time.monotonic()
        job = in_background(lambda: httpx.post(f"{url}/v1/rerank", content=body, timeout=60,
                                               headers={"Content-Type": "application/json"}))
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        r = job(60)
        elapsed = time.monotonic() - start
        assert r.status_code in (503, 504), r.text
        assert elapsed < 2 + 2, f"answered after {elapsed:.1f} s, past --request-timeout 2"
        assert proc.wait(30) == 0
    log = log_path.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert f"1 rerank requests accepted, 1 answered ({r.status_code}: 1)" in log, log


@pytest.mark.slow  # a real process
def test_huge_and_bomb_requests_do_not_starve_small_ones(tiny_ggufs, tiny_reranker, tmp_path):
    """Issue 21's denial of service, with the caps raised so the hostile requests get in: a 15 MB document and
    a chunking bomb (1 MB, chunks of 8 tokens, a billion of them asked) are each answered within
    --request-timeout, while a small request from another client keeps being answered 200 within ~2 s; and a
    client that gives up (a timeout, or a disconnect mid-tokenising) leaves no CPU burning behind it."""
    timeout = 4.0
    huge = {"query": QUERY, "documents": [hostile_document(15_000_000)]}
    bomb = {"query": QUERY, "documents": [hostile_document(1_000_000, seed=1)], "chunking": {"size": 8, "max_chunks": 10**9}}
    small = {"query": QUERY, "documents": DOCS[:2]}
    want = dict(enumerate(tiny_reranker.compute_score([[QUERY, d] for d in DOCS[:2]])))
    with serve_process(tiny_ggufs["f32"], tmp_path / "serve.log", "--request-timeout", str(timeout),
                       "--max-document-chars", "16000000", "--max-request-bytes", str(32 * 2**20)) as (proc, url):
        def timed(body):
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/rerank", json=body, timeout=60)
            return r, time.monotonic() - t0

        hostile = [in_background(timed, huge), in_background(timed, bomb)]
        latencies = []
        with httpx.Client(base_url=url, timeout=30) as c:
            end = time.monotonic() + timeout + 1
            while time.monotonic() < end:
                t0 = time.monotonic()
                check_response(c.post("/v1/rerank", json=small), want)
                latencies.append(time.monotonic() - t0)
        for job, what in zip(hostile, ("15 MB document", "chunking bomb")):
            r, elapsed = job(60)
            assert r.status_code in (200, 504), (what, r.text)
            assert elapsed < timeout + 1.5, f"the {what} was answered after {elapsed:.1f} s (--request-timeout {timeout})"
        assert len(latencies) >= 5 and max(latencies) < 2.0, f"small requests took {sorted(latencies)[-3:]} s at worst"
        # Given up: nothing of the hostile requests keeps running (a second of CPU is what any busy second costs).
        time.sleep(0.5)
        before = cpu_seconds(proc.pid)
        time.sleep(2)
        assert cpu_seconds(proc.pid) - before < 0.3, "the server kept working after answering"
        data = json.dumps(huge).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            time.sleep(1.5)  # the server reads, parses and starts tokenising it
        time.sleep(0.5)
        before = cpu_seconds(proc.pid)
        time.sleep(2)
        assert cpu_seconds(proc.pid) - before < 0.3, "tokenising went on after its client left"
        assert 'code="499"' in httpx.get(f"{url}/metrics").text


def test_batches_take_small_requests_whole_and_never_starve_a_huge_one(tiny_reranker):
    """The scheduler's batch policy on its own (no decode): the smallest queued requests whole in up to half the
    batch, the rest shared, so a huge request gets prompts in every batch however many small ones arrive; a
    request alone is taken in order up to the budget, as first come first served took it."""
    from reranker.engine.prompts import Prompt
    from reranker.serve.scheduler import Scheduler, Ticket

    sched = Scheduler(tiny_reranker, batch_tokens=100, max_queue=10**6)
    ten = Prompt([1] * 10, False)

    def queue(*tickets):
        for t in tickets:
            sched._queue.append(t)
            sched._pending += len(t.prompts)

    alone = Ticket([ten] * 30)
    queue(alone)
    assert sched._take() == [(alone, i) for i in range(10)]
    sched._queue.clear()
    sched._pending = 0
    huge = Ticket([ten] * 50)
    queue(huge)
    for _ in range(5):  # new small requests keep arriving, more than a batch holds
        smalls = [Ticket([ten] * 2) for _ in range(8)]
        queue(*smalls)
        batch = sched._take()
        taken = [t for t, _ in batch]
        assert len(batch) == 10, "the batch is full"
        assert taken.count(huge) >= 1, "the huge request progresses in every batch"
        done = [s for s in smalls if taken.count(s) == 2]
        assert len(done) >= 2, "the smallest requests are taken whole"
        sched._queue.clear()  # the next round starts from the huge request alone plus new arrivals
        sched._queue.append(huge)
        sched._pending = len(huge.prompts) - huge.next
    assert sched._pending == sum(len(t.prompts) - t.next for t in sched._queue)
