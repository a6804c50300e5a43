#!/usr/bin/env bash
# A llama-cpp-python wheel whose AMX kernels work: the release's sdist with mmq_tilecfg.patch applied
# (llama.cpp's tile config kept in static storage and reloaded on every call; see README.md here).
#
#   bash benchmarks/amx/build.sh OUT_DIR            # writes OUT_DIR/llama_cpp_python-*.whl (~8 min on 2 cores)
#   pip install --force-reinstall --no-deps OUT_DIR/llama_cpp_python-*.whl
#   RERANKER_CPU_EXTRA_BUFFERS=1 reranker score ...  # AMX kernels for Q8_0/Q4_0/K-quants
set -euo pipefail
out=$(realpath -m "${1:?usage: build.sh OUT_DIR}")
here=$(cd "$(dirname "$0")" && pwd)
version=$(python -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || echo 0.3.36)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
patch -p1 --forward -d "$work/llama_cpp_python-$version/vendor/llama.cpp" < "$here/mmq_tilecfg.patch"
mkdir -p "$out"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" python -m pip wheel --no-deps -w "$out" "$work/llama_cpp_python-$version"
ls "$out"/llama_cpp_python-*.whl
