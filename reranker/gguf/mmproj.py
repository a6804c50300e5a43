"""A checkpoint's Qwen2-VL vision tower (`visual.*`) -> the vision projector GGUF llama.cpp's mtmd loads.

Writes what llama.cpp's own converter writes for the same checkpoint (`convert_hf_to_gguf.py --mmproj
--outtype T --model-name NAME`, class `Qwen2VLVisionModel`, llama.cpp as vendored by llama-cpp-python
0.3.36): architecture `clip`, projector type `qwen2vl_merger`; the fused `attn.qkv` split into q / k / v,
the Conv3D patch embedding split into its two temporal slices (`v.patch_embd.weight`,
`v.patch_embd.weight.1`), names from gguf-py's MMPROJ tensor map, image mean / std from
`preprocessor_config.json`. tests/gguf/test_mmproj.py compares the two files byte for byte (F32, F16
and Q8_0 projectors; float32 and bfloat16 checkpoints).

jina-reranker-m0 is registered as `JinaVLForRanking`, which llama.cpp's converter does not know; its
`model_type` (`qwen2_vl`) and `vision_config` are Qwen2-VL's, so the Qwen2-VL rules apply as they are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from reranker.atomic import atomic_path
from reranker.errors import RerankerError
from reranker.gguf.safetensors_files import open_safetensors, read_json, require_positive_ints, safetensors_files

log = logging.getLogger(__name__)

__all__ = ["MMPROJ_TYPES", "MmprojPlan", "check_name", "convert_mmproj", "has_vision", "make_output_folder", "mmproj_name",
           "plan_mmproj", "write_mmproj", "written"]

MMPROJ_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32, "F32"),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16, "F16"),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
}

# llama.cpp's default when config.json's vision_config has no image_size (Qwen2-VL's has none); mtmd
# reads it only as a warm-up size, images keep their own.
_DEFAULT_IMAGE_SIZE = 560


def mmproj_name(name: str, mmproj_type: str) -> str:
    """`mmproj-<name>-<TYPE>.gguf`, as llama.cpp's converter names a projector."""
    return f"mmproj-{name}-{MMPROJ_TYPES[mmproj_type][2]}.gguf"


# The Hub layout's prefix, and the one a checkpoint saved by transformers >= 4.52 has instead.
_PREFIXES = ("visual.", "model.visual.")


def _visual_names(checkpoint: Path) -> Iterator[tuple[str, str, Path]]:
    """(Hub name, stored name, file) of the vision tower's tensors in llama.cpp's order: shard by shard,
    Hub names sorted within each shard. `model.visual.*` (newer transformers) reads as `visual.*`, the
    names llama.cpp's converter takes, so both layouts give the same file."""
    for file in safetensors_files(checkpoint):  # as llama.cpp: the index's shard names sorted
        with open_safetensors(file) as f:
            names = {}
            for stored in f.keys():
                prefix = next((p for p in _PREFIXES if stored.startswith(p)), None)
                if prefix is not None:
                    names["visual." + stored[len(prefix):]] = stored
            for hub in sorted(names):
                yield hub, names[hub], file


def has_vision(checkpoint: str | Path) -> bool:
    """Whether the checkpoint carries a vision tower (`visual.*` or `model.visual.*` tensors)."""
    return next(_visual_names(Path(checkpoint)), None) is not None


def _split(name: str, shape: list[int]) -> list[tuple[str, list[int], tuple]]:
    """(source name, shape after the split, index into the source tensor) for each output tensor."""
    if ".qkv." in name:
        if shape[0] % 3:
            raise RerankerError(f"{name}: fused qkv of {shape[0]} rows is not 3 equal parts")
        c = shape[0] // 3
        return [(name.replace("qkv", part), [c, *shape[1:]], (slice(i * c, (i + 1) * c),))
                for i, part in enumerate(("q", "k", "v"))]
    if "patch_embed.proj.weight" in name:
        if len(shape) != 5 or shape[2] != 2:
            raise RerankerError(f"{name}: shape {shape}, expected a Conv3D [out, in, 2, kh, kw] (temporal_patch_size 2); "
                                "llama.cpp's Qwen2-VL projector splits it into two Conv2Ds")
        out = [shape[0], shape[1], *shape[3:]]
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight"
        return [(base, out, (slice(None), slice(None), 0)), (base + ".1", out, (slice(None), slice(None), 1))]
    return [(name, shape, ())]


def _out_type(gname: str, n_dims: int, qtype: gguf.GGMLQuantizationType,
              ftype: gguf.LlamaFileType) -> gguf.GGMLQuantizationType:
    """llama.cpp's choice (ModelBase.prepare_tensors with MmprojModel.tensor_force_quant)."""
    if ".patch_embd.weight" in gname:
        return gguf.GGMLQuantizationType.F16 if ftype == gguf.LlamaFileType.MOSTLY_F16 else gguf.GGMLQuantizationType.F32
    if n_dims <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return qtype


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    # As llama.cpp: F16 / F32 stay as they are, anything else (BF16) goes through F32.
    if t.dtype not in (torch.float16, torch.float32):
        t = t.to(torch.float32)
    return t.contiguous().numpy()


def check_name(name: str) -> str:
    """`name` when it can be a file name stem (`--name`, or the checkpoint folder's name), else a RerankerError."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise RerankerError(f"--name {name!r} cannot be a file name stem (it names the output files, e.g. "
                            f"{name}-F16.gguf); give a name without '/', '\\' or NUL, such as jina-reranker-m0")
    return name


def make_output_folder(out_dir: Path) -> Path:
    """`out_dir`, made when missing; a RerankerError when it is a file or cannot be made."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RerankerError(f"the output {out_dir} is a file, not a folder; give a folder for -o (the files are named "
                            "after the model)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission, a read-only file system
        raise RerankerError(f"cannot make the output folder {out_dir} ({e.strerror or e}); give another folder for -o") from e
    return out_dir


_LEVELS = {t[2] for t in MMPROJ_TYPES.values()} | {"BF16"}


@contextlib.contextmanager
def written(path: Path) -> Iterator[Path]:
    """`atomic_path(path)` for the converters' outputs: a write error (a full disk) is a RerankerError naming `path`."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as e:
        raise RerankerError(f"cannot write {path} ({e.strerror or e}); free some space there, or give another folder for -o") from e


def _projector_model(file_name: str) -> str:
    """The model name in a projector's file name: `mmproj-<name>-<TYPE>.gguf` -> name."""
    stem = file_name[len("mmproj-"):] if file_name.lower().startswith("mmproj-") else file_name
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    base, _, level = stem.rpartition("-")
    return base if base and level.upper() in _LEVELS else stem


@dataclass(frozen=True)
class MmprojPlan:
    """What `write_mmproj` writes, every input read and checked: no file is written before a plan exists."""

    checkpoint: Path
    mmproj_type: str
    name: str
    cfg: dict
    vision: dict
    pre: dict
    depth: int
    #: (gguf name, stored name, file, index into it, out type, shape), in the file's order
    tensors: list[tuple[str, str, Path, tuple, gguf.GGMLQuantizationType, list[int]]]

    @property
    def file_name(self) -> str:
        return mmproj_name(self.name, self.mmproj_type)


def plan_mmproj(checkpoint: str | Path, mmproj_type: str = "f16", name: str | None = None) -> MmprojPlan | None:
    """Read and check what the projector of `checkpoint` needs; None without `visual.*` weights."""
    checkpoint = Path(checkpoint)
    if mmproj_type not in MMPROJ_TYPES:
        raise RerankerError(f"--mmproj-type {mmproj_type!r} is not one of {', '.join(MMPROJ_TYPES)}")
    sources = list(_visual_names(checkpoint))
    if not sources:
        return None
    config_path = checkpoint / "config.json"
    cfg = read_json(config_path)
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict):
        raise RerankerError(f"{config_path} has no vision_config, but the weights hold visual.* tensors")
    if cfg.get("model_type") != "qwen2_vl" or "embed_dim" not in vision:
        raise RerankerError(f"{checkpoint}: model_type {cfg.get('model_type')!r} with vision_config keys {sorted(vision)}; "
                            "only the Qwen2-VL vision tower (model_type 'qwen2_vl', vision_config.embed_dim) converts")
    require_positive_ints(vision, ("depth", "patch_size", "embed_dim", "hidden_size", "num_heads"), f"{config_path}'s vision_config")
    require_positive_ints({**cfg, **cfg.get("text_config", {})}, ("hidden_size",), str(config_path))
    pre_path = checkpoint / "preprocessor_config.json"
    if not pre_path.is_file():
        raise RerankerError(f"no preprocessor_config.json in {checkpoint}: the vision projector needs its image_mean / "
                            "image_std (copy it from the Hub checkpoint, jinaai/jina-reranker-m0)")
    pre = read_json(pre_path)
    if isinstance(pre.get("image_processor"), dict):  # a processor_config.json-style nesting
        pre = {**pre, **pre["image_processor"]}
    for key in ("image_mean", "image_std"):
        if not isinstance(pre.get(key), list) or not all(isinstance(v, (int, float)) for v in pre[key]):
            raise RerankerError(f"{pre_path} has no {key} list of numbers; copy it from the Hub checkpoint, jinaai/jina-reranker-m0")
    qtype, ftype, _ = MMPROJ_TYPES[mmproj_type]
    depth = int(vision["depth"])
    name = check_name(name or checkpoint.resolve().name)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, depth)

    plan = []  # (gguf name, stored name, file, index into it, out type, shape)
    for hub, src, file in sources:
        with open_safetensors(file) as f:
            shape = list(f.get_slice(src).get_shape())
        for part, part_shape, index in _split(hub, shape):
            gname = part if part.startswith("v.") else tmap.get_name(part, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise RerankerError(f"{src}: no llama.cpp projector name for {part!r} (vision depth {depth}); "
                                    "not a Qwen2-VL vision tower?")
            otype = _out_type(gname, len(part_shape), qtype, ftype)
            if otype == gguf.GGMLQuantizationType.Q8_0 and part_shape[-1] % gguf.GGML_QUANT_SIZES[otype][0]:
                otype = gguf.GGMLQuantizationType.F16  # as llama.cpp: rows Q8_0 blocks do not divide fall back
            plan.append((gname, src, file, index, otype, part_shape))
    return MmprojPlan(checkpoint, mmproj_type, name, cfg, vision, pre, depth, plan)


def _check_folder(out_dir: Path, plan: MmprojPlan) -> None:
    """Refuse a folder holding another model's projector: mtmd takes the one projector beside a GGUF."""
    others = sorted(p.name for p in out_dir.glob("mmproj*.gguf") if _projector_model(p.name) != plan.name)
    if others:
        raise RerankerError(f"{out_dir} holds {others[0]}, another model's vision projector; {plan.file_name} beside it would "
                            "leave the folder's GGUFs with two projectors: convert into another folder (or remove that model's "
                            "files first)")


def write_mmproj(plan: MmprojPlan, out_dir: str | Path) -> Path:
    """Write `plan`'s projector, `mmproj-<name>-<TYPE>.gguf`, into `out_dir`; returns its path."""
    out_dir = make_output_folder(Path(out_dir))
    _check_folder(out_dir, plan)
    cfg, vision, pre, depth = plan.cfg, plan.vision, plan.pre, plan.depth
    text = {**cfg, **cfg.get("text_config", {})}
    _, ftype, _ = MMPROJ_TYPES[plan.mmproj_type]
    path = out_dir / plan.file_name
    # Into a temporary file renamed over `path` when whole: an interrupted conversion leaves no half file under its
    # name, and a process mapping the old file keeps it.
    with written(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
        for gname, _src, _file, _index, otype, part_shape in plan.tensors:
            if otype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if otype == gguf.GGMLQuantizationType.F32 else np.float16
                w.add_tensor_info(gname, part_shape, np.dtype(dtype), int(np.prod(part_shape)) * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(part_shape, otype)
                w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=otype)

        total, shared, expert, n_expert = w.get_total_parameter_count()
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name(plan.name)
        w.add_size_label(gguf.size_label(total, shared, expert, n_expert))
        w.add_file_type(ftype)
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(int(text["hidden_size"]))
        w.add_vision_image_size(int(vision.get("image_size", _DEFAULT_IMAGE_SIZE)))
        w.add_vision_patch_size(int(vision["patch_size"]))
        w.add_vision_embedding_length(int(vision["embed_dim"]))
        # llama.cpp's Qwen2-VL rule: vision_config.hidden_size (the merger's output width) becomes the
        # "feed_forward_length" key; mtmd only logs it (the FFN widths come from the tensors).
        w.add_vision_feed_forward_length(int(vision["hidden_size"]))
        w.add_vision_block_count(depth)
        w.add_vision_head_count(int(vision["num_heads"]))
        w.add_vision_image_mean(list(pre["image_mean"]))
        w.add_vision_image_std(list(pre["image_std"]))
        w.add_clip_projector_type(gguf.VisionProjectorType.QWEN2VL)
        w.add_vision_attention_layernorm_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _gname, src, file, index, otype, _shape in plan.tensors:  # one tensor in memory at a time
            with open_safetensors(file) as f:
                arr = _as_numpy(f.get_tensor(src)[index] if index else f.get_tensor(src))
            w.write_tensor_data(gguf.quants.quantize(arr, otype))
        w.close()
    log.info("wrote %s", path)
    return path


def convert_mmproj(checkpoint: str | Path, out_dir: str | Path, mmproj_type: str = "f16",
                   name: str | None = None) -> Path | None:
    """Write `mmproj-<name>-<TYPE>.gguf` into `out_dir`; None (nothing written) without `visual.*` weights."""
    plan = plan_mmproj(checkpoint, mmproj_type, name)
    return None if plan is None else write_mmproj(plan, out_dir)
