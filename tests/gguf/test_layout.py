"""`reranker.gguf.layout` and the fast path's copy, against gguf-py's own reader and writer."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from helpers import gguf_py_identity_copy, write_gguf

from reranker import RerankerError
from reranker.engine.identity import with_identity_output
from reranker.gguf.layout import read_layout

N_EMBD, N_VOCAB = 32, 48


def model_gguf(path, *, file_type=gguf.LlamaFileType.MOSTLY_F16, lossy=False, alignment=None, output=False):
    """A small GGUF with every kind of entry a release file has (strings, arrays of strings, ints, floats, bools)."""
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((N_VOCAB, N_EMBD)).astype(np.float32)
    exact = (exact.view(np.uint32) & 0xFFFF0000).view(np.float32).astype(np.float16)  # bf16 values, f16-exact here
    attn = exact[:N_EMBD].copy()
    if lossy:
        attn[3, 5] = np.float16(1.0009765625)  # 1 + 2^-10: not in BF16
    kv = {"general.name": "tiny model ✓", "general.file_type": int(file_type), "qwen2vl.embedding_length": N_EMBD,
          "qwen2vl.rope.dimension_sections": [2, 3, 3, 0], "qwen2vl.attention.layer_norm_rms_epsilon": 1e-6,
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"tok{i}\n é" for i in range(N_VOCAB)],
          "tokenizer.ggml.merges": ["a b", "c d"], "tokenizer.ggml.add_bos_token": False}
    if alignment:
        kv["general.alignment"] = alignment
    tensors = {"token_embd.weight": exact, "blk.0.attn_q.weight": attn,
               "blk.0.attn_norm.weight": rng.standard_normal(N_EMBD).astype(np.float32)}
    if file_type == gguf.LlamaFileType.ALL_F32:
        tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    if output:
        tensors["output.weight"] = exact
    return write_gguf(path, kv, tensors, alignment=alignment)


CASES = {
    "f16-bf16": (dict(), "f32", True),
    "f16-lossy-bf16": (dict(lossy=True), "f32", True),
    "f16-plain": (dict(lossy=True), "f16", False),
    "f32": (dict(file_type=gguf.LlamaFileType.ALL_F32), "f16", False),
    "tied-output-replaced": (dict(output=True), "f32", True),
    "aligned-64": (dict(alignment=64), "f32", True),
}


@pytest.mark.parametrize("case", CASES)
def test_copy_is_byte_identical_to_gguf_pys(tmp_path, case):
    make, dtype, bf16 = CASES[case]
    src = model_gguf(tmp_path / "m-F16.gguf", **make)
    ours = with_identity_output(src, dtype, tmp_path / "cache", bf16=bf16)
    ref = tmp_path / "ref.gguf"
    gguf_py_identity_copy(src, ref, dtype, bf16 and make.get("file_type") is None)
    assert ours.read_bytes() == ref.read_bytes()


def test_layout_agrees_with_gguf_pys_reader(tmp_path):
    src = model_gguf(tmp_path / "m.gguf", alignment=64)
    layout, reader = read_layout(src), gguf.GGUFReader(src)
    assert list(layout.entries) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        entry = layout.entries[key]
        assert entry.vtype == field.types[0] and entry.start == field.offset
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert entry.count == len(field.data) and entry.value is None
        else:
            assert entry.value == pytest.approx(field.contents())
    assert layout.alignment == 64 and layout.data_start == reader.data_offset
    for ours, theirs in zip(layout.tensors, reader.tensors, strict=True):
        assert (ours.name, ours.dims, ours.ggml_type, ours.nbytes) == \
               (theirs.name, tuple(int(d) for d in theirs.shape), theirs.tensor_type, theirs.n_bytes)
        assert layout.data_start + ours.offset == theirs.data_offset


@pytest.mark.parametrize("damage", ["truncated-table", "tensor-past-end", "not-gguf", "bad-alignment"])
def test_damaged_files_are_named(tmp_path, damage):
    src = model_gguf(tmp_path / "m.gguf")
    data = bytearray(src.read_bytes())
    layout = read_layout(src)
    if damage == "truncated-table":
        data = data[: layout.entries["tokenizer.ggml.tokens"].end - 7]
    elif damage == "tensor-past-end":
        data = data[: layout.data_start + 10]
    elif damage == "not-gguf":
        data[:4] = b"GGUG"
    else:
        src = model_gguf(tmp_path / "a.gguf", alignment=64)
        data = bytearray(src.read_bytes())
        end = read_layout(src).entries["general.alignment"].end
        data[end - 4 : end] = struct.pack("<I", 3)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(RerankerError, match=f"{bad}.*corrupt or truncated GGUF.*download or convert it again"):
        read_layout(bad)
