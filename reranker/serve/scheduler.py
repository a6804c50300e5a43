"""The cross-request batcher: prompts of concurrent requests share decode calls and head calls.

Requests queue `Ticket`s (their prompts, in order). One worker thread takes what is queued, up
to `batch_tokens` prompt tokens (at least one prompt), shared round-robin between the queued
requests rather than first come first served: the smallest requests first, whole, in up to
half of it, then the rest in equal shares (what one leaves unused goes to the others), so a small
request sent after a huge one is scored in the next batch instead of after all of the huge one's,
and a huge one still gets at least half of every batch. It scores
it with `engine.scoring.score_prompts`, the kernel of `score_prepared` (sorted by length, packed
into `llama_decode` calls, the head in one torch call), then hands each ticket its scores; a
request scored alone is one `score_prepared` call (what `Reranker.score_documents` runs), so its
scores are `compute_score(..., batch_size=len(documents))`'s bit for bit on the CPU (tested). It never waits for a batch to
fill: a lone small request is scored at once, and while a batch decodes the next one gathers.

A ticket's prompts may span batches, and a batch may hold many tickets. A cancelled ticket
(its client left, or it timed out) leaves the queue at once; its prompts already being decoded
are dropped when they return. When a batch of several tickets fails, each ticket is retried
alone, so one bad ticket never costs the others.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

import numpy as np

from reranker.engine.prompts import Prompt
from reranker.engine.scoring import score_prompts

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 with Retry-After."""


class Closed(Exception):
    """The scheduler is stopping or stopped; no new work is taken."""


class Ticket:
    """One request's prompts; `future` gets their scores (float32, in order) or an exception.

    `counts`: per document of the request, its number of prompts (its chunks; None: one prompt each).
    """

    def __init__(self, prompts: list[Prompt], counts: list[int] | None = None) -> None:
        self.prompts = prompts
        self.counts = counts
        self.tokens = sum(len(p.ids) for p in prompts)
        self.queued_tokens = self.tokens  # of the prompts not yet taken into a batch
        self.scores = np.empty(len(prompts), dtype=np.float32)
        self.next = 0  # the first prompt not yet taken into a batch
        self.left = len(prompts)  # prompts not yet scored
        self.cancelled = False
        self.future: Future = Future()

    def document_of(self, prompt: int) -> str:
        """The request's document that prompt `prompt` scores, as an error message names it."""
        if self.counts is None:
            return f"document {prompt}"
        ends = np.cumsum(self.counts)  # one past each document's last prompt
        doc = int(np.searchsorted(ends, prompt, side="right"))
        return f"document {doc} (its chunk {prompt - (int(ends[doc - 1]) if doc else 0)})"


BatchObserver = Callable[[int, int, float], None]  # (pairs, tokens, seconds) of each scored batch


class Scheduler:
    """Batches the prompts of queued tickets through one `Reranker` on one worker thread.

    `max_queue`: prompts waiting (not yet taken) at most; `submit` raises `Overloaded` beyond it,
    except into an empty queue, so a request of any admitted size can always be served.
    """

    def __init__(self, reranker, batch_tokens: int, max_queue: int, on_batch: BatchObserver | None = None) -> None:
        self.reranker = reranker
        self.batch_tokens = batch_tokens
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: collections.deque[Ticket] = collections.deque()
        self._pending = 0  # prompts in the queue not yet taken
        self._scoring = 0  # prompts in the batch being scored now
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Prompts queued and not yet taken into a batch."""
        return self._pending

    @property
    def scoring(self) -> int:
        """Prompts in the batch being scored now (0: the worker is idle)."""
        return self._scoring

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reranker-scheduler", daemon=True)
        self._thread.start()

    def has_room(self, n: int) -> bool:
        """Whether `n` more prompts would be admitted now (a cheap check before tokenising)."""
        return self._pending == 0 or self._pending + n <= self.max_queue

    def submit(self, prompts: list[Prompt], counts: list[int] | None = None) -> Ticket:
        """Queue `prompts` (`counts`: see `Ticket`); their scores arrive in the ticket's future."""
        ticket = Ticket(prompts, counts)
        with self._cond:
            if self._stopping or self._thread is None:
                raise Closed("the server is shutting down")
            if not self.has_room(len(prompts)):
                raise Overloaded(f"{self._pending} pairs are queued; this server queues at most {self.max_queue}")
            if not prompts:
                ticket.future.set_result(ticket.scores)
                return ticket
            self._queue.append(ticket)
            self._pending += len(prompts)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop `ticket`: its queued prompts leave the queue now, its scores are never delivered."""
        with self._cond:
            if ticket.cancelled or ticket.future.done():
                return
            ticket.cancelled = True
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._pending -= len(ticket.prompts) - ticket.next
        ticket.future.cancel()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new tickets, score those queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the worker ---------------------------------------------------------------------------

    def _take(self) -> list[tuple[Ticket, int]] | None:
        """The next batch: (ticket, prompt index), up to the token budget, shared between the queued tickets; None: stop.

        First the smallest tickets whole, while they fit in half the budget; then, in rounds, each
        ticket still taking adds its prompts, in order, up to an equal share of the room left (at
        least one prompt); a ticket that could add nothing more leaves the round. A ticket alone
        takes its prompts in order up to the budget, as first come first served did.
        """
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            batch: list[tuple[Ticket, int]] = []
            tokens = 0
            # Small requests first, whole, smallest first, in up to half the batch: each is answered
            # from this one batch instead of a share of several.
            for t in sorted(self._queue, key=lambda t: t.queued_tokens):
                if tokens + t.queued_tokens > self.batch_tokens // 2:
                    break
                tokens += self._take_all(t, batch)
            # The rest shared between the others (at least half the batch: a huge request is never starved).
            taking = list(self._queue)
            while taking and tokens < self.batch_tokens:
                share = max(1, (self.batch_tokens - tokens) // len(taking))
                still = []
                for t in taking:
                    got = 0
                    while t.next < len(t.prompts):
                        n = len(t.prompts[t.next].ids)
                        if batch and (tokens + n > self.batch_tokens or (got and got + n > share)):
                            break
                        batch.append((t, t.next))
                        tokens += n
                        got += n
                        t.next += 1
                        t.queued_tokens -= n
                        self._pending -= 1
                    if t.next == len(t.prompts):
                        self._queue.remove(t)
                    elif got and got + len(t.prompts[t.next].ids) > share:  # its share is used: more next round
                        still.append(t)
                taking = still
            return batch

    def _take_all(self, t: Ticket, batch: list[tuple[Ticket, int]]) -> int:
        """Add every queued prompt of `t` to `batch` and drop it from the queue: its tokens."""
        n = t.queued_tokens
        batch.extend((t, i) for i in range(t.next, len(t.prompts)))
        self._pending -= len(t.prompts) - t.next
        t.next, t.queued_tokens = len(t.prompts), 0
        self._queue.remove(t)
        return n

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._score(batch)
            except Exception as e:  # noqa: BLE001 (a failed batch fails its tickets, never the worker)
                tickets = list(dict.fromkeys(t for t, _ in batch))
                if len(tickets) == 1:
                    self._fail(tickets[0], e)
                    continue
                log.warning("a batch of %d requests failed (%s); scoring each alone", len(tickets), e)
                for t in tickets:
                    try:
                        self._score([(tt, i) for tt, i in batch if tt is t])
                    except Exception as e1:  # noqa: BLE001
                        self._fail(t, e1)

    def _score(self, batch: list[tuple[Ticket, int]]) -> None:
        batch = [(t, i) for t, i in batch if not t.cancelled]
        if not batch:
            return
        prompts = [t.prompts[i] for t, i in batch]
        start = time.perf_counter()
        self._scoring = len(prompts)
        try:
            scores = score_prompts(self.reranker, prompts).scores
        finally:
            self._scoring = 0
        if self.on_batch is not None:
            self.on_batch(len(prompts), sum(len(p.ids) for p in prompts), time.perf_counter() - start)
        for (t, i), s in zip(batch, scores):
            t.scores[i] = s
            t.left -= 1
            if t.left == 0 and not t.cancelled:
                self._finish(t)

    def _finish(self, t: Ticket) -> None:
        bad = np.flatnonzero(~np.isfinite(t.scores))
        if bad.size:
            self._fail(t, RuntimeError(f"the model returned a non-finite score for {t.document_of(int(bad[0]))}; "
                                       "the GGUF or head is likely broken"))
        else:
            _resolve(t.future, t.scores)

    def _fail(self, t: Ticket, e: BaseException) -> None:
        with self._cond:  # its prompts not yet taken are not scored
            if t in self._queue:
                self._queue.remove(t)
                self._pending -= len(t.prompts) - t.next
        _resolve(t.future, exception=e)


def _resolve(future: Future, result=None, exception: BaseException | None = None) -> None:
    # A client's cancel() may land between any check and the set: that race is harmless.
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
