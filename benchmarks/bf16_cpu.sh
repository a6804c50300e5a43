#!/usr/bin/env bash
# Issue 24's must-show in one run, on a CPU with avx512_bf16 and no AMX (the issue's target):
# ours against transformers bf16 at its best at the m0 shape, where a window's time goes, and n_batch.
#
#   bash benchmarks/bf16_cpu.sh            # from the checkout, with its venv active; about an hour on 2 cores
#
# Everything goes to benchmarks/bf16_cpu-<UTC time>.log (and JSON beside it); record the figures, the
# machine and its load in RESULTS.md ("Where a window's time goes on the CPU"). Run it on a quiet machine:
# nothing else of yours running, one model loaded at a time (each script does that).
set -euo pipefail
cd "$(dirname "$0")/.."

flags=$(grep -o -w -E 'avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)
if [[ $flags != *avx512_bf16* ]]; then
    echo "this CPU has no avx512_bf16 (flags: ${flags:-none}); issue 24's figures need one" >&2
    exit 2
fi
if [[ $flags == *amx* ]]; then
    echo "note: this CPU has AMX ($flags); the issue's target has none, and llama.cpp takes other kernels here" >&2
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="benchmarks/bf16_cpu-$stamp.log"
threads=${THREADS:-$(nproc)}
{
    echo "# $(date -u) $(git rev-parse --short HEAD) threads=$threads"
    grep -m1 'model name' /proc/cpuinfo
    echo "flags: $flags"
    uptime
    set -x
    python benchmarks/peer.py --preset m0 --threads "$threads" --json "benchmarks/bf16_cpu-$stamp-peer.json"
    python benchmarks/profile.py --preset m0 --threads "$threads" --flash on,off --n-batch 2048,512 --kv-type f16,bf16 \
        --json "benchmarks/bf16_cpu-$stamp-profile.json"
    python benchmarks/n_batch.py --preset m0 --threads "$threads" --bf16 --n-batch 2048,512
    set +x
    uptime
} 2>&1 | tee "$log"
echo "written: $log"
