"""What the model-file commands refuse, and how: each error a RerankerError naming the file and the fix, raised before
anything is written (a checkpoint that does not match its config, a quantized file to quantize again, another
architecture's GGUF for the fast path's cache, a corrupt header, a cache that cannot take a copy)."""

from __future__ import annotations

import errno
import json
import os
import struct
import types

import numpy as np
import pytest
from helpers import write_gguf

from reranker import RerankerError
from reranker.gguf.convert import convert


def small_gguf(path, arch="qwen2vl"):
    """A GGUF of `arch` with just what the fast path's copy needs (8 tokens of width 4): copied in milliseconds."""
    return write_gguf(path, {f"{arch}.embedding_length": 4, "tokenizer.ggml.model": "gpt2",
                             "tokenizer.ggml.tokens": [f"t{i}" for i in range(8)]},
                      {"token_embd.weight": np.arange(32, dtype=np.float32).reshape(8, 4)}, arch=arch)


# --- quantize: only from F32 / F16 / BF16 --------------------------------------------------------------------------

def test_quantize_refuses_a_quantized_input(tiny_ggufs, tmp_path):
    from reranker.gguf.quantize import quantize

    q8 = quantize(tiny_ggufs["f16"], tmp_path / "m-Q8_0.gguf", "Q8_0")
    before = q8.read_bytes()
    with pytest.raises(RerankerError, match=r"m-Q8_0.gguf is already quantized \(Q8_0\); quantize the F32, F16 or BF16 GGUF"):
        quantize(q8, tmp_path / "m-Q4_K_M.gguf", "Q4_K_M")
    assert q8.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m-Q8_0.gguf"]
    # A folder as the output: the file to give is named after the input, at the level asked for.
    with pytest.raises(RerankerError, match=rf"the output {tmp_path} is a folder; give the file to write, e.g. "
                                            rf"{tmp_path / tiny_ggufs['f16'].name.replace('F16', 'Q4_K_M')}$"):
        quantize(tiny_ggufs["f16"], tmp_path, "q4_k_m")
    (tmp_path / "afile").write_text("")
    with pytest.raises(RerankerError, match=r"cannot make the output's folder .*afile"):
        quantize(tiny_ggufs["f16"], tmp_path / "afile" / "m-Q8_0.gguf", "Q8_0")


def test_llama_cpp_writes_a_temporary_file_never_the_output(tiny_ggufs, tmp_path, monkeypatch):
    """Whatever llama.cpp leaves at the path it is given when it fails midway (a partial file; a Ctrl-C), the output
    path keeps what it held, and nothing else is left beside it."""
    from reranker.gguf import quantize as quantize_module

    def fails_midway(src, dst, params):
        with open(dst, "wb") as f:
            f.write(b"GGUF half a file")
        return 1

    monkeypatch.setattr(quantize_module.llama_cpp, "llama_model_quantize", fails_midway)
    kept = tmp_path / "kept-Q8_0.gguf"
    kept.write_bytes(b"a file already there")
    with pytest.raises(RerankerError, match="failed to quantize"):
        quantize_module.quantize(tiny_ggufs["f16"], kept, "Q8_0")
    assert kept.read_bytes() == b"a file already there" and os.listdir(tmp_path) == [kept.name]


# --- convert: the checkpoint is checked against its config.json before anything is written ---------------------------

@pytest.fixture()
def broken(tiny_checkpoint, tmp_path):
    """broken(name, **files): a copy of the tiny checkpoint (its files linked) with some files replaced (`__` in a
    keyword stands for `.`): str or bytes is the new content, a dict goes through JSON, a callable gets the original's
    path and returns the content, None removes the file."""
    def make(name, **changes):
        files = {key.replace("__", "."): content for key, content in changes.items()}
        folder = tmp_path / name
        folder.mkdir()
        for src in tiny_checkpoint.iterdir():
            if src.name not in files:
                (folder / src.name).symlink_to(src)
        for file_name, content in files.items():
            if callable(content):
                content = content(tiny_checkpoint / file_name)
            if content is None:
                continue
            if isinstance(content, dict):
                content = json.dumps(content)
            target = folder / file_name
            (target.write_bytes if isinstance(content, bytes) else target.write_text)(content)
        return folder

    return make


def rewritten(**tensors):
    """A `broken` callable: the checkpoint's safetensors with `tensors` replaced (None drops one)."""
    from safetensors.torch import load_file, save

    def content(src):
        state = load_file(src)
        for name, t in tensors.items():
            if t is None:
                del state[name]
            else:
                state[name] = t
        return save(state)

    return content


def config(tiny_checkpoint, **changes):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


def test_convert_refuses_a_checkpoint_its_config_does_not_describe(tiny_checkpoint, broken, tmp_path):
    import torch

    out = tmp_path / "out"
    cases = [
        # a layer config.json asks for is not there (a checkpoint of fewer layers, or a shard lost)
        (broken("more-layers", config__json=config(tiny_checkpoint, num_hidden_layers=3)),
         r"12 tensor\(s\) missing: model.layers.2.input_layernorm.weight, .* and 8 more"),
        (broken("fewer-layers", config__json=config(tiny_checkpoint, num_hidden_layers=1)),
         r"12 tensor\(s\) config.json has no place for: model.layers.1"),
        (broken("wider", config__json=config(tiny_checkpoint, intermediate_size=256)),
         r"model.layers.0.mlp.down_proj.weight is \[64, 128\], expected \[64, 256\]"),
        (broken("no-up", model__safetensors=rewritten(**{"model.layers.1.mlp.up_proj.weight": None})),
         r"1 tensor\(s\) missing: model.layers.1.mlp.up_proj.weight; the checkpoint is incomplete"),
        (broken("cut", model__safetensors=rewritten(**{"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 32)})),
         r"model.layers.0.mlp.up_proj.weight is \[128, 32\], expected \[128, 64\]"),
    ]
    for ckpt, message in cases:
        with pytest.raises(RerankerError, match=rf"{ckpt} does not match its {ckpt / 'config.json'} .*{message}"):
            convert(ckpt, out, outtype="f32")
    # The head against config.json: one of another width is another model's.
    head = {"score.0.weight": torch.zeros(32, 32), "score.0.bias": torch.zeros(32), "score.2.weight": torch.zeros(1, 32)}
    other_head = broken("other-head", model__safetensors=rewritten(**head))
    with pytest.raises(RerankerError, match=rf"{other_head}: the scoring head \(score.\*\) has hidden size 32, but config.json says 64"):
        convert(other_head, out, outtype="f32")
    assert not out.exists()  # nothing written, not even the folder


def test_convert_errors_name_the_file_and_the_fix(tiny_checkpoint, broken, tmp_path, cli_here):
    out = tmp_path / "out"
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    size = (tiny_checkpoint / "model.safetensors").stat().st_size
    cases = [
        (broken("bad-json", config__json="{'hidden_size': 64}"), r"config.json is not valid JSON \(Expecting property name"),
        (broken("no-hidden", config__json=config(tiny_checkpoint, hidden_size=None)), r"config.json lacks hidden_size"),
        (broken("no-mrope", config__json=config(tiny_checkpoint, rope_scaling=None)), r"config.json has no rope_scaling.mrope_section"),
        (broken("bad-tok", tokenizer__json={"version": "1.0"}), r"tokenizer.json is not a Qwen2 BPE tokenizer .*KeyError: 'model'"),
        (broken("truncated", model__safetensors=lambda src: src.read_bytes()[: size // 2]),
         r"model.safetensors is not a readable safetensors file .*truncated"),
        (broken("lost-shard", model__safetensors=None, model__safetensors__index__json=index),
         r"model.safetensors.index.json names 1 shard\(s\) not in .*: model-00001-of-00002.safetensors; download them"),
    ]
    for ckpt, message in cases:
        with pytest.raises(RerankerError, match=message):
            convert(ckpt, out, outtype="f32")
    assert not out.exists()
    # A full disk while the GGUF is written: the file named, no partial file left.
    from reranker.gguf import convert as convert_module

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert_module, "_encode", full)
        with pytest.raises(RerankerError, match=rf"cannot write {out / tiny_checkpoint.name}-F32.gguf \(No space left on device\); "
                                                "free some space there, or give another folder for -o"):
            convert(tiny_checkpoint, out, outtype="f32")
    assert os.listdir(out) == []
    # The command line: one line each, exit 2.
    (tmp_path / "afile").write_text("")
    for argv, message in [((tiny_checkpoint, "-o", tmp_path / "afile"), "afile is a file, not a folder; give a folder for -o"),
                          ((tiny_checkpoint, "-o", out, "--name", "a/b"), "--name 'a/b' cannot be a file name stem"),
                          ((cases[0][0], "-o", out), "config.json is not valid JSON")]:
        res = cli_here("convert", *argv)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = cli_here("synth", "-o", tmp_path / "afile")
    assert res.returncode == 2 and "afile is a file, not a folder" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert os.listdir(out) == []


# --- the fast path's cache: another architecture refused before the copy; a cache that cannot take it -------------

def test_another_architecture_is_refused_before_it_is_hashed_or_copied(tmp_path, monkeypatch):
    from reranker.engine import identity

    cache = tmp_path / "cache"
    llama = small_gguf(tmp_path / "llama-7b-F16.gguf", "llama")
    with pytest.raises(RerankerError, match=rf"{llama} is a GGUF of architecture 'llama', not jina-reranker-m0's 'qwen2vl'"):
        identity.with_identity_output(llama, cache_dir=cache)
    assert not cache.exists()  # not copied, not even hashed (the memo of hashes is not written)
    # Qwen2 and Qwen2-VL are accepted, on purpose: their copies are made.
    for arch in ("qwen2", "qwen2vl"):
        copy = identity.with_identity_output(small_gguf(tmp_path / f"{arch}.gguf", arch), cache_dir=cache)
        assert copy.parent == cache and identity.identity_marker(copy) == "f32"


def test_a_cache_that_cannot_take_the_copy_says_what_to_do(tmp_path, monkeypatch):
    from reranker.engine import identity

    src = small_gguf(tmp_path / "m-F32.gguf")
    fixes = r"RERANKER_CACHE at a folder with room.*fast=False"
    afile = tmp_path / "afile"
    afile.write_text("")
    for cache, why in [(afile, "it is a file, not a folder"), (afile / "sub", "Not a directory")]:
        with pytest.raises(RerankerError, match=rf"cache folder {cache} cannot take its copy of {src} \({why}.*needs about "
                                                rf"[0-9.]+ MB there.*reranker cache clear --stale.*{fixes}"):
            identity.with_identity_output(src, cache_dir=cache)
    # A full disk, up front (no room for the copy) or midway (ENOSPC): no partial copy is left.
    cache = tmp_path / "cache"
    with monkeypatch.context() as mp:
        mp.setattr(identity.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=10))
        with pytest.raises(RerankerError, match=rf"cache folder {cache} cannot take its copy of {src} \(0.0 MB free\); .*{fixes}"):
            identity.with_identity_output(src, cache_dir=cache)

    def full(layout, dims, dst, *args):
        dst.write_bytes(b"half a copy")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(identity, "_write", full)
    with pytest.raises(RerankerError, match=rf"cache folder {cache} cannot take its copy .*\(the disk is full.*{fixes}"):
        identity.with_identity_output(src, cache_dir=cache)
    assert not list(cache.glob("*.gguf")) and not list(cache.glob(".*tmp*"))


# --- corrupt headers: a length field that claims more than the file holds ------------------------------------------

@pytest.mark.parametrize("length", [2**40, 2**62, 2**64 - 1])
def test_corrupt_header_lengths_are_corruption_not_crashes(tmp_path, length):
    from reranker.gguf.header import check_gguf_file, header_value
    from reranker.gguf.layout import read_layout

    good = small_gguf(tmp_path / "good.gguf").read_bytes()
    key = good.index(b"general.architecture")
    value = key + len(b"general.architecture") + 4  # the architecture string's length field
    for name, at in (("key.gguf", 24), ("value.gguf", value)):  # the first key's length, the first string value's
        bad = bytearray(good)
        bad[at : at + 8] = struct.pack("<Q", length)
        path = tmp_path / name
        path.write_bytes(bytes(bad))
        assert header_value(path, "tokenizer.ggml.model") is None
        with pytest.raises(RerankerError, match=rf"{path} has no tokenizer .*or the header is corrupt"):
            check_gguf_file(path)
        with pytest.raises(RerankerError, match=rf"{path} is a corrupt or truncated GGUF file \(a length of {length} bytes"):
            read_layout(path)
