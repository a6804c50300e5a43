"""The job's checkpoint: what was consumed and written, and what it was computed from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from reranker.atomic import atomic_write
from reranker.errors import RerankerError

VERSION = 1
_EDGE = 1 << 20  # bytes hashed at each end of a large file


def file_fingerprint(path: str | os.PathLike, whole: bool = False) -> dict:
    """Size plus a hash of the file (whole, or its first and last MiB: inputs can be many GB)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with p.open("rb") as f:
        if whole or size <= 2 * _EDGE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return {"path": str(p.resolve()), "size": size, "sha256": h.hexdigest()}


def input_fingerprint(paths: list[Path], skip_prefix: str = "") -> list[dict]:
    """Fingerprints of the input files (a directory counts as the files directly inside it,
    except the job's own output files, named `skip_prefix`*, when it writes there)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(q for q in p.iterdir() if q.is_file() and not (skip_prefix and q.name.startswith(skip_prefix))))
        else:
            files.append(p)
    return [file_fingerprint(f) for f in files]


class Checkpoint:
    """`OUTPUT.checkpoint.json`, replaced atomically after the output it describes is durable."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".checkpoint.json")

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RerankerError(f"{self.path} is unreadable ({e}); rerun with --restart to start over") from e
        if state.get("version") != VERSION:
            raise RerankerError(f"{self.path} was written by another version; rerun with --restart to start over")
        return state

    def save(self, state: dict) -> None:
        with atomic_write(self.path, "w") as f:
            json.dump({"version": VERSION, **state}, f, indent=1)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def changed_parts(old: dict, new: dict) -> list[str]:
    """Names of the fingerprint parts (model, head, input, settings) that differ."""
    return [k for k in new if old.get(k) != new[k]]
