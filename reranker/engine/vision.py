"""Image sides of pairs -> the backbone's `Embeddings`: loaded and sized as the original, encoded by the mmproj.

The vision projector (`mmproj-*.gguf`, written by `reranker convert` or llama.cpp's converter) runs in
llama.cpp's libmtmd, bound to the backbone's model. It is loaded on the first image, so text-only use
never loads libmtmd: `find_mmproj` looks beside the GGUF when no path is given.
"""

from __future__ import annotations

import os
from pathlib import Path

from reranker.engine.backbone import Backbone
from reranker.engine.cpu import default_threads
from reranker.engine.segments import Embeddings
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


class Vision:
    """Images -> `Embeddings` for one backbone (thread-safe: the encoder serialises libmtmd)."""

    def __init__(self, mmproj: str | os.PathLike, backbone: Backbone, n_threads: int | None = None) -> None:
        # libmtmd is a library of its own, loaded by this import: only when an image is scored.
        from reranker.images.encode import VisionEncoder

        self.encoder = VisionEncoder(mmproj, backbone.llama_model, n_threads=n_threads or default_threads(),
                                     use_gpu=backbone.on_gpu)
        self.path = self.encoder.path

    def embed(self, image: ImageRef) -> Embeddings:
        """The image's embeddings: loaded (EXIF, RGB), resized as Qwen2-VL's processor, encoded."""
        from reranker.images.load import load_image
        from reranker.images.preprocess import prepare

        prepared = prepare(load_image(image.source, image.name), self.encoder.sizing, image.name)
        e = self.encoder.encode(prepared, image.name)
        return Embeddings(e.embeddings, nx=e.nx, ny=e.ny)

    def close(self) -> None:
        self.encoder.close()
