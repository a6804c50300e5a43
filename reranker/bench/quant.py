"""Quantization benchmark: every level of one model on the same evaluation set, in one run.

`bench_quant()` finds or makes each level's GGUF (`quantize`), measures it in a fresh process
(`worker.py`: load time, peak memory, pairs/s and tokens/s through
`Reranker.compute_score`), and compares its scores with the reference's (the F32/BF16/F16 file
the levels are made from): correlation, per-query top-10 overlap, score differences, order flips,
and, when the set has relevance judgements, nDCG@10 / MRR@10 / Recall@100 from ir-measures
(`compare.py`).
The vision projector's levels (F32, F16, Q8_0: given files, or made from the checkpoint as `reranker convert
--mmproj-type` makes them) go through the same loop (`_score_levels`), each with the reference backbone, on
image documents: file size, memory, images/s and score drift against the F32 projector.
`report.py` turns the result into markdown, JSON and a plot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from tqdm.auto import tqdm

from reranker.atomic import atomic_path
from reranker.bench.compare import RETRIEVAL_MEASURES, fidelity, retrieval_metrics
from reranker.bench.recalibrate import fit_corrections, recalibrate
from reranker.bench.sets import EvalSet
from reranker.defaults import IDENTITY_DTYPE
from reranker.engine.cpu import default_threads
from reranker.engine.identity import with_identity_output
from reranker.errors import RerankerError
from reranker.extras import require
from reranker.gguf.header import check_file, check_gguf_file, header_value
from reranker.gguf.hub import resolve
from reranker.gguf.layout import read_layout
from reranker.gguf.quantize import BENCH_LEVELS, QUANT_TYPES, level_in_name, quantize

_K_BLOCK = 256  # values per block of every K-quant (llama.cpp's QK_K): a row must hold a whole number of them
log = logging.getLogger(__name__)

#: Levels a reference can be, most precise first: the first one found is the reference.
REFERENCE_TYPES = ("F32", "BF16", "F16")
#: The levels measured unless told otherwise: BF16, then the release's.
DEFAULT_LEVELS = BENCH_LEVELS


@dataclass
class Level:
    """One GGUF to measure. `path` is None until a missing level is made from the reference."""

    name: str
    path: Path | None
    reference: bool = False


@dataclass
class Plan:
    """The reference, the levels to measure (reference first), the head, and where missing levels go."""

    reference: Level
    levels: list[Level]
    head: Path
    make_dir: Path


@dataclass
class BenchReport:
    """Everything one run measured: a row per level, the evaluation set, the settings, the machine."""

    rows: list[dict[str, Any]]
    eval_set: dict[str, Any] | None
    settings: dict[str, Any]
    environment: dict[str, Any]
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    ids: list[tuple[str, str]] = field(default_factory=list, repr=False)
    #: The vision projector's levels, measured on `image_set` (scores under "mmproj_LEVEL", ids `image_ids`).
    projector_rows: list[dict[str, Any]] = field(default_factory=list)
    image_set: dict[str, Any] | None = None
    image_ids: list[tuple[str, str]] = field(default_factory=list, repr=False)


# --- levels -------------------------------------------------------------------------------


def gguf_level(path: str | os.PathLike) -> str:
    """The level of a GGUF ("F16", "Q4_K_M", ...) from its `general.file_type`, else from its name."""
    p = check_gguf_file(path)
    names = {v: k for k, v in QUANT_TYPES.items()}
    ftype = header_value(p, "general.file_type")
    if ftype in names:
        return names[ftype]
    level = level_in_name(p.name)
    if level is not None:
        return level
    raise RerankerError(f"cannot tell the quantization level of {p}: no general.file_type and no -LEVEL suffix in its name")


def _check_levels(levels: Sequence[str]) -> list[str]:
    out = []
    for name in levels:
        key = name.strip().upper()
        if key not in QUANT_TYPES:
            raise RerankerError(f"unknown level {name!r}; choose from {', '.join(sorted(QUANT_TYPES))}")
        if key not in out:
            out.append(key)
    return out


def plan_levels(models: Sequence[str], out_dir: str | os.PathLike, *, levels: Sequence[str] | None = None,
                reference: str | None = None, head: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None) -> Plan:
    """Which GGUFs to measure, and which to make.

    - one GGUF file (or `repo:QUANT`): it is the reference; every level of `levels` (default:
      the release's five) is made from it into `out_dir/gguf` (kept there for the next run);
    - a folder or a Hub repo id: the reference is its `reference` file (default: the first of
      F32, BF16, F16 that it holds); levels it holds are used, missing ones are made;
    - several GGUF files: the reference is the one of level `reference` (default: the most
      precise float file); the others are the levels, plus any of `levels` when given (made).
    """
    if not models:
        raise RerankerError("no model given: pass an F16/BF16/F32 GGUF, a folder or Hub repo of GGUFs, or several GGUF files")
    make_dir = Path(out_dir) / "gguf"
    wanted = _check_levels(levels) if levels is not None else None
    ref_name = _check_levels([reference])[0] if reference else None
    found: dict[str, Path] = {}
    heads: dict[str, Path] = {}  # level -> the head beside its file
    if len(models) > 1:
        for m in models:
            files = resolve(m, cache_dir=cache_dir, local_files_only=local_files_only)
            name = gguf_level(files.gguf)
            if name in found:
                raise RerankerError(f"{files.gguf} and {found[name]} are both {name}; give one file per level")
            found[name] = files.gguf
            if files.head:
                heads[name] = files.head
        ref_name = ref_name or next((t for t in REFERENCE_TYPES if t in found), None)
        if ref_name not in found:
            raise RerankerError(f"none of the given GGUFs is {ref_name or 'F32, BF16 or F16'}: add the unquantized file "
                                "the levels are compared with (or name it with --reference)")
        names = [n for n in found if n != ref_name] + [n for n in wanted or [] if n not in found]
    else:
        model = models[0]
        local = Path(model).expanduser()
        if local.is_file() or (not local.is_dir() and ":" in model and not model.startswith((".", "/", "~"))):
            files = resolve(model, cache_dir=cache_dir, local_files_only=local_files_only)
            name = gguf_level(files.gguf)
            if ref_name and ref_name != name:
                raise RerankerError(f"{files.gguf} is {name}, not the --reference {ref_name}")
            ref_name, found[name] = name, files.gguf
            if files.head:
                heads[name] = files.head
        else:
            for name in [ref_name] if ref_name else REFERENCE_TYPES:
                try:
                    files = resolve(model, name, cache_dir=cache_dir, local_files_only=local_files_only)
                except RerankerError as e:
                    last = e
                    continue
                ref_name, found[name] = name, files.gguf
                if files.head:
                    heads[name] = files.head
                break
            else:
                raise RerankerError(f"{model} holds no {' / '.join([ref_name] if ref_name else REFERENCE_TYPES)} GGUF "
                                    f"to quantize and compare with ({last})")
            for name in wanted if wanted is not None else DEFAULT_LEVELS:
                if name == ref_name:
                    continue
                try:  # a level the folder or repo lacks is made, not an error
                    found[name] = resolve(model, name, cache_dir=cache_dir, local_files_only=local_files_only).gguf
                except RerankerError as e:
                    log.info("%s has no %s GGUF (%s); it will be made from the reference", model, name, e)
        names = [n for n in (wanted if wanted is not None else DEFAULT_LEVELS) if n != ref_name]
    if ref_name not in REFERENCE_TYPES:
        raise RerankerError(f"the reference {found[ref_name]} is {ref_name}; levels are made from and compared with an "
                            "unquantized GGUF: give the F16, BF16 or F32 file")
    head_path = Path(head) if head is not None else heads.get(ref_name, next(iter(heads.values()), None))
    if head_path is None or not head_path.is_file():
        raise RerankerError(f"no scoring head {'at ' + str(head_path) if head_path else 'beside ' + str(found[ref_name])}; "
                            "pass --head path/to/mlp_weights.npz")
    ref = Level(ref_name, found[ref_name], reference=True)
    _warn_k_quant_misfits(ref.path, [n for n in names if "_K" in n])
    return Plan(ref, [ref] + [Level(n, found.get(n)) for n in names], head_path, make_dir)


def k_quant_misfits(path: str | os.PathLike) -> tuple[int, int, list[int]]:
    """(weight matrices whose rows are not a multiple of 256 values, weight matrices, those row sizes) of a GGUF,
    from its header: llama.cpp stores such matrices of a K-quant level in a fallback type (usually Q8_0 or Q5_0)."""
    matrices = [t for t in read_layout(path).tensors if len(t.dims) >= 2 and t.dims[1] > 1]
    misfits = [t for t in matrices if t.dims[0] % _K_BLOCK]
    return len(misfits), len(matrices), sorted({t.dims[0] for t in misfits})


def _warn_k_quant_misfits(reference: Path, k_levels: list[str]) -> None:
    """One line, before anything is made, when the K-quant levels cannot be what they are named."""
    if not k_levels:
        return
    n, total, rows = k_quant_misfits(reference)
    if n:
        log.warning("%s: %d of %d weight matrices have rows of %s values, not multiples of 256, so llama.cpp stores them "
                    "in a fallback type (Q8_0, Q5_0, ...) in %s: those levels will measure alike; for levels that differ, "
                    "bench a model whose sizes are multiples of 256 (the real model, or `reranker synth --preset small`)",
                    reference.name, n, total, "/".join(map(str, rows)), ", ".join(k_levels))


def _made_path(plan: Plan, name: str) -> Path:
    stem = plan.reference.path.stem
    suffix = "-" + plan.reference.name
    base = stem[: -len(suffix)] if stem.upper().endswith(suffix.upper()) else stem
    return plan.make_dir / f"{base}-{name}.gguf"


def make_level(plan: Plan, level: Level, n_threads: int | None = None) -> float | None:
    """Quantize a missing level from the reference; seconds taken, or None when nothing was made.

    A file made by an earlier run from the same reference (same path, size and mtime, as
    recorded in `<file>.source`) is reused.
    """
    if level.path is not None:
        return None
    ref = plan.reference.path

    def write(tmp: Path) -> None:
        quantize(ref, tmp, level.name, n_threads=n_threads, explain=False)  # plan_levels said it once for all levels

    return _make_or_reuse(level, _made_path(plan, level.name), _stamp(ref), write, gguf_level)


def _stamp(*sources: Path) -> str:
    """What a made file was made from: each source's path, size and mtime."""
    return "".join(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}\n" for p in sources)


def _make_or_reuse(level: Level, dst: Path, source: str, write, level_of) -> float | None:
    """`level.path` = `dst`, written by `write(tmp)` unless an earlier run made it from the same `source`
    (recorded in `<dst>.source`); seconds taken, or None when reused."""
    stamp = dst.with_name(dst.name + ".source")
    if dst.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == source and level_of(dst) == level.name:
        level.path = dst
        return None
    t0 = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:  # an interrupted run leaves no half file to reuse
        write(tmp)
    stamp.write_text(source, encoding="utf-8")
    level.path = dst
    return time.perf_counter() - t0


# --- vision projector levels --------------------------------------------------------------

#: The projector levels `reranker convert --mmproj-type` writes; F32, the most precise, is the reference.
MMPROJ_LEVELS = ("F32", "F16", "Q8_0")
_MMPROJ_FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0"}  # general.file_type, as convert_mmproj and llama.cpp write it


@dataclass
class ProjectorPlan:
    """Projector levels (the reference first), measured beside the backbone `gguf`; missing ones are made
    from `checkpoint` into `make_dir`."""

    levels: list[Level]
    gguf: Path
    checkpoint: Path | None
    make_dir: Path

    @property
    def reference(self) -> Level:
        return self.levels[0]


def mmproj_level(path: str | os.PathLike) -> str:
    """The level of a vision projector GGUF ("F32", "F16", "Q8_0") from its header."""
    p = check_file(path, "vision projector", "pass the mmproj-*.gguf that `reranker convert` writes beside the model")
    if header_value(p, "general.type") != "mmproj":
        raise RerankerError(f"{p} is not a vision projector (general.type {header_value(p, 'general.type')!r}, not 'mmproj'); "
                            "pass the mmproj-*.gguf that `reranker convert` writes beside the model")
    ftype = header_value(p, "general.file_type")
    if ftype not in _MMPROJ_FILE_TYPES:
        raise RerankerError(f"{p} has general.file_type {ftype!r}; the projector levels measured are {', '.join(MMPROJ_LEVELS)}")
    return _MMPROJ_FILE_TYPES[ftype]


def plan_projectors(gguf: Path, out_dir: str | os.PathLike, *, files: Sequence[str] = (), checkpoint: str | os.PathLike | None = None,
                    levels: Sequence[str] | None = None) -> ProjectorPlan:
    """The projector levels to measure: the given `files` (one per level), plus, from `checkpoint`, every
    level of `levels` (default all of `MMPROJ_LEVELS`) they lack, made as `reranker convert --mmproj-type`
    makes it. The F32 projector is the reference, so it must be given or made."""
    found: dict[str, Path] = {}
    for f in files:
        name = mmproj_level(f)
        if name in found:
            raise RerankerError(f"{f} and {found[name]} are both {name} projectors; give one file per level")
        found[name] = Path(f)
    wanted = list(MMPROJ_LEVELS if levels is None else [x.strip().upper() for x in levels])
    for name in wanted:
        if name not in MMPROJ_LEVELS:
            raise RerankerError(f"unknown projector level {name!r}; choose from {', '.join(MMPROJ_LEVELS)}")
    if checkpoint is not None:
        from reranker.gguf.mmproj import has_vision

        ckpt = Path(checkpoint)
        if not (ckpt / "config.json").is_file() or not has_vision(ckpt):
            raise RerankerError(f"{ckpt} is not a checkpoint with a vision tower (config.json and visual.* weights): "
                                "--mmproj-checkpoint takes the folder `reranker convert` reads")
        names = [n for n in MMPROJ_LEVELS if n in found or n in wanted or n == "F32"]
    else:
        if levels is not None:
            raise RerankerError("--mmproj-levels makes projector levels from a checkpoint: add --mmproj-checkpoint DIR")
        ckpt, names = None, [n for n in MMPROJ_LEVELS if n in found]
    if "F32" not in names:
        raise RerankerError("the projector levels are compared with the F32 projector: add it (--mmproj mmproj-...-F32.gguf), "
                            "or --mmproj-checkpoint DIR to make it")
    return ProjectorPlan([Level(n, found.get(n), reference=n == "F32") for n in names], gguf, ckpt, Path(out_dir) / "mmproj")


def make_projector(plan: ProjectorPlan, level: Level) -> float | None:
    """Convert a missing projector level from the checkpoint (reused when an earlier run made it from the same one)."""
    if level.path is not None:
        return None
    from reranker.gguf.mmproj import convert_mmproj, mmproj_name
    from reranker.gguf.safetensors_files import safetensors_files

    ckpt = plan.checkpoint
    name = ckpt.resolve().name
    dst = plan.make_dir / mmproj_name(name, level.name.lower())

    def write(tmp: Path) -> None:
        # convert_mmproj names the file itself: write into a scratch folder beside, then move into tmp
        scratch = tmp.with_name(tmp.name + ".d")
        try:
            os.replace(convert_mmproj(ckpt, scratch, level.name.lower(), name=name), tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    sources = [ckpt / "config.json", ckpt / "preprocessor_config.json", *safetensors_files(ckpt)]
    return _make_or_reuse(level, dst, _stamp(*sources), write, mmproj_level)


# --- metrics ------------------------------------------------------------------------------


def _run_dict(eval_set: EvalSet, scores: np.ndarray) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    i = 0
    for q in eval_set.queries:
        for doc_id, _ in q.docs:
            run.setdefault(q.query_id, {})[doc_id] = float(scores[i])
            i += 1
    return run


# --- measuring ----------------------------------------------------------------------------

HIDDEN_FILE = "hidden.npy"
RECALIBRATED_DIR = "recalibrated"


@dataclass
class Settings:
    """How every level is loaded and scored (the offline job's defaults, with a larger batch)."""

    n_threads: int | None = None
    n_ctx: int | None = None
    n_batch: int | None = None  # by device, as the library
    n_gpu_layers: int = -1
    batch_size: int = 256
    max_length: int | None = None
    max_query_length: int = 512
    max_doc_length: int | None = None  # None: the original's max(max_length - max_query_length, max_query_length)
    device: str | None = None
    warmup: int = 8


def _measure(level: Level, head: Path, pairs_file: Path, n_pairs: int, settings: Settings, work: Path,
             bar: tqdm, hidden: bool = False, gguf: Path | None = None, mmproj: Path | None = None) -> tuple[dict, np.ndarray]:
    work.mkdir(parents=True, exist_ok=True)
    spec = {"gguf": str(gguf or level.path), "head": str(head), "pairs": str(pairs_file),
            **({"mmproj": str(mmproj)} if mmproj else {}),
            "scores": str(work / "scores.npy"), "result": str(work / "result.json"),
            **({"hidden": str(work / HIDDEN_FILE)} if hidden else {}),
            **{k: getattr(settings, k) for k in Settings.__dataclass_fields__}}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # so the worker imports this very package
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    err_path = work / "stderr.txt"
    with open(err_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen([sys.executable, "-m", "reranker.bench.worker", str(spec_path)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("progress "):
                    bar.update(min(n_pairs, int(line.split()[1])) - bar.n)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0:
        tail = err_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise RerankerError(f"measuring {level.name} ({level.path}) failed (exit code {rc}); its last messages:\n" + "\n".join(tail))
    return json.loads((work / "result.json").read_text(encoding="utf-8")), np.load(work / "scores.npy")


def environment(settings: Settings) -> dict[str, Any]:
    """The machine and libraries the numbers come from."""
    import torch

    try:
        lib_version = llama_cpp.llama_version().decode()
    except (AttributeError, TypeError):
        lib_version = None
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    cuda = torch.cuda.is_available()
    on_gpu = offload and settings.n_gpu_layers != 0
    return {
        "device": (f"cuda: {torch.cuda.get_device_name(0)}" if cuda else "gpu") if on_gpu else "cpu",
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": settings.n_threads or default_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "llama_gpu_offload": offload,
        "n_gpu_layers": settings.n_gpu_layers,
        "llama_cpp_python": llama_cpp.__version__, "llama_cpp": lib_version,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(" |"),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
    }


def bench_quant(plan: Plan, eval_set: EvalSet | None, out_dir: str | os.PathLike, settings: Settings | None = None, *,
                quantize_threads: int | None = None, progress: bool = True, recalibrate: bool = False,
                projectors: ProjectorPlan | None = None, image_set: EvalSet | None = None) -> BenchReport:
    """Make the missing levels of `plan`, score `eval_set` with every level, compare each with the reference.

    `recalibrate`: keep every level's hidden states, and add to each quantized level's row the
    held-out fidelity before and after a correction fitted towards the reference (`recalibrate.py`).
    `projectors`: also measure those vision projector levels, each with the plan's reference backbone, on
    `image_set` (image documents), the same way; `eval_set` None measures only them.
    """
    require("bench", "reranker bench-quant")  # before the reference is scored, which the comparison needs scipy for
    if eval_set is None and projectors is None:
        raise RerankerError("nothing to measure: give an evaluation set (--beir, --pairs or --synthetic) or projector levels")
    if projectors is not None and image_set is None:
        raise RerankerError("projector levels are measured on images: give an image set (--images DIR or --synthetic-images N)")
    if recalibrate and (eval_set is None or len(eval_set.groups()) < 4):
        raise RerankerError(f"--recalibrate fits on half of the queries and measures on the other half: it needs at least "
                            f"4 queries, the evaluation set has {len(eval_set.groups()) if eval_set else 0}")
    settings = dataclasses.replace(settings or Settings())
    # Decided once, here: a worker deciding for itself would sample the machine's load per level, and levels
    # measured at different thread counts are not comparable.
    settings.n_threads = settings.n_threads or default_threads()
    if eval_set is not None:
        settings.warmup = min(settings.warmup, len(eval_set.pairs()))
    out = Path(out_dir)
    work = out / "work"
    rows: list[dict[str, Any]] = []
    all_scores: dict[str, np.ndarray] = {}
    if eval_set is not None:
        rows, all_scores = _score_levels(
            plan.levels, eval_set, settings, work, progress, plan.head, recalibrate,
            make=lambda level: make_level(plan, level, n_threads=quantize_threads), files=lambda level: (level.path, None))
        if recalibrate:
            _recalibrate(plan, rows, work, out, eval_set.groups())
    projector_rows: list[dict[str, Any]] = []
    if projectors is not None:
        projector_rows, projector_scores = _score_levels(
            projectors.levels, image_set, settings, work / "mmproj", progress, plan.head, False,
            make=lambda level: make_projector(projectors, level), files=lambda level: (projectors.gguf, level.path))
        for row in projector_rows:  # one image per pair
            row["images_per_s"] = row.get("pairs_per_s")
        all_scores.update({f"mmproj_{name}": v for name, v in projector_scores.items()})
    st = {"reference": plan.reference.name, "reference_path": str(plan.reference.path), "head": str(plan.head),
          "levels": [lv.name for lv in plan.levels] if eval_set is not None else [], **vars(settings)}
    if projectors is not None:
        st["mmproj_levels"] = [lv.name for lv in projectors.levels]
        st["mmproj_backbone"] = str(projectors.gguf)
    return BenchReport(rows, eval_set.summary() if eval_set is not None else None, st, environment(settings), all_scores,
                       _ids(eval_set), projector_rows, image_set.summary() if image_set is not None else None, _ids(image_set))


def _ids(eval_set: EvalSet | None) -> list[tuple[str, str]]:
    return [] if eval_set is None else [(q.query_id, doc_id) for q in eval_set.queries for doc_id, _ in q.docs]


def _score_levels(levels: list[Level], eval_set: EvalSet, settings: Settings, work: Path, progress: bool, head: Path,
                  hidden: bool, *, make, files) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The measurement loop of every kind of level: `make(level)` makes a missing file (seconds, or None), `files(level)`
    gives the (backbone GGUF, vision projector or None) it is measured with; each is scored in a fresh worker and
    compared with the first level's scores (the reference's)."""
    work.mkdir(parents=True, exist_ok=True)
    pairs = eval_set.pairs()
    groups = eval_set.groups()
    pairs_file = work / "pairs.json"
    pairs_file.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    settings = dataclasses.replace(settings, warmup=min(settings.warmup, len(pairs)))
    rows: list[dict[str, Any]] = []
    all_scores: dict[str, np.ndarray] = {}
    ref_scores: np.ndarray | None = None
    with tqdm(total=len(levels), desc="levels", unit="level", disable=not progress, position=0) as levels_bar:
        for level in levels:
            try:
                made_s, numbers, scores = _make_and_measure(level, levels_bar, pairs_file, len(pairs), settings, work,
                                                            progress, head, hidden, make, files)
            except RerankerError as e:
                if ref_scores is None:  # the reference: nothing to compare the other levels with
                    raise
                # One level that cannot be made or measured costs only its own row.
                log.error("%s: %s", level.name, e)
                rows.append({"level": level.name, "reference": False, "path": str(level.path) if level.path else None,
                             "error": str(e)})
                levels_bar.update(1)
                continue
            if ref_scores is None:
                ref_scores = scores
            all_scores[level.name] = scores
            size = level.path.stat().st_size
            row: dict[str, Any] = {"level": level.name, "reference": level.reference, "path": str(level.path),
                                   "made": made_s is not None, "quantize_s": made_s,
                                   "file_bytes": size, "file_mb": size / 2**20, **numbers}
            row.update(fidelity(ref_scores, scores, groups))
            if eval_set.qrels:
                row.update(retrieval_metrics(eval_set.qrels, _run_dict(eval_set, scores)))
            else:
                row.update({key: None for key in RETRIEVAL_MEASURES})
            rows.append(row)
            levels_bar.update(1)
    return rows, all_scores


def _make_and_measure(level: Level, levels_bar: tqdm, pairs_file: Path, n_pairs: int, settings: Settings, work: Path,
                      progress: bool, head: Path, hidden: bool, make, files) -> tuple[float | None, dict, np.ndarray]:
    levels_bar.set_postfix_str(level.name + (": making" if level.path is None else ""))
    made_s = make(level)
    gguf, mmproj = files(level)
    # The fast path's one-time GGUF copy (in from_pretrained's default dtype) is made here,
    # so the worker times a steady-state load, as every later run of the job sees it.
    levels_bar.set_postfix_str(f"{level.name}: preparing")
    with_identity_output(gguf, IDENTITY_DTYPE)
    levels_bar.set_postfix_str(f"{level.name}: scoring")
    with tqdm(total=n_pairs, desc=f"{level.name} pairs", unit="pair", disable=not progress,
              position=1, leave=False) as pairs_bar:
        numbers, scores = _measure(level, head, pairs_file, n_pairs, settings, work / level.name, pairs_bar,
                                   hidden=hidden, gguf=gguf, mmproj=mmproj)
    return made_s, numbers, scores


def _recalibrate(plan: Plan, rows: list[dict[str, Any]], work: Path, out: Path, groups: Sequence[int]) -> None:
    """Each quantized row gets `recalibrated` (held-out fidelity before/after each correction), and the
    corrections fitted on all pairs are written as heads, `OUT/recalibrated/LEVEL-CORRECTION-mlp_weights.npz`."""
    from head import ScoringHead

    head = ScoringHead.load(plan.head)
    ref_hidden = np.load(work / plan.reference.name / HIDDEN_FILE)
    (out / RECALIBRATED_DIR).mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row["reference"] or row.get("error"):
            continue
        hidden = np.load(work / row["level"] / HIDDEN_FILE)
        row["recalibrated"] = recalibrate(head, ref_hidden, hidden, groups)
        for kind, fitted in fit_corrections(head, ref_hidden, hidden, groups).items():
            path = out / RECALIBRATED_DIR / f"{row['level']}-{kind}-mlp_weights.npz"
            fitted.save_npz(path)
            row["recalibrated"][kind]["head"] = str(path)
