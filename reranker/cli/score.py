"""`reranker score`: the offline job on the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from reranker.cli.common import add_chunk_args, add_model_args, chunking_option, mode_options
from reranker.defaults import RUN_TAG, WINDOW
from reranker.errors import RerankerError

log = logging.getLogger("reranker.jobs")
#: The options of `--engine ray`, with their defaults.
RAY_DEFAULTS = {"ray_address": None, "actors": None, "actor_cpus": 1.0, "shard_windows": 8}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a large input file, streaming, resumable after any crash",
                       description="Score every (query, document) pair of INPUT into OUTPUT. Kill it at any moment "
                                   "and rerun the same command: it resumes where it stopped.")
    add_model_args(p)
    p.add_argument("-i", "--input", type=Path, help="JSONL (nested or flat pairs), Parquet, or a BEIR directory")
    p.add_argument("-o", "--output", type=Path, required=True, help=".jsonl, .parquet or .trec/.run")
    p.add_argument("--input-format", choices=["jsonl", "pairs-jsonl", "parquet", "beir"], default=None,
                   help="default: from the extension (a directory is BEIR)")
    p.add_argument("--output-format", choices=["jsonl", "parquet", "trec"], default=None,
                   help="default: from the extension")
    p.add_argument("--per", choices=["query", "pair"], default="query",
                   help="JSONL output: one line per query (Jina rerank response shape) or per pair (default: %(default)s)")
    p.add_argument("--queries", type=Path, help="BEIR queries.jsonl (default: INPUT/queries.jsonl)")
    p.add_argument("--corpus", type=Path, help="BEIR corpus.jsonl (default: INPUT/corpus.jsonl)")
    p.add_argument("--run", type=Path, help="first-stage TREC run to rerank (default: the run file in INPUT)")
    p.add_argument("--depth", type=int, default=100, help="BEIR: rerank the top N candidates per query (default: %(default)s)")
    p.add_argument("--run-tag", default=RUN_TAG, help="TREC output's tag column (default: %(default)s)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="bad records: stop with file, line and reason (default), or skip them into a rejects file")
    p.add_argument("--rejects", type=Path, default=None, help="rejects file (default: OUTPUT.rejects.jsonl)")
    p.add_argument("--window", type=int, default=WINDOW,
                   help="pairs per window: sorted by length for packing, and checkpointed together (default: %(default)s)")
    p.add_argument("--devices", default=None,
                   help="one backbone process per device: GPU indices '0,1', 'all', or 'cpu,cpu' (default: one, in-process)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine (default); ray: Ray Data actors on a Ray cluster, OUTPUT a folder of "
                        "Parquet parts (needs the ray extra)")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: the cluster ('auto': the running one; default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--actors", type=int, default=None,
                   help="--engine ray: scoring actors, one model each (default: one per GPU of the cluster, else 1)")
    p.add_argument("--actor-cpus", type=float, default=None,
                   help=f"--engine ray: CPUs per actor; CPU actors run that many llama.cpp threads (default: {RAY_DEFAULTS['actor_cpus']})")
    p.add_argument("--shard-windows", type=int, default=None,
                   help=f"--engine ray: windows per output part; a rerun skips complete parts (default: {RAY_DEFAULTS['shard_windows']})")
    p.add_argument("--save-hidden", type=Path, default=None, metavar="PATH.npy",
                   help="also write each scored pair's last hidden state: a memory-mapped (n, hidden) .npy in input order, "
                        "and PATH.ids.jsonl with each row's query_id, doc_id and score; resumable like the output")
    p.add_argument("--hidden-dtype", choices=["float32", "float16"], default=None,
                   help="--save-hidden's dtype (default: float32; float16 halves the file)")
    p.add_argument("--mmproj", metavar="PATH",
                   help="the vision projector for image documents (default: the mmproj-*.gguf beside the GGUF)")
    p.add_argument("--restart", action="store_true", help="discard a previous run's output and checkpoint and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress log lines")
    add_chunk_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from reranker.jobs.job import JobSpec
    from reranker.jobs.ray_job import RayOptions
    from reranker.jobs.run import JobInterrupted, run_job
    from reranker.settings import LoadSettings

    # Options of a mode not asked for are refused, not silently ignored (their defaults are None to tell).
    ray = mode_options(args, RAY_DEFAULTS, args.engine == "ray", "applies to --engine ray; add it or drop the option")
    if args.save_hidden is None and args.hidden_dtype is not None:
        raise RerankerError("--hidden-dtype applies to --save-hidden; add --save-hidden PATH.npy or drop it")
    spec = JobSpec(input=args.input, output=args.output, input_format=args.input_format, output_format=args.output_format,
                   per=args.per, depth=args.depth, queries=args.queries, corpus=args.corpus, run=args.run,
                   on_error=args.on_error, rejects=args.rejects, window=args.window, restart=args.restart,
                   run_tag=args.run_tag, chunking=chunking_option(args), hidden=args.save_hidden,
                   hidden_dtype=args.hidden_dtype or "float32")
    options = RayOptions(address=ray["ray_address"], actors=ray["actors"], cpus_per_actor=ray["actor_cpus"],
                         shard_windows=ray["shard_windows"])
    try:
        summary = run_job(spec, LoadSettings.from_args(args), devices=args.devices, engine=args.engine,
                          ray_options=options, quiet=args.quiet)
    except JobInterrupted as e:
        print(f"reranker score: interrupted; {e.pairs} pairs are saved. Rerun the same command to resume.", file=sys.stderr)
        raise
    s = summary.values
    if summary.already_complete:
        shards = f" in {s['shards']} shards" if args.engine == "ray" else ""
        print(f"reranker score: {args.output} is already complete ({s['pairs']} pairs{shards}); "
              "pass --restart to score it again", file=sys.stderr)
        return
    line = (f"reranker score: {s['pairs']} pairs ({s['queries']} records), {s['tokens']} tokens, {s['truncated']} truncated, "
            f"{s['skipped']} skipped; this run {s['pairs_this_run']} pairs in {s['wall_seconds']:.1f} s ({s['pairs_per_second']} pairs/s")
    if args.engine == "ray":
        print(f"{line}) on {s['actors']} Ray actor(s), {s['shards_skipped']} of {s['shards']} shards already done "
              f"-> {spec.output}/", file=sys.stderr)
        return
    print(f"{line}, {s['tokens_per_second']} tokens/s) -> {args.output}", file=sys.stderr)
    if spec.chunking is not None:
        print(f"reranker score: {s['chunked']} documents chunked, {s['capped']} of them had more than "
              f"--max-chunks {spec.chunking.max_chunks} chunks (their ends were not scored)", file=sys.stderr)
