"""The safetensors files of a Hugging Face checkpoint folder: one file, or the shards its index names."""

from __future__ import annotations

import json
from pathlib import Path

from reranker.errors import RerankerError


def safetensors_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / s for s in shards]
    single = checkpoint / "model.safetensors"
    if single.is_file():
        return [single]
    raise RerankerError(f"no model.safetensors (or model.safetensors.index.json) in {checkpoint}")
