"""Image sizing against transformers' Qwen2-VL image processors at the original's limits (min 3136, max 602112)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import QWEN2VL_PREPROCESSOR
from PIL import Image

from reranker.errors import RerankerError
from reranker.images.preprocess import MAX_PIXELS, MIN_PIXELS, Sizing, prepare

pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize  # noqa: E402

# (width, height): below min_pixels, at it, above max_pixels, rounding ties (x.5 multiples of 28, where Python's
# round and C's differ), extreme aspect ratios up to the 200:1 limit, and ordinary photo and page sizes.
SIZES = [(1, 1), (1, 7), (5, 3), (13, 13), (14, 14), (20, 30), (27, 29), (28, 28), (42, 42), (56, 56), (70, 98),
         (55, 57), (100, 80), (333, 217), (640, 480), (480, 640), (777, 777), (776, 777), (1024, 768), (1200, 60),
         (2000, 10), (10, 2000), (1, 200), (200, 1), (3, 600), (1000, 5), (2480, 3508), (4000, 3000), (8000, 40),
         (602112, 1), (1, 150), (775, 777), (868, 672), (896, 672), (1190, 14), (14, 2800)]


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w, h", SIZES)
def test_sizes_equal_transformers_smart_resize(w, h):
    s = Sizing()
    if max(w, h) / min(w, h) > 200:
        with pytest.raises(ValueError):
            smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        with pytest.raises(RerankerError, match=rf"image 5 is {w}x{h} pixels, an aspect ratio of .*at most 200:1: crop it"):
            s.target_size(w, h, "image 5")
        return
    ref_h, ref_w = smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    tw, th = s.target_size(w, h)
    assert (tw, th) == (ref_w, ref_h)
    assert tw % 28 == 0 and th % 28 == 0


@pytest.mark.parametrize("w, h", [(1, 1), (20, 30), (55, 57), (100, 80), (333, 217), (1200, 60), (2000, 10), (900, 700),
                                  (1000, 1000)])
def test_pixels_equal_the_pil_processors(w, h):
    """The resized image gives bit-identical pixel_values in transformers' PIL processor (the one the original's
    transformers 4 used), whether that processor resizes the original image or gets ours (a no-op resize): our
    resize is the original's. The grid is the processor's too."""
    proc = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    im = noise(w, h)
    p = prepare(im)
    ref = proc(images=[im], return_tensors="np")
    ours = proc(images=[p.image], return_tensors="np")
    assert ref["image_grid_thw"].tolist() == [[1, 2 * p.grid_h, 2 * p.grid_w]]
    assert p.image.size == (28 * p.grid_w, 28 * p.grid_h) and p.n_tokens == p.grid_w * p.grid_h
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])


def test_an_image_already_at_its_size_keeps_its_pixels():
    im = noise(112, 84)
    assert np.array_equal(np.asarray(prepare(im).image), np.asarray(im))


def test_other_limits_and_the_checkpoint_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN2VL_PREPROCESSOR))
    s = Sizing.from_preprocessor_config(tmp_path)
    # the original passes its own pixel limits to the processor, overriding the file's 12845056
    assert (s.min_pixels, s.max_pixels, s.factor, s.min_tokens, s.max_tokens) == (3136, 602112, 28, 4, 768)
    big = Sizing.from_preprocessor_config(tmp_path / "preprocessor_config.json", max_pixels=12845056)
    for w, h in [(4000, 3000), (20, 30)]:
        assert big.target_size(w, h)[::-1] == smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=12845056)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**QWEN2VL_PREPROCESSOR, "temporal_patch_size": 1}))
    with pytest.raises(RerankerError, match="temporal_patch_size 1; Qwen2-VL's .* is 2"):
        Sizing.from_preprocessor_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(RerankerError, match="could not be read as JSON"):
        Sizing.from_preprocessor_config(tmp_path)
    with pytest.raises(RerankerError, match="not found: a Qwen2-VL checkpoint has a preprocessor_config.json"):
        Sizing.from_preprocessor_config(tmp_path / "nowhere")


@pytest.mark.parametrize("kw, match", [({"min_pixels": 0}, "min_pixels must be a positive integer"),
                                       ({"min_pixels": 10_000, "max_pixels": 5_000}, "min_pixels 10000 exceeds max_pixels 5000"),
                                       ({"max_pixels": 700, "min_pixels": 1}, "below one merged token"),
                                       ({"patch_size": 14.0}, "patch_size must be a positive integer")])
def test_bad_sizing(kw, match):
    with pytest.raises(RerankerError, match=match):
        Sizing(**kw)


def test_prepare_needs_rgb():
    with pytest.raises(RerankerError, match="image 1 has mode 'RGBA'; load it with reranker.images.load.load_image"):
        prepare(Image.new("RGBA", (30, 30)), name="image 1")
