"""`GET /metrics`: requests, pairs, tokens, queue depth, batch sizes and latencies (prometheus_client).

Each app has its own registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PAIRS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """The server's metrics, in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float], scoring: Callable[[], float]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("reranker_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.latency = Histogram("reranker_request_seconds", "Request latency (received to answered), by endpoint",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.pairs = Counter("reranker_pairs", "(query, document) pairs scored", registry=r)
        self.tokens = Counter("reranker_tokens", "Prompt tokens decoded", registry=r)
        self.in_flight = Gauge("reranker_requests_in_flight", "Rerank requests being handled", registry=r)
        self.queue = Gauge("reranker_queue_pairs", "Pairs queued for the scheduler, not yet in a batch", registry=r)
        self.queue.set_function(queue_depth)
        self.scoring = Gauge("reranker_scoring_pairs", "Pairs in the batch being scored now", registry=r)
        self.scoring.set_function(scoring)
        self.batch_pairs = Histogram("reranker_batch_pairs", "Pairs per scheduler batch", buckets=_PAIRS, registry=r)
        self.batch_tokens = Histogram("reranker_batch_tokens", "Prompt tokens per scheduler batch", buckets=_TOKENS, registry=r)
        self.batch_seconds = Histogram("reranker_batch_seconds", "Time to score one batch (decode and head)",
                                       buckets=_LATENCY, registry=r)

    def observe_batch(self, pairs: int, tokens: int, seconds: float) -> None:
        """The scheduler's hook, called on its worker thread after each batch."""
        self.pairs.inc(pairs)
        self.tokens.inc(tokens)
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
