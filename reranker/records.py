"""What the input readers yield to the scoring job: work units and rejected records."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Unit:
    """One query with its candidate documents, to be scored together.

    `index` counts units from 0 in input order; rejected records take no index, so indices
    are dense and the job can checkpoint "units before N are written". `docs` holds
    `(doc_id, text)` pairs (exactly one for flat-pair input). `source` names the record
    for messages: "path:LINE", or "path:row N" (0-based) for Parquet.
    """

    index: int
    query_id: str
    query: str
    docs: list[tuple[str, str]]
    source: str


@dataclass
class Reject:
    """A record that cannot be scored: where it is, why, and its text when there is one.

    `reason` starts with the kind of problem ("malformed JSON", "missing field",
    "non-string text", "invalid UTF-8", "empty document", ...) followed by details.
    """

    source: str
    reason: str
    raw: str | None
