"""Where the files are: a local GGUF, or `repo[:QUANT]` on the Hugging Face Hub (cache-aware)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from reranker.defaults import DEFAULT_QUANT, DEFAULT_REPO, HEAD_FILE
from reranker.errors import RerankerError
from reranker.gguf.header import GGUF_FIX, check_file, header_value
from reranker.gguf.quantize import QUANT_TYPES, level_in_name


@dataclass(frozen=True)
class ModelFiles:
    """The backbone GGUF and, when found, the scoring head beside it."""

    gguf: Path
    head: Path | None


def split_ref(model: str, quant: str | None) -> tuple[str, str | None]:
    """`repo:QUANT` as llama.cpp's `-hf` writes it -> (repo, quant)."""
    if ":" in model and not Path(model).exists():
        model, tag = model.rsplit(":", 1)
        if quant and quant.upper() != tag.upper():
            raise RerankerError(f"quant={quant!r} contradicts the tag in {model}:{tag}; give one of them")
        quant = tag
    return model, quant


def file_level(path: Path) -> str | None:
    """A GGUF's quantisation level: from its header's general.file_type, else from its name."""
    names = {v: k for k, v in QUANT_TYPES.items()}
    return names.get(header_value(path, "general.file_type")) or level_in_name(path.name)


def _check_quant(path: Path, quant: str | None) -> None:
    """`quant` with one local file may only restate the file's level."""
    if quant is None:
        return
    level = file_level(path)
    if level != quant.upper():
        raise RerankerError(f"quant={quant!r} but {path} is {level or 'of an unknown level'}; quant selects a file in a "
                            "folder or Hub repo, so drop it (or pass the folder, or the file of that level)")


def _matches(path: Path, quant: str) -> bool:
    return level_in_name(path.name, extra=(quant,)) == quant.upper()


def is_mmproj(path: Path) -> bool:
    """A vision projector (`mmproj-*.gguf`, llama.cpp's name for it), not a backbone."""
    return path.name.lower().startswith("mmproj")


def _pick(ggufs: list[Path], quant: str | None, where: str) -> Path:
    # `reranker convert` writes the projector beside the backbone, at a level of its own: never a candidate
    ggufs = [p for p in ggufs if not is_mmproj(p)]
    if quant:
        hits = [p for p in ggufs if _matches(p, quant)]
    else:
        hits = ggufs if len(ggufs) == 1 else [p for p in ggufs if _matches(p, DEFAULT_QUANT)]
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(sorted(p.name for p in ggufs)) or "none"
    if not hits:
        raise RerankerError(f"no GGUF for quant {quant or DEFAULT_QUANT!r} in {where} (GGUF files there: {names}); pass quant=... or a file path")
    raise RerankerError(f"several GGUFs match quant {quant!r} in {where}: {names}; pass the file path")


def resolve(model: str = DEFAULT_REPO, quant: str | None = None, *, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool | None = None) -> ModelFiles:
    """Find (or download) the GGUF and the head for `model`: a .gguf path, a folder, or a Hub repo id."""
    model, quant = split_ref(model, quant)
    local = Path(model).expanduser()
    if local.is_dir() and local.suffix.lower() != ".gguf":
        gguf = _pick(sorted(local.glob("*.gguf")), quant, str(local))
        head = local / HEAD_FILE
        return ModelFiles(gguf, head if head.is_file() else None)
    if local.exists() or local.is_symlink() or model.endswith(".gguf") or model.startswith((".", "/", "~")):
        gguf = check_file(local, "GGUF file", GGUF_FIX)
        _check_quant(gguf, quant)
        head = gguf.parent / HEAD_FILE
        return ModelFiles(gguf, head if head.is_file() else None)
    return _from_hub(model, quant or DEFAULT_QUANT, cache_dir, local_files_only)


def _from_hub(repo: str, quant: str, cache_dir: str | os.PathLike | None, local_files_only: bool | None) -> ModelFiles:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    patterns = [f"*{q}*.gguf" for q in {quant, quant.upper(), quant.lower()}] + [HEAD_FILE]
    fix = (f"download it where the Hub is reachable: `hf download {repo} --include '*{quant}*.gguf' {HEAD_FILE}` "
           "(then copy the cache, or pass the local .gguf path)")
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        state = "offline mode is on" if offline else "the Hub is unreachable"
        raise RerankerError(f"{repo}:{quant} is not in the local Hugging Face cache and {state}; {fix}") from e
    except (HfHubHTTPError, OSError) as e:
        raise RerankerError(f"could not fetch {repo}:{quant} from the Hugging Face Hub ({e}); {fix}") from e
    gguf = _pick(sorted(folder.glob("*.gguf")), quant, f"{repo} (cached at {folder})")
    head = folder / HEAD_FILE
    return ModelFiles(gguf, head if head.is_file() else None)
