"""Qwen2-VL's image sizing, done here so that llama.cpp leaves the pixels alone.

The original resizes every image with Qwen2-VL's ``smart_resize`` (both sides multiples of 28 =
patch 14 x spatial merge 2, the area within [min_pixels, max_pixels], the aspect ratio kept) and
PIL bicubic on uint8, then normalises. llama.cpp's Qwen2-VL preprocessing computes its own size
(C++ ``std::round``, half away from zero, where Python's ``round`` goes half to even; float, not
double) and letterboxes into it. Given an image whose sides already are multiples of 28 within
its token limits, it copies the pixels unchanged, so resizing here to exactly the original's size
makes llama.cpp see the original's pixels. Normalisation (mean/std) stays in llama.cpp, with the
values the mmproj GGUF carries (from the checkpoint's preprocessor_config.json).

Pixel limits: the original's ``compute_score`` loads its processor with ``min_pixels=3136,
max_pixels=602112`` (4 to 768 merged tokens), which override the preprocessor_config.json's own
(Qwen2-VL's 3136 / 12845056). Those are therefore the defaults even when the config is read; the
config gives the patch and merge sizes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from reranker.errors import RerankerError

#: The original's processor limits: 4 and 768 merged tokens of 28 x 28 pixels.
MIN_PIXELS = 3136
MAX_PIXELS = 602112
PATCH_SIZE = 14
MERGE_SIZE = 2
#: Qwen2-VL's smart_resize refuses images whose long side exceeds 200 times the short one.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class Sizing:
    """How images are sized for one checkpoint: pixel limits and the patch grid."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    patch_size: int = PATCH_SIZE
    merge_size: int = MERGE_SIZE

    def __post_init__(self) -> None:
        for field in ("min_pixels", "max_pixels", "patch_size", "merge_size"):
            value = getattr(self, field)
            if type(value) is not int or value < 1:
                raise RerankerError(f"image sizing: {field} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise RerankerError(f"image sizing: min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if self.max_pixels < self.factor**2:
            raise RerankerError(f"image sizing: max_pixels {self.max_pixels} is below one merged token "
                                f"({self.factor}x{self.factor} = {self.factor**2} pixels)")

    @property
    def factor(self) -> int:
        """Pixels per merged token along one side (28 for Qwen2-VL)."""
        return self.patch_size * self.merge_size

    @property
    def min_tokens(self) -> int:
        return max(1, self.min_pixels // self.factor**2)

    @property
    def max_tokens(self) -> int:
        """The most merged tokens an image can get (smart_resize never exceeds max_pixels)."""
        return self.max_pixels // self.factor**2

    @classmethod
    def from_preprocessor_config(cls, path: str | os.PathLike, *, min_pixels: int = MIN_PIXELS,
                                 max_pixels: int = MAX_PIXELS) -> Sizing:
        """The patch and merge sizes of a checkpoint's ``preprocessor_config.json`` (a file or its folder).

        The pixel limits are the arguments (the original's by default), not the file's: the
        original passes its own to the processor, which override the file's.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "preprocessor_config.json"
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RerankerError(f"{p} not found: a Qwen2-VL checkpoint has a preprocessor_config.json beside config.json") from None
        except (OSError, ValueError) as e:
            raise RerankerError(f"{p} could not be read as JSON ({e}); restore it from the checkpoint") from None
        if not isinstance(cfg, dict):
            raise RerankerError(f"{p} is not a JSON object; restore it from the checkpoint")
        tps = cfg.get("temporal_patch_size", 2)
        if tps != 2:
            raise RerankerError(f"{p} has temporal_patch_size {tps!r}; Qwen2-VL's (and llama.cpp's) is 2")
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=cfg.get("patch_size", PATCH_SIZE),
                   merge_size=cfg.get("merge_size", MERGE_SIZE))

    def target_size(self, width: int, height: int, name: str = "image") -> tuple[int, int]:
        """(width, height) after Qwen2-VL's smart_resize, both multiples of `factor`.

        The same arithmetic as transformers' ``smart_resize`` (Python ``round``, floats in double
        precision), so sizes agree for every input; an aspect ratio over 200 is an error, as there.
        """
        if width < 1 or height < 1:
            raise RerankerError(f"{name} has no pixels ({width}x{height})")
        ratio = max(height, width) / min(height, width)
        if ratio > MAX_ASPECT_RATIO:
            raise RerankerError(f"{name} is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; Qwen2-VL takes at most "
                                f"{MAX_ASPECT_RATIO}:1: crop it or split it into parts (for a long page, one image per part)")
        f = self.factor
        h_bar = round(height / f) * f
        w_bar = round(width / f) * f
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / f) * f
            w_bar = math.ceil(width * beta / f) * f
        return w_bar, h_bar


@dataclass(frozen=True)
class PreparedImage:
    """An RGB image at its smart_resize size, and its grid of merged tokens."""

    image: Image.Image
    grid_w: int  # merged tokens per row: width / 28
    grid_h: int  # rows of merged tokens: height / 28

    @property
    def n_tokens(self) -> int:
        return self.grid_w * self.grid_h


def prepare(image: Image.Image, sizing: Sizing = Sizing(), name: str = "image") -> PreparedImage:
    """`image` (RGB, from `load.load_image`) resized with PIL bicubic to its smart_resize size."""
    if image.mode != "RGB":
        raise RerankerError(f"{name} has mode {image.mode!r}; load it with reranker.images.load.load_image (RGB)")
    w, h = sizing.target_size(*image.size, name=name)
    # PIL returns a copy for the same size, so an image already at its size keeps its exact pixels.
    resized = image.resize((w, h), Image.Resampling.BICUBIC)
    return PreparedImage(resized, w // sizing.factor, h // sizing.factor)
