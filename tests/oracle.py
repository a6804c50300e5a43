"""Independent reference for every engine path: the checkpoint run by transformers, prompts built here.

Nothing here imports the library under test (`reranker`, `head`): the prompt template, the scoring
token and the logit bias are written out again, the prompt is tokenised by the `tokenizers` library
from the checkpoint's own ``tokenizer.json``, the backbone is transformers' Qwen2-VL and the head is
the checkpoint's ``score.*`` MLP in float64 numpy.

``load_text_model(checkpoint_dir)`` builds ``Qwen2VLTextModel`` (transformers 5) from the flat
Qwen2-VL ``config.json`` of a jina-reranker-m0 style checkpoint and loads the ``model.*`` tensors of
``model.safetensors`` strictly (prefix stripped; the ``score.*`` head is ignored), in float32, eval
mode, eager attention. ``last_hidden(model, ids)`` returns the final-norm hidden state of the last
token as float64 numpy, i.e. ``hidden_states[-1][:, -1]`` of JinaVLForRanking, the vector the score
head reads. ``score_head(checkpoint_dir)`` / ``head_scores`` apply the checkpoint's score MLP.
``Oracle`` bundles the three: pairs -> prompt ids -> hidden states -> scores.

The tolerances every oracle comparison uses are stated once, below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

# JinaVLForRanking's constants and prompt (the model card's modeling code), written out again here
# so that a change to the library's copies in reranker/defaults.py cannot move the reference.
LOGIT_BIAS = 2.65
SCORE_TOKEN_ID = 100
PROMPT = "**Document**:\n{doc}\n**Query**:\n{query}"
MAX_LENGTH = 10240
MAX_QUERY_LENGTH = 512

# --- tolerances, stated once ---------------------------------------------------------------------
# Measured on the tiny synthetic model (seed 0), the 12 PAIRS, llama.cpp 0.3.36 on a 2-core AVX2 CPU
# (tests/api/test_paths_oracle.py prints each path's errors under `pytest -s`):
#   F32 GGUF (F32 KV cache, no flash attention), every path: hidden state <= 7.5e-7 relative (L2),
#     score <= 9.4e-7. The bound, 1e-5, is ~13x that and still fails on an F32 GGUF run with an F16
#     cache and flash attention (1.4e-4 hidden, 1.9e-4 score) and on a logit shifted by 0.004 (a
#     score moves by s(1 - s) 0.004 >= 2.7e-4 on these pairs).
#   F16 GGUF (F16 KV cache, flash attention): hidden <= 7.2e-4, score <= 9.0e-4; on the 40 longer
#     mixed pairs of test_deterministic (up to 578 tokens) hidden <= 9.6e-4, score <= 7.1e-4.
#     Bound 2e-3 for both (2x; F16 rounding errors do not shrink with more headroom to spare).
#   BF16 re-encode of an F16 GGUF (activations rounded to bf16 in the mat-muls), on test_bf16's
#     bf16 checkpoint: hidden <= 2.6e-3, score <= 6.8e-3 (README: up to 7.6e-3 on other random
#     weights). Bounds 1e-2 hidden, 2e-2 score.
# A missing scoring token, a wrong template or another model is off by 1e-1 or more.
HIDDEN_RTOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2}
SCORE_ATOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2}


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


def hf_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """The checkpoint's own ``tokenizer.json`` in the `tokenizers` library, user text kept as text.

    The one deliberate departure from the original: there, a special-token string inside a query
    or document (``<|box_end|>``, ``<|endoftext|>``) became that special token; this project scores
    it as the text it is (README, "How a pair is scored"), so the reference does too.
    """
    tok = Tokenizer.from_file(str(Path(checkpoint_dir) / "tokenizer.json"))
    tok.encode_special_tokens = True
    return tok


def prompt_ids(tokenizer: Tokenizer, query: str, doc: str, max_length: int = MAX_LENGTH,
               max_query_length: int = MAX_QUERY_LENGTH, max_doc_length: int | None = None) -> list[int]:
    """Prompt ids as the original ``JinaVLForRanking.compute_score`` builds them.

    The document is cut to ``max_doc_length`` tokens (default ``max(max_length - max_query_length,
    max_query_length)``) and decoded back to text, the prompt is tokenised and cut from the right
    at ``max_length - 1`` tokens, then the scoring token 100 is appended. (The library's rule is
    stricter for long queries; the two agree on every prompt that needs no cut.)
    """
    if max_doc_length is None:
        max_doc_length = max(max_length - max_query_length, max_query_length)
    doc_ids = tokenizer.encode(doc).ids
    if len(doc_ids) >= max_doc_length:
        doc = tokenizer.decode(doc_ids[:max_doc_length])
    ids = tokenizer.encode(PROMPT.format(doc=doc, query=query)).ids
    return ids[: max_length - 1] + [SCORE_TOKEN_ID]


class Oracle:
    """Pairs -> prompt ids -> transformers hidden states -> the checkpoint head's scores (float64)."""

    def __init__(self, checkpoint_dir: str | Path, model: torch.nn.Module | None = None) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model = model if model is not None else load_text_model(checkpoint_dir)
        self.tokenizer = hf_tokenizer(checkpoint_dir)
        self.head = score_head(checkpoint_dir)
        self._hidden: dict[tuple[int, ...], np.ndarray] = {}

    def ids(self, query: str, doc: str, **limits) -> list[int]:
        return prompt_ids(self.tokenizer, query, doc, **limits)

    def hidden_of_ids(self, seqs) -> np.ndarray:
        out = []
        for ids in seqs:
            key = tuple(ids)
            if key not in self._hidden:
                self._hidden[key] = last_hidden(self.model, key)
            out.append(self._hidden[key])
        return np.stack(out)

    def hidden(self, pairs, **limits) -> np.ndarray:
        return self.hidden_of_ids([self.ids(q, d, **limits) for q, d in pairs])

    def scores(self, pairs, **limits) -> np.ndarray:
        return head_scores(self.head, self.hidden(pairs, **limits))


def rel_err(got, want) -> np.ndarray:
    """Relative L2 error of each row of `got` against `want`."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


def assert_hidden_close(got, want, dtype: str = "f32", what: str = "hidden states") -> float:
    """Every row within HIDDEN_RTOL[dtype] relative (L2) of the reference's; returns the worst error."""
    err = rel_err(got, want)
    worst = float(err.max())
    assert worst < HIDDEN_RTOL[dtype], f"{what}: relative error {worst:.3g} >= {HIDDEN_RTOL[dtype]:g} ({dtype}); per row {err}"
    return worst


def assert_scores_close(got, want, dtype: str = "f32", what: str = "scores") -> float:
    """Every score within SCORE_ATOL[dtype] of the reference's; returns the worst difference."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    worst = float(diff.max())
    assert worst < SCORE_ATOL[dtype], f"{what}: |difference| {worst:.3g} >= {SCORE_ATOL[dtype]:g} ({dtype}); per pair {diff}"
    return worst


# --- the vision tower ------------------------------------------------------------------------------


def load_vl_model(checkpoint_dir: str | Path) -> torch.nn.Module:
    """transformers' ``Qwen2VLForConditionalGeneration`` with the whole checkpoint (float32, eval, eager).

    The Hub layout (``model.*`` language model, ``visual.*`` vision tower) is renamed as vLLM does for
    the current class: ``visual.`` -> ``model.visual.``, ``model.`` -> ``model.language_model.``; the
    ``score.*`` head is not part of it. Strict but for ``lm_head.weight``, tied to the embedding.
    """
    from safetensors.torch import load_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig.from_pretrained(str(checkpoint_dir))
    config._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(config)
    state = {}
    for k, v in load_file(str(Path(checkpoint_dir) / "model.safetensors")).items():
        if k.startswith("visual."):
            state["model." + k] = v.float()
        elif k.startswith("model."):
            state["model.language_model." + k[len("model."):]] = v.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.float().eval()


def image_processor(checkpoint_dir: str | Path):
    """The checkpoint's own ``preprocessor_config.json`` in transformers' Qwen2-VL image processor."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(checkpoint_dir))


@torch.inference_mode()
def image_embeddings(model: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> np.ndarray:
    """The merger's output for one image, [merged tokens, hidden], float64: what replaces ``<|image_pad|>``."""
    out = model.model.get_image_features(pixel_values, grid_thw)
    emb = getattr(out, "pooler_output", out)
    if isinstance(emb, (list, tuple)):
        emb = torch.cat(list(emb))
    return emb.double().numpy()
