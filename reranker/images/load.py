"""An image as the API takes it -> an upright RGB PIL image, as the original model loads it.

The original (transformers' ``load_image``) applies the EXIF orientation, then ``convert("RGB")``:
alpha is dropped, not composited, so a transparent background becomes whatever colour lies under
it (usually black). Both are kept here so that scores match the original's.

Accepted inputs: a local path (``str`` or ``os.PathLike``), ``bytes`` / ``bytearray`` /
``memoryview`` holding an encoded file, a ``PIL.Image.Image``, a ``data:`` URI string, or a PDF page
(``options.PdfPage``, rendered by `pdf.render_page`).

http(s) URLs are not fetched. A library that servers embed would otherwise make requests on a
caller's behalf (to internal addresses, too: server-side request forgery), with its own timeouts,
redirect and size policies, in the middle of a scoring call; the caller fetches with the HTTP
client it already trusts and passes the bytes. A URL is therefore an error that says so, not a
path that happens not to exist.

Decompression bombs: an image over ``MAX_PIXELS`` pixels (width x height, read from the header
before any pixel is decoded) is an error, never a warning; PIL's own warning band below its hard
limit is silenced for these calls, so the one limit that applies is ours (at most PIL's hard limit,
``2 * PIL.Image.MAX_IMAGE_PIXELS``, above which PIL refuses the header itself).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import threading
import urllib.parse
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from reranker.errors import RerankerError
from reranker.gguf.header import check_file
from reranker.images.pdf import PdfDocuments, render_page
from reranker.options import PdfPage

#: Images larger than this (width x height) are refused before decoding: 2**27, about 11585 x 11585,
#: which keeps 108-megapixel camera photos (402 MB as RGB) and refuses what would take gigabytes.
MAX_PIXELS = 2**27

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | PdfPage

#: The fix an error about an unusable image suggests (the server swaps in its own).
FIX = "pass an image file (PNG, JPEG, WebP, ...) as a local path, bytes, a PIL.Image or a data: URI"
# warnings.catch_warnings swaps a process-wide filter list; the lock keeps our own threads from
# restoring each other's lists out of order.
_WARNINGS_LOCK = threading.Lock()


def describe(image: ImageInput, what: str = "image") -> str:
    """How an error names `image`: its path, or `what` and its kind ("image 3 (bytes)")."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"{what} (bytes)"
    if isinstance(image, Image.Image):
        return f"{what} (PIL image)"
    if isinstance(image, PdfPage):  # the API's names already hold the page's id
        return what if str(image) in what else f"{what} {image}"
    if isinstance(image, str) and image[:5].lower() == "data:":
        return f"{what} (data: URI)"
    if isinstance(image, (str, os.PathLike)):
        return f"{what} {os.fspath(image)}"
    return f"{what} ({type(image).__name__})"


def load_image(image: ImageInput, what: str = "image", *, max_pixels: int = MAX_PIXELS,
               pdfs: PdfDocuments | None = None) -> Image.Image:
    """`image` as an upright RGB ``PIL.Image`` (EXIF orientation applied, alpha dropped).

    `what` names the input in errors ("image 3" for the fourth image of a batch); a path is named
    by itself. Every failure is a `RerankerError`: a missing or unreadable file, an http(s) URL,
    a malformed data: URI, bytes or a file that is not an image, a truncated file, an image with
    no pixels, or one over `max_pixels`. `pdfs`: where a PDF page is rendered from (files kept open across
    the pages of one call); None: its file is opened for it alone.
    """
    name = describe(image, what)
    if isinstance(image, Image.Image):
        return _finish(image, name, max_pixels)
    if isinstance(image, PdfPage):
        page = render_page(image, name) if pdfs is None else pdfs.render(image.path, image.page, name)
        return _finish(page, name, max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise RerankerError(f"{name} is empty (0 bytes); {FIX}")
        return _decode(io.BytesIO(data), name, max_pixels)
    if isinstance(image, str):
        scheme = image[:8].lower()
        if scheme.startswith(("http://", "https://")):
            raise RerankerError(f"{name}: http(s) URLs are not fetched (a scoring call makes no network requests); "
                                "download the image with your HTTP client and pass its bytes")
        if scheme.startswith("data:"):
            return _decode(io.BytesIO(_data_uri_bytes(image, name)), name, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = check_file(image, "image file", FIX)
        with open(path, "rb") as f:
            return _decode(f, name, max_pixels)
    raise RerankerError(f"{name} is not an image input; {FIX}")


def header_pixels(image: bytes | str) -> int | None:
    """Width x height from the header of an encoded image (bytes or a data: URI), no pixel decoded;
    None when the header cannot be read (`load_image` then says why)."""
    try:
        data = _data_uri_bytes(image, "image") if isinstance(image, str) else image
        with _open(io.BytesIO(data)) as im:
            w, h = im.size
    except (RerankerError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return w * h


def _data_uri_bytes(uri: str, name: str) -> bytes:
    """The payload of a ``data:[<mediatype>][;base64],<data>`` URI (RFC 2397)."""
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise RerankerError(f"{name} is not a valid data: URI (no ',' before the data); expected 'data:image/png;base64,...'")
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0]
    if media and not media.startswith("image/"):
        raise RerankerError(f"{name} has media type {media!r}, not an image; expected 'data:image/...;base64,...'")
    if "base64" in params[1:]:
        try:
            data = base64.b64decode(urllib.parse.unquote(payload), validate=True)
        except (binascii.Error, ValueError) as e:
            raise RerankerError(f"{name} has invalid base64 data ({e}); encode the file with base64.b64encode") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise RerankerError(f"{name} has no data after the ','; {FIX}")
    return data


def _open(fp) -> Image.Image:
    """`Image.open` (the header only, no pixel decoded) without PIL's bomb warning: our limit replaces its band."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(fp)


def _decode(fp, name: str, max_pixels: int) -> Image.Image:
    try:
        im = _open(fp)
    except Image.DecompressionBombError as e:
        raise RerankerError(f"{name} is too large to decode safely ({e}); the limit is {max_pixels} pixels: "
                            "downscale the image first") from None
    except UnidentifiedImageError:
        raise RerankerError(f"{name} is not an image PIL can read (unknown or corrupt format); {FIX}") from None
    except OSError as e:
        raise RerankerError(f"{name} could not be read ({e}); {FIX}") from None
    return _finish(im, name, max_pixels)


def _finish(im: Image.Image, name: str, max_pixels: int) -> Image.Image:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise RerankerError(f"{name} has no pixels ({w}x{h}); {FIX}")
    if w * h > max_pixels:
        raise RerankerError(f"{name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (a decompression-bomb guard); "
                            "downscale the image first (the model sees at most 602112 pixels anyway)")
    try:
        im.load()  # decode here, so a truncated or corrupt file fails with its name, not later in a resize
        im = ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RerankerError(f"{name} could not be decoded ({e}): the file is truncated or corrupt; {FIX}") from None
    try:
        return im.convert("RGB")
    except ValueError as e:  # PIL converts no "La" (premultiplied alpha) image: the original model fails on it too
        raise RerankerError(f"{name} is in mode {im.mode}, which PIL cannot convert to RGB ({e}); convert it to "
                            "another mode first (e.g. image.convert('LA'))") from None

