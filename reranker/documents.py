"""Reading documents for the `rerank` command: one per line, or JSONL of `{"text": ...}`."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RerankerError


def read_documents(path: str | Path) -> list[str]:
    """Documents from a text file (one per non-empty line) or a `.jsonl` file of `{"text": ...}` objects."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise RerankerError(f"cannot read documents file {p}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RerankerError(f"{p} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8") from e
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        return [line for line in text.splitlines() if line.strip()]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RerankerError(f"{p}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise RerankerError(f'{p}:{n}: expected an object with a string "text" field, got {line[:80]!r}')
        docs.append(obj["text"])
    return docs
