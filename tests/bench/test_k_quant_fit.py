"""K-quants on a model too small for them: one line that says why, instead of llama.cpp's two per tensor."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
from helpers import write_gguf

from reranker.bench.quant import k_quant_misfits, plan_levels
from reranker.gguf.layout import read_layout
from reranker.gguf.quantize import quantize


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("level", ["Q6_K", "Q8_0"])
def test_quantize_says_why_in_one_line(tiny_ggufs, tmp_path, caplog, level):
    caplog.set_level(logging.DEBUG, logger="reranker")
    out = quantize(tiny_ggufs["f16"], tmp_path / f"tiny-{level}.gguf", level)
    types = {t.name: gguf.GGMLQuantizationType(t.ggml_type).name for t in read_layout(out).tensors}
    fell = [n for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight") and t not in ("F32", level)]
    warnings = _warnings(caplog)
    if level == "Q8_0":  # rows of 64 hold whole 32-value blocks: nothing to say
        assert warnings == [] and not fell
        return
    assert fell and all(types[n] == "Q8_0" for n in fell)  # what the line must explain, read from the file itself
    assert len(warnings) == 1 and warnings[0].name == "reranker.gguf.quantize", [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    assert f"{len(fell)} tensors were stored as Q8_0, not Q6_K" in line and "64, 128 values" in line and "256" in line
    assert "--preset small" in line and "\n" not in line
    # llama.cpp's own lines are still there for -v's debug level, not at warning level
    assert sum("not divisible by 256" in r.getMessage() for r in caplog.records if r.name == "reranker.llama") == len(fell)


def test_bench_plan_warns_once_before_anything_is_made(tiny_ggufs, tmp_path, caplog):
    plan_levels([str(tiny_ggufs["f16"])], tmp_path, levels=["Q8_0"])
    assert _warnings(caplog) == []
    plan_levels([str(tiny_ggufs["f16"])], tmp_path, levels=["Q8_0", "Q6_K", "Q4_K_M"])
    (line,) = [r.getMessage() for r in _warnings(caplog)]
    assert "rows of 64/128 values, not multiples of 256" in line and "Q6_K, Q4_K_M" in line and "--preset small" in line
    assert not (tmp_path / "gguf").exists()


def test_misfits_are_counted_from_the_header(tmp_path):
    kv = {"general.file_type": int(gguf.LlamaFileType.MOSTLY_F16)}
    fits = write_gguf(tmp_path / "fits.gguf", kv, {"a.weight": np.zeros((4, 512), np.float16),
                                                   "b.weight": np.zeros((8, 256), np.float16), "n.weight": np.zeros(64, np.float32)})
    assert k_quant_misfits(fits) == (0, 2, [])
    misfit = write_gguf(tmp_path / "misfit.gguf", kv, {"a.weight": np.zeros((4, 512), np.float16),
                                                       "b.weight": np.zeros((8, 64), np.float16),
                                                       "c.weight": np.zeros((8, 320), np.float16)})
    assert k_quant_misfits(misfit) == (2, 3, [64, 320])
