"""Tests for the PyTorch scoring head (package `head`): formats, errors, training and streaming."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import struct
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from head import LOGIT_BIAS, HeadLoadError, ScoringHead, score_embeddings
from head.fused import get_scorer
from reranker.errors import RerankerError

H = 32


def release_arrays(hidden: int = H, seed: int = 0, dtype=np.float32, flat_w2: bool = False) -> dict[str, np.ndarray]:
    """Random weights in the release npz layout, scaled so probabilities are spread over (0, 1)."""
    rng = np.random.default_rng(seed)
    w2 = rng.normal(0, 1.5 / np.sqrt(hidden), (hidden, 1))
    return {
        "W1": rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden)).astype(dtype),
        "b1": rng.normal(0, 0.1, hidden).astype(dtype),
        "W2": (w2.reshape(hidden) if flat_w2 else w2).astype(dtype),
        "b2": np.array([2.5], dtype=dtype),
        "logit_bias": np.array([LOGIT_BIAS], dtype=dtype),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool = False) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def upstream(path: Path, x: np.ndarray, as_float64: bool = False) -> np.ndarray:
    """The upstream numpy snippet, verbatim apart from the optional float64 upcast."""
    with np.load(path) as data:
        W1, b1, W2, b2 = data["W1"], data["b1"], data["W2"], data["b2"]
        logit_bias = float(data["logit_bias"][0])
    if as_float64:
        W1, b1, W2, b2, x = (a.astype(np.float64) for a in (W1, b1, W2, b2, x))
    mlp = lambda x: 1 / (1 + np.exp(-((np.maximum(0, x @ W1 + b1) @ W2 + b2) - logit_bias)))  # noqa: E731
    return mlp(x).reshape(x.shape[:-1])


def original_state_dict(arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, torch.Tensor]:
    """What the HF checkpoint holds for the same head."""
    a = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    return {
        prefix + "score.0.weight": a["W1"].T.contiguous(),
        prefix + "score.0.bias": a["b1"],
        prefix + "score.2.weight": a["W2"].reshape(1, -1).contiguous(),
        prefix + "score.2.bias": a["b2"].reshape(1),
    }


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    return release_arrays()


@pytest.fixture
def npz(tmp_path: Path, arrays) -> Path:
    return write_npz(tmp_path / "mlp_weights.npz", arrays)


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (257, H)).astype(np.float32)


def same_params(a: ScoringHead, b: ScoringHead) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- numerics against the upstream formula ---------------------------------------------------


def test_matches_upstream_formula_float32(npz, x):
    head = ScoringHead.from_npz(npz)
    got = head(torch.from_numpy(x)).detach().numpy()
    ref32, ref64 = upstream(npz, x), upstream(npz, x, as_float64=True)
    assert ref64.std() > 0.05, "weights should give non-saturated probabilities"
    assert got.dtype == np.float32 and got.shape == (257,)
    np.testing.assert_allclose(got, ref32, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, ref64, rtol=0, atol=1e-6)
    assert head.hidden_size == H and float(head.logit_bias) == pytest.approx(LOGIT_BIAS)


def test_logits_then_sigmoid_equals_forward(npz, x):
    head = ScoringHead.from_npz(npz)
    t = torch.from_numpy(x)
    assert torch.equal(torch.sigmoid(head.logits(t)), head(t))


@pytest.mark.parametrize("shape", [(7, H), (3, 5, H), (H,)])
def test_output_shape_drops_last_dim(npz, shape):
    head = ScoringHead.from_npz(npz)
    out = head(torch.randn(shape))
    assert out.shape == shape[:-1]
    assert head.logits(torch.randn(shape)).shape == shape[:-1]


def test_half_precision_npz_loads(tmp_path, x):
    path = write_npz(tmp_path / "half.npz", release_arrays(dtype=np.float16))
    head = ScoringHead.from_npz(path)
    assert head.fc1.weight.dtype == torch.float32
    np.testing.assert_allclose(
        head(torch.from_numpy(x)).detach().numpy(), upstream(path, x, as_float64=True), atol=1e-6
    )


def test_flat_w2_and_compressed_npz_load_identically(tmp_path, npz, x):
    flat = write_npz(tmp_path / "flat.npz", release_arrays(flat_w2=True), compressed=True)
    a, b = ScoringHead.from_npz(npz), ScoringHead.from_npz(flat)
    same_params(a, b)
    np.testing.assert_allclose(b(torch.from_numpy(x)).detach().numpy(), upstream(flat, x), atol=1e-6)


# -- format round trips -----------------------------------------------------------------------


def test_npz_safetensors_npz_round_trip_is_bitwise(tmp_path, npz, arrays):
    ScoringHead.from_npz(npz).save_safetensors(tmp_path / "head.safetensors")
    back = ScoringHead.from_safetensors(tmp_path / "head.safetensors")
    back.save_npz(tmp_path / "again.npz")
    with np.load(tmp_path / "again.npz", allow_pickle=False) as out:
        assert sorted(out.files) == sorted(arrays)
        for k, v in arrays.items():
            assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
            assert out[k].tobytes() == v.tobytes(), k
    assert set(load_file(tmp_path / "head.safetensors")) == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "logit_bias",
    }


def test_half_npz_round_trip_is_bitwise(tmp_path):
    arrays = release_arrays(dtype=np.float16)
    ScoringHead.from_npz(write_npz(tmp_path / "h.npz", arrays)).save_npz(tmp_path / "o.npz", dtype=np.float16)
    with np.load(tmp_path / "o.npz") as out:
        for k in ("W1", "b1", "W2", "b2"):
            assert out[k].dtype == np.float16 and np.array_equal(out[k], arrays[k]), k
        assert float(out["logit_bias"][0]) == float(arrays["logit_bias"][0])


def test_save_npz_writes_exact_path_and_release_layout(tmp_path, npz):
    target = tmp_path / "weights.bin"  # np.savez alone would append '.npz'
    ScoringHead.from_npz(npz).save_npz(target)
    with np.load(target) as out:
        assert out["W1"].shape == (H, H) and out["W2"].shape == (H, 1)
        assert out["b2"].shape == (1,) and out["logit_bias"].shape == (1,)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_from_checkpoint_state_dict_matches_npz(npz, arrays, x):
    ref = ScoringHead.from_npz(npz)
    for sd in (original_state_dict(arrays), original_state_dict(arrays, prefix="model.")):
        head = ScoringHead.from_checkpoint(sd)
        same_params(head, ref)
        assert torch.equal(head(torch.from_numpy(x)), ref(torch.from_numpy(x)))


def test_from_checkpoint_reads_only_score_tensors_from_files(tmp_path, npz, arrays):
    ref = ScoringHead.from_npz(npz)
    sd = {k: v.to(torch.bfloat16).float() for k, v in original_state_dict(arrays).items()}
    backbone = {"model.layers.0.mlp.down_proj.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(3, 2)}
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    save_file({**backbone, **{k: v.to(torch.bfloat16) for k, v in sd.items()}}, model_dir / "model.safetensors")
    for source in (model_dir / "model.safetensors", model_dir, str(model_dir)):
        head = ScoringHead.from_checkpoint(source)
        for k, v in sd.items():
            assert torch.equal(head.original_state_dict()[k], v), k

    # Sharded: the head lives in the second shard, next to unrelated tensors.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file(backbone, sharded / "model-00001-of-00002.safetensors")
    save_file(original_state_dict(arrays), sharded / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in backbone}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in sd})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for source in (sharded, sharded / "model.safetensors.index.json"):
        same_params(ScoringHead.from_checkpoint(source), ref)


def test_original_state_dict_loads_into_plain_sequential(npz, x):
    head = ScoringHead.from_npz(npz)
    sd = head.original_state_dict()
    assert list(sd) == ["score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"]
    seq = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 1))
    seq.load_state_dict({k.removeprefix("score."): v for k, v in sd.items()})
    wrapper = nn.Module()
    wrapper.score = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 1))
    wrapper.load_state_dict(sd)  # the exact names the original model uses
    t = torch.from_numpy(x)
    with torch.no_grad():
        raw = seq(t).squeeze(-1)
        assert torch.equal(raw, wrapper.score(t).squeeze(-1))
        assert torch.equal(raw - head.logit_bias, head.logits(t))


def test_save_checkpoint_round_trip_and_generic_load(tmp_path, npz):
    head = ScoringHead.from_npz(npz)
    head.save_checkpoint(tmp_path / "score.safetensors")
    head.save_safetensors(tmp_path / "head.safetensors", metadata={"note": "test"})
    for path in (npz, tmp_path / "score.safetensors", tmp_path / "head.safetensors"):
        same_params(ScoringHead.load(path), head)


def test_loading_does_not_advance_torch_rng(npz):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ScoringHead.from_npz(npz)
    assert torch.equal(torch.rand(3), expected)


# -- errors -----------------------------------------------------------------------------------


def assert_load_error(exc_info, *fragments: str) -> None:
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, ValueError)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


def test_missing_file(tmp_path):
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_npz(tmp_path / "nowhere.npz")
    assert_load_error(e, "nowhere.npz", "not found")
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_checkpoint(tmp_path / "nowhere")
    assert_load_error(e, "nowhere", "not found")


def test_missing_keys(tmp_path, arrays):
    path = write_npz(tmp_path / "partial.npz", {k: v for k, v in arrays.items() if k not in ("b2", "W2")})
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_npz(path)
    assert_load_error(e, "partial.npz", "missing", "'W2'", "'b2'")

    path = write_npz(tmp_path / "nobias.npz", {k: v for k, v in arrays.items() if k != "logit_bias"})
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_npz(path)
    assert_load_error(e, "nobias.npz", "'logit_bias'", "logit_bias=2.65")
    assert float(ScoringHead.from_npz(path, logit_bias=2.65).logit_bias) == pytest.approx(2.65)

    sd = original_state_dict(arrays)
    del sd["score.2.bias"]
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_checkpoint(sd)
    assert_load_error(e, "state dict", "missing", "'score.2.bias'")
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_checkpoint({"model.layers.0.weight": torch.zeros(2)})
    assert_load_error(e, "no scoring-head tensors", "score.0.weight")


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("b1", np.zeros(H + 1, np.float32), "'b1' has shape (33,)"),
        ("W2", np.zeros((H - 1, 1), np.float32), "'W2' has shape (31, 1)"),
        ("b2", np.zeros(2, np.float32), "'b2' has shape (2,)"),
        ("W1", np.zeros((H, H + 2), np.float32), "'W1' has shape (32, 34)"),
    ],
)
def test_wrong_shapes(tmp_path, arrays, key, value, fragment):
    path = write_npz(tmp_path / "bad_shape.npz", {**arrays, key: value})
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_npz(path)
    assert_load_error(e, "bad_shape.npz", fragment, "expected")


def test_wrong_shapes_in_checkpoint(arrays):
    sd = original_state_dict(arrays)
    sd["score.2.weight"] = torch.zeros(1, H * 2)
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_checkpoint(sd)
    assert_load_error(e, "'score.2.weight' has shape (1, 64)", "H=32")


def test_non_finite_weights(tmp_path, arrays):
    bad = arrays["W1"].copy()
    bad[3, 4] = np.nan
    path = write_npz(tmp_path / "nan.npz", {**arrays, "W1": bad})
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_npz(path)
    assert_load_error(e, "nan.npz", "'W1'", "non-finite")
    sd = original_state_dict(arrays)
    sd["score.0.bias"][0] = float("inf")
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_checkpoint(sd)
    assert_load_error(e, "'score.0.bias'", "non-finite")


def test_pickled_object_arrays_are_refused(tmp_path, arrays):
    path = write_npz(tmp_path / "objects.npz", {**arrays, "b1": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_npz(path)
    assert_load_error(e, "objects.npz", "'b1'", "pickled")


def test_corrupt_files(tmp_path, npz):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive at all")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros(3))
    for path, fragment in ((junk, "not an .npz archive"), (truncated, "corrupt"), (single, "single .npy")):
        with pytest.raises(HeadLoadError) as e:
            ScoringHead.from_npz(path)
        assert_load_error(e, path.name, fragment)

    bad_member = tmp_path / "badcrc.npz"
    write_npz(bad_member, release_arrays(), compressed=True)
    data = bytearray(bad_member.read_bytes())
    with zipfile.ZipFile(bad_member) as zf:
        info = zf.getinfo("W1.npy")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0xFF  # flip a byte in the middle of W1's compressed data
    bad_member.write_bytes(bytes(data))
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_npz(bad_member)
    assert_load_error(e, "badcrc.npz", "corrupt")
    assert e.value.__cause__ is not None

    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x00" * 40)
    for load in (ScoringHead.from_safetensors, ScoringHead.from_checkpoint):
        with pytest.raises(HeadLoadError) as e:
            load(junk_st)
        assert_load_error(e, "junk.safetensors", "not a readable safetensors file")


def test_from_safetensors_points_original_checkpoints_to_from_checkpoint(tmp_path, arrays):
    save_file(original_state_dict(arrays), tmp_path / "model.safetensors")
    with pytest.raises(HeadLoadError) as e:
        ScoringHead.from_safetensors(tmp_path / "model.safetensors")
    assert_load_error(e, "model.safetensors", "from_checkpoint")


def test_wrong_hidden_size_at_call_time(npz):
    head = ScoringHead.from_npz(npz)
    with pytest.raises(RerankerError, match=r"\(\.\.\., 32\).*last dimension 48.*hidden size 32"):
        head(torch.randn(4, 48))
    with pytest.raises(RerankerError, match=r"\(\.\.\., 32\).*shape \(4, 48\).*hidden size 32"):
        score_embeddings(head, np.zeros((4, 48), np.float32))


# Every caller mistake is a RerankerError (README: the one exception callers catch), whose message names
# the input and the fix; not a TypeError or a bare ValueError from deep inside torch or numpy.
CALLER_MISTAKES = {
    "head on a numpy array": (lambda h, p: h(np.zeros((2, H), np.float32)), r"torch tensor.*ndarray.*torch\.from_numpy"),
    "head on int embeddings": (lambda h, p: h(torch.zeros((2, H), dtype=torch.int64)), r"float embeddings.*int64.*x\.float\(\)"),
    "head on a scalar": (lambda h, p: h(torch.tensor(1.0)), r"\(\.\.\., 32\).*a scalar"),
    "hidden_size 0": (lambda h, p: ScoringHead(0), r"hidden_size=0.*integer >= 1"),
    "hidden_size float": (lambda h, p: ScoringHead(1536.0), r"hidden_size=1536\.0.*integer >= 1"),
    "int array": (lambda h, p: score_embeddings(h, np.zeros((2, H), np.int32)), r"float16/32/64 embeddings.*int32.*astype"),
    "int tensor": (lambda h, p: score_embeddings(h, torch.zeros((2, H), dtype=torch.int32)), r"float embeddings.*int32.*float\(\)"),
    "a list": (lambda h, p: score_embeddings(h, [[0.0] * H]), r"numpy array, a torch tensor or a \.npy path, got list.*np\.asarray"),
    "scalar array": (lambda h, p: score_embeddings(h, np.zeros((), np.float32)), r"shape \(\.\.\., 32\), got shape \(\)"),
    "missing .npy": (lambda h, p: score_embeddings(h, p / "missing.npy"), r"missing\.npy.*\.npy array.*existing float \.npy"),
    "not a .npy": (lambda h, p: score_embeddings(h, p / "mlp_weights.txt"), r"mlp_weights\.txt.*\.npy array"),
    "batch_size 0": (lambda h, p: score_embeddings(h, np.zeros((2, H), np.float32), batch_size=0), r"batch_size=0.*integer >= 1"),
    "batch_size float": (lambda h, p: score_embeddings(h, np.zeros((2, H), np.float32), batch_size=2.5), r"batch_size=2\.5"),
    "bad device": (lambda h, p: score_embeddings(h, np.zeros((2, H), np.float32), device="gpu0"), r"device='gpu0'.*'cpu', 'cuda'"),
    "save_npz int dtype": (lambda h, p: h.save_npz(p / "x.npz", dtype=np.int8), r"int8.*not a float dtype.*np\.float32"),
    "save_npz bad dtype": (lambda h, p: h.save_npz(p / "x.npz", dtype="float17"), r"'float17'.*not a numpy dtype"),
    "logit_bias NaN": (lambda h, p: ScoringHead(H, logit_bias=float("nan")), r"logit_bias=nan is not a finite number"),
    "logit_bias text": (lambda h, p: ScoringHead(H, logit_bias="high"), r"logit_bias='high' is not a finite number"),
    "long double array": (lambda h, p: score_embeddings(h, np.zeros((2, H), np.longdouble)),
                          r"float16/32/64 embeddings.*float(128|96|64).*astype"),
}


@pytest.mark.parametrize("mistake", list(CALLER_MISTAKES))
def test_each_caller_mistake_is_a_reranker_error(mistake, npz, tmp_path):
    head = ScoringHead.from_npz(npz)
    (tmp_path / "mlp_weights.txt").write_text("not an array")
    call, message = CALLER_MISTAKES[mistake]
    with pytest.raises(RerankerError, match=message) as e:
        call(head, tmp_path)
    assert type(e.value) is RerankerError  # a caller mistake, not a head file problem (HeadLoadError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_device_without_cuda_is_a_reranker_error(npz):
    with pytest.raises(RerankerError, match=r"device='cuda'.*no CUDA device.*device='cpu'"):
        score_embeddings(ScoringHead.from_npz(npz), np.zeros((2, H), np.float32), device="cuda")


def test_from_checkpoint_of_a_non_path_is_a_head_load_error():
    with pytest.raises(HeadLoadError, match=r"path or a state dict, got int.*jina-reranker-m0 checkpoint"):
        ScoringHead.from_checkpoint(42)


# -- dtypes, autocast, compile ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_float32_head(npz, x, dtype):
    head = ScoringHead.from_npz(npz)
    t = torch.from_numpy(x)
    out = head(t.to(dtype))
    assert out.dtype == torch.float32
    # Only the input rounding differs from the float32 result.
    torch.testing.assert_close(out, head(t.to(dtype).float()), rtol=0, atol=0)
    torch.testing.assert_close(out, head(t), rtol=0, atol=2e-2)


def test_bfloat16_head(npz, x):
    head = ScoringHead.from_npz(npz)
    out = head.to(torch.bfloat16)(torch.from_numpy(x))
    assert out.dtype == torch.bfloat16
    np.testing.assert_allclose(out.float().detach().numpy(), upstream(npz, x), atol=3e-2)


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_dtype_casts_keep_the_logit_bias_exact(tmp_path, npz, x, cast):
    # A calibration constant, not a weight: a bf16 round trip must not leave 2.65625 behind (nor in saved files).
    head = ScoringHead.from_npz(npz)
    stored = head.logit_bias.clone()
    cast_head = getattr(head, cast)()
    assert torch.equal(cast_head.logit_bias, stored) and cast_head.fc1.weight.dtype == getattr(torch, cast if cast != "half" else "float16")
    assert cast_head(torch.from_numpy(x)).dtype == cast_head.fc1.weight.dtype
    cast_head.float().save_npz(tmp_path / "back.npz")
    with np.load(tmp_path / "back.npz") as saved:
        assert saved["logit_bias"][0] == np.float32(LOGIT_BIAS)
    with torch.device("meta"):
        assert "logit_bias=(meta)" in repr(ScoringHead(H))


def test_save_checkpoint_keeps_a_custom_logit_bias(tmp_path, arrays, npz):
    head = ScoringHead.from_npz(npz, logit_bias=3.0)
    (tmp_path / "ck").mkdir()
    head.save_checkpoint(tmp_path / "ck" / "model.safetensors")
    for source in (tmp_path / "ck" / "model.safetensors", tmp_path / "ck"):
        assert float(ScoringHead.load(source).logit_bias) == 3.0
        assert float(ScoringHead.from_checkpoint(source, logit_bias=2.0).logit_bias) == 2.0  # the caller's wins
    # An original checkpoint stores none: the model's constant.
    save_file(original_state_dict(arrays), str(tmp_path / "original.safetensors"))
    assert float(ScoringHead.load(tmp_path / "original.safetensors").logit_bias) == pytest.approx(LOGIT_BIAS)
    save_file(original_state_dict(arrays), str(tmp_path / "bad.safetensors"), metadata={"logit_bias": "nan"})
    with pytest.raises(HeadLoadError, match=r"bad\.safetensors.*logit_bias='nan', not a finite number.*logit_bias=\.\.\."):
        ScoringHead.load(tmp_path / "bad.safetensors")


def test_head_weights_built_by_hand_are_checked(npz):
    w = ScoringHead.from_npz(npz).weights()
    for field, value, message in [
        ("fc1_bias", torch.tensor([0.5]), r"'fc1_bias' has shape \(1,\), expected \(32,\)"),
        ("fc2_weight", torch.zeros(H, 1), r"'fc2_weight' has shape \(32, 1\), expected \(1, 32\)"),
        ("fc2_bias", torch.tensor([float("nan")]), r"'fc2_bias' contains 1 non-finite"),
        ("fc1_weight", torch.zeros(H, H, dtype=torch.int32), r"'fc1_weight' must be a float tensor, got torch.int32"),
    ]:
        with pytest.raises(HeadLoadError, match=message):
            ScoringHead.from_weights(dataclasses.replace(w, **{field: value}))


def test_autocast_bfloat16_on_cpu(npz, x):
    head = ScoringHead.from_npz(npz)
    t = torch.from_numpy(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(t)
        streamed = score_embeddings(head, x, batch_size=100)
    # The mat-muls in bf16; the bias and sigmoid in the head's float32, which a loss downstream wants.
    assert out.dtype == torch.float32 and streamed.dtype == np.float32
    ref = upstream(npz, x)
    np.testing.assert_allclose(out.float().detach().numpy(), ref, atol=3e-2)
    np.testing.assert_allclose(streamed, ref, atol=3e-2)


def _compile_available() -> bool:
    try:
        import torch._dynamo as dynamo

        return dynamo.is_dynamo_supported() and shutil.which("g++") is not None
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _compile_available(), reason="torch.compile (dynamo + a C++ compiler) unavailable")
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")  # raised inside inductor
def test_torch_compile_matches_eager_on_cpu(npz, x):
    head = ScoringHead.from_npz(npz)
    t = torch.from_numpy(x)
    with torch.no_grad():
        eager = head(t)
        compiled = torch.compile(head)(t)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # The fused streaming path, compiled on request; a silent fallback to eager would warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        streamed = score_embeddings(head, x, compile=True)
    assert get_scorer(True).compiled
    np.testing.assert_allclose(streamed, eager.numpy(), rtol=0, atol=1e-6)


# -- fine-tuning (issue 4) --------------------------------------------------------------------


def test_gradients_flow_to_all_parameters(npz, x):
    head = ScoringHead.from_npz(npz)
    head(torch.from_numpy(x)).sum().backward()
    assert [n for n, _ in head.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "logit_bias" in dict(head.named_buffers())


def test_short_bce_fine_tune_lowers_loss():
    torch.manual_seed(0)
    teacher, student = ScoringHead(H), ScoringHead(H)
    emb = torch.randn(2048, H)
    with torch.no_grad():
        teacher_logits = teacher.logits(emb)
        labels = (teacher_logits > teacher_logits.median()).float()
    loss_fn = nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    with torch.no_grad():
        initial = loss_fn(student.logits(emb), labels).item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn(student.logits(emb), labels)
        loss.backward()
        opt.step()
    final = loss_fn(student.logits(emb), labels).item()
    assert final < 0.5 * initial, (initial, final)
    assert float(student.logit_bias) == pytest.approx(LOGIT_BIAS)  # a buffer: untouched by the optimiser


# -- streaming --------------------------------------------------------------------------------


def test_score_embeddings_numpy_mmap_and_tensor(tmp_path, npz):
    head = ScoringHead.from_npz(npz)
    emb = np.random.default_rng(2).normal(0, 1, (1000, H)).astype(np.float32)
    with torch.no_grad():
        expected = head(torch.from_numpy(emb)).numpy()
    np.save(tmp_path / "emb.npy", emb)
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")
    for data in (emb, tmp_path / "emb.npy", str(tmp_path / "emb.npy"), mm, torch.from_numpy(emb)):
        got = score_embeddings(head, data, batch_size=300)  # 300 does not divide 1000
        assert got.dtype == np.float32 and got.shape == (1000,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_score_embeddings_shapes_dtypes_and_contexts(npz):
    head = ScoringHead.from_npz(npz)
    emb = np.random.default_rng(3).normal(0, 1, (4, 25, H)).astype(np.float32)
    with torch.no_grad():
        expected = head(torch.from_numpy(emb)).numpy()
    with torch.inference_mode():
        got = score_embeddings(head, emb, batch_size=7)
    assert got.shape == (4, 25)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(score_embeddings(head, emb.astype(np.float64)), expected, atol=1e-6)
    np.testing.assert_allclose(
        score_embeddings(head, emb.astype(np.float16), batch_size=33),
        head(torch.from_numpy(emb.astype(np.float16))).detach().numpy(),
        atol=1e-6,
    )
    assert score_embeddings(head, np.zeros((0, H), np.float32)).shape == (0,)


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_score_embeddings_streams_layouts_no_view_can_flatten(tmp_path, npz, layout):
    # A Fortran-order (B, T, H) .npy: reshaping it to rows would copy the whole file into memory first.
    head = ScoringHead.from_npz(npz)
    emb = np.random.default_rng(4).normal(0, 1, (16, 512, H)).astype(np.float32)
    expected = score_embeddings(head, emb)
    if layout == "fortran":
        np.save(tmp_path / "f.npy", np.asfortranarray(emb))
        data, want = np.load(tmp_path / "f.npy", mmap_mode="r"), expected
    else:
        data, want = np.random.default_rng(5).normal(0, 1, (16, 1024, H)).astype(np.float32)[:, ::2], None
        want = score_embeddings(head, np.ascontiguousarray(data))
    tracemalloc.start()
    try:
        got = score_embeddings(head, data, batch_size=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (16, 512)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert peak < emb.nbytes / 8, f"{peak} bytes held for a {emb.nbytes}-byte array"
    np.testing.assert_allclose(score_embeddings(head, torch.from_numpy(np.asfortranarray(emb)), batch_size=100),
                               expected, rtol=0, atol=1e-6)


def test_score_embeddings_rejects_npz_path(tmp_path, npz):
    with pytest.raises(RerankerError, match=r"\.npz archive; pass one array from it"):
        score_embeddings(ScoringHead.from_npz(npz), npz)


def test_npz_header_claiming_a_huge_array_is_refused_before_reading(tmp_path, arrays):
    """A crafted .npy header inside the npz claims (200000, 200000): refused from the header, never allocated."""
    path = write_npz(tmp_path / "crafted.npz", {k: v for k, v in arrays.items() if k != "W1"})
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (200000, 200000)})
    member.write(arrays["W1"].tobytes())
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("W1.npy", member.getvalue())
    with pytest.raises(HeadLoadError, match=r"'W1' claims shape \(200000, 200000\)"):
        ScoringHead.from_npz(path)
