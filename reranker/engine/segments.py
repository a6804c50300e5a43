"""A prompt that is not only tokens: token ids and image embeddings, in order, with M-RoPE positions.

An image document's prompt is `**Document**:\\n<|vision_start|>`, the image's embeddings (the
vision projector's rows, one per merged 28x28 patch), then `<|vision_end|>\\n**Query**:\\n{query}`
and the scoring token. The backbone feeds such a prompt part by part (llama.cpp takes a batch of
tokens or a batch of embeddings, not both), at the positions transformers gives it
(`Qwen2VLModel.get_rope_index`): text advances one position per token; an image's rows all take
the temporal position p where it starts, row i of its `ny` x `nx` grid sits at height p + i // nx
and width p + i % nx, and the text after it continues at p + max(nx, ny).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from reranker.errors import RerankerError


class _Grid:
    """An image's place in a prompt: `nx` x `ny` merged patches."""

    nx: int
    ny: int

    @property
    def n_tokens(self) -> int:
        """KV cells the image takes: one per merged patch."""
        return self.nx * self.ny

    @property
    def n_pos(self) -> int:
        """Positions the image takes: the text after it starts this much further."""
        return max(self.nx, self.ny)


@dataclass(frozen=True, eq=False)
class Embeddings(_Grid):
    """An image's embeddings: `rows` (nx * ny, n_embd) float32, row-major over its merged-patch grid."""

    rows: np.ndarray
    nx: int
    ny: int

    def __post_init__(self) -> None:
        if self.nx < 1 or self.ny < 1 or self.rows.ndim != 2 or len(self.rows) != self.nx * self.ny:
            raise RerankerError(f"image embeddings of shape {self.rows.shape} do not fill a {self.ny} x {self.nx} grid")

    def positions(self, start: int, first: int = 0, count: int | None = None) -> np.ndarray:
        """(4, count) M-RoPE positions (temporal, height, width, unused) of rows first.. of an image starting at `start`."""
        i = np.arange(first, len(self.rows) if count is None else first + count, dtype=np.int32)
        return np.stack([np.full_like(i, start), start + i // self.nx, start + i % self.nx, np.zeros_like(i)])


@dataclass(frozen=True, eq=False)
class PendingImage(_Grid):
    """An image loaded and sized as the original (`vision.load`), not yet encoded: `nx` x `ny` merged patches.

    Its size is known before the projector runs, so prompts are built (and cut) where images are read
    (a job's reader thread, a server request) and `scoring.score_prompts` encodes them just before the decode.
    """

    pixels: object  # reranker.images.preprocess.PreparedImage: untyped, so this layer imports no PIL
    nx: int
    ny: int
    name: str = "image"


#: An image side of a prompt: encoded (`Embeddings`) or still pixels (`PendingImage`).
Image = Embeddings | PendingImage
Part = Sequence[int] | Embeddings | PendingImage


@dataclass(frozen=True, eq=False)
class Segments:
    """A prompt as parts in order: token-id sequences and images; it must end with a token (the scoring token)."""

    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        parts = tuple(p for p in self.parts if isinstance(p, Image) or len(p))
        object.__setattr__(self, "parts", parts)
        if not parts or isinstance(parts[-1], Image):
            raise RerankerError("a prompt must end with a token (the scoring token), not an image")

    def __len__(self) -> int:
        """KV cells the prompt takes: one per token and per image row."""
        return sum(p.n_tokens if isinstance(p, Image) else len(p) for p in self.parts)

    def starts(self) -> list[int]:
        """The first position of each part."""
        out, pos = [], 0
        for p in self.parts:
            out.append(pos)
            pos += p.n_pos if isinstance(p, Image) else len(p)
        return out

    @property
    def pending(self) -> bool:
        """Whether an image is still pixels (`encoded` makes it embeddings)."""
        return any(isinstance(p, PendingImage) for p in self.parts)

    def encoded(self, encode: Callable[[PendingImage], Embeddings]) -> Segments:
        """This prompt with each `PendingImage` replaced by `encode(image)`, which must keep its grid."""
        parts = []
        for p in self.parts:
            if isinstance(p, PendingImage):
                e = encode(p)
                if (e.nx, e.ny) != (p.nx, p.ny):
                    raise RerankerError(f"{p.name} was sized as {p.ny} x {p.nx} merged patches but encoded as {e.ny} x {e.nx}")
                p = e
            parts.append(p)
        return Segments(tuple(parts))
