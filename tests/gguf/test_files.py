"""Pure file helpers: the GGUF header reader, level names, atomic writes, the error contract."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from helpers import write_gguf

from reranker import RerankerError
from reranker.atomic import atomic_path, atomic_write
from reranker.gguf.convert import convert
from reranker.gguf.header import check_gguf_file, header_value
from reranker.gguf.quantize import level_in_name


@pytest.fixture()
def small_gguf(tmp_path):
    """A GGUF with scalar, string and array entries, written by gguf-py (the reference writer)."""
    kv = {"general.file_type": 7, "tokenizer.ggml.tokens": ["a", "bb", "ccc"] * 1000, "some.floats": [1.0, 2.0],
          "general.name": "jina ✓", "x.signed": (-5, gguf.GGUFValueType.INT32), "x.float": 0.25, "x.flag": True}
    return write_gguf(tmp_path / "m.gguf", kv, {"t": np.zeros((2, 2), np.float32)})


def test_header_value_reads_what_gguf_py_wrote(small_gguf):
    assert header_value(small_gguf, "general.architecture") == "qwen2vl"
    assert header_value(small_gguf, "general.file_type") == 7
    assert header_value(small_gguf, "general.name") == "jina ✓"
    assert header_value(small_gguf, "x.signed") == -5
    assert header_value(small_gguf, "x.float") == 0.25
    assert header_value(small_gguf, "x.flag") is True
    assert header_value(small_gguf, "missing.key") is None
    assert header_value(small_gguf, "tokenizer.ggml.tokens") is None  # arrays are skipped, not returned
    assert header_value(small_gguf, "general.name", within=2) is None  # not among the first two entries


def test_header_value_on_bad_files(tmp_path, small_gguf):
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(small_gguf.read_bytes()[:200])
    assert header_value(truncated, "general.name") is None
    other = tmp_path / "o.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    assert header_value(other, "general.name") is None
    with pytest.raises(RerankerError, match="not a GGUF file"):
        check_gguf_file(other)
    with pytest.raises(RerankerError, match="not found"):
        check_gguf_file(tmp_path / "nope.gguf")


@pytest.mark.parametrize("name,want", [
    ("jina-reranker-m0-Q4_K_M.gguf", "Q4_K_M"), ("model.q8_0.gguf", "Q8_0"), ("F16.gguf", "F16"),
    ("x_BF16.gguf", "BF16"), ("m0-F32.GGUF", "F32"), ("model.gguf", None), ("modelQ8_0.gguf", None),
])
def test_level_in_name(name, want):
    assert level_in_name(name) == want


def test_level_in_name_prefers_the_longest_level():
    assert level_in_name("m-Q4_K_M.gguf", extra=("K_M",)) == "Q4_K_M"
    assert level_in_name("m-CUSTOM.gguf", extra=("custom",)) == "CUSTOM"


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise ZeroDivisionError
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_head_errors_are_reranker_errors_and_head_needs_no_llama_cpp():
    from head import HeadLoadError

    assert issubclass(HeadLoadError, RerankerError)
    code = "import sys, head, reranker.errors; assert 'llama_cpp' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_convert_never_leaves_half_a_file_nor_shares_a_folder_with_another_head(tiny_checkpoint, tmp_path, monkeypatch):
    from reranker.gguf import convert as convert_module
    from reranker.synth.random_checkpoint import synth_checkpoint

    out = tmp_path / "models"
    gguf_path, npz = convert_module.convert(tiny_checkpoint, out, outtype="f32", mmproj_type=None)
    before = gguf_path.read_bytes()
    # The same checkpoint's other level beside it is fine: one model, one head.
    f16, _ = convert_module.convert(tiny_checkpoint, out, outtype="f16", mmproj_type=None)
    assert f16.is_file() and npz.is_file()

    # Another checkpoint into the same folder would replace the head both GGUFs score with: refused, nothing written.
    other = synth_checkpoint(tmp_path / "other", preset="tiny", seed=1, vision=False)
    head_bytes = npz.read_bytes()
    with pytest.raises(RerankerError, match=r"holds .*\.gguf with another head \(mlp_weights\.npz\).*another folder"):
        convert_module.convert(other, out, outtype="f16", mmproj_type=None)
    assert npz.read_bytes() == head_bytes and sorted(p.name for p in out.iterdir()) == sorted([gguf_path.name, f16.name, npz.name])

    # A conversion stopped midway leaves the earlier file whole under its name, and no partial file.
    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_encode", stop)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(tiny_checkpoint, out, outtype="f32", mmproj_type=None)
    assert gguf_path.read_bytes() == before and sorted(p.name for p in out.iterdir()) == sorted([gguf_path.name, f16.name, npz.name])


def test_a_reconverted_gguf_is_a_new_file_beside_a_reader_of_the_old_one(tiny_checkpoint, tmp_path):
    """Rewriting the GGUF in place crashed a process that had it memory-mapped (Bus error): the new file is renamed over
    the old name, and the mapped old file stays whole."""
    out = tmp_path / "models"
    gguf_path, _ = convert(tiny_checkpoint, out, outtype="f32", mmproj_type=None)
    old = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    before, inode = bytes(old), gguf_path.stat().st_ino
    assert convert(tiny_checkpoint, out, outtype="f32", mmproj_type=None)[0] == gguf_path
    assert gguf_path.stat().st_ino != inode and bytes(old) == before == gguf_path.read_bytes()


def test_an_interrupted_projector_leaves_the_old_one_whole(tiny_checkpoint, tmp_path, monkeypatch):
    from reranker.gguf import mmproj as mmproj_module

    out = tmp_path / "models"
    path = mmproj_module.convert_mmproj(tiny_checkpoint, out, "f32")
    before = path.read_bytes()

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mmproj_module, "_as_numpy", stop)
    with pytest.raises(KeyboardInterrupt):
        mmproj_module.convert_mmproj(tiny_checkpoint, out, "f32")
    assert path.read_bytes() == before and os.listdir(out) == [path.name]


def test_a_folder_holds_one_model(tiny_checkpoint, tmp_path):
    """Without a head to compare, another model's GGUF is told by its name: `<name>-<LEVEL>.gguf`."""
    from reranker.gguf.convert import model_name
    from reranker.gguf.mmproj import convert_mmproj

    assert [model_name(n) for n in ("m0-F16.gguf", "m0-Q4_K_M.gguf", "m0.q8_0.gguf", "m0.gguf", "F16.gguf")] == [
        "m0", "m0", "m0", "m0", "F16"]
    name = tiny_checkpoint.name
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{name}-Q8_0.gguf").write_bytes(b"the same model's level, its head removed")
    gguf_path, npz = convert(tiny_checkpoint, out, outtype="f32", mmproj_type=None)  # welcome beside it
    other = tmp_path / "other"
    other.mkdir()
    (other / "llama-F16.gguf").write_bytes(b"another model, no head beside it")
    with pytest.raises(RerankerError, match=r"holds llama-F16.gguf, another model's GGUF \(without its mlp_weights.npz\).*"
                                            r"another folder"):
        convert(tiny_checkpoint, other, outtype="f32", mmproj_type=None)
    assert os.listdir(other) == ["llama-F16.gguf"]
    # The projector: mtmd takes the one beside the GGUF, so another model's is refused too.
    (out / "mmproj-llama-F16.gguf").write_bytes(b"another model's projector")
    with pytest.raises(RerankerError, match=r"holds mmproj-llama-F16.gguf, another model's vision projector.*another folder"):
        convert_mmproj(tiny_checkpoint, out, "f16")
    (out / "mmproj-llama-F16.gguf").unlink()
    assert convert_mmproj(tiny_checkpoint, out, "f16").name == f"mmproj-{name}-F16.gguf"
