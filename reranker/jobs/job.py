"""The offline scoring job: stream an input, score it, write results; crash-safe and resumable.

Items (units and rejects) are read in order and grouped into windows of about `window`
pairs (and at most `images.WINDOW_IMAGES` image documents). A window is tokenised on a background
thread while the previous one decodes (its image documents read, decoded and sized there too:
`images.load_window_images`), and
written, made durable and checkpointed on another. The checkpoint records how many input
items are done and each writer's durable state, so a rerun after any crash (SIGKILL
included) truncates the output to the last checkpoint and carries on from there: no
result lost, none duplicated, no torn line. A resume reads past the items done (scoring none) and
refuses to go on when the image files they read changed since (`images.chain_image_files`), as it
refuses a changed input file.

Before anything loads, `check_job` refuses arguments and paths that could destroy data (see
`paths.py`: an output that is an input, a special file, a rejects file that is the head, ...);
the caller then holds `paths.JobLock` for the whole job, so no two jobs share an output. Items
pass `validate.one_run_per_query` (one run of records per query id, each pair once) on the
way from the reader to the windows, on resume too.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from reranker.atomic import atomic_write
from reranker.defaults import RUN_TAG, WINDOW
from reranker.engine.prompts import PromptBuilder
from reranker.engine.scoring import Prepared, ScoredDocuments, prepare
from reranker.errors import RerankerError
from reranker.jobs.images import WINDOW_IMAGES, ImageSettings, chain_image_files, image_count, load_window_images
from reranker.jobs.paths import JobFiles, check_job_files, input_files, input_reads, writing
from reranker.jobs.progress import Progress
from reranker.jobs.readers import read_input
from reranker.jobs.records import Reject, Unit
from reranker.jobs.resume import Checkpoint, changed_parts, file_fingerprint, input_fingerprint
from reranker.jobs.validate import ids_a_trec_run_can_carry, one_run_per_query
from reranker.jobs.writers import RejectsWriter, check_run_tag, detect_output_format, open_writer
from reranker.options import Chunking, default_max_doc_length

log = logging.getLogger(__name__)


@dataclass
class JobSpec:
    """What to read, where to write, and the choices that change the results."""

    input: Path | None
    output: Path
    input_format: str | None = None
    output_format: str | None = None
    per: str = "query"
    depth: int = 100
    queries: Path | None = None
    corpus: Path | None = None
    run: Path | None = None
    on_error: str = "fail"
    rejects: Path | None = None
    window: int = WINDOW
    restart: bool = False
    run_tag: str = RUN_TAG
    chunking: Chunking | None = None  # None: documents are truncated; else chunked, scored and aggregated
    hidden: Path | None = None  # `--save-hidden`: also write each pair's last hidden state (jobs/hidden.py)
    hidden_dtype: str = "float32"

    def files(self) -> JobFiles:
        """Every path the job writes: OUTPUT, its companions, the rejects file (and the hidden-state files)."""
        return JobFiles.of(self.output, self.rejects, self.hidden)

    def rejects_path(self) -> Path:
        return self.files().rejects

    def input_reads(self) -> list[tuple[str, Path]]:
        """(what, path) of the inputs read (BEIR: the folder and the files found in it), checked."""
        return input_reads(self.input, self.input_format, self.queries, self.corpus, self.run)


def _shown(value) -> str:
    """A job setting as a user passes it: flags as on/off (an absent flag is off)."""
    return "off" if value in (None, False) else "on" if value is True else str(value)


def check_resumable(state: dict, fingerprint: dict, output: Path, rejects_id: str) -> None:
    """Refuse to resume `output` from a checkpoint `state` made with other settings or another rejects file."""
    old = state.get("fingerprint", {})
    changed = changed_parts(old, fingerprint)
    if changed:
        hint = ""
        if "settings" in changed:  # name the settings, so a changed default (--bf16 auto) can be set back
            was, now = old.get("settings") or {}, fingerprint.get("settings") or {}
            diff = [f"{k}: {_shown(was.get(k))} -> {_shown(now.get(k))}" for k in sorted({*was, *now}) if was.get(k) != now.get(k)]
            hint = f" ({'; '.join(diff)}: pass the options it was started with to resume)" if diff else ""
        raise RerankerError(f"{output} was started with a different {', '.join(changed)}{hint}; "
                            "rerun with --restart to start over, or write to another -o")
    if state.get("rejects_path") != rejects_id:
        raise RerankerError(f"{output} was started with the rejects file {state.get('rejects_path')}; "
                            "pass that --rejects to resume, or --restart to start over")


def check_spec_settings(spec: JobSpec) -> None:
    """The settings every engine shares: window, depth and the error rule."""
    if spec.window < 1:
        raise RerankerError(f"--window {spec.window}: a window holds at least 1 pair")
    if spec.depth < 1:
        raise RerankerError(f"--depth {spec.depth}: rerank at least 1 candidate per query")
    if spec.on_error not in ("fail", "skip"):
        raise RerankerError(f"on_error={spec.on_error!r} must be 'fail' or 'skip'")
    check_run_tag(spec.run_tag)  # before a checkpoint records it (the TREC writer checks it again, too late for that)


def check_job(spec: JobSpec, model: Path | None = None, head: Path | None = None, mmproj: Path | None = None) -> None:
    """Refuse, before the model loads or any file is touched, a job that cannot run or could destroy data.

    Checks the settings, the formats, every path (see `paths.check_job_files`: no output or
    companion may be or alias an input, the model, the head or each other, and only regular
    files are written), and opens the input once (a Parquet footer, a BEIR folder's files).
    """
    check_spec_settings(spec)
    if spec.per not in ("query", "pair"):
        raise RerankerError(f"per={spec.per!r} must be 'query' or 'pair'")
    detect_output_format(spec.output, spec.output_format)
    if spec.hidden is not None:
        from reranker.jobs.hidden import check_hidden_path

        check_hidden_path(spec.hidden, spec.hidden_dtype)
        if spec.chunking is not None and spec.chunking.aggregate == "mean":
            raise RerankerError("--save-hidden with --aggregate mean: a mean of chunk scores is no one hidden state's "
                                "score; use --aggregate max or first (the saved state is then the scoring chunk's)")
    reads = spec.input_reads()
    check_job_files(spec.files(), reads + [(what, p) for what, p in (("model", model), ("head", head), ("vision projector", mmproj))
                                           if p is not None])
    items = read_input(spec.input, spec.input_format, depth=spec.depth, queries=spec.queries, corpus=spec.corpus, run=spec.run)
    close = getattr(items, "close", None)
    if close is not None:
        close()


@dataclass
class Stats:
    """Totals over the whole job, across resumed runs."""

    pairs: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    queries: int = 0
    chunked: int = 0  # with chunking: documents split into chunks
    capped: int = 0  # ... and those with more than max_chunks chunks (their ends not scored)


@dataclass
class Window:
    """Consecutive input items; `end` counts the items consumed once it is written."""

    end: int
    units: list[Unit]
    rejects: list[Reject]
    prepared: Prepared | None = None  # the window's pairs as prompts (with chunking, every chunk's)
    items: list[Unit | Reject] | None = None  # units and rejects in input order (images' rejects go among them)
    doc_tokens: list[int] | None = None  # per pair, its prompts' tokens (kept when `prepared` is let go)
    sides: list[list] | None = None  # per unit, its documents as scored (images loaded), once they are
    image_files: str = ""  # `images.chain_image_files` over the items consumed up to `end`


#: Windows in, each with its `ScoredDocuments` out, in order (`engine.scoring.score_prepared` of `window.prepared`).
Scorer = Callable[[Iterator[Window]], Iterator[tuple[Window, ScoredDocuments]]]


def stop_error(spec: JobSpec, reject: Reject) -> RerankerError:
    """What `--on-error fail` raises for a bad record (or document)."""
    return RerankerError(f"{reject.source}: {reject.reason}; fix the record, or pass --on-error skip "
                         f"to write bad records to {spec.rejects_path()} and go on")


def cut_windows(items: Iterator[Unit | Reject], start: int, size: int, spec: JobSpec, image_files: str = "") -> Iterator[Window]:
    """`items` (the input from item `start` on) in windows of about `size` pairs; `image_files`: the digest
    of the image files of the items before `start` (`images.chain_image_files`), carried on in each window."""
    consumed, units, rejects, order, pairs, images = start, [], [], [], 0, 0
    for item in items:
        if units and isinstance(item, Unit) and images + image_count(item) > WINDOW_IMAGES:  # a record is never split
            yield Window(consumed, units, rejects, items=order, image_files=image_files)
            units, rejects, order, pairs, images = [], [], [], 0, 0
        consumed += 1
        image_files = chain_image_files(image_files, item)
        if isinstance(item, Reject):
            if spec.on_error == "fail":
                raise stop_error(spec, item)
            rejects.append(item)
        else:
            units.append(item)
            pairs += len(item.docs)
            images += image_count(item)
        order.append(item)
        if pairs >= size or images >= WINDOW_IMAGES:
            yield Window(consumed, units, rejects, items=order, image_files=image_files)
            units, rejects, order, pairs, images = [], [], [], 0, 0
    if units or rejects:
        yield Window(consumed, units, rejects, items=order, image_files=image_files)


def _tokenise(windows: Iterator[Window], builder: PromptBuilder, chunking: Chunking | None = None,
              images: ImageSettings | None = None, stop: Callable[[Reject], Exception] | None = None) -> Iterator[Window]:
    # A window's chunks are scored with it, so a checkpoint never falls inside a document.
    for w in windows:
        if any(image_count(u) for u in w.units):  # read and sized here, on the reader thread
            w.units, w.rejects, w.sides = load_window_images(w.items, builder, images, stop)
        sides = w.sides or [[doc for _, doc in u.docs] for u in w.units]
        pairs = [(u.query, doc) for u, docs in zip(w.units, sides) for doc in docs]
        names = [f"query {u.query_id!r}, document {doc_id!r} ({u.source})" for u in w.units for doc_id, _ in u.docs]
        w.prepared = prepare(builder, pairs, chunking, names)
        w.doc_tokens = [sum(len(p.ids) for p in d.prompts) for d in w.prepared.docs]
        yield w


def _prefetch(it: Iterator[Window], stop: threading.Event, depth: int = 2) -> Iterator[Window]:
    """Run `it` on a thread (llama.cpp's tokenizer releases the GIL) a few windows ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for w in it:
                while not stop.is_set():
                    try:
                        q.put(w, timeout=0.2)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

    threading.Thread(target=work, name="reranker-reader", daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class Job:
    """One run of `reranker score`: resume or start, then stream to the end or to an interrupt."""

    def __init__(self, spec: JobSpec, builder: PromptBuilder, scorer: Scorer, fingerprint: dict, model_name: str,
                 progress: Progress | None = None, hidden_size: int | None = None, images: ImageSettings | None = None) -> None:
        """`images`: the projector and sizing of image documents (None: a job of text only; an image
        document then stops it with the fix)."""
        self.spec = spec
        self.images = images
        self.builder = builder
        self.scorer = scorer
        self.progress = progress or Progress(quiet=True)
        self.files = spec.files()
        self.checkpoint = Checkpoint(spec.output)
        self.fingerprint = {**fingerprint, "input": input_fingerprint(input_files(spec.input_reads())),
                            "settings": {**fingerprint.get("settings", {}), **self._settings()}}
        self.model_name = model_name
        self.stats = Stats()
        self.consumed = 0
        self.image_files = ""  # the digest of the consumed items' image files (`chain_image_files`)
        self._image_files_then: str | None = None  # what the checkpoint resumed from says it was (None: not recorded)
        self.hidden_size = hidden_size  # the width of `--save-hidden` rows (the model's n_embd)
        if spec.hidden is not None and hidden_size is None:
            raise ValueError("a job that saves hidden states needs the model's hidden_size")

    def _settings(self) -> dict:
        s, b = self.spec, self.builder
        # The document cap only when not the original's default: the fingerprints of jobs started before it stay.
        doc_cap = {} if b.max_doc_length == default_max_doc_length(b.max_length, b.max_query_length) else \
            {"max_doc_length": b.max_doc_length}
        return {"input_format": s.input_format, "output_format": detect_output_format(s.output, s.output_format),
                "per": s.per, "depth": s.depth, "window": s.window, "run_tag": s.run_tag,
                "max_length": b.max_length, "max_query_length": b.max_query_length, **doc_cap,
                **({"chunking": s.chunking.settings()} if s.chunking is not None else {}),
                **({"hidden": os.path.realpath(s.hidden), "hidden_dtype": s.hidden_dtype} if s.hidden is not None else {})}

    def _rejects_id(self) -> str:
        return os.path.realpath(self.files.rejects)

    def _start(self) -> tuple[dict, dict] | None:
        """Writer states to resume from, None for a fresh start, or raise if refused/finished.

        Without `restart`, existing files are only reused when the checkpoint records them:
        an output or rejects file that no job of this output recorded is refused, never
        emptied. A fresh start saves its checkpoint before the writers touch any file, so from
        then on a rerun knows the files are this job's own. A checkpoint that says the job
        finished while OUTPUT is gone redoes the job (nothing is left to lose) and says so.
        """
        files, state = self.files, None if self.spec.restart else self.checkpoint.load()
        recorded = state is not None
        if state is not None and not state.get("done") and not state.get("consumed"):
            # Nothing was committed (its first window stopped it: a bad record, a Ctrl-C): the record fixed or
            # --on-error skip added, as its error said, starts the job afresh over files this output's checkpoint owns.
            state = None
        if state is not None:
            check_resumable(state, self.fingerprint, files.output, self._rejects_id())
            if state.get("done"):
                if files.output.is_file() and all(p.is_file() for what, p in files.hidden_written() if "draft" not in what):
                    if state.get("image_files"):  # done, from image files: as they are now?
                        self.consumed, self._image_files_then = state["consumed"], state["image_files"]
                        self._skip(self._items())
                    raise JobAlreadyDone(Stats(**state["stats"]))
                log.warning("%s (or its hidden-state files) is missing although its checkpoint says the job finished; "
                            "scoring it again", files.output)
                state = None
        if state is None:
            if not self.spec.restart and not recorded:
                hidden = [(what + " ", p) for what, p in files.hidden_written() if "draft" not in what]
                for what, path in [("", files.output), ("rejects file ", files.rejects)] + hidden:
                    if path.exists():
                        raise RerankerError(f"{what}{path} exists and no unfinished job of {files.output} recorded it; "
                                            "pass --restart to overwrite it, or choose another "
                                            f"{files.flag(what) if what else '-o'}")
            self.stats, self.consumed = Stats(), 0
            self._save({}, {})
            return None
        self.stats = Stats(**state["stats"])
        self.consumed = state["consumed"]
        self._image_files_then = state.get("image_files")  # absent from checkpoints of before the check: not checked
        self._hidden_state = state.get("hidden", {})
        return state["writer"], state["rejects"]

    def _save(self, writer_state: dict, rejects_state: dict, done: bool = False, hidden_state: dict | None = None) -> None:
        self.checkpoint.save({"fingerprint": self.fingerprint, "consumed": self.consumed, "image_files": self.image_files, "done": done,
                              "writer": writer_state, "rejects": rejects_state, "rejects_path": self._rejects_id(),
                              "stats": asdict(self.stats), **({"hidden": hidden_state} if hidden_state is not None else {})})

    def _open_hidden(self, resume: bool):
        """The `--save-hidden` writer, resumed to the checkpoint (None without the option)."""
        if self.spec.hidden is None:
            return None
        from reranker.jobs.hidden import HiddenWriter

        writer = HiddenWriter(self.spec.hidden, self.hidden_size, self.spec.hidden_dtype)
        writer.resume(self._hidden_state if resume else {})
        return writer

    def run(self) -> Stats:
        """Score everything not yet done; returns the job's totals. Ctrl-C keeps what is written.

        The caller checked the job (`check_job`) and holds its `JobLock`.
        """
        self._hidden_state: dict = {}
        resume = self._start()
        spec = self.spec
        items = self._items()
        if resume:
            self._skip(items)  # before any file is opened for writing: a refusal leaves them as they are
        writer = open_writer(spec.output, spec.output_format, per=spec.per, run_tag=spec.run_tag, model=self.model_name,
                             chunks=spec.chunking is not None)
        rejects = RejectsWriter(self.files.rejects, create=spec.on_error == "skip")
        writer.resume(resume[0] if resume else {})
        rejects.resume(resume[1] if resume else {})
        self.hidden = self._open_hidden(resume is not None)
        if resume:
            log.info("resuming %s after %d input records", spec.output, self.consumed)
        stop = threading.Event()
        windows = cut_windows(items, self.consumed, spec.window, spec, self.image_files)
        out_q: queue.Queue = queue.Queue(maxsize=2)
        failure: list[BaseException] = []
        writer_thread = threading.Thread(target=self._write_loop, args=(out_q, writer, rejects, failure),
                                         name="reranker-writer", daemon=True)
        writer_thread.start()
        finished = False
        try:
            fail = (lambda r: stop_error(spec, r)) if spec.on_error == "fail" else None
            for window, scores in self.scorer(_prefetch(_tokenise(windows, self.builder, spec.chunking, self.images, fail), stop)):
                if failure:
                    break
                window.prepared = window.items = window.sides = None  # scored: its images' pixels go now, not after the write
                out_q.put((window, scores))
            finished = not failure
        finally:
            stop.set()
            out_q.put(None)
            writer_thread.join()
            hidden = self.hidden
            if failure:
                writer.close(final=False)
                rejects.close(final=False)
                if hidden is not None:
                    hidden.close(final=False)
                raise failure[0]
            if finished:
                states = writer.commit(), rejects.commit()  # the state a resume finds once closed
                hidden_state = hidden.commit() if hidden is not None else None
                writer.close(final=True)
                rejects.close(final=True)
                if hidden is not None:
                    hidden.close(final=True)
                self._save(*states, done=True, hidden_state=hidden_state)
            else:
                writer.close(final=False)
                rejects.close(final=False)
                if hidden is not None:
                    hidden.close(final=False)
        return self.stats

    def _items(self) -> Iterator[Unit | Reject]:
        spec = self.spec
        items = read_input(spec.input, spec.input_format, depth=spec.depth, queries=spec.queries, corpus=spec.corpus,
                           run=spec.run)
        if detect_output_format(spec.output, spec.output_format) == "trec":
            items = ids_a_trec_run_can_carry(items)
        return one_run_per_query(items)

    def _skip(self, items: Iterator[Unit | Reject]) -> None:
        """Read past the items a resume finds done, checking that the image files they read are as they were."""
        for item in itertools.islice(items, self.consumed):
            self.image_files = chain_image_files(self.image_files, item)
        if self._image_files_then is not None and self.image_files != self._image_files_then:
            raise RerankerError(f"image files of the first {self.consumed} records of {self.spec.input}, scored before, "
                                "have changed since (size or modification time), or one missing then is there now: "
                                "their scores would not match the files; rerun with --restart to score everything again "
                                "(or restore the files as they were)")

    def _write_loop(self, out_q: queue.Queue, writer, rejects: RejectsWriter, failure: list[BaseException]) -> None:
        # Off the hot path: results are written in input order, made durable, then checkpointed.
        while (item := out_q.get()) is not None:
            if failure:
                continue
            window, result = item
            try:
                if self.hidden is not None and result.hidden is None:
                    raise ValueError("the scorer kept no hidden states for a job that saves them")
                k = 0
                for unit in window.units:
                    n = len(unit.docs)
                    scores = result.scores[k : k + n].tolist()
                    tokens = sum(window.doc_tokens[k : k + n])
                    chunks = list(zip(result.chunks[k : k + n].tolist(), result.best_chunk[k : k + n].tolist())) \
                        if result.chunks is not None else None
                    writer.write(unit, scores, tokens, **({"chunks": chunks} if chunks else {}))
                    if self.hidden is not None:
                        self.hidden.write(unit, scores, result.hidden[k : k + n])
                    k += n
                usage = result.usage
                self.stats.pairs += usage.pairs
                self.stats.tokens += usage.tokens
                self.stats.truncated += usage.truncated
                self.stats.chunked += usage.chunked
                self.stats.capped += usage.capped
                for r in window.rejects:
                    rejects.write(r)
                self.stats.queries += sum(u.opens_query for u in window.units)
                self.stats.skipped += len(window.rejects)
                self.consumed, self.image_files = window.end, window.image_files
                self._save(writer.commit(), rejects.commit(),
                           hidden_state=self.hidden.commit() if self.hidden is not None else None)
                records = len({u.source for u in window.units} | {r.source for r in window.rejects})  # a record's rejects share its source
                self.progress.update(records, usage.pairs, usage.tokens)
            except BaseException as e:
                failure.append(e)


class JobAlreadyDone(Exception):
    """The checkpoint says this exact job finished; nothing to do."""

    def __init__(self, stats: Stats) -> None:
        super().__init__("already complete")
        self.stats = stats


def write_summary(spec: JobSpec, stats: Stats, wall: float, run_pairs: int, run_tokens: int,
                  extra: dict | None = None) -> dict:
    """The final summary, also saved as `OUTPUT.summary.json` (`extra`: more keys, e.g. the weights' encoding)."""
    totals = asdict(stats)
    if spec.chunking is None:  # a job without chunking keeps its summary's keys
        del totals["chunked"], totals["capped"]
    summary = {"output": str(spec.output), **totals, "wall_seconds": round(wall, 3),
               "pairs_this_run": run_pairs, "tokens_this_run": run_tokens,
               "pairs_per_second": round(run_pairs / wall, 2) if wall > 0 else None,
               "tokens_per_second": round(run_tokens / wall, 1) if wall > 0 else None, **(extra or {})}
    path = spec.files().summary
    with writing(path, "summary"), atomic_write(path, "w") as f:
        f.write(json.dumps(summary, indent=1) + "\n")
    return summary


def model_fingerprint(gguf_path: Path, head_path: Path | None, settings: dict) -> dict:
    """The parts of a job's identity that come from the model: GGUF, head and numeric settings."""
    return {"model": file_fingerprint(gguf_path), "head": file_fingerprint(head_path, whole=True) if head_path else None,
            "settings": settings}
