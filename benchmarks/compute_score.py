"""pairs/s and tokens/s of `Reranker.compute_score` against the obvious path, same pairs, same run.

Also what length sorting gains the API on mixed lengths: `compute_score(pairs, batch_size=B)` (each
batch of B pairs sorted by length and packed, as a job's window) against the same batches fed to the
backbone in input order (the API before it shared the job's path).

The obvious path is what a first attempt writes: `llama_cpp.Llama(embedding=True).embed()` on
the prompt strings plus the upstream numpy formula. It does the same work but its scores are
wrong (it tokenises `<|box_end|>` as text); it is a speed baseline only.

    python benchmarks/compute_score.py            # builds the `small` synthetic model once
    python benchmarks/compute_score.py --model path/to/model.gguf --pairs 256
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_pairs(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    words = ("rerank model query document relevance vector index search retrieval token score "
             "neural ranking text code image 检索 排序 模型").split()
    return [[" ".join(rng.choices(words, k=rng.randint(4, 12))), " ".join(rng.choices(words, k=rng.randint(40, 200)))]
            for _ in range(n)]


def small_model(cache: Path) -> Path:
    from reranker.gguf.convert import convert
    from reranker.synth.random_checkpoint import synth_checkpoint

    gguf = cache / "gguf" / "jina-reranker-m0-small-F16.gguf"
    if not gguf.is_file():
        ckpt = synth_checkpoint(cache / "jina-reranker-m0-small", preset="small", seed=0)
        convert(ckpt, cache / "gguf", outtype="f16")
    return gguf


def numpy_head(npz: Path):
    with np.load(npz) as data:
        W1, b1, W2, b2 = (data[k].astype(np.float32) for k in ("W1", "b1", "W2", "b2"))
        logit_bias = float(data["logit_bias"][0])
    return lambda x: 1 / (1 + np.exp(-((np.maximum(0, x @ W1 + b1) @ W2 + b2) - logit_bias)))


def main() -> None:
    from reranker.defaults import N_BATCH_CPU

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF with mlp_weights.npz beside it (default: synthetic small)")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    ap.add_argument("--n-batch", type=int, default=N_BATCH_CPU, help="tokens per decode call, both paths (default: the CPU's, %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="compute_score's batch_size for the sorting comparison")
    args = ap.parse_args()

    from llama_cpp import LLAMA_POOLING_TYPE_LAST, Llama

    from reranker import Reranker
    from reranker.engine.prompts import format_prompt

    gguf = args.model or small_model(args.cache)
    npz = gguf.parent / "mlp_weights.npz"
    pairs = synthetic_pairs(args.pairs)
    threads = os.cpu_count()

    # bf16=False: the file as stored, like the obvious path (the BF16 re-encode is measured in peer.py)
    reranker = Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=4096, n_batch=args.n_batch, n_threads=threads, bf16=False)
    reranker.compute_score(pairs[:4])  # warm-up
    t = time.perf_counter()
    reranker.compute_score(pairs, batch_size=len(pairs))
    ours = time.perf_counter() - t
    tokens = reranker.last_usage.tokens
    sorted_s, unsorted_s = sorting_gain(reranker, pairs, args.batch_size)
    reranker.close()

    llm = Llama(str(gguf), embedding=True, pooling_type=LLAMA_POOLING_TYPE_LAST, n_ctx=4096, n_batch=args.n_batch,
                n_threads=threads, verbose=False)
    mlp = numpy_head(npz)
    prompts = [format_prompt(q, d) + "<|box_end|>" for q, d in pairs]
    llm.embed(prompts[:4], normalize=False)
    t = time.perf_counter()
    mlp(np.array(llm.embed(prompts, normalize=False), dtype=np.float32))
    obvious = time.perf_counter() - t

    print(f"model {gguf.name}, {len(pairs)} pairs, {tokens} prompt tokens, {threads} threads")
    print(f"{'path':<36}{'pairs/s':>10}{'tokens/s':>12}")
    print(f"{'compute_score':<36}{len(pairs) / ours:>10.1f}{tokens / ours:>12.0f}")
    print(f"{'Llama.embed() + numpy (baseline)':<36}{len(pairs) / obvious:>10.1f}{tokens / obvious:>12.0f}")
    print(f"speed-up over baseline: {obvious / ours:.2f}x")
    print(f"batch_size={args.batch_size}: {'compute_score (length-sorted)':<30}{len(pairs) / sorted_s:>10.1f}{tokens / sorted_s:>12.0f}")
    print(f"batch_size={args.batch_size}: {'input order (before)':<30}{len(pairs) / unsorted_s:>10.1f}{tokens / unsorted_s:>12.0f}")
    print(f"sorting gains the API {unsorted_s / sorted_s:.2f}x on these mixed lengths")


def sorting_gain(reranker, pairs: list[list[str]], batch_size: int, repeats: int = 2) -> tuple[float, float]:
    """Best-of-`repeats` seconds of `compute_score(pairs, batch_size=...)` and of the same batches decoded in input order."""
    builder = reranker.prompt_builder()

    def input_order() -> None:
        for start in range(0, len(pairs), batch_size):
            prompts = [builder.build(q, d) for q, d in pairs[start : start + batch_size]]
            reranker.score_embeddings(reranker.backbone.embed([p.ids for p in prompts]))

    times: dict[str, float] = {}
    for name, fn in (("sorted", lambda: reranker.compute_score(pairs, batch_size=batch_size)), ("input", input_order)):
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - t)
    return times["sorted"], times["input"]


if __name__ == "__main__":
    main()
