"""What the input readers yield to the scoring job: work units and rejected records.

A record holding several documents yields one `Reject` per bad document, then a `Unit` with
the good ones (if any); a record that cannot be read at all yields one `Reject`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, eq=False)
class ImageDoc:
    """An image document as the input gives it: `given` is the path as written (None for Parquet bytes),
    `source` what is read: that path resolved against the input's folder, or the encoded bytes.
    `page` (from 1) makes it page `page` of the PDF at (or in) `source`, rendered when read.

    Readers only name the file; the job opens and decodes it where it tokenises a window
    (`jobs.images`), so a resume never decodes the images of the records it skips.
    """

    given: str | None
    source: Path | bytes
    page: int | None = None

    @property
    def kind(self) -> str:
        return "image" if self.page is None else "PDF page"

    def describe(self) -> str:
        """How messages and outputs name it: the path as written, or "<N bytes>" (a page: ``...#page``)."""
        name = self.given if self.given is not None else f"<{len(self.source)} bytes>"
        return name if self.page is None else f"{name}#{self.page}"

    def as_json(self) -> dict:
        """The document as the output echoes it: `{"image": path}`, or a page's `{"pdf": path, "page": n}` (bytes:
        their size, not the bytes: `{"image_bytes": N}`, `{"pdf_bytes": N, "page": n}`)."""
        kind = "image" if self.page is None else "pdf"
        echo = {kind: self.given} if self.given is not None else {f"{kind}_bytes": len(self.source)}
        return echo if self.page is None else {**echo, "page": self.page}


@dataclass
class Unit:
    """One query with its candidate documents, to be scored together.

    `index` counts units from 0 in input order (rejects take none), so indices are dense.
    `docs` holds `(doc_id, text)` pairs, the text an `ImageDoc` for an image document (exactly one
    pair for flat-pair input). `positions` gives
    each doc's index in its input record when some of the record's documents were rejected
    (None: `docs[i]` is document i). `source` names the record for messages: "path:LINE",
    or "path:row N" (0-based) for Parquet. `pair` is True for a flat pair (one record per
    (query, document) pair, so a query may span several adjacent units) and False for a record
    holding all its query's documents. `opens_query` is False for a flat pair that continues its query's
    run (set by `validate.one_run_per_query`), so that queries are counted, not pairs.
    """

    index: int
    query_id: str
    query: str
    docs: list[tuple[str, str | ImageDoc]]
    source: str
    positions: list[int] | None = None
    pair: bool = field(default=False, compare=False)
    opens_query: bool = field(default=True, compare=False)

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
