"""PDF pages as image documents: real PDF files, rendered by PDFium, scored through the vision projector.

The files are real: pypdfium2 writes pages holding known pictures (so a render can be checked against the
picture it shows), and an encrypted PDF is written by hand under the standard security handler (RC4, PDF
1.7's algorithms 2-4), which PDFium opens with its password: so it is a valid encrypted file, not a broken
one. A page's score is checked against the score of its render as a PIL image (the image path, itself
checked against transformers in test_images.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import PDF_PAGES as PAGES
from helpers import encrypted_pdf, hand_written_pdf, write_pdf
from PIL import Image

from reranker import RerankerError, pdf_pages
from reranker.images.load import load_image
from reranker.images.pdf import MAX_PAGES, RENDER_PIXELS, render_page
from reranker.images.preprocess import MAX_PIXELS, Sizing
from reranker.options import PdfPage

pdfium = pytest.importorskip("pypdfium2")

QUERY = "a chart of the quarterly sales"
@pytest.fixture(scope="module")
def pdf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pdf") / "report.pdf"
    return path, write_pdf(path)


def test_pages_render_at_the_models_size_and_show_the_page(pdf_file):
    path, pictures = pdf_file
    assert RENDER_PIXELS == MAX_PIXELS  # the render is sized for the model's default sizing
    sizing = Sizing()
    for n, ((w, h), pic) in enumerate(zip(PAGES, pictures), 1):
        im = load_image(PdfPage(path, n))
        assert im.mode == "RGB"
        pixels = im.size[0] * im.size[1]
        assert 0.99 * MAX_PIXELS < pixels <= MAX_PIXELS, (n, im.size)
        assert abs(im.size[0] / im.size[1] - w / h) < 0.01, (n, im.size)
        tw, th = sizing.target_size(*im.size)  # smart_resize after it only rounds to the 28-pixel grid
        assert abs(tw - im.size[0]) < 28 and abs(th - im.size[1]) < 28
        # the page shows its picture: the render equals the picture scaled to it (up to resampling)
        want = np.asarray(pic.resize(im.size, Image.Resampling.BILINEAR), dtype=np.float64)
        got = np.asarray(im, dtype=np.float64)
        assert np.abs(got - want).mean() < 3, n
        other = np.asarray(pictures[n % len(pictures)].resize(im.size), dtype=np.float64)
        assert np.abs(got - other).mean() > 20  # ... and not another page's


def test_pdf_pages_lists_every_page_and_bounds_the_file(pdf_file, tmp_path):
    path, _ = pdf_file
    assert pdf_pages(path) == [{"pdf": path, "page": n} for n in (1, 2, 3)]
    assert pdf_pages(str(path), max_pages=3) == [{"pdf": str(path), "page": n} for n in (1, 2, 3)]
    with pytest.raises(RerankerError, match=r"report\.pdf has 3 pages, more than max_pages=2; pass a larger max_pages"):
        pdf_pages(path, max_pages=2)
    assert MAX_PAGES == 1000
    long = tmp_path / "long.pdf"  # blank pages, written by hand: pypdfium2 takes seconds for a thousand
    kids = range(3, MAX_PAGES + 4)
    long.write_bytes(hand_written_pdf([b"<< /Type /Catalog /Pages 2 0 R >>",
                                       b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))]
                                      + [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] >>"] * len(kids)))
    with pytest.raises(RerankerError, match=r"long\.pdf has 1001 pages, more than max_pages=1000"):
        pdf_pages(long)
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(hand_written_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]))
    with pytest.raises(RerankerError, match=r"empty\.pdf has no pages PDFium can read"):
        pdf_pages(empty)


def test_broken_encrypted_and_missing_pages_are_named(pdf_file, tmp_path):
    path, _ = pdf_file
    with pytest.raises(RerankerError, match=r"report\.pdf#4: page 4 is out of range, the file has 3 pages \(pages count from 1: 1\.\.3\)"):
        load_image(PdfPage(path, 4))
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    notpdf = tmp_path / "notes.pdf"
    notpdf.write_text("just text")
    for bad in (truncated, notpdf):
        with pytest.raises(RerankerError, match=rf"{bad.name} is not a readable PDF \(not a PDF, or corrupt or truncated\)"):
            pdf_pages(bad)
        with pytest.raises(RerankerError, match=rf"{bad.name}#1 is not a readable PDF"):
            load_image(PdfPage(bad, 1))
    with pytest.raises(RerankerError, match=r"missing\.pdf"):
        pdf_pages(tmp_path / "missing.pdf")

    locked = tmp_path / "locked.pdf"
    locked.write_bytes(encrypted_pdf("secret", "owner"))
    with pdfium.PdfDocument(str(locked), password="secret") as doc:  # a valid encrypted file: its password opens it
        assert doc[0].render().to_pil().getpixel((100, 100)) == (0, 0, 255)
    for call in (lambda: pdf_pages(locked), lambda: load_image(PdfPage(locked, 1))):
        with pytest.raises(RerankerError, match=r"locked\.pdf(#1)? is encrypted \(password-protected\).*save an unencrypted copy"):
            call()
    empty = tmp_path / "empty.pdf"  # PDFium's last error is still the encrypted file's: not this file's reason
    empty.write_bytes(hand_written_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]))
    with pytest.raises(RerankerError, match=r"empty\.pdf has no pages PDFium can read"):
        pdf_pages(empty)
    restricted = tmp_path / "restricted.pdf"  # an owner password only: viewers open it, and so do we
    restricted.write_bytes(encrypted_pdf("", "owner"))
    im = load_image(PdfPage(restricted, 1))
    w, h = im.size
    assert im.getpixel((w // 3, h // 2)) == (0, 0, 255) and im.getpixel((2, 2)) == (255, 255, 255)


@pytest.mark.parametrize("item, message", [
    ({"pdf": "a.pdf"}, r"must be \{\"pdf\": path, \"page\": n\} .*got keys \['pdf'\]; for every page of a file use reranker\.pdf_pages"),
    ({"pdf": "a.pdf", "page": 0}, r"\"page\" must be an integer >= 1 \(pages count from 1"),
    ({"pdf": "a.pdf", "page": True}, r"\"page\" must be an integer >= 1"),
    ({"pdf": "a.pdf", "page": "2"}, r"\"page\" must be an integer >= 1"),
    ({"pdf": 3, "page": 1}, r"\"pdf\" must be a local file path"),
    ({"pdf": "a.pdf", "page": 1, "image": "x"}, r"got keys \['image', 'page', 'pdf'\]"),
])
def test_pdf_items_are_checked_before_any_work(item, message):
    from reranker.options import check_pairs

    with pytest.raises(RerankerError, match=r"pair 0: the document.*" + message):
        check_pairs([["q", item]])


def test_a_page_scores_as_its_render_and_rank_ranks_pages(tiny_reranker, pdf_file):
    path, _ = pdf_file
    renders = [render_page(PdfPage(path, n)) for n in (1, 2, 3)]
    # each alone, so the two calls decode the same prompt the same way: equal bit for bit
    for n, im in enumerate(renders, 1):
        assert tiny_reranker.compute_score([QUERY, {"pdf": path, "page": n}]) == tiny_reranker.compute_score([QUERY, {"image": im}])
    pages = tiny_reranker.compute_score([[QUERY, {"pdf": path, "page": n}] for n in (1, 2, 3)])
    assert len(set(pages)) == 3  # three pages, three scores: each pair read its own page
    ranked = tiny_reranker.rank(QUERY, pdf_pages(path), return_documents=True)
    assert sorted(r["corpus_id"] for r in ranked) == [0, 1, 2]
    for r in ranked:
        assert r["pdf"] == path and r["page"] == r["corpus_id"] + 1
        assert r["score"] == pytest.approx(pages[r["corpus_id"]], abs=1e-6)
    with pytest.raises(RerankerError, match=r"pair 1: the document .*report\.pdf#9: page 9 is out of range"):
        tiny_reranker.compute_score([[QUERY, {"pdf": path, "page": 1}], [QUERY, {"pdf": path, "page": 9}]])


def test_one_call_opens_each_pdf_once(tiny_reranker, pdf_file, monkeypatch):
    """The pages of one file in one batch of a call render from one open of it (an open parses the file: per
    page, a file of n pages was parsed n times), closed when the batch's images are loaded; same scores."""
    import reranker.images.pdf as pdf_module

    path, _ = pdf_file
    renders = [render_page(PdfPage(path, n)) for n in (3, 1, 2)]  # one open each
    want = tiny_reranker.compute_score([[QUERY, {"image": im}] for im in renders])
    opened, real_open = [], pdf_module._open

    def counting_open(source, name):  # wraps the one place PDFium loads a file
        opened.append(real_open(source, name))
        return opened[-1]

    monkeypatch.setattr(pdf_module, "_open", counting_open)
    got = tiny_reranker.compute_score([[QUERY, {"pdf": path, "page": n}] for n in (3, 1, 2)])
    assert len(opened) == 1 and opened[0].raw is None, "a call opened a PDF per page, or left it open"
    assert got == want  # bit-equal: the same pages, the same prompts in the same batch


def test_rerank_command_ranks_a_pdfs_pages(tiny_reranker, tiny_ggufs, pdf_file, tmp_path, capsys):
    from reranker.cli import main

    path, _ = pdf_file
    base = ["rerank", "-m", str(tiny_ggufs["f32"]), "--n-ctx", "4096", "--threads", "2"]
    assert main([*base, "-q", QUERY, "--pdf", str(path), "-d", "a text document", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_index = {r["index"]: r for r in out["results"]}
    assert by_index[0]["document"] == {"text": "a text document"}
    for n in (1, 2, 3):
        assert by_index[n]["document"] == {"pdf": str(path), "page": n}
        assert by_index[n]["relevance_score"] == pytest.approx(
            tiny_reranker.compute_score([QUERY, {"pdf": path, "page": n}]), abs=1e-6)
    assert main([*base, "-q", QUERY, "--pdf", str(path)]) == 0
    table = capsys.readouterr().out
    assert all(f"[pdf] {path}#{n}" in table for n in (1, 2, 3)), table
    assert main([*base, "-q", QUERY, "--pdf", str(path), "--max-pages", "2"]) == 2
    assert "report.pdf has 3 pages, more than max_pages=2" in capsys.readouterr().err
    notpdf = tmp_path / "broken.pdf"
    notpdf.write_bytes(b"%PDF-1.4\ngarbage")
    assert main([*base, "-q", QUERY, "--pdf", str(notpdf)]) == 2
    assert f"PDF {notpdf} is not a readable PDF" in capsys.readouterr().err
