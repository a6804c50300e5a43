"""What the input readers yield to the scoring job: work units and rejected records.

A record holding several documents yields one `Reject` per bad document, then a `Unit` with
the good ones (if any); a record that cannot be read at all yields one `Reject`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Unit:
    """One query with its candidate documents, to be scored together.

    `index` counts units from 0 in input order (rejects take none), so indices are dense.
    `docs` holds `(doc_id, text)` pairs (exactly one for flat-pair input). `positions` gives
    each doc's index in its input record when some of the record's documents were rejected
    (None: `docs[i]` is document i). `source` names the record for messages: "path:LINE",
    or "path:row N" (0-based) for Parquet. `pair` is True for a flat pair (one record per
    (query, document) pair, so a query may span several adjacent units) and False for a record
    holding all its query's documents.
    """

    index: int
    query_id: str
    query: str
    docs: list[tuple[str, str]]
    source: str
    positions: list[int] | None = None
    pair: bool = field(default=False, compare=False)

    def position(self, i: int) -> int:
        """The input index of `docs[i]` within its record."""
        return i if self.positions is None else self.positions[i]


@dataclass
class Reject:
    """A record, or one document of a record, that cannot be scored: where, why, and its text.

    `reason` starts with the kind of problem ("malformed JSON", "missing field",
    "non-string text", "invalid UTF-8", "duplicate doc id", ...) followed by details. For one
    bad document of a record, `query_id` and `doc_index` (its index in the record) say which.
    """

    source: str
    reason: str
    raw: str | None
    query_id: str | None = None
    doc_index: int | None = None
