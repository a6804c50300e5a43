"""A Hugging Face checkpoint folder's files: its JSON files, and its safetensors (one file, or the shards its index
names), each failure a RerankerError naming the file."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open

from reranker.errors import RerankerError

_DOWNLOAD_AGAIN = "download the checkpoint again (or copy it whole)"


def read_json(path: Path, fix: str = _DOWNLOAD_AGAIN) -> dict:
    """The JSON object in `path`; a RerankerError naming the file when it cannot be read or is not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RerankerError(f"cannot read {path} ({e.strerror or e}); {fix}") from e
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise RerankerError(f"{path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(data, dict):
        raise RerankerError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def require_positive_ints(cfg: dict, keys: tuple[str, ...], where: str, fix: str = _DOWNLOAD_AGAIN) -> None:
    """A RerankerError naming `where` when any of `keys` is missing from config `cfg` or not a positive integer."""
    bad = [k for k in keys if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg[k] <= 0]
    if bad:
        raise RerankerError(f"{where} lacks {', '.join(bad)} (or {'they are' if len(bad) > 1 else 'it is'} not a positive "
                            f"integer): not a complete Qwen2-VL config; {fix}")


def safetensors_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards `model.safetensors.index.json` names, or `model.safetensors`.
    Every shard the index names must be there."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise RerankerError(f"{index} has no weight_map of tensor names to shard files; {_DOWNLOAD_AGAIN}")
        shards = [checkpoint / s for s in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise RerankerError(f"{index} names {len(missing)} shard(s) not in {checkpoint}: {', '.join(missing[:5])}"
                                f"{' ...' if len(missing) > 5 else ''}; download them beside the index")
        return shards
    single = checkpoint / "model.safetensors"
    if single.is_file():
        return [single]
    raise RerankerError(f"no model.safetensors (or model.safetensors.index.json) in {checkpoint}")


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator:
    """`safe_open(file)`, a truncated or corrupt file a RerankerError naming it (also for reads inside the block)."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise RerankerError(f"{file} is not a readable safetensors file ({e}); it may be truncated: {_DOWNLOAD_AGAIN}") from e
