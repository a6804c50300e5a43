"""Saved hidden states: the `.npy` + ids index that `reranker score --save-hidden` writes, read back.

One format for last-token hidden states across the package: a plain `.npy` array of shape
(n, H), float32 or float16 (`reranker embed -o X.npy` writes the same kind of array), that
numpy memory-maps and torch wraps without copying, so files larger than memory work. A job
adds an index beside it, `NAME.ids.jsonl` for `NAME.npy`: line i is
`{"query_id", "doc_id", "score"}` of row i, the pair and the job's score (the bytes of
`reranker score --per pair` lines). Rows are in input order.

    states = load_hidden("hidden.npy")              # memory-mapped; states.embeddings is (n, H)
    scores = score_embeddings(head, states.embeddings)
    row = states.row_of()[("q1", "d7")]
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reranker.errors import RerankerError

NPY_SUFFIX = ".npy"
INDEX_SUFFIX = ".ids.jsonl"
DTYPES = ("float32", "float16")
HEADER_BYTES = 128  # numpy's own v1.0 header for a 2-D array of any realistic size: rows start at a fixed offset


def index_path(path: str | os.PathLike[str]) -> Path:
    """The ids index of a hidden-state file: `NAME.ids.jsonl` beside `NAME.npy`."""
    p = Path(path)
    return p.with_name((p.name[: -len(NPY_SUFFIX)] if p.name.endswith(NPY_SUFFIX) else p.name) + INDEX_SUFFIX)


def npy_header(dtype: np.dtype, rows: int, width: int) -> bytes:
    """The .npy header of a C-order (rows, width) array of little-endian `dtype`: always `HEADER_BYTES` long."""
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (int(rows), int(width))}
    np.lib.format.write_array_header_1_0(buf, d)
    header = buf.getvalue()
    if len(header) != HEADER_BYTES:  # only with absurd shapes (over ~10^40 rows)
        raise RerankerError(f"a .npy header for shape ({rows}, {width}) is {len(header)} bytes, not {HEADER_BYTES}")
    return header


@dataclass
class HiddenStates:
    """A saved hidden-state file: `embeddings` (n, H) memory-mapped, and the index's ids and scores by row."""

    embeddings: np.ndarray
    query_ids: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    def __len__(self) -> int:
        return len(self.embeddings)

    def row_of(self) -> dict[tuple[str, str], int]:
        """(query_id, doc_id) -> row."""
        return {(q, d): i for i, (q, d) in enumerate(zip(self.query_ids, self.doc_ids))}


def read_index(path: str | os.PathLike[str]) -> tuple[list[str], list[str], np.ndarray]:
    """query ids, doc ids and scores (float32) of an ids index, line by line."""
    qids: list[str] = []
    dids: list[str] = []
    scores: list[float] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    qids.append(str(rec["query_id"]))
                    dids.append(str(rec["doc_id"]))
                    scores.append(float(rec["score"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise RerankerError(f"{path}:{n}: not a {{\"query_id\", \"doc_id\", \"score\"}} line ({e}); "
                                        "it must be the index `reranker score --save-hidden` wrote") from e
    except OSError as e:
        raise RerankerError(f"cannot read the hidden-state index {path}: {e.strerror or e}") from e
    return qids, dids, np.asarray(scores, dtype=np.float32)


def load_hidden(path: str | os.PathLike[str], *, index: bool = True) -> HiddenStates:
    """A hidden-state `.npy` (memory-mapped), with its ids index when `index` (it must then exist and match)."""
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise RerankerError(f"{path}: not a readable .npy file ({e}); pass the file `reranker score --save-hidden` "
                            "or `reranker embed -o X.npy` wrote") from e
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.dtype.kind != "f":
        shape = getattr(data, "shape", None)
        raise RerankerError(f"{path}: holds {getattr(data, 'dtype', 'an archive')} of shape {shape}; hidden states are "
                            "a float array of shape (n, hidden)")
    states = HiddenStates(data)
    if index:
        ipath = index_path(path)
        if not ipath.is_file():
            raise RerankerError(f"{path} has no ids index {ipath}; keep the two files together, or pass index=False")
        states.query_ids, states.doc_ids, states.scores = read_index(ipath)
        if len(states.query_ids) != len(data):
            raise RerankerError(f"{ipath} lists {len(states.query_ids)} pairs but {path} holds {len(data)} rows; "
                                "they are not from the same job: rerun it")
    return states
