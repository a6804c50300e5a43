"""`reranker score` with PDF pages as documents: the API's scores, whole files expanded, bad PDFs rejected alone, resume.

The reference for the scores is `Reranker.compute_score` on `{"pdf": path, "page": n}` items (a page is
checked against its render there, tests/api/test_pdf.py): a job's window of N pairs is `compute_score`'s
batch of N, so the scores are equal. The files are real PDFs (pypdfium2 writes them; an encrypted one and
a 1001-page one are written by hand: tests/helpers.py).
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
