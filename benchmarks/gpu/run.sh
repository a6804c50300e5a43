#!/usr/bin/env bash
# The GPU run in one command (see README.md): build llama.cpp with CUDA, install, check, measure.
#   benchmarks/gpu/run.sh            on the GPU machine (results in $OUT)
#   benchmarks/gpu/run.sh --cpu      rehearsal on a CPU machine (results in benchmarks/gpu/build/out)
# Everything printed also goes to $OUT/log.txt as it happens; results.json, results.md and
# summary.txt under $OUT are rewritten after every step.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONUNBUFFERED=1
export OUT="${OUT:-$HERE/build/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
echo "[run.sh] $(date -u +%FT%TZ) $PY $*; OUT=$OUT" | tee -a "$OUT/log.txt"
"$PY" "$HERE/run.py" "$@" 2>&1 | tee -a "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
