"""Image inputs -> RGB PIL images, against the original's loader (transformers' `load_image`), and every bad input."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from reranker.errors import RerankerError
from reranker.images.load import MAX_PIXELS, load_image

hf_load_image = pytest.importorskip("transformers.image_utils").load_image


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = len(mode) if mode in ("RGB", "RGBA", "LA") else 1
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR says w x h (valid CRC) and whose pixel data is a few bytes: what a bomb's header looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16"])
def test_modes_as_the_original_loads_them(tmp_path, mode):
    """Alpha dropped, grey and palette expanded, as transformers' load_image does (the original's loader)."""
    base = noise(37, 23, "RGBA" if mode in ("RGBA", "LA") else "RGB")
    im = base.convert(mode)
    path = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.tiff"
    im.save(path)
    ours = load_image(str(path))
    assert ours.mode == "RGB" and ours.size == (37, 23)
    assert same(ours, hf_load_image(str(path)))


def test_every_input_kind_gives_the_same_image(tmp_path):
    im = noise(40, 30, "RGBA")
    data = encoded(im)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    ref = hf_load_image(str(path))
    b64 = base64.b64encode(data).decode()
    for source in (str(path), path, data, bytearray(data), memoryview(data), im, f"data:image/png;base64,{b64}",
                   f"data:;base64,{b64}", "data:image/png," + "".join(f"%{c:02X}" for c in data)):
        assert same(load_image(source), ref), type(source)
    assert same(load_image(f"data:image/png;base64,{b64}"), hf_load_image(f"data:image/png;base64,{b64}"))


def test_paths_and_modes_nothing_can_load_are_named_as_such(tmp_path):
    # Not "a directory: ." for "", not os.stat's ValueError for a NUL, not "truncated or corrupt" for a PIL mode.
    with pytest.raises(RerankerError, match=r"^image file is an empty path; pass an image file"):
        load_image("")
    with pytest.raises(RerankerError, match=r"^image file 'a\\x00b\.png' is not a path \(it holds a NUL character\)"):
        load_image("a\x00b.png")
    with pytest.raises(RerankerError, match=r"in mode La, which PIL cannot convert to RGB .*image\.convert\('LA'\)"):
        load_image(Image.new("La", (4, 4)))


def test_a_pil_input_is_not_modified():
    im = noise(10, 10, "RGBA")
    before = np.asarray(im).copy()
    load_image(im)
    assert im.mode == "RGBA" and np.array_equal(np.asarray(im), before)


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    """A JPEG whose EXIF says "rotate": the upright image, as the original's loader gives it (pixels compared,
    so a rotation the wrong way round fails; the noise image is not symmetric)."""
    im = noise(48, 32)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "r.jpg"
    im.save(path, "JPEG", exif=exif, quality=95)
    ours = load_image(path)
    ref = hf_load_image(str(path))
    assert same(ours, ref)
    assert ours.size == ((32, 48) if orientation in (5, 6, 7, 8) else (48, 32))
    # and the transpose is not the identity: the file's raw pixels differ from the upright ones
    with Image.open(path) as raw:
        assert not same(raw.convert("RGB"), ours) or orientation == 1


def test_urls_are_not_fetched():
    for url in ("http://example.com/a.png", "HTTPS://example.com/a.png"):
        with pytest.raises(RerankerError, match=r"http\(s\) URLs are not fetched.*pass its bytes"):
            load_image(url, "image 2")


@pytest.mark.parametrize("make, match", [
    (lambda p: str(p / "missing.png"), r"image file not found: .*missing\.png"),
    (lambda p: p, r"image file is a directory"),
    (lambda p: b"", r"image 3 \(bytes\) is empty"),
    (lambda p: b"this is not an image", r"image 3 \(bytes\) is not an image PIL can read"),
    (lambda p: "data:image/png;base64,@@@", r"image 3 \(data: URI\) has invalid base64"),
    (lambda p: "data:text/plain;base64,aGVsbG8=", r"image 3 \(data: URI\) has media type 'text/plain', not an image"),
    (lambda p: "data:image/png;base64", r"image 3 \(data: URI\) is not a valid data: URI"),
    (lambda p: "data:image/png;base64,", r"image 3 \(data: URI\) has no data"),
    (lambda p: 42, r"image 3 \(int\) is not an image input"),
    (lambda p: Image.new("RGB", (0, 7)), r"image 3 \(PIL image\) has no pixels \(0x7\)"),
])
def test_bad_inputs_name_the_input_and_the_fix(tmp_path, make, match):
    with pytest.raises(RerankerError, match=match) as e:
        load_image(make(tmp_path), "image 3")
    assert "pass an image file" in str(e.value) or "URI" in str(e.value) or "http" in str(e.value)


def test_non_image_file_names_its_path(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(RerankerError, match=rf"image {path} is not an image PIL can read"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    data = encoded(noise(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RerankerError, match=rf"{path}.*truncated or corrupt"):
        load_image(path)


def test_decompression_bomb_is_an_error_before_decoding():
    """A header claiming more than MAX_PIXELS is refused from the header alone (no decode, no memory)."""
    side = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(RerankerError, match=rf"image 0 \(bytes\) is {side}x{side} = {side * side} pixels, over the limit of {MAX_PIXELS}"):
        load_image(png_header_only(side, side), "image 0")
    # above PIL's own hard limit PIL refuses the header; still one RerankerError naming the input
    with pytest.raises(RerankerError, match=r"image 0 \(bytes\) is too large to decode safely"):
        load_image(png_header_only(30000, 30000), "image 0")
    # the limit is the argument: raised, the same header passes and the lying file fails as truncated
    with pytest.raises(RerankerError, match="truncated or corrupt"):
        load_image(png_header_only(side, side), "image 0", max_pixels=side * side)


def test_pils_warning_band_is_not_a_warning():
    """Between PIL's warning threshold and our limit there is no DecompressionBombWarning: the image is read (here
    it fails as truncated, since the header lies), and the one limit that applies is MAX_PIXELS."""
    side = int((Image.MAX_IMAGE_PIXELS + 1_000_000) ** 0.5)
    assert Image.MAX_IMAGE_PIXELS < side * side <= MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RerankerError, match="truncated or corrupt"):
            load_image(png_header_only(side, side))


def test_corrupt_files_fail_only_as_reranker_errors():
    """Random byte flips and cuts in seven formats (700 files, seeded): each one loads or raises a RerankerError,
    never another exception from inside PIL."""
    import random

    rng = random.Random(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    outcomes = {"ok": 0, "error": 0}
    for fmt, kw in [("PNG", {}), ("JPEG", {"exif": exif}), ("GIF", {}), ("WEBP", {}), ("TIFF", {}), ("BMP", {}), ("ICO", {})]:
        data = encoded(noise(32, 24), fmt, **kw)
        for _ in range(100):
            b = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            if rng.random() < 0.3:
                b = b[: rng.randrange(len(b))]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL warns about corrupt TIFF/EXIF tags it skips
                try:
                    assert load_image(bytes(b), "image 9").mode == "RGB"
                    outcomes["ok"] += 1
                except RerankerError as e:
                    assert str(e).startswith("image 9 (bytes)")
                    outcomes["error"] += 1
    assert outcomes["ok"] > 50 and outcomes["error"] > 50, outcomes
