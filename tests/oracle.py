"""Independent reference for the backbone: the checkpoint's language model run by transformers.

``load_text_model(checkpoint_dir)`` builds ``Qwen2VLTextModel`` (transformers 5) from the flat
Qwen2-VL ``config.json`` of a jina-reranker-m0 style checkpoint and loads the ``model.*`` tensors of
``model.safetensors`` strictly (prefix stripped; the ``score.*`` head is ignored), in float32, eval
mode, eager attention. ``last_hidden(model, ids)`` returns the final-norm hidden state of the last
token as float64 numpy, i.e. ``hidden_states[-1][:, -1]`` of JinaVLForRanking, the vector the score
head reads. ``score_head(checkpoint_dir)`` / ``head_scores`` apply the checkpoint's score MLP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

LOGIT_BIAS = 2.65


def text_config(checkpoint_dir: str | Path):
    """``Qwen2VLTextConfig`` from the flat ``config.json`` fields."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    rope = dict(cfg.get("rope_scaling") or {})
    rope.pop("type", None)
    rope.update({"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 1e6))})
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "attention_dropout",
        "bos_token_id",
        "eos_token_id",
    )
    kw = {k: cfg[k] for k in keys if k in cfg}
    return Qwen2VLTextConfig(**kw, rope_parameters=rope, use_cache=False, tie_word_embeddings=False)


def load_text_model(checkpoint_dir: str | Path) -> torch.nn.Module:
    """transformers' Qwen2-VL text model with the checkpoint's ``model.*`` weights (float32, eval)."""
    from safetensors.torch import load_file
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    config = text_config(checkpoint_dir)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = Qwen2VLTextModel(config)
    sd = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    state = {k[len("model.") :]: v.float() for k, v in sd.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    # non-persistent buffers (rotary inv_freq) were created on meta: rebuild them for real
    model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.float().eval()


@torch.inference_mode()
def last_hidden(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """Final-norm hidden state of the last token of ``ids`` (one unpadded sequence), float64."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    return out.last_hidden_state[0, -1].double().numpy()


def score_head(checkpoint_dir: str | Path) -> dict[str, np.ndarray]:
    """``score.0.weight``, ``score.0.bias``, ``score.2.weight``, ``score.2.bias`` as float64."""
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint_dir) / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).double().numpy() for k in f.keys() if k.startswith("score.")}


def head_scores(head: dict[str, np.ndarray], h: np.ndarray) -> np.ndarray:
    """``sigmoid(score(h) - 2.65)`` for ``h`` of shape [..., H] (JinaVLForRanking)."""
    z = np.maximum(h @ head["score.0.weight"].T + head["score.0.bias"], 0.0)
    logit = z @ head["score.2.weight"].T + head["score.2.bias"]
    return 1.0 / (1.0 + np.exp(-(logit[..., 0] - LOGIT_BIAS)))
