"""The fast path's BF16 re-encode of F16 GGUFs, its automatic choice, and the thread default."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import write_gguf

from reranker.engine import cpu, identity
from reranker.engine.identity import BF16_TENSORS_KEY, REENCODE_KEY, bf16_exact, cached_copies, to_bf16, with_identity_output
from reranker.errors import RerankerError
from reranker.gguf.header import header_value
from reranker.gguf.layout import read_layout

N_EMBD, N_VOCAB = 8, 16


def _all_f16() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def test_tables_agree_with_torch_on_every_f16_value():
    x = _all_f16()
    finite = np.isfinite(x) | np.isinf(x)
    t = torch.from_numpy(x.copy())
    exact_torch = (t.to(torch.bfloat16).to(torch.float32) == t.to(torch.float32)).numpy()
    exact_ours = np.array([bf16_exact(x[i : i + 1]) for i in range(x.size)])
    assert np.array_equal(exact_ours[finite], exact_torch[finite])
    bits = to_bf16(x)
    torch_bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits[exact_ours & finite], torch_bits[exact_ours & finite])
    assert exact_ours.sum() == 8960  # normals with 3 spare mantissa bits, short subnormals, zeros, inf and some NaNs


def _tiny_gguf(path, tensors: dict[str, np.ndarray], file_type=gguf.LlamaFileType.MOSTLY_F16):
    """A minimal GGUF that `with_identity_output` accepts (no llama.cpp involved)."""
    kv = {"qwen2vl.embedding_length": N_EMBD, "general.file_type": int(file_type), "tokenizer.ggml.model": "gpt2",
          "tokenizer.ggml.tokens": [f"t{i}" for i in range(N_VOCAB)]}
    return write_gguf(path, kv, tensors)


def test_only_bf16_exact_tensors_are_reencoded(tmp_path):
    rng = np.random.default_rng(0)
    exact = torch.randn(N_VOCAB, N_EMBD).to(torch.bfloat16).to(torch.float16).numpy()
    lossy = exact.copy()
    lossy[3, 5] = np.float16(1.0009765625)  # 1 + 2^-10: the lowest F16 mantissa bit, not in BF16
    norm = rng.standard_normal(N_EMBD).astype(np.float32)
    src = _tiny_gguf(tmp_path / "m-F16.gguf", {"token_embd.weight": exact, "blk.0.attn_q.weight": lossy,
                                               "output_norm.weight": norm})
    cache = tmp_path / "cache"
    copy = with_identity_output(src, "f32", cache, bf16=True)
    r = gguf.GGUFReader(copy)
    t = {x.name: x for x in r.tensors}
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    got = torch.from_numpy(np.asarray(t["token_embd.weight"].data).view(np.int16).reshape(exact.shape).copy())
    assert torch.equal(got.view(torch.bfloat16).to(torch.float32), torch.from_numpy(exact).to(torch.float32))
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # would lose a bit: kept
    assert np.array_equal(np.asarray(t["blk.0.attn_q.weight"].data).reshape(lossy.shape), lossy)
    assert t["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert r.fields[BF16_TENSORS_KEY].contents() == 1 and r.fields[REENCODE_KEY].contents() == "bf16"
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16  # not all: stays F16

    # Off: another cache entry, the F16 tensors untouched; both copies are listed as live.
    plain = with_identity_output(src, "f32", cache, bf16=False)
    assert plain != copy and "bf16" not in plain.name
    r2 = gguf.GGUFReader(plain)
    assert REENCODE_KEY not in r2.fields and all(x.tensor_type != gguf.GGMLQuantizationType.BF16 for x in r2.tensors)
    assert [c.stale for c in cached_copies(cache)] == [False, False]
    assert with_identity_output(src, "f32", cache, bf16=True) == copy  # reused

    # All exact: the file type says BF16. A non-F16 file is never re-encoded (same key as off).
    src2 = _tiny_gguf(tmp_path / "all-F16.gguf", {"token_embd.weight": exact})
    assert gguf.GGUFReader(with_identity_output(src2, "f32", cache, bf16=True)).fields["general.file_type"].contents() \
        == gguf.LlamaFileType.MOSTLY_BF16
    src3 = _tiny_gguf(tmp_path / "m-F32.gguf", {"token_embd.weight": exact.astype(np.float32)}, gguf.LlamaFileType.ALL_F32)
    assert with_identity_output(src3, "f32", cache, bf16=True) == with_identity_output(src3, "f32", cache, bf16=False)


def test_auto_choice(monkeypatch):
    monkeypatch.delenv(identity.BF16_ENV, raising=False)
    monkeypatch.setattr(cpu, "cpu_bf16_flags", lambda: ())
    assert identity.use_bf16(None, 0)[0] is False
    assert identity.use_bf16(True, 0)[0] is True  # explicit wins
    monkeypatch.setattr(cpu, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert identity.use_bf16(None, 0)[0] is cpu.native_bf16()[0]
    assert identity.use_bf16(False, 0) == (False, "turned off")
    monkeypatch.setenv(identity.BF16_ENV, "0")
    assert identity.use_bf16(None, 0)[0] is False
    assert identity.use_bf16(True, 0)[0] is True


def test_only_f16_files_count_as_reencoded(tmp_path):
    f16 = _tiny_gguf(tmp_path / "m-F16.gguf", {"token_embd.weight": np.zeros((N_VOCAB, N_EMBD), np.float16)})
    f32 = _tiny_gguf(tmp_path / "m-F32.gguf", {"token_embd.weight": np.zeros((N_VOCAB, N_EMBD), np.float32)},
                     gguf.LlamaFileType.ALL_F32)
    assert identity.use_bf16(True, 0, f16) == (True, "requested")
    # A job's settings record the re-encode only where it happens, so an F32 or quantized job resumes under any --bf16.
    assert identity.use_bf16(True, 0, f32) == (False, "the GGUF stores F32, not F16")


def test_build_features_parse():
    # The system info of a native AVX-512 build and of an AVX2-only build (GGML_NATIVE=OFF) of llama.cpp 0.3.36.
    native = (b"CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
              b"AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
    avx2 = b"CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
    assert cpu.built_with_bf16(native) and not cpu.built_with_bf16(avx2)
    assert {"SSE3", "AVX2", "AVX512", "AMX_INT8"} <= cpu.build_features(native)
    assert "SSE3" in cpu.build_features(avx2) and not {"AVX512", "AVX512_BF16"} & cpu.build_features(avx2)


def test_cpu_flags_parse(monkeypatch):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: "processor: 0\nflags\t: fpu avx2 amx_bf16 avx512_bf16\n\n")
    assert cpu.cpu_bf16_flags() == ("avx512_bf16", "amx_bf16")
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: "processor: 0\nflags\t: fpu avx2 f16c\n")
    assert cpu.cpu_bf16_flags() == ()
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: "")  # macOS and others: auto keeps F16
    assert cpu.native_bf16()[0] is False


def test_default_threads(monkeypatch):
    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    info = "".join(f"processor: {i}\nphysical id: 0\ncore id: {i // 2}\n\n" for i in range(8))  # 4 cores, SMT 2
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: info)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (3.0, 3.0, 3.0))  # a job that just ended: not what decides
    monkeypatch.setattr(cpu, "_busy_now", lambda cpus: 0.1)
    assert cpu.default_threads() == 4
    monkeypatch.setattr(cpu, "_busy_now", lambda cpus: 1.2)
    assert cpu.default_threads() == 3
    monkeypatch.setattr(cpu, "_busy_now", lambda cpus: None)  # no /proc/stat: the load average decides
    assert cpu.default_threads() == 1
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 2)
    monkeypatch.setattr(cpu, "_busy_now", lambda cpus: 0.0)
    assert cpu.default_threads() == 2
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda _: {0}, raising=False)
    assert cpu.default_threads() == 1
    monkeypatch.setenv(cpu.THREADS_ENV, "2")
    assert cpu.default_threads() == 2
    # A value that is not a usable thread count is named, not ignored (nor 1000 threads taken on 2 cores).
    for bad in ("abc", "0", "-1", "1000"):
        monkeypatch.setenv(cpu.THREADS_ENV, bad)
        with pytest.raises(RerankerError, match=f"RERANKER_THREADS='{bad}' is not a thread count: set it to 1 .. 512"):
            cpu.default_threads()


def test_extra_buffers_switch_is_checked(monkeypatch):
    from reranker.engine import backbone

    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv(backbone.CPU_EXTRA_BUFFERS_ENV, value)
        assert backbone.cpu_extra_buffers() is want
    monkeypatch.setenv(backbone.CPU_EXTRA_BUFFERS_ENV, "yes")
    with pytest.raises(RerankerError, match="RERANKER_CPU_EXTRA_BUFFERS='yes' is not a switch"):
        backbone.cpu_extra_buffers()


def test_threads_for_busy_cores():
    assert [cpu.threads_for(2, b) for b in (0.0, 0.5, 0.74, 0.75, 1.0, 1.8, 5.0)] == [2, 2, 2, 1, 1, 1, 1]
    assert [cpu.threads_for(16, b) for b in (0.0, 0.8, 2.9, 15.9)] == [16, 15, 13, 1]


def test_cgroup_quota(tmp_path):
    assert cpu.cgroup_cpu_limit(tmp_path) is None  # no cgroup files
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path) is None
    for quota, want in (("150000 100000", 1), ("400000 100000", 4), ("50000 100000", 1)):
        (tmp_path / "cpu.max").write_text(quota + "\n")
        assert cpu.cgroup_cpu_limit(tmp_path) == want
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpu_limit(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cpu.cgroup_cpu_limit(v1) == 3


def test_busy_ticks_read_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 500 5 0 0 0 0 0\n"  # the total line is not a core
                    "cpu0 1 2 3 1000 50 4 5 6 0 0\n"
                    "cpu1 100 0 0 10 0 0 0 0 0 0\n"
                    "intr 12345\n")
    assert cpu._busy_ticks(frozenset({0}), stat) == 1 + 2 + 3 + 4 + 5 + 6  # idle and iowait left out
    assert cpu._busy_ticks(frozenset({0, 1}), stat) == 121
    assert cpu._busy_ticks(frozenset({7}), stat) is None


@pytest.mark.skipif(not Path("/proc/stat").is_file() or not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_busy_cores_sees_another_process_spinning_on_a_core():
    """A real process spinning on one core: the sample counts it busy (what the 1-minute load average would only show
    after a minute, and keep showing for minutes after it stopped)."""
    core = min(os.sched_getaffinity(0))
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    try:
        time.sleep(0.3)
        assert cpu.busy_cores(frozenset({core})) >= 0.75
    finally:
        spin.kill()
        spin.wait()


def test_cli_option():
    import argparse

    from reranker.cli.common import add_model_args, bf16_option

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert bf16_option(p.parse_args([])) is None  # auto by default
    assert bf16_option(p.parse_args(["--bf16", "auto"])) is None
    assert bf16_option(p.parse_args(["--bf16", "off"])) is False
    assert bf16_option(p.parse_args(["--bf16", "on"])) is True


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """(F16 GGUF, BF16 GGUF, checkpoint) of one bf16 checkpoint whose values are all F16-exact, so both hold the same numbers."""
    from safetensors.torch import load_file, save_file

    from reranker.gguf.convert import convert
    from reranker.synth.random_checkpoint import synth_checkpoint

    ckpt = synth_checkpoint(tmp_path_factory.mktemp("bf16ck") / "jina-reranker-m0-tiny", preset="tiny", seed=0,
                            dtype="bfloat16")
    # bf16 -> f16 rounds values below 2^-14 (F16 subnormals); round-trip them so F16 and BF16 files agree.
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v.to(torch.float16).to(torch.bfloat16) if v.dim() > 1 else v for k, v in sd.items()},
              str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    f16, _ = convert(ckpt, tmp_path_factory.mktemp("f16"), outtype="f16")
    b16, _ = convert(ckpt, tmp_path_factory.mktemp("b16"), outtype="bf16")
    return f16, b16, ckpt


@pytest.mark.slow
def test_reencoded_copy_is_the_bf16_conversion(bf16_pair, tmp_path):
    f16, b16, _ = bf16_pair
    copy = with_identity_output(f16, "f32", tmp_path, bf16=True)
    # The files' tensor tables through `read_layout` (checked against gguf-py's reader in tests/gguf/test_layout.py),
    # which skips the 150k-token vocabulary gguf-py would decode (~20 s a file).
    ours, ref = tensor_bytes(copy), tensor_bytes(b16)
    assert set(ours) == set(ref) | {"output.weight"} or set(ours) == set(ref)
    for name, (ggml_type, data) in ref.items():
        if name == "output.weight":
            continue
        assert ours[name][0] == ggml_type, name
        assert np.array_equal(ours[name][1], data), name
    assert header_value(copy, "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    assert header_value(copy, BF16_TENSORS_KEY) == sum(t == gguf.GGMLQuantizationType.BF16 for t, _ in ref.values())


def tensor_bytes(path) -> dict[str, tuple[int, np.ndarray]]:
    layout = read_layout(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {t.name: (t.ggml_type, data[layout.data_start + t.offset : layout.data_start + t.offset + t.nbytes])
            for t in layout.tensors}


@pytest.mark.slow
def test_scores_equal_the_bf16_checkpoints_and_option_turns_it_off(bf16_pair, tmp_path, monkeypatch):
    from conftest import PAIRS
    from oracle import SCORE_ATOL, Oracle, assert_scores_close

    from reranker import Reranker

    f16, b16, ckpt = bf16_pair
    shutil.copy(f16.parent / "mlp_weights.npz", tmp_path / "mlp_weights.npz")
    load = dict(device="cpu", n_ctx=1024, n_batch=1024, n_threads=1)
    got = {}
    for name, path, bf16 in (("re", f16, True), ("ref", b16, False), ("off", f16, False)):
        rr = Reranker.from_pretrained(str(path), bf16=bf16, **load)
        got[name] = (np.array(rr.compute_score(PAIRS)), rr.weights_dtype, rr.last_usage.weights)
        rr.close()
    assert np.array_equal(got["re"][0], got["ref"][0])  # bit for bit
    assert got["re"][1:] == ("BF16", "BF16") and got["ref"][1] == "BF16"
    assert got["off"][1:] == ("F16", "F16")
    # Same weights; activations rounded to bf16 (or f16) inside the mat-muls: each within its stated
    # tolerance of transformers in float32 on the checkpoint (tests/oracle.py).
    want = Oracle(ckpt).scores(PAIRS)
    assert_scores_close(got["re"][0], want, "bf16", "BF16 re-encode vs transformers float32")
    assert_scores_close(got["off"][0], want, "f16", "F16 vs transformers float32")
    assert np.abs(got["off"][0] - got["re"][0]).max() < SCORE_ATOL["bf16"] + SCORE_ATOL["f16"]
    with pytest.raises(RerankerError, match="fast=True"):
        Reranker.from_pretrained(str(f16), bf16=True, fast=False, **load)

    # The default is automatic: BF16 where the CPU has native bf16 dot products, F16 elsewhere.
    monkeypatch.delenv(identity.BF16_ENV)
    for native, want in ((True, "BF16"), (False, "F16")):
        monkeypatch.setattr(cpu, "native_bf16", lambda native=native: (native, "test"))
        with Reranker.from_pretrained(str(f16), **load) as rr:
            assert rr.weights_dtype == want
            assert np.array_equal(rr.compute_score(PAIRS), got["re" if native else "off"][0])


@pytest.mark.slow  # two jobs, the second refused
def test_a_job_is_not_resumed_across_the_bf16_choice(tiny_ggufs, tmp_path, capsys):
    """A changed --bf16 (or a default that chose otherwise) is a changed setting, named in the error."""
    import json

    from reranker.cli import main

    f16 = tiny_ggufs["f16"]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"query": "q", "documents": ["a", "b"]}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    base = ["score", "-m", str(f16), "-i", str(inp), "-o", str(out), "--n-ctx", "512", "--quiet", "--threads", "1"]
    assert main([*base, "--bf16", "off"]) == 0
    capsys.readouterr()
    assert main([*base, "--bf16", "on"]) != 0
    assert "different settings (bf16: off -> on: pass the options it was started with to resume)" in capsys.readouterr().err
    assert main([*base, "--bf16", "off"]) == 0  # the same choice resumes (here: finds the job done)


# --- the copy is keyed by content -------------------------------------------------------------------

def _exact_tensor(seed: int) -> np.ndarray:
    return torch.randn(N_VOCAB, N_EMBD, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(torch.float16).numpy()


def _lossy(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[0, 0] = np.float16(1.0009765625)  # the lowest F16 mantissa bit: not in BF16
    return out


def test_identical_bytes_reuse_one_copy(tmp_path):
    """README's first command run twice rewrites a byte-identical GGUF (new mtime, new inode): the copy is reused,
    nothing is orphaned; another path with the same bytes shares it, and other bytes get their own."""
    import hashlib
    import json
    import os

    src = _tiny_gguf(tmp_path / "m-F16.gguf", {"token_embd.weight": _exact_tensor(0)})
    cache = tmp_path / "cache"
    copy = with_identity_output(src, "f32", cache)
    written = copy.stat().st_mtime_ns
    data = src.read_bytes()
    src.unlink()
    _tiny_gguf(src, {"token_embd.weight": _exact_tensor(0)})  # `reranker convert` again: the same bytes, a new file
    os.utime(src, ns=(1, 1))
    assert src.read_bytes() == data
    twin = shutil.copy(src, tmp_path / "twin-F16.gguf")
    assert with_identity_output(src, "f32", cache) == copy and with_identity_output(twin, "f32", cache) == copy
    assert copy.stat().st_mtime_ns == written and [c.path for c in cached_copies(cache)] == [copy]
    assert not cached_copies(cache)[0].stale
    # the hash is remembered under the source's stat, and it is the SHA-256 of its bytes
    memo = json.loads((cache / ".sources.json").read_text())
    assert memo["paths"][str(src.resolve())]["sha256"] == hashlib.sha256(data).hexdigest()
    assert header_value(copy, identity.CONTENT_KEY) == hashlib.sha256(data).hexdigest()

    other = _tiny_gguf(tmp_path / "o-F16.gguf", {"token_embd.weight": _exact_tensor(1)})
    assert with_identity_output(other, "f32", cache) != copy and len(cached_copies(cache)) == 2
    src.unlink()
    twin.unlink()  # no source with the first copy's bytes is left: stale, and only that one
    assert [c.stale for c in cached_copies(cache)] == [True, False]
    assert [c.path for c in identity.clear_cache(cache, stale_only=True)] == [copy]


def test_remembered_hash_is_trusted_while_the_stat_holds(tmp_path):
    """An unchanged source is not read again: its remembered hash decides which copy is used."""
    import json

    src = _tiny_gguf(tmp_path / "m-F16.gguf", {"token_embd.weight": _exact_tensor(0)})
    cache = tmp_path / "cache"
    copy = with_identity_output(src, "f32", cache)
    memo_file = cache / ".sources.json"
    memo = json.loads(memo_file.read_text())
    memo["paths"][str(src.resolve())]["sha256"] = "0" * 64
    memo_file.write_text(json.dumps(memo))
    assert with_identity_output(src, "f32", cache) != copy  # the (falsified) remembered hash was used, not the bytes
    memo["paths"][str(src.resolve())]["stat"][1] += 1  # a stat that no longer holds: hashed again
    memo_file.write_text(json.dumps(memo))
    assert with_identity_output(src, "f32", cache) == copy


def test_bf16_copy_without_an_exact_tensor_is_the_plain_copy(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    lossy = _tiny_gguf(tmp_path / "l-F16.gguf", {"token_embd.weight": _lossy(_exact_tensor(0)),
                                                 "blk.0.attn_q.weight": _lossy(_exact_tensor(1))})
    plain = with_identity_output(lossy, "f32", cache, bf16=False)
    assert with_identity_output(lossy, "f32", cache, bf16=True) == plain and len(cached_copies(cache)) == 1
    assert identity.bf16_tensor_counts(lossy, cache) == (0, 2)
    mixed = _tiny_gguf(tmp_path / "x-F16.gguf", {"token_embd.weight": _exact_tensor(0),
                                                 "blk.0.attn_q.weight": _lossy(_exact_tensor(1))})
    assert with_identity_output(mixed, "f32", cache, bf16=True) != with_identity_output(mixed, "f32", cache, bf16=False)
    assert identity.bf16_tensor_counts(mixed, cache) == (1, 2)
    monkeypatch.setenv("RERANKER_CACHE", str(cache))  # what `-v` prints when loading
    assert identity.bf16_note(lossy, True, "requested").startswith("BF16 re-encode: 0 of 2 F16 tensors, requested; none")
    assert identity.bf16_note(mixed, True, "requested") == "BF16 re-encode: 1 of 2 F16 tensors, requested"
    assert identity.bf16_note(mixed, False, "turned off") == "BF16 re-encode off: turned off"


def test_load_logs_how_many_tensors_were_reencoded(tiny_ggufs, caplog):
    """`-v` says "k of n": counted here with torch on the tensors' bytes (the layout reader is checked against
    gguf-py's in tests/gguf/test_layout.py, whose own reader takes ~20 s on the 150k-token vocabulary)."""
    import logging

    from reranker import Reranker

    layout = read_layout(tiny_ggufs["f16"])
    raw = np.memmap(tiny_ggufs["f16"], dtype=np.uint8, mode="r")
    f16 = [t for t in layout.tensors if t.ggml_type == gguf.GGMLQuantizationType.F16]
    values = [torch.from_numpy(raw[layout.data_start + t.offset:][: t.nbytes].view(np.float16).astype(np.float32)) for t in f16]
    exact = sum(bool(torch.equal(x.to(torch.bfloat16).to(torch.float32), x)) for x in values)
    assert f16 and exact == 0  # float32 random weights: none is bf16-exact, the case README's first command hits
    with caplog.at_level(logging.INFO, logger="reranker"):
        Reranker.from_pretrained(str(tiny_ggufs["f16"]), device="cpu", n_ctx=256, bf16=True).close()
    assert f"BF16 re-encode: {exact} of {len(f16)} F16 tensors, requested" in caplog.text
