"""`reranker score`: the offline job on the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from reranker.cli.common import add_chunk_args, add_model_args, bf16_option, chunking_option, resolve_device
from reranker.defaults import HEAD_FILE, IDENTITY_DTYPE, MAX_LENGTH, RUN_TAG, WINDOW
from reranker.errors import RerankerError

log = logging.getLogger("reranker.jobs")


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
                        "Parquet parts (pip install 'jina-reranker-gguf[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: the cluster ('auto': the running one; default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--actors", type=int, default=None,
                   help="--engine ray: scoring actors, one model each (default: one per GPU of the cluster, else 1)")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="--engine ray: CPUs per actor; CPU actors run that many llama.cpp threads (default: %(default)s)")
    p.add_argument("--shard-windows", type=int, default=8,
                   help="--engine ray: windows per output part; a rerun skips complete parts (default: %(default)s)")
    p.add_argument("--save-hidden", type=Path, default=None, metavar="PATH.npy",
                   help="also write each scored pair's last hidden state: a memory-mapped (n, hidden) .npy in input order, "
                        "and PATH.ids.jsonl with each row's query_id, doc_id and score; resumable like the output")
    p.add_argument("--hidden-dtype", choices=["float32", "float16"], default="float32",
                   help="--save-hidden's dtype (default: %(default)s; float16 halves the file)")
    p.add_argument("--restart", action="store_true", help="discard a previous run's output and checkpoint and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress log lines")
    add_chunk_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from reranker.gguf.hub import resolve
    from reranker.jobs.job import JobSpec, check_job
    from reranker.jobs.paths import JobLock

    if args.input is None and not (args.queries and args.corpus and args.run):
        raise RerankerError("give -i INPUT, or --queries, --corpus and --run for BEIR files")
    spec = JobSpec(input=args.input, output=args.output, input_format=args.input_format, output_format=args.output_format,
                   per=args.per, depth=args.depth, queries=args.queries, corpus=args.corpus, run=args.run,
                   on_error=args.on_error, rejects=args.rejects, window=args.window, restart=args.restart,
                   run_tag=args.run_tag, chunking=chunking_option(args), hidden=args.save_hidden,
                   hidden_dtype=args.hidden_dtype)
    if args.engine == "ray":
        from reranker.jobs.ray_data import require_ray

        for flag, used in (("--chunk", spec.chunking is not None), ("--save-hidden", spec.hidden is not None)):
            if used:
                raise RerankerError(f"{flag} is not supported with --engine ray yet; use the local engine for it")
        require_ray()  # before the model is resolved: the one-line install hint comes first
    files = resolve(args.model)
    head_path = Path(args.head) if args.head else files.head
    if head_path is None:
        raise RerankerError(f"no {HEAD_FILE} beside {files.gguf}; pass --head path/to/{HEAD_FILE}")
    if args.engine == "ray":
        from reranker.jobs.ray_job import run_cli

        load, fingerprint = _job_settings(args, files, head_path)
        return run_cli(args, spec, files, head_path, load, fingerprint)
    # Everything that can be refused is refused before the model loads; the lock then keeps any
    # other job off this output (and rejects file) until this one ends, however it ends.
    check_job(spec, model=Path(files.gguf), head=head_path)
    with JobLock(spec.files()):
        try:
            _score(args, spec, files, head_path)
        except OSError as e:  # the writers name their files; this catches what they cannot foresee
            raise RerankerError(f"{e.filename or args.output}: {e.strerror or e}") from e


def _job_settings(args: argparse.Namespace, files, head_path: Path) -> tuple[dict, dict]:
    """(`from_pretrained` keyword arguments but model and head, the job's model fingerprint): the same for every engine."""
    from reranker.engine.identity import use_bf16
    from reranker.jobs.job import model_fingerprint

    max_length = args.max_length or min(MAX_LENGTH, args.n_ctx or MAX_LENGTH)
    load = dict(n_ctx=args.n_ctx, n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                max_length=max_length, max_query_length=args.max_query_length, deterministic=args.deterministic)
    bf16, _ = use_bf16(bf16_option(args), args.n_gpu_layers, files.gguf)  # decided once, so every worker loads the same copy
    load["bf16"] = bf16
    settings = {"fast": True, "identity_dtype": IDENTITY_DTYPE}
    if bf16:  # BF16 mat-muls round activations differently: a job is not resumed across the two
        settings["bf16"] = True
    if args.deterministic:  # other summation orders: a job is not resumed across the two either
        settings["deterministic"] = True
    return load, model_fingerprint(files.gguf, head_path, settings)


def _score(args: argparse.Namespace, spec, files, head_path: Path) -> None:
    from reranker.api import Reranker
    from reranker.engine.backbone import VocabOnly
    from reranker.engine.identity import fast_path_gguf, file_weights
    from reranker.engine.prompts import PromptBuilder
    from reranker.engine.scoring import score_prompts
    from reranker.jobs.devices import DevicePool, parse_devices
    from reranker.jobs.job import Job, JobAlreadyDone, write_summary
    from reranker.jobs.progress import Progress, count_records
    from reranker.jobs.readers import detect_input_format

    load, fingerprint = _job_settings(args, files, head_path)
    max_length, bf16 = load["max_length"], load["bf16"]
    load = dict(model=str(files.gguf), head=str(head_path), **load)
    devices = parse_devices(args.devices)

    pool = reranker = None
    # A GPU other than the first must be pinned before CUDA starts, so it gets a process too.
    if len(devices) > 1 or devices[:1] not in ([], ["cpu"], ["0"]):
        copy = fast_path_gguf(files.gguf, IDENTITY_DTYPE, bf16, args.n_gpu_layers)  # written once, before the workers race for it
        weights = file_weights(copy)
        tokenizer = VocabOnly(files.gguf).tokenizer
        pool = DevicePool(devices, load, keep_hidden=spec.hidden is not None)
        scorer = pool
        hidden_size = _n_embd(files.gguf)
    else:
        device_kw = {"n_gpu_layers": 0, "device": "cpu"} if devices == ["cpu"] else {}
        reranker = Reranker.from_pretrained(**{**load, **device_kw, "device": resolve_device(args.device) if args.device else device_kw.get("device")})
        tokenizer = reranker.backbone.tokenizer
        weights = reranker.weights_dtype
        hidden_size = reranker.backbone.n_embd

        def scorer(windows):
            for w in windows:
                scored = score_prompts(reranker, w.prompts, keep_hidden=spec.hidden is not None)  # states of the same decode
                w.hidden = scored.hidden
                yield w, scored.scores

    builder = PromptBuilder(tokenizer, min(max_length, args.n_ctx or max_length), load["max_query_length"])
    fmt = detect_input_format(args.input, args.input_format, beir_files=args.input is None)
    progress = None
    try:
        job = Job(spec, builder, scorer, fingerprint, model_name=str(args.model), hidden_size=hidden_size)
        try:
            start = job.checkpoint.load() if not args.restart else None
        except RerankerError:
            start = None
        initial = start["consumed"] if start else 0
        progress = Progress(total=count_records(args.input, fmt) if args.input else None, initial=initial, quiet=args.quiet)
        job.progress = progress
        t = time.perf_counter()
        try:
            stats = job.run()
        except JobAlreadyDone as done:
            print(f"reranker score: {args.output} is already complete ({done.stats.pairs} pairs); "
                  "pass --restart to score it again", file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(f"reranker score: interrupted; {job.stats.pairs} pairs are saved. Rerun the same command to resume.",
                  file=sys.stderr)
            raise
        wall = time.perf_counter() - t
    finally:
        if progress is not None:
            progress.close()
        if pool is not None:
            pool.close()
        if reranker is not None:
            reranker.close()
    summary = write_summary(spec, stats, wall, progress.pairs, progress.tokens, extra={"weights": weights})
    print(f"reranker score: {summary['pairs']} pairs ({summary['queries']} records), {summary['tokens']} tokens, "
          f"{summary['truncated']} truncated, {summary['skipped']} skipped; this run {summary['pairs_this_run']} pairs "
          f"in {summary['wall_seconds']:.1f} s ({summary['pairs_per_second']} pairs/s, "
          f"{summary['tokens_per_second']} tokens/s) -> {args.output}", file=sys.stderr)
    if spec.chunking is not None:
        print(f"reranker score: {summary['chunked']} documents chunked, {summary['capped']} of them had more than "
              f"--max-chunks {spec.chunking.max_chunks} chunks (their ends were not scored)", file=sys.stderr)


def _n_embd(gguf) -> int:
    """The model's hidden size from the GGUF header (for the device pool, whose backbones load elsewhere)."""
    from reranker.gguf.header import header_value

    arch = header_value(gguf, "general.architecture")
    return int(header_value(gguf, f"{arch}.embedding_length"))
