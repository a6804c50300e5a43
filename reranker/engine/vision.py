"""Image sides of pairs -> the backbone's `Embeddings`: loaded and sized as the original, encoded by the mmproj.

Two steps, so they can run in different places: `load` (decode, EXIF, RGB, smart_resize; pure CPU, no
model) gives a `PendingImage` whose token grid is known, where prompts are built (the caller's thread,
a job's reader); `Vision.encode` runs the projector, from `scoring.score_prompts`, just before the decode.

The vision projector (`mmproj-*.gguf`, written by `reranker convert` or llama.cpp's converter) runs in
llama.cpp's libmtmd, bound to the backbone's model. It is loaded on the first image, so text-only use
never loads libmtmd: `find_mmproj` looks beside the GGUF when no path is given.
"""

from __future__ import annotations

import os
from pathlib import Path

from reranker.engine.backbone import Backbone
from reranker.engine.cpu import default_threads
from reranker.engine.segments import Embeddings, PendingImage
from reranker.errors import RerankerError
from reranker.options import ImageRef

MMPROJ_GLOB = "mmproj-*.gguf"


def find_mmproj(gguf: str | os.PathLike) -> Path | None:
    """The one `mmproj-*.gguf` beside `gguf`; None when there is none; an error naming them when there are several."""
    found = sorted(Path(gguf).parent.glob(MMPROJ_GLOB))
    if len(found) > 1:
        raise RerankerError(f"several vision projectors beside {gguf}: {', '.join(p.name for p in found)}; "
                            "pass mmproj='path/to/mmproj-...gguf' (--mmproj) to choose one")
    return found[0] if found else None


def load(image: ImageRef, sizing=None, max_pixels: int | None = None, pdfs=None) -> PendingImage:
    """`image` loaded (EXIF orientation, RGB, bombs refused) and resized as Qwen2-VL's processor: its pixels
    and grid (`sizing`: a `reranker.images.preprocess.Sizing`, default the original's 4 to 768 tokens).
    `max_pixels`: images larger than this are refused before decoding (None: the library's limit, 2**27).
    `pdfs`: a `reranker.images.pdf.PdfDocuments` that keeps PDF files open across the pages of one call."""
    from reranker.images.load import MAX_PIXELS, load_image
    from reranker.images.preprocess import Sizing, prepare

    pixels = load_image(image.source, image.name, max_pixels=max_pixels or MAX_PIXELS, pdfs=pdfs)
    prepared = prepare(pixels, sizing or Sizing(), image.name)
    return PendingImage(prepared, nx=prepared.grid_w, ny=prepared.grid_h, name=image.name)


class Vision:
    """Images -> `Embeddings` for one backbone (thread-safe: the encoder serialises libmtmd)."""

    def __init__(self, mmproj: str | os.PathLike, backbone: Backbone, n_threads: int | None = None) -> None:
        # libmtmd is a library of its own, loaded by this import: only when an image is scored.
        from reranker.images.encode import VisionEncoder

        self.encoder = VisionEncoder(mmproj, backbone.llama_model, n_threads=n_threads or default_threads(),
                                     use_gpu=backbone.on_gpu)
        self.path = self.encoder.path
        self.sizing = self.encoder.sizing  # what `load` must size images with for this projector

    def encode(self, image: PendingImage) -> Embeddings:
        """The embeddings of an image from `load`."""
        e = self.encoder.encode(image.pixels, image.name)
        return Embeddings(e.embeddings, nx=e.nx, ny=e.ny)

    def embed(self, image: ImageRef) -> Embeddings:
        """The image's embeddings: `load`, then `encode`."""
        return self.encode(load(image, self.sizing))

    def close(self) -> None:
        self.encoder.close()
