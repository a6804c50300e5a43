"""Throughput of the torch scoring head against the upstream numpy formula.

    python benchmarks/head_throughput.py                      # CPU: N=20000, H=1536
    python benchmarks/head_throughput.py --n 5000 --no-cuda

CPU: embeddings/s of `score_embeddings` and of the upstream numpy lambda on the
same float32 array, and their ratio. CUDA (when available): `score_embeddings`
at 1e5..1e7 embeddings in fp32 and bf16, from device-resident tensors and
streamed from host memory, as a fraction of the card's dense matmul rate
measured with one large torch.matmul (the 2*H*H FLOPs of the first layer
dominate each embedding's cost). TF32 stays off, so fp32 is compared with true fp32.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

# The repo root first, so `import head` finds this checkout's package (installed or not).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from head import ScoringHead, score_embeddings  # noqa: E402


def best_time(fn: Callable[[], object], repeats: int, cuda: bool = False, warmup: bool = True) -> float:
    """Best wall time of `repeats` runs, after one warm-up run (which also absorbs torch.compile)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def random_head(hidden: int, seed: int) -> ScoringHead:
    torch.manual_seed(seed)
    head = ScoringHead(hidden)
    with torch.no_grad():  # realistic scale: scores spread over (0, 1), not saturated
        for p in head.parameters():
            p.normal_(0, hidden**-0.5)
    return head.eval()


def upstream_mlp(head: ScoringHead) -> Callable[[np.ndarray], np.ndarray]:
    """The release snippet, on the same weights in the npz layout."""
    W1 = head.fc1.weight.detach().numpy().T.copy()
    b1, W2 = head.fc1.bias.detach().numpy(), head.fc2.weight.detach().numpy().T.copy()
    b2, logit_bias = head.fc2.bias.detach().numpy(), float(head.logit_bias)
    return lambda x: 1 / (1 + np.exp(-((np.maximum(0, x @ W1 + b1) @ W2 + b2) - logit_bias)))


def flops_per_embedding(hidden: int) -> int:
    return 2 * hidden * hidden + 2 * hidden


def cpu_part(args: argparse.Namespace) -> None:
    head = random_head(args.hidden, args.seed)
    x = np.random.default_rng(args.seed).standard_normal((args.n, args.hidden), dtype=np.float32)
    mlp = upstream_mlp(head)
    run_np = lambda: mlp(x)  # noqa: E731
    run_th = lambda: score_embeddings(head, x, batch_size=args.batch_size, device="cpu")  # noqa: E731
    run_np(), run_th()  # warm-up
    # Interleaved, so a load spike from other processes hits both sides alike.
    t_np, t_th = float("inf"), float("inf")
    for _ in range(args.repeats):
        t_np = min(t_np, best_time(run_np, 1, warmup=False))
        t_th = min(t_th, best_time(run_th, 1, warmup=False))
    diff = np.abs(score_embeddings(head, x, device="cpu") - mlp(x).ravel()).max()
    gflop = flops_per_embedding(args.hidden) * args.n / 1e9
    print(
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, numpy {np.__version__}; N={args.n}, H={args.hidden}, float32, best of {args.repeats}"
    )
    print(
        f"  numpy upstream formula : {args.n / t_np:12,.0f} emb/s  ({t_np * 1e3:8.1f} ms, {gflop / t_np:6.1f} GFLOP/s)"
    )
    print(
        f"  torch score_embeddings : {args.n / t_th:12,.0f} emb/s  ({t_th * 1e3:8.1f} ms, {gflop / t_th:6.1f} GFLOP/s)"
    )
    print(f"  ratio torch / numpy    : {t_np / t_th:.2f}x   (max |difference| {diff:.1e})")


def matmul_rate(dtype: torch.dtype, size: int = 8192, iters: int = 20) -> float:
    """Dense FLOP/s of one large square matmul: the card's practical peak for `dtype`."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    t = best_time(lambda: [torch.matmul(a, b) for _ in range(iters)], 3, cuda=True)
    return 2 * size**3 * iters / t


def cuda_part(args: argparse.Namespace) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print(
        f"\nCUDA: {torch.cuda.get_device_name()}, torch {torch.__version__}, H={args.hidden}, "
        f"batch_size={args.batch_size}, compiled fused scorer"
    )
    fpe = flops_per_embedding(args.hidden)
    for dtype in (torch.float32, torch.bfloat16):
        peak = matmul_rate(dtype)
        head = random_head(args.hidden, args.seed).to("cuda", dtype)
        print(f"  {str(dtype).removeprefix('torch.')}: dense matmul {peak / 1e12:.1f} TFLOP/s")
        for n in args.cuda_sizes:
            for where in ("device", "host"):
                elt = torch.finfo(dtype).bits // 8
                if where == "host" and n > args.host_max:
                    continue
                if where == "device" and n * args.hidden * elt * 1.1 + 4e9 > torch.cuda.mem_get_info()[0]:
                    print(f"    N={n:>10,} {where}: skipped (does not fit in GPU memory)")
                    continue
                x = torch.randn(n, args.hidden, dtype=dtype, device="cuda" if where == "device" else "cpu")
                t = best_time(functools.partial(score_embeddings, head, x, batch_size=args.batch_size), args.repeats, cuda=True)
                rate = n / t
                print(
                    f"    N={n:>10,} {where:6s}: {rate:14,.0f} emb/s  {rate * fpe / 1e12:7.1f} TFLOP/s  "
                    f"= {rate * fpe / peak:6.1%} of the matmul rate"
                )
                del x
        del head
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="embeddings for the CPU comparison")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cuda-sizes", type=lambda s: [int(float(v)) for v in s.split(",")], default=[10**5, 10**6, 10**7])
    p.add_argument("--host-max", type=float, default=1e6, help="largest N streamed from host memory on CUDA")
    p.add_argument("--no-cuda", action="store_true")
    args = p.parse_args()
    cpu_part(args)
    if torch.cuda.is_available() and not args.no_cuda:
        cuda_part(args)


if __name__ == "__main__":
    main()
