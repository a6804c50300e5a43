"""An original jina-reranker-m0 checkpoint -> the release's GGUF backbone + `mlp_weights.npz`
(+ the vision projector `mmproj-<name>-<TYPE>.gguf` when the checkpoint has a vision tower).

Mirrors how the release was built: llama.cpp's `qwen2vl` text model (the layout of
convert_hf_to_gguf.py), the Qwen2 gpt2/qwen2 BPE vocabulary with `<|box_end|>` and the
text of id 100 swapped, and the scoring head dumped beside it. The projector is
reranker.gguf.mmproj's; the language-model file does not depend on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import torch

from head import ScoringHead
from reranker.defaults import HEAD_FILE, ORIGINAL_BOX_END_ID, SCORE_TOKEN_ID
from reranker.errors import RerankerError
from reranker.gguf.mmproj import MMPROJ_TYPES, check_name, make_output_folder, plan_mmproj, write_mmproj, written
from reranker.gguf.quantize import level_in_name
from reranker.gguf.safetensors_files import open_safetensors, read_json, require_positive_ints, safetensors_files

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


_LAYER_SOURCES = {v: k for k, v in _LAYER_NAMES.items()}  # GGUF suffix -> the checkpoint's layer tensor name
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
_CONFIG_FIX = "download the checkpoint again (its config.json must be the model's own)"


def _read_config(checkpoint: Path) -> dict:
    """config.json's text-model fields (newer transformers nest them in text_config), checked."""
    path = checkpoint / "config.json"
    if not path.is_file():
        raise RerankerError(f"no config.json in {checkpoint}: expected a jina-reranker-m0 style checkpoint directory")
    cfg = read_json(path, _CONFIG_FIX)
    text = cfg.get("text_config")
    cfg = {**cfg, **(text if isinstance(text, dict) else {})}
    keys = (*_TEXT_KEYS, "num_key_value_heads") if "num_key_value_heads" in cfg else _TEXT_KEYS
    require_positive_ints(cfg, keys, str(path), _CONFIG_FIX)
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise RerankerError(f"{path}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads "
                            f"{cfg['num_attention_heads']}; {_CONFIG_FIX}")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    sections = rope.get("mrope_section") if isinstance(rope, dict) else None
    if not sections or not isinstance(sections, list) or not all(isinstance(x, int) for x in sections):
        raise RerankerError(f"{path} has no rope_scaling.mrope_section: not a Qwen2-VL config")
    return cfg


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """GGUF name -> the checkpoint's shape (rows first) of every language-model tensor config.json implies."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    q = cfg["num_attention_heads"] * head_dim
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    layer = {"attn_norm.weight": (hidden,), "attn_q.weight": (q, hidden), "attn_q.bias": (q,), "attn_k.weight": (kv, hidden),
             "attn_k.bias": (kv,), "attn_v.weight": (kv, hidden), "attn_v.bias": (kv,), "attn_output.weight": (hidden, q),
             "ffn_norm.weight": (hidden,), "ffn_gate.weight": (inter, hidden), "ffn_up.weight": (inter, hidden),
             "ffn_down.weight": (hidden, inter)}
    shapes = {"token_embd.weight": (vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}": v for k, v in layer.items()})
    shapes["output_norm.weight"] = (hidden,)
    return shapes


def _source_name(gname: str, prefix: str) -> str:
    """The checkpoint's name of a GGUF tensor (for messages)."""
    if gname == "token_embd.weight":
        return prefix + "embed_tokens.weight"
    if gname == "output_norm.weight":
        return prefix + "norm.weight"
    _, idx, tail = gname.split(".", 2)
    return f"{prefix}layers.{idx}.{_LAYER_SOURCES[tail]}"


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _plan_tensors(checkpoint: Path, cfg: dict) -> list[tuple[str, str, Path, list[int]]]:
    """(checkpoint name, GGUF name, file, shape) of the language-model tensors, in the GGUF's order; a RerankerError
    naming what is missing, extra or misshapen against config.json, before anything is written."""
    found: dict[str, tuple[str, Path, list[int], str]] = {}
    for file in safetensors_files(checkpoint):
        with open_safetensors(file) as f:
            for name in f.keys():
                gname = gguf_tensor_name(name)
                if gname is None:
                    continue
                if gname in found:
                    raise RerankerError(f"{checkpoint}: {name} is stored twice ({found[gname][1].name} and {file.name}); "
                                        "download the checkpoint again")
                piece = f.get_slice(name)
                found[gname] = (name, file, list(piece.get_shape()), piece.get_dtype())
    if not found:
        raise RerankerError(f"{checkpoint} holds no language-model tensors (model.layers.*, model.embed_tokens.*)")
    prefix = "model.language_model." if any(n.startswith("model.language_model.") for n, *_ in found.values()) else "model."
    expected = _expected_shapes(cfg)
    config = checkpoint / "config.json"
    problems = []
    missing = [_source_name(g, prefix) for g in expected if g not in found]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_listing(missing)}")
    extra = [found[g][0] for g in found if g not in expected]
    if extra:
        problems.append(f"{len(extra)} tensor(s) config.json has no place for: {_listing(extra)}")
    shaped = [f"{n} is {list(shape)}, expected {list(expected[g])}" for g, (n, _, shape, _) in found.items()
              if g in expected and tuple(shape) != expected[g]]
    if shaped:
        problems.append(_listing(shaped))
    typed = [f"{n} ({dtype})" for n, _, _, dtype in found.values() if dtype not in _FLOAT_DTYPES]
    if typed:
        problems.append(f"not floating point: {_listing(typed)}")
    if problems:
        raise RerankerError(f"{checkpoint} does not match its {config} (hidden_size {cfg['hidden_size']}, "
                            f"num_hidden_layers {cfg['num_hidden_layers']}, intermediate_size {cfg['intermediate_size']}, "
                            f"vocab_size {cfg['vocab_size']}): {'; '.join(problems)}; the checkpoint is incomplete or "
                            "damaged (a shard missing?): download it again")
    return [(n, g, file, shape) for g, (n, file, shape, _) in sorted(found.items(), key=lambda kv: _tensor_order(kv[0]))]


def _read_head(checkpoint: Path, cfg: dict) -> ScoringHead:
    """The checkpoint's scoring head (score.*), checked against config.json's hidden size."""
    head = ScoringHead.from_checkpoint(checkpoint)  # a HeadLoadError (a RerankerError) names what is wrong
    if head.hidden_size != cfg["hidden_size"]:
        raise RerankerError(f"{checkpoint}: the scoring head (score.*) has hidden size {head.hidden_size}, but "
                            f"config.json says {cfg['hidden_size']}; the head belongs to another model: download the "
                            "checkpoint again")
    return head


def _load(file: Path, name: str) -> torch.Tensor:
    with open_safetensors(file) as f:
        return f.get_tensor(name)


def _encode(t: torch.Tensor, outtype: str) -> np.ndarray:
    arr = t.to(torch.float32).numpy()
    # As convert_hf_to_gguf.py: 1-D tensors (norms, biases) stay F32.
    if arr.ndim == 1 or outtype == "f32":
        return arr
    if outtype == "f16":
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16)


_TOKENIZER_FIX = "copy the checkpoint's tokenizer files (tokenizer.json) from jinaai/jina-reranker-m0"


def _vocab(checkpoint: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise RerankerError(f"no tokenizer.json in {checkpoint}; the converter needs the Qwen2 tokenizer files")
    tok = read_json(path, _TOKENIZER_FIX)
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    try:
        for text, idx in tok["model"]["vocab"].items():
            tokens[idx] = text
            types[idx] = int(gguf.TokenType.NORMAL)
        for added in tok.get("added_tokens", []):
            tokens[added["id"]] = added["content"]
            types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        what = f"an id past vocab_size {vocab_size}" if isinstance(e, IndexError) else f"{type(e).__name__}: {e}"
        raise RerankerError(f"{path} is not a Qwen2 BPE tokenizer (model.vocab, model.merges, added_tokens; {what}); "
                            f"{_TOKENIZER_FIX}") from e
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
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

    Everything is read and checked before a file is written (config.json, the tensors' names and shapes against
    it, the head, the tokenizer, the projector's inputs); each file is written under a temporary name and renamed
    when whole. A folder holding another model's GGUF is refused: the head file beside it is shared.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if outtype not in OUTTYPES:
        raise RerankerError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if mmproj_type is not None and mmproj_type not in MMPROJ_TYPES:
        raise RerankerError(f"--mmproj-type {mmproj_type!r} is not one of {', '.join(MMPROJ_TYPES)}")
    cfg = _read_config(checkpoint)
    qtype, ftype, type_name = OUTTYPES[outtype]
    name = check_name(name or checkpoint.resolve().name)
    tensors = _plan_tensors(checkpoint, cfg)
    head = _read_head(checkpoint, cfg)  # before any file is written: no GGUF without its head
    tokens, types, merges = _vocab(checkpoint, cfg["vocab_size"])
    projector = plan_mmproj(checkpoint, mmproj_type, name) if mmproj_type is not None else None
    out_dir = make_output_folder(out_dir)
    gguf_path = out_dir / f"{name}-{type_name}.gguf"
    npz_path = out_dir / HEAD_FILE
    check_folder(out_dir, name, head, gguf_path)
    # Into a temporary file renamed over the GGUF when whole: an interrupted conversion leaves no half file under
    # its name, and a process mapping the old file keeps it (rewriting it in place crashed such a process).
    with written(gguf_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "qwen2vl")
        _write_metadata(w, cfg, name, ftype)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(int(cfg.get("bos_token_id", 151643)))
        w.add_eos_token_id(int(cfg.get("eos_token_id", 151645)))
        w.add_pad_token_id(151643)
        w.add_add_bos_token(False)

        for _hf_name, gname, _file, shape in tensors:
            out_type = gguf.GGMLQuantizationType.F32 if len(shape) == 1 or outtype == "f32" else qtype
            nbytes = int(np.prod(shape)) * (4 if out_type == gguf.GGMLQuantizationType.F32 else 2)
            dtype = np.float16 if out_type == gguf.GGMLQuantizationType.F16 else np.float32
            if out_type == gguf.GGMLQuantizationType.BF16:
                w.add_tensor_info(gname, [*shape[:-1], shape[-1] * 2], np.dtype(np.uint8), nbytes, raw_dtype=out_type)
            else:
                w.add_tensor_info(gname, shape, np.dtype(dtype), nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for hf_name, _gname, file, _shape in tensors:  # one tensor in memory at a time
            w.write_tensor_data(_encode(_load(file, hf_name), outtype))
        w.close()

    try:
        head.save_npz(npz_path)  # itself written under a temporary name
    except OSError as e:
        raise RerankerError(f"cannot write {npz_path} ({e.strerror or e}); free some space there, or give another folder for -o") from e
    log.info("wrote %s and %s", gguf_path, npz_path)
    if projector is not None:
        write_mmproj(projector, out_dir)
    return gguf_path, npz_path


def model_name(file_name: str) -> str:
    """The model a GGUF file name is of: `<name>-<LEVEL>.gguf` (any level llama.cpp names) -> name."""
    stem = file_name[: -len(".gguf")] if file_name.lower().endswith(".gguf") else file_name
    level = level_in_name(file_name)
    return stem[: -len(level) - 1] if level and len(stem) > len(level) else stem


def _same_head(a: ScoringHead, b: ScoringHead) -> bool:
    x, y = a.weights(), b.weights()
    return np.float32(x.logit_bias) == np.float32(y.logit_bias) and all(
        torch.equal(getattr(x, k).float(), getattr(y, k).float()) for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))


def check_folder(out_dir: Path, name: str, head: ScoringHead, gguf_path: Path) -> None:
    """Refuse to give another model's GGUF in `out_dir` this checkpoint's head: every GGUF there scores with the
    one `mlp_weights.npz` beside it. The same model's other levels (the same head) are welcome."""
    others = sorted(p.name for p in out_dir.glob("*.gguf") if p != gguf_path and not p.name.lower().startswith("mmproj"))
    if not others:
        return
    npz_path = out_dir / HEAD_FILE
    fix = "convert into another folder (or remove that model's files first)"
    if npz_path.is_file():
        try:
            same = _same_head(ScoringHead.load(npz_path), head)
        except RerankerError:  # unreadable: not the head of this checkpoint either
            same = False
        if not same:
            raise RerankerError(f"{out_dir} holds {others[0]} with another head ({npz_path.name}): this checkpoint's head "
                                f"would replace it, and {others[0]} would score with it, silently wrong; {fix}")
        return
    strangers = [o for o in others if model_name(o) != name]
    if strangers:
        raise RerankerError(f"{out_dir} holds {strangers[0]}, another model's GGUF (without its {HEAD_FILE}): this "
                            f"checkpoint's head written beside it would become its head, silently wrong; {fix}")


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
    sections = list(rope["mrope_section"])  # checked by _read_config
    w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
