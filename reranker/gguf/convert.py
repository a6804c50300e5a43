"""An original jina-reranker-m0 checkpoint -> the release's GGUF backbone + `mlp_weights.npz`
(+ the vision projector `mmproj-<name>-<TYPE>.gguf` when the checkpoint has a vision tower).

Mirrors how the release was built: llama.cpp's `qwen2vl` text model (the layout of
convert_hf_to_gguf.py), the Qwen2 gpt2/qwen2 BPE vocabulary with `<|box_end|>` and the
text of id 100 swapped, and the scoring head dumped beside it. The projector is
reranker.gguf.mmproj's; the language-model file does not depend on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from head import ScoringHead
from reranker.atomic import atomic_path
from reranker.defaults import HEAD_FILE, ORIGINAL_BOX_END_ID, SCORE_TOKEN_ID
from reranker.errors import RerankerError
from reranker.gguf.mmproj import MMPROJ_TYPES, convert_mmproj
from reranker.gguf.safetensors_files import safetensors_files

log = logging.getLogger(__name__)

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32, "F32"),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16, "F16"),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16, "BF16"),
}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a language-model tensor; None for tensors the GGUF leaves out."""
    for prefix in ("model.language_model.", "model."):
        if hf_name.startswith(prefix):
            rest = hf_name[len(prefix):]
            break
    else:
        return None  # visual.*, score.*, lm_head.*
    if rest == "embed_tokens.weight":
        return "token_embd.weight"
    if rest == "norm.weight":
        return "output_norm.weight"
    if rest.startswith("layers."):
        _, idx, tail = rest.split(".", 2)
        if tail in _LAYER_NAMES:
            return f"blk.{idx}.{_LAYER_NAMES[tail]}"
    if rest.startswith("visual."):
        return None
    raise RerankerError(f"unexpected language-model tensor {hf_name!r}: not a Qwen2-VL checkpoint?")


def _iter_tensors(checkpoint: Path) -> Iterator[tuple[str, str, Path]]:
    for file in safetensors_files(checkpoint):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                gname = gguf_tensor_name(name)
                if gname is not None:
                    yield name, gname, file


def _load(file: Path, name: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name)


def _encode(t: torch.Tensor, outtype: str) -> np.ndarray:
    arr = t.to(torch.float32).numpy()
    # As convert_hf_to_gguf.py: 1-D tensors (norms, biases) stay F32.
    if arr.ndim == 1 or outtype == "f32":
        return arr
    if outtype == "f16":
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16)


def _vocab(checkpoint: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise RerankerError(f"no tokenizer.json in {checkpoint}; the converter needs the Qwen2 tokenizer files")
    tok = json.loads(path.read_text(encoding="utf-8"))
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, idx in tok["model"]["vocab"].items():
        tokens[idx] = text
        types[idx] = int(gguf.TokenType.NORMAL)
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    if tokens[ORIGINAL_BOX_END_ID] != "<|box_end|>":
        raise RerankerError(f"{path}: id {ORIGINAL_BOX_END_ID} is {tokens[ORIGINAL_BOX_END_ID]!r}, expected '<|box_end|>'")
    # The release's swap: the string `<|box_end|>` (a control token) moves onto the scoring
    # id 100, so "...<|box_end|>" tokenises to the token the model was trained to score on.
    for lst in (tokens, types):
        lst[SCORE_TOKEN_ID], lst[ORIGINAL_BOX_END_ID] = lst[ORIGINAL_BOX_END_ID], lst[SCORE_TOKEN_ID]
    return tokens, types, merges


def convert(checkpoint: str | Path, out_dir: str | Path, outtype: str = "f16", name: str | None = None,
            mmproj_type: str | None = "f16") -> tuple[Path, Path]:
    """Write `<name>-<TYPE>.gguf` and `mlp_weights.npz` into `out_dir`; returns both paths.

    With `visual.*` weights in the checkpoint, also writes `mmproj-<name>-<MMPROJ_TYPE>.gguf` there
    (reranker.gguf.mmproj.convert_mmproj; `mmproj_type` f32, f16 or q8_0; None skips it).
    """

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if outtype not in OUTTYPES:
        raise RerankerError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if mmproj_type is not None and mmproj_type not in MMPROJ_TYPES:
        raise RerankerError(f"--mmproj-type {mmproj_type!r} is not one of {', '.join(MMPROJ_TYPES)}")
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise RerankerError(f"no config.json in {checkpoint}: expected a jina-reranker-m0 style checkpoint directory")
    cfg = json.loads(config_path.read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}  # newer transformers nest the text fields
    qtype, ftype, type_name = OUTTYPES[outtype]
    name = name or checkpoint.resolve().name
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = out_dir / f"{name}-{type_name}.gguf"

    tensors = sorted(_iter_tensors(checkpoint), key=lambda t: _tensor_order(t[1]))
    if not tensors:
        raise RerankerError(f"{checkpoint} holds no language-model tensors (model.layers.*, model.embed_tokens.*)")
    head = ScoringHead.from_checkpoint(checkpoint)  # before any file is written: no GGUF without its head
    npz_path = out_dir / HEAD_FILE
    _check_head_not_shared(out_dir, npz_path, head, gguf_path)
    # Into a temporary file renamed over the GGUF when whole: an interrupted conversion leaves no half file under
    # its name, and a process mapping the old file keeps it (rewriting it in place crashed such a process).
    with atomic_path(gguf_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "qwen2vl")
        _write_metadata(w, cfg, name, ftype)
        tokens, types, merges = _vocab(checkpoint, int(cfg["vocab_size"]))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(int(cfg.get("bos_token_id", 151643)))
        w.add_eos_token_id(int(cfg.get("eos_token_id", 151645)))
        w.add_pad_token_id(151643)
        w.add_add_bos_token(False)

        with_meta = []
        for hf_name, gname, file in tensors:
            with safe_open(file, framework="pt") as f:
                shape = list(f.get_slice(hf_name).get_shape())
            out_type = gguf.GGMLQuantizationType.F32 if len(shape) == 1 or outtype == "f32" else qtype
            nbytes = int(np.prod(shape)) * (4 if out_type == gguf.GGMLQuantizationType.F32 else 2)
            dtype = np.float16 if out_type == gguf.GGMLQuantizationType.F16 else np.float32
            if out_type == gguf.GGMLQuantizationType.BF16:
                w.add_tensor_info(gname, [*shape[:-1], shape[-1] * 2], np.dtype(np.uint8), nbytes, raw_dtype=out_type)
            else:
                w.add_tensor_info(gname, shape, np.dtype(dtype), nbytes)
            with_meta.append((hf_name, file))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for hf_name, file in with_meta:  # one tensor in memory at a time
            w.write_tensor_data(_encode(_load(file, hf_name), outtype))
        w.close()

    head.save_npz(npz_path)
    log.info("wrote %s and %s", gguf_path, npz_path)
    if mmproj_type is not None:
        convert_mmproj(checkpoint, out_dir, mmproj_type, name)
    return gguf_path, npz_path


def _check_head_not_shared(out_dir: Path, npz_path: Path, head: ScoringHead, gguf_path: Path) -> None:
    """Refuse to replace the head of another model's GGUF in `out_dir`: every GGUF there would score with this one."""
    others = sorted(p.name for p in out_dir.glob("*.gguf") if p != gguf_path and not p.name.startswith("mmproj"))
    if not others or not npz_path.is_file():
        return
    try:
        old = ScoringHead.load(npz_path).weights()
    except RerankerError:
        old = None
    new = head.weights()
    same = old is not None and np.float32(old.logit_bias) == np.float32(new.logit_bias) and all(
        torch.equal(getattr(old, k).float(), getattr(new, k).float()) for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
    if not same:
        raise RerankerError(f"{out_dir} holds {others[0]} with another head ({npz_path.name}): this checkpoint's head would "
                            f"replace it, and {others[0]} would score with it, silently wrong; convert into another folder "
                            "(or remove that model's files first)")


def _tensor_order(gname: str) -> tuple[int, str]:
    if gname.startswith("blk."):
        return int(gname.split(".")[1]) + 1, gname
    return (0 if gname == "token_embd.weight" else 10**9), gname


def _write_metadata(w: gguf.GGUFWriter, cfg: dict, name: str, ftype: gguf.LlamaFileType) -> None:
    w.add_name(name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 32768)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 1e6)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    sections = list(rope.get("mrope_section", []))
    if not sections:
        raise RerankerError("config.json has no rope_scaling.mrope_section: not a Qwen2-VL config")
    w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
