"""The GPU run's harness (benchmarks/gpu/run.py, steps.py, report.py, cudatk.py, prepare.py) on the CPU.

The GPU run gets one 600 s call; these are the failure modes that would waste it (issue 23): a
missing carry, a dead background stage, a step cut mid-way, processes left by a cut call, a failed
build reported as success. Real processes and files throughout; no llama.cpp build, no torch step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))
import run as gpu_run  # noqa: E402
import steps as gpu_steps  # noqa: E402


def make_carry(root: Path) -> Path:
    """A carry folder shaped as prepare.py writes it (contents are placeholders: only the shape is checked)."""
    carry = root / "carry"
    (carry / "wheels").mkdir(parents=True)
    (carry / gpu_run.STRIPPED).write_bytes(b"x" * 100)
    (carry / "wheels" / "gguf-0.19.0-py3-none-any.whl").write_bytes(b"w")
    manifest = {"stripped": {"name": gpu_run.STRIPPED, "bytes": 100}, "wheels": ["gguf-0.19.0-py3-none-any.whl"]}
    (carry / "manifest.json").write_text(json.dumps(manifest))
    return carry


def test_complete_carry_passes_and_each_missing_piece_is_named(tmp_path):
    carry = make_carry(tmp_path)
    assert gpu_run.carry_problem(carry) is None
    (carry / "wheels" / "gguf-0.19.0-py3-none-any.whl").unlink()
    assert "gguf-0.19.0" in gpu_run.carry_problem(carry)
    (carry / gpu_run.STRIPPED).write_bytes(b"x" * 99)  # a truncated copy
    assert "99 bytes, manifest says 100" in gpu_run.carry_problem(carry)
    assert "prepare.py" in gpu_run.carry_problem(tmp_path / "nowhere")


def test_run_refuses_without_carry_in_one_line_at_once(tmp_path):
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(GPU / "run.py"), "--cpu", "--carry", str(tmp_path / "nowhere"),
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to start" in lines[0] and "prepare.py" in lines[0], p.stderr
    assert took < 10, f"took {took:.1f} s"
    assert not (tmp_path / "work").exists()  # nothing started


def test_wait_stops_at_once_on_its_own_stage_failure(tmp_path):
    P = gpu_steps.paths({"work": str(tmp_path), "preset": "small"})
    models = tmp_path / "models"
    models.mkdir()
    (models / "quant.failed").write_text("Traceback: OSError: [Errno 28] No space left on device\n")
    t = time.perf_counter()
    with pytest.raises(gpu_steps.StageFailed, match="No space left"):
        gpu_steps.wait_ready(P["Q8_0"], deadline=time.time() + 60)
    with pytest.raises(gpu_steps.StageFailed):
        gpu_steps.wait_ready(P["BF16"], ".identity.ready", deadline=time.time() + 60)  # BF16 comes after the quantizations
    assert time.perf_counter() - t < 5
    # the conversion's models do not depend on the quantization: their wait goes on (to its deadline)
    with pytest.raises(TimeoutError):
        gpu_steps.wait_ready(P["F16"], deadline=time.time() + 1)
    (P["F16"].parent).mkdir(parents=True)
    gpu_steps.ready(P["F16"]).touch()
    assert gpu_steps.wait_ready(P["F16"], deadline=time.time() + 1) == P["F16"]


def test_a_crashed_stage_writes_its_traceback_and_the_next_stage_stops(tmp_path):
    """`models --stage quant` waits for F16 from the conversion; a failed conversion ends it in seconds, not an hour."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "convert.failed").write_text("Traceback: ImportError: no module named gguf\n")
    ctx = {"work": str(tmp_path), "preset": "small", "cpu": True}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(GPU / "steps.py"), "models", "--stage", "quant", "--ctx", json.dumps(ctx)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    failed = (tmp_path / "models" / "quant.failed").read_text()
    assert "StageFailed" in failed and "no module named gguf" in failed
    assert time.perf_counter() - t < 60


STEP = """
import json, os, sys, time
res = sys.argv[1]
def put(d):
    open(res + '.tmp', 'w').write(json.dumps(d)); os.replace(res + '.tmp', res)
put({'started': 'now', 'tokens_per_s': 123.0})
time.sleep(float(sys.argv[2]))
put({'started': 'now', 'tokens_per_s': 123.0, 'pairs_per_s': 4.5})
sys.exit(int(sys.argv[3]))
"""


def test_killed_step_keeps_its_partial_numbers(tmp_path):
    res = tmp_path / "step.json"
    seen = []
    t = time.perf_counter()
    result, status = gpu_run.run_step_process([sys.executable, "-c", STEP, str(res), "60", "0"], res, dict(os.environ),
                                              timeout=3, on_partial=seen.append, poll_s=0.3)
    assert time.perf_counter() - t < 15
    assert status == "partial" and result["tokens_per_s"] == 123.0 and "step timeout" in result["error"]
    assert any(d.get("tokens_per_s") == 123.0 for d in seen)  # merged while it ran: a cut call keeps it too


def test_step_outcomes_ok_and_error(tmp_path):
    res = tmp_path / "step.json"
    result, status = gpu_run.run_step_process([sys.executable, "-c", STEP, str(res), "0", "0"], res, dict(os.environ), timeout=30)
    assert status == "ok" and result["pairs_per_s"] == 4.5
    res.unlink()
    result, status = gpu_run.run_step_process([sys.executable, "-c", "import sys; sys.exit(3)"], res, dict(os.environ), timeout=30)
    assert status == "error" and result["error"] == "exit code 3"


def test_process_groups_left_by_a_cut_call_are_ended(tmp_path):
    gpu_run.GROUPS = gpu_run.ProcessGroups(tmp_path / "groups.json")
    try:
        left = gpu_run.popen_group(["sleep", "60"])
        # a recorded group whose pid now leads something else (the pid was reused) must be spared
        other = subprocess.Popen(["sleep", "61"], start_new_session=True)
        for proc in (left, other):  # a call's leftovers ran long ago: wait until both children have exec'd sleep
            deadline = time.monotonic() + 30
            while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"sleep") and time.monotonic() < deadline:
                time.sleep(0.01)
        record = json.loads((tmp_path / "groups.json").read_text())
        record[str(other.pid)] = ["pip", "install"]
        (tmp_path / "groups.json").write_text(json.dumps(record))
        ended = gpu_run.ProcessGroups(tmp_path / "groups.json").end_stale()  # the next call
        cmdline = Path(f"/proc/{left.pid}/cmdline").read_bytes() if left.poll() is None else b"(gone)"
        assert ended == [f"{left.pid} (sleep 60)"], (ended, record, cmdline)
        assert left.wait(timeout=10) == -9
        assert other.poll() is None
        assert not (tmp_path / "groups.json").exists()
    finally:
        gpu_run.GROUPS = None
        other.kill()
        other.wait()


def test_failed_build_fails_the_run_and_shows_its_error(tmp_path):
    import report

    tail = "ninja: build stopped: subcommand failed.\nnvcc fatal: Unsupported gpu architecture 'compute_90'"
    data = {"meta": {"mode": "gpu"}, "background": {},
            "steps": {"build": {"status": "error", "result": {"error": "llama-cpp-python build failed (rc 1)", "tail": tail}}}}
    assert gpu_run.exit_code(data) == 1
    _, summary = report.render(data)
    assert "BUILD FAILED" in summary and "Unsupported gpu architecture" in summary
    data["steps"]["build"] = {"status": "ok", "result": {}}
    data["steps"]["check-scores"] = {"status": "ok", "result": {"checks": [{"name": "cuda vs cpu", "ok": True, "detail": ""}]}}
    assert gpu_run.exit_code(data) == 0


def test_disk_plan():
    gib = 2**30
    assert gpu_run.disk_plan(60 * gib, cpu=False) == (None, False)
    assert gpu_run.disk_plan(20 * gib, cpu=False) == (None, True)  # BF16 left out
    refusal, _ = gpu_run.disk_plan(5 * gib, cpu=False)
    assert "5.0 GiB free" in refusal
    assert gpu_run.disk_plan(5 * gib, cpu=True) == (None, False)


def test_driver_library_is_found_on_ld_library_path(tmp_path, monkeypatch):
    import cudatk

    (tmp_path / "libcuda.so.1").write_bytes(b"\x7fELF")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{tmp_path}")
    assert cudatk.find_driver() == f"{tmp_path}/libcuda.so.1"


def test_bf16_comes_from_the_quant_stage_after_the_quantizations():
    """run.py's waits follow the stage that makes each model: BF16 moved to the end of `--stage quant`."""
    src = (GPU / "steps.py").read_text()
    quant = src[src.index("    quant(\"Q8_0\")"):]
    assert quant.index("quant(\"Q4_K_M\")") < quant.index("convert(P[\"ckpt\"], P[\"BF16\"]")
    P = gpu_steps.paths({"work": "/w", "preset": "m0"})
    assert gpu_steps.failed_marker(P["BF16"]).name == "quant.failed"
    assert gpu_steps.failed_marker(P["F16"]).name == "convert.failed"
    assert gpu_steps.failed_marker(P["F16"], ".identity.ready").name == "quant.failed"  # identity copies need llama_cpp
    assert gpu_steps.failed_marker(P["tiny_f32"]) == Path("/w/models/convert.failed")


def _elf(tmp: Path, name: str, soname: str, libs: list[str] = (), pad_mb: int = 0) -> Path:
    src = tmp / f"{name}.c"
    src.write_text(f"const char pad[{max(1, pad_mb << 20)}] = {{1}};\n")
    out = tmp / name
    links = [f"-l:{lib}" for lib in libs]
    subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-Wl,--no-as-needed", "-Wl,-rpath,$ORIGIN",
                    "-o", str(out), str(src), f"-L{tmp}", *links], check=True)
    return out


@pytest.fixture(scope="module")
def prebuild(tmp_path_factory):
    """A pack shaped as --cuda-prebuild makes it (real ELF files, real NEEDED entries) and the sdist it claims to come from."""
    import tarfile

    import prepare

    tmp = tmp_path_factory.mktemp("prebuild")
    deps = [_elf(tmp, n, n) for n in ("libcuda.so.1", "libcudart.so.13", "libcublas.so.13", "libggml-base.so.0")]
    cuda = _elf(tmp, "libggml-cuda.so.0.25.3", "libggml-cuda.so.0", [d.name for d in deps], pad_mb=11)
    pack = tmp / "cuda-libs-sm90.tar.xz"
    with tarfile.open(pack, "w:xz", preset=0) as t:
        for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libggml-base.so.0.25.3"):
            t.add(deps[0], arcname=f"lib/{name}")
        t.add(cuda, arcname="lib/libggml-cuda.so.0.25.3")
        t.add(cuda, arcname="lib/libggml-cuda.so")
    sdist = tmp / "stripped.tar.gz"
    cmake = tmp / "CMakeLists.txt"
    cmake.write_text("set(GGML_VERSION_MAJOR 0)\nset(GGML_VERSION_MINOR 25)\nset(GGML_VERSION_PATCH 3)\n")
    with tarfile.open(sdist, "w:gz") as t:
        t.add(cmake, arcname=f"{prepare.SDIST.removesuffix('.tar.gz')}/vendor/llama.cpp/ggml/CMakeLists.txt")
    sums = tmp / "SHA256SUMS"
    sums.write_text(f"{prepare.sha256(pack)}  {pack.name}\n")
    pyproject = tmp / "pyproject.toml"
    pyproject.write_text(f'dependencies = ["llama-cpp-python>={prepare.LLAMA_CPP_PYTHON}"]\n')
    return {"pack": pack, "sums": sums, "sdist": sdist, "pyproject": pyproject, "tmp": tmp}


def test_prebuilt_verification(prebuild):
    import prepare

    b = prebuild
    info = prepare.verify_prebuilt(b["pack"], b["sums"], b["sdist"], b["pyproject"])
    assert info["ggml_version"] == "0.25.3" and info["runpath"] == "$ORIGIN" and "libcublas.so.13" in info["needed"]
    other = b["tmp"] / "SHA256SUMS.other"
    other.write_text(f"{'0' * 64}  {b['pack'].name}\n")
    with pytest.raises(ValueError, match="sha256"):
        prepare.verify_prebuilt(b["pack"], other, b["sdist"], b["pyproject"])
    pin = b["tmp"] / "pyproject.other.toml"
    pin.write_text('dependencies = ["llama-cpp-python>=0.3.40"]\n')
    with pytest.raises(ValueError, match="0.3.40"):
        prepare.verify_prebuilt(b["pack"], b["sums"], b["sdist"], pin)
    newer = b["tmp"] / "stripped-newer.tar.gz"  # a source whose ggml is another version: the libraries are not from it
    import tarfile

    (b["tmp"] / "CMakeLists.txt").write_text("set(GGML_VERSION_MAJOR 0)\nset(GGML_VERSION_MINOR 26)\nset(GGML_VERSION_PATCH 0)\n")
    with tarfile.open(newer, "w:gz") as t:
        t.add(b["tmp"] / "CMakeLists.txt", arcname=f"{prepare.SDIST.removesuffix('.tar.gz')}/vendor/llama.cpp/ggml/CMakeLists.txt")
    with pytest.raises(ValueError, match="ggml 0.26.0"):
        prepare.verify_prebuilt(b["pack"], b["sums"], newer, b["pyproject"])


def test_prebuilt_without_cublas_is_refused(prebuild):
    """A libggml-cuda that does not link cuBLAS (e.g. built without the toolkit settings) would not be the one measured."""
    import tarfile

    import prepare

    b = prebuild
    (b["tmp"] / "nocublas").mkdir()
    cuda = _elf(b["tmp"], "nocublas/libggml-cuda.so.0.25.3", "libggml-cuda.so.0", ["libcuda.so.1", "libggml-base.so.0"], pad_mb=11)
    pack = b["tmp"] / "nocublas" / "cuda-libs-sm90.tar.xz"
    with tarfile.open(pack, "w:xz", preset=0) as t:
        for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libggml-base.so.0.25.3"):
            t.add(b["tmp"] / "libcuda.so.1", arcname=f"lib/{name}")
        t.add(cuda, arcname="lib/libggml-cuda.so.0.25.3")
        t.add(cuda, arcname="lib/libggml-cuda.so")
    with pytest.raises(ValueError, match="libggml-cuda needs .* expected .*libcublas.so.13"):
        prepare.verify_prebuilt(pack, None, b["sdist"], b["pyproject"])


def test_a_check_cut_mid_way_counts_as_not_completed():
    """A call cut while check-scores runs: its merged partial checks show, and the step counts as failed."""
    import report

    partial = {"checks": [{"name": "fast path", "ok": True, "detail": ""}]}
    data = {"meta": {"mode": "gpu"}, "background": {},
            "steps": {"check-scores": {"status": "running (partial results merged)", "result": partial}}}
    names = [(c["name"], c["ok"]) for c in report.checks(data)]
    assert ("fast path", True) in names and ("check-scores did not complete", False) in names
    assert gpu_run.exit_code(data) == 1


def test_runtime_libraries_are_found_without_nvcc(tmp_path):
    import cudatk

    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcublas.so.13").write_bytes(b"\x7fELF")
    (tmp_path / "nvidia" / "cu13" / "include").mkdir()
    assert cudatk.runtime_lib_dirs([tmp_path])[0] == str(lib)
    assert str(tmp_path / "nvidia" / "cu13" / "include") not in cudatk.runtime_lib_dirs([tmp_path])


def test_both_build_routes_give_libmtmd():
    """The images step needs libmtmd: the build route compiles it with llama.cpp (LLAVA_BUILD=ON, and the build key
    changes with it, so an earlier build without it is not reused); the prebuilt route gets prepare.py's pack."""
    src = (GPU / "run.py").read_text()
    assert gpu_run.MTMD_BUILD_ARGS == ["-DLLAVA_BUILD=ON"]
    assert "build_args = cudatk.llama_cmake_args(self.arch, not self.cpu) + MTMD_BUILD_ARGS" in src
    assert '"args": build_args' in src and "args = list(build_args)" in src
    assert "-DLLAVA_BUILD=OFF" not in src.replace('["-DLLAMA_BUILD=OFF", "-DLLAVA_BUILD=OFF"]', "")  # only the Python-only install


def _mtmd_pack(tmp: Path, needed: list[str], name: str = "mtmd-libs.tar.xz") -> Path:
    """A pack shaped as prepare.py's mtmd_prebuild writes it: one real ELF file and its soname links."""
    import tarfile

    folder = tmp / name.replace(".tar.xz", "")
    folder.mkdir()
    for lib in needed:
        if not (tmp / lib).exists():
            _elf(tmp, lib, lib)
    real = _elf(tmp, f"{folder.name}/libmtmd.so.0.5.0", "libmtmd.so.0", needed)
    (folder / "libmtmd.so.0").symlink_to(real.name)
    (folder / "libmtmd.so").symlink_to("libmtmd.so.0")
    pack = tmp / name
    with tarfile.open(pack, "w:xz", preset=0) as t:
        for n in ("libmtmd.so", "libmtmd.so.0", "libmtmd.so.0.5.0"):
            t.add(folder / n, arcname=f"lib/{n}")
    return pack


def test_mtmd_pack_verification(tmp_path):
    import prepare

    good = _mtmd_pack(tmp_path, ["libllama.so.0", "libggml.so.0", "libggml-base.so.0"])
    info = prepare.verify_mtmd(good)
    assert info["library"] == "libmtmd.so.0.5.0" and info["runpath"] == "$ORIGIN"
    assert {"libllama.so.0", "libggml.so.0", "libggml-base.so.0"} <= set(info["needed"])
    cuda = _mtmd_pack(tmp_path, ["libllama.so.0", "libggml.so.0", "libggml-base.so.0", "libcudart.so.13"], "cuda.tar.xz")
    with pytest.raises(ValueError, match="needs .*libcudart.so.13"):  # it must not depend on CUDA itself
        prepare.verify_mtmd(cuda)
    unlinked = _mtmd_pack(tmp_path, ["libggml-base.so.0"], "unlinked.tar.xz")
    with pytest.raises(ValueError, match="libllama.so.0"):
        prepare.verify_mtmd(unlinked)


def test_carried_libmtmd_goes_beside_the_prebuilt_libraries(tmp_path):
    """libmtmd is found beside libllama (its runpath is $ORIGIN): the carried pack is unpacked into the prebuilt
    folder, into a copy when that folder was named by --prebuilt; a damaged pack leaves the libraries as they are."""
    import types

    import prepare

    carry = make_carry(tmp_path)
    pack = _mtmd_pack(tmp_path, ["libllama.so.0", "libggml.so.0", "libggml-base.so.0"])
    (carry / pack.name).write_bytes(pack.read_bytes())
    manifest = json.loads((carry / "manifest.json").read_text())
    manifest["mtmd"] = {"name": pack.name, "sha256": prepare.sha256(pack)}
    (carry / "manifest.json").write_text(json.dumps(manifest))
    given = tmp_path / "given" / "lib"
    given.mkdir(parents=True)
    (given / "libllama.so").write_bytes(b"\x7fELF")
    runner = types.SimpleNamespace(carry=carry, work=tmp_path / "work")

    lib = gpu_run.Runner._with_mtmd(runner, given)
    assert lib == tmp_path / "work" / "prebuilt-given" / "lib"
    assert (lib / "libllama.so").is_file() and (lib / "libmtmd.so").resolve() == lib / "libmtmd.so.0.5.0"
    assert not (given / "libmtmd.so").exists()  # the named folder is not written into

    own = tmp_path / "work" / "prebuilt" / "lib"  # the unpacked CUDA pack: this work folder's own
    own.mkdir(parents=True)
    assert gpu_run.Runner._with_mtmd(runner, own) == own and (own / "libmtmd.so.0.5.0").is_file()
    assert gpu_run.Runner._with_mtmd(runner, own) == own  # already there: as it is

    (carry / pack.name).write_bytes(pack.read_bytes()[:-1] + b"\0")
    bare = tmp_path / "work" / "bare" / "lib"
    bare.mkdir(parents=True)
    assert gpu_run.Runner._with_mtmd(runner, bare) == bare and not (bare / "libmtmd.so").exists()
    assert gpu_run.carry_problem(carry) is None  # only the images step depends on it: never a refusal


def test_images_figures_reach_results_md_and_the_summary():
    """The images step's figures (benchmarks/images.py --json, per size) are in results.md and on the summary screen;
    a skip shows its reason."""
    import report

    def side(ips, enc, dec, tok):
        return {"images_per_s": ips, "encode_s_per_image": enc, "decode_tokens_per_s": dec,
                "prompt_tokens_per_s": tok * ips, "tokens_per_image": tok}

    res = {"preset": "m0", "images": 8, "device": "cuda", "transformers_dtype": "bf16", "ours_type": "F16",
           "ratio_images_per_s": 1.7, "max_score_diff": 3e-3, "ours_vision_backend": "clip_ctx: CLIP using CUDA0 backend",
           **{f"ours_{k}": v for k, v in side(20.0, 0.02, 9000.0, 600).items()},
           **{f"transformers_{k}": v for k, v in side(11.8, 0.05, 5000.0, 600).items()},
           "sizes": {"0.3 MP": {"ours": side(30.0, 0.01, 9500.0, 409), "transformers": side(17.0, 0.03, 5200.0, 409)},
                     "0.6 MP": {"ours": side(14.0, 0.03, 8800.0, 786), "transformers": side(8.0, 0.07, 4900.0, 786)}}}
    data = {"meta": {"mode": "gpu"}, "background": {},
            "steps": {"images": {"status": "ok", "result": {"libmtmd": "/w/prebuilt/lib/libmtmd.so", "result": res}}}}
    md, summary = report.render(data)
    assert "| ours | 0.6 MP | 14.00 | 30 | 8800 | 11004 | 786 |" in md
    assert "libmtmd /w/prebuilt/lib/libmtmd.so (clip_ctx: CLIP using CUDA0 backend)" in md
    assert "| transformers | 0.3 MP | 17.00 | 30 | 5200 | 6953 | 409 |" in md
    assert "images (m0): ours 20.00 images/s, 12000 prompt tok/s | transformers 11.80, 7080 | 1.70x; encode 20 vs 50 ms/image" in summary
    data["steps"]["images"] = {"status": "ok", "result": {"skipped": "no libmtmd: neither built ..."}}
    md, _ = report.render(data)
    assert "no libmtmd: neither built" in md


def test_job_images_step_is_planned_after_images_and_gets_their_model():
    """The job on image documents runs after `images` (both optional, second call), needs llama.cpp, and makes the
    convert stage build the images model even when it is planned without `images`."""
    import types

    for order in (gpu_run.DEFAULT_STEPS, gpu_run.VALUE_ORDER):
        assert order.index("images") + 1 == order.index("job-images") < order.index("ray")
    assert "job-images" in gpu_run.NEEDS_LLAMA and gpu_run.STEPS["job-images"][0] <= 150
    for planned, want in ((["check-job", "job-images"], True), (["images"], True), (["q8"], False)):
        runner = types.SimpleNamespace(cpu=True, work=Path("/w"), out=Path("/o"), args=types.SimpleNamespace(seconds=1),
                                       arch=None, no_bf16=False, planned=planned)
        assert gpu_run.Runner.ctx(runner)["images"] is want, planned
    shape = gpu_steps.JOB_IMAGES_SHAPE
    assert all(window % per_record == 0 and n % window == 0 for n, per_record, window in shape.values())  # whole records, full windows


def test_job_images_figures_and_check_reach_results_md_and_the_summary():
    """The job-images step's figures go to results.md and the summary; its check counts (a failed one fails the
    run, exit 1); skipped or cut short, it adds no check."""
    import report

    res = {"preset": "m0", "images": 128, "per_record": 8, "window": 64, "device": "cuda",
           "sizes": {"0.3 MP": "640x480", "0.6 MP": "896x672"}, "job_images_per_s": 41.5, "job_tokens_per_s": 25000.0,
           "job_loop_s": 3.08, "job_process_s": 21.4, "tokens": 77000, "all_layers_on_gpu": True,
           "vision_backend": "clip_ctx: CLIP using CUDA0 backend", "compute_score_images_per_s": 39.0,
           "max_score_diff": 0.0, "scores_bit_equal": True}
    check = {"name": "job on image documents == compute_score", "ok": True, "detail": "128 pairs; max |diff| 0.00e+00"}
    data = {"meta": {"mode": "gpu"}, "background": {},
            "steps": {"job-images": {"status": "ok", "result": {"libmtmd": "/w/site/llama_cpp/lib/libmtmd.so", "result": res,
                                                                  "checks": [check]}}}}
    md, summary = report.render(data)
    assert "128 image documents (0.3 MP 640x480, 0.6 MP 896x672 PNGs, 8 per record, paths relative to the JSONL)" in md
    assert "libmtmd /w/site/llama_cpp/lib/libmtmd.so (clip_ctx: CLIP using CUDA0 backend); all layers on the GPU: True" in md
    assert "| 41.50 | 25000 | 3.1 | 21.4 | 39.00 | 0.00e+00 |" in md
    assert "job on image documents (m0): 41.50 images/s, 25000 tok/s; scores vs compute_score max |diff| 0.0e+00" in summary
    assert ("job-images", "job on image documents == compute_score", True) in [(c["step"], c["name"], c["ok"]) for c in report.checks(data)]
    assert gpu_run.exit_code(data) == 0
    data["steps"]["job-images"]["result"]["checks"] = [{**check, "ok": False}]
    assert gpu_run.exit_code(data) == 1 and "FAIL job-images: job on image documents == compute_score" in report.render(data)[1]
    for status, result in [("ok", {"skipped": "no libmtmd: neither built ..."}), ("skipped (budget: 20 s left, needs ~120 s)", {}),
                           ("partial", {"error": "exit code -9 (killed: step timeout 420 s)"})]:
        data["steps"]["job-images"] = {"status": status, "result": result}
        md, _ = report.render(data)
        assert not [c for c in report.checks(data) if c["step"] == "job-images"] and gpu_run.exit_code(data) == 0, status
        assert (result.get("skipped") or result.get("error") or "") in md
