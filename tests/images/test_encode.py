"""Image embeddings from the mmproj in libmtmd against transformers' Qwen2-VL vision tower on the same image.

The mmproj is written by llama.cpp's own converter (`convert_hf_to_gguf.py --mmproj`) from a tiny vision tower
saved in the Hub layout (tests/conftest.py `tiny_vision`); the reference is that tower in transformers, fed by
transformers' PIL Qwen2-VL processor at the original's pixel limits, from transformers' own `load_image`.

Tolerance: with an F32 projector (unfused attention, the default for F32) the embeddings differ from
transformers' by 5.3e-4 to 6.2e-4 relative (L2 over the image; max |diff| 1.8e-3 on values up to 2.7; `pytest -s`
prints them), from llama.cpp's CPU arithmetic: `ggml_conv_2d` rounds the pixels and the patch-embedding weights to
F16 (im2col), GELU and quick-GELU run through F16 lookup tables, and the merger uses tanh-GELU where transformers
uses erf. Reproducing those roundings in the reference brings the difference to 8e-6 on the smallest image and
~1e-4 on larger ones (measured while writing this, not kept as a test). libmtmd's fused attention (its "auto"
default, on the CPU too) rounds Q, K and V to F16 as well: 8.4e-4. The bound, 2e-3, is 3x the largest measured;
a mirrored or channel-swapped image, or another image, is off by 1.1 or more.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest
from helpers import convert_mmproj, load_tiny_vision, write_gguf, write_tiny_vision_checkpoint
from PIL import Image

from reranker.engine.segments import Embeddings
from reranker.errors import RerankerError
from reranker.images import encode as encode_mod
from reranker.images.encode import VisionEncoder, check_mmproj
from reranker.images.load import load_image
from reranker.images.preprocess import PreparedImage, Sizing, prepare

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

EMBED_RTOL = 2e-3
# (width, height): below min_pixels (upscaled), ordinary, a wide strip, a page, the 4-token minimum.
SIZES = [(20, 30), (333, 217), (1200, 60), (210, 297), (56, 56)]


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def llama_model(tiny_ggufs):
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(tiny_ggufs["f32"]).encode(), params)
    assert model
    yield model
    llama_cpp.llama_model_free(model)


@pytest.fixture(scope="module")
def encoder(tiny_vision, llama_model):
    with VisionEncoder(tiny_vision[1], llama_model, n_threads=2) as enc:
        yield enc


@pytest.fixture(scope="module")
def reference(tiny_vision):
    """image path -> transformers' embeddings (float64), from transformers' loader and PIL processor."""
    model = load_tiny_vision(tiny_vision[0])
    proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=602112)

    def embed(path):
        inputs = proc(images=[hf_load_image(str(path))], return_tensors="pt")
        with torch.no_grad():
            out = model(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        out = getattr(out, "pooler_output", out)
        return out.double().numpy(), inputs["image_grid_thw"][0].tolist()

    return embed


def png(tmp_path, w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA").convert(mode)
    path = tmp_path / f"{w}x{h}-{mode}.png"
    im.save(path)
    return path


@pytest.mark.parametrize("w, h", SIZES)
def test_embeddings_equal_transformers(tmp_path, encoder, reference, w, h):
    path = png(tmp_path, w, h)
    p = prepare(load_image(path))
    e = encoder.encode(p, name=str(path))
    ref, grid = reference(path)
    assert grid == [1, 2 * e.ny, 2 * e.nx] and (e.nx, e.ny) == (p.grid_w, p.grid_h)
    assert e.embeddings.shape == (e.nx * e.ny, 64) == ref.shape and e.embeddings.dtype == np.float32
    err = rel(e.embeddings, ref)
    print(f"{w}x{h} -> {e.nx}x{e.ny} tokens: relative {err:.2e}, max |diff| {np.abs(e.embeddings - ref).max():.2e}")
    assert err <= EMBED_RTOL


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_alpha_and_grey(tmp_path, encoder, reference, mode):
    path = png(tmp_path, 90, 70, mode, seed=1)
    err = rel(encoder.encode(prepare(load_image(path))).embeddings, reference(path)[0])
    print(f"{mode}: relative {err:.2e}")
    assert err <= EMBED_RTOL


def test_the_tolerance_tells_images_apart(tmp_path, encoder, reference):
    """A mirrored image, swapped channels or a neighbouring image's noise are far outside the tolerance."""
    path = png(tmp_path, 112, 84)
    ref = reference(path)[0]
    im = load_image(path)
    r, g, b = im.split()
    for wrong in (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.merge("RGB", (b, g, r)),
                  load_image(png(tmp_path, 112, 84, seed=7))):
        err = rel(encoder.encode(prepare(wrong)).embeddings, ref)
        print(f"a wrong image: relative {err:.2f}")
        assert err > 100 * EMBED_RTOL


def test_an_f32_projector_runs_unfused_attention(tmp_path, tiny_vision, llama_model, encoder, reference):
    """libmtmd's fused attention rounds Q, K and V to F16; an F32 projector is a reference, so it runs unfused
    by default (bit-equal to flash_attn=False), which is closer to transformers than fused attention."""
    path = png(tmp_path, 100, 80)
    p = prepare(load_image(path))
    ref = reference(path)[0]
    default = encoder.encode(p).embeddings
    with VisionEncoder(tiny_vision[1], llama_model, n_threads=2, flash_attn=False) as unfused, \
            VisionEncoder(tiny_vision[1], llama_model, n_threads=2, flash_attn=True) as fused:
        assert np.array_equal(default, unfused.encode(p).embeddings)
        fused_err = rel(fused.encode(p).embeddings, ref)
    print(f"F32 projector, 100x80: unfused {rel(default, ref):.2e}, fused {fused_err:.2e}")
    assert rel(default, ref) < fused_err


@pytest.mark.parametrize("w, h", [(333, 217), (60, 1200), (56, 56)])
def test_positions_equal_transformers_rope_index(tmp_path, encoder, w, h):
    """libmtmd's M-RoPE positions for the image tokens and the backbone's own (`engine.segments.Embeddings`, what
    the decoder is given) equal transformers' get_rope_index for the original's prompt shape: text, the image,
    text; the text after it continues at the image's start + n_pos."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    e = encoder.encode(prepare(load_image(png(tmp_path, w, h))))
    before, after = 7, 5
    cfg = Qwen2VLConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "num_key_value_heads": 1, "vocab_size": 256, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
                        vision_config={"depth": 1, "embed_dim": 8, "hidden_size": 16, "num_heads": 2})
    hf = Qwen2VLModel(cfg)
    types = torch.tensor([[0] * before + [1] * e.n_tokens + [0] * after])
    pos, _ = hf.get_rope_index(torch.zeros_like(types), types, image_grid_thw=torch.tensor([[1, 2 * e.ny, 2 * e.nx]]))
    pos = pos[:, 0].numpy()
    ours = Embeddings(e.embeddings, nx=e.nx, ny=e.ny)
    llama = e.rel_positions.copy()
    llama[:3] += before
    for got in (ours.positions(before), llama):
        assert got.shape == (4, e.n_tokens) and got.dtype == np.int32 and not got[3].any()
        np.testing.assert_array_equal(got[:3], pos[:, before:before + e.n_tokens])  # (t, row, column) both
    assert (pos[:, before + e.n_tokens] == before + ours.n_pos).all()


def test_an_image_that_is_not_prepared(encoder):
    im = Image.new("RGB", (100, 90))
    with pytest.raises(RerankerError, match=r"image 4 is not prepared for the vision tower \(RGB 100x90"):
        encoder.encode(PreparedImage(im, 3, 3), name="image 4")
    big = prepare(Image.new("RGB", (2000, 2000)), Sizing(max_pixels=28 * 28 * 1000))
    with pytest.raises(RerankerError, match=r"image has 961 image tokens, outside this projector's limits \(4 to 768\)"):
        encoder.encode(big)


def test_close_frees_and_later_calls_raise(tiny_vision, llama_model):
    with VisionEncoder(tiny_vision[1], llama_model) as enc:
        assert enc.uses_mrope and not enc.closed
    assert enc.closed
    enc.close()  # twice is fine
    with pytest.raises(RerankerError, match="is closed"):
        enc.encode(prepare(Image.new("RGB", (56, 56))))


def test_header_checks_name_the_file_and_the_fix(tmp_path, tiny_ggufs):
    with pytest.raises(RerankerError, match=r"mmproj file not found: .*nowhere\.gguf; pass the vision projector"):
        check_mmproj(tmp_path / "nowhere.gguf", 64)
    (tmp_path / "x.gguf").write_bytes(b"PK\3\4 zip")
    with pytest.raises(RerankerError, match=r"x\.gguf is not a GGUF file"):
        check_mmproj(tmp_path / "x.gguf", 64)
    with pytest.raises(RerankerError, match=r"has architecture 'qwen2vl', so it is not a vision projector"):
        check_mmproj(tiny_ggufs["f32"], 64)
    base = {"general.architecture": "clip", "clip.has_vision_encoder": True, "clip.projector_type": "qwen2vl_merger",
            "clip.vision.projection_dim": 64}
    one = np.zeros(4, np.float32)
    assert check_mmproj(write_gguf(tmp_path / "ok.gguf", base, {"t": one}, arch="clip"), 64)
    for change, match in [({"clip.projector_type": "qwen2.5vl_merger"}, "is a 'qwen2.5vl_merger' projector; jina-reranker-m0 "
                                                                          "needs Qwen2-VL's"),
                          ({"clip.has_vision_encoder": False}, "has no vision encoder"),
                          ({"clip.vision.projection_dim": 32}, "projects images to 32 dimensions but the backbone's hidden "
                                                                "size is 64: the projector belongs to another model")]:
        path = write_gguf(tmp_path / "bad.gguf", {**base, **change}, {"t": one}, arch="clip")
        with pytest.raises(RerankerError, match=match):
            check_mmproj(path, 64)


def test_no_model(tiny_vision):
    with pytest.raises(RerankerError, match="needs a loaded llama.cpp model"):
        VisionEncoder(tiny_vision[1], ctypes.c_void_p(0).value)


@pytest.mark.slow  # converts a second vision tower (~10 s)
def test_a_projector_for_another_backbone(tmp_path, llama_cpp_src, llama_model, monkeypatch):
    """A real mmproj whose merger outputs 32 dimensions, for the 64-dimension backbone: our header check says so,
    and without it libmtmd refuses the pair too, its reason carried in the error."""
    ckpt = write_tiny_vision_checkpoint(tmp_path / "vision-32", text_hidden=32)
    mmproj = convert_mmproj(llama_cpp_src, ckpt, tmp_path / "mmproj-32.gguf")
    with pytest.raises(RerankerError, match="projects images to 32 dimensions but the backbone's hidden size is 64"):
        VisionEncoder(mmproj, llama_model)
    monkeypatch.setattr(encode_mod, "check_mmproj", lambda path, n_embd: path)
    with pytest.raises(RerankerError, match=r"libmtmd could not load the vision projector .*mismatch between text model "
                                            r"\(n_embd = 64\) and mmproj \(n_embd = 32\)"):
        VisionEncoder(mmproj, llama_model)


@pytest.mark.slow  # two conversions (~10 s)
@pytest.mark.parametrize("outtype, bound", [("f16", 3e-3), ("q8_0", 5e-2)])
def test_quantized_projectors(tmp_path, tiny_vision, llama_cpp_src, llama_model, reference, outtype, bound):
    """F16 and Q8_0 projectors from the same converter: their drift from transformers, measured (F16 <= 1.0e-3,
    Q8_0 <= 1.9e-2 relative on these images) and bounded."""
    mmproj = convert_mmproj(llama_cpp_src, tiny_vision[0], tmp_path / f"mmproj-{outtype}.gguf", outtype)
    with VisionEncoder(mmproj, llama_model, n_threads=2) as enc:
        for w, h in [(20, 30), (333, 217)]:
            path = png(tmp_path, w, h)
            err = rel(enc.encode(prepare(load_image(path))).embeddings, reference(path)[0])
            print(f"{outtype} {w}x{h}: relative {err:.2e}")
            assert err <= bound
