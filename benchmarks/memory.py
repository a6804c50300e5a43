"""Peak memory of the offline job (`reranker score`) as the input grows: it streams, so it stays flat.

Runs the real command in a subprocess on flat-pair JSONL inputs of different sizes (short
documents, so the runs are quick). The peak resident set size is the child's own VmHWM, which
a small wrapper reads from /proc/self/status as the command exits (rusage's ru_maxrss is not used:
a child started by vfork/exec starts with its parent's high-water mark, here this script's). VmRSS
is also sampled every half second, to show the curve over the run.

The default model is the `tiny` synthetic one converted to F16: an F32 GGUF is run as a reference
(F32 KV cache, flash attention off), which makes short packed prompts about 4x slower on CPU and
200k pairs too long for a quick benchmark; memory does not depend on that choice.

    python benchmarks/memory.py                       # tiny synthetic model (F16), 10k vs 200k pairs
    python benchmarks/memory.py --pairs 5000 100000
    python benchmarks/memory.py --model m.gguf        # any GGUF with mlp_weights.npz beside it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from job import load_average, synthetic_model, synthetic_pairs, write_pairs_jsonl  # noqa: E402  (benchmarks/job.py)


def vm_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# Runs `python -m reranker ARGS...` and, as it exits, copies its /proc/self/status to STATUS_FILE.
_WRAPPER = ("import atexit, runpy, sys; status_file = sys.argv.pop(1); "
            "atexit.register(lambda: open(status_file, 'w').write(open('/proc/self/status').read())); "
            "sys.argv[0] = 'reranker'; runpy.run_module('reranker', run_name='__main__', alter_sys=True)")


def status_kb(text: str, key: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def run_job(gguf: Path, input_path: Path, output: Path, args) -> dict:
    """Run `reranker score` to the end; its peak RSS, sampled RSS, wall time and summary."""
    status_file = output.with_name(output.name + ".status")
    cmd = [sys.executable, "-c", _WRAPPER, str(status_file), "score", "-m", str(gguf), "-i", str(input_path), "-o", str(output),
           "--per", "pair", "--window", str(args.window), "--threads", str(args.threads), "--device", "cpu",
           "--quiet", "--restart"]
    if args.n_ctx:
        cmd += ["--n-ctx", str(args.n_ctx)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []  # (seconds, VmRSS kB)
    while proc.poll() is None:
        rss = vm_rss_kb(proc.pid)
        if rss:
            samples.append((time.perf_counter() - t, rss))
        time.sleep(0.5)
    wall = time.perf_counter() - t
    err = proc.stderr.read()
    proc.stderr.close()
    if proc.returncode != 0:
        sys.exit(f"reranker score failed ({proc.returncode}):\n{err}")
    status = status_file.read_text()
    summary = json.loads(output.with_name(output.name + ".summary.json").read_text())
    return {"peak_rss_mb": status_kb(status, "VmHWM") / 1024, "final_rss_mb": status_kb(status, "VmRSS") / 1024,
            "samples": samples, "wall": wall, "summary": summary}


def quartiles(samples: list[tuple[float, int]]) -> str:
    """VmRSS (MB) at 25/50/75/100 % of the run."""
    if not samples:
        return "-"
    end = samples[-1][0]
    picks = []
    for q in (0.25, 0.5, 0.75, 1.0):
        s = min(samples, key=lambda x: abs(x[0] - q * end))
        picks.append(f"{s[1] / 1024:.0f}")
    return "/".join(picks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF with mlp_weights.npz beside it (default: synthetic `tiny`)")
    ap.add_argument("--outtype", choices=["f16", "f32"], default="f16", help="synthetic model's type (default: %(default)s)")
    ap.add_argument("--pairs", type=int, nargs="+", default=[10_000, 200_000], help="input sizes (default: 10000 200000)")
    ap.add_argument("--doc-words", type=int, nargs=2, default=(5, 10), metavar=("MIN", "MAX"),
                    help="document length range in words (default: 5 10)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--window", type=int, default=2048, help="the job's --window (default: %(default)s)")
    ap.add_argument("--n-ctx", type=int, default=None, help="the job's --n-ctx (default: the job's)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

    from reranker.engine.identity import with_identity_output

    gguf = args.model or synthetic_model(args.cache, "tiny", args.outtype)[0]
    with_identity_output(gguf, "f32")  # the job's one-time cached copy, made before any run
    results = []
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="reranker-mem-bench-") as tmp:
        tmp = Path(tmp)
        for n in args.pairs:
            input_path = tmp / f"pairs-{n}.jsonl"
            write_pairs_jsonl(input_path, synthetic_pairs(n, tuple(args.doc_words), seed=n))
            r = run_job(gguf, input_path, tmp / f"scores-{n}.jsonl", args)
            r.update(pairs=n, input_mb=input_path.stat().st_size / 2**20,
                     output_mb=(tmp / f"scores-{n}.jsonl").stat().st_size / 2**20)
            results.append(r)
            input_path.unlink()
            (tmp / f"scores-{n}.jsonl").unlink()

    print(f"model {gguf.name}; {args.threads} threads; window {args.window}; documents of {args.doc_words[0]}-"
          f"{args.doc_words[1]} words; load average {load_start} at start, {load_average()} at end")
    print(f"{'pairs':>8}{'tokens':>11}{'input MB':>10}{'output MB':>11}{'wall s':>8}{'pairs/s':>9}{'tokens/s':>10}"
          f"{'peak RSS MB':>13}  VmRSS MB at 25/50/75/100% of the run")
    for r in results:
        s = r["summary"]
        print(f"{r['pairs']:>8}{s['tokens']:>11}{r['input_mb']:>10.1f}{r['output_mb']:>11.1f}{r['wall']:>8.1f}"
              f"{s['pairs_per_second']:>9.0f}{s['tokens_per_second']:>10.0f}{r['peak_rss_mb']:>13.1f}  {quartiles(r['samples'])}")
    first, last = results[0], results[-1]
    print(f"peak RSS {last['pairs']} / {first['pairs']} pairs: {last['peak_rss_mb'] / first['peak_rss_mb']:.3f} "
          f"({last['peak_rss_mb'] - first['peak_rss_mb']:+.1f} MB for {last['pairs'] / first['pairs']:.0f}x the input)")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items()} for r in results], indent=1) + "\n")


if __name__ == "__main__":
    main()
