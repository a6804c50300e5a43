"""Where the files are: a local GGUF, or `repo[:QUANT]` on the Hugging Face Hub (cache-aware)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from reranker.defaults import DEFAULT_QUANT, DEFAULT_REPO, HEAD_FILE
from reranker.errors import RerankerError
from reranker.gguf.header import GGUF_FIX, check_file, header_value
from reranker.gguf.quantize import QUANT_TYPES, level_in_name

#: The Hub files that are vision projectors (llama.cpp's `mmproj` prefix), never backbones.
MMPROJ_PATTERN = "mmproj*.gguf"


@dataclass(frozen=True)
class HubSource:
    """Where a Hub GGUF came from, so its vision projector can be fetched later from the same commit."""

    repo: str
    revision: str  # the snapshot's commit: the projector must come from the same one as the GGUF
    snapshot: Path  # the cached snapshot folder of that commit
    cache_dir: str | os.PathLike | None
    local_files_only: bool | None


@dataclass(frozen=True)
class ModelFiles:
    """The backbone GGUF and, when found, the scoring head beside it."""

    gguf: Path
    head: Path | None
    #: Set for a Hub model: `mmproj_from_hub` fetches its projector on the first image.
    hub: HubSource | None = None


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
    if local.exists() or local.is_symlink() or model.lower().endswith(".gguf"):
        gguf = check_file(local, "GGUF file", GGUF_FIX)
        _check_quant(gguf, quant)
        head = gguf.parent / HEAD_FILE
        return ModelFiles(gguf, head if head.is_file() else None)
    if looks_like_path(model):  # a Hub id is `name` or `owner/name`
        raise RerankerError(f"no local file or folder {model} (and it is not a Hub id like 'owner/name'); {GGUF_FIX}")
    return _from_hub(model, quant or DEFAULT_QUANT, cache_dir, local_files_only)


def looks_like_path(model: str) -> bool:
    """A model reference only a local path can be: more than one '/', a leading '.', '/' or '~', a backslash, or
    a .gguf name (a Hub id is `owner/name`)."""
    return (model.count("/") > 1 or model.startswith((".", "/", "~")) or "\\" in model or model.lower().endswith(".gguf"))


def check_hub_quant(quant: str) -> str:
    """`quant` upper-cased when it is a level llama.cpp names files by (Q8_0, F16, ...), else a RerankerError: checked
    before a download, as a pattern of another name would match nothing, or too much."""
    level = quant.upper()
    if level not in QUANT_TYPES:
        raise RerankerError(f"quant {quant!r} is not a GGUF level; choose one of {', '.join(sorted(QUANT_TYPES))}")
    return level


def hub_patterns(quant: str) -> tuple[list[str], list[str]]:
    """`snapshot_download`'s allow and ignore patterns for a model at `quant`: its GGUF and head, no projector.

    The level is matched as the name's ending, as `level_in_name` reads it (`model-Q8_0.gguf`, `model.q8_0.gguf`,
    `model_Q8_0.gguf`, `Q8_0.gguf`): `*F16*` would fetch the BF16 file too, `*Q4_K*` both Q4_K_M and Q4_K_S.
    """
    levels = sorted({quant, quant.upper(), quant.lower()})
    allow = [f"*{sep}{q}.gguf" for q in levels for sep in "-._"] + [f"{q}.gguf" for q in levels] + [HEAD_FILE]
    # `*-Q8_0.gguf` also matches `mmproj-...-Q8_0.gguf`: a projector (0.6-1.3 GB for m0) is fetched only when the
    # first image is scored (`mmproj_from_hub`), never for text-only use
    return allow, [MMPROJ_PATTERN, MMPROJ_PATTERN.upper()]


def _from_hub(repo: str, quant: str, cache_dir: str | os.PathLike | None, local_files_only: bool | None) -> ModelFiles:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    check_hub_quant(quant)
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    patterns, ignore = hub_patterns(quant)
    fix = (f"download it where the Hub is reachable: `hf download {repo} --include '*-{quant.upper()}.gguf' {HEAD_FILE}` "
           "(then copy the cache, or pass the local .gguf path)")
    nothing_here = f"there is no local file or folder {repo} either" if "/" in repo else ""
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, ignore_patterns=ignore,
                                        cache_dir=cache_dir, local_files_only=offline))
    except HFValidationError as e:
        raise RerankerError(f"no local file or folder {repo}, and it is not a Hub id like 'owner/name' ({e}); {GGUF_FIX}") from e
    except LocalEntryNotFoundError as e:
        state = "offline mode is on" if offline else "the Hub is unreachable"
        raise RerankerError(f"{repo}:{quant} is not in the local Hugging Face cache and {state}"
                            f"{', and ' + nothing_here if nothing_here else ''}; {fix}") from e
    except (HfHubHTTPError, OSError) as e:
        raise RerankerError(f"could not fetch {repo}:{quant} from the Hugging Face Hub ({e})"
                            f"{'; ' + nothing_here if nothing_here else ''}; {fix}") from e
    gguf = _pick(sorted(folder.glob("*.gguf")), quant, f"{repo} (cached at {folder})")
    head = folder / HEAD_FILE
    return ModelFiles(gguf, head if head.is_file() else None, HubSource(repo, folder.name, folder, cache_dir, local_files_only))


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub lets through when the Hub cannot be reached: its HTTP client's transport errors
    (httpx2 from huggingface_hub 2, httpx from 1, requests' are OSErrors) and HTTP errors (5xx, proxies)."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _projectors(names: list[str]) -> list[str]:
    # top level only, as the backbone is picked from the snapshot's top level
    return sorted(n for n in names if "/" not in n and is_mmproj(Path(n)) and n.lower().endswith(".gguf"))


def mmproj_from_hub(source: HubSource) -> Path:
    """The vision projector (`mmproj*.gguf`) of a Hub model, downloaded now from the commit its GGUF came from.

    The repo's list of files decides (the one projector, or an error naming several); offline, or when the
    Hub cannot be reached, the cached snapshot's projectors do, as `snapshot_download` falls back to the cache.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = source.repo, source.revision
    offline = constants.HF_HUB_OFFLINE if source.local_files_only is None else source.local_files_only
    fix = (f"download it where the Hub is reachable: `hf download {repo} --revision {revision} --include "
           f"'{MMPROJ_PATTERN}'` (then copy the cache), or pass mmproj='path/to/mmproj-...gguf' (CLI: --mmproj)")
    unreachable: BaseException | None = None
    names: list[str] | None = None
    if not offline:
        try:
            # model_info (one request, as snapshot_download's repo_info), not list_repo_files: that one retries a dead
            # connection for ~23 s before the cache could be used
            info = HfApi().model_info(repo, revision=revision)
            names = _projectors([f.rfilename for f in info.siblings or []])
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise RerankerError(f"could not list {repo}@{revision} on the Hugging Face Hub to find its vision projector "
                                f"({e}); pass mmproj='path/to/mmproj-...gguf' (CLI: --mmproj)") from e
        except _network_errors() as e:
            unreachable = e
    if names is None:  # offline or unreachable: what the cache holds of this commit
        names = _projectors([p.name for p in source.snapshot.glob("*.gguf")])
        if not names:
            state = "offline mode is on" if offline else f"the Hub is unreachable ({unreachable})"
            raise RerankerError(f"image pairs need {repo}'s vision projector ({MMPROJ_PATTERN}), which is not in the local "
                                f"Hugging Face cache, and {state}; {fix}")
    if not names:
        raise RerankerError(f"image pairs need a vision projector, and {repo} (revision {revision}) has no "
                            f"{MMPROJ_PATTERN} file; pass mmproj='path/to/mmproj-...gguf' (CLI: --mmproj), made by "
                            "`reranker convert` from a checkpoint with its visual.* weights")
    if len(names) > 1:
        raise RerankerError(f"several vision projectors in {repo}: {', '.join(names)}; pass mmproj='path/to/mmproj-...gguf' "
                            f"(--mmproj) to choose one (download it with `hf download {repo} NAME --revision {revision}`)")
    try:
        return Path(hf_hub_download(repo, names[0], revision=revision, cache_dir=source.cache_dir,
                                    local_files_only=offline or unreachable is not None))
    except LocalEntryNotFoundError as e:
        raise RerankerError(f"{repo}'s vision projector {names[0]} is not in the local Hugging Face cache and the Hub "
                            f"is unreachable; {fix}") from e
    except _network_errors() as e:
        raise RerankerError(f"could not fetch {repo}'s vision projector {names[0]} from the Hugging Face Hub ({e}); {fix}") from e

