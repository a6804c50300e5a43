"""The vision projector `reranker convert` writes (reranker.gguf.mmproj), against llama.cpp and transformers.

The reference for the file is llama.cpp's own converter, `convert_hf_to_gguf.py --mmproj` (class
Qwen2VLVisionModel) from the llama-cpp-python 0.3.36 sdist (`vendor/llama.cpp/`), run on the tiny synthetic
checkpoint with `architectures` set to `Qwen2VLForConditionalGeneration` (it does not know JinaVLForRanking) and
`--model-name jina-reranker-m0-tiny`. It runs offline in ~5 s per type: `test_same_bytes_as_llama_cpp_converter`
(slow) runs it live (the sdist is fetched from PyPI once: the `llama_cpp_src` fixture) and compares the three files
byte for byte; the fast tier compares them with what it wrote (data/mmproj-tiny-llama-cpp.json: every header key
and value, every tensor's name, shape and type, and the whole file's sha256, for f32, f16 and q8_0). Regenerate
the record only with llama.cpp's converter (`PYTHONPATH=.:tests python tests/gguf/test_mmproj.py`), never from
reranker.gguf.mmproj.

The file's function: llama.cpp's mtmd loads it beside the language model, reports vision and M-RoPE, and
encodes an image to what transformers' Qwen2-VL vision tower computes from the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from reranker.gguf.convert import convert
from reranker.gguf.hub import resolve
from reranker.gguf.mmproj import MMPROJ_TYPES, convert_mmproj, mmproj_name
from reranker.synth.random_checkpoint import PRESETS, synth_checkpoint

NAME = "jina-reranker-m0-tiny"  # the conftest checkpoint's folder name
RECORD = Path(__file__).parent / "data" / "mmproj-tiny-llama-cpp.json"

# mtmd (no flash attention, 2-core AVX2 CPU) vs transformers on one 84x56 image, relative (L2): F32 mmproj 5.5e-4,
# F16 8.2e-4, Q8_0 1.6e-2 (Q8_0 blocks of 32 across the tiny tower's whole 32-wide rows). F32's residue is
# llama.cpp's numerics, not the file (the same bytes as llama.cpp's converter): the merger's exact GELU
# swapped for tanh's in torch moves it to 4.8e-4; the rest is not traced further. Mutations of the converter measured
# here: q and k swapped in the qkv split 4.4e-1, image_mean 0.5 instead of CLIP's 2.6e-1; another image 1.0.
EMBD_RTOL = {"f32": 2e-3, "f16": 3e-3, "q8_0": 5e-2}


def header_summary(path: str | Path) -> dict:
    """Every header key and value (but GGUF.*) and every tensor's name, shape and type, in file order."""
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return {"kv": kv, "tensors": [[t.name, [int(n) for n in t.shape], t.tensor_type.name] for t in r.tensors]}


@pytest.fixture(scope="session")
def mmprojs(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmproj")
    return {t: convert_mmproj(tiny_checkpoint, out, t) for t in MMPROJ_TYPES}


@pytest.mark.parametrize("mmproj_type", list(MMPROJ_TYPES))
def test_same_file_as_llama_cpp_record(mmprojs, mmproj_type):
    path = mmprojs[mmproj_type]
    assert path.name == f"mmproj-{NAME}-{MMPROJ_TYPES[mmproj_type][2]}.gguf"
    want = json.loads(RECORD.read_text(encoding="utf-8"))[mmproj_type]
    got = header_summary(path)
    assert got["kv"] == want["kv"]
    assert got["tensors"] == want["tensors"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want["sha256"]


def run_llama_cpp_converter(script: Path, checkpoint: Path, mmproj_type: str, out: Path, work: Path) -> Path:
    """llama.cpp's `convert_hf_to_gguf.py --mmproj` on `checkpoint`, under the architecture llama.cpp registers."""
    ckpt = work / f"qwen2vl-{checkpoint.name}"
    if not ckpt.exists():
        ckpt.mkdir(parents=True)
        for f in checkpoint.iterdir():
            if f.name != "config.json":
                (ckpt / f.name).symlink_to(f.resolve())
        cfg = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2VLForConditionalGeneration"]}))
    res = subprocess.run([sys.executable, str(script), str(ckpt), "--mmproj", "--outtype", mmproj_type, "--model-name",
                          NAME, "--outfile", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def record_llama_cpp_output() -> None:
    """Rewrite data/mmproj-tiny-llama-cpp.json from llama.cpp's converter (never from reranker.gguf.mmproj):

        PYTHONPATH=.:tests python tests/gguf/test_mmproj.py
    """
    import importlib.metadata
    import tempfile

    from helpers import llama_cpp_source

    script = llama_cpp_source(Path(tempfile.gettempdir()) / "jina-reranker-gguf-tests") / "convert_hf_to_gguf.py"
    version = importlib.metadata.version("llama-cpp-python")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = synth_checkpoint(work / NAME, "tiny", seed=0)
        record = {"_source": f"llama.cpp's convert_hf_to_gguf.py from llama_cpp_python-{version}.tar.gz (vendor/llama.cpp), "
                             f"run as `convert_hf_to_gguf.py CKPT --mmproj --outtype T --model-name {NAME}` on `reranker synth "
                             "--preset tiny --seed 0` with architectures [Qwen2VLForConditionalGeneration]"}
        for t in MMPROJ_TYPES:
            out = run_llama_cpp_converter(script, ckpt, t, work / f"{t}.gguf", work)
            record[t] = {**header_summary(out), "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    RECORD.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


@pytest.mark.slow  # llama.cpp's converter, four runs of ~5 s
def test_same_bytes_as_llama_cpp_converter(tiny_checkpoint, mmprojs, tmp_path, llama_cpp_src):
    script = llama_cpp_src / "convert_hf_to_gguf.py"  # fetched from PyPI once (tests/conftest.py); CI runs it too

    def llama_cpp_convert(checkpoint: Path, t: str, out: Path) -> Path:
        return run_llama_cpp_converter(script, checkpoint, t, out, tmp_path)

    for t, ours in mmprojs.items():
        theirs = llama_cpp_convert(tiny_checkpoint, t, tmp_path / f"llama-cpp-{t}.gguf")
        assert header_summary(ours) == header_summary(theirs), t
        assert ours.read_bytes() == theirs.read_bytes(), t
    # bf16 (the m0 preset's and the Hub's dtype) goes through F32 first in both; 12 blocks order as strings
    # (visual.blocks.10 before visual.blocks.2) in both, as m0's 32 do
    deep = replace(PRESETS["tiny"], name="tiny-deep", vision_depth=12)
    bf16 = synth_checkpoint(tmp_path / "bf16", deep, seed=0, dtype="bfloat16", tokenizer=False)
    ours = convert_mmproj(bf16, tmp_path / "ours-bf16", "f16", NAME)
    blocks = [int(n.split(".")[2]) for n, _, _ in header_summary(ours)["tensors"] if n.startswith("v.blk.")]
    assert list(dict.fromkeys(blocks)) == sorted(range(12), key=str)  # 0, 1, 10, 11, 2, ...
    assert ours.read_bytes() == llama_cpp_convert(bf16, "f16", tmp_path / "llama-cpp-bf16-f16.gguf").read_bytes()


def test_language_model_file_unchanged_by_the_vision_tower(tiny_checkpoint, tiny_ggufs, tmp_path):
    """The vision tower adds a file; the language-model GGUF and the head are those of a text-only checkpoint."""
    text_only = synth_checkpoint(tmp_path / "text-only", "tiny", seed=0, tokenizer=False, vision=False)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_checkpoint / f, text_only / f)
    lm, head = convert(text_only, tmp_path / "out", outtype="f32", name=NAME)
    assert lm.read_bytes() == tiny_ggufs["f32"].read_bytes()
    assert head.read_bytes() == (tiny_ggufs["f32"].parent / head.name).read_bytes()
    assert not list((tmp_path / "out").glob("mmproj*"))  # no visual.* weights, no projector
    assert convert_mmproj(text_only, tmp_path / "out") is None
    # convert() writes the projector beside the vision checkpoint's GGUF, F16 by default
    for lm_type, path in tiny_ggufs.items():
        assert [p.name for p in path.parent.glob("mmproj*")] == [mmproj_name(NAME, "f16")], lm_type


def test_newer_transformers_layout_gives_the_same_files(tiny_checkpoint, tiny_ggufs, mmprojs, tmp_path):
    """A checkpoint saved by transformers >= 4.52 (`model.language_model.*`, `model.visual.*`) converts to the same
    backbone and projector as the Hub layout."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "new-layout"
    ckpt.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.name != "model.safetensors":
            (ckpt / f.name).symlink_to(f)
    renamed = {}
    for k, v in load_file(str(tiny_checkpoint / "model.safetensors")).items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        renamed[k] = v
    save_file(renamed, str(ckpt / "model.safetensors"))
    lm, _ = convert(ckpt, tmp_path / "out", outtype="f32", name=NAME, mmproj_type="f16")
    assert lm.read_bytes() == tiny_ggufs["f32"].read_bytes()
    assert (tmp_path / "out" / mmproj_name(NAME, "f16")).read_bytes() == mmprojs["f16"].read_bytes()


def test_a_folder_resolves_to_the_language_model_not_the_projector(tiny_ggufs):
    folder = tiny_ggufs["f16"].parent  # <name>-F16.gguf beside mmproj-<name>-F16.gguf
    assert (folder / mmproj_name(NAME, "f16")).is_file()
    assert resolve(str(folder)).gguf == tiny_ggufs["f16"]
    assert resolve(str(folder), quant="F16").gguf == tiny_ggufs["f16"]


def test_bad_checkpoints_are_named(tiny_checkpoint, tmp_path):
    from reranker.errors import RerankerError

    with pytest.raises(RerankerError, match="--mmproj-type 'q4_0'"):
        convert_mmproj(tiny_checkpoint, tmp_path, "q4_0")
    ckpt = tmp_path / "no-preprocessor"
    ckpt.mkdir()
    for f in ("config.json", "model.safetensors"):
        (ckpt / f).symlink_to(tiny_checkpoint / f)
    with pytest.raises(RerankerError, match="no preprocessor_config.json in .*no-preprocessor.*image_mean"):
        convert_mmproj(ckpt, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# llama.cpp's mtmd runs the file


@pytest.fixture(scope="module")
def llama_model(tiny_ggufs):
    """The tiny F32 backbone as a bare llama_model, loaded once: mtmd checks the projector against it."""
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    from reranker import llama_log

    llama_log.install()  # llama.cpp's and mtmd's C logs through `logging`, not on stderr
    M.mtmd_log_set(llama_log._callback, ctypes.c_void_p(0))
    M.mtmd_helper_log_set(llama_log._callback, ctypes.c_void_p(0))
    model = llama_cpp.llama_model_load_from_file(str(tiny_ggufs["f32"]).encode(), llama_cpp.llama_model_default_params())
    assert model, tiny_ggufs["f32"]
    yield model
    llama_cpp.llama_model_free(model)


def _mtmd_image_embeddings(model, mmproj_path: Path, image: np.ndarray) -> tuple[np.ndarray, dict]:
    """mtmd's embeddings of one RGB uint8 image (its own preprocessing, at 4..768 merged tokens)."""
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    p = M.mtmd_context_params_default()
    p.use_gpu, p.n_threads, p.print_timings, p.warmup = False, 2, False, False
    p.flash_attn_type = 0  # disabled: F32 attention, as transformers' eager
    p.image_min_tokens, p.image_max_tokens = 4, 768  # 3136 .. 602112 pixels, jina-reranker-m0's limits
    ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), model, p)
    assert ctx, f"mtmd could not load {mmproj_path}"
    bitmap = chunks = None
    try:
        info = {"vision": M.mtmd_support_vision(ctx), "mrope": M.mtmd_decode_use_mrope(ctx)}
        h, w, _ = image.shape
        bitmap = M.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes()))
        chunks = M.mtmd_input_chunks_init()
        marker = M.mtmd_default_marker()
        text = M.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        images = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
        images = [c for c in images if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert len(images) == 1
        tokens = M.mtmd_input_chunk_get_tokens_image(images[0])
        info["nx"], info["ny"] = M.mtmd_image_tokens_get_nx(tokens), M.mtmd_image_tokens_get_ny(tokens)
        n = M.mtmd_input_chunk_get_n_tokens(images[0])
        assert M.mtmd_encode_chunk(ctx, images[0]) == 0
        n_embd = llama_cpp.llama_model_n_embd(model)
        embd = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * n_embd,)).reshape(n, n_embd).astype(np.float64)
        return embd, info
    finally:
        if chunks:
            M.mtmd_input_chunks_free(chunks)
        if bitmap:
            M.mtmd_bitmap_free(bitmap)
        M.mtmd_free(ctx)


@pytest.fixture(scope="module")
def vl_model(tiny_checkpoint):
    pytest.importorskip("transformers")
    from oracle import load_vl_model

    return load_vl_model(tiny_checkpoint)


def test_mtmd_encodes_an_image_as_transformers(tiny_checkpoint, llama_model, mmprojs, vl_model):
    """84x56 pixels (a multiple of 28 within the limits: neither side resizes), 3x2 merged tokens."""
    from oracle import image_embeddings, image_processor, rel_err
    from PIL import Image

    image = np.random.default_rng(7).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    inputs = image_processor(tiny_checkpoint)(images=[Image.fromarray(image)], return_tensors="pt", do_resize=False)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    want = image_embeddings(vl_model, inputs["pixel_values"], inputs["image_grid_thw"])
    assert want.shape == (6, 64)
    other = np.random.default_rng(8).integers(0, 256, image.shape, dtype=np.uint8)
    for t in MMPROJ_TYPES:
        got, info = _mtmd_image_embeddings(llama_model, mmprojs[t], image)
        assert info == {"vision": True, "mrope": True, "nx": 3, "ny": 2}, t
        err = float(rel_err(got.ravel(), want.ravel()))
        print(f"mtmd {t} mmproj vs transformers: {err:.2e} relative")
        assert err < EMBD_RTOL[t], f"{t}: {err:.3g} >= {EMBD_RTOL[t]}"
    # the comparison can fail: another image is far off
    got_other, _ = _mtmd_image_embeddings(llama_model, mmprojs["f32"], other)
    far = float(rel_err(got_other.ravel(), want.ravel()))
    print(f"mtmd f32 mmproj, another image, vs transformers: {far:.2e} relative")
    assert far > 0.1


if __name__ == "__main__":
    record_llama_cpp_output()
