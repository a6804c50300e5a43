"""`reranker score --save-hidden PATH.npy`: the last hidden state of every scored pair, crash-safe.

The hidden states come from the same decode as the scores (the scorer keeps each window's
embeddings). They are written like the job's other outputs (see `writers.py`): rows are
appended to `PATH.partial`, a `.npy` whose fixed-size header is rewritten with the final
shape when the job finishes and the file is renamed onto PATH; the committed state is the row
count, and a resume cuts the file back to it, so a killed and resumed job leaves the bytes of
an uninterrupted one. The ids index `PATH.ids.jsonl` (`head.hidden_states.index_path`) is a
per-pair JSONL writer with the same protocol; its line i is row i's query id, doc id and score.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from head.hidden_states import DTYPES, HEADER_BYTES, NPY_SUFFIX, index_path, npy_header
from reranker.atomic import fsync_dir
from reranker.errors import RerankerError
from reranker.jobs.paths import PARTIAL, beside, writing
from reranker.jobs.records import Unit
from reranker.jobs.writers import JsonlWriter, Resumable, state_value


def check_hidden_path(path: Path, dtype: str) -> None:
    """A usable `--save-hidden` target and `--hidden-dtype` (before anything loads)."""
    if not str(path).endswith(NPY_SUFFIX):
        raise RerankerError(f"--save-hidden {path}: hidden states are written as a .npy array; give a name ending in .npy")
    if dtype not in DTYPES:
        raise RerankerError(f"--hidden-dtype {dtype!r}: choose {' or '.join(DTYPES)}")


class NpyRowsWriter(Resumable):
    """(n, width) rows of `dtype` appended to `PATH.partial`, which becomes the `.npy` PATH on the final close."""

    kind = "npy"

    def __init__(self, path: Path, width: int, dtype: str) -> None:
        self.path = path
        self.draft = beside(path, PARTIAL)
        self.width = int(width)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_bytes = self.width * self.dtype.itemsize
        self.rows = 0
        self._f: Any = None
        self._started = False
        self._finished = False
        self._state: dict = {}

    def _state_of(self) -> dict:
        return {"format": self.kind, "rows": self.rows, "dtype": self.dtype.name, "width": self.width}

    def resume(self, state: dict) -> None:
        """Cut `PATH.partial` back to the committed row count (`{}`: start it empty)."""
        rows = state_value(state, self.kind, "rows", self.path)
        if state and (state.get("dtype"), state.get("width")) != (self.dtype.name, self.width):
            raise RerankerError(f"{self.path} was started as {state.get('dtype')} rows of {state.get('width')}; "
                                "start the job over (--restart) instead of resuming")
        if rows and not self.draft.exists() and self.path.exists():
            # The previous run finished the file and crashed before its checkpoint said so.
            self._started = self._finished = True
            self.rows, self._state = rows, dict(state)
            return
        if rows and not self.draft.exists():
            raise RerankerError(f"{self.draft} is missing but the checkpoint recorded {rows} rows in it; "
                                "start the job over (--restart) instead of resuming")
        with writing(self.draft, "hidden-state draft"):
            self.path.unlink(missing_ok=True)  # a finished file from an older run is stale now
            fd = os.open(self.draft, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            self._f = os.fdopen(fd, "r+b", buffering=1 << 20)
            size = HEADER_BYTES + rows * self.row_bytes
            have = os.fstat(fd).st_size
            if rows and have < size:
                raise RerankerError(f"{self.draft} holds {have} bytes but the checkpoint recorded {rows} rows "
                                    f"({size} bytes): it was changed since; start the job over (--restart)")
            if rows:
                self._check_header()
            self._f.truncate(size)
            self._f.seek(0)
            self._f.write(npy_header(self.dtype, 0, self.width))  # the shape is written when the file is finished
            self._f.seek(size)
        self.rows = rows
        self._started = True

    def _check_header(self) -> None:
        self._f.seek(0)
        try:
            if np.lib.format.read_magic(self._f) != (1, 0):
                raise ValueError("not a version 1.0 header")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._f)
        except ValueError as e:
            raise RerankerError(f"{self.draft} does not start with a .npy header ({e}): it was changed since; "
                                "start the job over (--restart)") from e
        if fortran or dtype != self.dtype or len(shape) != 2 or shape[1] != self.width or self._f.tell() != HEADER_BYTES:
            raise RerankerError(f"{self.draft} holds {dtype} rows of shape {shape}, not what the checkpoint recorded: "
                                "it was changed since; start the job over (--restart)")

    def write_rows(self, rows: np.ndarray) -> None:
        """Append (k, width) rows; float16 refuses values beyond its range rather than writing inf."""
        self._start()
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"hidden states of shape {rows.shape} for {self.path}, expected (k, {self.width})")
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(rows, dtype=self.dtype)
        if not np.isfinite(out).all():
            fix = "write float32 (--hidden-dtype float32)" if np.isfinite(rows).all() else "the model files are likely broken"
            raise RerankerError(f"a hidden state does not fit {self.dtype.name} (it would be stored as inf or NaN): {fix}")
        with writing(self.draft, "hidden-state draft"):
            self._f.write(out.tobytes())
        self.rows += len(out)

    def commit(self) -> dict:
        """fsync the draft; the state is its row count."""
        if self._finished:
            return self._state
        self._start()
        with writing(self.draft, "hidden-state draft"):
            self._f.flush()
            os.fsync(self._f.fileno())
            fsync_dir(self.draft.parent)
        return self._state_of()

    def close(self, final: bool) -> None:
        """`final`: write the shape into the header and rename the draft onto PATH; otherwise keep it for a resume."""
        if not final:
            if self._f is not None:
                f, self._f = self._f, None
                try:
                    f.close()
                except OSError:  # a failed flush (a full disk): a resume cuts the tail anyway
                    pass
            return
        if self._finished:
            return
        self._start()
        with writing(self.draft, "hidden-state draft"):
            self._f.flush()
            self._f.seek(0)
            self._f.write(npy_header(self.dtype, self.rows, self.width))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
        with writing(self.path, "hidden-state file"):
            os.replace(self.draft, self.path)
            fsync_dir(self.path.parent)
        self._finished = True


class HiddenWriter:
    """The hidden-state file and its ids index, driven by the job like its output writer."""

    kind = "hidden"

    def __init__(self, path: Path, width: int, dtype: str = "float32") -> None:
        check_hidden_path(path, dtype)
        with writing(path.parent, "hidden-state folder"):
            path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = NpyRowsWriter(path, width, dtype)
        self.index = JsonlWriter(index_path(path), per="pair")

    def write(self, unit: Unit, scores: Sequence[float], hidden: np.ndarray) -> None:
        """Add one unit's pairs: `hidden[i]` and `scores[i]` belong to `unit.docs[i]`."""
        if len(hidden) != len(unit.docs):
            raise ValueError(f"{unit.source}: {len(hidden)} hidden states for {len(unit.docs)} documents")
        self.index.write(unit, scores, 0)
        self.rows.write_rows(hidden)

    def commit(self) -> dict:
        return {"format": self.kind, "rows": self.rows.commit(), "index": self.index.commit()}

    def resume(self, state: dict) -> None:
        if state and state.get("format") != self.kind:
            raise RerankerError(f"the checkpoint's hidden-state state {state} is not one of {self.rows.path}; "
                                "start the job over (--restart)")
        self.rows.resume(state.get("rows", {}))
        self.index.resume(state.get("index", {}))

    def close(self, final: bool) -> None:
        self.rows.close(final)
        self.index.close(final)
