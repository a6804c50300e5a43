"""The job's checkpoint: what was consumed and written, and what it was computed from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from reranker.atomic import atomic_write
from reranker.errors import RerankerError
from reranker.jobs.paths import CHECKPOINT, beside, writing

VERSION = 2  # 2: inputs hashed whole, the rejects file recorded
_EDGE = 1 << 20  # bytes hashed at each end of a large model file


def file_fingerprint(path: str | os.PathLike, whole: bool = False) -> dict:
    """Size plus a SHA-256 of the file: whole, or (a model of many GB) its first and last MiB."""
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


def input_fingerprint(files: list[Path]) -> list[dict]:
    """Fingerprints of the files a job reads, each hashed whole (streamed), so a change anywhere
    in an input, even one byte in the middle of a large file, is seen when the job resumes."""
    try:
        return [file_fingerprint(f, whole=True) for f in files]
    except OSError as e:
        raise RerankerError(f"cannot read the input {e.filename}: {e.strerror}") from e


class Checkpoint:
    """`OUTPUT.checkpoint.json`, replaced atomically after the output it describes is durable."""

    def __init__(self, output: Path) -> None:
        self.path = beside(output, CHECKPOINT)

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
        with writing(self.path, "checkpoint"), atomic_write(self.path, "w") as f:
            json.dump({"version": VERSION, **state}, f, indent=1)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def changed_parts(old: dict, new: dict) -> list[str]:
    """Names of the fingerprint parts (model, head, input, settings, vision) that differ.

    A checkpoint without a `vision` part was made by a run that scored no image (it had no projector, so
    its first image document stopped it, or it predates image documents): any projector may take over.
    """
    return [k for k in new if old.get(k) != new[k] and not (k == "vision" and k not in old)]
