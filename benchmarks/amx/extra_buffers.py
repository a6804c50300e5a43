"""llama.cpp's CPU extra buffers (AMX kernels, repacked layouts) off against on, same GGUF, same pairs.

Each side runs in its own process, since a build with broken AMX kernels dies with SIGILL (see
README.md here): the parent reports that instead of crashing. Prints tokens/s of both, the ratio,
and the largest score difference.

    python benchmarks/amx/extra_buffers.py MODEL-Q8_0.gguf [--threads 1] [--rounds 3]
    LLAMA_CPP_LIB_PATH=/path/to/patched/llama_cpp/lib python benchmarks/amx/extra_buffers.py MODEL-Q8_0.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def child(model: str, threads: int, rounds: int) -> None:
    from reranker import Reranker

    q = "how do AMX tile registers get configured on Linux?"
    pairs = [(q, f"Passage {i}. " + "Advanced Matrix Extensions add eight tile registers and a tile configuration. " * (2 + i % 3))
             for i in range(8)]
    with Reranker.from_pretrained(model, device="cpu", n_threads=threads) as rr:
        rr.compute_score(pairs[:1])  # warm
        rates, scores = [], None
        for _ in range(rounds):
            t = time.perf_counter()
            scores = rr.compute_score(pairs)
            rates.append(rr.last_usage.tokens / (time.perf_counter() - t))
        print(json.dumps({"weights": rr.weights_dtype, "tok_s": max(rates), "rates": rates, "scores": scores}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.model, args.threads, args.rounds)
    import llama_cpp

    print(f"llama.cpp: {llama_cpp.llama_print_system_info().decode(errors='replace').strip()}")
    print(f"library: {os.environ.get('LLAMA_CPP_LIB_PATH', 'the installed llama_cpp/lib')}; {args.threads} thread(s); "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    res = {}
    for extra in ("0", "1"):
        env = {**os.environ, "RERANKER_CPU_EXTRA_BUFFERS": extra}
        cmd = [sys.executable, __file__, args.model, "--threads", str(args.threads), "--rounds", str(args.rounds), "--child"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
            print(f"extra buffers {'on' if extra == '1' else 'off'}: crashed ({how}); "
                  + ("this build's AMX kernels are broken: see benchmarks/amx/README.md" if proc.returncode == -signal.SIGILL
                     else proc.stderr.strip()[-500:]))
            continue
        res[extra] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"extra buffers {'on ' if extra == '1' else 'off'}: {res[extra]['tok_s']:.1f} tok/s "
              f"(rounds {[round(r, 1) for r in res[extra]['rates']]}), weights {res[extra]['weights']}")
    if len(res) == 2:
        diff = max(abs(a - b) for a, b in zip(res["0"]["scores"], res["1"]["scores"]))
        print(f"on/off: {res['1']['tok_s'] / res['0']['tok_s']:.2f}x; max |score on - score off| {diff:.1e}")


if __name__ == "__main__":
    main()
