"""End-to-end speed of the offline job (`reranker score`) against its ceiling and three baselines.

All paths score the same pairs in the same run (the machine's load changes over minutes, so
compare the ratios, not absolute numbers from different runs). The job and its ceiling alternate
`--rounds` times and the best of each is kept; the share of `llama_decode` in the wall time of
one more, in-process run of the job (`reranker.cli.main`) is printed too, free of that noise.

  job       `reranker score -i pairs.jsonl -o scores.jsonl` in a subprocess; pairs/s and tokens/s
            come from its OUTPUT.summary.json (the streaming loop: read, tokenise, decode, head,
            write, checkpoint); the whole command (start-up, imports, model load) is timed too
  ceiling   raw `llama_decode` time of the job's own decode calls: the same windows, each sorted
            by length (descending) and packed as the job does, on a fast-path backbone with the
            job's context settings; only the time inside `llama_decode` (+ `llama_synchronize`)
            counts. The in-process engine time of those calls (`score_prompts`: packing, decode,
            reading hidden states, head) is printed too
  upstream  the upstream recipe's path: embedding mode, pooling LAST, every token an output
            (`Backbone(fast=False)`), same GGUF, sorted windows packed the same way; on the first
            --baseline-pairs pairs (it and the next are slow), rates scaled
  obvious   `llama_cpp.Llama(embedding=True, pooling_type=LAST).embed(prompts)` + the numpy head
            formula, on the prompt strings in input order (it tokenises the scoring token as text,
            so its token count differs slightly; its scores are not comparable)
  transformers  the original model's computation: transformers' Qwen2-VL text model on the
            synthetic checkpoint, left-padded batches (our prompt ids, attention mask, position ids
            from the mask), hidden_states[-1][:, -1], then the checkpoint's score head; on few pairs
            (--transformers-pairs), rates scaled. At its best (bf16 and fp32 tried, SDPA, sorted by
            length, batch 8 or 16: the fastest is the row compared), with the weaker dtype and the
            old float32 eager unsorted batch-8 form beside it. `benchmarks/peer.py` compares our
            F16, BF16 and Q8_0 paths with it alone

    python benchmarks/job.py                          # builds the `small` synthetic model once
    python benchmarks/job.py --pairs 2048 --threads 2
    python benchmarks/job.py --model m.gguf --checkpoint ckpt_dir   # any GGUF + mlp_weights.npz beside it
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

# The repo root first, so this checkout's packages are imported (installed or not); this folder last, for sibling scripts.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import numpy as np  # noqa: E402

WORDS = ("rerank model query document relevance vector index search retrieval token score "
         "neural ranking text code image 检索 排序 模型").split()


def synthetic_pairs(n: int, doc_words: tuple[int, int] = (40, 200), seed: int = 0) -> list[tuple[str, str]]:
    """`n` (query, document) pairs: queries of 4-12 words, documents of `doc_words` words."""
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(4, 12))), " ".join(rng.choices(WORDS, k=rng.randint(*doc_words))))
            for _ in range(n)]


def write_pairs_jsonl(path: Path, pairs) -> None:
    """Flat-pair JSONL: one `{"query_id", "query", "doc_id", "document"}` per line, one query id per pair."""
    with path.open("w", encoding="utf-8") as f:
        for i, (q, d) in enumerate(pairs):
            f.write(json.dumps({"query_id": f"q{i}", "query": q, "doc_id": "d", "document": d}, ensure_ascii=False) + "\n")


def synthetic_model(cache: Path, preset: str, outtype: str) -> tuple[Path, Path]:
    """(GGUF, checkpoint dir) of a seeded synthetic model, built once into `cache` (atomically)."""
    from reranker.gguf.convert import convert
    from reranker.synth.random_checkpoint import synth_checkpoint

    final = cache / f"{preset}-{outtype}"
    gguf = final / "gguf" / f"jina-reranker-m0-{preset}-{outtype.upper()}.gguf"
    if not gguf.is_file():
        tmp = cache / f".{preset}-{outtype}.{os.getpid()}.tmp"
        print(f"building the synthetic `{preset}` model ({outtype}) in {final} ...", file=sys.stderr, flush=True)
        ckpt = synth_checkpoint(tmp / f"jina-reranker-m0-{preset}", preset=preset, seed=0)
        convert(ckpt, tmp / "gguf", outtype=outtype)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return gguf, final / f"jina-reranker-m0-{preset}"


def numpy_head(npz: Path):
    """The upstream formula: sigmoid(relu(x @ W1 + b1) @ W2 + b2 - logit_bias)."""
    with np.load(npz) as data:
        W1, b1, W2, b2 = (data[k].astype(np.float32) for k in ("W1", "b1", "W2", "b2"))
        logit_bias = float(data["logit_bias"][0])
    return lambda x: (1 / (1 + np.exp(-((np.maximum(0, x @ W1 + b1) @ W2 + b2) - logit_bias)))).reshape(-1)


class DecodeTimer:
    """Accumulates the wall time spent inside `llama_cpp.llama_decode` (+ `llama_synchronize`, so
    asynchronous GPU work is counted) while active; everything else a path does is excluded."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.tokens = 0

    @contextmanager
    def active(self):
        import llama_cpp
        import llama_cpp.llama_cpp as bindings  # what llama-cpp-python's own classes call

        orig = bindings.llama_decode

        def timed(ctx, batch):
            t = time.perf_counter()
            rc = orig(ctx, batch)
            llama_cpp.llama_synchronize(ctx)
            self.seconds += time.perf_counter() - t
            self.calls += 1
            self.tokens += batch.n_tokens
            return rc

        llama_cpp.llama_decode = bindings.llama_decode = timed
        try:
            yield self
        finally:
            llama_cpp.llama_decode = bindings.llama_decode = orig


def job_windows(prompts: list, window: int) -> list[list]:
    """The job's windows for flat pairs (one pair per record): consecutive runs of `window` prompts."""
    return [prompts[i : i + window] for i in range(0, len(prompts), window)]


def score_windows(rr, windows: list[list]) -> tuple[np.ndarray, float, DecodeTimer]:
    """Scores of all windows through the job's own `score_prompts` (sort by length, pack, decode, head).

    Returns (scores in input order, wall seconds, decode timer).
    """
    from reranker.engine.scoring import score_prompts

    timer = DecodeTimer()
    out = []
    with timer.active():
        t = time.perf_counter()
        for w in windows:
            out.append(score_prompts(rr, w).scores)
        wall = time.perf_counter() - t
    return np.concatenate(out), wall, timer


def warm_up(rr, prompts) -> None:
    from reranker.engine.scoring import score_prompts

    score_prompts(rr, prompts[:4])


def run_job_subprocess(gguf: Path, input_path: Path, output: Path, args) -> tuple[dict, float, np.ndarray]:
    """`reranker score` as a user runs it; returns (summary, whole-command seconds, scores in input order)."""
    cmd = [sys.executable, "-m", "reranker", "score", "-m", str(gguf), "-i", str(input_path), "-o", str(output),
           "--per", "pair", "--window", str(args.window), "--n-ctx", str(args.n_ctx), "--n-batch", str(args.n_batch),
           "--threads", str(args.threads), "--device", "cpu", "--bf16", args.bf16, "--quiet", "--restart"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
    whole = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"reranker score failed ({proc.returncode}):\n{proc.stderr}")
    summary = json.loads(output.with_name(output.name + ".summary.json").read_text())
    with output.open(encoding="utf-8") as f:
        scores = np.array([json.loads(line)["score"] for line in f], dtype=np.float32)
    return summary, whole, scores


def run_job_in_process(gguf: Path, input_path: Path, output: Path, args) -> tuple[dict, DecodeTimer]:
    """The same command through `reranker.cli.main` in this process, timing the `llama_decode` calls inside it."""
    from reranker.cli import main as cli_main

    argv = ["score", "-m", str(gguf), "-i", str(input_path), "-o", str(output), "--per", "pair", "--window",
            str(args.window), "--n-ctx", str(args.n_ctx), "--n-batch", str(args.n_batch), "--threads", str(args.threads),
            "--device", "cpu", "--bf16", args.bf16, "--quiet", "--restart"]
    timer = DecodeTimer()
    with timer.active():
        rc = cli_main(argv)
    if rc != 0:
        sys.exit(f"reranker score (in-process) failed ({rc})")
    return json.loads(output.with_name(output.name + ".summary.json").read_text()), timer


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    from reranker.defaults import N_BATCH_CPU

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF with mlp_weights.npz beside it (default: synthetic `small`, F16)")
    ap.add_argument("--checkpoint", type=Path,
                    help="the original-layout checkpoint of --model, for the transformers path (default: the synthetic one)")
    ap.add_argument("--pairs", type=int, default=512, help="pairs to score (default: %(default)s)")
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 200), metavar=("MIN", "MAX"),
                    help="document length range in words (default: 40 200)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads, all paths (default: %(default)s)")
    ap.add_argument("--n-ctx", type=int, default=10240, help="context size, all llama.cpp paths (default: the job's, %(default)s)")
    ap.add_argument("--n-batch", type=int, default=N_BATCH_CPU, help="tokens per decode call (default: the job's on the CPU, %(default)s)")
    ap.add_argument("--window", type=int, default=2048, help="the job's --window (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate the job and its ceiling this many times, keep the best of each (default: %(default)s)")
    ap.add_argument("--baseline-pairs", type=int, default=64,
                    help="pairs for the upstream and obvious paths, the first N (default: %(default)s; 0: all); "
                         "they are ~8x slower on the small model, whose vocabulary projection dominates")
    ap.add_argument("--transformers-pairs", type=int, default=64, help="pairs for the transformers path (default: %(default)s)")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="off",
                    help="ours' BF16 re-encode (default: off, so ours runs the file as stored, like the llama.cpp baselines)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-obvious", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench",
                    help="where the synthetic model is built (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

    import llama_cpp

    from reranker import Reranker
    from reranker.cli.common import bf16_option
    from reranker.defaults import MAX_QUERY_LENGTH
    from reranker.engine.identity import with_identity_output
    from reranker.engine.prompts import PromptBuilder, format_prompt

    if args.model:
        gguf, checkpoint = args.model, args.checkpoint
    else:
        gguf, checkpoint = synthetic_model(args.cache, "small", "f16")
        checkpoint = args.checkpoint or checkpoint
    npz = gguf.parent / "mlp_weights.npz"
    with_identity_output(gguf, "f32")  # the fast path's one-time cached copy, made before anything is timed
    pairs = synthetic_pairs(args.pairs, tuple(args.doc_words))
    max_length = min(10240, args.n_ctx)
    load = dict(device="cpu", n_ctx=args.n_ctx, n_batch=args.n_batch, n_threads=args.threads, max_length=max_length)
    rows: dict[str, dict] = {}
    loads = [load_average()]

    def row(name: str, n_pairs: int, tokens: int, seconds: float, note: str = "") -> None:
        rows[name] = {"pairs": n_pairs, "tokens": tokens, "seconds": seconds, "pairs_per_s": n_pairs / seconds,
                      "tokens_per_s": tokens / seconds, "note": note}

    with tempfile.TemporaryDirectory(prefix="reranker-job-bench-") as tmp:
        tmp = Path(tmp)
        input_path = tmp / "pairs.jsonl"
        write_pairs_jsonl(input_path, pairs)
        rr = Reranker.from_pretrained(str(gguf), fast=True, bf16=bf16_option(args), **load)
        builder = PromptBuilder(rr.backbone.tokenizer, min(max_length, rr.backbone.n_ctx), MAX_QUERY_LENGTH)
        t = time.perf_counter()
        prompts = [builder.build(q, d) for q, d in pairs]
        tokenise = time.perf_counter() - t
        tokens = sum(len(p.ids) for p in prompts)
        windows = job_windows(prompts, args.window)
        warm_up(rr, prompts)
        # The job (its own process) and the ceiling alternate, `--rounds` times; the best of each is kept.
        jobs, ceilings = [], []
        for _ in range(args.rounds):
            jobs.append(run_job_subprocess(gguf, input_path, tmp / "scores.jsonl", args))
            ceilings.append(score_windows(rr, windows))
            loads.append(load_average())
        inproc, inproc_timer = run_job_in_process(gguf, input_path, tmp / "scores-inproc.jsonl", args)
        n_base = min(args.baseline_pairs or len(pairs), len(pairs))
        base_prompts = prompts[:n_base]
        fast_base_scores = score_windows(rr, job_windows(base_prompts, args.window))[0]  # untimed: for the check below
        rr.close()
        summary, _, job_scores = min(jobs, key=lambda j: j[0]["wall_seconds"])
        fast_scores, _, fast_timer = min(ceilings, key=lambda c: c[2].seconds)
        round_ratios = [c[2].seconds / j[0]["wall_seconds"] for j, c in zip(jobs, ceilings)]
        row("job (reranker score)", summary["pairs_this_run"], summary["tokens_this_run"], summary["wall_seconds"],
            "summary.json: the streaming loop")
        row("job, whole command", summary["pairs_this_run"], summary["tokens_this_run"], min(j[1] for j in jobs),
            "start-up, imports, model load included")
        row("ceiling: llama_decode only", len(pairs), tokens, fast_timer.seconds,
            f"{fast_timer.calls} decode calls, same packed batches as the job")
        row("engine: score_prompts", len(pairs), tokens, min(c[1] for c in ceilings),
            "ceiling + packing, hidden-state reads, head")

        base_tokens = sum(len(p.ids) for p in base_prompts)
        rr = Reranker.from_pretrained(str(gguf), fast=False, **load)
        warm_up(rr, prompts)
        up_scores, up_wall, up_timer = score_windows(rr, job_windows(base_prompts, args.window))
        rr.close()
        loads.append(load_average())
        row("upstream recipe (embedding mode)", n_base, base_tokens, up_wall,
            f"llama_decode {up_timer.seconds:.1f} s of it")

        if not args.skip_obvious:
            llm = llama_cpp.Llama(str(gguf), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
                                  n_ctx=args.n_ctx, n_batch=args.n_batch, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
            mlp = numpy_head(npz)
            texts = [format_prompt(q, d) + "<|box_end|>" for q, d in pairs[:n_base]]
            llm.embed(texts[:4], normalize=False)
            timer = DecodeTimer()
            with timer.active():
                t = time.perf_counter()
                emb, obvious_tokens = llm.embed(texts, normalize=False, return_count=True)
                mlp(np.asarray(emb, dtype=np.float32))
                obvious = time.perf_counter() - t
            llm.close()
            loads.append(load_average())
            row("obvious: Llama.embed() + numpy", n_base, obvious_tokens, obvious,
                f"its own tokens; llama_decode {timer.seconds:.1f} s of it")

        tf_scores = None
        if not args.skip_transformers:
            if checkpoint is None:
                print("transformers path skipped: pass --checkpoint with --model", file=sys.stderr)
            else:
                from tf_peer import run_transformers as tf_configs

                n_tf = min(args.transformers_pairs, len(pairs))
                tf_ids = [p.ids for p in prompts[:n_tf]]
                tf_tokens = sum(len(x) for x in tf_ids)
                # The peer at its best: bf16 and fp32, SDPA, sorted by length, the best of a few batch sizes.
                configs = tf_configs(Path(checkpoint), tf_ids, args.threads, ("bf16", "fp32"), ("sdpa",), (8, 16), 1,
                                     orders=(True,))
                best = max(configs, key=lambda r: r["tokens_per_s"])
                tf_scores = next(r for r in configs if r["dtype"] == "fp32")["scores"]
                row("transformers at its best", n_tf, tf_tokens, best["seconds"],
                    f"first {n_tf} pairs; {best['dtype']}, sdpa, sorted, batch {best['batch']} (best of bf16/fp32 x 8/16)")
                weak = max((r for r in configs if r["dtype"] != best["dtype"]), key=lambda r: r["tokens_per_s"], default=None)
                if weak:
                    row(f"transformers {weak['dtype']} sdpa (weaker)", n_tf, tf_tokens, weak["seconds"],
                        f"sorted, batch {weak['batch']}")
                eager = tf_configs(Path(checkpoint), tf_ids, args.threads, ("fp32",), ("eager",), (8,), 1, orders=(False,))[0]
                loads.append(load_average())
                row("transformers fp32 eager (weakest)", n_tf, tf_tokens, eager["seconds"],
                    f"input order, batch 8, left pad; {eager['padded_tokens']} tokens with padding")

    job_tps = rows["job (reranker score)"]["tokens_per_s"]
    print(f"model {gguf.name}; {len(pairs)} pairs, {tokens} prompt tokens ({tokens / len(pairs):.0f}/pair); "
          f"{args.threads} threads; n_ctx {args.n_ctx}, n_batch {args.n_batch}, window {args.window}; "
          f"load average (1/5/15 min) {loads[0]} at start, {loads[-1]} at end")
    print(f"{'path (best of ' + str(args.rounds) + ' for the first four)':<36}{'pairs':>7}{'seconds':>9}{'pairs/s':>10}{'tokens/s':>10}{'vs job':>8}  note")
    for name, r in rows.items():
        print(f"{name:<36}{r['pairs']:>7}{r['seconds']:>9.2f}{r['pairs_per_s']:>10.1f}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s'] / job_tps:>7.2f}x  {r['note']}")
    ceiling = rows["ceiling: llama_decode only"]["tokens_per_s"]
    print(f"job / ceiling (tokens/s), best of {args.rounds}: {job_tps / ceiling:.3f}   (target >= 0.95); round by round: "
          f"{', '.join(f'{x:.3f}' for x in round_ratios)}; "
          f"engine / ceiling: {rows['engine: score_prompts']['tokens_per_s'] / ceiling:.3f}; the job's "
          f"{rows['job (reranker score)']['seconds'] - rows['ceiling: llama_decode only']['seconds']:+.2f} s over the "
          f"ceiling include tokenising the pairs ({tokenise:.2f} s in one thread here; the job's first window is "
          f"tokenised before its first decode)")
    print(f"inside one more run of the job (in-process, `reranker.cli.main`): llama_decode {inproc_timer.seconds:.2f} s "
          f"of {inproc['wall_seconds']:.2f} s = {inproc_timer.seconds / inproc['wall_seconds']:.3f} of its wall time "
          f"({inproc_timer.calls} decode calls)")
    if summary["tokens_this_run"] != tokens:
        print(f"WARNING: the job counted {summary['tokens_this_run']} tokens, the ceiling run {tokens}")
    print(f"scores, max |diff|: upstream recipe vs fast path on the same {n_base} pairs and batches "
          f"{np.abs(fast_base_scores - up_scores).max():.2e}; vs the job (packed with all {len(pairs)}) "
          f"{np.abs(job_scores[:n_base] - up_scores).max():.2e}; job vs in-process fast path "
          f"{np.abs(job_scores - fast_scores).max():.2e}"
          + (f"; job vs transformers (first {len(tf_scores)}): {np.abs(job_scores[:len(tf_scores)] - tf_scores).max():.2e}"
             if tf_scores is not None else ""))
    if args.json:
        args.json.write_text(json.dumps({"model": str(gguf), "pairs": len(pairs), "tokens": tokens, "threads": args.threads,
                                         "rows": rows, "job_over_ceiling": job_tps / ceiling, "job_over_ceiling_rounds": round_ratios,
                                         "in_process_decode_share": inproc_timer.seconds / inproc["wall_seconds"],
                                         "load_average": loads}, indent=1) + "\n")


if __name__ == "__main__":
    main()
