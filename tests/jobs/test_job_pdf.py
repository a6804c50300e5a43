"""`reranker score` with PDF pages as documents: the API's scores, whole files expanded, bad PDFs rejected alone, resume.

The reference for the scores is `Reranker.compute_score` on `{"pdf": path, "page": n}` items (a page is
checked against its render there, tests/api/test_pdf.py): a job's window of N pairs is `compute_score`'s
batch of N, so the scores are equal. The files are real PDFs (pypdfium2 writes them; an encrypted one and
a 1001-page one are written by hand: tests/helpers.py). A PDF given as bytes (a Parquet binary `pdf`
column or struct field) is scored against `compute_score` on the same file by path.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import encrypted_pdf, hand_written_pdf, read_jsonl, score_args, write_jsonl, write_pdf

from reranker import RerankerError
from reranker.images.pdf import MAX_PAGES
from reranker.jobs.images import image_count
from reranker.jobs.records import ImageDoc, Reject, Unit

pytest.importorskip("pypdfium2")

QUERY = "a chart of the quarterly sales"
N_CTX = ["--n-ctx", "4096", "--n-batch", "1024"]  # as `tiny_reranker` is loaded: the same decode calls


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory):
    """A folder `docs/` of PDFs (inputs name them by relative paths): a 3-page report, a 2-page memo, bad files."""
    root = tmp_path_factory.mktemp("pdf-inputs")
    docs = root / "docs"
    docs.mkdir()
    write_pdf(docs / "report.pdf")
    write_pdf(docs / "memo.pdf", pages=[(300, 400), (400, 300)])
    write_pdf(docs / "five.pdf", pages=[(300 + 20 * i, 400 - 20 * i) for i in range(5)])
    write_pdf(docs / "single.pdf", pages=[(300, 200)])
    data = (docs / "report.pdf").read_bytes()
    (docs / "truncated.pdf").write_bytes(data[: len(data) // 2])
    (docs / "locked.pdf").write_bytes(encrypted_pdf("secret", "owner"))
    kids = range(3, MAX_PAGES + 4)
    (docs / "long.pdf").write_bytes(hand_written_pdf(
        [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))]
        + [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] >>"] * len(kids)))
    os.mkfifo(docs / "fifo.pdf")
    return root


def _main(capsys, args):
    from reranker.cli import main

    capsys.readouterr()
    rc = main(args)
    return rc, capsys.readouterr().err


def test_readers_expand_whole_pdfs_and_name_pages(pdfs, monkeypatch):
    """Nested JSONL: a PDF without a page is its pages, in place (ids `id#N`, else `path#N`; indices count them);
    flat pairs, Parquet and BEIR name one page each. Only page counts are read, nothing rendered."""
    from reranker.jobs.readers import read_input

    root, docs = pdfs, pdfs / "docs"
    inp = write_jsonl(root / "nested.jsonl", [{"query_id": "q", "query": QUERY, "documents": [
        "a text",                                                   # 0
        {"id": "rep", "pdf": "docs/report.pdf"},                    # 1, 2, 3
        {"id": "m2", "pdf": str(docs / "memo.pdf"), "page": 2},     # 4: absolute paths are allowed
        {"pdf": "docs/memo.pdf"},                                   # 5, 6: ids from the path as written
        {"id": "bad", "pdf": "docs/truncated.pdf"},                 # 7: its page count cannot be read
        {"id": "long", "pdf": "docs/long.pdf"},                     # 8
        {"id": "fifo", "pdf": "docs/fifo.pdf"},                     # 9: never a hang
        {"id": "zero", "pdf": "docs/report.pdf", "page": 0},        # 10
        {"id": "both", "pdf": "docs/report.pdf", "image": "x.png"},  # 11
        {"id": "rep#2", "text": "a clash with a page's id"},        # 12
        {"id": "late", "pdf": "docs/report.pdf", "page": 9},        # 13: out of range: found when rendered
    ]}])
    items = list(read_input(inp))
    rejects, (unit,) = items[:-1], items[-1:]
    assert all(isinstance(r, Reject) for r in rejects) and isinstance(unit, Unit)
    assert [r.doc_index for r in rejects] == [7, 8, 9, 10, 11, 12]
    reasons = [r.reason for r in rejects]
    assert reasons[0].startswith("unusable PDF docs/truncated.pdf: PDF ") and "is not a readable PDF" in reasons[0]
    assert reasons[0].endswith("(query 'q', document 7)")
    assert f"PDF file {docs / 'long.pdf'} has 1001 pages, more than the 1000" in reasons[1]
    assert "is not a regular file (a fifo)" in reasons[2] and "docs/fifo.pdf" in reasons[2]
    # field names point into the input's list (documents[7] is the 8th element); indices count pages
    assert '"documents[7].page" must be an integer >= 1' in reasons[3] and reasons[3].endswith("document 10)")
    assert 'both "documents[8].image" and "documents[8].pdf"' in reasons[4]
    assert 'duplicate doc id: "rep#2" in documents[1] and documents[9]' in reasons[5]
    assert json.loads(rejects[0].raw) == {"id": "bad", "pdf": "docs/truncated.pdf"}
    assert [d for d, _ in unit.docs] == ["0", "rep#1", "rep#2", "rep#3", "m2", "docs/memo.pdf#1", "docs/memo.pdf#2", "late"]
    assert unit.positions == [0, 1, 2, 3, 4, 5, 6, 13]
    pages = [doc for _, doc in unit.docs[1:]]
    assert all(isinstance(p, ImageDoc) for p in pages)
    assert [(p.source, p.page) for p in pages] == [(docs / "report.pdf", 1), (docs / "report.pdf", 2), (docs / "report.pdf", 3),
                                                   (docs / "memo.pdf", 2), (docs / "memo.pdf", 1), (docs / "memo.pdf", 2),
                                                   (docs / "report.pdf", 9)]
    assert pages[0].as_json() == {"pdf": "docs/report.pdf", "page": 1} and pages[0].describe() == "docs/report.pdf#1"
    assert image_count(unit) == 7  # pages count against a window's WINDOW_IMAGES like images

    flat = write_jsonl(root / "flat.jsonl", [{"query_id": "q", "query": QUERY, "doc_id": "a", "pdf": "docs/memo.pdf", "page": 2},
                                             {"query_id": "q", "query": QUERY, "doc_id": "b", "pdf": "docs/memo.pdf"},
                                             {"query_id": "q", "query": QUERY, "doc_id": "c", "pdf": "docs/memo.pdf", "page": 1.0}])
    a, b, c = read_input(flat)
    assert (a.docs[0][1].source, a.docs[0][1].page) == (docs / "memo.pdf", 2)
    assert 'missing field "page": a flat pair is one page' in b.reason and '"page" must be an integer' in c.reason

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = root / "pairs.parquet"
    pq.write_table(pa.table({"query_id": ["q", "q"], "query": [QUERY] * 2, "doc_id": ["p", "t"], "document": [None, "text"],
                             "pdf": ["docs/report.pdf", None], "page": pa.array([3, None], pa.int64())}), table)
    p, t = read_input(table)
    assert (p.docs[0][1].source, p.docs[0][1].page, t.docs[0][1]) == (docs / "report.pdf", 3, "text")

    beir = root / "beir"
    beir.mkdir()
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": QUERY}])
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d1", "pdf": "../docs/memo.pdf", "page": 1}, {"_id": "d2", "pdf": "../docs/memo.pdf"}])
    (beir / "run.trec").write_text("q1 Q0 d1 1 2.0 r\nq1 Q0 d2 2 1.0 r\n")
    bad, unit = read_input(beir)
    assert 'missing field "page"' in bad.reason and unit.docs[0][1].source == beir / "../docs/memo.pdf" and unit.docs[0][1].page == 1

    # a page whose id is taken is rejected alone; the file's other pages keep their indices
    clash = write_jsonl(root / "clash.jsonl", [{"query": QUERY, "documents": [{"id": "r#2", "text": "x"}, {"id": "r", "pdf": "docs/report.pdf"}]}])
    reject, unit = read_input(clash)
    assert (reject.doc_index, json.loads(reject.raw)) == (2, {"id": "r", "pdf": "docs/report.pdf", "page": 2})
    assert 'duplicate doc id: "r#2" in documents[0] and documents[1]' in reject.reason
    assert [d for d, _ in unit.docs] == ["r#2", "r#1", "r#3"] and unit.positions == [0, 1, 3]

    # opened as image files are: a symbolic link is followed (to a regular file); the size cap holds
    if not (docs / "link.pdf").is_symlink():
        os.symlink("report.pdf", docs / "link.pdf")
    one = write_jsonl(root / "one.jsonl", [{"query": QUERY, "documents": [{"pdf": "docs/link.pdf"}]}])
    (unit,) = read_input(one)
    assert [d for d, _ in unit.docs] == ["docs/link.pdf#1", "docs/link.pdf#2", "docs/link.pdf#3"]
    monkeypatch.setattr("reranker.jobs.images.MAX_FILE_BYTES", (docs / "report.pdf").stat().st_size - 1)
    (bad,) = read_input(one)
    assert f"is {(docs / 'report.pdf').stat().st_size} bytes, over the limit" in bad.reason and "docs/link.pdf" in bad.reason

    # without the `pdf` extra the job stops at the first PDF document with the install command (not one reject each)
    monkeypatch.setitem(sys.modules, "pypdfium2", None)
    with pytest.raises(RerankerError, match=r'a PDF document \("documents\[0\]\.pdf"\) needs pypdfium2, which is not installed: pip install'):
        list(read_input(one))


def test_pdf_job_equals_compute_score(tiny_ggufs, tiny_reranker, pdfs, tmp_path, capsys):
    """Whole files and single pages beside texts; the output echoes each page as `{"pdf", "page"}`."""
    docs = pdfs / "docs"
    inp = write_jsonl(pdfs / "job.jsonl", [
        {"query_id": "q0", "query": QUERY, "documents": ["a text about sales", {"id": "rep", "pdf": "docs/report.pdf"}]},
        {"query_id": "q1", "query": f"{QUERY} 1", "documents": [{"id": "m", "pdf": "docs/memo.pdf", "page": 2}, "more text"]}])
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(tiny_ggufs["f32"], inp, out, *N_CTX, window=6))
    assert rc == 0, err
    pairs = [[QUERY, "a text about sales"]] + [[QUERY, {"pdf": docs / "report.pdf", "page": n}] for n in (1, 2, 3)] + \
        [[f"{QUERY} 1", {"pdf": docs / "memo.pdf", "page": 2}], [f"{QUERY} 1", "more text"]]
    want = tiny_reranker.compute_score(pairs, batch_size=6)
    lines = read_jsonl(out)
    got = [sorted((r["index"], r["doc_id"], r["relevance_score"], r["document"]) for r in line["results"]) for line in lines]
    assert [[(i, d, doc) for i, d, _, doc in g] for g in got] == [
        [(0, "0", {"text": "a text about sales"})] + [(n, f"rep#{n}", {"pdf": "docs/report.pdf", "page": n}) for n in (1, 2, 3)],
        [(0, "m", {"pdf": "docs/memo.pdf", "page": 2}), (1, "1", {"text": "more text"})]]
    assert [s for g in got for _, _, s, _ in g] == want  # exact: the same window is the same call
    assert len(set(want[1:4])) == 3  # each page read its own page
    summary = json.loads(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["pairs"] == 6 and summary["tokens"] == tiny_reranker.last_usage.tokens


def test_bad_pdfs_are_rejected_alone(tiny_ggufs, tiny_reranker, pdfs, tmp_path, capsys):
    """A broken, encrypted, too long or special file, or a page out of range: a reject naming file, record and
    index; the record's other documents are scored as a record of them alone would be."""
    docs = [{"id": "ok", "pdf": "docs/memo.pdf", "page": 1}, {"id": "broken", "pdf": "docs/truncated.pdf", "page": 1},
            {"id": "locked", "pdf": "docs/locked.pdf"}, "a text", {"id": "far", "pdf": "docs/report.pdf", "page": 4},
            {"id": "lockedpage", "pdf": "docs/locked.pdf", "page": 1}, {"id": "long", "pdf": "docs/long.pdf"},
            {"id": "fifo", "pdf": "docs/fifo.pdf", "page": 1}]
    inp = write_jsonl(pdfs / "bad.jsonl", [{"query_id": "q", "query": QUERY, "documents": docs}])
    out = tmp_path / "out.jsonl"
    before = sorted((p.name, p.lstat().st_mtime_ns) for p in (pdfs / "docs").iterdir())
    rc, err = _main(capsys, score_args(tiny_ggufs["f32"], inp, out, *N_CTX, "--on-error", "skip", window=8))
    assert rc == 0, err
    assert sorted((p.name, p.lstat().st_mtime_ns) for p in (pdfs / "docs").iterdir()) == before  # nothing written beside them
    rejects = read_jsonl(out.with_name("out.jsonl.rejects.jsonl"))
    assert [(r["source"], r["query_id"], r["doc_index"]) for r in rejects] == [(f"{inp}:1", "q", i) for i in (1, 2, 4, 5, 6, 7)]
    reasons = [r["reason"] for r in rejects]
    for reason, name in zip(reasons, ["truncated", "locked", "report", "locked", "long", "fifo"]):
        assert f"docs/{name}.pdf" in reason, (reason, name)
    assert "is not a readable PDF" in reasons[0] and "(query 'q', document 1)" in reasons[0]
    assert "is encrypted (password-protected)" in reasons[1] and "is encrypted" in reasons[3]
    assert "page 4 is out of range, the file has 3 pages" in reasons[2] and "(query 'q', document 4)" in reasons[2]
    assert "has 1001 pages" in reasons[4] and "a fifo" in reasons[5]
    (line,) = read_jsonl(out)
    results = sorted((r["index"], r["doc_id"], r["relevance_score"]) for r in line["results"])
    assert [(i, d) for i, d, _ in results] == [(0, "ok"), (3, "3")]
    want = tiny_reranker.compute_score([[QUERY, {"pdf": pdfs / "docs" / "memo.pdf", "page": 1}], [QUERY, "a text"]], batch_size=8)
    assert [s for _, _, s in results] == want

    # --on-error fail: a bad document stops the job, named; found when its page is rendered, or when a whole
    # file's page count is read
    for bad, message in [({"pdf": "docs/report.pdf", "page": 4}, "unusable PDF page docs/report.pdf#4: PDF page "),
                         ({"pdf": "docs/locked.pdf"}, "unusable PDF docs/locked.pdf: PDF ")]:
        one = write_jsonl(pdfs / "fail.jsonl", [{"query_id": "r", "query": QUERY, "documents": [docs[0], bad]}])
        rc, err = _main(capsys, score_args(tiny_ggufs["f32"], one, tmp_path / "fail.jsonl", *N_CTX, "--restart"))
        assert rc == 2 and f"{one}:1: {message}" in err and "(query 'r', document 1)" in err, err
        assert "--on-error skip" in err and "Traceback" not in err


# --- one open per PDF file and window (issue 20's gap 1) ---------------------------------------------------------


@pytest.fixture
def opens(monkeypatch):
    """Every PDF document opened (`images.pdf._open`, the one place PDFium loads a file: wrapped, not replaced)
    and every PDF file a job opens (`jobs.images.open_pdf_file`), as (name, document) and file objects."""
    import reranker.images.pdf as pdf_module
    import reranker.jobs.images as job_images

    seen = {"docs": [], "files": []}
    real_open, real_file = pdf_module._open, job_images.open_pdf_file

    def counting_open(source, name):
        seen["docs"].append((name, None))  # a failed open counts too
        doc = real_open(source, name)
        seen["docs"][-1] = (name, doc)
        return doc

    def counting_file(path):
        f = real_file(path)
        seen["files"].append(f)
        return f

    monkeypatch.setattr(pdf_module, "_open", counting_open)
    monkeypatch.setattr(job_images, "open_pdf_file", counting_file)
    return seen


def test_a_window_opens_each_pdf_once(tiny_ggufs, tiny_reranker, pdfs, tmp_path, capsys, opens):
    """A window renders all its pages of one file from one open (an open parses the cross-reference table and walks
    the page tree: per page, a whole file of n pages was parsed n + 1 times), closes it when the window is loaded,
    and scores as `compute_score`, which opens the file for each page alone: the renders are the same."""
    docs = pdfs / "docs"
    inp = write_jsonl(pdfs / "five.jsonl", [
        {"query_id": "q0", "query": QUERY, "documents": [{"id": "f", "pdf": "docs/five.pdf"}, "a text"]},
        {"query_id": "q1", "query": f"{QUERY} 1", "documents": [{"id": "p4", "pdf": "docs/five.pdf", "page": 4},
                                                               {"id": "m", "pdf": "docs/memo.pdf", "page": 2}]}])
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(tiny_ggufs["f32"], inp, out, *N_CTX, window=10))  # both records: one window
    assert rc == 0, err
    names = sorted(name for name, _ in opens["docs"])
    # the reader counts five.pdf's pages; the window renders 6 pages of five.pdf (one open) and 1 of memo.pdf
    assert names == sorted([f"PDF {docs / 'five.pdf'}", f"PDF page {docs / 'five.pdf'}#1", f"PDF page {docs / 'memo.pdf'}#2"]), names
    assert all(doc.raw is None for _, doc in opens["docs"]), "a PDF document was left open after its window"
    assert len(opens["files"]) == 3 and all(f.closed for f in opens["files"]), "a PDF file was left open after its window"

    pairs = [[QUERY, {"pdf": docs / "five.pdf", "page": n}] for n in range(1, 6)] + [[QUERY, "a text"]] + \
        [[f"{QUERY} 1", {"pdf": docs / "five.pdf", "page": 4}], [f"{QUERY} 1", {"pdf": docs / "memo.pdf", "page": 2}]]
    want = tiny_reranker.compute_score(pairs, batch_size=10)
    got = [sorted((r["index"], r["relevance_score"]) for r in line["results"]) for line in read_jsonl(out)]
    assert [s for g in got for _, s in g] == want  # bit-equal: a page rendered from the shared open is the same image
    assert len(set(want[:5])) == 5  # each page its own

    # two windows: each opens the file again (and only once), and closes it
    opens["docs"].clear()
    rc, err = _main(capsys, score_args(tiny_ggufs["f32"], inp, tmp_path / "two.jsonl", *N_CTX, window=4))
    assert rc == 0, err
    assert sorted(name for name, _ in opens["docs"]) == sorted([f"PDF {docs / 'five.pdf'}", f"PDF page {docs / 'five.pdf'}#1",
                                                               f"PDF page {docs / 'five.pdf'}#4", f"PDF page {docs / 'memo.pdf'}#2"])
    assert all(doc.raw is None for _, doc in opens["docs"])


def test_pdf_documents_keep_a_bounded_number_open(pdfs, opens):
    """`PdfDocuments` keeps at most `keep` files open (the least recently used closed first), renders each page as a
    fresh open does, and does not keep a file that failed to open (each page then fails with its own name)."""
    import numpy as np

    from reranker.images.pdf import PdfDocuments, render_page
    from reranker.options import PdfPage

    docs = pdfs / "docs"
    order = [("report", 1), ("memo", 1), ("report", 2), ("five", 1), ("memo", 2), ("memo", 1), ("report", 3)]
    with PdfDocuments(keep=2) as kept:
        for name, page in order:
            image = kept.render(docs / f"{name}.pdf", page, f"{name}#{page}")
            assert sum(doc.raw is not None for _, doc in opens["docs"]) <= 2
            assert np.array_equal(np.asarray(image), np.asarray(render_page(PdfPage(docs / f"{name}.pdf", page))))
            opens["docs"].pop()  # render_page's own open, closed by it
        with pytest.raises(RerankerError, match="truncated#1 is not a readable PDF"):
            kept.render(docs / "truncated.pdf", 1, "truncated#1")
        with pytest.raises(RerankerError, match="truncated#2 is not a readable PDF"):
            kept.render(docs / "truncated.pdf", 2, "truncated#2")
    # report (1, 2: kept), five (evicts memo), memo (evicts report), memo, report (evicts five): 5 opens, then 2 failures
    assert [name.split("#")[0] for name, _ in opens["docs"]] == ["report", "memo", "five", "memo", "report", "truncated", "truncated"]
    assert all(doc is None or doc.raw is None for _, doc in opens["docs"])


# --- PDFs given as bytes: a Parquet binary `pdf` column (issue 20's gap 2) ---------------------------------------


def _pdf_bytes(pdfs) -> dict[str, bytes]:
    docs = pdfs / "docs"
    return {name: (docs / f"{name}.pdf").read_bytes() for name in ("report", "memo", "five", "truncated", "locked", "long")}


def _nested_table(rows: list[tuple[str, str, list[dict]]]):
    """A nested Parquet table: query_id, query, documents as structs {id, text, image (a path), pdf (binary), page}."""
    import pyarrow as pa

    doc = pa.struct([("id", pa.string()), ("text", pa.string()), ("image", pa.string()), ("pdf", pa.binary()), ("page", pa.int64())])
    return pa.table({"query_id": [q for q, _, _ in rows], "query": [t for _, t, _ in rows],
                     "documents": pa.array([d for _, _, d in rows], pa.list_(doc))})


def test_readers_take_pdf_bytes(pdfs, monkeypatch):
    """A binary `pdf` field is the file's bytes: with a page, that page; without, in a nested record, every page
    (ids `id#N`, or `k#N` from the index k of its first page); the same caps and rejects as a path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reranker.jobs.readers import read_input

    b = _pdf_bytes(pdfs)
    path = pdfs / "bytes.parquet"
    pq.write_table(_nested_table([("q", QUERY, [
        {"id": "t", "text": "a text"},           # 0
        {"id": "rep", "pdf": b["report"]},       # 1, 2, 3
        {"pdf": b["memo"]},                      # 4, 5: ids "4#1", "4#2"
        {"id": "m2", "pdf": b["memo"], "page": 2},  # 6
        {"id": "bad", "pdf": b["truncated"]},    # 7: its page count cannot be read
        {"id": "locked", "pdf": b["locked"]},    # 8
        {"id": "long", "pdf": b["long"]},        # 9
        {"id": "empty", "pdf": b""},             # 10
        {"id": "zero", "pdf": b["memo"], "page": 0},  # 11
        {"id": "far", "pdf": b["memo"], "page": 3},   # 12: out of range: found when rendered
    ])]), path)
    items = list(read_input(path))
    rejects, (unit,) = items[:-1], items[-1:]
    assert [r.doc_index for r in rejects] == [7, 8, 9, 10, 11] and all(r.source == f"{path}:row 0" for r in rejects)
    reasons = [r.reason for r in rejects]
    n = len(b["truncated"])
    assert reasons[0].startswith(f"unusable PDF <{n} bytes>: PDF <{n} bytes> is not a readable PDF") and reasons[0].endswith("(query 'q', document 7)")
    assert f"PDF <{len(b['locked'])} bytes> is encrypted" in reasons[1]
    assert f"PDF <{len(b['long'])} bytes> has 1001 pages, more than the 1000" in reasons[2]
    assert '"documents[7].pdf" holds 0 bytes' in reasons[3] and '"documents[8].page" must be an integer >= 1' in reasons[4]
    assert json.loads(rejects[0].raw)["pdf"] == f"<{n} bytes>"  # the rejects file shows bytes by their size
    assert [d for d, _ in unit.docs] == ["t", "rep#1", "rep#2", "rep#3", "4#1", "4#2", "m2", "far"]
    assert unit.positions == [0, 1, 2, 3, 4, 5, 6, 12]
    pages = [doc for _, doc in unit.docs[1:]]
    assert [(p.source, p.page) for p in pages] == [(b["report"], 1), (b["report"], 2), (b["report"], 3), (b["memo"], 1),
                                                   (b["memo"], 2), (b["memo"], 2), (b["memo"], 3)]
    assert pages[0].as_json() == {"pdf_bytes": len(b["report"]), "page": 1} and pages[0].describe() == f"<{len(b['report'])} bytes>#1"
    assert image_count(unit) == 7

    # flat pairs: a binary `pdf` column names one page each
    flat = pdfs / "flat-bytes.parquet"
    pq.write_table(pa.table({"query_id": ["q"] * 3, "query": [QUERY] * 3, "doc_id": ["a", "b", "c"], "document": [None, None, "text"],
                             "pdf": pa.array([b["memo"], b["memo"], None], pa.binary()), "page": pa.array([2, None, None], pa.int64())}), flat)
    a, no_page, c = read_input(flat)
    assert (a.docs[0][1].source, a.docs[0][1].page, c.docs[0][1]) == (b["memo"], 2, "text")
    assert 'missing field "page": a flat pair is one page' in no_page.reason

    # the size cap of a PDF file holds for its bytes
    monkeypatch.setattr("reranker.jobs.images.MAX_FILE_BYTES", len(b["memo"]) - 1)
    over = next(iter(read_input(flat)))
    assert f'"pdf" holds {len(b["memo"])} bytes, over the limit of {len(b["memo"]) - 1}' in over.reason


def test_pdf_bytes_job_equals_compute_score_and_rejects_alone(tiny_ggufs, tiny_reranker, pdfs, tmp_path, capsys):
    """Bytes score as the same file by path (`compute_score`); bad bytes are rejects naming the record (`file:row N`)
    and the document's index; the output echoes `{"pdf_bytes": N, "page": n}`."""
    docs, b = pdfs / "docs", _pdf_bytes(pdfs)
    inp = tmp_path / "bytes-job.parquet"
    import pyarrow.parquet as pq

    pq.write_table(_nested_table([
        ("q0", QUERY, [{"id": "t", "text": "a text about sales"}, {"id": "rep", "pdf": b["report"]}, {"pdf": b["memo"], "page": 2}]),
        ("q1", f"{QUERY} 1", [{"id": "bad", "pdf": b["truncated"], "page": 1}, {"id": "locked", "pdf": b["locked"]},
                              {"id": "far", "pdf": b["report"], "page": 4}, {"id": "lockedpage", "pdf": b["locked"], "page": 1},
                              {"id": "ok", "pdf": b["five"], "page": 5}])]), inp)
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(tiny_ggufs["f32"], inp, out, *N_CTX, "--on-error", "skip", window=8))
    assert rc == 0, err
    rejects = read_jsonl(out.with_name("out.jsonl.rejects.jsonl"))
    assert [(r["source"], r["query_id"], r["doc_index"]) for r in rejects] == [(f"{inp}:row 1", "q1", i) for i in range(4)]
    reasons = [r["reason"] for r in rejects]
    n = {k: len(v) for k, v in b.items()}
    assert reasons[0].startswith(f"unusable PDF page <{n['truncated']} bytes>#1: ") and "is not a readable PDF" in reasons[0]
    assert f"<{n['locked']} bytes>" in reasons[1] and "is encrypted" in reasons[1] and "is encrypted" in reasons[3]
    assert f"PDF page <{n['report']} bytes>#4: page 4 is out of range, the file has 3 pages" in reasons[2]
    assert all(r.endswith(f"(query 'q1', document {i})") for i, r in enumerate(reasons))
    lines = read_jsonl(out)
    got = [sorted((r["index"], r["doc_id"], r["relevance_score"], r["document"]) for r in line["results"]) for line in lines]
    assert [[(i, d, doc) for i, d, _, doc in g] for g in got] == [
        [(0, "t", {"text": "a text about sales"})] + [(p, f"rep#{p}", {"pdf_bytes": n["report"], "page": p}) for p in (1, 2, 3)]
        + [(4, "4", {"pdf_bytes": n["memo"], "page": 2})], [(4, "ok", {"pdf_bytes": n["five"], "page": 5})]]
    pairs = [[QUERY, "a text about sales"]] + [[QUERY, {"pdf": docs / "report.pdf", "page": p}] for p in (1, 2, 3)] + \
        [[QUERY, {"pdf": docs / "memo.pdf", "page": 2}], [f"{QUERY} 1", {"pdf": docs / "five.pdf", "page": 5}]]
    assert [s for g in got for _, _, s, _ in g] == tiny_reranker.compute_score(pairs, batch_size=8)  # exact


def test_pdf_bytes_job_resumes_and_its_fingerprint_covers_them(tiny_ggufs, pdfs, tmp_path, capsys, opens):
    """The bytes are part of the input, so the input's fingerprint covers them (a changed byte refuses a resume), and
    a stopped job resumes to the bytes of a clean run (its whole PDFs counted again for the records it skips)."""
    import pyarrow.parquet as pq
    from helpers import page_picture

    b = _pdf_bytes(pdfs)
    later = tmp_path / "later.png"  # missing at first: the job stops there (--on-error fail), after 3 windows
    rows = [(f"q{i}", f"{QUERY} {i}", [{"id": "m", "pdf": b["memo"] if i % 2 else b["report"]}, {"text": f"text {i}"}]) for i in range(3)]
    rows += [("img", QUERY, [{"id": "later", "image": str(later)}]), ("last", QUERY, [{"pdf": b["five"], "page": 3}])]
    inp = tmp_path / "resume.parquet"
    pq.write_table(_nested_table(rows), inp)
    out, clean = tmp_path / "out.jsonl", tmp_path / "clean.jsonl"
    args = [*N_CTX, "--on-error", "fail"]
    rc, err = _main(capsys, score_args(tiny_ggufs["f32"], inp, out, *args, window=3))
    assert rc == 2 and "later.png" in err, err
    assert json.loads(out.with_name("out.jsonl.checkpoint.json").read_text())["consumed"] == 3
    page_picture(64, 48, 0).save(later)
    opens["docs"].clear()
    rc, err = _main(capsys, score_args(tiny_ggufs["f32"], inp, out, *args, window=3))
    assert rc == 0, err
    # resumed, not restarted: the records it skips have their whole PDFs counted, not rendered; only the last is rendered
    n = {k: len(v) for k, v in b.items()}
    assert sorted(name for name, _ in opens["docs"]) == sorted([f"PDF <{n['report']} bytes>", f"PDF <{n['memo']} bytes>",
                                                               f"PDF <{n['report']} bytes>", f"PDF page <{n['five']} bytes>#3"])
    assert _main(capsys, score_args(tiny_ggufs["f32"], inp, clean, *args, window=3))[0] == 0
    assert out.read_bytes() == clean.read_bytes() and b'"pdf_bytes"' in clean.read_bytes()

    changed = bytearray(b["memo"])
    changed[len(changed) // 2] ^= 1  # one byte in the middle of one record's PDF
    rows[1] = (rows[1][0], rows[1][1], [{"id": "m", "pdf": bytes(changed)}, {"text": "text 1"}])
    pq.write_table(_nested_table(rows), inp)
    rc, err = _main(capsys, score_args(tiny_ggufs["f32"], inp, clean, *args, window=3))
    assert rc == 2 and "different input" in err and "--restart" in err, err


# --- a `pdf` column for Ray Data's callable (issue 20's gap 3) ---------------------------------------------------


def _pdf_rows(pdfs, as_bytes: bool):
    """Rows of PDF pages (a path or the bytes of each file, and a page; null: the file's one page) and a text."""
    import pyarrow as pa

    docs = pdfs / "docs"
    files = ["report", None, "memo", "single", "report"]
    value = (lambda f: (docs / f"{f}.pdf").read_bytes()) if as_bytes else (lambda f: str(docs / f"{f}.pdf"))
    return pa.table({"id": list(range(5)), "query": [QUERY] * 5, "document": [None, "a text about sales", None, None, None],
                     "pdf": pa.array([None if f is None else value(f) for f in files], pa.binary() if as_bytes else pa.string()),
                     "page": pa.array([2, None, 1, None, 1], pa.int64())})


def _pdf_rows_want(tiny_reranker, pdfs) -> list[float]:
    docs = pdfs / "docs"
    return tiny_reranker.compute_score([[QUERY, {"pdf": docs / "report.pdf", "page": 2}], [QUERY, "a text about sales"],
                                        [QUERY, {"pdf": docs / "memo.pdf", "page": 1}], [QUERY, {"pdf": docs / "single.pdf", "page": 1}],
                                        [QUERY, {"pdf": docs / "report.pdf", "page": 1}]])


def test_ray_callable_scores_pdf_columns(tiny_ggufs, tiny_reranker, pdfs, opens):
    """`RayReranker` called directly (what each actor runs): a `pdf` column of paths or bytes with its `page` scores as
    `compute_score` on the same pages (one batch, one call); a batch opens each file once; bad rows are named."""
    import pyarrow as pa

    from reranker.jobs.ray_data import RayReranker

    docs, b = pdfs / "docs", _pdf_bytes(pdfs)
    scorer = RayReranker(str(tiny_ggufs["f32"]), load={"n_ctx": 4096, "n_batch": 1024}, drop=("pdf",))
    want = _pdf_rows_want(tiny_reranker, pdfs)
    assert len(set(want)) == 5
    for as_bytes in (False, True):
        opens["docs"].clear()
        out = scorer(_pdf_rows(pdfs, as_bytes))
        assert out.column_names == ["id", "query", "document", "page", "score"] and out.column("score").to_pylist() == want
        assert len(opens["docs"]) == 3 and all(doc.raw is None for _, doc in opens["docs"])  # report's 2 rows share one open

    def fails(match: str, **columns):
        with pytest.raises(RerankerError, match=match):
            scorer(pa.table({"query": [QUERY] * len(next(iter(columns.values()))), **columns}))

    fails(r"row 0 PDF .*report\.pdf has 3 pages and the row gives no page; give it in a 'page' column", pdf=[str(docs / "report.pdf")])
    fails(r"row 1 PDF .*report\.pdf#4: page 4 is out of range, the file has 3 pages", pdf=[str(docs / "memo.pdf"), str(docs / "report.pdf")],
          page=[1, 4])
    fails(rf"row 0 PDF <{len(b['truncated'])} bytes>#1 is not a readable PDF", pdf=pa.array([b["truncated"]], pa.binary()), page=[1])
    fails(r"row 0 PDF .*locked\.pdf#1 is encrypted", pdf=[str(docs / "locked.pdf")], page=[1])
    fails(r"row 0 of the batch: 'page' is 0; a page is an integer >= 1", pdf=[str(docs / "memo.pdf")], page=[0])
    fails(r"row 0 of the batch has both 'image' and 'pdf'", pdf=[str(docs / "memo.pdf")], image=[str(docs / "memo.pdf")])


@pytest.mark.slow
def test_ray_data_scores_pdf_pages(ray_cluster, tiny_ggufs, tiny_reranker, pdfs):
    """The callable in a Ray Data pipeline on the local cluster: PDF bytes in a `pdf` column, scored on an actor, equal
    `compute_score` on the same pages (torch at one thread in both, as Ray actors run it)."""
    import ray
    import torch

    from reranker.jobs.ray_data import RayReranker, actor_options, map_batches_quietly

    ds = ray.data.from_arrow(_pdf_rows(pdfs, as_bytes=True))
    ds = map_batches_quietly(ds, RayReranker, fn_constructor_kwargs={"model": str(tiny_ggufs["f32"]), "load": {"n_ctx": 4096, "n_batch": 1024},
                                                                   "drop": ("pdf",)},
                             batch_format="pyarrow", batch_size=5, **actor_options(1))
    got = sorted((r["id"], r["score"]) for r in ds.take_all())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = _pdf_rows_want(tiny_reranker, pdfs)
    finally:
        torch.set_num_threads(threads)
    assert [i for i, _ in got] == list(range(5))
    assert [s for _, s in got] == want  # exact: one batch is one window, as compute_score's one call
