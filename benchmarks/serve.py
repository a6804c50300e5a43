"""`reranker serve` under 1, 8 and 32 concurrent clients against the offline job on the same pairs.

All in one run, on the same model and settings (compare the ratios; the machine's load changes):

  job        `reranker score` on the requests' pairs (one nested JSONL record per request), in its own
             process; pairs/s from its OUTPUT.summary.json (the streaming loop, start-up excluded).
             Run before each round of bursts and once after; the best run is the baseline
  serve xN   `reranker serve` in its own process; N asyncio clients (httpx, one event loop, keep-alive)
             send the same requests (`--docs` documents each, Jina `/v1/rerank`) until all are
             answered; pairs/s = pairs / wall time of the whole burst (first sent to last answered);
             the best of `--rounds` bursts
  latency    one client, one `--docs`-document request at a time (light load): p50 / p99 per request

Every answer's scores are compared with the job's (max |diff| printed: the server packs pairs of
different requests together, so a few 1e-4 on F16 is the expected order).

`--mixed` measures instead what a few huge requests do to many small ones (issue 21): the small
requests (`--docs` documents each) sent by `--mixed-clients` clients, alone, then again while
`--huge` requests of `--huge-docs` documents each are sent at the same moment (each by its own
client); p50 / p99 of the small ones in both runs, and the huge ones' latencies. The batches are
shared round-robin between queued requests, so a small request waits about one batch, not the
huge requests' whole work.

    python benchmarks/serve.py                        # builds the `small` synthetic model once (F16)
    python benchmarks/serve.py --requests 128 --threads 2 --json out.json
    python benchmarks/serve.py --model m.gguf --device cuda --n-gpu-layers -1   # mlp_weights.npz beside it
    python benchmarks/serve.py --mixed --preset tiny --outtype f32 --threads 1    # the mixed load, tiny model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The repo root first, so this checkout's packages are imported (installed or not); this folder last, for sibling scripts.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import numpy as np  # noqa: E402
from job import load_average, synthetic_model, synthetic_pairs  # noqa: E402


def make_requests(n: int, docs: int, doc_words: tuple[int, int], seed: int = 0) -> list[dict]:
    """`n` Jina requests of `docs` documents each (the job's synthetic pairs, grouped; each group keeps its first query)."""
    pairs = synthetic_pairs(n * docs, doc_words, seed=seed)
    return [{"query": pairs[i * docs][0], "documents": [d for _, d in pairs[i * docs : (i + 1) * docs]]} for i in range(n)]


def model_args(args) -> list[str]:
    return ["--n-ctx", str(args.n_ctx), *(["--n-batch", str(args.n_batch)] if args.n_batch else []), "--threads",
            str(args.threads), "--device", args.device, "--n-gpu-layers", str(args.n_gpu_layers)]


def run_job(gguf: Path, requests: list[dict], tmp: Path, args) -> tuple[dict, np.ndarray]:
    """`reranker score` on the requests' pairs: (summary, scores as [request][document])."""
    inp, out = tmp / "requests.jsonl", tmp / "scores.jsonl"
    with inp.open("w", encoding="utf-8") as f:
        for i, r in enumerate(requests):
            f.write(json.dumps({"query_id": f"q{i}", "query": r["query"],
                                "documents": [{"id": str(j), "text": d} for j, d in enumerate(r["documents"])]},
                               ensure_ascii=False) + "\n")
    cmd = [sys.executable, "-m", "reranker", "score", "-m", str(gguf), "-i", str(inp), "-o", str(out), "--per", "pair",
           "--quiet", "--restart", *model_args(args)]
    proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"reranker score failed ({proc.returncode}):\n{proc.stderr}")
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    scores = np.zeros((len(requests), len(requests[0]["documents"])))
    with out.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            scores[int(rec["query_id"][1:]), int(rec["doc_id"])] = rec["score"]
    return summary, scores


class Server:
    """`reranker serve` in its own process on a free loopback port."""

    def __init__(self, gguf: Path, log: Path, args) -> None:
        # No request may time out: a burst queues every request at once, and this measures throughput.
        cmd = [sys.executable, "-m", "reranker", "serve", "-m", str(gguf), "--port", "0", "--request-timeout", "86400",
               *model_args(args)]
        if args.batch_tokens:
            cmd += ["--batch-tokens", str(args.batch_tokens)]
        self.log = log
        with log.open("w") as f:
            self.proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=f)
        t = time.perf_counter()
        while not (m := re.search(r"listening on (http://\S+)", log.read_text())):
            if self.proc.poll() is not None or time.perf_counter() - t > 600:
                sys.exit(f"reranker serve did not start:\n{log.read_text()}")
            time.sleep(0.1)
        self.url = m.group(1)
        import httpx

        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - t > 600:
                sys.exit("reranker serve is not healthy after 600 s")
            time.sleep(0.1)
        self.start_seconds = time.perf_counter() - t

    def stop(self) -> str:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        return self.log.read_text()


async def burst(url: str, requests: list[dict], clients: int) -> tuple[float, list[float], list[list[float]]]:
    """Send every request with `clients` concurrent clients: (wall seconds, per-request latencies, scores by request)."""
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    latencies: list[float] = [0.0] * len(requests)
    scores: list[list[float]] = [[] for _ in requests]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                t = time.perf_counter()
                r = await c.post("/v1/rerank", json={**requests[i], "return_documents": False})
                latencies[i] = time.perf_counter() - t
                if r.status_code != 200:
                    raise RuntimeError(f"request {i}: {r.status_code} {r.text[:200]}")
                s = [0.0] * len(requests[i]["documents"])
                for x in r.json()["results"]:
                    s[x["index"]] = x["relevance_score"]
                scores[i] = s

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t
    return wall, latencies, scores


def percentiles(latencies: list[float]) -> str:
    lat = 1e3 * np.array(latencies)
    return f"p50 {np.percentile(lat, 50):7.0f} ms  p99 {np.percentile(lat, 99):7.0f} ms  max {lat.max():7.0f} ms"


def run_mixed(gguf: Path, args) -> None:
    """Small requests alone, then beside `--huge` huge ones sent at once: the small ones' p50 / p99 in both."""
    small = make_requests(args.requests, args.docs, tuple(args.doc_words))
    huge = make_requests(args.huge, args.huge_docs, tuple(args.doc_words), seed=1)
    print(f"model {gguf.name}; {len(small)} small requests x {args.docs} documents by {args.mixed_clients} clients; "
          f"{len(huge)} huge requests x {args.huge_docs} documents; {args.threads} threads; load average {load_average()} at start")

    async def huge_one(request: dict) -> float:
        _, lat, _ = await burst(server.url, [request], 1)
        return lat[0]

    async def together() -> tuple[tuple, list[float], float]:
        t = time.perf_counter()
        huge_jobs = [asyncio.ensure_future(huge_one(r)) for r in huge]
        await asyncio.sleep(0.2)  # the huge requests arrive first: the worst case for first come first served
        small_run = await burst(server.url, small, args.mixed_clients)
        huge_lat = list(await asyncio.gather(*huge_jobs))
        return small_run, huge_lat, time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="reranker-serve-mixed-") as tmp:
        server = Server(gguf, Path(tmp) / "serve.log", args)
        try:
            asyncio.run(burst(server.url, small[: min(8, len(small))], 4))  # warm-up
            alone = asyncio.run(burst(server.url, small, args.mixed_clients))
            t = time.perf_counter()
            huge_alone = asyncio.run(burst(server.url, huge, len(huge)))
            huge_seconds = time.perf_counter() - t
            mixed, huge_lat, mixed_seconds = asyncio.run(together())
            log = server.stop()
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
    print(f"small requests alone           {percentiles(alone[1])}   ({alone[0]:.1f} s for all)")
    print(f"small requests beside the huge {percentiles(mixed[1])}   ({mixed_seconds:.1f} s for everything)")
    print(f"huge requests alone            {percentiles(huge_alone[1])}   ({huge_seconds:.1f} s for all)")
    print(f"huge requests beside the small {percentiles(huge_lat)}")
    print(f"p99 of the small ones, beside / alone: {np.percentile(mixed[1], 99) / np.percentile(alone[1], 99):.2f}x; "
          f"the huge ones' work alone: {huge_seconds:.1f} s; load average {load_average()} at end")
    stopped = re.search(r"stopped; (.*)", log)
    print(f"server at exit: {stopped.group(1) if stopped else 'no summary line'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF with mlp_weights.npz beside it (default: synthetic `small`, F16)")
    ap.add_argument("--requests", type=int, default=64, help="requests per burst (default: %(default)s)")
    ap.add_argument("--docs", type=int, default=10, help="documents per request (default: %(default)s)")
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 200), metavar=("MIN", "MAX"),
                    help="document length range in words (default: 40 200)")
    ap.add_argument("--concurrency", default="1,8,32", help="client counts (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the job and the bursts this many times, "
                    "keep the best of each (default: %(default)s)")
    ap.add_argument("--latency-requests", type=int, default=30,
                    help="sequential requests for the light-load latency (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for llama.cpp (default: %(default)s)")
    ap.add_argument("--n-ctx", type=int, default=10240)
    ap.add_argument("--n-batch", type=int, default=None, help="tokens per decode call (default: the server's)")
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--device", default="cpu", help="the head's torch device, both paths (default: %(default)s)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="the server's --batch-tokens (default: its own)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench",
                    help="where the synthetic model is built (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--preset", default="small", help="the synthetic model's preset without --model (default: %(default)s)")
    ap.add_argument("--outtype", default="f16", help="its GGUF type (default: %(default)s)")
    ap.add_argument("--mixed", action="store_true", help="measure the mixed load instead (see above)")
    ap.add_argument("--huge", type=int, default=3, help="--mixed: huge requests (default: %(default)s)")
    ap.add_argument("--huge-docs", type=int, default=1000, help="--mixed: documents per huge request (default: %(default)s)")
    ap.add_argument("--mixed-clients", type=int, default=4, help="--mixed: clients sending the small requests (default: %(default)s)")
    args = ap.parse_args()

    gguf = args.model or synthetic_model(args.cache, args.preset, args.outtype)[0]
    from reranker.engine.identity import with_identity_output

    with_identity_output(gguf, "f32")  # the fast path's one-time copy, made before anything is timed
    if args.mixed:
        return run_mixed(gguf, args)
    requests = make_requests(args.requests, args.docs, tuple(args.doc_words))
    n_pairs = args.requests * args.docs
    levels = [int(x) for x in args.concurrency.split(",")]
    loads = [load_average()]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="reranker-serve-bench-") as tmp:
        tmp = Path(tmp)
        jobs = []
        server = Server(gguf, tmp / "serve.log", args)
        try:
            asyncio.run(burst(server.url, requests[: min(8, len(requests))], 4))  # warm-up
            bursts: dict[int, tuple] = {}
            # The job and the bursts alternate, `--rounds` times (the idle server takes no CPU while the job
            # runs); the best of each path is kept, as the machine's load moves over minutes.
            for _ in range(args.rounds):
                jobs.append(run_job(gguf, requests, tmp, args))
                for c in levels:
                    b = asyncio.run(burst(server.url, requests, c))
                    if c not in bursts or b[0] < bursts[c][0]:
                        bursts[c] = b
                    loads.append(load_average())
            light = asyncio.run(burst(server.url, requests[: args.latency_requests], 1))
            log = server.stop()
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
        jobs.append(run_job(gguf, requests, tmp, args))  # once more after the server
        loads.append(load_average())

    summary, job_scores = max(jobs, key=lambda j: j[0]["pairs_this_run"] / j[0]["wall_seconds"])
    job_pps = summary["pairs_this_run"] / summary["wall_seconds"]
    tokens = summary["tokens_this_run"]
    each = ", ".join(f"{j[0]['pairs_this_run'] / j[0]['wall_seconds']:.1f}" for j in jobs)
    rows["job (reranker score)"] = {"pairs_per_s": job_pps, "tokens_per_s": tokens / summary["wall_seconds"],
                                    "seconds": summary["wall_seconds"], "note": f"best of {len(jobs)}: {each} pairs/s"}
    diffs = {}
    for c, (wall, lat, scores) in bursts.items():
        diffs[c] = float(np.abs(np.array(scores) - job_scores).max())
        rows[f"serve, {c} client{'s' if c > 1 else ''}"] = {
            "pairs_per_s": n_pairs / wall, "tokens_per_s": tokens / wall, "seconds": wall,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "note": f"max |score - job| {diffs[c]:.1e}"}
    lat = np.array(light[1])
    latency = {"requests": len(lat), "docs": args.docs, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
               "p99_ms": 1e3 * float(np.percentile(lat, 99)), "mean_ms": 1e3 * float(lat.mean())}
    stopped = re.search(r"stopped; (.*)", log)

    print(f"model {gguf.name}; {args.requests} requests x {args.docs} documents = {n_pairs} pairs, {tokens} prompt tokens "
          f"({tokens / n_pairs:.0f}/pair); {args.threads} threads, head on {args.device}; n_ctx {args.n_ctx}, n_batch {args.n_batch or 'default'}; "
          f"server start {server.start_seconds:.1f} s (model load included); load average {loads[0]} at start, {loads[-1]} at end")
    print(f"{'path (best of each)':<24}{'seconds':>9}{'pairs/s':>10}{'tokens/s':>10}{'vs job':>8}{'p50 ms':>9}{'p99 ms':>9}  note")
    for name, r in rows.items():
        p50 = f"{r['p50_ms']:9.0f}" if "p50_ms" in r else " " * 9
        p99 = f"{r['p99_ms']:9.0f}" if "p99_ms" in r else " " * 9
        print(f"{name:<24}{r['seconds']:>9.2f}{r['pairs_per_s']:>10.1f}{r['tokens_per_s']:>10.0f}{r['pairs_per_s'] / job_pps:>7.2f}x"
              f"{p50}{p99}  {r['note']}")
    top = max(levels)
    ratio = rows[f"serve, {top} client{'s' if top > 1 else ''}"]["pairs_per_s"] / job_pps
    print(f"serve at {top} clients / job (pairs/s): {ratio:.3f}   (target >= 0.8)")
    print(f"latency of one {args.docs}-document request at light load (1 client, {len(lat)} requests): "
          f"p50 {latency['p50_ms']:.0f} ms, p99 {latency['p99_ms']:.0f} ms, mean {latency['mean_ms']:.0f} ms")
    print(f"server at exit: {stopped.group(1) if stopped else 'no summary line'}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(gguf), "requests": args.requests, "docs": args.docs, "pairs": n_pairs,
                                         "tokens": tokens, "threads": args.threads, "device": args.device, "rows": rows,
                                         "ratio_at_max_clients": ratio, "latency": latency, "max_abs_diff": diffs,
                                         "server_start_s": server.start_seconds, "load_average": loads}, indent=1) + "\n")


if __name__ == "__main__":
    main()
