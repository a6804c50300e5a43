"""`reranker head`: score existing embeddings (llama-embedding's JSON, or a .npy) with the torch head.

The upstream recipe's numpy step (`mlp(np.array([item['embedding'] for item in data['data']]))`),
but streamed: the JSON is parsed a chunk of rows at a time and a .npy is memory-mapped, so
files larger than memory work, and the head runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterable, Iterator

import numpy as np

from .errors import RerankerError
from .output_files import open_output

if TYPE_CHECKING:
    import torch

    from head import ScoringHead

OUTPUT_FORMATS = ("txt", "json", "npy")
JSON_CHUNK = 4096  # rows parsed before each head call: the parser, not the head, is the bottleneck
NPY_CHUNK = 1 << 18  # rows per head call on a memory-mapped .npy (scores are written out between calls)
_JSON_FIX = ("pass llama-embedding's `--embd-output-format json` output ({\"data\": [{\"embedding\": [...]}, ...]}), "
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
    import ijson

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
                    raise RerankerError(f"{source}: data entry {n} has no \"embedding\" ({str(entry)[:60]}); {_JSON_FIX}")
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
                buf[k] = values
            except (TypeError, ValueError) as e:
                raise RerankerError(f"{source}: embedding {n} holds a non-number ({e}); {_JSON_FIX}") from e
            n += 1
            k += 1
            if k == chunk_rows:
                yield buf[:k]
                buf = np.empty_like(buf)
                k = 0
    except ijson.JSONError as e:
        reason = (str(e).strip().splitlines() or ["parse error"])[0]
        raise RerankerError(f"{source}: invalid or truncated JSON after {n} embeddings ({reason}); {_JSON_FIX}") from e
    if n == 0:
        raise RerankerError(f"{source}: no embeddings found; {_JSON_FIX}")
    if k:
        yield buf[:k]


def open_npy(path: str, hidden: int, head_path: str) -> np.ndarray:
    """A .npy of embeddings, memory-mapped, checked to be float (n, hidden)."""
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise RerankerError(f"{path}: not a readable .npy file ({e}); {_JSON_FIX}") from e
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


def _is_npy(path: str) -> bool:
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


def resolve_device(device: str | None) -> "torch.device":
    """The torch device for the head: the one asked for, checked, else CUDA/MPS when present."""
    import torch

    from .api import default_device

    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise RerankerError(f"--device {device}: not a torch device ({e}); use cpu, cuda, cuda:1 or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RerankerError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu "
                            "or install torch's CUDA build")
    return dev


def load_head(path: str) -> "ScoringHead":
    """The scoring head from an mlp_weights.npz (or any file `ScoringHead.load` reads)."""
    from head import HeadLoadError, ScoringHead

    if not Path(path).is_file():
        raise RerankerError(f"head file not found: {path}; pass the mlp_weights.npz released with the GGUF")
    try:
        return ScoringHead.load(path)
    except HeadLoadError as e:
        raise RerankerError(str(e)) from e


def cmd_head(args: argparse.Namespace) -> None:
    """Run `reranker head` from parsed arguments."""
    from tqdm.auto import tqdm

    from head import score_embeddings

    if args.batch_size <= 0:
        raise RerankerError(f"--batch-size {args.batch_size} must be positive")
    fmt = args.format or ("npy" if (args.output or "").endswith(".npy") else "json" if (args.output or "").endswith(".json") else "txt")
    if fmt == "npy" and (args.output is None or args.output == "-"):
        raise RerankerError("--format npy writes a binary file; give it with -o FILE.npy")
    if args.embeddings != "-" and not Path(args.embeddings).is_file():
        raise RerankerError(f"embeddings file not found: {args.embeddings}; {_JSON_FIX}")
    head = load_head(args.head)
    device = resolve_device(args.device)
    hidden = head.hidden_size

    with contextlib.ExitStack() as stack:
        if _is_npy(args.embeddings):
            data = open_npy(args.embeddings, hidden, args.head)
            step = max(args.batch_size, NPY_CHUNK)
            rows: Iterable[np.ndarray] = (data[i : i + step] for i in range(0, len(data), step))
            total: int | None = len(data)
        else:
            fh = sys.stdin.buffer if args.embeddings == "-" else stack.enter_context(open(args.embeddings, "rb"))
            source = "stdin" if args.embeddings == "-" else args.embeddings
            rows = iter_json_rows(fh, source, hidden, args.head, chunk_rows=min(args.batch_size, JSON_CHUNK))
            total = None
        bar = stack.enter_context(tqdm(total=total, unit="row", desc="Scoring", file=sys.stderr,
                                       disable=args.quiet or not sys.stderr.isatty()))

        def scores() -> Iterator[np.ndarray]:
            for chunk in rows:
                yield score_embeddings(head, chunk, batch_size=args.batch_size, device=device, compile=args.compile)
                bar.update(len(chunk))

        with open_output(args.output, binary=fmt == "npy") as (stream, tmp):
            if fmt == "npy":
                # Scores are 4 bytes a row: holding them is fine even when the embeddings are not.
                parts = list(scores())
                with open(tmp, "wb") as out:
                    np.save(out, np.concatenate(parts) if parts else np.empty(0, np.float32))
            else:
                for piece in format_scores(scores(), fmt):
                    stream.write(piece)


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Add the `head` command (score llama-embedding output with the torch head) to `reranker`'s subparsers."""
    p = subparsers.add_parser(
        "head", help="score llama-embedding JSON (or a .npy) with the scoring head, streaming",
        description="The upstream recipe's numpy MLP step on existing embeddings, in torch (GPU when present), "
                    "streaming so files larger than memory work. Prints one score per row, in file order.")
    p.add_argument("embeddings", help="llama-embedding --embd-output-format json (or array) output, '-' for stdin, or a .npy")
    p.add_argument("--head", required=True, help="mlp_weights.npz released with the GGUF")
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout); written whole or not at all")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="txt: one score per line (default); json: a list; npy: float32 array (needs -o). "
                        "Default from -o's suffix")
    p.add_argument("--batch-size", type=int, default=65536, help="rows per head call (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device for the head (default: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the head (pays off only for huge .npy inputs on CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")
    p.set_defaults(func=cmd_head)
    return p
