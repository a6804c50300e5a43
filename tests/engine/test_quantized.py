"""The `small` synthetic model quantized with llama.cpp: it loads, scores, and Q8_0 stays close to F16."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PAIRS

from reranker import Reranker, RerankerError
from reranker.gguf.quantize import quantize


def _scores(path, head):
    r = Reranker.from_pretrained(str(path), head=head, device="cpu", n_ctx=1024, n_batch=512)
    try:
        return np.array(r.compute_score(PAIRS))
    finally:
        r.close()


@pytest.mark.slow
def test_q8_0_and_q4_k_m_load_and_score(small_f16, tmp_path):
    head = small_f16.parent / "mlp_weights.npz"
    ref = _scores(small_f16, head)
    errs = {}
    for qtype in ("Q8_0", "Q4_K_M"):
        out = quantize(small_f16, tmp_path / f"small-{qtype}.gguf", qtype)
        assert out.stat().st_size < small_f16.stat().st_size
        got = _scores(out, head)
        assert np.all((got > 0) & (got < 1))
        errs[qtype] = np.abs(got - ref).max()
    assert errs["Q8_0"] < 0.03, errs
    assert errs["Q8_0"] < errs["Q4_K_M"], errs


@pytest.mark.slow
def test_unknown_quant_type(small_f16, tmp_path):
    with pytest.raises(RerankerError, match="unknown quantization type 'Q9_X'"):
        quantize(small_f16, tmp_path / "x.gguf", "Q9_X")


def test_cpu_extra_buffers_are_off_where_llama_cpp_has_amx(monkeypatch):
    # llama.cpp's AMX kernels die with SIGILL on VMs whose CPUs report AMX (Q8_0 here did).
    import llama_cpp

    from reranker.engine.backbone import CPU_EXTRA_BUFFERS_ENV, cpu_extra_buffers

    monkeypatch.delenv(CPU_EXTRA_BUFFERS_ENV, raising=False)
    assert cpu_extra_buffers() == (b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info())
    monkeypatch.setenv(CPU_EXTRA_BUFFERS_ENV, "1")
    assert cpu_extra_buffers() is True
    monkeypatch.setenv(CPU_EXTRA_BUFFERS_ENV, "0")
    assert cpu_extra_buffers() is False
