"""What a forward pass costs and what the machine can do: the yardsticks `peer.py` and `profile.py` share.

- `useful_flops`: 2 x non-embedding parameters per prompt token (the mat-muls that any implementation
  must do; attention's own O(n^2) work and padding are not counted), as issue 24 measures;
- `matmul_rate`: torch's mat-mul rate on this machine, in a transformer's shape (tokens x hidden @
  hidden x intermediate), for one dtype and thread count: the limit both sides run against.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def non_embedding_params(ckpt: Path) -> int:
    """Parameters of the decoder layers and the final norm (the token embedding and the heads excluded)."""
    c = json.loads((Path(ckpt) / "config.json").read_text(encoding="utf-8"))
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * (h // c["num_attention_heads"])
    attn = h * h + 2 * h * kv + h * h + h + 2 * kv  # q, k, v, o weights; q, k, v biases
    mlp = 3 * h * i
    return layers * (attn + mlp + 2 * h) + h


def useful_flops(ckpt: Path, tokens: int) -> float:
    return 2.0 * non_embedding_params(ckpt) * tokens


def matmul_shape(ckpt: Path, rows: int = 512) -> tuple[int, int, int]:
    c = json.loads((Path(ckpt) / "config.json").read_text(encoding="utf-8"))
    return rows, c["hidden_size"], c["intermediate_size"]


def matmul_rate(shape: tuple[int, int, int], dtype: str, threads: int, seconds: float = 1.0) -> float:
    """GFLOP/s of torch's (m x k) @ (k x n) in `dtype` ("bf16" or "fp32") on `threads` CPU threads, best of a few runs."""
    import torch

    torch.set_num_threads(threads)
    m, k, n = shape
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
    a @ b  # warm: oneDNN picks and caches its kernel
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


def fraction(gflops: float, rates: dict[str, float], dtype: str) -> str:
    """`gflops` as a share of torch's `dtype` mat-mul rate; "n/a" for bf16 on a CPU without native bf16
    (torch then runs bf16 far below fp32, and a share of that limit says nothing)."""
    if dtype == "bf16" and rates["bf16"] < rates["fp32"]:
        return "n/a"
    return f"{gflops / rates[dtype]:.0%}"
