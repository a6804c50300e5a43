"""GPU: the offline job's tokens/s on the `m0`-shaped synthetic model at F16, Q8_0 and Q4_K_M.

For each level: the job (the same streaming loop as `reranker score`: read, tokenise on a
thread, decode, head, write, checkpoint) run in-process on a fast-path backbone with all
layers offloaded, flash attention on and a larger n_batch/n_ubatch; its ceiling (only the time
inside `llama_decode` + `llama_synchronize` on the same packed batches); and the fraction of the
card's dense bf16 matmul rate (measured here with torch) that the job's tokens/s represent, at
2 x 1.54e9 FLOPs per token (the backbone's parameters, one multiply-add each; attention's own
FLOPs are left out, so the fraction is a slight underestimate for long prompts).

Needs llama-cpp-python built with CUDA (CMAKE_ARGS="-DGGML_CUDA=on") and a CUDA build of torch;
it stops at once, before building anything, when either is missing.

    python benchmarks/gpu_m0.py                                    # builds the m0 model (~3 GB per level)
    python benchmarks/gpu_m0.py --model m0-F16.gguf --levels F16 Q8_0 --pairs 8192 --n-batch 8192 --n-ubatch 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from job import job_windows, score_windows, synthetic_model, synthetic_pairs, warm_up, write_pairs_jsonl  # noqa: E402

FLOPS_PER_TOKEN = 2 * 1.54e9


def require_gpu() -> str:
    """The CUDA device's name, or exit with what is missing."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        sys.exit("gpu_m0.py: this llama-cpp-python is a CPU-only build (llama_supports_gpu_offload() is false). "
                 "Reinstall it with CUDA: CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --no-cache-dir --force-reinstall "
                 "llama-cpp-python; for CPU numbers run benchmarks/job.py")
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_m0.py: torch sees no CUDA device (a CPU build of torch, or no GPU); install the CUDA build of torch")
    return torch.cuda.get_device_name(0)


def bf16_matmul_flops(n: int = 8192, iters: int = 50) -> float:
    """The card's dense bf16 matmul rate (FLOP/s): best of three timed runs of `iters` n x n x n matmuls."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * iters / best


def m0_levels(model: Path | None, cache: Path, levels: list[str]) -> dict[str, Path]:
    """Level -> GGUF path: the F16 model (given or built from the synthetic `m0` checkpoint) and its quantizations."""
    from reranker.gguf.quantize import quantize

    f16 = model or synthetic_model(cache, "m0", "f16")[0]
    out = {}
    for level in levels:
        if level.upper() == "F16":
            out["F16"] = f16
            continue
        path = f16.with_name(f16.name.replace("-F16", "").removesuffix(".gguf") + f"-{level.upper()}.gguf")
        if not path.is_file():
            print(f"quantizing {f16.name} to {level} ...", file=sys.stderr, flush=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            quantize(f16, tmp, level)
            os.replace(tmp, path)
        out[level.upper()] = path
    return out


def run_job_in_process(rr, input_path: Path, output: Path, window: int, max_length: int):
    """The job's streaming loop (`reranker.jobs.job.Job`, as `reranker score` runs it) with this reranker.

    Returns (stats, wall seconds of `Job.run`).
    """
    from reranker.defaults import MAX_QUERY_LENGTH
    from reranker.engine.prompts import PromptBuilder
    from reranker.engine.scoring import score_prompts
    from reranker.jobs.job import Job, JobSpec

    spec = JobSpec(input=input_path, output=output, per="pair", window=window, restart=True)
    builder = PromptBuilder(rr.backbone.tokenizer, min(max_length, rr.backbone.n_ctx), MAX_QUERY_LENGTH)

    def scorer(windows):
        for w in windows:
            yield w, score_prompts(rr, w.prompts)

    job = Job(spec, builder, scorer, {"settings": {"benchmark": "gpu_m0"}}, model_name=str(rr.backbone.path))
    t = time.perf_counter()
    stats = job.run()
    return stats, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an m0-shaped F16 GGUF with mlp_weights.npz beside it (default: synthetic m0)")
    ap.add_argument("--levels", nargs="+", default=["F16", "Q8_0", "Q4_K_M"], help="default: F16 Q8_0 Q4_K_M")
    ap.add_argument("--pairs", type=int, default=4096, help="pairs per level (default: %(default)s)")
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 200), metavar=("MIN", "MAX"),
                    help="document length range in words (default: 40 200)")
    ap.add_argument("--n-ctx", type=int, default=10240, help="(default: %(default)s)")
    ap.add_argument("--n-batch", type=int, default=4096, help="tokens per decode call (default: %(default)s)")
    ap.add_argument("--n-ubatch", type=int, default=1024, help="tokens per GPU step (default: %(default)s)")
    ap.add_argument("--n-seq-max", type=int, default=64, help="sequences per decode call (default: %(default)s)")
    ap.add_argument("--window", type=int, default=2048, help="pairs per job window (default: %(default)s)")
    ap.add_argument("--no-flash-attn", action="store_true", help="leave flash attention to llama.cpp (auto)")
    ap.add_argument("--matmul-size", type=int, default=8192, help="n of the n x n x n bf16 matmul (default: %(default)s)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench",
                    help="where the synthetic model and quantizations are built (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--cpu-check", action="store_true",
                    help="check this script without a GPU: the same steps on the CPU (pass --model, e.g. the small "
                         "synthetic F16), no matmul rate; its numbers mean nothing")
    args = ap.parse_args()

    device = "CPU (--cpu-check)" if args.cpu_check else require_gpu()

    from head import ScoringHead
    from reranker import Reranker
    from reranker.engine.backbone import Backbone
    from reranker.engine.identity import with_identity_output

    flops = float("nan") if args.cpu_check else bf16_matmul_flops(args.matmul_size)
    print(f"{device}: dense bf16 matmul {flops / 1e12:.1f} TFLOP/s ({args.matmul_size}^3)", flush=True)
    paths = m0_levels(args.model, args.cache, args.levels)
    head = ScoringHead.load(next(iter(paths.values())).parent / "mlp_weights.npz")
    pairs = synthetic_pairs(args.pairs, tuple(args.doc_words))
    max_length = min(10240, args.n_ctx)
    results = []
    with tempfile.TemporaryDirectory(prefix="reranker-gpu-bench-") as tmp:
        tmp = Path(tmp)
        input_path = tmp / "pairs.jsonl"
        write_pairs_jsonl(input_path, pairs)
        for level, path in paths.items():
            identity = with_identity_output(path, "f32")  # one-time cached copy, outside the timings
            backbone = Backbone(identity, fast=True, n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                                n_seq_max=args.n_seq_max, n_gpu_layers=0 if args.cpu_check else -1,
                                flash_attn=None if args.no_flash_attn else True)
            rr = Reranker(backbone, head, max_length=max_length, device="cpu" if args.cpu_check else "cuda")
            builder = rr.prompt_builder()
            prompts = [builder.build(q, d) for q, d in pairs]
            warm_up(rr, prompts)
            stats, wall = run_job_in_process(rr, input_path, tmp / f"scores-{level}.jsonl", args.window, max_length)
            _, engine_wall, timer = score_windows(rr, job_windows(prompts, args.window))
            rr.close()
            job_tps = stats.tokens / wall
            r = {"level": level, "file_gb": path.stat().st_size / 1e9, "pairs": stats.pairs, "tokens": stats.tokens,
                 "job_s": wall, "job_pairs_per_s": stats.pairs / wall, "job_tokens_per_s": job_tps,
                 "ceiling_tokens_per_s": stats.tokens / timer.seconds, "engine_tokens_per_s": stats.tokens / engine_wall,
                 "decode_calls": timer.calls, "fraction_of_bf16": job_tps * FLOPS_PER_TOKEN / flops}
            results.append(r)
            print(f"{level}: {r['job_tokens_per_s']:.0f} tokens/s ({r['job_pairs_per_s']:.1f} pairs/s), "
                  f"ceiling {r['ceiling_tokens_per_s']:.0f}, fraction of bf16 {r['fraction_of_bf16']:.3f}", flush=True)

    print(f"\n{device}; {args.pairs} pairs, {results[0]['tokens']} tokens; n_batch {args.n_batch}, n_ubatch {args.n_ubatch}, "
          f"n_seq_max {args.n_seq_max}, flash attention {'auto' if args.no_flash_attn else 'on'}; "
          f"bf16 matmul {flops / 1e12:.1f} TFLOP/s")
    print(f"{'level':<8}{'GB':>6}{'pairs/s':>9}{'tokens/s':>10}{'ceiling':>10}{'job/ceil':>9}{'engine':>10}{'of bf16':>9}")
    for r in results:
        print(f"{r['level']:<8}{r['file_gb']:>6.2f}{r['job_pairs_per_s']:>9.1f}{r['job_tokens_per_s']:>10.0f}"
              f"{r['ceiling_tokens_per_s']:>10.0f}{r['job_tokens_per_s'] / r['ceiling_tokens_per_s']:>9.3f}"
              f"{r['engine_tokens_per_s']:>10.0f}{r['fraction_of_bf16']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "bf16_flops": flops, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
