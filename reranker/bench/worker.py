"""One quantization level measured in a fresh process: `python -m reranker.bench.worker SPEC.json`.

A process per level makes its peak resident memory and its load time its own (nothing
cached from the level before). The spec names the GGUF, the head, the pairs file, the loading
options and, for a projector level, the vision projector (the pairs then hold `{"image": path}` documents); the worker prints `progress N` lines on stdout while it scores, then
writes the scores (`.npy`) and the numbers (JSON) where the spec says.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB; None where it cannot be read.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec; `ru_maxrss` does not (the
    kernel carries the forking parent's peak over), so it is only the fallback elsewhere.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # macOS reports bytes, others KiB


def _gpu_free_mb() -> float | None:
    """Free memory on the current CUDA device (all processes' use counts), None without CUDA.

    torch's own allocator statistics miss llama.cpp's buffers, so the device-wide figure is read.
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return free / 2**20
    except (ImportError, RuntimeError):
        return None


def measure(spec: dict) -> dict:
    """Load one GGUF, warm up, score every pair once; the numbers and (in `spec["scores"]`) the scores."""
    from reranker import Reranker  # after the baseline below: imports are not the model's memory

    pairs = json.loads(Path(spec["pairs"]).read_text(encoding="utf-8"))
    gpu_before = _gpu_free_mb()  # also creates torch's CUDA context before the baseline
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    rr = Reranker.from_pretrained(spec["gguf"], head=spec["head"], device=spec.get("device"), n_ctx=spec.get("n_ctx"),
                                  n_batch=spec["n_batch"], n_gpu_layers=spec["n_gpu_layers"], n_threads=spec.get("n_threads"),
                                  max_length=spec.get("max_length"), max_query_length=spec["max_query_length"],
                                  max_doc_length=spec.get("max_doc_length"),
                                  bf16=False, mmproj=spec.get("mmproj"))  # each level as stored: the F16 row is F16
    if spec.get("mmproj"):
        rr.vision  # noqa: B018 (the projector loads on first use: its load is part of the level's)
    load_s = time.perf_counter() - t0
    try:
        batch = spec["batch_size"]
        t0 = time.perf_counter()
        if spec["warmup"] > 0:
            rr.compute_score(pairs[: spec["warmup"]], batch_size=batch)  # pages in the weights, sizes the buffers
        warmup_s = time.perf_counter() - t0
        scores = np.empty(len(pairs), dtype=np.float32)
        hidden = np.empty((len(pairs), rr.backbone.n_embd), dtype=np.float32) if spec.get("hidden") else None
        tokens = truncated = 0
        t0 = time.perf_counter()
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            if hidden is None:
                scores[start : start + len(chunk)] = rr.compute_score(chunk, batch_size=batch)
            else:  # compute_score's two steps, keeping the states (bench-quant --recalibrate)
                hidden[start : start + len(chunk)] = rr.embed(chunk, batch_size=batch)
                scores[start : start + len(chunk)] = rr.score_embeddings(hidden[start : start + len(chunk)])
            tokens += rr.last_usage.tokens
            truncated += rr.last_usage.truncated
            print(f"progress {start + len(chunk)}", flush=True)
        score_s = time.perf_counter() - t0
        gpu_after = _gpu_free_mb()
    finally:
        rr.close()
    np.save(spec["scores"], scores)
    if hidden is not None:
        np.save(spec["hidden"], hidden)
    return {
        "load_s": load_s, "warmup_s": warmup_s, "score_s": score_s,
        "pairs": len(pairs), "tokens": tokens, "truncated": truncated,
        "pairs_per_s": len(pairs) / score_s if score_s > 0 else None,
        "tokens_per_s": tokens / score_s if score_s > 0 else None,
        "peak_host_mb": peak_rss_mb(), "baseline_host_mb": baseline,
        "gpu_mem_mb": None if gpu_before is None or gpu_after is None else max(0.0, gpu_before - gpu_after),
    }


def main(argv: list[str] | None = None) -> int:
    spec_path = Path((argv if argv is not None else sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    result = measure(spec)
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
