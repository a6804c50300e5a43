"""`reranker score --engine ray`: the offline job on a Ray cluster, written per shard, resumable by shard.

The driver reads the input with the local job's readers, query-id rule and `--on-error` rules
(`read_input`, `one_run_per_query`, `job.cut_windows`), so it cuts exactly the local job's windows
of `--window` pairs, and groups them into shards of `--shard-windows` windows, cut only between
two queries. Rejects go to the rejects file as in the local job; with `--on-error fail` the
first bad record stops the job before anything is scored.

Each window not yet scored becomes one block (`ray.put`, owned by the driver) of the dataset that
`map_batches(RayReranker, ...)` scores on a fixed pool of actors, a window per call, so the
scores equal the local job's bit for bit where llama.cpp is deterministic (the CPU). An actor
killed mid-run is restarted by Ray and its block redone; the driver keys results by (shard, row)
and writes a shard only once every row is there, so each pair appears once.

Output: OUTPUT is a folder that `pyarrow.parquet.read_table(OUTPUT)`, `pandas.read_parquet` or
`ray.data.read_parquet` read as one table: `part-NNNNNN.parquet`, one per shard in input order,
with the local job's Parquet columns (query_id, doc_id, score float32, rank int32 within its
query), each written atomically (temporary file, fsync, rename), and `_manifest.json` (ignored
by readers: its name starts with `_`) with the job's fingerprint and, once finished, `done` and
the totals. A rerun (after the driver was killed, say) re-reads the input, skips every shard
whose part is complete, and scores the rest; a changed model, head, input or setting is refused
unless `--restart`. The summary goes to `OUTPUT.summary.json` and rejects to
`OUTPUT.rejects.jsonl` (or `--rejects`), beside the folder, as for the local job.

Image documents: the driver reads, decodes and sizes them as the local job does
(`images.load_window_images`, so the same images are rejected, in the same order, and the same
windows scored), and sends each as a lossless PNG of its model-size pixels in an `image` column,
which the actor loads back to the very same pixels (already at their size, so not resized again).
A rerun decodes the images of complete shards again: their rejects are written again. A part records the
sizes and modification times of its shard's image files (`images.chain_image_files`); a rerun scores a shard
again when they changed.

Memory: the driver holds the results of the shards in flight; the text (and sized images) of the
windows still to score sits in Ray's object store (spilled to disk beyond its size), so an input far
larger than one node's disk is best split into several files, one job each.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reranker.atomic import atomic_path, atomic_write, fsync_dir
from reranker.errors import RerankerError
from reranker.jobs.images import ImageSettings, chain_image_files, image_count, load_window_images
from reranker.jobs.job import JobSpec, Stats, Window, check_resumable, check_spec_settings, cut_windows, stop_error, write_summary
from reranker.jobs.paths import check_written, file_identity, input_files, same_file, writing
from reranker.jobs.progress import Progress
from reranker.jobs.readers import import_pyarrow, read_input
from reranker.jobs.resume import input_fingerprint
from reranker.jobs.validate import one_run_per_query
from reranker.jobs.writers import PARQUET_COMPRESSION, RejectsWriter, rank_table
from reranker.settings import LoadSettings

log = logging.getLogger("reranker.jobs")

MANIFEST = "_manifest.json"
VERSION = 1
SHARD_WINDOWS = 8


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


@dataclass
class RayOptions:
    """Where and how wide: `address` (None: `RAY_ADDRESS` or a new local cluster, "auto": the running
    one), `actors` (None: one per GPU of the cluster, else 1), CPUs per actor, windows per shard."""

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    shard_windows: int = SHARD_WINDOWS
    gpus: bool | None = None


@dataclass
class _Shard:
    index: int
    pairs: int = 0
    queries: int = 0
    records: int = 0
    image_files: str = ""  # `images.chain_image_files` over the shard's items: a part records the one it was scored from
    rows: list = field(default_factory=list)  # arrow tables back from the actors


def _shards(windows: Iterator[Window], size: int) -> Iterator[tuple[int, list[Window]]]:
    """Consecutive windows, `size` or more per shard, cut only where the next window starts another query."""
    group: list[Window] = []
    last_qid = None
    index = 0
    for w in windows:
        if len(group) >= size and w.units and w.units[0].query_id != last_qid:
            yield index, group
            index, group = index + 1, []
        group.append(w)
        if w.units:
            last_qid = w.units[-1].query_id
    if group:
        yield index, group


def check_ray_job(spec: JobSpec, options: RayOptions, model: Path | None = None, head: Path | None = None,
                  mmproj: Path | None = None) -> None:
    """Refuse before anything loads: bad settings, an output that is not a folder of ours, aliases of what is read."""
    check_spec_settings(spec)
    if options.shard_windows < 1:
        raise RerankerError(f"--shard-windows {options.shard_windows}: a shard holds at least 1 window")
    if options.actors is not None and options.actors < 1:
        raise RerankerError(f"--actors {options.actors}: run at least 1 actor")
    if spec.output_format not in (None, "parquet") or spec.per != "query":
        raise RerankerError("--engine ray writes a folder of Parquet parts; leave out --output-format and --per")
    out = spec.output
    if out.suffix.lower() in (".jsonl", ".ndjson", ".trec", ".run") or out.is_file():
        raise RerankerError(f"--engine ray writes a folder of Parquet parts, and {out} is a file name; give a folder for -o")
    files = spec.files()
    reads = spec.input_reads() + [(what, p) for what, p in (("model", model), ("head", head), ("vision projector", mmproj))
                                  if p is not None]
    written = [("output folder", out, True), ("rejects file", files.rejects, False), ("summary", files.summary, False),
               ("lock file", files.locks[0], False), ("rejects lock file", files.locks[1], False)]
    for what, path, folder in written:
        check_written(files, what, path, folder)
    out_real = os.path.realpath(out)
    for what, path, _ in written:
        for other, other_path in reads:
            if same_file(file_identity(path), file_identity(other_path)) or os.path.realpath(other_path).startswith(out_real + os.sep):
                raise RerankerError(f"the {what} {path} is or holds the {other} {other_path}: the job would overwrite it; "
                                    f"choose another {files.flag(what)}")
    items = read_input(spec.input, spec.input_format, depth=spec.depth, queries=spec.queries, corpus=spec.corpus, run=spec.run)
    close = getattr(items, "close", None)
    if close is not None:
        close()


class RayJob:
    """One run of the Ray job: check the folder, re-read the input, score the shards not done, finish."""

    def __init__(self, spec: JobSpec, settings: LoadSettings, fingerprint: dict, options: RayOptions,
                 quiet: bool = False, images: ImageSettings | None = None, gguf: Path | None = None) -> None:
        """`settings`: what each actor loads (`model` and `head` as each node finds them: absolute paths or a Hub id).
        `images`: the projector and sizing of image documents; `gguf`: the model on this node, whose tokenizer
        checks on the driver that each image fits `max_length` (needed only when the input has images)."""
        self.images, self.gguf = images, gguf
        self._builder = None
        self.pa, self.pq = import_pyarrow("--engine ray")
        self.spec, self.settings, self.options, self.quiet = spec, settings, options, quiet
        self.out = spec.output
        self.fingerprint = {**fingerprint, "input": input_fingerprint(input_files(spec.input_reads())),
                            "settings": {**fingerprint.get("settings", {}), "engine": "ray", "input_format": spec.input_format,
                                         "depth": spec.depth, "window": spec.window, "shard_windows": options.shard_windows,
                                         "max_length": settings.prompt_length, "max_query_length": settings.max_query_length,
                                         **({"max_doc_length": settings.max_doc_length} if settings.max_doc_length else {})}}
        self.stats = Stats()
        self.run_pairs = self.run_tokens = 0
        self.skipped_shards = 0

    # --- the folder ------------------------------------------------------------------------

    def _manifest(self) -> Path:
        return self.out / MANIFEST

    def _rejects_id(self) -> str:
        return os.path.realpath(self.spec.files().rejects)

    def _save_manifest(self, **extra: Any) -> None:
        with writing(self._manifest(), "manifest"), atomic_write(self._manifest(), "w") as f:
            json.dump({"version": VERSION, "fingerprint": self.fingerprint, "rejects_path": self._rejects_id(), **extra}, f, indent=1)

    def _open_folder(self) -> None:
        """Resume into the folder when its manifest matches, start it (empty) otherwise; never touch a foreign file."""
        out = self.out
        names = [p.name for p in out.iterdir()] if out.is_dir() else []
        ours = [out / n for n in names if _ours(n)]
        foreign = [n for n in names if not _ours(n)]
        if foreign:
            raise RerankerError(f"{out} holds {', '.join(sorted(foreign)[:3])}, which this job did not write; "
                                "move it elsewhere or choose another -o")
        state = None
        if self._manifest().is_file():
            try:
                state = json.loads(self._manifest().read_text())
            except (OSError, ValueError) as e:
                if not self.spec.restart:
                    raise RerankerError(f"{self._manifest()} is unreadable ({e}); rerun with --restart to start over") from e
        if state is not None and not self.spec.restart:
            if state.get("version") != VERSION:
                raise RerankerError(f"{self._manifest()} was written by another version; rerun with --restart to start over")
            check_resumable(state, self.fingerprint, out, self._rejects_id())
        elif not self.spec.restart:
            rejects = self.spec.files().rejects
            if ours:
                raise RerankerError(f"{out} holds parts that no job of this folder recorded; pass --restart to overwrite them, "
                                    "or choose another -o")
            if rejects.exists():
                raise RerankerError(f"rejects file {rejects} exists and no unfinished job of {out} recorded it; pass --restart "
                                    f"to overwrite it, or choose another {self.spec.files().flag('rejects file')}")
        with writing(out, "output folder"):
            out.mkdir(parents=True, exist_ok=True)
            for p in ours:  # temporary files of killed writes always; everything with --restart
                if self.spec.restart or p.name.startswith("."):
                    p.unlink()
            fsync_dir(out)
        self._save_manifest(done=False)

    def _complete(self, shard: _Shard) -> bool:
        path = self.out / part_name(shard.index)
        if not path.is_file():
            return False
        try:
            meta = self.pq.read_metadata(path)
        except Exception:  # an unreadable part is scored again  # noqa: BLE001
            return False
        kv = meta.metadata or {}
        if meta.num_rows != shard.pairs or kv.get(b"reranker.image_files", b"").decode() != shard.image_files:
            return False  # changed image files: the part is scored again from them
        self.stats.tokens += int(kv.get(b"reranker.tokens", b"0"))
        self.stats.truncated += int(kv.get(b"reranker.truncated", b"0"))
        return True

    def _write_part(self, shard: _Shard) -> tuple[int, int]:
        """Write a shard whose rows are all back; returns (tokens, truncated)."""
        pa, pq = self.pa, self.pq
        table = pa.concat_tables(shard.rows) if shard.rows else None
        if table is not None and table.num_rows:
            pos = table.column("_pos").to_numpy()
            _, first = np.unique(pos, return_index=True)  # a block Ray redid after a crash counts once
            table = table.take(pa.array(first[np.argsort(pos[first], kind="stable")]))
        tokens = int(pa.compute.sum(table.column("_tokens")).as_py() or 0) if table is not None and table.num_rows else 0
        truncated = int(pa.compute.sum(table.column("_truncated").cast(pa.int32())).as_py() or 0) if tokens else 0
        schema = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float32())])
        base = table.select(["query_id", "doc_id", "score"]).cast(schema) if table is not None and table.num_rows else \
            pa.table({n: pa.array([], schema.field(n).type) for n in schema.names})
        part = rank_table(pa, base).replace_schema_metadata({"reranker.tokens": str(tokens), "reranker.truncated": str(truncated),
                                                             "reranker.image_files": shard.image_files})
        path = self.out / part_name(shard.index)
        with writing(path, "part"), atomic_path(path) as tmp:
            pq.write_table(part, tmp, compression=PARQUET_COMPRESSION)
        shard.rows = []
        return tokens, truncated

    # --- reading ---------------------------------------------------------------------------

    def _read(self, rejects: RejectsWriter) -> tuple[dict[int, _Shard], list, int]:
        """Re-read the whole input: every shard's size, the rejects file, and the windows still to score."""
        pa, spec = self.pa, self.spec
        items = one_run_per_query(read_input(spec.input, spec.input_format, depth=spec.depth, queries=spec.queries,
                                             corpus=spec.corpus, run=spec.run))
        pending: dict[int, _Shard] = {}
        blocks: list = []
        shards = 0
        window_no = 0
        loaded = self._load_images(cut_windows(items, 0, spec.window, spec))
        for index, windows in _shards(loaded, self.options.shard_windows):
            shards += 1
            shard = _Shard(index)
            for w in windows:
                for r in w.rejects:
                    rejects.write(r)
                self.stats.skipped += len(w.rejects)
                shard.pairs += sum(len(u.docs) for u in w.units)
                shard.queries += sum(u.opens_query for u in w.units)
                shard.records += len({u.source for u in w.units} | {r.source for r in w.rejects})
                for item in w.items:
                    shard.image_files = chain_image_files(shard.image_files, item)
            self.stats.queries += shard.queries
            self.stats.pairs += shard.pairs
            if self._complete(shard):
                self.skipped_shards += 1
                continue
            pending[index] = shard
            row = 0
            for w in windows:
                if not w.units:
                    continue
                cols: dict[str, list] = {"query_id": [], "query": [], "doc_id": [], "document": []}
                pictures: list[bytes | None] = []
                sides = w.sides or [[doc for _, doc in u.docs] for u in w.units]
                for u, docs in zip(w.units, sides):
                    for (doc_id, _), doc in zip(u.docs, docs):
                        cols["query_id"].append(u.query_id)
                        cols["query"].append(u.query)
                        cols["doc_id"].append(doc_id)
                        cols["document"].append(doc if isinstance(doc, str) else None)
                        pictures.append(None if isinstance(doc, str) else _png(doc))
                n = len(cols["query"])
                table = pa.table({**{k: pa.array(v, pa.string()) for k, v in cols.items()},
                                  "image": pa.array(pictures, pa.binary()),
                                  "_shard": pa.array(np.full(n, index, dtype=np.int64)),
                                  "_pos": pa.array(np.arange(row, row + n, dtype=np.int64)),
                                  "_window": pa.array(np.full(n, window_no, dtype=np.int64))})
                blocks.append(self._put(table))
                row += n
                window_no += 1
        return pending, blocks, shards

    def _load_images(self, windows: Iterator[Window]) -> Iterator[Window]:
        """Each window with its image documents read and sized, bad ones rejected, as the local job's reader does."""
        fail = (lambda r: stop_error(self.spec, r)) if self.spec.on_error == "fail" else None
        for w in windows:
            if any(image_count(u) for u in w.units):
                w.units, w.rejects, w.sides = load_window_images(w.items, self._prompt_builder(), self.images, fail)
            yield w

    def _prompt_builder(self):
        if self._builder is None:
            from reranker.engine.backbone import VocabOnly
            from reranker.engine.prompts import PromptBuilder

            s = self.settings
            if self.gguf is None:
                raise RerankerError("image documents with --engine ray need the model on the driver's node")
            max_length = s.prompt_length
            self._vocab = VocabOnly(self.gguf)  # kept open: the builder tokenises through it
            self._builder = PromptBuilder(self._vocab.tokenizer, min(max_length, s.n_ctx or max_length), s.max_query_length,
                                          s.max_doc_length)
        return self._builder

    def _put(self, table: Any) -> Any:
        import ray

        if not ray.is_initialized():  # only once there is something to score
            ray.init(address=self.options.address, log_to_driver=not self.quiet,
                     **({} if self.options.address else {"include_dashboard": False}))
        return ray.put(table)

    # --- running ---------------------------------------------------------------------------

    def run(self) -> dict:
        """Score every shard not yet written, finish the folder; returns the summary."""
        from reranker.jobs.ray_data import RayReranker, actor_options, require_ray

        ray = require_ray()
        self._open_folder()
        t = time.perf_counter()
        # The whole input is re-read, its rejects written again, complete, beside the last run's: they replace
        # them once the read is through, so a read stopped by a bad record (--on-error fail) leaves them as they were.
        final = self.spec.files().rejects
        fresh = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        rejects = RejectsWriter(fresh, create=self.spec.on_error == "skip")
        rejects.resume({})
        try:
            pending, blocks, shards = self._read(rejects)
            rejects.commit()
        except BaseException:
            rejects.close(final=False)
            fresh.unlink(missing_ok=True)
            raise
        finally:
            if self._builder is not None:  # the images' fit is checked: the driver's tokenizer is done
                self._vocab.close()
                self._builder = None
        rejects.close(final=True)
        with writing(final, "rejects file"):
            if fresh.exists():
                os.replace(fresh, final)
            elif final.exists():  # none this run, and --on-error fail made no file: emptied, as a local job's
                open(final, "wb").close()
        progress = Progress(quiet=self.quiet)
        try:
            if blocks:
                self._score(ray, pending, blocks, RayReranker, actor_options, progress)
            elif self.skipped_shards:
                log.info("%s: all %d shards were already complete", self.out, shards)
        finally:
            progress.close()
        for shard in pending.values():
            if shard.pairs == 0:  # a shard of rejects only: an empty part says it is done
                self._write_part(shard)
            elif not (self.out / part_name(shard.index)).is_file():
                raise RerankerError(f"shard {shard.index} of {self.out} got no results; rerun the same command to resume")
        with writing(self.out, "output folder"):
            fsync_dir(self.out)
        wall = time.perf_counter() - t
        self._save_manifest(done=True, shards=shards, stats=asdict(self.stats))
        return write_summary(self.spec, self.stats, wall, self.run_pairs, self.run_tokens,
                             extra={"engine": "ray", "shards": shards, "shards_skipped": self.skipped_shards,
                                    "actors": self._actors(ray)})

    def _actors(self, ray: Any) -> int:
        if self.options.actors:
            return self.options.actors
        return max(1, int(ray.cluster_resources().get("GPU", 0))) if ray.is_initialized() else 1

    def _score(self, ray: Any, pending: dict[int, _Shard], blocks: list, scorer: type, actor_options: Any,
               progress: Progress) -> None:
        from reranker.jobs.ray_data import map_batches_quietly

        opts = actor_options(self._actors(ray), gpus=self.options.gpus, cpus_per_actor=self.options.cpus_per_actor)
        settings = self.settings
        if settings.n_threads is None and not opts["num_gpus"]:  # llama.cpp threads within the actor's share
            settings = settings.replace(n_threads=max(1, int(self.options.cpus_per_actor)))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not self.quiet
        # One block per window, scored whole (`group_column`); the texts do not travel back.
        kwargs = {"settings": settings, "group_column": "_window", "stats": True, "drop": ("query", "document", "image")}
        ds = map_batches_quietly(ray.data.from_arrow_refs(blocks), scorer, fn_constructor_kwargs=kwargs,
                                 batch_format="pyarrow", batch_size=None, **opts)
        try:
            self._collect(ds, pending, progress)
        except RerankerError:
            raise
        except Exception as e:  # Ray wraps what an actor raised: show the cause, one line
            raise RerankerError(f"the Ray job stopped: {_cause(e)}; the parts written are kept: fix it and rerun the same "
                                "command to resume") from e

    def _collect(self, ds: Any, pending: dict[int, _Shard], progress: Progress) -> None:
        """Gather the actors' rows by shard; write each shard as soon as all its rows are back.

        Rows are keyed by (shard, row): a row seen twice (a block redone after a crash) counts once,
        and rows of a shard already written are dropped.
        """
        remaining = {i: s.pairs for i, s in pending.items()}
        seen: dict[int, set] = {i: set() for i in pending}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if not batch.num_rows:
                continue
            shard_ids = batch.column("_shard").to_numpy()
            for index in np.unique(shard_ids):
                index = int(index)
                if index not in seen:  # written already
                    continue
                rows = batch.filter(self.pa.array(shard_ids == index))
                shard = pending[index]
                shard.rows.append(rows)
                seen[index].update(rows.column("_pos").to_numpy().tolist())
                if len(seen[index]) == remaining[index]:
                    tokens, truncated = self._write_part(shard)
                    self.stats.tokens += tokens
                    self.stats.truncated += truncated
                    self.run_pairs += shard.pairs
                    self.run_tokens += tokens
                    progress.update(shard.records, shard.pairs, tokens)
                    del seen[index]


def _png(image: Any) -> bytes:
    """A sized image (`PendingImage`) as lossless PNG bytes: the actor decodes the very same pixels."""
    buf = io.BytesIO()
    image.pixels.image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _cause(e: BaseException) -> str:
    """What went wrong, on one line, from an exception Ray wrapped: the `RerankerError` an actor raised
    (Ray passes it on as text in the message of an `ActorDiedError`), else the innermost message."""
    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and all(x is not c for c in chain):
        chain.append(x)
        x = getattr(x, "cause", None) or x.__cause__ or x.__context__
        x = x if isinstance(x, BaseException) else None
    for x in chain:
        if isinstance(x, RerankerError):
            return str(x)
    for x in chain:
        for line in reversed(str(x).splitlines()):
            m = re.match(r"\s*[\w.]*(?:RerankerError|HeadLoadError): (.+)", line)
            if m:
                return m.group(1)
    for x in chain:
        lines = [ln.strip() for ln in str(x).splitlines() if ln.strip()]
        if lines:
            return f"{type(x).__name__}: {lines[-1]}"[:500]
    return type(e).__name__


def _ours(name: str) -> bool:
    """Names this job writes in its folder: parts, the manifest, and their temporary files."""
    if name == MANIFEST:
        return True
    if name.startswith(".") and ".tmp-" in name:
        stem = name[1:].split(".tmp-")[0]
        return stem == MANIFEST or _is_part(stem)
    return _is_part(name)


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit()
