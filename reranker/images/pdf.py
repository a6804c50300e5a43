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

A PDF may also be given as its bytes (`_open` takes them; jobs read a Parquet binary `pdf` column so).
`PdfDocuments` keeps files open while several of their pages are rendered (a job's window, a Ray Data
batch): opening a file parses its cross-reference table and walks its page tree, work that grows with
the file, so rendering each of n pages from a fresh open would do it n times.

PDFium is not thread-safe (pypdfium2's documentation): every call into it holds `_PDFIUM_LOCK`. A
document kept open between calls is safe: only the calls into PDFium must not overlap.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO

from PIL import Image

from reranker.errors import RerankerError
from reranker.extras import require
from reranker.gguf.header import check_file
from reranker.options import PdfPage

#: Pages one file expands to at most (`pdf_pages`); a longer file is an error naming it, not hours of rendering.
MAX_PAGES = 1000
#: Files a `PdfDocuments` keeps open at once (least recently used closed first): a record may name thousands
#: of files, each open one holding a descriptor and its parsed cross-reference table.
KEEP_OPEN = 16
#: Pixels of a rendered page at most: the original's max_pixels (reranker.images.preprocess.MAX_PIXELS, the same
#: number: a test checks it), so the render is about the size the model sees.
RENDER_PIXELS = 602112

_PDFIUM_LOCK = threading.RLock()
_FIX = "pass an unencrypted PDF file"


def _pdfium(what: str):
    require("pdf", what)
    import pypdfium2

    return pypdfium2


def _open(source: str | os.PathLike | bytes | BinaryIO, name: str):
    """The open `PdfDocument` (call with the lock held); every failure a RerankerError naming `name`.

    `source`: a path, the file's bytes, or a binary file the caller opened and checked (jobs open files
    as data: `jobs.images.open_pdf_file`); PDFium reads what it needs from it, and the caller closes it."""
    pdfium = _pdfium(f"reading {name}")
    # PDFium keeps its last error across calls and refuses some files (an empty page tree) without setting one, so
    # such a file would be reported with the previous failure's code (after an encrypted file: "encrypted"). A load
    # of no file first sets a known code, FPDF_ERR_FILE, which loading a checked path or an open file never sets.
    pdfium.raw.FPDF_LoadDocument(b"", None)
    try:
        if isinstance(source, (str, os.PathLike)):
            return pdfium.PdfDocument(str(check_file(source, "PDF file", _FIX)))
        if isinstance(source, (bytes, bytearray, memoryview)):  # held by the document while it is open
            return pdfium.PdfDocument(bytes(source))
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


def source_name(source: str | os.PathLike | bytes) -> str:
    """How messages name a PDF: its path, or its size for one given as bytes ("<N bytes>")."""
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)


def page_count(path: str | os.PathLike | bytes, file: BinaryIO | None = None) -> int:
    """The number of pages of the PDF at `path`, or in `path` when it holds the file's bytes (read from
    `file` when given: `path` then only names it)."""
    with _PDFIUM_LOCK:
        doc = _open(path if file is None else file, f"PDF {source_name(path)}")
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


def render_page(ref: PdfPage, name: str | None = None, *, max_pixels: int = RENDER_PIXELS) -> Image.Image:
    """Page `ref.page` (from 1) of `ref.path` as an RGB image of at most `max_pixels` pixels (see the module)."""
    with PdfDocuments() as docs:
        return docs.render(ref.path, ref.page, name or f"PDF page {ref}", max_pixels=max_pixels)


class PdfDocuments:
    """PDFs kept open while pages of theirs are rendered: each file opened (and parsed) once, not per page.

    `render(source, page, name)` opens `source` (a path or the file's bytes) on first use and keeps it, at
    most `keep` files at once (the least recently used closed first); `close()` (or leaving the `with`
    block) closes them all. `open_file(path)`: how a path is opened (jobs: `jobs.images.open_pdf_file`,
    which refuses fifos, devices and oversized files); None: PDFium opens the checked path itself. A file
    that fails to open is not kept: each of its pages fails with its own name, as a fresh open would.
    One object serves one thread; PDFium calls hold the module's lock.
    """

    def __init__(self, open_file: Callable[[str | os.PathLike], BinaryIO] | None = None, keep: int = KEEP_OPEN) -> None:
        self._open_file, self._keep = open_file, keep
        self._docs: OrderedDict[str | bytes, tuple] = OrderedDict()  # key -> (PdfDocument, the file it reads or None)

    def __enter__(self) -> PdfDocuments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _document(self, source: str | os.PathLike | bytes, name: str):
        data = isinstance(source, (bytes, bytearray, memoryview))
        # bytes are keyed by their content (hashed once per object): rows holding the same file share its document
        key = bytes(source) if data else os.fspath(source)
        entry = self._docs.pop(key, None)
        if entry is None:
            while len(self._docs) >= self._keep:
                self._close(self._docs.popitem(last=False)[1])
            file = self._open_file(source) if self._open_file is not None and not data else None
            try:
                target = file if file is not None else key if data else source
                with _PDFIUM_LOCK:
                    entry = (_open(target, name), file)
            except BaseException:
                if file is not None:
                    file.close()
                raise
        self._docs[key] = entry  # the most recently used last
        return entry[0]

    def page_count(self, source: str | os.PathLike | bytes, name: str) -> int:
        """The number of pages of `source` (kept open for the renders that follow)."""
        doc = self._document(source, name)
        with _PDFIUM_LOCK:
            return len(doc)

    def render(self, source: str | os.PathLike | bytes, page: int, name: str, *, max_pixels: int = RENDER_PIXELS) -> Image.Image:
        """Page `page` (from 1) of `source` as an RGB image of at most `max_pixels` pixels; `name` names it in errors."""
        pdfium = _pdfium(f"reading {name}")
        doc = self._document(source, name)
        with _PDFIUM_LOCK:
            n = len(doc)
            if not 1 <= page <= n:
                raise RerankerError(f"{name}: page {page} is out of range, the file has {n} page{'s' * (n != 1)} "
                                    f"(pages count from 1: 1..{n})")
            try:
                pdf_page = doc[page - 1]
                try:
                    width, height = pdf_page.get_size()
                    if not (width > 0 and height > 0):
                        raise RerankerError(f"{name} has no area ({width} x {height} PDF units); {_FIX}")
                    bitmap = pdf_page.render(scale=render_scale(width, height, max_pixels), rev_byteorder=True, draw_annots=True)
                    image = bitmap.to_pil().convert("RGB")  # a copy: the bitmap's buffer is freed with it
                    bitmap.close()
                finally:
                    pdf_page.close()
            except pdfium.PdfiumError as e:
                raise RerankerError(f"{name} could not be rendered ({e}): the page is corrupt; {_FIX}") from None
        return image

    def close(self) -> None:
        while self._docs:
            self._close(self._docs.popitem()[1])

    @staticmethod
    def _close(entry: tuple) -> None:
        doc, file = entry
        try:
            with _PDFIUM_LOCK:
                doc.close()
        finally:
            if file is not None:
                file.close()
