"""What tokenising the query once per call gains `rank` (issue 21): the `PromptBuilder` as it is against one that
tokenises the whole prompt for every document (and fits the query again for each), as the builder did before;
and what it gains `reranker serve` (its app in-process: one request of the same documents).

Both builders give the same ids (checked here on every prompt; tests/engine/test_tokenize_pieces.py proves it on
hostile text). Timed, best of `--repeat`, alternating the two: tokenising alone (`prepare`, the prompts of
`--docs` documents) and the whole `Reranker.rank` call, for a short query (4-12 words) and a long one (a
`--long-query-words` word query, cut to max_query_length tokens as the model does).

    python benchmarks/query_once.py                     # the synthetic `tiny` model (F32), built once
    python benchmarks/query_once.py --preset small --outtype f16 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from job import WORDS, load_average, synthetic_model, synthetic_pairs  # noqa: E402


def whole_prompt_builder(base):
    """A `PromptBuilder` that tokenises every prompt whole and fits the query per document (the former path)."""
    from reranker.engine.prompts import PromptBuilder, format_prompt

    class WholePrompt(PromptBuilder):
        def prompt_ids(self, query: str, document: str, doc_ids: list[int] | None = None) -> list[int]:
            return self.tokenizer.encode(format_prompt(query, document))

        def fit_query(self, query: str) -> tuple[str, bool]:
            self._fitted = None
            return super().fit_query(query)

    return WholePrompt(base.tokenizer, base.max_length, base.max_query_length)


def serve(rr):
    """(base URL, stop) of `reranker serve`'s app for `rr`, in-process on an ephemeral loopback port."""
    import socket
    import threading

    import uvicorn

    from reranker.serve.app import create_app
    from reranker.serve.settings import ServeSettings

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(rr, ServeSettings()), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def measure(rr, query: str, docs: list[str], repeat: int, url: str) -> tuple[int, dict[str, tuple[float, float]]]:
    """(the fitted query's tokens, {"tokenise" | "rank" | "serve": (best seconds whole, best seconds once)}),
    alternating the two; "serve" is one `POST /v1/rerank` of the same documents, answered in full."""
    import httpx

    from reranker import Reranker
    from reranker.engine.scoring import prepare

    pairs = [(query, d) for d in docs]
    once = rr.prompt_builder()
    assert [p.ids for p in prepare(once, pairs).prompts] == [p.ids for p in prepare(whole_prompt_builder(once), pairs).prompts], \
        "the two builders must give the same ids"
    plain = Reranker.prompt_builder
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeat):
        for mode in ("whole", "once"):
            make = (lambda: whole_prompt_builder(rr.prompt_builder())) if mode == "whole" else rr.prompt_builder
            t = time.perf_counter()
            prepare(make(), pairs)
            times.setdefault(("tokenise", mode), []).append(time.perf_counter() - t)
            if mode == "whole":
                Reranker.prompt_builder = lambda self, *a, **k: whole_prompt_builder(plain(self, *a, **k))
            try:
                t = time.perf_counter()
                rr.rank(query, docs)
                times.setdefault(("rank", mode), []).append(time.perf_counter() - t)
                t = time.perf_counter()
                r = httpx.post(f"{url}/v1/rerank", json={"query": query, "documents": docs}, timeout=600)
                times.setdefault(("serve", mode), []).append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
            finally:
                Reranker.prompt_builder = plain
    rows = {what: (min(times[(what, "whole")]), min(times[(what, "once")])) for what in ("tokenise", "rank", "serve")}
    return len(once.tokenizer.encode(once.fit_query(query)[0])), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="synthetic model preset (default: %(default)s)")
    ap.add_argument("--outtype", default="f32", help="its GGUF type (default: %(default)s)")
    ap.add_argument("--docs", type=int, default=100, help="documents per rank call (default: %(default)s)")
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 200), metavar=("MIN", "MAX"))
    ap.add_argument("--long-query-words", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: %(default)s)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    args = ap.parse_args()

    import random

    from reranker import Reranker

    gguf = synthetic_model(args.cache, args.preset, args.outtype)[0]
    rr = Reranker.from_pretrained(str(gguf), device="cpu", n_threads=args.threads, n_ctx=4096)
    docs = [d for _, d in synthetic_pairs(args.docs, tuple(args.doc_words), seed=1)]
    rng = random.Random(2)
    queries = {"short query": " ".join(rng.choices(WORDS, k=8)),
               "long query": " ".join(rng.choices(WORDS, k=args.long_query_words))}
    print(f"model {gguf.name}; {args.docs} documents of {args.doc_words[0]}-{args.doc_words[1]} words; {args.threads} "
          f"llama.cpp thread(s); best of {args.repeat}; load average {load_average()} at start")
    print(f"{'query':<12}{'query tokens':>13}{'what':>10}{'whole (s)':>11}{'once (s)':>10}{'gain':>7}")
    url, stop = serve(rr)
    for name, query in queries.items():
        n_query, rows = measure(rr, query, docs, args.repeat, url)
        for what, (tw, to) in rows.items():
            print(f"{name:<12}{n_query:>13}{what:>10}{tw:>11.4f}{to:>10.4f}{tw / to:>6.2f}x")
    print(f"load average {load_average()} at end")
    stop()
    rr.close()


if __name__ == "__main__":
    main()
