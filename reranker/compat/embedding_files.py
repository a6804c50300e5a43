"""Embeddings for `reranker head` (llama-embedding's JSON, or a .npy), read as a stream, and scores out.

The upstream recipe's numpy step (`mlp(np.array([item['embedding'] for item in data['data']]))`),
but streamed: the JSON is parsed a chunk of rows at a time and a .npy is memory-mapped, so
files larger than memory work, and the head runs on the GPU when there is one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from typing import IO

import ijson
import numpy as np

from reranker.errors import RerankerError

OUTPUT_FORMATS = ("txt", "json", "npy", "jsonl")  # jsonl: a hidden-state file's ids with each score
JSON_CHUNK = 4096  # rows parsed before each head call: the parser, not the head, is the bottleneck
NPY_CHUNK = 1 << 18  # rows per head call on a memory-mapped .npy (scores are written out between calls)
JSON_FIX = ("pass llama-embedding's `--embd-output-format json` output ({\"data\": [{\"embedding\": [...]}, ...]}), "
             "its `array` output ([[...], ...]), or a float .npy of shape (n, hidden)")


def _hidden_mismatch(source: str, got: int, head_path: str, hidden: int) -> RerankerError:
    return RerankerError(
        f"{source} holds embeddings of size {got} but the head {head_path} takes {hidden}; score them with the "
        f"mlp_weights.npz released with the GGUF that produced them (its hidden size is {got})"
    )


def _peek_start(fh: IO[bytes]) -> bytes:
    """The first non-blank byte of a JSON stream, without consuming it."""
    peek = getattr(fh, "peek", None)
    start = (peek(4096) if peek else b"").lstrip()
    return start[:1]


def iter_json_rows(fh: IO[bytes], source: str, hidden: int, head_path: str, *,
                   chunk_rows: int = JSON_CHUNK) -> Iterator[np.ndarray]:
    """Float32 (k, hidden) chunks of a llama-embedding JSON (`json`, `json+` or `array` layout), in file order.

    In the `json` layout each entry's "index" must be its position (0, 1, ...): scores
    are written in file order, so an edited or merged file is refused rather than misread.
    """
    layout_array = _peek_start(fh) == b"["
    entries = ijson.items(fh, "item" if layout_array else "data.item", use_float=True)
    buf = np.empty((chunk_rows, hidden), dtype=np.float32)
    n = k = 0
    try:
        for entry in entries:
            if layout_array:
                values = entry
            else:
                if not isinstance(entry, dict) or "embedding" not in entry:
                    raise RerankerError(f"{source}: data entry {n} has no \"embedding\" ({str(entry)[:60]}); {JSON_FIX}")
                index = entry.get("index", n)
                if index != n:
                    raise RerankerError(
                        f"{source}: data entry {n} has index {index!r}, but llama-embedding writes indices 0..n-1 in "
                        "order and scores follow the file's order; sort \"data\" by \"index\" (or re-run the embedding) "
                        "and score it again"
                    )
                values = entry["embedding"]
            if not isinstance(values, list) or len(values) != hidden:
                if n == 0 and isinstance(values, list):
                    raise _hidden_mismatch(source, len(values), head_path, hidden)
                size = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
                raise RerankerError(f"{source}: embedding {n} has {size}, expected a list of {hidden} numbers like the rows before it")
            try:
                with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, which the caller reports
                    buf[k] = values
            except (TypeError, ValueError) as e:
                raise RerankerError(f"{source}: embedding {n} holds a non-number ({e}); {JSON_FIX}") from e
            n += 1
            k += 1
            if k == chunk_rows:
                yield buf[:k]
                buf = np.empty_like(buf)
                k = 0
    except ijson.JSONError as e:
        reason = (str(e).strip().splitlines() or ["parse error"])[0]
        raise RerankerError(f"{source}: invalid or truncated JSON after {n} embeddings ({reason}); {JSON_FIX}") from e
    if n == 0:
        raise RerankerError(f"{source}: no embeddings found; {JSON_FIX}")
    if k:
        yield buf[:k]


def open_npy(path: str, hidden: int, head_path: str) -> np.ndarray:
    """A .npy of embeddings, memory-mapped, checked to be float (n, hidden)."""
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise RerankerError(f"{path}: not a readable .npy file ({e}); {JSON_FIX}") from e
    if not isinstance(data, np.ndarray):
        data.close()
        raise RerankerError(f"{path}: is an .npz archive; save the embeddings as one (n, hidden) array with np.save")
    if data.dtype.kind != "f":
        raise RerankerError(f"{path}: holds {data.dtype} values; the embeddings must be floats (float32 as llama.cpp writes)")
    if data.ndim != 2:
        if data.ndim >= 1 and data.shape[-1] != hidden:
            raise _hidden_mismatch(path, data.shape[-1], head_path, hidden)
        raise RerankerError(f"{path}: has shape {data.shape}; expected (n, {hidden}), one row per prompt")
    if data.shape[1] != hidden:
        raise _hidden_mismatch(path, data.shape[1], head_path, hidden)
    return data


def first_non_finite(a: np.ndarray, block: int = 4096) -> int | None:
    """The index of the first row (or value, for 1-D) of `a` holding NaN or inf, else None.

    Checked `block` rows at a time, so a memory-mapped chunk needs no chunk-sized mask.
    """
    for start in range(0, len(a), block):
        ok = np.isfinite(a[start : start + block])
        ok = ok.reshape(len(ok), -1).all(axis=1)
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


def is_npy(path: str) -> bool:
    if path == "-":
        return False
    if path.endswith(".npy"):
        return True
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        return fh.read(6) == b"\x93NUMPY"
    return False


def format_scores(chunks: Iterable[np.ndarray], fmt: str = "txt") -> Iterator[str]:
    """Scores as text, piece by piece: one per line (`txt`) or a JSON list (`json`).

    Each value is the shortest decimal that reads back as the same float32, so nothing is lost.
    """
    if fmt == "json":
        yield "["
    first = True
    for chunk in chunks:
        if fmt == "txt":
            yield "".join([str(v) + "\n" for v in chunk])
        else:
            body = ",\n  ".join([str(v) if np.isfinite(v) else "null" for v in chunk])
            if body:
                yield ("\n  " if first else ",\n  ") + body
                first = False
    if fmt == "json":
        yield "\n]\n" if not first else "]\n"


def keyed_scores(chunks: Iterable[np.ndarray], index: str) -> Iterator[str]:
    """`{"query_id", "doc_id", "score"}` lines: row i's ids from the hidden-state index `index`, its new score.

    The line layout of `reranker score --per pair` (and of the index itself), so a rescored
    file lines up with the job's output. The index is streamed beside the scores.
    """
    with open(index, encoding="utf-8") as ids:
        n = 0
        for chunk in chunks:
            lines = []
            for score in chunk.tolist():
                line = ids.readline()
                try:
                    rec = json.loads(line)
                    key = {"query_id": rec["query_id"], "doc_id": rec["doc_id"]}
                except (ValueError, KeyError, TypeError) as e:
                    raise RerankerError(f"{index}:{n + 1}: not a line of a hidden-state index ({e}); the .npy and its "
                                        "index must come from the same `reranker score --save-hidden` job") from e
                lines.append(json.dumps({**key, "score": score}, ensure_ascii=False) + "\n")
                n += 1
            yield "".join(lines)
        if ids.readline():
            raise RerankerError(f"{index} lists more pairs than the .npy holds rows ({n}); they are not from the same job")
