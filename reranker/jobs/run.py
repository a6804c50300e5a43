"""Run an offline job: `run_job(spec, settings, ...)` for the local engine and the Ray engine.

Both engines share one preflight (`preflight`), after the optional packages the job needs are checked
(`require_extras`: pyarrow for Parquet, Ray for `--engine ray`, before the model is resolved or any file is
written, so a missing one costs nothing and leaves no checkpoint behind): the model is resolved, `bf16` decided once (so every
process loads the same copy), the job's fingerprint made from the files and `LoadSettings.fingerprint()`,
and every path checked against every file read before anything loads; the caller of `run_job` then
gets the job's summary back (nothing here prints; progress goes to a tqdm bar or the log).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from reranker.defaults import HEAD_FILE
from reranker.errors import RerankerError
from reranker.jobs.images import ImageSettings
from reranker.jobs.job import JobSpec, model_fingerprint
from reranker.jobs.resume import file_fingerprint
from reranker.settings import LoadSettings

log = logging.getLogger("reranker.jobs")


@dataclass(frozen=True)
class Summary:
    """What a run did: `values` is the job's summary (as saved in `OUTPUT.summary.json`; for a job that
    was already complete, its totals); `already_complete`: nothing was left to score."""

    values: dict = field(default_factory=dict)
    already_complete: bool = False

    def __getitem__(self, key: str):
        return self.values[key]


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the job; what was written is kept (`pairs` scored in all), and a rerun resumes."""

    def __init__(self, pairs: int) -> None:
        super().__init__(f"interrupted; {pairs} pairs are saved")
        self.pairs = pairs


@dataclass(frozen=True)
class Preflight:
    """A job's model, settings and fingerprint, checked before anything loads."""

    gguf: Path
    head: Path
    settings: LoadSettings  # model, head and mmproj resolved to paths, bf16 decided
    fingerprint: dict
    images: ImageSettings | None = None  # the projector (if any) and sizing of image documents


def preflight(spec: JobSpec, settings: LoadSettings) -> Preflight:
    """Resolve the model, head and vision projector, decide `bf16`, and make the job's model fingerprint
    (no file is written). The projector is `settings.mmproj`, else the `mmproj-*.gguf` beside the GGUF; with
    one, the fingerprint's `vision` part records it and the image sizing (a text job's scores do not use it)."""
    from reranker.engine.vision import find_mmproj
    from reranker.gguf.header import check_file
    from reranker.gguf.hub import resolve
    from reranker.images.preprocess import Sizing

    files = resolve(settings.model, settings.quant, cache_dir=settings.cache_dir, local_files_only=settings.local_files_only)
    if settings.head is not None and not isinstance(settings.head, (str, os.PathLike)):
        raise RerankerError("a job loads its head from a file; give its path (head='path/to/mlp_weights.npz')")
    head = Path(settings.head) if settings.head is not None else files.head
    if head is None:
        raise RerankerError(f"no {HEAD_FILE} beside {files.gguf}; pass --head path/to/{HEAD_FILE}")
    if settings.mmproj is not None:
        mmproj = check_file(settings.mmproj, "vision projector (--mmproj)", "give the mmproj-*.gguf made with this model").resolve()
    else:
        mmproj = find_mmproj(files.gguf)
        mmproj = mmproj.resolve() if mmproj is not None else None
    # bf16 decided once, so every worker loads the same copy; every worker and actor loads the same projector
    resolved = settings.replace(model=str(files.gguf), head=str(head), quant=None,
                                mmproj=str(mmproj) if mmproj else None).decide_bf16(files.gguf)
    images = ImageSettings(mmproj, Sizing(), Path(files.gguf))
    fingerprint = model_fingerprint(files.gguf, head, resolved.fingerprint())
    if mmproj is not None:
        fingerprint["vision"] = images.fingerprint(file_fingerprint(mmproj))
    return Preflight(Path(files.gguf), head, resolved, fingerprint, images)


def require_extras(spec: JobSpec, engine: str = "local") -> None:
    """The optional packages `spec` needs on `engine`, or a RerankerError naming the one missing and its install command."""
    from reranker.extras import require
    from reranker.jobs.readers import detect_input_format
    from reranker.jobs.writers import detect_output_format

    if engine == "ray":  # Ray Data reads every input and writes Parquet parts (the extra brings pyarrow)
        require("ray", "--engine ray")
        return
    def parquet(detect, path, given) -> bool:
        try:
            return detect(path, given) == "parquet"
        except RerankerError:  # an undetectable format (or a pipe) is refused by the input's own checks, with their fix
            return False

    if spec.input is not None and parquet(detect_input_format, spec.input, spec.input_format):
        require("parquet", f"reading {spec.input}")
    if parquet(detect_output_format, spec.output, spec.output_format):
        require("parquet", f"writing {spec.output}")


def run_job(spec: JobSpec, settings: LoadSettings, *, devices: str | None = None, engine: str = "local",
            ray_options=None, quiet: bool = False) -> Summary:
    """Score `spec`'s input with the model `settings` describe; resumes where an earlier run stopped.

    `devices` (local engine): one backbone process per device ("0,1", "all", "cpu,cpu"); `engine`
    "ray" runs on a Ray cluster (`ray_options`: a `RayOptions`). `quiet`: no progress bar. Everything that
    can be refused is refused before the model loads; the job then holds `OUTPUT.lock` until it ends.
    Raises `JobInterrupted` on Ctrl-C (what was written is kept).
    """
    from reranker.jobs.paths import JobLock

    if spec.input is None and not (spec.queries and spec.corpus and spec.run):
        raise RerankerError("give -i INPUT, or --queries, --corpus and --run for BEIR files")
    if engine not in ("local", "ray"):
        raise RerankerError(f"engine={engine!r} must be 'local' or 'ray'")
    if engine == "local":
        require_extras(spec, engine)  # the Ray engine's own checks of its flags come first
    if engine == "ray":
        from reranker.jobs.ray_job import RayOptions, check_ray_job

        for flag, used in (("--chunk", spec.chunking is not None), ("--save-hidden", spec.hidden is not None)):
            if used:
                raise RerankerError(f"{flag} is not supported with --engine ray yet; use the local engine for it")
        if devices:
            raise RerankerError("--devices chooses the local engine's processes; with --engine ray give --actors N")
        require_extras(spec, engine)  # before the model is resolved: the one-line install hint comes first
        ray_options = ray_options or RayOptions()
        pre = preflight(spec, settings)
        check_ray_job(spec, ray_options, model=pre.gguf, head=pre.head, mmproj=pre.images.mmproj)
    else:
        from reranker.jobs.job import check_job

        pre = preflight(spec, settings)
        check_job(spec, model=pre.gguf, head=pre.head, mmproj=pre.images.mmproj)
    with JobLock(spec.files()):  # no other job on this output (and rejects file) until this one ends, however it ends
        try:
            if engine == "ray":
                return _run_ray(spec, pre, settings, ray_options, quiet)
            return _run_local(spec, pre, settings, devices, quiet)
        except OSError as e:  # the writers name their files; this catches what they cannot foresee
            raise RerankerError(f"{e.filename or spec.output}: {e.strerror or e}") from e


def _run_ray(spec: JobSpec, pre: Preflight, given: LoadSettings, options, quiet: bool) -> Summary:
    from reranker.jobs.ray_job import RayJob

    # Actors get absolute paths for local files (their working folder is not the driver's) and the
    # Hub id itself otherwise, so each node resolves it through its own Hub cache.
    local = os.path.exists(given.model)
    model = str(pre.gguf.resolve()) if local else given.model
    head = str(Path(given.head).resolve()) if given.head else (str(pre.head.resolve()) if local else None)
    summary = RayJob(spec, pre.settings.replace(model=model, head=head), pre.fingerprint, options, quiet=quiet,
                     images=pre.images, gguf=pre.gguf).run()
    return Summary(summary, already_complete=summary["pairs_this_run"] == 0 and summary["shards_skipped"] > 0)


def _run_local(spec: JobSpec, pre: Preflight, given: LoadSettings, devices: str | None, quiet: bool) -> Summary:
    from reranker.api import Reranker
    from reranker.engine.backbone import VocabOnly
    from reranker.engine.identity import fast_path_gguf, file_weights
    from reranker.engine.prompts import PromptBuilder
    from reranker.engine.scoring import score_prepared
    from reranker.gguf.header import header_value
    from reranker.jobs.devices import DevicePool, parse_devices
    from reranker.jobs.job import Job, JobAlreadyDone, write_summary
    from reranker.jobs.progress import Progress, count_records
    from reranker.jobs.readers import detect_input_format

    settings = pre.settings
    keep_hidden = spec.hidden is not None
    devs = parse_devices(devices)
    pool = reranker = None
    # A GPU other than the first must be pinned before CUDA starts, so it gets a process too.
    if len(devs) > 1 or devs[:1] not in ([], ["cpu"], ["0"]):
        # The fast path's copy is written once, here, before the workers race for it.
        weights = file_weights(fast_path_gguf(pre.gguf, settings.identity_dtype, settings.bf16, settings.n_gpu_layers)
                               if settings.fast else pre.gguf)
        tokenizer = VocabOnly(pre.gguf).tokenizer
        pool = DevicePool(devs, settings, keep_hidden=keep_hidden)
        scorer = pool
        arch = header_value(pre.gguf, "general.architecture")
        hidden_size = int(header_value(pre.gguf, f"{arch}.embedding_length"))
    else:
        if devs == ["cpu"]:
            settings = settings.replace(n_gpu_layers=0, device=given.device or "cpu")
        reranker = Reranker.from_settings(settings)
        tokenizer = reranker.backbone.tokenizer
        weights = reranker.weights_dtype
        hidden_size = reranker.backbone.n_embd

        def scorer(windows):
            for w in windows:  # hidden states from the same decode as the scores
                yield w, score_prepared(reranker, w.prepared, keep_hidden=keep_hidden)

    max_length = settings.prompt_length
    builder = PromptBuilder(tokenizer, min(max_length, settings.n_ctx or max_length), settings.max_query_length,
                            settings.max_doc_length)
    fmt = detect_input_format(spec.input, spec.input_format, beir_files=spec.input is None)
    progress = None
    try:
        job = Job(spec, builder, scorer, pre.fingerprint, model_name=str(given.model), hidden_size=hidden_size,
                  images=pre.images)
        try:
            start = job.checkpoint.load() if not spec.restart else None
        except RerankerError:
            start = None
        progress = Progress(total=count_records(spec.input, fmt) if spec.input else None,
                            initial=start["consumed"] if start else 0, quiet=quiet)
        job.progress = progress
        t = time.perf_counter()
        try:
            stats = job.run()
        except JobAlreadyDone as done:
            from dataclasses import asdict

            return Summary(asdict(done.stats), already_complete=True)
        except KeyboardInterrupt:
            raise JobInterrupted(job.stats.pairs) from None
        wall = time.perf_counter() - t
    finally:
        if progress is not None:
            progress.close()
        if pool is not None:
            pool.close()
        if reranker is not None:
            reranker.close()
    return Summary(write_summary(spec, stats, wall, progress.pairs, progress.tokens, extra={"weights": weights}))
