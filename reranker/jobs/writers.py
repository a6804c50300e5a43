"""Output writers of the scoring job: JSONL, Parquet, TREC runs and the rejects file, crash-safe.

The job drives each writer the same way: `write` units in input order, `commit()` now and
then and store the returned state in its checkpoint only after `commit` returns, and after a
crash reopen the writer and `resume(state)`. Everything written after the last commit is cut
off then, so rerunning the lost units never duplicates or tears a line. The output path
appears only on `close(final=True)`; until then results live in `OUTPUT.partial` (JSONL,
TREC) or `OUTPUT.parts/` (Parquet), so an interrupted run never leaves a file that looks
complete. The final file depends only on the units written, not on where commits fell.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reranker.atomic import atomic_path, atomic_write, fsync_dir
from reranker.defaults import RUN_TAG
from reranker.errors import RerankerError
from reranker.jobs.paths import PARTIAL, PARTS, PARTS_OLD, beside, writing
from reranker.jobs.readers import import_pyarrow
from reranker.jobs.records import Reject, Unit
from reranker.jobs.validate import trec_problem

OUTPUT_FORMATS = ("jsonl", "parquet", "trec")
TREC_SCORE_FORMAT = "{:.8f}"  # fixed, so reruns print the same bytes; 8 places keep float32 sigmoid scores apart
PARQUET_ROW_GROUP = 65536
PARQUET_COMPRESSION = "zstd"


#: Per document of a unit, with chunking: (number of chunks, index of the best-scoring chunk).
Chunks = Sequence[tuple[int, int]] | None


def _chunk_fields(chunks: Chunks, i: int) -> dict:
    """The output fields of document `i`'s chunks: none without chunking, so those outputs keep their bytes."""
    return {} if chunks is None else {"chunks": int(chunks[i][0]), "best_chunk": int(chunks[i][1])}


class Writer(Protocol):
    """What the job needs of an output writer."""

    def write(self, unit: Unit, scores: Sequence[float], tokens: int, chunks: Chunks = None) -> None:
        """Add the results of one unit; `scores[i]` belongs to `unit.docs[i]` (`chunks[i]`: its chunk
        count and best chunk, given only when the job chunks long documents)."""

    def commit(self) -> dict:
        """Make everything written so far durable; return the JSON-able state to checkpoint."""

    def resume(self, state: dict) -> None:
        """Right after opening: cut the output back to a committed state (`{}`: start empty)."""

    def close(self, final: bool) -> None:
        """`final`: finish the output file; otherwise just close, keeping what resume needs."""


def detect_output_format(path: str | os.PathLike[str], output_format: str | None = None) -> str:
    """The output format: `output_format` when given, else from the extension."""
    if output_format is not None:
        if output_format not in OUTPUT_FORMATS:
            raise RerankerError(f"unknown output format {output_format!r}; use one of {', '.join(OUTPUT_FORMATS)}")
        return output_format
    suffix = Path(path).suffix.lower()
    for fmt, suffixes in (("jsonl", (".jsonl", ".ndjson")), ("parquet", (".parquet", ".pq")), ("trec", (".trec", ".run"))):
        if suffix in suffixes:
            return fmt
    raise RerankerError(f"cannot tell the output format of {path} from its extension; pass the output format ({', '.join(OUTPUT_FORMATS)})")


def open_writer(path: str | os.PathLike[str], output_format: str | None = None, *, per: str = "query",
                run_tag: str = RUN_TAG, model: str = "", chunks: bool = False) -> Writer:
    """A writer for `path`: "jsonl" (`per` "query": Jina rerank responses; "pair": one score per line),
    "parquet" (one row per pair, with its rank) or "trec" (a run file tagged `run_tag`).
    `chunks`: JSONL gets `chunks` and `best_chunk` fields, Parquet such columns (TREC has no room for them).

    Nothing on disk changes until `resume` or the first write/commit/close (a fresh start
    then empties the output).
    """
    fmt = detect_output_format(path, output_format)
    if per not in ("query", "pair"):
        raise RerankerError(f"per={per!r} must be 'query' or 'pair'")
    target = Path(path)
    if target.is_dir():
        raise RerankerError(f"output {target} is a directory; give a file name")
    with writing(target.parent, "output folder"):
        target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        return JsonlWriter(target, per=per, model=model)
    if fmt == "trec":
        return TrecWriter(target, run_tag=run_tag)
    return ParquetWriter(target, chunks=chunks)


def _check_scores(unit: Unit, scores: Sequence[float]) -> list[float]:
    values = [float(s) for s in scores]
    if len(values) != len(unit.docs):
        raise ValueError(f"{unit.source}: {len(values)} scores for {len(unit.docs)} documents")
    if not all(math.isfinite(s) for s in values):
        raise RerankerError(f"{unit.source}: the model returned a non-finite score ({values}); the model files are likely broken")
    return values


def _best_first(scores: list[float]) -> list[int]:
    """Positions by descending score; ties keep input order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


class _LineFile:
    """An append-only file whose committed state is its byte length; an OSError becomes a
    `RerankerError` naming it (a full disk: free space and rerun to resume)."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._f: Any = None

    def exists(self) -> bool:
        return self.path.exists()

    @property
    def is_open(self) -> bool:
        return self._f is not None

    def truncate(self, size: int) -> None:
        """Open the file and cut it to `size` bytes, checking it holds whole lines that far."""
        with writing(self.path):
            self._truncate(size)

    def _truncate(self, size: int) -> None:
        if self._f is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            self._f = os.fdopen(fd, "r+b", buffering=1 << 20)
        have = os.fstat(self._f.fileno()).st_size
        if have < size:
            raise RerankerError(f"{self.path} holds {have} bytes but the checkpoint recorded {size}: it was changed "
                                "since; start the job over instead of resuming")
        if size:
            self._f.seek(size - 1)
            if self._f.read(1) != b"\n":
                raise RerankerError(f"{self.path} does not end a line at the checkpointed byte {size}: it was changed "
                                    "since; start the job over instead of resuming")
        self._f.truncate(size)
        self._f.seek(size)

    def write(self, data: bytes) -> None:
        with writing(self.path):
            self._f.write(data)

    def commit(self) -> dict:
        with writing(self.path):
            self._f.flush()
            os.fsync(self._f.fileno())
            fsync_dir(self.path.parent)
        return {"format": self.kind, "bytes": self._f.tell()}

    def close(self, durable: bool) -> None:
        """`durable`: flush and fsync first. Otherwise the unflushed tail may be lost, as a resume cuts it anyway."""
        if self._f is None:
            return
        f, self._f = self._f, None
        if durable:
            with writing(self.path):
                f.flush()
                os.fsync(f.fileno())
                f.close()
        else:
            try:
                f.close()
            except OSError:  # the flush failed (a full disk): the file is closed all the same
                pass


def state_value(state: dict, kind: str, key: str, path: Path) -> int:
    """`state[key]` of a writer's checkpointed state of format `kind` (0 for a fresh start); a state of another format is refused."""
    if not state:
        return 0
    if state.get("format") != kind or not isinstance(state.get(key), int) or state[key] < 0:
        raise RerankerError(f"the checkpoint's output state {state} is not a {kind} state for {path}; "
                            "the output format changed since: start the job over instead of resuming")
    return state[key]


class Resumable:
    """The base of resumable writers: a first write without `resume()` starts fresh, and nothing may be
    written after a resumed run's output was already finished."""

    path: Path
    _started: bool
    _finished: bool
    resume: Callable[[dict], None]

    def _start(self) -> None:
        if not self._started:
            self.resume({})
        if self._finished:
            raise RerankerError(f"{self.path} was already finished by the run being resumed; its checkpoint "
                                "disagrees with the input: start the job over instead of resuming")


class _DraftWriter(Resumable):
    """Lines appended to `OUTPUT.partial`, renamed (or rewritten) onto OUTPUT by the final close."""

    kind = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.draft = _LineFile(beside(path, PARTIAL), self.kind)
        self._started = False
        self._finished = False  # a resumed run whose final close had already happened
        self._state: dict = {}

    def resume(self, state: dict) -> None:
        """Cut `OUTPUT.partial` back to the committed byte length (`{}`: empty it)."""
        size = state_value(state, self.kind, "bytes", self.path)
        if size and not self.draft.exists() and self.path.exists():
            # The previous run finished the file and crashed before its checkpoint said so.
            self._started = self._finished = True
            self._state = dict(state)
            return
        if size and not self.draft.exists():
            raise RerankerError(f"{self.draft.path} is missing but the checkpoint recorded {size} bytes in it; "
                                "start the job over instead of resuming")
        with writing(self.path):
            self.path.unlink(missing_ok=True)  # a finished file from an older run is stale now
        self.draft.truncate(size)
        self._started = True

    def _write_lines(self, lines: list[str]) -> None:
        self._start()
        self.draft.write("".join(lines).encode("utf-8"))

    def commit(self) -> dict:
        """fsync the draft; the state is its byte length."""
        if self._finished:
            return self._state
        self._start()
        return self.draft.commit()

    def close(self, final: bool) -> None:
        """`final`: move the draft onto OUTPUT; otherwise keep it for the next resume."""
        if not final:
            self.draft.close(durable=False)
            return
        if self._finished:
            return
        self._start()
        self.draft.close(durable=True)
        with writing(self.path):
            self._finish()
            fsync_dir(self.path.parent)

    def _finish(self) -> None:
        os.replace(self.draft.path, self.path)


class JsonlWriter(_DraftWriter):
    """One line per query in the Jina rerank API's response shape (`per="query"`), or one
    `{"query_id", "doc_id", "score"}` line per pair in input order (`per="pair"`).

    Each unit is a line when written; the final close merges runs of consecutive lines of one query
    that came from several units (flat-pair input) into one ranking, as `TrecWriter` re-ranks them.
    """

    kind = "jsonl"

    def __init__(self, path: Path, *, per: str = "query", model: str = "") -> None:
        super().__init__(path)
        self.per = per
        self.model = model

    def write(self, unit: Unit, scores: Sequence[float], tokens: int, chunks: Chunks = None) -> None:
        values = _check_scores(unit, scores)
        if self.per == "pair":
            lines = [_dumps({"query_id": unit.query_id, "doc_id": doc_id, "score": s, **_chunk_fields(chunks, i)})
                     for i, ((doc_id, _), s) in enumerate(zip(unit.docs, values))]
        else:
            results = [{"index": unit.position(i), "doc_id": unit.docs[i][0], "relevance_score": values[i], "document": _document(unit.docs[i][1]),
                        **_chunk_fields(chunks, i)}
                       for i in _best_first(values)]
            lines = [_dumps({"query_id": unit.query_id, "query": unit.query, "model": self.model,
                             "usage": {"total_tokens": int(tokens)}, "results": results})]
        self._write_lines(lines)

    def _finish(self) -> None:
        if self.per == "pair":
            return super()._finish()
        # Stream the draft into OUTPUT (atomically); a query's records are contiguous (the query-id rule), so
        # only flat pairs make runs, and a run of one line (a nested record) is copied byte for byte.
        with open(self.draft.path, "rb") as src, atomic_write(self.path) as dst:
            run: list[bytes] = []
            for line in src:
                if run and _query_id(line) != _query_id(run[0]):
                    dst.write(_merged(run))
                    run = []
                run.append(line)
            if run:
                dst.write(_merged(run))
        self.draft.path.unlink()


_ID_START = len('{"query_id": ')


def _query_id(line: bytes) -> str:
    # The line's first key (as `write` dumps it): decode the id alone, not the whole ranking.
    return json.JSONDecoder().raw_decode(line.decode("utf-8"), _ID_START)[0]


def _merged(run: list[bytes]) -> bytes:
    """One query's lines as one: results best first (ties in input order), indices counted within the query."""
    if len(run) == 1:
        return run[0]
    records = [json.loads(line) for line in run]
    results = []
    for record in records:
        # Each line's results are best first; `index` becomes the document's position among the query's.
        for r in sorted(record["results"], key=lambda r: r["index"]):
            results.append({**r, "index": len(results)})
    results.sort(key=lambda r: -r["relevance_score"])  # stable: equal scores keep input order
    first = records[0]
    usage = {"total_tokens": sum(r["usage"]["total_tokens"] for r in records)}
    return _dumps({**first, "usage": usage, "results": results}).encode("utf-8")


def _document(doc: object) -> dict:
    """A result's `document`, as the Jina API echoes it: `{"text": ...}`, or an image's `{"image": path}`."""
    return {"text": doc} if isinstance(doc, str) else doc.as_json()


def _dumps(obj: dict) -> str:
    # Python floats print their shortest round-trip repr: the same bytes on every run.
    return json.dumps(obj, ensure_ascii=False) + "\n"


def check_run_tag(run_tag: str, name: str = "--run-tag") -> None:
    """A RerankerError (naming `name`) unless `run_tag` can be a TREC run's tag column: one word."""
    if not run_tag or any(c.isspace() for c in run_tag):
        raise RerankerError(f"{name} {run_tag!r} must be one word: TREC run columns are separated by whitespace")


class TrecWriter(_DraftWriter):
    """A TREC run, `qid Q0 docid rank score tag`, best first within each query.

    Each unit is ranked when written; the final close re-ranks runs of consecutive lines of
    one query that came from several units (flat-pair input), so ranks count within the
    query. Scores print as `TREC_SCORE_FORMAT`.
    """

    kind = "trec"

    def __init__(self, path: Path, *, run_tag: str = RUN_TAG) -> None:
        check_run_tag(run_tag, "run tag")
        super().__init__(path)
        self.run_tag = run_tag

    def write(self, unit: Unit, scores: Sequence[float], tokens: int, chunks: Chunks = None) -> None:
        values = _check_scores(unit, scores)
        _trec_id(unit.query_id, "query id", unit)
        lines = []
        for rank, i in enumerate(_best_first(values), 1):
            doc_id = _trec_id(unit.docs[i][0], "doc id", unit)
            lines.append(f"{unit.query_id} Q0 {doc_id} {rank} {TREC_SCORE_FORMAT.format(values[i])} {self.run_tag}\n")
        self._write_lines(lines)

    def _finish(self) -> None:
        # Stream the draft into OUTPUT (atomically), re-ranking each run of same-query lines; groups
        # of one unit come out unchanged (a stable sort of already sorted lines).
        with open(self.draft.path, "rb") as src, atomic_write(self.path) as dst:
            group: list[list[bytes]] = []
            for line in src:
                fields = line.split()
                if group and fields[0] != group[0][0]:
                    _write_group(dst, group)
                    group = []
                group.append(fields)
            _write_group(dst, group)
        self.draft.path.unlink()


def _write_group(dst: Any, group: list[list[bytes]]) -> None:
    group.sort(key=lambda f: -float(f[4]))  # stable: equal printed scores keep input order
    for rank, (qid, q0, doc_id, _, score, tag) in enumerate(group, 1):
        dst.write(b" ".join((qid, q0, doc_id, str(rank).encode(), score, tag)) + b"\n")


def _trec_id(ident: str, what: str, unit: Unit) -> str:
    # The job rejects such ids before scoring (`validate.ids_a_trec_run_can_carry`); this guards other callers.
    problem = trec_problem(ident)
    if problem is not None:
        raise RerankerError(f"{unit.source}: {what} {ident!r} {problem}; write JSONL or Parquet, or fix the ids")
    return ident


class ParquetWriter(Resumable):
    """One row per pair in input order: query_id, doc_id, score (float32), rank (int32, 1-based
    within its query by descending score).

    Rows go to `OUTPUT.parts/part-NNNNNN.parquet` as they accumulate; the final close streams
    the parts into OUTPUT in fixed row groups of `PARQUET_ROW_GROUP` rows, ranking runs of
    consecutive rows of one query, so the file is byte-identical however commits fell.
    """

    kind = "parquet"

    def __init__(self, path: Path, *, part_rows: int = PARQUET_ROW_GROUP, chunks: bool = False) -> None:
        self.pa, self.pq = import_pyarrow(f"writing {path}")
        self.path = path
        self.parts_dir = beside(path, PARTS)
        self.part_rows = part_rows
        self.chunks = chunks  # two more columns: chunks and best_chunk (int32)
        self._parts = 0
        self._rows: tuple[list, ...] = self._empty_rows()
        self._started = False
        self._finished = False

    def _part(self, i: int) -> Path:
        return self.parts_dir / f"part-{i:06d}.parquet"

    def resume(self, state: dict) -> None:
        """Drop the parts beyond the committed count (`{}`: drop all)."""
        parts = state_value(state, self.kind, "parts", self.path)
        if parts and not self.parts_dir.exists() and self.path.exists():
            # The previous run finished the file and crashed before its checkpoint said so.
            self._started = self._finished = True
            self._parts = parts
            return
        missing = [p.name for p in map(self._part, range(parts)) if not p.exists()]
        if missing:
            raise RerankerError(f"{self.parts_dir} lacks {', '.join(missing[:3])} that the checkpoint recorded; "
                                "start the job over instead of resuming")
        with writing(self.parts_dir, "parts folder"):
            self.path.unlink(missing_ok=True)  # a finished file from an older run is stale now
            shutil.rmtree(self._trash(), ignore_errors=True)
            self.parts_dir.mkdir(exist_ok=True)
            for p in self.parts_dir.iterdir():
                number = _part_number(p.name)
                if number is None:
                    raise RerankerError(f"{self.parts_dir} holds {p.name}, which this job did not write; move it "
                                        "elsewhere, then rerun")
                if number >= parts:
                    p.unlink()
        self._parts = parts
        self._rows = self._empty_rows()
        self._started = True

    def _trash(self) -> Path:
        return beside(self.path, PARTS_OLD)

    def _empty_rows(self) -> tuple[list, ...]:
        return tuple([] for _ in self._columns())

    def _columns(self) -> list[tuple[str, Any]]:
        """The parts' columns (the final file adds `rank`)."""
        pa = self.pa
        columns = [("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float32())]
        return columns + ([("chunks", pa.int32()), ("best_chunk", pa.int32())] if self.chunks else [])

    def write(self, unit: Unit, scores: Sequence[float], tokens: int, chunks: Chunks = None) -> None:
        values = _check_scores(unit, scores)
        if self.chunks != (chunks is not None):
            raise ValueError(f"{unit.source}: chunk counts {'missing' if self.chunks else 'given'} for {self.path}")
        self._start()
        qids, doc_ids, out, *chunk_columns = self._rows
        for i, ((doc_id, _), s) in enumerate(zip(unit.docs, values)):
            qids.append(unit.query_id)
            doc_ids.append(doc_id)
            out.append(s)
            for column, value in zip(chunk_columns, chunks[i] if chunks is not None else ()):
                column.append(value)
        if len(qids) >= self.part_rows:  # bounds memory; part boundaries never show in the final file
            self._flush_part()

    def _flush_part(self) -> None:
        if not self._rows[0]:
            return
        pa = self.pa
        table = pa.table({name: pa.array(values, kind) for (name, kind), values in zip(self._columns(), self._rows)})
        with writing(self._part(self._parts)), atomic_path(self._part(self._parts)) as tmp:
            self.pq.write_table(table, tmp, compression=PARQUET_COMPRESSION)
        self._parts += 1
        self._rows = self._empty_rows()

    def commit(self) -> dict:
        """Write the pending rows as a part and fsync; the state is the number of parts."""
        if not self._finished:
            self._start()
            self._flush_part()
            with writing(self.parts_dir, "parts folder"):
                fsync_dir(self.parts_dir)
        return {"format": self.kind, "parts": self._parts}

    def close(self, final: bool) -> None:
        """`final`: merge the parts into OUTPUT and remove them; otherwise drop uncommitted rows."""
        if not final:
            self._rows = self._empty_rows()
            return
        if self._finished:
            return
        self._start()
        self._flush_part()
        with writing(self.path):
            with atomic_path(self.path) as tmp:
                self._merge(tmp)
            # Rename first: a crash while deleting leaves no half-emptied parts folder to resume from.
            os.replace(self.parts_dir, self._trash())
            shutil.rmtree(self._trash())
            fsync_dir(self.path.parent)
        self._finished = True

    def _merge(self, tmp: Path) -> None:
        pa, pq = self.pa, self.pq
        schema = pa.schema(self._columns() + [("rank", pa.int32())])
        with pq.ParquetWriter(tmp, schema, compression=PARQUET_COMPRESSION) as out:
            pending = pa.table({name: pa.array([], schema.field(name).type) for name in schema.names})
            for table in self._whole_queries():
                pending = pa.concat_tables([pending, rank_table(pa, table)])
                while pending.num_rows >= PARQUET_ROW_GROUP:
                    # One contiguous chunk per row group: the page layout then depends on the rows alone.
                    out.write_table(pending.slice(0, PARQUET_ROW_GROUP).combine_chunks(), row_group_size=PARQUET_ROW_GROUP)
                    pending = pending.slice(PARQUET_ROW_GROUP)
            if pending.num_rows:
                out.write_table(pending.combine_chunks(), row_group_size=PARQUET_ROW_GROUP)

    def _whole_queries(self) -> Iterator[Any]:
        """The parts' rows in order, as tables that never split a run of one query's rows."""
        import pyarrow.compute as pc

        carry = None  # the last query's rows: they may go on in the next part
        for i in range(self._parts):
            table = self.pq.read_table(self._part(i))
            if carry is not None:
                table = self.pa.concat_tables([carry, table])
            qids = table.column("query_id")
            others = np.flatnonzero(pc.not_equal(qids, qids[-1]).to_numpy(zero_copy_only=False))
            cut = int(others[-1]) + 1 if len(others) else 0
            if cut:
                yield table.slice(0, cut)
            carry = table.slice(cut)
        if carry is not None:
            yield carry


def _part_number(name: str) -> int | None:
    """N of a part file `part-N.parquet`; None for a name this writer never uses."""
    if name.startswith(".part-") and ".parquet.tmp-" in name:
        return 1 << 62  # the temporary file of an interrupted part write: always dropped
    stem, dot, ext = name.partition(".")
    if stem.startswith("part-") and stem[5:].isdigit() and dot and ext == "parquet":
        return int(stem[5:])
    return None


def rank_table(pa: Any, table: Any) -> Any:
    """`table` with a rank column: 1-based by descending score within runs of one query id, ties by row order."""
    import pyarrow.compute as pc

    n = table.num_rows
    qids = table.column("query_id")
    starts_here = np.ones(n, dtype=bool)
    if n > 1:
        starts_here[1:] = pc.not_equal(qids.slice(1), qids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    group = np.cumsum(starts_here) - 1
    group_start = np.flatnonzero(starts_here)
    scores = table.column("score").to_numpy()
    order = np.lexsort((np.arange(n), -scores, group))
    rank = np.empty(n, dtype=np.int32)
    rank[order] = np.arange(n) - group_start[group[order]] + 1
    return table.append_column("rank", pa.array(rank, pa.int32()))


class RejectsWriter:
    """One `{"source", "reason", "raw"}` JSON line per reject (with `query_id` and `doc_index`
    for one bad document of a record), appended to `path` itself, with
    the writers' commit/resume/close contract (the state is the byte length).

    With `create=False` (a job that stops at the first bad record) the file is created only
    when a reject is written, so no empty rejects file is left behind.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise RerankerError(f"rejects file {self.path} is a directory; give a file name")
        with writing(self.path, "rejects file"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _LineFile(self.path, "rejects")
        self._create = create
        self._started = False

    def resume(self, state: dict) -> None:
        """Cut the file back to the committed byte length (`{}`: empty it)."""
        size = state_value(state, "rejects", "bytes", self.path)
        if size or self._create or self.path.exists():
            self._file.truncate(size)
        self._started = True

    def _start(self) -> None:
        if not self._started:
            self.resume({})

    def write(self, reject: Reject) -> None:
        self._start()
        if not self._file.is_open:
            self._file.truncate(0)
        where = {} if reject.doc_index is None else {"query_id": reject.query_id, "doc_index": reject.doc_index}
        self._file.write(_dumps({"source": reject.source, **where, "reason": reject.reason, "raw": reject.raw}).encode("utf-8"))

    def commit(self) -> dict:
        self._start()
        return self._file.commit() if self._file.is_open else {"format": "rejects", "bytes": 0}

    def close(self, final: bool) -> None:
        if final:
            self._start()
        self._file.close(durable=final)
