"""Input readers of the scoring job: JSONL, Parquet and BEIR folders -> work units, streamed.

Every record becomes a `Unit`, or a `Reject` when it cannot be read; a bad document inside a
record is a `Reject` of its own, and the record's other documents still make its `Unit`.
Nothing is dropped silently. Files are read in binary and decoded line by line, so one bad
line is one reject with its line number.

A document may be an image: `{"id", "image": PATH}` in a nested record, `"image": PATH` in place of
`"document"` in a flat one or a BEIR corpus entry, or an `image` column (a path, or the encoded
bytes) in Parquet. Or a PDF page, `"pdf": PATH, "page": N` in the same places (Parquet: `pdf` and
`page` columns or struct fields, `pdf` a path or the file's bytes); in a nested record, `{"id", "pdf": PATH}`
without a page is every page of the file, one document each (ids `id#N`, or `PATH#N` without an id, `K#N`
for bytes without one, K the index of its first page; its page count is read here, so the record's
documents are known when it is read). A relative path is resolved against the
folder of the file that names it. The readers only record it (`ImageDoc`); the job reads and decodes
(renders) it per window (`jobs.images`).
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from reranker.errors import RerankerError
from reranker.extras import install_hint
from reranker.jobs.records import ImageDoc, Reject, Unit

INPUT_FORMATS = ("jsonl", "pairs-jsonl", "parquet", "beir")
FLAT_FIELDS = ("query_id", "query", "doc_id", "document")
RUN_FIELDS = "`qid Q0 docid rank score tag`"

_BOM = b"\xef\xbb\xbf"
_PARQUET_BATCH = {"flat": 4096, "nested": 256}  # rows per batch: bounds memory, not results
_PARQUET_IMAGE_BATCH = 16  # ... and with image bytes in the rows, which may be megabytes each


def import_pyarrow(why: str) -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or a RerankerError saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise RerankerError(f"{why} needs pyarrow, which is not installed: {install_hint('parquet')}") from e
    return pyarrow, pyarrow.parquet


def detect_input_format(path: str | os.PathLike[str] | None, input_format: str | None = None, *, beir_files: bool = False) -> str:
    """The input format: `input_format` when given, else from the path (a folder is BEIR)."""
    if input_format is not None:
        if input_format not in INPUT_FORMATS:
            raise RerankerError(f"unknown input format {input_format!r}; use one of {', '.join(INPUT_FORMATS)}")
        return input_format
    if beir_files or path is None:
        return "beir"
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir() or suffix in (".trec", ".run"):
        return "beir"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise RerankerError(f"cannot tell the format of {p} from its extension; pass the input format ({', '.join(INPUT_FORMATS)})")


def read_input(path: str | os.PathLike[str] | None, input_format: str | None = None, *, depth: int = 100,
               queries: str | os.PathLike[str] | None = None, corpus: str | os.PathLike[str] | None = None,
               run: str | os.PathLike[str] | None = None) -> Iterator[Unit | Reject]:
    """Stream the units and rejects of an input, in input order, with bounded memory.

    `input_format` is one of "jsonl" (nested `{"query", "documents"}` or flat pairs, told
    apart by the first valid record), "pairs-jsonl", "parquet" or "beir"; by default it
    comes from the extension, and a folder is BEIR. For BEIR, `path` is the folder (or the
    run file) and `queries`, `corpus`, `run` override the files found there; the top
    `depth` candidates per query (by the run's score, ties in run order) are reranked, query
    by query in the order each first appears in the run; a corpus document's text is
    "title text" when its title is not blank, as BEIR's rerankers join them. Missing files
    and unknown formats raise `RerankerError` here, before the first record is read.
    """
    fmt = detect_input_format(path, input_format, beir_files=any(x is not None for x in (queries, corpus, run)))
    if fmt == "beir":
        if depth < 1:
            raise RerankerError(f"depth={depth} must be at least 1 (the number of run candidates reranked per query)")
        return _read_beir(*beir_files(path, queries, corpus, run), depth)
    if path is None:
        raise RerankerError(f"no input file given for the {fmt} format")
    p = Path(path)
    if not p.is_file():
        raise RerankerError(f"input file not found: {p}")
    if fmt == "parquet":
        return _read_parquet(p)
    return _read_jsonl(p, "flat" if fmt == "pairs-jsonl" else None)


class _Bad(Exception):
    """A record-level problem; the reader turns it into a Reject with this reason."""


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f'non-string text: "{name}" is {_json_type(value)}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON escapes can spell lone surrogates that no encoder accepts
        raise _Bad(f'invalid UTF-8: "{name}" holds a lone surrogate \\u{ord(value[e.start]):04x}') from None
    return value


def _image(value: object, name: str, base: Path) -> ImageDoc:
    """An image document's value: a local path (relative: to `base`, the folder of the file naming it) or bytes."""
    if isinstance(value, (bytes, bytearray)):  # a Parquet binary column
        if not value:
            raise _Bad(f'bad image: "{name}" holds 0 bytes')
        return ImageDoc(None, bytes(value))
    if not isinstance(value, str):
        raise _Bad(f'bad image: "{name}" must be a file path (a string), got {_json_type(value)}')
    given = _text(value, name)
    if not given.strip() or "\0" in given:
        raise _Bad(f'bad image: "{name}" is {"empty" if not given.strip() else "not a path (it holds a NUL character)"}')
    if given[:8].lower().startswith(("http://", "https://", "data:")):
        raise _Bad(f'bad image: "{name}" is a URL; a job reads local image files only: download it and give its path')
    # Data, not a command: no "~" or variable expansion, as a shell would do.
    path = Path(given)
    return ImageDoc(given, path if path.is_absolute() else base / path)


def _pdf(value: object, page: object, prefix: str, base: Path) -> ImageDoc:
    """Page `page` (from 1) of the PDF at path `value` (relative: to `base`), or in `value` (the file's bytes:
    a Parquet binary column), kept unread; `prefix` names the fields' document ("documents[2]." or "")."""
    from reranker.extras import require
    from reranker.jobs.images import MAX_FILE_BYTES

    # Not a reject: every PDF document would fail the same way, so the job stops at the first with the fix.
    require("pdf", f'a PDF document ("{prefix}pdf")')
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise _Bad(f'bad PDF: "{prefix}pdf" holds 0 bytes')
        if len(value) > MAX_FILE_BYTES:  # the cap of a PDF file, for the same bytes given in the input
            raise _Bad(f'bad PDF: "{prefix}pdf" holds {len(value)} bytes, over the limit of {MAX_FILE_BYTES}; '
                       "split it, or give its pages as images")
        doc = ImageDoc(None, bytes(value))
    elif not isinstance(value, str):
        raise _Bad(f'bad PDF: "{prefix}pdf" must be a file path (a string) or, in Parquet, the file\'s bytes (binary), '
                   f"got {_json_type(value)}")
    else:
        try:
            doc = _image(value, f"{prefix}pdf", base)
        except _Bad as e:
            raise _Bad(str(e).replace("bad image:", "bad PDF:", 1).replace("local image files", "local files")) from None
    # JSON numbers arrive as int or float, Parquet's as int: 2.0 is not a page number, nor is true.
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise _Bad(f'bad PDF page: "{prefix}page" must be an integer >= 1 (pages count from 1, as a PDF viewer '
                   f"shows them), got {json.dumps(page, default=_json_default)[:40]}")
    return ImageDoc(doc.given, doc.source, page)


def _pdf_pages(value: object, prefix: str, base: Path) -> list[ImageDoc]:
    """Every page of the PDF at path `value` (or in `value`, its bytes): its page count is read now (a file
    opened as image files are, `jobs.images`); the pages are rendered per window, like images."""
    from reranker.jobs.images import pdf_page_count

    doc = _pdf(value, 1, prefix, base)
    try:
        n = pdf_page_count(doc.source)
    except RerankerError as e:
        raise _Bad(f"unusable PDF {doc.given if doc.given is not None else f'<{len(doc.source)} bytes>'}: {e}") from None
    return [ImageDoc(doc.given, doc.source, p) for p in range(1, n + 1)]


def _json_default(value: object) -> object:
    """How a record's raw JSON (for the rejects file) shows what JSON cannot hold: image bytes by their size."""
    return f"<{len(value)} bytes>" if isinstance(value, (bytes, bytearray)) else repr(value)


def _field(obj: dict, key: str) -> object:
    if key not in obj:
        raise _Bad(f'missing field "{key}"')
    return obj[key]


def _ident(value: object, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(f'bad id: "{name}" must be a string or an integer, got {_json_type(value)}')
    ident = _text(str(value), name)
    if not ident.strip():
        raise _Bad(f'bad id: "{name}" is empty')
    return ident


class _Record:
    """A readable record: its query and good documents, and the documents rejected on their own."""

    def __init__(self, qid: str, query: str, pair: bool = False) -> None:
        self.qid, self.query, self.pair = qid, query, pair
        self.docs: list[tuple[str, str | ImageDoc]] = []
        self.positions: list[int] = []
        self.bad: list[tuple[int, str, object]] = []  # (index in the record, reason, the item)

    def items(self, index: int, source: str) -> Iterator[Unit | Reject]:
        """Its rejects, then its unit (numbered `index`) when any document is good."""
        for i, reason, item in self.bad:
            raw = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False, default=_json_default)
            # A lone surrogate (spelled by a JSON escape) cannot be written as UTF-8: keep it as its escape.
            raw = raw.encode("utf-8", "backslashreplace").decode("utf-8")
            yield Reject(source, reason, raw, query_id=self.qid, doc_index=i)
        if self.docs:
            yield Unit(index, self.qid, self.query, self.docs, source, self.positions if self.bad else None, pair=self.pair)


def _nested(obj: dict, default_qid: str, base: Path) -> _Record:
    query = _text(_field(obj, "query"), "query")
    qid = default_qid if obj.get("query_id") is None else _ident(obj["query_id"], "query_id")
    items = _field(obj, "documents")
    if not isinstance(items, list):
        raise _Bad(f'bad field: "documents" must be a list of strings or {{"id", "text"}} objects, got {_json_type(items)}')
    if not items:
        raise _Bad('empty documents list: "documents" is []')
    record = _Record(qid, query)
    seen: dict[str, str] = {}  # doc id -> the element of "documents" that gave it
    k = 0  # a document's index: a whole PDF counts as its pages, so indices count the documents as expanded
    for i, item in enumerate(items):
        name = f"documents[{i}]"
        if isinstance(item, dict) and item.get("pdf") is not None and item.get("page") is None:
            k = _expand_pdf(record, seen, item, name, k, base)
            continue
        try:
            if isinstance(item, dict):
                _check_one_kind(item, name)
                if item.get("pdf") is not None:
                    text = _pdf(item["pdf"], item["page"], f"{name}.", base)
                elif item.get("image") is not None:
                    text = _image(item["image"], f"{name}.image", base)
                elif "text" not in item:
                    raise _Bad(f'missing field "{name}.text"')
                else:
                    text = _text(item["text"], f"{name}.text")
                doc_id = str(k) if item.get("id") is None else _ident(item["id"], f"{name}.id")
            else:
                text, doc_id = _text(item, name), str(k)
            _add(record, seen, name, k, doc_id, text)
        except _Bad as e:
            record.bad.append((k, f"{e} (query {qid!r}, document {k})", item))
        k += 1
    return record


def _expand_pdf(record: _Record, seen: dict[str, str], item: dict, name: str, k: int, base: Path) -> int:
    """A whole PDF's pages as the record's documents k, k+1, ... (ids "<id>#<page>", or "<path as given>#<page>");
    the next document's index. A file that cannot be counted is one reject at index k; a page whose id is taken,
    a reject of its own. A PDF given as bytes, without an id, takes its first page's index as one ("k#1", ...)."""
    try:
        _check_one_kind(item, name)
        doc_id = None if item.get("id") is None else _ident(item["id"], f"{name}.id")
        pages = _pdf_pages(item["pdf"], f"{name}.", base)
    except _Bad as e:
        record.bad.append((k, f"{e} (query {record.qid!r}, document {k})", item))
        return k + 1
    if doc_id is None:
        doc_id = pages[0].given if pages[0].given is not None else str(k)
    for page in pages:
        try:
            _add(record, seen, name, k, f"{doc_id}#{page.page}", page)
        except _Bad as e:
            record.bad.append((k, f"{e} (query {record.qid!r}, document {k})", {**item, "page": page.page}))
        k += 1
    return k


def _check_one_kind(item: dict, name: str) -> None:
    kinds = [key for key in ("text", "image", "pdf") if item.get(key) is not None]
    if len(kinds) > 1:
        raise _Bad(f'both "{name}.{kinds[0]}" and "{name}.{kinds[1]}": a document is one or the other')
    if item.get("page") is not None and not kinds == ["pdf"]:
        raise _Bad(f'"{name}.page" without "{name}.pdf": a page number is for a PDF document')


def _add(record: _Record, seen: dict[str, str], name: str, k: int, doc_id: str, doc: str | ImageDoc) -> None:
    if doc_id in seen:  # one query's results are keyed by doc id (TREC, evaluators)
        # A document without an id is given its index: say so, when that may be how the two met.
        hint = "; a document without an id is given its index: give every document of a record an id, or none" \
            if doc_id.isdigit() else ""
        raise _Bad(f'duplicate doc id: "{doc_id}" in {seen[doc_id]} and {name}{hint}')
    seen[doc_id] = name
    record.docs.append((doc_id, doc))
    record.positions.append(k)


def _flat(obj: dict, base: Path) -> _Record:
    record = _Record(_ident(_field(obj, "query_id"), "query_id"), _text(_field(obj, "query"), "query"), pair=True)
    doc_id = _ident(_field(obj, "doc_id"), "doc_id")
    kinds = [key for key in ("document", "image", "pdf") if obj.get(key) is not None]
    if len(kinds) > 1:
        raise _Bad(f'both "{kinds[0]}" and "{kinds[1]}": a pair\'s document is one or the other')
    if obj.get("pdf") is not None:
        if obj.get("page") is None:
            raise _Bad('missing field "page": a flat pair is one page of a PDF (pages count from 1); for every page '
                       'of a file use a nested record, {"query", "documents": [{"pdf": PATH}]}')
        document = _pdf(obj["pdf"], obj["page"], "", base)
    elif obj.get("image") is not None:
        document = _image(obj["image"], "image", base)
    else:
        document = _text(_field(obj, "document"), "document")
    record.docs.append((doc_id, document))
    record.positions.append(0)
    return record


def _text_lines(path: Path) -> Iterator[tuple[int, int, str] | Reject]:
    """(line number, byte offset, text) per non-blank line, or a Reject for one that is not UTF-8."""
    with open(path, "rb") as f:
        offset = 0
        for n, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if n == 1 and line.startswith(_BOM):
                line, start = line[len(_BOM):], start + len(_BOM)
            if not line.strip():
                continue
            line = line.rstrip(b"\r\n")
            try:
                yield n, start, line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Reject(f"{path}:{n}", f"invalid UTF-8: byte {e.start + 1} of the line is 0x{line[e.start]:02x}; "
                             "re-encode the file as UTF-8", line.decode("utf-8", "backslashreplace"))


def _json_lines(path: Path) -> Iterator[tuple[int, int, str, Any] | Reject]:
    """(line number, byte offset, text, parsed value) per non-blank line, or a Reject for one that is not JSON."""
    for item in _text_lines(path):
        if isinstance(item, Reject):
            yield item
            continue
        n, start, text = item
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            # e.msg may end in "at" ("Invalid control character at"): the position follows once.
            yield Reject(f"{path}:{n}", f"malformed JSON: {e.msg.removesuffix(' at')} at column {e.colno}", text)
        except RecursionError:
            yield Reject(f"{path}:{n}", "malformed JSON: nested too deeply", text)
        except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
            yield Reject(f"{path}:{n}", f"malformed JSON: {e}", text)
        else:
            yield n, start, text, value


def _read_jsonl(path: Path, shape: str | None) -> Iterator[Unit | Reject]:
    # `shape` is "nested" or "flat"; None until the first record that has either's keys.
    index = 0
    for record, item in enumerate(_json_lines(path)):
        if isinstance(item, Reject):
            yield item
            continue
        n, _, text, obj = item
        source = f"{path}:{n}"
        try:
            if not isinstance(obj, dict):
                raise _Bad(f"not a JSON object: the line holds {_json_type(obj)}")
            if shape is None:
                if "documents" in obj:
                    shape = "nested"
                elif "document" in obj or "doc_id" in obj:  # an image pair has its doc_id
                    shape = "flat"
                else:
                    raise _Bad('missing field "documents" (nested records) or "document" (flat pairs)')
            # The default query id is the 0-based record number (non-blank lines, rejects included),
            # so it does not shift when a bad line is fixed.
            parsed = _nested(obj, str(record), path.parent) if shape == "nested" else _flat(obj, path.parent)
        except _Bad as e:
            yield Reject(source, str(e), text)
            continue
        for item in parsed.items(index, source):
            yield item
            index += isinstance(item, Unit)


def _read_parquet(path: Path) -> Iterator[Unit | Reject]:
    pa, pq = import_pyarrow(f"reading {path}")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise RerankerError(f"{path} is not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    if "documents" in names:
        shape = "nested"
        if "query" not in names:
            raise RerankerError(f'{path} has a "documents" column but no "query" column (columns: {", ".join(names)})')
        columns = ["query", "documents"] + (["query_id"] if "query_id" in names else [])
    elif all(c in names for c in FLAT_FIELDS if c != "document") and any(c in names for c in ("document", "image", "pdf")):
        shape, columns = "flat", [c for c in (*FLAT_FIELDS, "image", "pdf", "page") if c in names]
    else:
        missing = [c for c in FLAT_FIELDS if c not in names]
        raise RerankerError(f'{path} has neither a "documents" column (with "query") nor the flat-pair columns '
                            f'{", ".join(FLAT_FIELDS)} (or "image", or "pdf" and "page", for "document"; missing {", ".join(missing)}; columns: {", ".join(names)})')
    return _parquet_rows(path, pf, pa, shape, columns, _PARQUET_IMAGE_BATCH if _has_images(pf.schema_arrow) else _PARQUET_BATCH[shape])


def _has_images(schema: Any) -> bool:
    """Whether rows may hold images: an `image` or `pdf` column, or such a field in the documents' structs."""
    if "image" in schema.names or "pdf" in schema.names:
        return True
    if "documents" not in schema.names:
        return False
    item = getattr(schema.field("documents").type, "value_type", None)
    return item is not None and hasattr(item, "get_field_index") and max(item.get_field_index(k) for k in ("image", "pdf")) >= 0


def _parquet_rows(path: Path, pf: Any, pa: Any, shape: str, columns: list[str], batch_size: int) -> Iterator[Unit | Reject]:
    index = row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for obj in _batch_rows(batch):
                source = f"{path}:row {row}"
                try:
                    if isinstance(obj, _Bad):
                        raise obj
                    parsed = _nested(obj, str(row), path.parent) if shape == "nested" else _flat(obj, path.parent)
                except _Bad as e:
                    yield Reject(source, str(e), None if isinstance(obj, _Bad) else json.dumps(obj, ensure_ascii=False, default=_json_default))
                else:
                    for item in parsed.items(index, source):
                        yield item
                        index += isinstance(item, Unit)
                row += 1
    except pa.ArrowException as e:
        raise RerankerError(f"{path}: cannot read Parquet row {row} onwards ({e})") from e


def _batch_rows(batch: Any) -> list[dict | _Bad]:
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:  # a string column with invalid UTF-8: find the rows, one at a time
        rows: list[dict | _Bad] = []
        for i in range(batch.num_rows):
            try:
                rows.extend(batch.slice(i, 1).to_pylist())
            except UnicodeDecodeError as e:
                rows.append(_Bad(f"invalid UTF-8: a string column holds byte 0x{e.object[e.start]:02x}"))
        return rows


# --- BEIR ---------------------------------------------------------------------------------


def beir_files(path: str | os.PathLike[str] | None, queries: str | os.PathLike[str] | None = None,
               corpus: str | os.PathLike[str] | None = None, run: str | os.PathLike[str] | None = None) -> tuple[Path, Path, Path]:
    """The (queries, corpus, run) files a BEIR input reads, as `read_input` finds them."""
    folder = Path(path) if path is not None else None
    if folder is not None and folder.is_file():  # the run file itself, beside queries.jsonl and corpus.jsonl
        run = run if run is not None else folder
        folder = folder.parent
    elif folder is not None and not folder.is_dir():
        raise RerankerError(f"BEIR input not found: {folder}; give a folder with queries.jsonl, corpus.jsonl and a run file")

    def pick(given: str | os.PathLike[str] | None, name: str) -> Path:
        if given is not None:
            p = Path(given)
        elif folder is not None:
            p = folder / name
        else:
            raise RerankerError(f"BEIR input needs {name}: give the folder that holds it or its path")
        if p.exists() and not p.is_file():
            raise RerankerError(f"BEIR {name} {p} is not a regular file; give the path of the file")
        if not p.is_file():
            raise RerankerError(f"BEIR {name} not found: {p}; give its path explicitly")
        return p

    found_queries, found_corpus = pick(queries, "queries.jsonl"), pick(corpus, "corpus.jsonl")
    if run is None and folder is not None:
        found = [folder / n for n in ("run.trec", "run.txt") if (folder / n).is_file()] + sorted(folder.glob("*.run"))
        if not found:
            raise RerankerError(f"no run file in {folder} (looked for run.trec, *.run, run.txt); give the TREC run of first-stage candidates explicitly")
        if len(found) > 1:
            raise RerankerError(f"several run files in {folder}: {', '.join(p.name for p in found)}; give the one to rerank explicitly")
        run = found[0]
    return found_queries, found_corpus, pick(run, "run file")


def _beir_text(obj: object, base: Path) -> str | ImageDoc:
    """A corpus record's text for reranking: "title text" when the title is not blank, as BEIR's reranker does;
    or its image, when it has `"image": PATH` (relative to `base`, the corpus file's folder) and no text, or a PDF
    page, `"pdf": PATH, "page": N`."""
    if not isinstance(obj, dict):
        raise _Bad(f"not a JSON object: the line holds {_json_type(obj)}")
    kinds = [key for key in ("text", "image", "pdf") if obj.get(key) is not None]
    if len(kinds) > 1:
        raise _Bad(f'both "{kinds[0]}" and "{kinds[1]}": a corpus document is one or the other')
    if obj.get("pdf") is not None:
        if obj.get("page") is None:
            raise _Bad('missing field "page": a corpus document is one page of a PDF (pages count from 1)')
        return _pdf(obj["pdf"], obj["page"], "", base)
    if obj.get("image") is not None:
        return _image(obj["image"], "image", base)
    text = _text(_field(obj, "text"), "text")
    title = "" if obj.get("title") is None else _text(obj["title"], "title")
    return f"{title} {text}" if title.strip() else text


def _read_beir(queries: Path, corpus: Path, run: Path, depth: int) -> Iterator[Unit | Reject]:
    # 1. The run: per query, a min-heap of its best `depth` candidates, keyed (score, -order)
    #    so the run's order breaks ties; only those candidates stay in memory.
    heaps: dict[str, list[tuple[float, int, str, int, str]]] = {}
    first: dict[str, tuple[int, str]] = {}  # qid -> its first run line (number, text)
    order = 0
    for item in _text_lines(run):
        if isinstance(item, Reject):
            yield item
            continue
        n, _, text = item
        source = f"{run}:{n}"
        parts = text.split()
        if len(parts) != 6:
            yield Reject(source, f"malformed run line: expected {RUN_FIELDS}, got {len(parts)} fields", text)
            continue
        try:
            score = float(parts[4])
        except ValueError:
            score = math.nan
        if math.isnan(score):
            yield Reject(source, f"malformed run line: score {parts[4]!r} is not a number", text)
            continue
        qid, doc_id = parts[0], parts[2]
        heap = heaps.setdefault(qid, [])
        first.setdefault(qid, (n, text))
        entry = (score, -order, doc_id, n, text)
        if len(heap) < depth:
            heapq.heappush(heap, entry)
        else:
            heapq.heappushpop(heap, entry)
        order += 1

    # 2. The queries the run names, into a dict.
    query_text: dict[str, str] = {}
    bad_queries: set[str] = set()  # rejected at their own line: their candidates get no second reject
    for item in _beir_records(queries, heaps.keys()):
        if isinstance(item, Reject):
            yield item
            continue
        qid, n, _, text, obj = item
        try:
            query_text[qid] = _text(_field(obj, "text"), "text")
        except _Bad as e:
            bad_queries.add(qid)
            yield Reject(f"{queries}:{n}", str(e), text)

    # 3. The corpus, once: byte offsets of the documents the kept candidates name. Their texts
    #    are read back by seek when their unit is emitted, so the corpus never sits in memory.
    wanted = {entry[2] for heap in heaps.values() for entry in heap}
    offsets: dict[str, tuple[int, int]] = {}  # doc id -> (byte offset, line number)
    bad_docs: set[str] = set()
    for item in _beir_records(corpus, wanted):
        if isinstance(item, Reject):
            yield item
            continue
        doc_id, n, offset, text, obj = item
        try:
            _beir_text(obj, corpus.parent)
        except _Bad as e:
            bad_docs.add(doc_id)
            yield Reject(f"{corpus}:{n}", str(e), text)
        else:
            offsets[doc_id] = (offset, n)

    # 4. One unit per query, in the order of each query's first run line.
    index = 0
    with open(corpus, "rb") as f:
        for qid, heap in heaps.items():
            line_no, line_text = first[qid]
            if qid in bad_queries:
                continue
            if qid not in query_text:
                yield Reject(f"{run}:{line_no}", f'unknown query id: "{qid}" is not in {queries} '
                             f"(its {len(heap)} candidates are not scored)", line_text)
                continue
            docs: list[tuple[str, str | ImageDoc]] = []
            seen: dict[str, int] = {}
            for _, _, doc_id, n, text in sorted(heap, reverse=True):  # score descending, then run order
                if doc_id in bad_docs:  # rejected at its corpus line
                    continue
                if doc_id not in offsets:
                    yield Reject(f"{run}:{n}", f'unknown doc id: "{doc_id}" is not in {corpus}', text)
                    continue
                if doc_id in seen:
                    yield Reject(f"{run}:{n}", f'duplicate doc id: "{doc_id}" is already a candidate of query "{qid}" at line {seen[doc_id]}', text)
                    continue
                seen[doc_id] = n
                docs.append((doc_id, _fetch(f, corpus, *offsets[doc_id])))
            if docs:
                yield Unit(index, qid, query_text[qid], docs, f"{run}:{line_no}")
                index += 1


def _beir_records(path: Path, wanted: Collection[str]) -> Iterator[tuple[str, int, int, str, dict] | Reject]:
    """(id, line number, byte offset, text, object) of the records whose `_id` is wanted, first one per id.

    Lines that are not JSON objects with a usable `_id` are rejected even when no candidate
    needs them: their id cannot be told, so they might be the missing ones.
    """
    lines: dict[str, int] = {}
    for item in _json_lines(path):
        if isinstance(item, Reject):
            yield item
            continue
        n, offset, text, obj = item
        try:
            if not isinstance(obj, dict):
                raise _Bad(f"not a JSON object: the line holds {_json_type(obj)}")
            ident = _ident(_field(obj, "_id"), "_id")
        except _Bad as e:
            yield Reject(f"{path}:{n}", str(e), text)
            continue
        if ident not in wanted:
            continue
        if ident in lines:
            yield Reject(f"{path}:{n}", f'duplicate id: "{ident}" is already at line {lines[ident]}', text)
            continue
        lines[ident] = n
        yield ident, n, offset, text, obj


def _fetch(f: Any, corpus: Path, offset: int, line_no: int) -> str | ImageDoc:
    f.seek(offset)
    try:
        return _beir_text(json.loads(f.readline().decode("utf-8")), corpus.parent)
    except (ValueError, _Bad) as e:  # it parsed when indexed: the file changed under us
        raise RerankerError(f"{corpus}:{line_no} changed while the job was reading it ({e}); do not edit the corpus during a run") from e
