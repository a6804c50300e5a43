"""PDF pages as image documents: a page -> an RGB PIL image, rendered by PDFium (pypdfium2, the `pdf` extra).

A page is named by `options.PdfPage(path, page)`, pages counted from 1 as a PDF viewer numbers them and as
a ``file.pdf#page=N`` link does; its id is ``path#page``. `pdf_pages(path)` gives the ``{"pdf": path,
"page": n}`` document items of every page of a file, which `Reranker.rank` takes like ``{"image": ...}``.

Nothing is rendered up front: `pdf_pages` reads only the page count, and a page is rendered when its
pair is scored (`load.load_image`), one batch at a time, so a long file costs its pages' work as they
are scored and no more memory than a batch of images. `MAX_PAGES` bounds what one file expands to.

Resolution: the page is rendered at the largest scale whose pixel count fits `RENDER_PIXELS` (the
original's ``max_pixels``, 602112), so Qwen2-VL's smart_resize that follows only rounds each side to a
multiple of 28 instead of discarding most of a high-DPI render. The background is white (a PDF page is
paper; PDFium's default), annotations are drawn, as a viewer shows the page.

PDFium is not thread-safe (pypdfium2's documentation): every call into it holds `_PDFIUM_LOCK`.
"""

from __future__ import annotations

import math
import os
import threading
from typing import BinaryIO

from PIL import Image

from reranker.errors import RerankerError
from reranker.extras import require
from reranker.gguf.header import check_file
from reranker.options import PdfPage

#: Pages one file expands to at most (`pdf_pages`); a longer file is an error naming it, not hours of rendering.
MAX_PAGES = 1000
#: Pixels of a rendered page at most: the original's max_pixels (reranker.images.preprocess.MAX_PIXELS, the same
#: number: a test checks it), so the render is about the size the model sees.
RENDER_PIXELS = 602112

_PDFIUM_LOCK = threading.RLock()
_FIX = "pass an unencrypted PDF file"


def _pdfium(what: str):
    require("pdf", what)
    import pypdfium2

    return pypdfium2


def _open(source: str | os.PathLike | BinaryIO, name: str):
    """The open `PdfDocument` (call with the lock held); every failure a RerankerError naming `name`.

    `source`: a path, or a binary file the caller opened and checked (jobs open files as data:
    `jobs.images.open_pdf_file`); PDFium reads what it needs from it, and the caller closes it."""
    pdfium = _pdfium(f"reading {name}")
    # PDFium keeps its last error across calls and refuses some files (an empty page tree) without setting one, so
    # such a file would be reported with the previous failure's code (after an encrypted file: "encrypted"). A load
    # of no file first sets a known code, FPDF_ERR_FILE, which loading a checked path or an open file never sets.
    pdfium.raw.FPDF_LoadDocument(b"", None)
    try:
        if isinstance(source, (str, os.PathLike)):
            return pdfium.PdfDocument(str(check_file(source, "PDF file", _FIX)))
        return pdfium.PdfDocument(source, autoclose=False)
    except pdfium.PdfiumError as e:
        code = getattr(e, "err_code", None)
        raw = pdfium.raw
        if code in (raw.FPDF_ERR_PASSWORD, raw.FPDF_ERR_SECURITY):
            raise RerankerError(f"{name} is encrypted (password-protected); the pages of an encrypted PDF are not read: "
                                "save an unencrypted copy first (e.g. `qpdf --decrypt --password=... in.pdf out.pdf`)") from None
        if code == raw.FPDF_ERR_FORMAT:
            raise RerankerError(f"{name} is not a readable PDF (not a PDF, or corrupt or truncated); {_FIX}") from None
        if code in (raw.FPDF_ERR_SUCCESS, raw.FPDF_ERR_FILE):  # no code of its own: PDFium fails a document without pages this way
            raise RerankerError(f"{name} has no pages PDFium can read (an empty page tree?); {_FIX} with at least one page") from None
        raise RerankerError(f"{name} could not be opened as a PDF ({e}); {_FIX}") from None


def page_count(path: str | os.PathLike, file: BinaryIO | None = None) -> int:
    """The number of pages of the PDF at `path` (read from `file` when given: `path` then only names it)."""
    with _PDFIUM_LOCK:
        doc = _open(path if file is None else file, f"PDF {os.fspath(path)}")
        try:
            return len(doc)
        finally:
            doc.close()


def pdf_pages(path: str | os.PathLike, *, max_pages: int = MAX_PAGES) -> list[dict]:
    """The document items ``{"pdf": path, "page": n}`` of every page of the PDF at `path` (n = 1, 2, ...).

    ``rank(query, pdf_pages("report.pdf"))`` ranks the file's pages; nothing is rendered here (see the module).
    A file with more than `max_pages` pages is an error (raise `max_pages`, or pass pages of your choice
    as ``{"pdf": path, "page": n}`` items); so is one with no pages.
    """
    if isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 1:
        raise RerankerError(f"max_pages={max_pages!r} is invalid; it must be an integer >= 1")
    n = page_count(path)
    shown = os.fspath(path)
    if n == 0:
        raise RerankerError(f"PDF {shown} has no pages; {_FIX} with at least one page")
    if n > max_pages:
        raise RerankerError(f"PDF {shown} has {n} pages, more than max_pages={max_pages}; pass a larger max_pages "
                            "(CLI: --max-pages), or the pages you want as {\"pdf\": path, \"page\": n} documents")
    return [{"pdf": path, "page": p} for p in range(1, n + 1)]


def render_scale(width: float, height: float, max_pixels: int = RENDER_PIXELS) -> float:
    """The largest scale (pixels per PDF unit) at which a width x height page renders to at most `max_pixels`.

    PDFium's bitmap is ceil(side * scale) pixels per side (pypdfium2's render), hence the step down after the
    closed form.
    """
    scale = math.sqrt(max_pixels / (width * height))
    while math.ceil(width * scale) * math.ceil(height * scale) > max_pixels:
        scale *= 1 - 1e-6
    return scale


def render_page(ref: PdfPage, name: str | None = None, *, max_pixels: int = RENDER_PIXELS,
                file: BinaryIO | None = None) -> Image.Image:
    """Page `ref.page` (from 1) of `ref.path` as an RGB image of at most `max_pixels` pixels (see the module).
    `file`: the PDF, already opened by the caller (`ref.path` then only names it)."""
    name = name or f"PDF page {ref}"
    pdfium = _pdfium(f"reading {name}")
    with _PDFIUM_LOCK:
        doc = _open(ref.path if file is None else file, name)
        try:
            n = len(doc)
            if not 1 <= ref.page <= n:
                raise RerankerError(f"{name}: page {ref.page} is out of range, the file has {n} page{'s' * (n != 1)} "
                                    f"(pages count from 1: 1..{n})")
            try:
                page = doc[ref.page - 1]
                try:
                    width, height = page.get_size()
                    if not (width > 0 and height > 0):
                        raise RerankerError(f"{name} has no area ({width} x {height} PDF units); {_FIX}")
                    bitmap = page.render(scale=render_scale(width, height, max_pixels), rev_byteorder=True, draw_annots=True)
                    image = bitmap.to_pil().convert("RGB")  # a copy: the bitmap's buffer is freed with it
                    bitmap.close()
                finally:
                    page.close()
            except pdfium.PdfiumError as e:
                raise RerankerError(f"{name} could not be rendered ({e}): the page is corrupt; {_FIX}") from None
        finally:
            doc.close()
    return image
