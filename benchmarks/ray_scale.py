"""The Ray path (`reranker score --engine ray`) against the local job, on the same input in the same run.

One local Ray cluster is started first (it stays warm, as a cluster does), then these alternate
`--rounds` times, each in this process through `reranker.cli.main`, best of the rounds kept:

  local     `reranker score -i pairs.jsonl -o local.parquet --threads T`
  ray x1    `... --engine ray --actors 1 --actor-cpus T` (CPU actors; on a GPU machine one GPU each)
  ray x2    `... --engine ray --actors 2` (needs 2T CPUs, or 2 GPUs)

Both paths cut the same windows (`--window`), so their outputs must be equal (checked). Rates are
pairs over the whole command's wall time, each loading its model (the local job in-process, the
Ray path in its actors), so Ray's overhead (actor start, object store, result transfer) counts;
the local job's loop-only rate (its summary) is printed beside it.

    python benchmarks/ray_scale.py                      # the `small` synthetic model, 1024 pairs
    python benchmarks/ray_scale.py --pairs 4096 --threads 1 --preset tiny
    python benchmarks/ray_scale.py --model m.gguf       # any GGUF with mlp_weights.npz beside it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# The repo root first, so this checkout's packages are imported (installed or not); this folder last, for sibling scripts.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from job import synthetic_model, synthetic_pairs, write_pairs_jsonl  # noqa: E402


def run(argv: list[str]) -> float:
    from reranker.cli import main

    t = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"reranker {' '.join(argv)} failed with status {rc}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF with mlp_weights.npz beside it (default: synthetic --preset, F16)")
    ap.add_argument("--preset", default="small", help="synthetic model preset (default: %(default)s)")
    ap.add_argument("--pairs", type=int, default=1024, help="pairs to score (default: %(default)s)")
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 200), metavar=("MIN", "MAX"))
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the local job and of each CPU actor (default: %(default)s)")
    ap.add_argument("--window", type=int, default=64, help="pairs per window, both paths (default: %(default)s)")
    ap.add_argument("--shard-windows", type=int, default=2, help="the Ray path's windows per part (default: %(default)s)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to run (default: 1 2)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    model = args.model or synthetic_model(args.cache, args.preset, "f16")[0]
    work = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    inp = work / "pairs.jsonl"
    write_pairs_jsonl(inp, synthetic_pairs(args.pairs, tuple(args.doc_words)))
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    cpus = max(os.cpu_count() or 1, args.threads * max(args.actors))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    common = ["-m", str(model), "-i", str(inp), "--n-ctx", str(args.n_ctx), "--window", str(args.window), "--quiet",
              "--threads", str(args.threads)]
    from reranker.jobs.ray_data import prepare_model

    prepare_model(str(model))  # the fast path's one-time copy, so the first path timed does not pay for it
    best: dict[str, float] = {}
    loop_rate = 0.0
    outputs: dict[str, Path] = {}
    for r in range(args.rounds):
        for n in [0, *args.actors] if r % 2 == 0 else [*args.actors[::-1], 0]:  # alternate the order: load drifts
            if n == 0:
                out = work / f"local-{r}.parquet"
                wall = run(["score", *common, "-o", str(out)])
                best["local"] = min(best.get("local", float("inf")), wall)
                loop_rate = max(loop_rate, json.loads(out.with_name(out.name + ".summary.json").read_text())["pairs_per_second"])
                outputs["local"] = out
                continue
            if gpus and n > gpus:
                print(f"skipping {n} actors: {gpus} GPU(s), one per actor", file=sys.stderr)
                continue
            out = work / f"ray{n}-{r}"
            wall = run(["score", *common, "-o", str(out), "--engine", "ray", "--actors", str(n),
                        "--actor-cpus", str(args.threads), "--shard-windows", str(args.shard_windows)])
            best[f"ray x{n}"] = min(best.get(f"ray x{n}", float("inf")), wall)
            outputs[f"ray x{n}"] = out
    ray.shutdown()
    want = pq.read_table(outputs["local"])
    equal = {k: pq.read_table(v).equals(want) for k, v in outputs.items() if k != "local"}
    diff = {k: float(abs(pq.read_table(v).column("score").to_numpy() - want.column("score").to_numpy()).max())
            for k, v in outputs.items() if k != "local"}
    load = os.getloadavg()[0]
    print(f"{args.pairs} pairs, window {args.window}, {args.threads} thread(s) per process, model {Path(model).name}, "
          f"{'GPU x' + str(gpus) if gpus else 'CPU'}, load average {load:.2f}, best of {args.rounds}")
    print(f"  local job (loop only)    : {loop_rate:8.1f} pairs/s")
    rows = {}
    for name, wall in sorted(best.items(), key=lambda kv: kv[0] != "local"):
        rate = args.pairs / wall
        rows[name] = {"wall_s": round(wall, 2), "pairs_per_s": round(rate, 2), "vs_local": round(best["local"] / wall, 3)}
        same = "" if name == "local" else f"   output equal to the local job's: {equal[name]} (max |score diff| {diff[name]:.1e})"
        print(f"  {name:<9} (whole command): {rate:8.1f} pairs/s  {wall:7.1f} s  x{best['local'] / wall:.2f} of local{same}")
    if "ray x1" in best:
        print(f"  Ray overhead with 1 actor: {100 * (best['ray x1'] / best['local'] - 1):+.1f}% wall time (target <= +10%)")
    if args.json:
        args.json.write_text(json.dumps({"pairs": args.pairs, "window": args.window, "threads": args.threads, "gpus": gpus,
                                         "load_average": load, "local_loop_pairs_per_s": loop_rate, "paths": rows,
                                         "outputs_equal": equal, "max_score_diff": diff}, indent=1))
    if not gpus and not all(equal.values()):  # on the CPU the same windows give the same bits; GPUs promise no such thing
        raise SystemExit("the Ray path's output differs from the local job's")


if __name__ == "__main__":
    main()
