"""Image documents of a job: read, decoded and sized where a window is tokenised, a bad one rejected alone.

The readers only name an image (`ImageDoc`); `load_window_images` reads it on the job's reader thread,
after `cut_windows`, so a resume never opens the images of the records it skips, and the scoring
process (or device worker) only runs the projector and the decode (`scoring.score_prompts`). An image
that cannot be used (missing, not a regular file, truncated, not an image, a decompression bomb, too
large for `max_length`) becomes a `Reject` naming its file, record and index, in input order, and the
record's other documents are scored; with `--on-error fail` it stops the job with that message.

Files are opened as data: read-only, non-blocking (a fifo never stalls the job), and used only when
`fstat` says the opened file is a regular file (a path that is a device, fifo, socket or folder,
directly or through a symbolic link, is a reject). Symbolic links are followed, as any program
opening the path would. Nothing is ever written beside an image.

A PDF page (`ImageDoc.page`) is rendered here too, from a file opened as an image file is
(`open_pdf_file`), or from the PDF's bytes (a Parquet binary `pdf` column); a whole PDF's page count
(`pdf_page_count`) is read by the readers, through the same opener. A window opens each PDF once for all
its pages (`pdf_documents`), and closes it when the window's images are loaded.

Memory: a window holds at most `WINDOW_IMAGES` image documents (PDF pages included) (more only when one record has more),
each kept only at its model size (at most 602112 pixels, 1.8 MB as RGB) once read.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from reranker.errors import RerankerError
from reranker.jobs.records import ImageDoc, Reject, Unit

#: Image documents per window at most (a window is cut before `--window` pairs when it holds this many):
#: bounds the decoded images in flight, and still packs ~100k tokens per window at the model's 768 per image.
WINDOW_IMAGES = 128
#: Image files larger than this are refused before they are read (the pixel limit applies after).
MAX_FILE_BYTES = 256 * 1024**2

_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


@dataclass(frozen=True)
class ImageSettings:
    """What a job's image documents need: the projector (`mmproj`; None: none was found, so the first image
    document stops the job with the fix) and how images are sized (a `reranker.images.preprocess.Sizing`)."""

    mmproj: Path | None
    sizing: object
    gguf: Path | None = None  # where the projector was looked for, for the message

    def fingerprint(self, mmproj: dict | None) -> dict:
        """The job fingerprint's `vision` part: the projector's file (`mmproj`: its `resume.file_fingerprint`)
        and the sizing (they change image scores)."""
        return {"mmproj": mmproj, "sizing": dataclasses.asdict(self.sizing), "window_images": WINDOW_IMAGES}


def image_count(unit: Unit) -> int:
    return sum(isinstance(doc, ImageDoc) for _, doc in unit.docs)


def _stamp(path: Path) -> list:
    """[size, modification time in ns] of the file at `path` (symbolic links followed), [] when there is none.

    Not the path: the record names it (the input is hashed), and its folder is the input's, which may be
    spelt otherwise on a resume (another working folder)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, unreadable folder, a NUL in the name: read as a reject, stamped as such
        return []
    return [st.st_size, st.st_mtime_ns]


def chain_image_files(digest: str, item: Unit | Reject) -> str:
    """`digest` carried over `item`'s image and PDF files: their sizes and modification times, in order.

    A job's checkpoint keeps the digest of the records it consumed, and a resume recomputes it over the
    records it skips (a `stat` per file, nothing read), so a file scored before and changed since (or one
    missing then and present now) is found: input files are hashed whole, and this is their images' part.
    Images given as bytes (Parquet) are in the input and hashed with it. Unchanged for an item with no file.
    """
    if not isinstance(item, Unit):
        return digest
    stamps = [_stamp(doc.source) for _, doc in item.docs if isinstance(doc, ImageDoc) and isinstance(doc.source, Path)]
    if not stamps:
        return digest
    return hashlib.sha256(json.dumps([digest, stamps]).encode()).hexdigest()


def _open_regular_file(path: Path, what: str) -> int:
    """A read-only descriptor of the regular file at `path` of at most MAX_FILE_BYTES, or a RerankerError
    (naming `what` and the path) saying why it is not one."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        why = {errno.ENOENT: "not found" + (" (a broken symbolic link)" if os.path.islink(path) else ""),
               errno.EACCES: "not readable (permission denied)", errno.ELOOP: "a symbolic link loop",
               errno.ENXIO: "not a regular file (a socket or device)", errno.ENOTDIR: "not found (a parent is not a folder)",
               errno.ENAMETOOLONG: "a path too long"}.get(e.errno, f"unreadable ({e.strerror})")
        raise RerankerError(f"{what} {path}: {why}") from None
    try:  # the opened file is checked, not the path: it cannot be swapped for a fifo in between
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RerankerError(f"{what} {path} is not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'special')}); "
                                f"a job reads {what}s only")
        if st.st_size > MAX_FILE_BYTES:
            raise RerankerError(f"{what} {path} is {st.st_size} bytes, over the limit of {MAX_FILE_BYTES}; "
                                + ("downscale or recompress it" if what == "image file" else "split it, or give its pages as images"))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_image_file(path: Path) -> bytes:
    """The bytes of the regular file at `path`, or a RerankerError saying why it is not one."""
    fd = _open_regular_file(path, "image file")
    try:
        chunks, left = [], MAX_FILE_BYTES + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise RerankerError(f"image file {path}: unreadable ({e.strerror})") from None
    finally:
        os.close(fd)
    if left <= 0:  # it grew past the limit while being read
        raise RerankerError(f"image file {path} is over the limit of {MAX_FILE_BYTES} bytes; downscale or recompress it")
    return b"".join(chunks)


def open_pdf_file(path: Path) -> BinaryIO:
    """The regular file at `path`, opened as `read_image_file` opens images, for PDFium to read what it needs
    (a page count reads the cross-reference table and page tree, not the whole file)."""
    return os.fdopen(_open_regular_file(path, "PDF file"), "rb")


def pdf_page_count(source: Path | bytes) -> int:
    """The number of pages of the PDF at path `source` (opened as data), or in `source` (the file's bytes), at
    most the pdf module's MAX_PAGES, else a RerankerError naming it: what a document `{"pdf": ...}` without a
    page expands to."""
    from reranker.images.pdf import MAX_PAGES, page_count, source_name

    if isinstance(source, bytes):
        n = page_count(source)
    else:
        path = source
        with open_pdf_file(path) as f:
            try:
                n = page_count(path, f)
            except OSError as e:  # read by PDFium through the file: an I/O error on the way
                raise RerankerError(f"PDF file {path}: unreadable ({e})") from None
    if n > MAX_PAGES:
        raise RerankerError(f"PDF {'file ' * (not isinstance(source, bytes))}{source_name(source)} has {n} pages, more than the "
                            f"{MAX_PAGES} a whole file expands to; "
                            'give the pages you want as {"pdf": ..., "page": N} documents')
    return n


def pdf_documents():
    """The PDFs of one window, each kept open across its pages (`images.pdf.PdfDocuments`), files opened as
    data (`open_pdf_file`); close it when the window's pages are rendered."""
    from reranker.images.pdf import PdfDocuments

    return PdfDocuments(open_pdf_file)


def load_image_doc(doc: ImageDoc, sizing: object, pdfs):
    """`doc` read (a PDF page: rendered, from `pdfs`, the window's `pdf_documents()`), decoded and sized
    (`engine.vision.load`): a `PendingImage`, or a RerankerError naming it."""
    from reranker.engine.vision import load
    from reranker.options import ImageRef

    if doc.page is not None:
        from reranker.images.pdf import source_name

        name = f"PDF page {source_name(doc.source)}#{doc.page}"
        try:
            image = pdfs.render(doc.source, doc.page, name)
        except OSError as e:
            raise RerankerError(f"{name}: unreadable ({e})") from None
        return load(ImageRef(image, name), sizing)
    if isinstance(doc.source, bytes):
        return load(ImageRef(doc.source, "the image"), sizing)
    return load(ImageRef(read_image_file(doc.source), f"image file {doc.source}"), sizing)


def _raw(unit: Unit, doc_id: str, doc: ImageDoc) -> str:
    """The rejected document as JSON, as the input gave it (a flat pair: the whole record)."""
    if unit.pair:
        return json.dumps({"query_id": unit.query_id, "query": unit.query, "doc_id": doc_id, **doc.as_json()}, ensure_ascii=False)
    return json.dumps({"id": doc_id, **doc.as_json()}, ensure_ascii=False)


def load_window_images(items: list[Unit | Reject], builder, images: ImageSettings | None,
                       stop: Callable[[Reject], Exception] | None = None) -> tuple[list[Unit], list[Reject], list[list]]:
    """A window's `items` (in input order) with their images loaded: (units, rejects, each unit's document sides).

    A document whose image cannot be used becomes a `Reject`, placed in the window's rejects among its
    record's own rejects by document index, so the rejects stay in input order; its unit keeps the other
    documents (and their `positions`), or goes when none is left. `stop`: with `--on-error fail`, the
    exception to raise for the first such reject. No projector (`images.mmproj` None) is an error at the
    first image document, whatever `stop` says: every image would fail the same way.
    """
    # One window, one open per PDF file: its pages (a whole file's, or pages named apart) share it.
    with pdf_documents() as pdfs:
        return _load_window_images(items, builder, images, stop, pdfs)


def _load_window_images(items, builder, images, stop, pdfs) -> tuple[list[Unit], list[Reject], list[list]]:
    units: list[Unit] = []
    rejects: list[Reject] = []
    sides: list[list] = []
    for item in items:
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        if not image_count(item):
            units.append(item)
            sides.append([doc for _, doc in item.docs])
            continue
        if images is None or images.mmproj is None:
            where = f" beside {images.gguf}" if images is not None and images.gguf is not None else ""
            raise RerankerError(f"{item.source}: document {item.position(next(i for i, (_, d) in enumerate(item.docs) if isinstance(d, ImageDoc)))} "
                                f"is an image, and there is no vision projector (no mmproj-*.gguf{where}); pass --mmproj "
                                "path/to/mmproj-...gguf (made by `reranker convert` from a checkpoint with its visual.* weights)")
        good: list[int] = []
        loaded: list = []
        bad: list[Reject] = []
        for i, (doc_id, doc) in enumerate(item.docs):
            if isinstance(doc, ImageDoc):
                try:
                    doc = load_image_doc(doc, images.sizing, pdfs)
                    builder.build_parts(item.query, doc)  # an image too large for max_length is this document's problem
                except RerankerError as e:
                    where = "" if item.pair else f" (query {item.query_id!r}, document {item.position(i)})"
                    reject = Reject(item.source, f"unusable {item.docs[i][1].kind} {item.docs[i][1].describe()}: {e}{where}", _raw(item, doc_id, item.docs[i][1]),
                                    *((None, None) if item.pair else (item.query_id, item.position(i))))
                    if stop is not None:
                        raise stop(reject) from None
                    bad.append(reject)
                    continue
            good.append(i)
            loaded.append(doc)
        if bad:
            # The record's own rejects (the reader's, for bad text documents) sit just before its unit:
            # merge its image rejects among them by document index.
            k = len(rejects)
            while k and rejects[k - 1].source == item.source and rejects[k - 1].doc_index is not None:
                k -= 1
            rejects[k:] = sorted(rejects[k:] + bad, key=lambda r: -1 if r.doc_index is None else r.doc_index)
        if good:
            positions = [item.position(i) for i in good] if bad or item.positions is not None else None
            units.append(dataclasses.replace(item, docs=[item.docs[i] for i in good], positions=positions))
            sides.append(loaded)
    return units, rejects, sides
