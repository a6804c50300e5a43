"""Where one window's time goes on the CPU: ours (llama.cpp, per ggml op) beside transformers (per module).

One window of `--pairs` pairs, scored as `compute_score(pairs, batch_size=len(pairs))` scores it:

- ours: the window's wall split into tokenising, the backbone's decode, the torch head and the rest
  (Python: packing, copies, sorting); the decode is then split by ggml op with llama.cpp's scheduler
  callback (`Backbone(eval_callback=...)`), which computes the graph one node at a time and times each.
  That takes away llama.cpp's cross-node fusions and adds a thread wake-up per node, so the per-op
  times are shares of a slightly slower decode (both totals are printed); the categories are the
  weight mat-muls, attention (QK^T, softmax, KQV, or the fused flash kernel), norms, RoPE,
  copies/views, element-wise ops and the rest.
- transformers (the peer: `--tf-dtype`, SDPA, length-sorted batches of `--tf-batch`): forward hooks
  time each module; the mat-muls are its nn.Linear layers, norms its RMSNorms, attention the rest of
  each attention block (RoPE, SDPA, reshapes), element-wise the rest of each MLP (SiLU, product).
- both: useful GFLOP/s (2 x non-embedding parameters x prompt tokens / wall) and that as a fraction of
  torch's bf16 and fp32 mat-mul rates on the same threads (`flops.py`).

    python benchmarks/profile.py                      # `small` shape
    python benchmarks/profile.py --preset m0          # the real shapes (~3 GB per GGUF, minutes to build)
    python benchmarks/profile.py --flash on,off       # our attention both ways
    python benchmarks/profile.py --n-batch 2048,512 --no-peer   # tokens per decode call, ours only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from flops import fraction, matmul_rate, matmul_shape, useful_flops  # noqa: E402
from job import load_average, synthetic_pairs  # noqa: E402
from peer import build  # noqa: E402

CATEGORIES = ("weight mat-muls", "attention", "norms", "rope", "copies/views", "element-wise", "other")


class _Tensor(ctypes.Structure):
    """The head of ggml.h's `struct ggml_tensor` (ggml 0.25.3, pinned with llama-cpp-python 0.3.36), up to its name."""


_Tensor._fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                    ("src", ctypes.POINTER(_Tensor) * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
                    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def _ggml_base():
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_op_desc.restype = ctypes.c_char_p
    lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
    return lib


def category(op: str, name: str, src_names: list[str]) -> str:
    """One of CATEGORIES for a graph node, from its op and the names llama.cpp's graph builder gives tensors."""
    if op == "MUL_MAT":
        return "weight mat-muls" if src_names and src_names[0].endswith(".weight") else "attention"
    if op in ("FLASH_ATTN_EXT", "SOFT_MAX"):
        return "attention"
    if op in ("RMS_NORM", "NORM") or (op == "MUL" and any("norm" in s for s in src_names)):
        return "norms"
    if op == "ROPE":
        return "rope"
    if op in ("CPY", "CONT", "DUP", "GET_ROWS", "SET_ROWS", "CONCAT", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE", "NONE"):
        return "copies/views"
    if op in ("ADD", "MUL", "SCALE", "SILU", "SWIGLU", "GELU") or op.startswith(("GLU", "UNARY")):
        return "element-wise"
    return "other"


class NodeTimer:
    """llama.cpp's scheduler callback: asks for every node (so each is computed alone) and times it."""

    def __init__(self) -> None:
        import llama_cpp

        self.lib = _ggml_base()
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.ops: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self._t0 = 0.0
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._call)

    def _call(self, tensor, ask: bool, user_data) -> bool:
        if not self.enabled:
            return False
        if ask:
            self._t0 = time.perf_counter()
            return True
        dt = time.perf_counter() - self._t0
        t = ctypes.cast(tensor, ctypes.POINTER(_Tensor)).contents
        op = self.lib.ggml_op_desc(ctypes.addressof(t)).decode()
        srcs = [t.src[i].contents for i in range(2) if t.src[i]]
        cat = category(op, t.name.decode(errors="replace"), [s.name.decode(errors="replace") for s in srcs])
        self.seconds[cat] += dt
        self.ops[op] += dt
        if op == "MUL_MAT" and srcs:
            self.flops[cat] += 2.0 * srcs[0].ne[0] * t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]
        return True

    def reset(self) -> None:
        self.seconds.clear()
        self.ops.clear()
        self.flops.clear()


def profile_ours(f16: Path, pairs, threads: int, bf16: bool, flash: bool | None, n_batch: int, kv_type: str | None,
                 rounds: int) -> dict:
    from head import ScoringHead
    from reranker import Reranker
    from reranker.engine.backbone import Backbone
    from reranker.engine.identity import fast_path_gguf
    from reranker.engine.scoring import prepare

    timer = NodeTimer()
    gguf = fast_path_gguf(f16, "f32", bf16, 0)
    backbone = Backbone(gguf, fast=True, n_ctx=4096, n_batch=n_batch, n_gpu_layers=0, n_threads=threads, flash_attn=flash,
                        kv_type=kv_type, eval_callback=timer.callback)
    rr = Reranker(backbone, ScoringHead.load(f16.parent / "mlp_weights.npz"), max_length=4096, device="cpu")
    rr.compute_score(pairs[:4])  # warm
    best: dict | None = None
    for _ in range(rounds):
        t = time.perf_counter()
        rr.compute_score(pairs, batch_size=len(pairs))
        wall = time.perf_counter() - t
        t = time.perf_counter()
        prepared = prepare(rr.prompt_builder(), pairs)
        tok = time.perf_counter() - t
        ids = sorted((p.ids for p in prepared.prompts), key=len, reverse=True)
        t = time.perf_counter()
        hidden = backbone.embed(ids)
        decode = time.perf_counter() - t
        t = time.perf_counter()
        rr.score_embeddings(hidden)
        head = time.perf_counter() - t
        got = {"wall": wall, "tokenise": tok, "decode": decode, "head": head}
        best = got if best is None else {k: min(v, got[k]) for k, v in best.items()}  # each part's best round
    best["tokens"] = prepared.tokens
    timer.enabled = True
    t = time.perf_counter()
    backbone.embed(ids)
    best["decode_profiled"] = time.perf_counter() - t
    timer.enabled = False
    best.update(weights=rr.weights_dtype, flash=flash, n_batch=n_batch, kv_type=kv_type or "f16", categories=dict(timer.seconds),
                ops=dict(timer.ops), mat_mul_flops=dict(timer.flops))
    rr.close()
    return best


def profile_transformers(ckpt: Path, ids: list[list[int]], threads: int, dtype: str, batch: int, rounds: int) -> dict:
    import torch
    from tf_peer import load_transformers, time_transformers, transformers_scorer

    torch.set_num_threads(threads)
    model, head = load_transformers(ckpt, dtype, "sdpa")
    scores = transformers_scorer(model, head)
    _, wall, padded = time_transformers(scores, ids, batch, True, rounds)
    inclusive: dict[torch.nn.Module, float] = defaultdict(float)
    starts: dict[torch.nn.Module, list[float]] = defaultdict(list)

    def pre(m, *_):
        starts[m].append(time.perf_counter())

    def post(m, *_):
        inclusive[m] += time.perf_counter() - starts[m].pop()

    watched = [m for m in model.modules() if m is not model] + [head]
    handles = [h for m in watched for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    handles += [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    t = time.perf_counter()
    time_transformers(scores, ids, batch, True, 1)
    profiled = time.perf_counter() - t
    for h in handles:
        h.remove()
    cats: dict[str, float] = defaultdict(float)

    def own(m) -> float:  # time in m outside its timed children
        return inclusive[m] - sum(inclusive[c] for c in m.children())

    for m in watched:
        kind = type(m).__name__
        if m is head or any(m is c for c in head.modules()):
            cats["head"] += own(m) if m is head else 0.0
        elif isinstance(m, torch.nn.Linear):
            cats["weight mat-muls"] += inclusive[m]
        elif "RMSNorm" in kind:
            cats["norms"] += inclusive[m]
        elif "Rotary" in kind:
            cats["rope"] += inclusive[m]  # the cos/sin tables; their application is in the attention block
        elif "Attention" in kind:
            cats["attention"] += own(m)  # RoPE, SDPA and the reshapes around them
        elif "MLP" in kind:
            cats["element-wise"] += own(m)
        elif isinstance(m, torch.nn.Embedding):
            cats["copies/views"] += inclusive[m]
        else:
            cats["other"] += own(m)
    cats["other"] += own(model)
    cats["head"] += sum(inclusive[c] for c in head.children())
    return {"wall": wall, "profiled": profiled, "padded_tokens": padded, "dtype": dtype, "batch": batch,
            "categories": dict(cats)}


def main() -> None:
    from reranker.defaults import N_BATCH_CPU
    from reranker.engine.cpu import cpu_bf16_flags, default_threads
    from reranker.engine.identity import use_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "m0"])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 120), metavar=("MIN", "MAX"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flash", default="auto", help="our flash attention: auto, on, off, or a list (on,off)")
    ap.add_argument("--n-batch", default=str(N_BATCH_CPU), help="our tokens per decode call: one value or a list (2048,512)")
    ap.add_argument("--kv-type", default="f16", help="our KV cache type: one value or a list (f16,f32)")
    ap.add_argument("--no-peer", action="store_true", help="profile ours only (no transformers)")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="our BF16 re-encode (default: as the library)")
    ap.add_argument("--tf-dtype", default=None, help="the peer's dtype (default: bf16 on a bf16 CPU, else fp32)")
    ap.add_argument("--tf-batch", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    threads = args.threads or default_threads()
    f16, ckpt = build(args.cache, args.preset)
    pairs = [list(p) for p in synthetic_pairs(args.pairs, tuple(args.doc_words))]
    bf16 = {"on": True, "off": False}.get(args.bf16)
    bf16 = use_bf16(None, 0, f16)[0] if bf16 is None else bf16
    flashes = [{"auto": None, "on": True, "off": False}[f] for f in args.flash.split(",")]
    load0 = load_average()
    n_batches = [int(v) for v in args.n_batch.split(",")]
    ours = [profile_ours(f16, pairs, threads, bf16, fl, nb, kv, args.rounds)
            for fl in flashes for nb in n_batches for kv in args.kv_type.split(",")]

    from reranker import Reranker
    from reranker.engine.scoring import prepare

    tf = None
    if not args.no_peer:
        rr = Reranker.from_pretrained(str(f16), device="cpu", n_ctx=4096, n_threads=threads, bf16=False)
        ids = [p.ids for p in prepare(rr.prompt_builder(4096), pairs).prompts]
        rr.close()
        tf_dtype = args.tf_dtype or ("bf16" if cpu_bf16_flags() else "fp32")
        tf = profile_transformers(ckpt, ids, threads, tf_dtype, args.tf_batch, args.rounds)
    shape = matmul_shape(ckpt)
    rates = {dt: matmul_rate(shape, dt, threads) for dt in ("bf16", "fp32")}
    tokens = ours[0]["tokens"]
    flops = useful_flops(ckpt, tokens)

    print(f"preset {args.preset}; {len(pairs)} pairs, {tokens} prompt tokens in one window; {threads} threads; CPU bf16 "
          f"flags: {','.join(cpu_bf16_flags()) or 'none'}; load average {load0} at start, {load_average()} at end")
    print(f"torch mat-mul {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}: bf16 {rates['bf16']:.0f} GFLOP/s, "
          f"fp32 {rates['fp32']:.0f} GFLOP/s; useful work {flops / 1e9:.1f} GFLOP (2 x non-embedding params x tokens)")
    limit = max(rates.values())

    def rate_line(name: str, wall: float) -> str:
        g = flops / wall / 1e9
        return (f"{name:<40}{tokens / wall:>9.1f} tok/s {g:>8.1f} GFLOP/s  {fraction(g, rates, 'bf16'):>5} of bf16 mat-mul, "
                f"{fraction(g, rates, 'fp32'):>5} of fp32, {g / limit:>5.0%} of the faster")

    def label(r: dict) -> str:
        return (f"ours {r['weights']} flash {({None: 'auto', True: 'on', False: 'off'})[r['flash']]} n_batch {r['n_batch']} "
                f"KV {r['kv_type']}")

    for r in ours:
        print(rate_line(label(r), r["wall"]))
    if tf is not None:
        print(rate_line(f"transformers {tf['dtype']} sdpa sorted batch {tf['batch']}", tf["wall"]))
    for r in ours:
        rest = r["wall"] - r["tokenise"] - r["decode"] - r["head"]
        print(f"\n{label(r)}: window {r['wall'] * 1e3:.0f} ms = "
              f"tokenise {r['tokenise'] / r['wall']:.1%}, decode {r['decode'] / r['wall']:.1%}, head {r['head'] / r['wall']:.1%}, "
              f"Python/other {rest / r['wall']:.1%}")
        total = sum(r["categories"].values())
        print(f"  decode by op (node-by-node decode {r['decode_profiled'] * 1e3:.0f} ms vs {r['decode'] * 1e3:.0f} ms fused; "
              f"timed nodes {total * 1e3:.0f} ms):")
        for c in CATEGORIES:
            s = r["categories"].get(c, 0.0)
            fl = r["mat_mul_flops"].get(c)
            print(f"    {c:<18}{s / total:>7.1%} {s * 1e3:>8.0f} ms{'' if not fl else f'   {fl / s / 1e9:>7.1f} GFLOP/s':>20}")
    if tf is not None:
        total = sum(tf["categories"].values())
        print(f"\ntransformers {tf['dtype']}: window {tf['wall'] * 1e3:.0f} ms (with hooks {tf['profiled'] * 1e3:.0f} ms); "
              f"{tf['padded_tokens']} tokens with padding")
        for c in (*CATEGORIES, "head"):
            s = tf["categories"].get(c, 0.0)
            print(f"    {c:<18}{s / total:>7.1%} {s * 1e3:>8.0f} ms")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "threads": threads, "tokens": tokens, "rates": rates,
                                         "ours": ours, "transformers": tf}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
