"""Synthetic jina-reranker-m0 checkpoints in the original Hugging Face layout.

The real weights cannot be downloaded here, so :func:`synth_checkpoint` writes a directory that looks
like ``jinaai/jina-reranker-m0`` (language model, score head and Qwen2-VL vision tower):

* ``config.json``: flat Qwen2-VL config (old transformers style), ``architectures =
  ["JinaVLForRanking"]``, ``model_type = "qwen2_vl"``, M-RoPE ``rope_scaling``, a ``vision_config``;
* ``model.safetensors``: ``model.embed_tokens.weight`` [151936, H], ``model.layers.N.*``,
  ``model.norm.weight``, ``score.0.{weight,bias}`` [H, H] / [H], ``score.2.{weight,bias}`` [1, H] / [1];
  no ``lm_head`` (tied embeddings); then the vision tower under ``visual.*`` (Conv3D patch embedding,
  ``blocks.N.*`` with fused ``attn.qkv``, the ``merger`` to H), unless ``vision=False``;
* ``preprocessor_config.json``: Qwen2-VL's image processor (CLIP mean / std, patch 14, temporal
  patch 2, merge 2) with the pixel limits jina-reranker-m0 scores at (3136 .. 602112);
* the real Qwen2-VL tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
  ``merges.txt``) from :mod:`reranker.synth.qwen_vocab`.

Weights are random but seeded (one ``torch.Generator`` per tensor, seeded from ``seed`` and the tensor
name), scaled so that different inputs give clearly different last hidden states. The score head is
calibrated on a few random prompts run through the generated backbone (a small built-in torch
forward of the Qwen2 text model) so that ``sigmoid(score(h) - 2.65)`` spreads over roughly
(0.05, 0.95) instead of saturating.

The safetensors file is written by streaming, tensor by tensor (and the embedding in row chunks), so
the ``m0`` preset (1.54 B parameters, 3.1 GB in bf16) needs well under 2 GB of RAM.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from reranker.defaults import LOGIT_BIAS, SCORE_TOKEN_ID
from reranker.errors import RerankerError
from reranker.synth.qwen_vocab import SPECIAL_START_ID, special_token_ids, write_qwen2_tokenizer

__all__ = ["Preset", "PRESETS", "preprocessor_config_dict", "synth_checkpoint", "tensor_shapes", "vision_tensor_shapes"]

VOCAB_SIZE = 151_936  # 151,643 BPE + 14 special + padding rows


@dataclass(frozen=True)
class Preset:
    """Shapes of a synthetic checkpoint (and its default storage dtype)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, int, int]
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    vocab_size: int = VOCAB_SIZE
    # Qwen2-VL-2B's vision tower (jina-reranker-m0's); the merger always projects to hidden_size.
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_num_heads: int = 16

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{self.name}: hidden_size not divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.name}: num_attention_heads not divisible by num_key_value_heads")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"{self.name}: mrope_section must sum to head_dim/2 = {self.head_dim // 2}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {sorted(_DTYPES)}")
        if self.vision_embed_dim % self.vision_num_heads or (self.vision_embed_dim // self.vision_num_heads) % 4:
            # llama.cpp's Qwen2-VL vision rope splits each head into 4 sections
            raise ValueError(f"{self.name}: vision head dim (vision_embed_dim / vision_num_heads) must be a multiple of 4")
        if self.vision_depth < 3:
            # llama.cpp's converter names the merger's `mlp.2` as block 2 of the projector (mm.{bid},
            # bid < depth): a shallower tower cannot be converted by it
            raise ValueError(f"{self.name}: vision_depth must be at least 3 (llama.cpp maps visual.merger.mlp.2 to mm.2)")


PRESETS: dict[str, Preset] = {
    # Unit tests: every row size is a multiple of 32 (Q8_0 / Q4_0 / Q5_x quantize); not K-quant friendly.
    # Vision: 3 blocks of width 32, 2 heads of 16 (the least llama.cpp's converter and vision rope take).
    "tiny": Preset("tiny", 64, 128, 2, 4, 2, (2, 3, 3), vision_depth=3, vision_embed_dim=32, vision_num_heads=2),
    # CPU benchmarks: every row size (512, 1536) is a multiple of 256, so all K-quants apply.
    "small": Preset("small", 512, 1536, 4, 8, 2, (8, 12, 12), vision_depth=4, vision_embed_dim=256, vision_num_heads=4),
    # The real jina-reranker-m0 shapes (1.54 B parameters in the language model, Qwen2-VL-2B's
    # 665 M parameter vision tower).
    "m0": Preset("m0", 1536, 8960, 28, 12, 2, (16, 24, 24), dtype="bfloat16"),
}

_DTYPES = {
    "float32": (torch.float32, "F32"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
}

# Initialisation gains (std = gain / sqrt(fan_in) for the linear layers).
_EMBED_STD = 1.0
_NORM_NOISE = 0.1
_QK_GAIN = 1.0  # larger gains make attention near one-hot: chaotic, Q8_0 then moves states ~10%
_VO_GAIN = 1.0
_MLP_GAIN = 1.0
_BIAS_STD = 0.05
_HEAD_BIAS_STD = 0.1
_TARGET_LOGIT_STD = 1.3  # of score(h) - LOGIT_BIAS over the calibration prompts
_EMBED_CHUNK_ROWS = 8192


def config_dict(p: Preset) -> dict:
    """``config.json`` of the checkpoint (flat Qwen2-VL fields, as jinaai/jina-reranker-m0 has)."""
    ids = special_token_ids()
    return {
        "architectures": ["JinaVLForRanking"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(p.mrope_section)},
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": p.dtype,
        "transformers_version": "4.47.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": p.vision_depth,
            "embed_dim": p.vision_embed_dim,
            "mlp_ratio": 4,
            "num_heads": p.vision_num_heads,
            "in_chans": 3,
            "hidden_size": p.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "vocab_size": p.vocab_size,
        # Not read by transformers; records how the checkpoint was made.
        "synthetic": {"preset": p.name, "logit_bias": LOGIT_BIAS, "score_token_id": SCORE_TOKEN_ID},
    }


# Qwen2-VL's image processor as jina-reranker-m0 uses it: the OpenAI CLIP mean / std, and the pixel
# limits its modeling code passes to AutoProcessor (4 .. 768 merged 28x28 tokens per image).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 3136
MAX_PIXELS = 602112


def preprocessor_config_dict() -> dict:
    """``preprocessor_config.json``: Qwen2-VL's image processor at jina-reranker-m0's pixel limits."""
    return {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }


def vision_tensor_shapes(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """The vision tower's keys and shapes (Hub names, ``visual.*``), in file order."""
    E, M, H = p.vision_embed_dim, p.vision_embed_dim * 4, p.hidden_size  # mlp_ratio 4
    merged = E * 4  # spatial_merge_size 2: 2x2 patches concatenated
    out: list[tuple[str, tuple[int, ...]]] = [("visual.patch_embed.proj.weight", (E, 3, 2, 14, 14))]
    for i in range(p.vision_depth):
        pre = f"visual.blocks.{i}."
        out += [
            (pre + "norm1.weight", (E,)),
            (pre + "norm1.bias", (E,)),
            (pre + "norm2.weight", (E,)),
            (pre + "norm2.bias", (E,)),
            (pre + "attn.qkv.weight", (3 * E, E)),
            (pre + "attn.qkv.bias", (3 * E,)),
            (pre + "attn.proj.weight", (E, E)),
            (pre + "attn.proj.bias", (E,)),
            (pre + "mlp.fc1.weight", (M, E)),
            (pre + "mlp.fc1.bias", (M,)),
            (pre + "mlp.fc2.weight", (E, M)),
            (pre + "mlp.fc2.bias", (E,)),
        ]
    out += [
        ("visual.merger.ln_q.weight", (E,)),
        ("visual.merger.ln_q.bias", (E,)),
        ("visual.merger.mlp.0.weight", (merged, merged)),
        ("visual.merger.mlp.0.bias", (merged,)),
        ("visual.merger.mlp.2.weight", (H, merged)),
        ("visual.merger.mlp.2.bias", (H,)),
    ]
    return out


def tensor_shapes(p: Preset, vision: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint keys and shapes, in file order (the vision tower last, unless ``vision=False``)."""
    H, F = p.hidden_size, p.intermediate_size
    q_out = p.num_attention_heads * p.head_dim
    kv_out = p.num_key_value_heads * p.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (p.vocab_size, H))]
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}."
        out += [
            (pre + "input_layernorm.weight", (H,)),
            (pre + "self_attn.q_proj.weight", (q_out, H)),
            (pre + "self_attn.q_proj.bias", (q_out,)),
            (pre + "self_attn.k_proj.weight", (kv_out, H)),
            (pre + "self_attn.k_proj.bias", (kv_out,)),
            (pre + "self_attn.v_proj.weight", (kv_out, H)),
            (pre + "self_attn.v_proj.bias", (kv_out,)),
            (pre + "self_attn.o_proj.weight", (H, q_out)),
            (pre + "post_attention_layernorm.weight", (H,)),
            (pre + "mlp.gate_proj.weight", (F, H)),
            (pre + "mlp.up_proj.weight", (F, H)),
            (pre + "mlp.down_proj.weight", (H, F)),
        ]
    out += [
        ("model.norm.weight", (H,)),
        ("score.0.weight", (H, H)),
        ("score.0.bias", (H,)),
        ("score.2.weight", (1, H)),
        ("score.2.bias", (1,)),
    ]
    return out + (vision_tensor_shapes(p) if vision else [])


# ----------------------------------------------------------------------------------------------
# random tensors


def _gen(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _randn(seed: int, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    t = torch.randn(shape, generator=_gen(seed, name), dtype=torch.float32)
    t.mul_(std)
    if mean:
        t.add_(mean)
    return t


def _layer_tensor(p: Preset, seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    H, F = p.hidden_size, p.intermediate_size
    leaf = name.split(".", 3)[-1]  # e.g. "self_attn.q_proj.weight"
    if leaf.endswith("layernorm.weight"):
        return _randn(seed, name, shape, _NORM_NOISE, 1.0)
    if leaf.endswith(".bias"):
        return _randn(seed, name, shape, _BIAS_STD)
    gains = {
        "self_attn.q_proj.weight": (_QK_GAIN, H),
        "self_attn.k_proj.weight": (_QK_GAIN, H),
        "self_attn.v_proj.weight": (_VO_GAIN, H),
        "self_attn.o_proj.weight": (_VO_GAIN, shape[1]),
        "mlp.gate_proj.weight": (_MLP_GAIN, H),
        "mlp.up_proj.weight": (_MLP_GAIN, H),
        "mlp.down_proj.weight": (_MLP_GAIN, F),
    }
    gain, fan_in = gains[leaf]
    return _randn(seed, name, shape, gain / math.sqrt(fan_in))


def _vision_tensor(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Scaled like the language model (std = 1 / sqrt(fan_in)), so that pixels normalised to ~N(0, 1)
    come out of the merger at the text embeddings' scale and different images give different tokens."""
    if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
        return _randn(seed, name, shape, _NORM_NOISE, 1.0)
    if name.endswith(".bias"):
        return _randn(seed, name, shape, _BIAS_STD)
    fan_in = math.prod(shape[1:])
    return _randn(seed, name, shape, 1.0 / math.sqrt(fan_in))


# ----------------------------------------------------------------------------------------------
# a minimal Qwen2 text forward (1-D positions; M-RoPE reduces to plain RoPE for text) used only to
# calibrate the score head


class _Calib:
    """Runs calibration prompts through the layers as they are generated."""

    def __init__(self, p: Preset, seqs: list[list[int]]):
        self.p = p
        self.seqs = seqs
        self.x = torch.empty(0)
        hd = p.head_dim
        inv_freq = 1.0 / (1e6 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        n = max(len(s) for s in seqs)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        self.cos, self.sin = ang.cos().float(), ang.sin().float()

    def embed(self, rows: dict[int, torch.Tensor]) -> None:
        # all sequences concatenated: [T, H]; linear layers run on all tokens at once
        self.x = torch.stack([rows[t] for s in self.seqs for t in s]).float()

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def _rope(self, x: torch.Tensor) -> torch.Tensor:  # x [heads, n, hd]
        n, half = x.shape[1], x.shape[2] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[:n] + rot * self.sin[:n]

    def layer(self, w: dict[str, torch.Tensor]) -> None:
        p = self.p
        nh, nkv, hd = p.num_attention_heads, p.num_key_value_heads, p.head_dim
        x = self.x
        a = self._norm(x, w["input_layernorm.weight"])
        q_all = a @ w["self_attn.q_proj.weight"].T + w["self_attn.q_proj.bias"]
        k_all = a @ w["self_attn.k_proj.weight"].T + w["self_attn.k_proj.bias"]
        v_all = a @ w["self_attn.v_proj.weight"].T + w["self_attn.v_proj.bias"]
        outs = []
        start = 0
        for s in self.seqs:
            n = len(s)
            sl = slice(start, start + n)
            start += n
            q = q_all[sl].view(n, nh, hd).transpose(0, 1)
            k = k_all[sl].view(n, nkv, hd).transpose(0, 1)
            v = v_all[sl].view(n, nkv, hd).transpose(0, 1)
            q, k = self._rope(q), self._rope(k)
            k = k.repeat_interleave(nh // nkv, dim=0)
            v = v.repeat_interleave(nh // nkv, dim=0)
            sc = (q @ k.transpose(1, 2)) / math.sqrt(hd)
            sc = sc.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            outs.append((sc.softmax(-1) @ v).transpose(0, 1).reshape(n, nh * hd))
        x = x + torch.cat(outs) @ w["self_attn.o_proj.weight"].T
        m = self._norm(x, w["post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(m @ w["mlp.gate_proj.weight"].T) * (m @ w["mlp.up_proj.weight"].T)
        self.x = x + g @ w["mlp.down_proj.weight"].T

    def last_hidden(self, norm_w: torch.Tensor) -> torch.Tensor:
        ends = torch.tensor([len(s) for s in self.seqs]).cumsum(0) - 1
        return self._norm(self.x[ends], norm_w)


# Qwen2 ids of "**Document**:\n" and "\n**Query**:\n" (the jina-reranker-m0 prompt scaffold).
_DOC_IDS = [334, 7524, 334, 510]
_QUERY_IDS = [198, 334, 2859, 334, 510]


def _calibration_prompts(p: Preset, seed: int, n: int = 16) -> list[list[int]]:
    """Prompt-shaped id sequences: "**Document**:\n" doc "\n**Query**:\n" query <score token>,
    with random doc / query ids drawn log-uniformly (frequent low ranks, like real text)."""
    g = _gen(seed, "calibration")

    def words(k: int) -> list[int]:
        u = torch.rand(k, generator=g, dtype=torch.float64)
        return (torch.exp(u * math.log(SPECIAL_START_ID)).long() - 1).clamp(0, SPECIAL_START_ID - 1).tolist()

    seqs = []
    for _ in range(n):
        nd = int(torch.randint(2, 48, (1,), generator=g))
        nq = int(torch.randint(1, 12, (1,), generator=g))
        seqs.append(_DOC_IDS + words(nd) + _QUERY_IDS + words(nq) + [SCORE_TOKEN_ID])
    return seqs


def _score_head(p: Preset, seed: int, h: torch.Tensor, dt: torch.dtype) -> dict[str, torch.Tensor]:
    """Random score MLP whose output logit (minus LOGIT_BIAS) is ~N(0, 1.3^2) over ``h``."""
    H = p.hidden_size
    w1 = _randn(seed, "score.0.weight", (H, H), 1.0 / math.sqrt(H)).to(dt)
    b1 = _randn(seed, "score.0.bias", (H,), _HEAD_BIAS_STD).to(dt)
    r = torch.relu(h @ w1.float().T + b1.float())
    u = _randn(seed, "score.2.weight", (1, H), 1.0)
    raw = (r @ u.T)[:, 0]
    std = float(raw.std())
    if not math.isfinite(std) or std < 1e-6:
        std = float(u.norm()) or 1.0
    w2 = (u * (_TARGET_LOGIT_STD / std)).to(dt)
    logits = (r @ w2.float().T)[:, 0]
    b2 = torch.tensor([LOGIT_BIAS - float(logits.mean())], dtype=torch.float32).to(dt)
    return {"score.0.weight": w1, "score.0.bias": b1, "score.2.weight": w2, "score.2.bias": b2}


# ----------------------------------------------------------------------------------------------
# streaming safetensors writer


def _header(shapes: list[tuple[str, tuple[int, ...]]], st_dtype: str, itemsize: int) -> bytes:
    meta: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
    off = 0
    for name, shape in shapes:
        n = math.prod(shape) * itemsize
        meta[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write(f: BinaryIO, t: torch.Tensor) -> None:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        f.write(t.view(torch.int16).numpy().tobytes())
    else:
        f.write(t.numpy().tobytes())


def _embedding_chunks(p: Preset, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    name = "model.embed_tokens.weight"
    for start in range(0, p.vocab_size, _EMBED_CHUNK_ROWS):
        rows = min(_EMBED_CHUNK_ROWS, p.vocab_size - start)
        yield start, _randn(seed, f"{name}[{start}]", (rows, p.hidden_size), _EMBED_STD)


def synth_checkpoint(
    out_dir: Path | str,
    preset: str | Preset = "tiny",
    seed: int = 0,
    *,
    dtype: str | None = None,
    tokenizer: bool = True,
    vision: bool = True,
) -> Path:
    """Write a synthetic jina-reranker-m0 checkpoint into ``out_dir`` and return its path.

    ``preset`` is a key of :data:`PRESETS` (``"tiny"``, ``"small"``, ``"m0"``) or a :class:`Preset`.
    ``dtype`` overrides the preset's storage dtype (``"float32"``, ``"bfloat16"``, ``"float16"``);
    ``config.json``'s ``torch_dtype`` follows it. Same ``(preset, seed, dtype, vision)`` -> same bytes.
    ``vision=False`` leaves the ``visual.*`` tensors out (a text-only checkpoint; the ``m0`` tower
    alone is 665 M parameters). The language-model and head tensors do not depend on ``vision``.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if dtype is not None:
        p = Preset(**{**asdict(p), "dtype": dtype, "mrope_section": tuple(p.mrope_section)})
    p.validate()
    dt, st_dtype = _DTYPES[p.dtype]
    itemsize = torch.empty((), dtype=dt).element_size()

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RerankerError(f"the output {out} is a file, not a folder; give a folder for the checkpoint (-o)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission, a read-only file system
        raise RerankerError(f"cannot make the checkpoint folder {out} ({e.strerror or e}); give another folder (-o)") from e
    (out / "config.json").write_text(json.dumps(config_dict(p), indent=2) + "\n", encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_dict(), indent=2) + "\n",
                                                  encoding="utf-8")
    if tokenizer:
        write_qwen2_tokenizer(out)

    shapes = tensor_shapes(p, vision=vision)
    calib = _Calib(p, _calibration_prompts(p, seed))
    needed = {t for s in calib.seqs for t in s}
    tmp = out / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(_header(shapes, st_dtype, itemsize))
        rows: dict[int, torch.Tensor] = {}
        for start, chunk in _embedding_chunks(p, seed):
            chunk = chunk.to(dt)
            _write(f, chunk)
            for t in needed:
                if start <= t < start + chunk.shape[0]:
                    rows[t] = chunk[t - start].float().clone()
            del chunk
        calib.embed(rows)
        for i in range(p.num_hidden_layers):
            pre = f"model.layers.{i}."
            w: dict[str, torch.Tensor] = {}
            for name, shape in shapes:
                if name.startswith(pre):
                    t = _layer_tensor(p, seed, name, shape).to(dt)
                    _write(f, t)
                    w[name[len(pre) :]] = t.float()
            calib.layer(w)
            del w
        norm = _randn(seed, "model.norm.weight", (p.hidden_size,), _NORM_NOISE, 1.0).to(dt)
        _write(f, norm)
        head = _score_head(p, seed, calib.last_hidden(norm.float()), dt)
        for name in ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"):
            _write(f, head[name])
        for name, shape in shapes:
            if name.startswith("visual."):
                _write(f, _vision_tensor(seed, name, shape).to(dt))
    tmp.replace(out / "model.safetensors")
    return out
