"""Generation mode with an identity output projection gives embedding mode's hidden states.

What llama.cpp's CPU kernels make exact, on AVX2 and AVX-512 alike:
- the same decode layout (n_batch, n_ubatch: the same KV cells and ubatches) runs the same
  kernels on the same numbers in both modes, up to the last layer, where generation mode keeps
  only the output rows. Its mat-muls then get fewer rows: llamafile's sgemm sums each element
  the same way whatever the row count, but declines a single row, and ggml_vec_dot sums in
  another order. So: bit for bit where every ubatch has at least two outputs, rounding where a
  ubatch has one (a lone long prompt's last chunk);
- another n_batch puts prompts in other KV cells and ubatches, so attention sums in another
  order (sgemm's lanes run over KV cells, flash attention over 64-cell tiles): rounding.
GPU builds choose mat-mul kernels by row count (and offload large ones even with
n_gpu_layers=0), so there only the tolerance is asserted.
"""

from __future__ import annotations

import os

import gguf
import llama_cpp
import numpy as np
import pytest
from conftest import PAIRS

from reranker import RerankerError
from reranker.defaults import N_SEQ_MAX
from reranker.engine.backbone import Backbone, VocabOnly
from reranker.engine.batching import pack
from reranker.engine.identity import with_identity_output
from reranker.engine.prompts import PromptBuilder
from reranker.gguf.layout import read_layout

# Relative L2 error allowed where the two sides sum in another order.
# F32 GGUF (F32 weights and KV cache): reassociated f32 sums of up to ~600 terms, whose worst
# case is 600 * 2^-24 = 3.6e-5; measured <= 2e-7.
# F16 GGUF (F16 KV cache; mat-mul inputs rounded to f16 unless llama.cpp's AMX buffers keep
# them f32): a last-bit difference can flip a half-precision rounding, one f16 ulp (2^-10);
# measured <= 1.8e-4. Dropping one token of the long prompt moves its state by 2.7e-3.
TOL = {"f32": 1e-5, "f16": 2.0**-10}
GPU_BUILD = llama_cpp.llama_supports_gpu_offload()


def prompts(tokenizer):
    builder = PromptBuilder(tokenizer)
    return [builder.build(q, d).ids for q, d in PAIRS] + [builder.build("long", "many words " * 300).ids]


def states(path, fast, n_batch):
    with Backbone(path, n_ctx=2048, n_batch=n_batch, n_gpu_layers=0, fast=fast) as b:
        return b.embed(prompts(b.tokenizer))


def rel_err(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_f32_identity_equals_embedding_mode(tiny_ggufs, outtype):
    # n_batch 256 on both sides: the short prompts packed several to a decode call, the long
    # one fed in chunks of 256 tokens, the last of which has a single output on the fast side.
    ref = states(tiny_ggufs[outtype], fast=False, n_batch=256)
    fast = states(with_identity_output(tiny_ggufs[outtype], "f32"), fast=True, n_batch=256)
    short = len(PAIRS)
    lengths = [len(ids) for ids in prompts(VocabOnly(tiny_ggufs[outtype]).tokenizer)]
    groups = list(pack(lengths, 256, N_SEQ_MAX))
    assert all(len(g) > 1 for g in groups[:-1]) and groups[-1] == [short] and lengths[short] > 2 * 256
    if GPU_BUILD:
        assert rel_err(fast[:short], ref[:short]).max() < TOL[outtype]
    else:
        np.testing.assert_array_equal(fast[:short], ref[:short])
    assert rel_err(fast[short], ref[short]) < TOL[outtype]


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_chunk_size_changes_only_rounding(tiny_ggufs, outtype):
    # n_batch 512 against 256: some short prompts in another decode call, KV cells and ubatch,
    # the long one in other chunks.
    ref = states(tiny_ggufs[outtype], fast=False, n_batch=512)
    fast = states(with_identity_output(tiny_ggufs[outtype], "f32"), fast=True, n_batch=256)
    errors = rel_err(fast, ref)
    assert errors.max() < TOL[outtype], errors


@pytest.mark.slow
def test_f16_identity_is_half_precision_rounding(tiny_ggufs):
    # Same GGUF and layout; only the output projection differs. ggml rounds an F16 matrix's input
    # to half precision (to nearest even, as numpy does), so the states are the F32 identity's,
    # rounded; except where llama.cpp's AMX buffers hold the matrix (RERANKER_CPU_EXTRA_BUFFERS=1
    # on an AMX build): their F16 kernel keeps the input F32, and the states are unrounded.
    path = with_identity_output(tiny_ggufs["f32"], "f16")
    assert {t.name: t.ggml_type for t in read_layout(path).tensors}["output.weight"] == gguf.GGMLQuantizationType.F16
    ref = states(with_identity_output(tiny_ggufs["f32"], "f32"), fast=True, n_batch=512)
    fast = states(path, fast=True, n_batch=512)
    rounded = ref.astype(np.float16).astype(np.float32)
    assert np.any(rounded != ref), "the states must have bits that half precision drops"
    if amx_buffers_on():
        np.testing.assert_array_equal(fast, ref)
    else:
        np.testing.assert_array_equal(fast, rounded)


def amx_buffers_on() -> bool:
    """Whether llama.cpp's AMX weight buffers hold the model here: an AMX build with extra buffers on."""
    from reranker.engine.backbone import cpu_extra_buffers

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info() and cpu_extra_buffers()


def test_identity_copy_is_cached(tiny_ggufs):
    first = with_identity_output(tiny_ggufs["f16"], "f32")
    mtime = os.stat(first).st_mtime_ns
    assert with_identity_output(tiny_ggufs["f16"], "f32") == first and os.stat(first).st_mtime_ns == mtime
    assert with_identity_output(first, "f32") == first  # already has one
    assert first.parent == __import__("pathlib").Path(os.environ["RERANKER_CACHE"])


def test_fast_needs_identity_output(tiny_ggufs):
    with pytest.raises(RerankerError, match="identity output"):
        Backbone(tiny_ggufs["f32"], n_ctx=512, fast=True)


@pytest.mark.parametrize("claimed", [3000, 150000])
def test_header_that_lies_about_the_hidden_size_writes_nothing(tiny_ggufs, tmp_path, claimed):
    """The copy's n_vocab x n_embd matrix is sized from the header: a lie is refused before anything is written."""
    import shutil

    bad = shutil.copy(tiny_ggufs["f16"], tmp_path / "lying.gguf")
    entry = read_layout(bad).entries["qwen2vl.embedding_length"]
    assert entry.vtype == gguf.GGUFValueType.UINT32
    with open(bad, "r+b") as f:  # the value is the entry's last 4 bytes
        f.seek(entry.end - 4)
        f.write(claimed.to_bytes(4, "little"))
    cache = tmp_path / "cache"
    with pytest.raises(RerankerError, match=f"embedding_length={claimed}.*disagrees|disagrees.*embedding_length={claimed}"):
        with_identity_output(bad, "f32", cache)
    assert not cache.exists() or not any(cache.iterdir())
