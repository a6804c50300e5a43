"""The GPU run's steps, one per process (run.py starts them): `python steps.py STEP --ctx JSON --result FILE`.

Each step writes its result JSON as it goes (a step killed at its timeout still reports what it
finished) and stops early near STEP_DEADLINE (epoch seconds, from run.py). Correctness steps
return a list of checks `{"name", "ok", "detail"}`; any false one makes the run loud about it.

  models        background: synthetic checkpoints, GGUF conversions, quantizations, identity copies
  check-*       CUDA vs CPU scores, offload and VRAM, head vs numpy, the job end to end on the GPU
  matmul        the card's dense bf16 (and fp32) matmul rate, and copy bandwidth
  q8 f16 q4 bf16  the job (`reranker score`), its llama_decode ceiling, the upstream recipe's path
  transformers  the original computation in transformers (bf16, SDPA, sorted batches of 8/32/128)
  head          the torch head alone, 1e5..1e7 embeddings, fp32/bf16, fraction of the bf16 rate
  sweep         n_batch, n_ubatch, sequences per call, flash attention, unified vs per-sequence KV
  serve         optional: `reranker serve` under 1/8/32 clients against the job (benchmarks/serve.py)
  ray           `reranker score --engine ray` against the local job (benchmarks/ray_scale.py), when Ray is installed
  cli           `reranker ...` in this process (so llama.cpp's log can be captured, workers included)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BENCH = ROOT / "benchmarks"

# Steps that run while llama.cpp is being built (and the background conversion) must not need it: on the
# GPU machine it is not installed yet. GPU_RUN_NO_LLAMA makes that so everywhere, the rehearsal included.
if os.environ.get("GPU_RUN_NO_LLAMA"):
    sys.modules["llama_cpp"] = None  # type: ignore[assignment]

# llama.cpp's log of this process (and of `--devices` workers, which re-import this file as
# __mp_main__) into files, to prove from the outside where the layers went.
if os.environ.get("GPU_RUN_LLAMA_LOG"):
    _lg = logging.getLogger("reranker.llama")
    _lg.setLevel(logging.DEBUG)
    _lg.propagate = False
    Path(os.environ["GPU_RUN_LLAMA_LOG"]).mkdir(parents=True, exist_ok=True)
    _lg.addHandler(logging.FileHandler(Path(os.environ["GPU_RUN_LLAMA_LOG"]) / f"llama-{os.getpid()}.log"))

FLOPS_PER_TOKEN = 2 * 1.54e9  # the m0 backbone's parameters, one multiply-add each
HIDDEN_M0 = 1536
DEADLINE = float(os.environ.get("STEP_DEADLINE", "inf"))
WORDS = ("rerank model query document relevance vector index search retrieval token score neural ranking text code image "
         "passage answer question context embedding transformer attention layer weight 检索 排序 模型").split()
LEVEL_OF = {"q8": "Q8_0", "f16": "F16", "q4": "Q4_K_M", "bf16": "BF16"}


def flops_per_token(preset: str) -> float:
    """2 x the language model's parameters (1.54e9 for m0, as the issue counts them; attention's own FLOPs left out)."""
    if preset == "m0":
        return FLOPS_PER_TOKEN
    from math import prod

    from reranker.synth.random_checkpoint import PRESETS, tensor_shapes

    return 2.0 * sum(prod(shape) for name, shape in tensor_shapes(PRESETS[preset]) if name.startswith("model."))


def tail_lines(text: str, n: int = 2) -> str:
    """The last `n` non-empty lines of a command's output: where a Python traceback says what went wrong."""
    return " | ".join([ln.strip() for ln in text.strip().splitlines() if ln.strip()][-n:])[-400:]


def left() -> float:
    return DEADLINE - time.time()


def say(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Result:
    """The step's result file, rewritten on every change."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict = {}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def check(self, name: str, ok: bool, detail) -> None:
        self.data.setdefault("checks", []).append({"name": name, "ok": bool(ok), "detail": detail})
        say(f"CHECK {'ok  ' if ok else 'FAIL'} {name}: {detail}")
        self.flush()

    def flush(self) -> None:
        if self.path:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable) + "\n")
            os.replace(tmp, self.path)


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


# ---------------------------------------------------------------------------------------------
# models


def paths(ctx: dict) -> dict[str, Path]:
    w = Path(ctx["work"]) / "models"
    p = ctx["preset"]
    name = f"jina-reranker-m0-{p}"
    return {
        "tiny_ckpt": w / "tiny" / "jina-reranker-m0-tiny", "tiny_f32": w / "tiny" / "gguf" / "jina-reranker-m0-tiny-F32.gguf",
        "ckpt": w / p / name, "F16": w / p / "gguf" / f"{name}-F16.gguf", "Q8_0": w / p / "gguf" / f"{name}-Q8_0.gguf",
        "Q4_K_M": w / p / "gguf" / f"{name}-Q4_K_M.gguf", "BF16": w / p / "gguf-bf16" / f"{name}-BF16.gguf",
        # the images step's own checkpoint, with the vision tower, and its F16 GGUF + mmproj (benchmarks/images.py's layout)
        "images": w / "images", "images_model": w / "images" / f"{p}-vision-gguf-f16" / f"{name}-vision-F16.gguf",
    }


def ready(p: Path, suffix: str = ".ready") -> Path:
    return Path(str(p) + suffix)


QUANT_STAGE = ("Q8_0", "Q4_K_M", "BF16")  # what `models --stage quant` makes (BF16 after the quantizations), and every identity copy


def failed_marker(p: Path, suffix: str = ".ready") -> Path:
    """`<models>/<stage>.failed`, written by the background stage that makes `p` (+ `suffix`) when it crashes."""
    models = next((d for d in p.parents if d.name == "models"), p.parent)  # paths() puts every model under work/models
    stage = "quant" if suffix == ".identity.ready" or any(f"-{lvl}.gguf" in p.name for lvl in QUANT_STAGE) else "convert"
    return models / f"{stage}.failed"


class StageFailed(RuntimeError):
    pass


def wait_ready(p: Path, suffix: str = ".ready", deadline: float | None = None) -> Path:
    """Wait for the background's marker of `p`; raise at once when its stage failed, or when the deadline comes first."""
    deadline = DEADLINE - 20 if deadline is None else deadline
    t = time.time()
    failed = failed_marker(p, suffix)
    while not ready(p, suffix).exists():
        if failed.exists():
            raise StageFailed(f"{p.name}{suffix} will not come: the background stage failed ({failed}):\n"
                              + failed.read_text(errors="replace")[-1500:])
        if time.time() > deadline:
            raise TimeoutError(f"{p.name}{suffix} not ready after {time.time() - t:.0f} s (background model preparation)")
        time.sleep(0.5)
    if time.time() - t > 1:
        say(f"waited {time.time() - t:.0f} s for {p.name}{suffix}")
    return p


def step_models(ctx: dict, args) -> None:
    """Background model preparation; on a crash `<stage>.failed` (the traceback) stops every wait on it at once."""
    failed = Path(ctx["work"]) / "models" / f"{args.stage}.failed"
    failed.unlink(missing_ok=True)
    try:
        _models(ctx, args)
    except BaseException:
        import traceback

        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"models --stage {args.stage} failed at {time.strftime('%H:%M:%S')}:\n{traceback.format_exc()}")
        raise


def _models(ctx: dict, args) -> None:
    """`--stage convert` needs no llama.cpp, `--stage quant` does."""
    import torch

    # Few threads: the llama.cpp build beside it has the cores (every llama.cpp step waits for the build).
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 4)))
    P = paths(ctx)
    timings_path = Path(ctx["work"]) / "models" / f"timings-{args.stage}.json"
    timings_path.parent.mkdir(parents=True, exist_ok=True)
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(name: str, fn):
        t = time.perf_counter()
        say(f"models: {name} ...")
        out = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        timings_path.write_text(json.dumps(timings, indent=1) + "\n")
        say(f"models: {name} done in {timings[name]:.1f} s")
        return out

    def ident(level: str) -> None:
        """The fast path's cached copy: made here so that no measurement pays for it."""
        from reranker.engine.identity import with_identity_output  # imports llama_cpp: only after the install

        if not ready(P[level], ".identity.ready").exists():
            timed(f"identity copy {level}", lambda: with_identity_output(P[level], "f32"))
            ready(P[level], ".identity.ready").touch()

    if args.stage == "convert":
        from reranker.gguf.convert import convert
        from reranker.synth.random_checkpoint import synth_checkpoint

        if not ready(P["tiny_f32"]).exists():
            timed("tiny: synth + convert f32", lambda: (synth_checkpoint(P["tiny_ckpt"], preset="tiny", seed=0),
                                                        convert(P["tiny_ckpt"], P["tiny_f32"].parent, outtype="f32")))
            ready(P["tiny_f32"]).touch()
        if not ready(P["ckpt"]).exists():
            # Text steps only: m0's vision tower (665 M parameters, 1.3 GB) is not needed by them.
            timed(f"{ctx['preset']}: synth checkpoint", lambda: synth_checkpoint(P["ckpt"], preset=ctx["preset"], seed=0,
                                                                                 vision=False))
            ready(P["ckpt"]).touch()
        if not ready(P["F16"]).exists():
            timed(f"{ctx['preset']}: convert f16", lambda: convert(P["ckpt"], P["F16"].parent, outtype="f16", mmproj_type=None))
            ready(P["F16"]).touch()
        # F16's identity copy waits for the quant stage: reranker.engine.identity imports llama_cpp, which is
        # not installed while this stage runs (GPU_RUN_NO_LLAMA); importing it here crashed the stage.
        if ctx.get("images") and not ready(P["images_model"]).exists():
            # last here: the images step comes last too; its model (m0: a 4.4 GB checkpoint with Qwen2-VL-2B's tower,
            # F16 GGUF + mmproj) is made while the other steps run, not inside the step's budget
            timed(f"{ctx['preset']}: images model (synth with vision + convert f16)", lambda: images_model(ctx))
            ready(P["images_model"]).touch()
        return

    from reranker.gguf.quantize import quantize

    far = time.time() + 3600
    wait_ready(P["F16"], deadline=far)

    def quant(level: str) -> None:
        if ready(P[level]).exists():
            return
        tmp = P[level].with_name(P[level].name + ".tmp")
        timed(f"quantize {level}", lambda: quantize(P["F16"], tmp, level))
        os.replace(tmp, P[level])
        ready(P[level]).touch()

    quant("Q8_0")
    ident("Q8_0")
    ident("F16")
    quant("Q4_K_M")
    ident("Q4_K_M")
    # BF16 last: the least valuable level, a 3 GB conversion and a 4 GB identity copy that the first call
    # reaches only when everything before it is done; left out when the disk is short (run.py's disk check).
    if ctx.get("no_bf16"):
        return
    from reranker.gguf.convert import convert

    if not ready(P["BF16"]).exists():
        timed(f"{ctx['preset']}: convert bf16", lambda: convert(P["ckpt"], P["BF16"].parent, outtype="bf16", mmproj_type=None))
        ready(P["BF16"]).touch()
    ident("BF16")


# ---------------------------------------------------------------------------------------------
# shared helpers


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Queries of 5-20 words, documents of 100-400 words (the issue's shape), seeded."""
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(5, 20))), " ".join(rng.choices(WORDS, k=rng.randint(100, 400))))
            for _ in range(n)]


def check_pairs(n: int = 96) -> list[tuple[str, str]]:
    """Varied pairs for the correctness checks: lengths from empty to longer than one decode call, odd text."""
    pairs = synthetic_pairs(n, seed=1)
    rng = random.Random(2)
    pairs += [(" ".join(rng.choices(WORDS, k=rng.randint(1, 8))), " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))) for _ in range(24)]
    pairs += [("", ""), ("query", ""), ("", "document"), ("naïve café §", "ça va? <|box_end|> <|endoftext|> ✓ 数据")]
    pairs.append(("long document", " ".join(rng.choices(WORDS, k=2600))))  # > n_batch 2048 tokens: chunked
    return pairs


def device(ctx: dict) -> str:
    import torch

    if ctx["cpu"]:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    return "cuda"


def vram_free() -> int | None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]
    return None


class LlamaLogCapture:
    """llama.cpp's messages of this process (through reranker's log callback) while active."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self):
        outer = self

        class H(logging.Handler):
            def emit(self, record):
                outer.lines.append(record.getMessage())

        self.h = H()
        lg = logging.getLogger("reranker.llama")
        self.prev = lg.level
        lg.setLevel(logging.DEBUG)
        lg.addHandler(self.h)
        return self

    def __exit__(self, *exc):
        lg = logging.getLogger("reranker.llama")
        lg.removeHandler(self.h)
        lg.setLevel(self.prev)

    def text(self) -> str:
        return "\n".join(self.lines)


def parse_offload(text: str) -> dict:
    m = re.findall(r"offloaded (\d+)/(\d+) layers to GPU", text)
    bufs = re.findall(r"(\S+)\s+(model|KV|compute|output|RS) buffer size\s*=\s*([\d.]+) MiB", text)
    out = {"offloaded": [f"{a}/{b}" for a, b in m], "buffers_mib": {}}
    for dev, kind, mib in bufs:
        key = f"{dev.strip(':')} {kind}"
        out["buffers_mib"][key] = round(out["buffers_mib"].get(key, 0.0) + float(mib), 1)
    out["all_layers_on_gpu"] = bool(m) and all(a == b and int(b) > 0 for a, b in m)
    return out


def steps_cmd(ctx: dict, *argv: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *argv[:1], "--ctx", json.dumps(ctx), *argv[1:]]


def cli_cmd(*argv: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "cli", "--", *argv]


def run(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[int, float, str]:
    t = time.perf_counter()
    timeout = timeout or max(5.0, left() - 5)
    timeout = None if timeout == float("inf") else timeout
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env or os.environ, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -9, f"timeout after {timeout} s: {(e.stdout or '')[-500:]!r}"
    return rc, time.perf_counter() - t, out


def cpu_env() -> dict:
    """No GPU for llama.cpp or torch: the CPU path, not a CUDA build's op offload."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="")


def job_module():
    sys.path.append(str(BENCH))
    import job  # benchmarks/job.py: DecodeTimer, score_windows, job_windows, write_pairs_jsonl, numpy_head

    return job


def random_head(hidden: int, seed: int = 0):
    import torch

    from head import ScoringHead

    torch.manual_seed(seed)
    head = ScoringHead(hidden)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, hidden**-0.5)
    return head.eval()


def numpy_formula(head, x):
    """The upstream numpy snippet in float64 on the head's float32 weights."""
    import numpy as np

    W1 = head.fc1.weight.detach().float().cpu().numpy().T.astype(np.float64)
    b1 = head.fc1.bias.detach().float().cpu().numpy().astype(np.float64)
    W2 = head.fc2.weight.detach().float().cpu().numpy().T.astype(np.float64)
    b2 = head.fc2.bias.detach().float().cpu().numpy().astype(np.float64)
    x = np.asarray(x, dtype=np.float64)
    return (1 / (1 + np.exp(-((np.maximum(0, x @ W1 + b1) @ W2 + b2) - float(head.logit_bias))))).reshape(-1)


def matmul_rate(dtype, n: int, iters: int, dev: str) -> float:
    import torch

    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * n**3 * iters / best


# ---------------------------------------------------------------------------------------------
# correctness


def step_check_offload(ctx: dict, R: Result) -> None:
    import llama_cpp
    import torch

    from reranker.engine.backbone import Backbone

    P = paths(ctx)
    gpu = not ctx["cpu"]
    supports = bool(llama_cpp.llama_supports_gpu_offload())
    R.set("llama_cpp", {"file": llama_cpp.__file__, "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")})
    R.check("llama_supports_gpu_offload()", supports == gpu, f"{supports} (expected {gpu}{'' if gpu else ': CPU rehearsal'})")
    if gpu:
        torch.cuda.init()
        R.set("torch_device", {"name": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
                               "total_mib": torch.cuda.get_device_properties(0).total_memory // 2**20})
    wait_ready(P["tiny_f32"])
    free0 = vram_free()
    with LlamaLogCapture() as cap:
        bb = Backbone(P["tiny_f32"], fast=False, n_gpu_layers=-1, n_ctx=4096)
        free1 = vram_free()
        bb.close()
    info = parse_offload(cap.text())
    info["vram_used_mib_by_load"] = None if free0 is None else round((free0 - free1) / 2**20, 1)
    R.set("tiny_f32", info)
    if gpu:
        gpu_bufs = {k: v for k, v in info["buffers_mib"].items() if k.upper().startswith("CUDA")}
        R.check("all layers on the GPU (tiny F32)", info["all_layers_on_gpu"] and any(" model" in k for k in gpu_bufs),
                f"offloaded {info['offloaded']}; buffers {info['buffers_mib']}; VRAM used by the load {info['vram_used_mib_by_load']} MiB")
    else:
        R.check("CPU build loads the model (rehearsal)", True, f"offloaded {info['offloaded'] or 'n/a'}; buffers {info['buffers_mib']}")


def step_cpu_scores(ctx: dict, args) -> None:
    """Helper (CUDA hidden): the tiny F32 model's scores and states on the CPU path, fast and upstream."""
    import numpy as np

    from reranker import Reranker

    P = paths(ctx)
    pairs = check_pairs(16 if ctx["cpu"] else 96)
    out = {}
    for fast in (True, False):
        rr = Reranker.from_pretrained(str(P["tiny_f32"]), fast=fast, device="cpu", n_gpu_layers=0)
        out[f"emb_{fast}"] = rr.embed(pairs, batch_size=64)
        out[f"scores_{fast}"] = np.asarray(rr.score_embeddings(out[f"emb_{fast}"]), dtype=np.float64)
        rr.close()
    np.savez(args.out, **out)


def step_check_scores(ctx: dict, R: Result) -> None:
    import numpy as np

    from reranker import Reranker

    P = paths(ctx)
    wait_ready(P["tiny_f32"])
    ref_file = Path(ctx["work"]) / "results" / "cpu-scores.npz"
    rc, sec, out = run(steps_cmd(ctx, "cpu-scores", "--out", str(ref_file)), env=cpu_env())
    if rc != 0:
        raise RuntimeError(f"CPU reference failed ({rc}): {tail_lines(out)}")
    ref = np.load(ref_file)
    pairs = check_pairs(16 if ctx["cpu"] else 96)
    dev = device(ctx)
    for fast in (True, False):
        rr = Reranker.from_pretrained(str(P["tiny_f32"]), fast=fast, device=dev, n_gpu_layers=-1)
        emb = rr.embed(pairs, batch_size=64)
        scores = np.asarray(rr.score_embeddings(emb), dtype=np.float64)
        tokens = rr.last_usage.tokens
        rr.close()
        name = "fast path" if fast else "upstream path (embedding mode)"
        d = float(np.abs(scores - ref[f"scores_{fast}"]).max())
        rel = float((np.linalg.norm(emb - ref[f"emb_{fast}"], axis=1) / np.maximum(np.linalg.norm(ref[f"emb_{fast}"], axis=1), 1e-30)).max())
        R.check(f"tiny F32 scores, {dev} vs CPU, {name}", d <= 1e-4 and np.isfinite(scores).all(),
                f"max |diff| {d:.2e} over {len(pairs)} pairs ({tokens} tokens, one of 2,600 words); hidden states max rel diff {rel:.2e}; "
                f"scores span {scores.min():.3f}..{scores.max():.3f}")
        if fast:
            fast_scores = scores
        else:
            R.set("fast_vs_upstream_on_device_max_diff", float(np.abs(fast_scores - scores).max()))


def step_check_head(ctx: dict, R: Result) -> None:
    import numpy as np
    import torch

    from head import ScoringHead, score_embeddings

    dev = device(ctx)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8192, HIDDEN_M0), dtype=np.float32)
    head = random_head(HIDDEN_M0, seed=0)
    ref = numpy_formula(head, x)
    h32 = head.to(dev)
    with torch.inference_mode():
        direct = h32(torch.from_numpy(x).to(dev)).float().cpu().numpy()
    compiled = score_embeddings(h32, x)
    for name, got in (("module", direct), ("score_embeddings", compiled)):
        d = float(np.abs(got - ref).max())
        R.check(f"head fp32 on {dev} ({name}) vs numpy formula", d <= 1e-5, f"max |diff| {d:.2e} over {len(x)} embeddings (limit 1e-5)")
    hb = random_head(HIDDEN_M0, seed=0).to(dev, torch.bfloat16)
    xb = torch.from_numpy(x).to(dev, torch.bfloat16)
    with torch.inference_mode():
        direct = hb(xb).float().cpu().numpy()
    compiled = score_embeddings(hb, xb)
    for name, got in (("module", direct), ("score_embeddings", compiled)):
        d = float(np.abs(np.asarray(got, dtype=np.float64) - ref).max())
        R.check(f"head bf16 on {dev} ({name}) vs numpy formula", d <= 1e-2, f"max |diff| {d:.2e} (limit 1e-2)")
    # the released head format: the tiny model's mlp_weights.npz through ScoringHead.load and benchmarks/job.py's numpy lambda
    P = paths(ctx)
    wait_ready(P["tiny_f32"])
    npz = P["tiny_f32"].parent / "mlp_weights.npz"
    h = ScoringHead.load(npz).to(dev)
    xs = rng.standard_normal((4096, h.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        got = h(torch.from_numpy(xs).to(dev)).float().cpu().numpy()
    d = float(np.abs(got - job_module().numpy_head(npz)(xs)).max())
    R.check(f"mlp_weights.npz head on {dev} vs numpy lambda", d <= 1e-5, f"max |diff| {d:.2e}")


def _read_scores(path: Path):
    import numpy as np

    with path.open(encoding="utf-8") as f:
        return np.array([json.loads(line)["score"] for line in f], dtype=np.float64)


def step_check_job(ctx: dict, R: Result) -> None:
    import numpy as np

    P = paths(ctx)
    wait_ready(P["tiny_f32"])
    work = Path(ctx["work"]) / "check-job"
    work.mkdir(parents=True, exist_ok=True)
    pairs = check_pairs(16) if ctx["cpu"] else check_pairs() * 3
    inp = work / "pairs.jsonl"
    job_module().write_pairs_jsonl(inp, pairs)
    base = ["score", "-m", str(P["tiny_f32"]), "-i", str(inp), "--per", "pair", "--quiet", "--restart"]
    rc, sec, out = run(cli_cmd(*base, "-o", str(work / "cpu.jsonl"), "--device", "cpu", "--n-gpu-layers", "0"), env=cpu_env())
    if rc != 0:
        raise RuntimeError(f"CPU job failed ({rc}): {tail_lines(out)}")
    ref = _read_scores(work / "cpu.jsonl")
    variants = [("default (in-process)", []), ("--devices 0", ["--devices", "0"])]
    variants.append(("--devices cpu,cpu (2 processes)", ["--devices", "cpu,cpu"]) if ctx["cpu"] else
                    ("--devices 0,0 (2 processes on GPU 0)", ["--devices", "0,0"]))
    first = None
    for name, extra in variants:
        tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        logdir = work / f"llama-log-{tag}"
        for f in logdir.glob("*.log") if logdir.is_dir() else []:
            f.unlink()
        env = dict(os.environ, GPU_RUN_LLAMA_LOG=str(logdir))
        outp = work / f"{tag}.jsonl"
        rc, sec, out = run(cli_cmd(*base, "-o", str(outp), *extra), env=env)
        if rc != 0:
            R.check(f"job {name}", False, f"exit {rc}: {tail_lines(out)}")
            continue
        scores = _read_scores(outp)
        summary = json.loads(outp.with_name(outp.name + ".summary.json").read_text())
        procs = [parse_offload(f.read_text(errors="replace")) for f in sorted(logdir.glob("*.log"))]
        procs = [p for p in procs if p["offloaded"] or p["buffers_mib"]]
        on_gpu = sum(p["all_layers_on_gpu"] for p in procs)
        d = float(np.abs(scores - ref).max()) if len(scores) == len(ref) else float("inf")
        detail = (f"{len(scores)} pairs in {sec:.1f} s (loop {summary.get('wall_seconds')} s); max |diff| vs CPU job {d:.2e}; "
                  f"processes with all layers on the GPU: {on_gpu} of {len(procs)} that loaded the model")
        ok = d <= 1e-4
        if not ctx["cpu"]:
            want = 2 if "2 processes" in name else 1
            ok = ok and on_gpu >= want
        if first is None:
            first = scores
        else:
            detail += f"; vs the default run {float(np.abs(scores - first).max()):.2e}"
        R.check(f"job {name}" + ("" if ctx["cpu"] else " on the GPU"), ok, detail)


# ---------------------------------------------------------------------------------------------
# measurements


def step_matmul(ctx: dict, R: Result) -> None:
    import torch

    dev = device(ctx)
    torch.backends.cuda.matmul.allow_tf32 = False
    n, iters = (8192, 50) if dev == "cuda" else (1024, 3)
    bf16 = matmul_rate(torch.bfloat16, n, iters, dev)
    R.set("bf16_flops", bf16)
    say(f"bf16 matmul {n}^3: {bf16 / 1e12:.1f} TFLOP/s")
    fp32 = matmul_rate(torch.float32, n, max(1, iters // 5), dev)
    R.set("fp32_flops", fp32)
    say(f"fp32 matmul (no TF32): {fp32 / 1e12:.1f} TFLOP/s")
    if dev == "cuda":
        a = torch.empty(2**30, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        b.copy_(a)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        torch.cuda.synchronize()
        R.set("copy_bytes_per_s", 2 * 2**30 * 10 / (time.perf_counter() - t))
        R.set("device", torch.cuda.get_device_name(0))
    R.set("matmul_n", n)


def _calibrate(fn, prompts: list, target: float, k: int = 16) -> tuple[float, float]:
    """(pairs/s, tokens/s) of `fn` on growing prefixes of `prompts` (from `k`) until one call takes `target` seconds."""
    while True:
        ps = prompts[:k]
        t = time.perf_counter()
        fn(ps)
        dt = time.perf_counter() - t
        if dt >= target or k >= len(prompts):
            return len(ps) / dt, sum(len(p.ids) for p in ps) / dt
        k = min(len(prompts), k * 4)


def _level_setup(ctx: dict, level: str):
    P = paths(ctx)
    gguf = wait_ready(P[level])
    if not ready(gguf, ".identity.ready").exists():
        try:
            wait_ready(gguf, ".identity.ready", deadline=min(DEADLINE - 60, time.time() + 120))
        except (TimeoutError, StageFailed):
            say("identity copy not ready from the background; making it here")
            from reranker.engine.identity import with_identity_output

            t = time.perf_counter()
            with_identity_output(gguf, "f32")
            say(f"identity copy made in {time.perf_counter() - t:.1f} s")
    return gguf


def step_level(ctx: dict, R: Result, step: str) -> None:
    import numpy as np
    import torch

    from reranker import Reranker

    job = job_module()
    level = LEVEL_OF[step]
    seconds = float(ctx["seconds"]) * (1.0 if step in ("q8", "f16") else 0.5)  # Q4_K_M and BF16 matter less
    gguf = _level_setup(ctx, level)
    dev = device(ctx)
    R.set("level", level)
    R.set("file_gb", gguf.stat().st_size / 1e9)
    R.set("flops_per_token", flops_per_token(ctx["preset"]))
    pairs = synthetic_pairs(20000)
    free0 = vram_free()
    t = time.perf_counter()
    with LlamaLogCapture() as cap:
        rr = Reranker.from_pretrained(str(gguf), fast=True, device=dev)  # the job's settings
    load_s = time.perf_counter() - t
    free1 = vram_free()
    info = parse_offload(cap.text())
    R.set("load", {"seconds": round(load_s, 2), "vram_mib": None if free0 is None else round((free0 - free1) / 2**20),
                   "offload": info, "n_batch": rr.backbone.n_batch, "n_seq_max": rr.backbone.n_seq_max, "n_ctx": rr.backbone.n_ctx})
    if not ctx["cpu"] and not info["all_layers_on_gpu"]:
        R.set("warning", f"not all layers on the GPU: {info['offloaded']}")
    builder = rr.prompt_builder()
    from reranker.engine.scoring import score_prompts

    t = time.perf_counter()
    calib = [builder.build(q, d) for q, d in pairs[:1024]]
    tok_rate = sum(len(p.ids) for p in calib) / (time.perf_counter() - t)
    lo = 4 if ctx["cpu"] else 16  # the rehearsal's paths are slow: small minimums
    score_prompts(rr, calib[:lo])  # warm-up
    pps, tps = _calibrate(lambda ps: score_prompts(rr, ps), calib, target=min(1.0, seconds / 5), k=lo)
    n = int(min(len(pairs), max(4 * lo, seconds * pps)))
    say(f"{level}: calibration {pps:.1f} pairs/s, {tps:.0f} tokens/s -> {n} pairs for ~{seconds:.0f} s")
    prompts = calib[:n] + [builder.build(q, d) for q, d in pairs[len(calib):n]]
    tokens = sum(len(p.ids) for p in prompts)
    R.set("pairs", {"n": n, "tokens": tokens, "tokens_per_pair": tokens / n, "tokenise_tokens_per_s": tok_rate})

    # ceiling: only llama_decode (+ synchronize) on the job's windows, packed as the job packs them
    fast_scores, wall, timer = job.score_windows(rr, job.job_windows(prompts, 2048))
    R.set("ceiling", {"decode_s": timer.seconds, "engine_s": wall, "decode_calls": timer.calls, "tokens_per_s": tokens / timer.seconds,
                      "engine_tokens_per_s": tokens / wall, "pairs_per_s": n / timer.seconds})
    say(f"{level}: ceiling {tokens / timer.seconds:.0f} tokens/s ({timer.calls} decode calls), engine {tokens / wall:.0f}")
    rr.close()
    del rr
    if dev == "cuda":
        torch.cuda.empty_cache()
    scores_dir = Path(ctx["work"]) / "results"
    np.save(scores_dir / f"{step}-fast-scores.npy", fast_scores)

    # the job: `reranker score` as a user runs it (its own process; summary.json times the streaming loop)
    tmp = Path(ctx["work"]) / f"job-{step}"
    tmp.mkdir(parents=True, exist_ok=True)
    inp = tmp / "pairs.jsonl"
    job.write_pairs_jsonl(inp, pairs[:n])
    outp = tmp / "scores.jsonl"
    rc, whole, out = run(cli_cmd("score", "-m", str(gguf), "-i", str(inp), "-o", str(outp), "--per", "pair", "--quiet", "--restart"))
    if rc != 0:
        R.set("job", {"error": f"exit {rc}: {tail_lines(out)}"})
    else:
        summary = json.loads(outp.with_name(outp.name + ".summary.json").read_text())
        job_scores = _read_scores(outp)
        wall_loop = summary["wall_seconds"]
        R.set("job", {"pairs": summary["pairs_this_run"], "tokens": summary["tokens_this_run"], "loop_s": wall_loop,
                      "command_s": whole, "pairs_per_s": summary["pairs_this_run"] / wall_loop,
                      "tokens_per_s": summary["tokens_this_run"] / wall_loop,
                      "job_over_ceiling": (summary["tokens_this_run"] / wall_loop) / (tokens / timer.seconds),
                      "max_diff_vs_in_process": float(np.abs(job_scores - fast_scores).max())})
        say(f"{level}: job {summary['tokens_this_run'] / wall_loop:.0f} tokens/s, {summary['pairs_this_run'] / wall_loop:.1f} pairs/s "
            f"(loop {wall_loop:.1f} s, command {whole:.1f} s)")
        np.save(scores_dir / f"{step}-job-scores.npy", job_scores)

    # the upstream recipe's path: embedding mode, every token an output, same GGUF, same packing
    if step in ("q8", "f16") and left() > 1.6 * seconds + 25:
        rr = Reranker.from_pretrained(str(gguf), fast=False, device=dev)
        score_prompts(rr, prompts[:2])
        pps_u, _ = _calibrate(lambda ps: score_prompts(rr, ps), prompts[:256], target=min(1.0, seconds / 5), k=lo // 2)
        n_up = int(min(n, max(2 * lo, seconds * pps_u)))
        up_scores, up_wall, up_timer = job.score_windows(rr, job.job_windows(prompts[:n_up], 2048))
        rr.close()
        up_tokens = sum(len(p.ids) for p in prompts[:n_up])
        R.set("upstream", {"pairs": n_up, "tokens": up_tokens, "wall_s": up_wall, "decode_s": up_timer.seconds,
                           "tokens_per_s": up_tokens / up_wall, "pairs_per_s": n_up / up_wall,
                           "max_diff_vs_fast": float(np.abs(up_scores - fast_scores[:n_up]).max())})
        say(f"{level}: upstream recipe path {up_tokens / up_wall:.0f} tokens/s on {n_up} pairs")
    elif step in ("q8", "f16"):
        R.set("upstream", {"skipped": f"{left():.0f} s left in the step"})


def step_transformers(ctx: dict, R: Result) -> None:
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    sys.path.insert(0, str(BENCH))
    from tf_peer import load_transformers, time_transformers, transformers_scorer

    from reranker.defaults import DOC_PREFIX, QUERY_PREFIX, SCORE_TOKEN_ID  # reranker.engine.prompts would import llama_cpp

    P = paths(ctx)
    dev = device(ctx)
    seconds = float(ctx["seconds"])
    ckpt = wait_ready(P["ckpt"])
    t = time.perf_counter()
    model, score = load_transformers(ckpt, "bf16", "sdpa", device=dev)
    R.set("load_s", time.perf_counter() - t)
    R.set("attn_implementation", model.config._attn_implementation)
    # The checkpoint's own tokenizer (this step may run while llama.cpp is still being built); the
    # prompts need no truncation, so the ids are the GGUF tokenizer's (compared below when llama.cpp is there).
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))

    class _Builder:
        @staticmethod
        def build(q: str, d: str):
            return type("P", (), {"ids": tok.encode(f"{DOC_PREFIX}{d}{QUERY_PREFIX}{q}", add_special_tokens=False).ids + [SCORE_TOKEN_ID]})

    builder = _Builder()
    pairs = synthetic_pairs(20000)
    try:
        from reranker.engine.backbone import VocabOnly
        from reranker.engine.prompts import PromptBuilder

        if ready(P["F16"]).exists():
            gb = PromptBuilder(VocabOnly(P["F16"]).tokenizer)
            same = sum(gb.build(q, d).ids == builder.build(q, d).ids for q, d in pairs[:200])
            R.set("ids_equal_to_gguf_tokenizer", f"{same}/200")
    except Exception as e:  # noqa: BLE001 (llama.cpp not installed yet)
        R.set("ids_equal_to_gguf_tokenizer", f"not compared ({type(e).__name__})")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    batch_scores = transformers_scorer(model, score, dev)

    def run_sorted(ids: list[list[int]], bs: int) -> tuple[np.ndarray, float, int]:
        return time_transformers(batch_scores, ids, bs, True, 1, sync)

    calib = [builder.build(q, d).ids for q, d in pairs[:512]]
    run_sorted(calib[:32], 32)  # warm-up
    _, dt, _ = run_sorted(calib[:128], 32)
    per_bs = seconds / 2
    m = int(min(len(pairs), max(32, per_bs * 128 / dt)))
    ids = calib[:m] + [builder.build(q, d).ids for q, d in pairs[len(calib):m]]
    tokens = sum(len(x) for x in ids)
    R.set("pairs", {"n": m, "tokens": tokens})
    rows = {}
    best = None
    for bs in (8, 32, 128):
        if left() < per_bs * 1.5 + 10:
            rows[bs] = {"skipped": "step deadline"}
            continue
        try:
            run_sorted(ids[:bs], bs)  # warm-up at this batch size
            scores, wall, padded = run_sorted(ids, bs)
        except torch.OutOfMemoryError as e:
            rows[bs] = {"error": f"out of memory: {e}"[:200]}
            continue
        rows[bs] = {"seconds": wall, "pairs_per_s": m / wall, "tokens_per_s": tokens / wall, "padding_share": 1 - tokens / padded}
        say(f"transformers bf16 sdpa, batch {bs}: {tokens / wall:.0f} tokens/s ({m / wall:.1f} pairs/s), padding {1 - tokens / padded:.0%}")
        if best is None or rows[bs]["tokens_per_s"] > rows[best]["tokens_per_s"]:
            best = bs
            best_scores = scores
        R.set("batches", rows)
    R.set("best_batch", best)
    if best is not None:
        for ref in ("q8-job-scores.npy", "q8-fast-scores.npy"):
            f = Path(ctx["work"]) / "results" / ref
            if f.is_file():
                other = np.load(f)
                k = min(len(other), len(best_scores))
                R.set("max_diff_vs_q8_job", float(np.abs(other[:k] - best_scores[:k]).max()))
                break


def step_head(ctx: dict, R: Result) -> None:
    import torch

    from head import score_embeddings

    dev = device(ctx)
    torch.backends.cuda.matmul.allow_tf32 = False
    H = HIDDEN_M0
    fpe = 2 * H * H + 2 * H
    n_mm, iters = (8192, 30) if dev == "cuda" else (1024, 3)
    rates = {"bfloat16": matmul_rate(torch.bfloat16, n_mm, iters, dev), "float32": matmul_rate(torch.float32, n_mm, max(1, iters // 5), dev)}
    R.set("matmul_flops", rates)
    sizes = [10**5, 10**6, 10**7] if dev == "cuda" else [10**4, 5 * 10**4]
    rows = []
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for dtype in (torch.float32, torch.bfloat16):
        head = random_head(H).to(dev, dtype)
        name = str(dtype).removeprefix("torch.")
        for n in sizes:
            for where in ("device", "host"):
                if where == "host" and (dev != "cuda" or n != 10**6):
                    continue
                if left() < 15:
                    rows.append({"dtype": name, "n": n, "where": where, "skipped": "step deadline"})
                    continue
                need = n * H * (4 if dtype == torch.float32 else 2)
                if where == "device" and dev == "cuda" and need * 1.2 + 4e9 > torch.cuda.mem_get_info()[0]:
                    rows.append({"dtype": name, "n": n, "where": where, "skipped": "does not fit"})
                    continue
                x = torch.randn(n, H, dtype=dtype, device=dev if where == "device" else "cpu")
                if where == "host":
                    x = x.pin_memory()
                score_embeddings(head, x, batch_size=65536)  # warm-up (torch.compile)
                best = float("inf")
                for _ in range(3):
                    sync()
                    t = time.perf_counter()
                    score_embeddings(head, x, batch_size=65536)
                    sync()
                    best = min(best, time.perf_counter() - t)
                rate = n / best
                row = {"dtype": name, "n": n, "where": where, "emb_per_s": rate, "tflops": rate * fpe / 1e12,
                       "fraction_of_bf16": rate * fpe / rates["bfloat16"], "fraction_of_own_dtype": rate * fpe / rates[name]}
                rows.append(row)
                say(f"head {name} N={n:,} {where}: {rate:,.0f} emb/s, {row['tflops']:.1f} TFLOP/s = {row['fraction_of_bf16']:.1%} of bf16")
                R.set("rows", rows)
                del x
                if dev == "cuda":
                    torch.cuda.empty_cache()
    R.set("rows", rows)


def step_sweep(ctx: dict, R: Result) -> None:
    import llama_cpp
    import torch

    from head import ScoringHead
    from reranker import Reranker
    from reranker.engine.backbone import Backbone
    from reranker.engine.identity import with_identity_output
    from reranker.engine.scoring import score_prompts

    job = job_module()
    gguf = _level_setup(ctx, "Q8_0")
    ident = with_identity_output(gguf, "f32")
    head = ScoringHead.load(gguf.parent / "mlp_weights.npz")
    dev = device(ctx)
    gpu = dev == "cuda"
    pairs = synthetic_pairs(20000)
    unified = {"value": True}
    orig_init = llama_cpp.llama_init_from_model

    def init(model, cparams):
        cparams.kv_unified = unified["value"]
        return orig_init(model, cparams)

    llama_cpp.llama_init_from_model = init
    base = dict(n_ctx=10240, n_batch=2048, n_ubatch=None, n_seq_max=64, flash_attn=None, unified=True)
    configs = [
        ("job default (n_batch 2048, n_ubatch 1024 GPU / 512 CPU, 64 seqs, flash auto, unified KV)", {}),
        ("n_ubatch 512", {"n_ubatch": 512}),
        ("n_ubatch 2048", {"n_ubatch": 2048}),
        ("n_batch 4096", {"n_batch": 4096}),
        ("n_batch 4096, n_ubatch 4096", {"n_batch": 4096, "n_ubatch": 4096}),
        ("n_batch 8192, n_ubatch 2048", {"n_batch": 8192, "n_ubatch": 2048}),
        ("n_batch 8192, n_ubatch 8192", {"n_batch": 8192, "n_ubatch": 8192}),
        ("n_batch 8192, 16 seqs per call", {"n_batch": 8192, "n_ubatch": 2048, "n_seq_max": 16}),
        ("flash attention on", {"flash_attn": True}),
        ("flash attention off", {"flash_attn": False}),
        ("per-sequence KV streams", {"unified": False}),
        ("per-sequence KV, n_batch 8192, n_ubatch 2048, 256 seqs", {"unified": False, "n_batch": 8192, "n_ubatch": 2048, "n_seq_max": 256}),
    ]
    if not gpu:
        configs = [c for c in configs if "8192" not in c[0] and "4096, n_ubatch 4096" not in c[0]]
    rows = []
    prompts = None
    per = max(1.0, float(ctx["seconds"]) / 3)
    for name, over in configs:
        if left() < per * 2 + 15:
            rows.append({"config": name, "skipped": "step deadline"})
            continue
        c = {**base, **over}
        builder_ids_max = 0
        if prompts is not None:
            builder_ids_max = max(len(p.ids) for p in prompts)
        n_ctx = c["n_ctx"]
        if not c["unified"]:
            per_seq = 1 << max(10, (max(builder_ids_max, 1) - 1).bit_length())
            n_ctx = c["n_seq_max"] * per_seq  # each sequence's stream holds n_ctx / n_seq_max cells
        n_ctx = max(n_ctx, c["n_batch"])
        unified["value"] = c["unified"]
        try:
            free0 = vram_free()
            bb = Backbone(ident, fast=True, n_ctx=n_ctx, n_batch=c["n_batch"], n_ubatch=c["n_ubatch"], n_seq_max=c["n_seq_max"],
                          n_gpu_layers=-1, flash_attn=c["flash_attn"])
            rr = Reranker(bb, head, max_length=10240 if c["unified"] else n_ctx // c["n_seq_max"], device=dev)
            vram = None if free0 is None else round((free0 - vram_free()) / 2**20)
            if prompts is None:
                builder = rr.prompt_builder()
                lo = 4 if ctx["cpu"] else 16
                calib = [builder.build(q, d) for q, d in pairs[:1024]]
                score_prompts(rr, calib[:lo])
                pps, _ = _calibrate(lambda ps, rr=rr: score_prompts(rr, ps), calib, target=min(1.0, per / 2), k=lo)
                k = int(min(len(pairs), max(4 * lo, per * pps)))
                prompts = calib[:k] + [builder.build(q, d) for q, d in pairs[len(calib):k]]
                tokens = sum(len(p.ids) for p in prompts)
                R.set("pairs", {"n": k, "tokens": tokens})
            score_prompts(rr, prompts[:4])
            _, wall, timer = job.score_windows(rr, job.job_windows(prompts, 2048))
            rr.close()
            row = {"config": name, "n_ctx": n_ctx, **{k: c[k] for k in ("n_batch", "n_ubatch", "n_seq_max", "flash_attn", "unified")},
                   "tokens_per_s": tokens / wall, "decode_tokens_per_s": tokens / timer.seconds, "decode_calls": timer.calls, "vram_mib": vram}
            say(f"sweep {name}: {row['tokens_per_s']:.0f} tokens/s ({timer.calls} calls, VRAM {vram} MiB)")
        except Exception as e:  # noqa: BLE001 (a knob llama.cpp refuses is a result too)
            row = {"config": name, "error": f"{type(e).__name__}: {e}"[:300]}
            say(f"sweep {name}: {row['error']}")
        rows.append(row)
        R.set("rows", rows)
        if gpu:
            torch.cuda.empty_cache()
    llama_cpp.llama_init_from_model = orig_init


def _bench(R: Result, cmd: list[str], out: Path) -> dict | None:
    """Run a benchmark script (`cmd`, which writes `out` as JSON): its output and figures into R; None on failure."""
    rc, wall, text = run(cmd)
    R.set("output", text[-3000:])
    print(text[-3000:], flush=True)
    if rc != 0 or not out.is_file():
        R.set("error", f"benchmarks/{Path(cmd[1]).name} exit {rc} after {wall:.0f} s: {tail_lines(text)}")
        return None
    res = json.loads(out.read_text())
    R.set("result", res)
    return res


def step_serve(ctx: dict, R: Result) -> None:
    """Optional: `reranker serve` at 1, 8 and 32 clients against the job on the same pairs (benchmarks/serve.py),
    on Q8_0. Its own process with a timeout; without the server's packages it is skipped, and it never adds a check."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        R.set("skipped", f"not importable here: {', '.join(missing)} (the [serve] extra and httpx)")
        say(f"serve: skipped, {R.data['skipped']}")
        return
    gguf = _level_setup(ctx, "Q8_0")
    # not results/serve.json: that is this step's own result file (R), which R.set() below rewrites
    out = Path(ctx["work"]) / "results" / "serve-bench.json"
    out.unlink(missing_ok=True)
    # m0 on the GPU: 10-document requests of 100-400 words, as the levels' pairs; the rehearsal: few and short.
    # One round: the GPU machine is not shared, so the load does not move under the measurement.
    shape = ["--requests", "16", "--doc-words", "40", "120", "--latency-requests", "10"] if ctx["cpu"] else \
            ["--requests", "128", "--doc-words", "100", "400", "--latency-requests", "50"]
    shape += ["--rounds", "1"]
    cmd = [sys.executable, str(BENCH / "serve.py"), "--model", str(gguf), "--device", device(ctx),
           "--threads", str(min(8, os.cpu_count() or 1)), "--json", str(out), *shape]
    res = _bench(R, cmd, out)
    if res is None:
        return
    say(f"serve: {res['ratio_at_max_clients']:.2f} of the job's pairs/s at 32 clients; light-load 10-document request "
        f"p50 {res['latency']['p50_ms']:.0f} ms, p99 {res['latency']['p99_ms']:.0f} ms")


def images_model(ctx: dict) -> tuple[Path, Path, Path]:
    """(checkpoint, GGUF, mmproj) of the images step, made once by benchmarks/images.py's own `model`."""
    sys.path.insert(0, str(BENCH))
    import images

    P = paths(ctx)
    made = images.model(ctx["preset"], P["images"], "f16")
    assert made[1] == P["images_model"], (made, P["images_model"])  # the ready marker must name the file it made
    return made


def _images_setup(ctx: dict, R: Result, step: str) -> bool:
    """What the images steps need: Pillow, libmtmd, and their model (made by the convert stage, else here);
    False (with the reason in R's `skipped`) when they cannot run."""
    import importlib.util

    if importlib.util.find_spec("PIL") is None:
        R.set("skipped", "Pillow is not importable here")
    else:
        rc, _, tail = run([sys.executable, "-c", "import llama_cpp.mtmd_cpp as m; print(m._libmtmd._name)"], timeout=60)
        if rc != 0:
            R.set("skipped", "no libmtmd: neither built with llama.cpp (LLAVA_BUILD=ON) nor beside the prebuilt libraries "
                             f"(prepare.py packs carry/mtmd-libs.tar.xz); {tail.strip()[-300:]}")
        else:
            R.set("libmtmd", tail.strip().splitlines()[-1])
    if "skipped" in R.data:
        say(f"{step}: skipped, {R.data['skipped']}")
        return False
    P = paths(ctx)
    try:  # the convert stage makes it in the background; if that stage died, make it here
        wait_ready(P["images_model"], deadline=DEADLINE - (100 if ctx["cpu"] else 150))  # leave the measurement its time
    except StageFailed:
        t = time.time()
        images_model(ctx)
        R.set("model_made_in_step_s", round(time.time() - t, 1))
    return True


def step_images(ctx: dict, R: Result) -> None:
    """Optional: image documents (benchmarks/images.py): ours (F16 GGUF + F16 mmproj in libmtmd) against transformers
    bf16 on the same 8 images (0.3 and 0.6 MP), the vision encode and the decode timed apart; m0's shapes on the GPU
    (Qwen2-VL-2B's vision tower), `small` in the rehearsal. Its own synthetic checkpoint with a vision tower (the
    convert stage's has none). Skipped without Pillow; it never adds a check."""
    if not _images_setup(ctx, R, "images"):
        return
    P = paths(ctx)
    out = Path(ctx["work"]) / "results" / "images-bench.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(BENCH / "images.py"), "--preset", ctx["preset"], "--n", "8",
           "--cache", str(P["images"]), "--json", str(out)]
    res = _bench(R, cmd, out)
    if res is None:
        return
    sizes = "; ".join(f"{size}: {g['ours']['images_per_s']:.2f} vs {g['transformers']['images_per_s']:.2f} images/s, "
                      f"encode {g['ours']['encode_s_per_image'] * 1000:.0f} ms/image" for size, g in res["sizes"].items())
    say(f"images: ours {res['ours_images_per_s']:.2f} images/s, transformers {res['transformers_images_per_s']:.2f} "
        f"({res['ratio_images_per_s']:.2f}x); prompt tokens/s {res['ours_prompt_tokens_per_s']:.0f} vs "
        f"{res['transformers_prompt_tokens_per_s']:.0f}; {sizes}")


#: job-images: (images, images per record, --window) on the GPU and in the CPU rehearsal; windows of whole records.
JOB_IMAGES_SHAPE = {"gpu": (128, 8, 64), "cpu": (8, 4, 8)}


def step_job_images(ctx: dict, R: Result) -> None:
    """Optional: `reranker score` on a JSONL of image documents (benchmarks/images.py's pictures, 0.3 and 0.6 MP PNGs,
    paths relative to the JSONL, as benchmarks/job_images.py writes them) with the images step's model (F16 GGUF +
    F16 mmproj) on the GPU, in its own process: images/s of the job's streaming loop (its summary; the model load
    apart). Then its scores against `compute_score` on the same pairs in this process (same model, n_ctx, n_batch
    and threads; the job's window as the batch), a check: equal within 1e-4 (bit-equal expected)."""
    import numpy as np

    if not _images_setup(ctx, R, "job-images"):
        return
    sys.path.insert(0, str(BENCH))
    from images import SIZES
    from job_images import write_input

    P = paths(ctx)
    gguf = P["images_model"]
    mmproj = next(gguf.parent.glob("mmproj-*.gguf"))
    n, per_record, window = JOB_IMAGES_SHAPE["cpu" if ctx["cpu"] else "gpu"]
    work = Path(ctx["work"]) / "job-images"
    t = time.perf_counter()
    inp = write_input(work, n, per_record)  # imgs/0.png ... and in.jsonl naming them by relative paths
    R.set("write_input_s", round(time.perf_counter() - t, 1))
    dev = device(ctx)
    threads = str(min(8, os.cpu_count() or 1))
    settings = ["--n-ctx", "4096", "--n-batch", "4096", "--threads", threads, "--device", dev]
    if ctx["cpu"]:
        settings += ["--n-gpu-layers", "0"]
    out = work / "out.jsonl"
    logdir = work / "llama-log"
    for f in logdir.glob("*.log") if logdir.is_dir() else []:
        f.unlink()
    rc, sec, text = run(cli_cmd("score", "-m", str(gguf), "--mmproj", str(mmproj), "-i", str(inp), "-o", str(out),
                                "--per", "pair", "--window", str(window), "--quiet", "--restart", *settings),
                        env=dict(os.environ, GPU_RUN_LLAMA_LOG=str(logdir)))
    if rc != 0:
        raise RuntimeError(f"reranker score on image documents exited {rc}: {tail_lines(text, 4)}")
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    job_scores = _read_scores(out)
    logs = [f.read_text(errors="replace") for f in sorted(logdir.glob("*.log"))]
    procs = [parse_offload(text) for text in logs]
    clip = sorted({m.strip() for text in logs for m in re.findall(r"[^\n]*CLIP using[^\n]*", text)})
    res = {"preset": ctx["preset"], "images": n, "per_record": per_record, "window": window, "device": dev,
           "sizes": {name: f"{w}x{h}" for name, (w, h) in SIZES.items()},
           "job_images_per_s": summary["pairs_per_second"], "job_tokens_per_s": summary["tokens_per_second"],
           "job_loop_s": summary["wall_seconds"], "job_process_s": round(sec, 1), "tokens": summary["tokens"],
           "all_layers_on_gpu": any(p["offloaded"] for p in procs) and all(p["all_layers_on_gpu"] for p in procs if p["offloaded"]),
           "vision_backend": "; ".join(clip) or "not logged"}
    R.set("result", res)
    say(f"job-images: {n} image documents, {res['job_images_per_s']:.2f} images/s, {res['job_tokens_per_s']:.0f} tokens/s "
        f"(loop {res['job_loop_s']:.1f} s, process {sec:.1f} s)")

    from reranker import Reranker

    records = [json.loads(line) for line in inp.read_text().splitlines()]
    pairs = [[r["query"], {"image": work / d["image"]}] for r in records for d in r["documents"]]
    with Reranker.from_pretrained(str(gguf), mmproj=str(mmproj), n_ctx=4096, n_batch=4096, n_threads=int(threads), device=dev,
                                  n_gpu_layers=0 if ctx["cpu"] else -1) as rr:
        t = time.perf_counter()
        want = np.array(rr.compute_score(pairs, batch_size=window), dtype=np.float64)
        res["compute_score_images_per_s"] = len(pairs) / (time.perf_counter() - t)
    d = float(np.abs(job_scores - want).max()) if len(job_scores) == len(want) else float("inf")
    res.update(max_score_diff=d, scores_bit_equal=bool(len(job_scores) == len(want) and (job_scores == want).all()))
    R.set("result", res)
    ok = d <= 1e-4 and (ctx["cpu"] or res["all_layers_on_gpu"])
    R.check("job on image documents == compute_score", ok,
            f"{len(job_scores)} pairs; max |diff| {d:.2e} (bit-equal: {res['scores_bit_equal']}); "
            f"all layers on the GPU: {res['all_layers_on_gpu']}")


def step_ray(ctx: dict, R: Result) -> None:
    """`--engine ray` (1 GPU actor) against the local job on the GPU: benchmarks/ray_scale.py, when Ray is
    installed on this machine. It is not carried (its wheel alone exceeds the 64 MiB that travels), so on a
    bare machine the step only records that it was skipped."""
    try:
        import ray  # noqa: F401
    except ImportError:
        R.set("skipped", "ray is not installed on this machine (not carried: pip install 'jina-reranker-gguf[ray]')")
        return
    gguf = _level_setup(ctx, "Q8_0")
    out = Path(ctx["work"]) / "results" / "ray_scale.json"
    pairs = 4096 if ctx["preset"] == "m0" else 512
    cmd = [sys.executable, str(BENCH / "ray_scale.py"), "--model", str(gguf), "--pairs", str(pairs), "--rounds", "1",
           "--actors", "1", "--threads", "4", "--window", "512", "--n-ctx", "4096", "--json", str(out)]
    rc, sec, text = run(cmd, timeout=max(10.0, left() - 10))
    R.set("rc", rc)
    R.set("seconds_total", round(sec, 1))
    R.set("tail", tail_lines(text, 8))
    if out.is_file():
        R.set("ray_scale", json.loads(out.read_text()))
    if rc != 0:
        raise RuntimeError(f"ray_scale.py exited {rc}: {tail_lines(text)}")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    # The project as installed into work/site (on PYTHONPATH) when it is; the repository otherwise
    # (the background model preparation and the torch-only steps start before the install).
    sys.path.append(str(ROOT))
    if sys.argv[1:2] == ["cli"]:  # `steps.py cli -- score ...`: reranker's CLI in this process
        from reranker.cli import main as cli_main

        rest = sys.argv[2:]
        sys.exit(cli_main(rest[1:] if rest[:1] == ["--"] else rest))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step")
    ap.add_argument("--ctx", default="{}", help="JSON from run.py")
    ap.add_argument("--result", type=Path, default=None)
    ap.add_argument("--stage", default="convert", help="models: convert | quant")
    ap.add_argument("--out", type=Path, default=None, help="cpu-scores: the .npz to write")
    args = ap.parse_args()
    import head  # noqa: F401  (bound now: benchmarks/job.py puts the repository first on sys.path when imported)
    import reranker  # noqa: F401

    ctx = json.loads(args.ctx)
    if args.step == "models":
        return step_models(ctx, args)
    if args.step == "cpu-scores":
        return step_cpu_scores(ctx, args)
    R = Result(args.result)
    R.set("started", time.strftime("%H:%M:%S"))
    fn = {"check-offload": step_check_offload, "check-scores": step_check_scores, "check-head": step_check_head,
          "check-job": step_check_job, "matmul": step_matmul, "transformers": step_transformers, "head": step_head,
          "sweep": step_sweep, "serve": step_serve, "images": step_images, "job-images": step_job_images, "ray": step_ray}.get(args.step)
    t = time.perf_counter()
    try:
        if fn is not None:
            fn(ctx, R)
        elif args.step in LEVEL_OF:
            step_level(ctx, R, args.step)
        else:
            sys.exit(f"steps.py: unknown step {args.step}")
    except Exception as e:
        import traceback

        R.set("error", f"{type(e).__name__}: {e}")
        R.set("traceback", traceback.format_exc()[-3000:])
        R.set("partial_ok", any(k not in ("started", "error", "traceback") for k in R.data))
        traceback.print_exc()
        R.set("seconds", time.perf_counter() - t)
        sys.exit(1)
    R.set("seconds", time.perf_counter() - t)


if __name__ == "__main__":
    main()
