"""The rebuilt Qwen2-VL tokenizer (reranker.synth.qwen_vocab) and the synthetic checkpoints (reranker.synth.random_checkpoint)."""

from __future__ import annotations

import json
import random
import unicodedata
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest

from reranker.defaults import LOGIT_BIAS, SCORE_TOKEN_ID
from reranker.synth import qwen_vocab
from reranker.synth.random_checkpoint import PRESETS, synth_checkpoint, tensor_shapes, vision_tensor_shapes

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like tea? We'Ve a'lL",
    "我想在apple工作1314151天～ 今天天气很好，阳光明媚。",
    "大熊猫是中国特有的熊科动物，主要栖息在四川、陕西和甘肃的山区。",
    "مرحبا بالعالم! هذه جملة باللغة العربية مع أرقام ١٢٣ و 456.",
    "Привет, мир! нещо на Български",
    "日本語のテキスト、カタカナとひらがな。한국어 문장도 있습니다.",
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👩‍👩‍👧‍👦",
    "def f(x):\n    return [i ** 2 for i in range(x) if i % 3 == 0]  # squares\n",
    "fn main() {\n\tlet v: Vec<u8> = vec![1, 2, 3];\n\tprintln!(\"{:?}\", v);\n}\r\n",
    "<html><body class=\"x\">&nbsp;&lt;tag&gt;</body></html>",
    "   leading spaces and trailing spaces   ",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3",
    "''''''```````\"\"\"\"......!!!!!!?????? ------=======",
    "Cafe\u0301 vs Café, A\u030a vs Å (NFC normalisation)",
    "**Document**:\nWe present ReaderLM-v2\n**Query**:\nslm markdown",
    "**Document**:\n<|vision_start|><|image_pad|><|vision_end|>\n**Query**:\nwhat is shown?<|box_end|>",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "x" * 300 + " " + "ab" * 100,
    "line1\r\nline2\rline3\n\n\nline4",
    "",
]

# llama.cpp's convert_hf_to_gguf.py pre-tokenizer check string and the hash it has for "qwen2"
# (ref: Qwen/Qwen1.5-7B, the same vocabulary and pre-tokenizer as Qwen2 / Qwen2-VL).
LLAMA_CPP_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated)"
    " ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～"
    " ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there,"
    " 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
LLAMA_CPP_QWEN2_HASH = "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qwen2_tok")
    qwen_vocab.write_qwen2_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    return tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def reference():
    """tiktoken with the same ranks, regex and special tokens (+ NFC, as Qwen2's normalizer)."""
    enc = tiktoken.Encoding(
        "qwen2-reference",
        pat_str=qwen_vocab.QWEN2_PAT,
        mergeable_ranks=qwen_vocab.load_ranks(),
        special_tokens=qwen_vocab.special_token_ids(),
    )
    return lambda text: enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return synth_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_ranks_and_merges():
    ranks = qwen_vocab.load_ranks()
    assert len(ranks) == 151_643
    inv = {r: t for t, r in ranks.items()}
    assert inv[100] == b"\xa7"  # the score token's text: byte 0xA7 ("§" in the byte-level map)
    assert all(len(inv[r]) == 1 for r in range(256))
    merges = qwen_vocab.qwen2_merges()
    assert len(merges) == 151_643 - 256
    assert merges[:4] == (("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("i", "n"), ("Ġ", "t"))
    vocab = qwen_vocab.qwen2_vocab()
    assert vocab["§"] == 100 and vocab["Hello"] == 9707 and vocab["Ġworld"] == 1879
    assert all(a + b in vocab for a, b in merges[:1000])


def test_tokenizer_json_loads_with_specials(hf_tok):
    assert hf_tok.get_vocab_size(with_added_tokens=True) == 151_657
    for i, t in enumerate(qwen_vocab.SPECIAL_TOKENS):
        assert hf_tok.token_to_id(t) == 151_643 + i
        assert hf_tok.encode(t).ids == [151_643 + i]
    assert hf_tok.token_to_id("<|box_end|>") == 151_649
    assert hf_tok.id_to_token(100) == "§"
    assert hf_tok.encode("Hello world").ids == [9707, 1879]
    tj = json.loads(qwen_vocab.qwen2_tokenizer_json_text())
    assert tj["normalizer"] == {"type": "NFC"}
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == qwen_vocab.QWEN2_PAT
    assert [a["id"] for a in tj["added_tokens"]] == list(range(151_643, 151_657))
    assert all(a["special"] for a in tj["added_tokens"])


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken_reference(hf_tok, reference, text):
    ids = hf_tok.encode(text).ids
    assert ids == reference(text)
    assert hf_tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def test_matches_reference_on_random_text(hf_tok, reference):
    rng = random.Random(1234)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能",
        "абвгдежзийклмнопрстуфхцчшщъыьэюя",
        "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
        "αβγδεζηθικλμνξοπρστυφχψω",
        "éèêëàâäôöûüçñßøå\u0301\u0308",
        "😀😁🚀🦙✅👍🏽\u200d️",
    ]
    texts = []
    for _ in range(300):
        n = rng.randint(1, 80)
        texts.append("".join(rng.choice(rng.choice(pools)) for _ in range(n)))
    for text, enc in zip(texts, hf_tok.encode_batch(texts)):
        assert enc.ids == reference(text), text


def test_llama_cpp_pretokenizer_hash(hf_tok):
    """llama.cpp identifies the pre-tokenizer by hashing the ids of a check string: ours is "qwen2"."""
    chkhsh = sha256(str(hf_tok.encode(LLAMA_CPP_CHKTXT).ids).encode()).hexdigest()
    assert chkhsh == LLAMA_CPP_QWEN2_HASH


def test_tokenizer_config_and_slow_files(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["bos_token"] is None and cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == "<|endoftext|>" and cfg["model_max_length"] == 32768
    assert cfg["added_tokens_decoder"]["151649"]["content"] == "<|box_end|>"
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151_643 and vocab["§"] == 100
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and len(lines) == 1 + 151_387


def test_transformers_autotokenizer(tok_dir, hf_tok):
    transformers = pytest.importorskip("transformers")
    at = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert at.convert_tokens_to_ids("<|box_end|>") == 151_649
    assert at.eos_token == "<|im_end|>" and at.pad_token == "<|endoftext|>"
    assert at.bos_token is None
    for text in TEXTS:
        assert at.encode(text, add_special_tokens=True) == hf_tok.encode(text).ids, text
    assert sha256(str(at.encode(LLAMA_CPP_CHKTXT)).encode()).hexdigest() == LLAMA_CPP_QWEN2_HASH


# ---------------------------------------------------------------------------------------------
# presets and checkpoint layout


def test_presets():
    real = PRESETS["m0"]
    assert (real.hidden_size, real.num_hidden_layers, real.num_attention_heads) == (1536, 28, 12)
    assert (real.num_key_value_heads, real.intermediate_size, real.mrope_section) == (2, 8960, (16, 24, 24))
    n_lm = sum(int(np.prod(s)) for k, s in tensor_shapes(real) if k.startswith("model."))
    assert 1.50e9 < n_lm < 1.56e9  # "1.54 B in the language model"
    for p in PRESETS.values():
        p.validate()
        assert 2 * sum(p.mrope_section) == p.head_dim
        rows = {s[-1] for k, s in tensor_shapes(p) if len(s) == 2}
        assert all(r % 32 == 0 for r in rows), p.name  # Q8_0 / Q4_0 blocks
    assert all(s[-1] % 256 == 0 for k, s in tensor_shapes(PRESETS["small"]) if len(s) == 2)
    assert all(s[-1] % 256 == 0 for k, s in tensor_shapes(PRESETS["m0"]) if len(s) == 2)
    assert PRESETS["tiny"].head_dim == 16 and PRESETS["small"].head_dim == 64
    # Qwen2-VL-2B's vision tower: 32 blocks of 1280 (16 heads), merger 5120 -> 1536
    assert (real.vision_depth, real.vision_embed_dim, real.vision_num_heads) == (32, 1280, 16)
    vis = dict(vision_tensor_shapes(real))
    assert vis["visual.merger.mlp.2.weight"] == (1536, 5120) and vis["visual.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert sum(int(np.prod(s)) for s in vis.values()) == 665_271_296
    assert [k for k, _ in tensor_shapes(real, vision=False)] == [k for k, _ in tensor_shapes(real) if not k.startswith("visual.")]


@pytest.mark.parametrize("change, match", [
    ({"vision_depth": 2}, "vision_depth must be at least 3"),  # llama.cpp's converter maps merger.mlp.2 to mm.2
    ({"vision_num_heads": 16}, "multiple of 4"),  # head dim 2: llama.cpp's vision rope takes 4 sections
])
def test_vision_shapes_llama_cpp_cannot_take_are_refused(change, match):
    from dataclasses import replace

    replace(PRESETS["tiny"], vision_depth=3, vision_num_heads=8).validate()  # the limits themselves are fine
    with pytest.raises(ValueError, match=match):
        replace(PRESETS["tiny"], **change).validate()


def test_checkpoint_layout(tiny_dir):
    from safetensors import safe_open

    p = PRESETS["tiny"]
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["JinaVLForRanking"] and cfg["model_type"] == "qwen2_vl"
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert cfg["vocab_size"] == 151_936 and cfg["tie_word_embeddings"] is True
    assert cfg["image_token_id"] == 151_655 and cfg["vision_start_token_id"] == 151_652
    assert cfg["hidden_size"] == 64 and cfg["num_key_value_heads"] == 2
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tiny_dir / f).is_file()
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.get_tensor("model.norm.weight").dtype.is_floating_point
    assert shapes == dict(tensor_shapes(p))
    assert shapes["model.embed_tokens.weight"] == (151_936, 64)
    assert shapes["score.0.weight"] == (64, 64) and shapes["score.2.weight"] == (1, 64)
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (32,)
    assert not any(k.startswith("lm_head") for k in shapes)
    assert shapes["visual.patch_embed.proj.weight"] == (32, 3, 2, 14, 14)  # Conv3D: temporal patch 2, patch 14
    assert shapes["visual.blocks.2.attn.qkv.weight"] == (96, 32) and shapes["visual.merger.mlp.2.weight"] == (64, 128)
    assert {k for k in shapes if k.startswith("visual.")} == {k for k, _ in vision_tensor_shapes(p)}
    assert cfg["vision_config"]["depth"] == 3 and cfg["vision_config"]["hidden_size"] == 64
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"], pre["patch_size"], pre["merge_size"]) == (3136, 602112, 14, 2)
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP
    assert pre["image_std"] == [0.26862954, 0.26130258, 0.27577711]


def test_vision_false_leaves_the_text_tensors_as_they_are(tmp_path, tiny_dir):
    """The vision tower is an addition: every language-model and head tensor is the same with or without it."""
    from safetensors.torch import load_file

    text = synth_checkpoint(tmp_path / "text", "tiny", seed=0, tokenizer=False, vision=False)
    st, sv = load_file(str(text / "model.safetensors")), load_file(str(tiny_dir / "model.safetensors"))
    assert set(st) == {k for k in sv if not k.startswith("visual.")} and not any(k.startswith("visual.") for k in st)
    for k, t in st.items():
        assert t.dtype == sv[k].dtype and t.numpy().tobytes() == sv[k].numpy().tobytes(), k


def test_autoconfig_parses(tiny_dir):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.from_pretrained(str(tiny_dir))
    tc = getattr(cfg, "text_config", cfg)
    assert tc.hidden_size == 64 and tc.num_hidden_layers == 2
    assert tc.rope_parameters["mrope_section"] == [2, 3, 3]


def test_determinism_and_dtype(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    a = synth_checkpoint(tmp_path / "a", "tiny", seed=0, tokenizer=False)
    b = synth_checkpoint(tmp_path / "b", "tiny", seed=1, tokenizer=False)
    assert (a / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert not np.allclose(sa["model.layers.0.mlp.up_proj.weight"], sb["model.layers.0.mlp.up_proj.weight"])
    c = synth_checkpoint(tmp_path / "c", "tiny", seed=0, dtype="bfloat16", tokenizer=False)
    sc = load_file(str(c / "model.safetensors"))
    assert json.loads((c / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(str(t.dtype) == "torch.bfloat16" for t in sc.values())
    # bf16 is the rounded float32 tensor (embedding and layers; the score head is recalibrated)
    e32, e16 = sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"].float()
    assert float((e32 - e16).abs().max()) < 0.02 * float(e32.abs().max())


def test_weight_statistics(tiny_dir):
    from safetensors.torch import load_file

    sd = load_file(str(tiny_dir / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    assert 0.9 < float(emb.std()) < 1.1
    assert 0.8 < float(sd["model.norm.weight"].mean()) < 1.2
    for k, t in sd.items():
        assert bool(t.isfinite().all()), k
        if k.endswith(".bias"):
            assert float(t.abs().max()) > 0, k


# ---------------------------------------------------------------------------------------------
# transformers oracle on the tiny checkpoint


def test_oracle_hidden_states_and_head(tiny_dir, hf_tok):
    pytest.importorskip("transformers")
    from oracle import head_scores, last_hidden, load_text_model, score_head

    model = load_text_model(tiny_dir)
    pairs = [
        ("what is a panda?", "The giant panda is a bear species endemic to China."),
        ("what is a panda?", "Paris is the capital of France."),
        ("capital of france", "Paris is the capital of France."),
        ("how to sort a list in python", "Use sorted(xs) or xs.sort()."),
        ("天气怎么样", "今天天气很好，阳光明媚。"),
        ("مرحبا", "مرحبا بالعالم"),
        ("x", "y"),
        ("what is a panda?", "The giant panda is a bear species endemic to China. " * 10),
    ]
    H = []
    for q, d in pairs:
        ids = hf_tok.encode(f"**Document**:\n{d}\n**Query**:\n{q}").ids + [SCORE_TOKEN_ID]
        H.append(last_hidden(model, ids))
    H = np.stack(H)
    assert H.dtype == np.float64 and H.shape == (len(pairs), 64)
    assert np.isfinite(H).all()
    n = H / np.linalg.norm(H, axis=1, keepdims=True)
    cos = n @ n.T
    off = cos[~np.eye(len(pairs), dtype=bool)]
    assert off.max() < 0.97, cos  # clearly different last hidden states
    # the same input gives the same state
    assert np.array_equal(last_hidden(model, [1, 2, 3, SCORE_TOKEN_ID]), last_hidden(model, [1, 2, 3, SCORE_TOKEN_ID]))

    s = head_scores(score_head(tiny_dir), H)
    assert np.isfinite(s).all()
    assert ((s > 0.02) & (s < 0.98)).all(), s  # not saturated
    assert s.max() - s.min() > 0.15, s  # spread
    assert LOGIT_BIAS == 2.65


def test_transformers_loads_the_vision_tower(tiny_dir):
    """Qwen2VLForConditionalGeneration takes the whole checkpoint (renamed as vLLM does) and the image processor
    its preprocessor_config.json: one image comes out of the merger as (h/28)(w/28) tokens of the text width."""
    pytest.importorskip("transformers")
    from oracle import image_embeddings, image_processor, load_vl_model
    from PIL import Image

    model = load_vl_model(tiny_dir)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    proc = image_processor(tiny_dir)
    rng = np.random.default_rng(0)
    grids = {}
    for h, w in [(56, 84), (10, 10), (1000, 1000), (28, 2000)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        inputs = proc(images=[image], return_tensors="pt")
        t, gh, gw = inputs["image_grid_thw"][0].tolist()
        grids[(h, w)] = (gh, gw)
        assert t == 1 and 3136 <= gh * gw * 14 * 14 <= 602112, (h, w, gh, gw)  # jina-reranker-m0's pixel limits
        if gh * gw > 1024:
            continue  # the processor's limit is the point; eager attention over 11664 patches is not (1 GB)
        emb = image_embeddings(model, inputs["pixel_values"], inputs["image_grid_thw"])
        assert emb.shape == (gh * gw // 4, 64) and np.isfinite(emb).all()
        assert 0.3 < emb.std() < 3.0, emb.std()  # at the text embeddings' scale (std 1), neither dead nor exploding
    assert grids[(56, 84)] == (4, 6) and grids[(10, 10)] == (4, 4) and grids[(1000, 1000)] == (54, 54)
