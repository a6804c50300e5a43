"""Find the pieces of a CUDA toolkit that llama.cpp's CMake build needs, wherever they are (stdlib only).

The machines here carry a CUDA 13.0 root assembled from NVIDIA's PyPI packages (`/usr/local/cuda`:
nvcc, cudart, CCCL, NVVM) without cuBLAS; torch's own `nvidia-cublas` package (headers included, under
`site-packages/nvidia/cu13`) has it. CMake's FindCUDAToolkit looks for `libcublas.so` (unversioned)
and the driver's `libcuda.so` beside the toolkit, so `toolkit()` makes a small folder of links
(`extra/include`, `extra/lib`) and hands it to CMake through CMAKE_LIBRARY_PATH and -I flags. A
complete toolkit needs none of that and gets none.

Used by run.py (the build on the GPU machine) and prepare.py (--cuda-prebuild on a CPU machine).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

DRIVER_GLOBS = ["/usr/local/nvidia/lib64/libcuda.so*", "/usr/local/nvidia/lib/libcuda.so*", "/usr/lib/x86_64-linux-gnu/libcuda.so*",
                "/usr/lib64/libcuda.so*", "/usr/lib/wsl/lib/libcuda.so*", "/usr/local/cuda*/compat/libcuda.so*"]


@dataclass
class Toolkit:
    nvcc: str
    root: str
    version: str
    extra: Path
    include_dirs: list[str] = field(default_factory=list)  # passed to nvcc/c++ with -I (cuBLAS headers outside the root)
    link_dirs: list[str] = field(default_factory=list)  # CMAKE_LIBRARY_PATH (links to unversioned libraries)
    runtime_dirs: list[str] = field(default_factory=list)  # LD_LIBRARY_PATH at run time (libcublas.so.13, libcudart.so.13)
    cublas: str | None = None
    driver: str | None = None
    stub_driver: bool = False

    def cmake_args(self) -> list[str]:
        args = [f"-DCMAKE_CUDA_COMPILER={self.nvcc}", f"-DCUDAToolkit_ROOT={self.root}"]
        if self.link_dirs:
            args.append("-DCMAKE_LIBRARY_PATH=" + ";".join(self.link_dirs))
        if self.include_dirs:
            flags = " ".join(f"-I{d}" for d in self.include_dirs)
            args += [f"-DCMAKE_CUDA_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
        return args

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["CUDACXX"] = self.nvcc
        env["CUDA_HOME"] = env["CUDA_PATH"] = self.root
        env["PATH"] = str(Path(self.nvcc).parent) + os.pathsep + env.get("PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*self.runtime_dirs, *filter(None, env.get("LD_LIBRARY_PATH", "").split(os.pathsep))])
        return env

    def describe(self) -> dict:
        return {"nvcc": self.nvcc, "root": self.root, "version": self.version, "cublas": self.cublas, "driver": self.driver,
                "stub_driver": self.stub_driver, "include_dirs": self.include_dirs, "link_dirs": self.link_dirs,
                "runtime_dirs": self.runtime_dirs}


def site_dirs() -> list[Path]:
    """This interpreter's site-packages folders (torch's `nvidia-*` packages live there)."""
    dirs = [*site.getsitepackages(), site.getusersitepackages(), *[p for p in sys.path if p.endswith("site-packages")]]
    out: list[Path] = []
    for d in dirs:
        p = Path(d)
        if p.is_dir() and p not in out:
            out.append(p)
    return out


def find_nvcc(nvcc: str | None = None) -> str | None:
    for cand in (nvcc, os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc",
                 *sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)):
        if cand and os.access(cand, os.X_OK):
            return os.path.realpath(cand)  # a wrapper script or link: its target's folder is the toolkit
    return None


def _real_nvcc(nvcc: str) -> str:
    """`/usr/local/bin/nvcc` may be a shell wrapper (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`): follow it."""
    try:
        head = Path(nvcc).read_bytes()[:400]
    except OSError:
        return nvcc
    if head.startswith(b"#!"):
        m = re.search(rb"exec\s+(\S+/nvcc)\b", head)
        if m and os.access(m.group(1).decode(), os.X_OK):
            return os.path.realpath(m.group(1).decode())
    return nvcc


def _first(patterns: list[str]) -> str | None:
    for pat in patterns:
        hits = sorted(glob.glob(pat))
        if hits:
            return hits[0]
    return None


def _link(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def _stub_driver(lib_dir: Path) -> str:
    """An empty `libcuda.so` (soname libcuda.so.1) to link against where the driver is absent (a CPU machine)."""
    src = lib_dir / "cuda_stub.c"
    src.write_text("void cuda_stub_placeholder(void) {}\n")
    out = lib_dir / "libcuda.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)], check=True)
    return str(out)


def runtime_lib_dirs(extra_sites: list[Path] | None = None) -> list[str]:
    """Folders of torch's NVIDIA packages holding libcudart/libcublas (what the prebuilt libggml-cuda needs at
    load time), found without nvcc: the prebuilt route must not depend on a compiler being there."""
    out: list[str] = []
    for s in list(extra_sites or []) + site_dirs():
        for pat in ("nvidia/cu*/lib", "nvidia/cublas/lib", "nvidia/cuda_runtime/lib"):
            for d in sorted(glob.glob(f"{s}/{pat}")):
                if (glob.glob(f"{d}/libcublas.so*") or glob.glob(f"{d}/libcudart.so*")) and d not in out:
                    out.append(d)
    return out


def find_driver() -> str | None:
    """The driver's libcuda.so: $LD_LIBRARY_PATH first (where the loader looks first, and where container
    runtimes often mount it), then ldconfig's cache, then the usual folders."""
    for d in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)):
        hit = _first([f"{d}/libcuda.so.1", f"{d}/libcuda.so", f"{d}/libcuda.so.*[0-9]"])
        if hit:
            return hit
    try:
        ldc = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        m = re.search(r"libcuda\.so(?:\.1)? \(.*x86-64.*\) => (\S+)", ldc)
        if m:
            return m.group(1)
    except OSError:
        pass
    return _first(DRIVER_GLOBS)


def toolkit(work: Path, extra_sites: list[Path] | None = None, allow_stub_driver: bool = False, nvcc: str | None = None) -> Toolkit:
    """The toolkit to build with; raises RuntimeError naming what is missing."""
    found = find_nvcc(nvcc)
    if not found:
        raise RuntimeError("no nvcc (looked at $CUDACXX, PATH, /usr/local/cuda*/bin)")
    nvcc = _real_nvcc(found)
    root = str(Path(nvcc).parent.parent)
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    version = m.group(1) if m else "?"
    extra = Path(work)
    tk = Toolkit(nvcc=nvcc, root=root, version=version, extra=extra)
    sites = list(extra_sites or []) + site_dirs()
    roots = [root, f"{root}/targets/x86_64-linux"]

    # cuBLAS: in the toolkit, else torch's nvidia-cublas package (cu13 layout, or cu12's nvidia/cublas).
    header = _first([f"{r}/include/cublas_v2.h" for r in roots])
    lib = _first([f"{r}/{d}/libcublas.so" for r in roots for d in ("lib64", "lib")])
    if not (header and lib):
        pkg = [f"{s}/nvidia/cu{tk.version.split('.')[0]}" for s in sites] + [f"{s}/nvidia/cublas" for s in sites]
        header = _first([f"{p}/include/cublas_v2.h" for p in pkg])
        lib = _first([f"{p}/lib/libcublas.so*" for p in pkg])
        if not (header and lib):
            raise RuntimeError(f"no cuBLAS (cublas_v2.h and libcublas.so) in {root} or in the nvidia packages of {[str(s) for s in sites]}")
        inc = extra / "include"
        for h in glob.glob(str(Path(header).parent / "cublas*.h")) + glob.glob(str(Path(header).parent / "nvblas.h")):
            _link(h, inc / Path(h).name)
        tk.include_dirs.append(str(inc))
        libdir = Path(lib).parent
        for name in ("cublas", "cublasLt"):
            real = _first([f"{libdir}/lib{name}.so.*[0-9]", f"{libdir}/lib{name}.so"])
            if not real:
                raise RuntimeError(f"no lib{name}.so* in {libdir}")
            _link(real, extra / "lib" / f"lib{name}.so")
        tk.link_dirs.append(str(extra / "lib"))
        tk.runtime_dirs.append(str(libdir))
    tk.cublas = lib
    cudart_dir = _first([f"{r}/{d}/libcudart.so*" for r in roots for d in ("lib64", "lib")])
    if cudart_dir:
        tk.runtime_dirs.append(str(Path(cudart_dir).parent))

    # The driver library, for CUDA::cuda_driver (ggml's VMM pool): the toolkit's stub, the real one, or our stub.
    stub = _first([f"{r}/{d}/stubs/libcuda.so" for r in roots for d in ("lib64", "lib")])
    if stub:
        tk.driver = stub
    else:
        real = find_driver()
        if real:
            _link(os.path.realpath(real), extra / "lib" / "libcuda.so")
            tk.driver = real
        elif allow_stub_driver:
            (extra / "lib").mkdir(parents=True, exist_ok=True)
            tk.driver = _stub_driver(extra / "lib")
            tk.stub_driver = True
        else:
            raise RuntimeError("no CUDA driver library (libcuda.so) found: $LD_LIBRARY_PATH, ldconfig -p, " + ", ".join(DRIVER_GLOBS))
        if str(extra / "lib") not in tk.link_dirs:
            tk.link_dirs.append(str(extra / "lib"))
    return tk


def llama_cmake_args(arch: str | None, cuda: bool) -> list[str]:
    """llama.cpp options for the reranker: the libraries only, portable CPU code (x86-64-v3), CUDA for `arch` only."""
    args = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
            "-DGGML_BMI2=ON"]
    if cuda:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}-real", "-DGGML_CUDA_NCCL=OFF"]
    else:
        args += ["-DGGML_CUDA=OFF"]
    return args
