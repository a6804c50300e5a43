"""results.json -> results.md (every table) and summary.txt (one screen). Pure functions, stdlib only."""

from __future__ import annotations

FLOPS_PER_TOKEN = 2 * 1.54e9
LEVEL_STEPS = (("q8", "Q8_0"), ("f16", "F16"), ("q4", "Q4_K_M"), ("bf16", "BF16"))
CHECK_STEPS = ("check-offload", "check-scores", "check-head", "check-job")
# Optional steps with a check: the checks they made count (a failed one fails the run); one that did not run or
# did not finish (its budget, a skip) adds nothing: its error is on its own line of results.md.
OPTIONAL_CHECK_STEPS = ("job-images",)


def _r(data: dict, step: str) -> dict:
    return (data["steps"].get(step) or {}).get("result") or {}


def _section(md: list[str], step: dict, title: str) -> dict | None:
    """An optional step's results.md section: nothing when it did not run (None); else its heading, then its skip or
    error line when it has no figures. Returns its figures ({} when none)."""
    if not (step.get("result") or step.get("skipped") or step.get("error")):
        return None
    md += ["", f"## {title}", ""]
    res = step.get("result") or {}
    if not res:
        md.append(str(step.get("skipped") or step.get("error")))
    return res


def _f(x, fmt: str = "{:.0f}", none: str = "–") -> str:
    if x is None:
        return none
    try:
        return fmt.format(x)
    except (TypeError, ValueError):
        return str(x)


def _cell(x, n: int) -> str:
    """Text for a markdown table cell: cut to `n` characters, pipes escaped, one line."""
    return str(x)[:n].replace("|", "\\|").replace("\n", " ")


def bf16_rate(data: dict) -> float | None:
    return _r(data, "matmul").get("bf16_flops") or (_r(data, "head").get("matmul_flops") or {}).get("bfloat16")


def level_rows(data: dict) -> list[dict]:
    rate = bf16_rate(data)
    rows = []
    for step, level in LEVEL_STEPS:
        r = _r(data, step)
        if not r:
            continue
        job, ceil, up = r.get("job") or {}, r.get("ceiling") or {}, r.get("upstream") or {}
        job_tps = job.get("tokens_per_s")
        rows.append({
            "level": level, "step": step, "file_gb": r.get("file_gb"), "vram_mib": (r.get("load") or {}).get("vram_mib"),
            "offload": ", ".join((r.get("load") or {}).get("offload", {}).get("offloaded", [])) or None,
            "pairs": job.get("pairs") or (r.get("pairs") or {}).get("n"), "tokens_per_pair": (r.get("pairs") or {}).get("tokens_per_pair"),
            "job_pairs_per_s": job.get("pairs_per_s"), "job_tokens_per_s": job_tps, "ceiling_tokens_per_s": ceil.get("tokens_per_s"),
            "job_over_ceiling": job.get("job_over_ceiling"), "upstream_tokens_per_s": up.get("tokens_per_s"),
            "job_over_upstream": job_tps / up["tokens_per_s"] if job_tps and up.get("tokens_per_s") else None,
            "fraction_of_bf16": job_tps * r.get("flops_per_token", FLOPS_PER_TOKEN) / rate if job_tps and rate else None,
            "job_error": job.get("error"),
        })
    return rows


def transformers_best(data: dict) -> tuple[int | None, float | None]:
    r = _r(data, "transformers")
    best = r.get("best_batch")
    if best is None:
        return None, None
    return best, ((r.get("batches") or {}).get(str(best)) or (r.get("batches") or {}).get(best) or {}).get("tokens_per_s")


def targets(data: dict) -> list[tuple[str, str, bool | None]]:
    rows = {r["level"]: r for r in level_rows(data)}
    out = []

    def add(name: str, value: float | None, limit: float, fmt: str = "{:.2f}x") -> None:
        out.append((name, _f(value, fmt), None if value is None else value >= limit))

    for lv in ("Q8_0", "F16"):
        add(f"job >= 2.5x the upstream recipe path ({lv})", (rows.get(lv) or {}).get("job_over_upstream"), 2.5)
    bs, tf = transformers_best(data)
    q8 = (rows.get("Q8_0") or {}).get("job_tokens_per_s")
    add(f"job (Q8_0) >= 2x transformers bf16 (best batch {bs})", q8 / tf if q8 and tf else None, 2.0)
    for lv in ("F16", "Q8_0"):
        add(f"job >= 40% of the bf16 matmul rate ({lv})", (rows.get(lv) or {}).get("fraction_of_bf16"), 0.40, "{:.1%}")
    head = [r for r in _r(data, "head").get("rows", []) if r.get("dtype") == "bfloat16" and r.get("where") == "device"
            and r.get("n", 0) >= 10**6 and r.get("fraction_of_bf16") is not None]
    add("head bf16 >= 70% of the bf16 matmul rate at 1e6+ embeddings (worst size)",
        min((r["fraction_of_bf16"] for r in head), default=None), 0.70, "{:.1%}")
    add("reranker serve at 32 clients >= 0.8x the job's pairs/s (Q8_0)", (_r(data, "serve").get("result") or {}).get("ratio_at_max_clients"), 0.8)
    return out


def checks(data: dict) -> list[dict]:
    out = []
    for s in CHECK_STEPS + OPTIONAL_CHECK_STEPS:
        st = data["steps"].get(s) or {}
        for c in (st.get("result") or {}).get("checks", []):
            out.append({"step": s, **c})
        if s in OPTIONAL_CHECK_STEPS:
            continue
        if st.get("status") in ("error", "partial") or str(st.get("status", "")).startswith("running"):
            out.append({"step": s, "name": f"{s} did not complete", "ok": False,
                        "detail": (st.get("result") or {}).get("error") or st.get("status")})
        elif (st.get("status") or "").startswith("skipped"):
            out.append({"step": s, "name": f"{s} not run", "ok": None, "detail": st.get("status")})
    return out


def render(data: dict) -> tuple[str, str]:
    meta = data["meta"]
    env = _r(data, "env")
    md = [f"# GPU run ({meta.get('mode')})", "",
          f"Started {meta.get('started')}; {meta.get('elapsed_s')} s elapsed of a {meta.get('budget_s')} s budget; "
          f"{meta.get('seconds_per_path')} s of work per measured path. {'Finished.' if meta.get('finished') else 'NOT FINISHED (cut short?)'}", ""]
    if meta.get("mode") != "gpu":
        md += ["CPU rehearsal: the `small` model instead of m0 and torch on the CPU; the numbers only show that every step runs.", ""]
    if env:
        md += ["```", str(env.get("nvidia_smi", "")), f"python {env.get('python')} ({env.get('executable')}), {env.get('nproc')} cores; "
               f"torch {(env.get('modules') or {}).get('torch')} cuda {(env.get('modules') or {}).get('torch.cuda')}; {env.get('nvcc', '')}",
               "```", ""]
    md += ["## Steps", "", "| step | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for name, st in data["steps"].items():
        r = st.get("result") or {}
        note = r.get("error") or r.get("mode") or ""
        if name == "build" and r.get("seconds") is not None:
            note = f"{r.get('mode', '')}; build {r.get('seconds')} s"
        md.append(f"| {name} | {st.get('status')} | {_f(st.get('seconds'), '{:.1f}')} | {_cell(note, 300)} |")
    bg = data.get("background") or {}
    models = {**(bg.get("models") or {})}
    if models or bg:
        md += ["", "Background model preparation (seconds): " + ", ".join(f"{k} {v}" for k, v in models.items()),
               "", "Background processes: " + ", ".join(f"{k} {v}" for k, v in bg.items() if k != "models")]

    cs = checks(data)
    md += ["", "## Correctness checks", "", "| step | check | result | detail |", "| --- | --- | --- | --- |"]
    md += [f"| {c['step']} | {c['name']} | {'not run' if c['ok'] is None else ('ok' if c['ok'] else '**FAIL**')} | "
           f"{_cell(c['detail'], 400)} |" for c in cs]

    rate = bf16_rate(data)
    mm = _r(data, "matmul")
    md += ["", "## Throughput at the m0 shape", "",
           f"Dense bf16 matmul: {_f(rate and rate / 1e12, '{:.1f}')} TFLOP/s; fp32 (no TF32): {_f(mm.get('fp32_flops') and mm['fp32_flops'] / 1e12, '{:.1f}')} "
           f"TFLOP/s; device copy {_f(mm.get('copy_bytes_per_s') and mm['copy_bytes_per_s'] / 1e12, '{:.2f}')} TB/s (read + write). "
           "Fraction of bf16 = job tokens/s x 2 x 1.54e9 FLOP / that rate.", "",
           "| level | file GB | VRAM MiB | layers on GPU | pairs | tokens/pair | job pairs/s | job tokens/s | ceiling tokens/s | job/ceiling | upstream tokens/s | job/upstream | of bf16 |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in level_rows(data):
        md.append(f"| {r['level']} | {_f(r['file_gb'], '{:.2f}')} | {_f(r['vram_mib'])} | {r['offload'] or '–'} | {_f(r['pairs'])} | "
                  f"{_f(r['tokens_per_pair'])} | {_f(r['job_pairs_per_s'], '{:.1f}')} | {_f(r['job_tokens_per_s'])} | {_f(r['ceiling_tokens_per_s'])} | "
                  f"{_f(r['job_over_ceiling'], '{:.3f}')} | {_f(r['upstream_tokens_per_s'])} | {_f(r['job_over_upstream'], '{:.2f}x')} | "
                  f"{_f(r['fraction_of_bf16'], '{:.1%}')} |" + (f" job error: {r['job_error'][:200]}" if r["job_error"] else ""))
    tr = _r(data, "transformers")
    if tr:
        md += ["", f"transformers (the original computation: Qwen2-VL text model, bf16, {tr.get('attn_implementation')} attention, "
               f"batches sorted by length, left padding) on {(tr.get('pairs') or {}).get('n')} pairs; best batch {tr.get('best_batch')}; "
               f"max |score diff| vs the Q8_0 job {_f(tr.get('max_diff_vs_q8_job'), '{:.2e}')}:", "",
               "| batch | pairs/s | tokens/s | padding |", "| ---: | ---: | ---: | ---: |"]
        for bs, b in (tr.get("batches") or {}).items():
            md.append(f"| {bs} | {_f(b.get('pairs_per_s'), '{:.1f}')} | {_f(b.get('tokens_per_s'))} | {_f(b.get('padding_share'), '{:.0%}')} |"
                      + (f" {b.get('skipped') or b.get('error')}" if not b.get("tokens_per_s") else ""))
    hd = _r(data, "head")
    if hd.get("rows"):
        md += ["", "## Head alone (score_embeddings)", "", "| dtype | embeddings | input | emb/s | TFLOP/s | of bf16 rate | of own dtype's rate |",
               "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in hd["rows"]:
            md.append(f"| {r['dtype']} | {r['n']:,} | {r['where']} | {_f(r.get('emb_per_s'), '{:,.0f}')} | {_f(r.get('tflops'), '{:.1f}')} | "
                      f"{_f(r.get('fraction_of_bf16'), '{:.1%}')} | {_f(r.get('fraction_of_own_dtype'), '{:.1%}')} |" + (f" {r['skipped']}" if r.get("skipped") else ""))
    sw = _r(data, "sweep")
    if sw.get("rows"):
        md += ["", f"## Knob sweep (Q8_0, engine tokens/s on {(sw.get('pairs') or {}).get('n')} pairs)", "",
               "| config | n_ctx | tokens/s | llama_decode tokens/s | decode calls | VRAM MiB |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sw["rows"]:
            md.append(f"| {r['config']} | {_f(r.get('n_ctx'))} | {_f(r.get('tokens_per_s'))} | {_f(r.get('decode_tokens_per_s'))} | "
                      f"{_f(r.get('decode_calls'))} | {_f(r.get('vram_mib'))} |" + (f" {r.get('error') or r.get('skipped')}" if not r.get("tokens_per_s") else ""))
    sv = _r(data, "serve")
    res = _section(md, sv, "reranker serve against the job (Q8_0, benchmarks/serve.py)")
    if res:
        md += [f"{res['requests']} requests x {res['docs']} documents; light-load {res['docs']}-document request: "
               f"p50 {res['latency']['p50_ms']:.0f} ms, p99 {res['latency']['p99_ms']:.0f} ms", "",
               "| path | pairs/s | vs job | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: |"]
        job_pps = res["rows"]["job (reranker score)"]["pairs_per_s"]
        for name, r in res["rows"].items():
            md.append(f"| {name} | {r['pairs_per_s']:.1f} | {r['pairs_per_s'] / job_pps:.2f} | {_f(r.get('p50_ms'))} | {_f(r.get('p99_ms'))} |")
    im = _r(data, "images")
    res = _section(md, im, "Image documents (benchmarks/images.py; ours: F16 GGUF + F16 mmproj in libmtmd)")
    if res:
        md += [f"{res['images']} images, {res['preset']} shapes, {res['device']}; transformers {res['transformers_dtype']} SDPA; "
               f"libmtmd {im.get('libmtmd')} ({res.get('ours_vision_backend', '?')}); ours/transformers {res['ratio_images_per_s']:.2f}x images/s; "
               f"max |score diff| {res['max_score_diff']:.2e}", "",
               "| side | size | images/s | encode ms/image | decode tokens/s | prompt tokens/s | tokens/image |",
               "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for side in ("ours", "transformers"):
            rows = [("all", {m: res.get(f"{side}_{m}") for m in ("images_per_s", "encode_s_per_image", "decode_tokens_per_s",
                                                                  "prompt_tokens_per_s", "tokens_per_image")})]
            rows += [(size, g[side]) for size, g in (res.get("sizes") or {}).items()]
            for size, f in rows:
                md.append(f"| {side} | {size} | {_f(f.get('images_per_s'), '{:.2f}')} | {_f(f.get('encode_s_per_image') and f['encode_s_per_image'] * 1000)} | "
                          f"{_f(f.get('decode_tokens_per_s'))} | {_f(f.get('prompt_tokens_per_s'))} | {_f(f.get('tokens_per_image'))} |")
    jm = _r(data, "job-images")
    res = _section(md, jm, "Image documents in a job (`reranker score`, F16 GGUF + F16 mmproj)")
    if res:
        md.append(f"{res['images']} image documents ({', '.join(f'{k} {v}' for k, v in res['sizes'].items())} PNGs, "
                  f"{res['per_record']} per record, paths relative to the JSONL), {res['preset']} shapes, {res['device']}, "
                  f"--window {res['window']}; libmtmd {jm.get('libmtmd')} ({res.get('vision_backend', '?')}); "
                  f"all layers on the GPU: {res.get('all_layers_on_gpu')}")
        md += ["", "| images/s | tokens/s | loop s | process s | compute_score images/s | max score diff vs compute_score |",
               "| ---: | ---: | ---: | ---: | ---: | ---: |",
               f"| {_f(res.get('job_images_per_s'), '{:.2f}')} | {_f(res.get('job_tokens_per_s'))} | {_f(res.get('job_loop_s'), '{:.1f}')} | "
               f"{_f(res.get('job_process_s'), '{:.1f}')} | {_f(res.get('compute_score_images_per_s'), '{:.2f}')} | "
               f"{_f(res.get('max_score_diff'), '{:.2e}')} |"]
        if jm.get("error"):  # a failed check beside the figures
            md.append(str(jm.get("skipped") or jm.get("error")))
    tg = targets(data)
    md += ["", "## Targets", "", "| target | value | met |", "| --- | ---: | --- |"]
    md += [f"| {n} | {v} | {'–' if ok is None else ('yes' if ok else '**no**')} |" for n, v, ok in tg]
    md.append("")

    # one screen
    s = []
    nv = str(env.get("nvidia_smi", "")).splitlines()
    s.append(f"GPU run summary ({meta.get('mode')}): {nv[1] if len(nv) > 1 else 'no nvidia-smi'}")
    if meta.get("mode") != "gpu":
        s.append("(CPU rehearsal with the small model: the numbers only show that every step runs; they measure nothing)")
    b = data["steps"].get("build") or {}
    br = b.get("result") or {}
    s.append(f"build: {b.get('status')} in {_f(br.get('seconds'), '{:.0f}')} s ({br.get('mode', '')})"[:160])
    for name in ("build", "install"):  # a failed build or install is the whole run's failure: show why here
        st = data["steps"].get(name) or {}
        if st.get("status") == "error":
            r = st.get("result") or {}
            s.append(f"*** {name.upper()} FAILED: {str(r.get('error'))[:300]}")
            if r.get("tail"):
                s += ["  | " + line for line in str(r["tail"]).strip().splitlines()[-15:]]
    bad = [c for c in cs if c["ok"] is False]
    ran = [c for c in cs if c["ok"] is not None]
    not_run = [c["step"] for c in cs if c["ok"] is None]
    s.append(f"CORRECTNESS: {'ALL ' + str(len(ran)) + ' CHECKS PASSED' if ran and not bad else ('NO CHECKS RAN' if not ran else f'*** {len(bad)} OF {len(ran)} CHECKS FAILED ***')}"
             + (f" ({', '.join(not_run)} NOT RUN)" if not_run else ""))
    for c in bad:
        s.append(f"  FAIL {c['step']}: {c['name']}: {str(c['detail'])[:150]}")
    s.append(f"bf16 matmul {_f(rate and rate / 1e12, '{:.0f}')} TFLOP/s")
    for r in level_rows(data):
        s.append(f"{r['level']:<7} job {_f(r['job_pairs_per_s'], '{:.1f}')} pairs/s {_f(r['job_tokens_per_s'])} tok/s | ceiling {_f(r['ceiling_tokens_per_s'])} "
                 f"| upstream {_f(r['upstream_tokens_per_s'])} ({_f(r['job_over_upstream'], '{:.2f}x')}) | {_f(r['fraction_of_bf16'], '{:.1%}')} of bf16 "
                 f"| VRAM {_f(r['vram_mib'])} MiB")
    bs, tf = transformers_best(data)
    if tf:
        s.append(f"transformers bf16 sdpa: {tf:.0f} tok/s at batch {bs}")
    ir = _r(data, "images").get("result") or {}
    if ir:
        s.append(f"images ({ir['preset']}): ours {ir['ours_images_per_s']:.2f} images/s, {ir['ours_prompt_tokens_per_s']:.0f} prompt tok/s | "
                 f"transformers {ir['transformers_images_per_s']:.2f}, {ir['transformers_prompt_tokens_per_s']:.0f} | "
                 f"{ir['ratio_images_per_s']:.2f}x; encode {ir['ours_encode_s_per_image'] * 1000:.0f} vs "
                 f"{ir['transformers_encode_s_per_image'] * 1000:.0f} ms/image")
    jr = _r(data, "job-images").get("result") or {}
    if jr:
        s.append(f"job on image documents ({jr['preset']}): {jr['job_images_per_s']:.2f} images/s, {jr['job_tokens_per_s']:.0f} tok/s; "
                 f"scores vs compute_score max |diff| {_f(jr.get('max_score_diff'), '{:.1e}')}")
    for n, v, ok in tg:
        s.append(f"  [{'  ' if ok is None else ('OK' if ok else 'NO')}] {n}: {v}")
    skipped = [n for n, st in data["steps"].items() if str(st.get("status", "")).startswith("skipped") or st.get("status") in ("error", "partial")]
    if skipped:
        s.append("not done: " + ", ".join(f"{n} ({str(data['steps'][n].get('status'))[:40]})" for n in skipped))
    s.append("step seconds used/budget: " + ", ".join(f"{n} {_f(st.get('seconds'), '{:.0f}')}" + (f"/{st['budget_s']}" if st.get("budget_s") else "")
                                                     for n, st in data["steps"].items()))
    s.append(f"elapsed {meta.get('elapsed_s')} s of {meta.get('budget_s')} s; files in $OUT: log.txt build.log results.json results.md summary.txt")
    return "\n".join(md), "\n".join(s) + "\n"
