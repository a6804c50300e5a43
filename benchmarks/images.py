"""Image documents: ours (mmproj in libmtmd + GGUF backbone in llama.cpp) against transformers, same images, same run.

Each side scores the same image documents (0.3 MP and 0.6 MP, each size timed apart) against one text query,
one image at a time through the vision tower (Qwen2-VL's vision graph takes one image per call; transformers is run the same way), with the vision
encode and the language-model decode timed apart. Ours packs the image prompts into shared decode calls (as
`compute_score` does); transformers runs each prompt alone (its images differ in size; padding them into a
batch is not how the original's `compute_score` runs either). Transformers runs in bf16 on a CPU with native bf16
(avx512_bf16/amx), else fp32, with SDPA attention: its strongest setting on that machine.

    python benchmarks/images.py                       # `small` synthetic shapes (CPU)
    python benchmarks/images.py --preset m0 --n 8     # the real m0 shapes: Qwen2-VL-2B's vision tower (GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE, os.path.join(_ROOT, "tests")]

QUERY = "a chart of the quarterly sales"
SIZES = {"0.3 MP": (640, 480), "0.6 MP": (896, 672)}


def images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = list(SIZES.values())[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, ((xx ^ yy) * (i + 3)) % 256], -1) + rng.integers(0, 30, (h, w, 3))
        out.append(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB"))
    return out


def model(preset: str, cache: Path, outtype: str = "f16") -> tuple[Path, Path, Path]:
    """(checkpoint, GGUF, mmproj) of a synthetic checkpoint with its vision tower, both files `outtype`, built once."""
    from reranker.gguf.convert import convert
    from reranker.synth.random_checkpoint import synth_checkpoint

    ckpt = cache / f"jina-reranker-m0-{preset}-vision"
    gguf = cache / f"{preset}-vision-gguf-{outtype}" / f"{ckpt.name}-{outtype.upper()}.gguf"
    if not gguf.is_file():
        if not (ckpt / "model.safetensors").is_file():
            synth_checkpoint(ckpt, preset=preset, seed=0)
        convert(ckpt, gguf.parent, outtype=outtype, mmproj_type=outtype)
    return ckpt, gguf, next(gguf.parent.glob("mmproj-*.gguf"))


def groups(imgs) -> dict[str, list[int]]:
    """Indices of the images of each size (SIZES' names), in order."""
    names = {v: k for k, v in SIZES.items()}
    out: dict[str, list[int]] = {}
    for i, im in enumerate(imgs):
        out.setdefault(names.get(im.size, f"{im.size[0]}x{im.size[1]}"), []).append(i)
    return out


def ours(gguf: Path, mmproj: Path, imgs, n_gpu_layers: int) -> dict:
    """Per size: the vision encode (one image at a time) and the decode of that size's prompts (packed), timed apart."""
    import logging

    from reranker import Reranker
    from reranker.engine.scoring import prepare, score_prepared
    from reranker.options import ImageRef

    class Backend(logging.Handler):  # libmtmd says where the vision tower runs ("CLIP using CUDA0 backend", at DEBUG)
        lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            if "CLIP using" in record.getMessage():
                self.lines.append(record.getMessage().strip())

    log = logging.getLogger("reranker.llama")
    handler, level = Backend(logging.DEBUG), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)  # until the projector is loaded (the warm-up), not while timing
    per: dict[str, dict] = {}
    scores = np.zeros(len(imgs))
    with Reranker.from_pretrained(str(gguf), mmproj=str(mmproj), n_ctx=4096, n_batch=4096, n_gpu_layers=n_gpu_layers) as rr:
        rr.compute_score([QUERY, imgs[0]], doc_type="image")  # warm-up: loads the projector, reserves its buffers
        log.removeHandler(handler)
        log.setLevel(level)
        for size, idx in groups(imgs).items():
            t = time.perf_counter()
            embedded = [rr.vision.embed(ImageRef(imgs[i], f"image {i}")) for i in idx]
            encode = time.perf_counter() - t
            prepared = prepare(rr.prompt_builder(), [(QUERY, e) for e in embedded])
            t = time.perf_counter()
            scores[idx] = score_prepared(rr, prepared).scores
            per[size] = {"images": len(idx), "encode": encode, "decode": time.perf_counter() - t, "tokens": prepared.tokens}
    return {**total(per, scores), "vision_backend": "; ".join(handler.lines) or "not logged"}


def total(per: dict[str, dict], scores) -> dict:
    keys = ("images", "encode", "decode", "tokens")
    return {**{k: sum(g[k] for g in per.values()) for k in keys}, "scores": scores, "sizes": per}


def transformers_side(ckpt: Path, imgs, dtype_name: str, device: str) -> dict:
    import torch
    from oracle import SCORE_TOKEN_ID, head_scores, image_processor, load_vl_model, score_head
    from tokenizers import Tokenizer

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    vl = load_vl_model(ckpt)
    vl.config._attn_implementation = "sdpa"
    for m in vl.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "sdpa"
    vl = vl.to(device, dtype)
    proc = image_processor(ckpt)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    pad = tok.token_to_id("<|image_pad|>")
    head = score_head(ckpt)
    per: dict[str, dict] = {}
    size_of = {i: size for size, idx in groups(imgs).items() for i in idx}
    scores = []
    with torch.inference_mode():
        for i, im in enumerate(imgs[:1] + imgs):  # the first is a warm-up, not counted
            x = proc(images=[im], return_tensors="pt")
            grid = x["image_grid_thw"].to(device)
            t = time.perf_counter()
            feats = vl.model.get_image_features(x["pixel_values"].to(device, dtype), grid)
            feats = torch.cat(list(getattr(feats, "pooler_output", feats)))
            if device == "cuda":
                torch.cuda.synchronize()
            t_enc = time.perf_counter() - t
            n = len(feats)
            ids = tok.encode(f"**Document**:\n<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>\n**Query**:\n{QUERY}",
                             add_special_tokens=False).ids + [SCORE_TOKEN_ID]
            input_ids = torch.tensor([ids], device=device)
            embeds = vl.model.get_input_embeddings()(input_ids)
            embeds[input_ids == pad] = feats.to(embeds.dtype)
            mm = (input_ids == pad).int()
            t = time.perf_counter()
            position_ids, _ = vl.model.get_rope_index(input_ids, mm, grid)
            out = vl.model.language_model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False)
            h = out.last_hidden_state[0, -1].float().cpu().numpy()
            t_dec = time.perf_counter() - t
            if i == 0:
                continue
            g = per.setdefault(size_of[i - 1], {"images": 0, "encode": 0.0, "decode": 0.0, "tokens": 0})
            g["images"] += 1
            g["encode"] += t_enc
            g["decode"] += t_dec
            g["tokens"] += len(ids)
            scores.append(float(head_scores(head, h[None].astype(np.float64))[0]))
    return total(per, np.array(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "m0"])
    ap.add_argument("--n", type=int, default=8, help="images (half 0.3 MP, half 0.6 MP)")
    ap.add_argument("--outtype", default="f16", choices=["f16", "f32"],
                    help="our GGUF's and mmproj's type (f32 can be the faster on CPUs without native f16/bf16 math)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench")
    ap.add_argument("--json", type=Path, help="also write the figures here (the prepared GPU run reads them)")
    args = ap.parse_args()

    import torch

    from reranker.engine.cpu import native_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bf16" if device == "cuda" or native_bf16()[0] else "fp32"
    ckpt, gguf, mmproj = model(args.preset, args.cache, args.outtype)
    imgs = images(args.n)
    a = ours(gguf, mmproj, imgs, -1 if device == "cuda" else 0)
    b = transformers_side(ckpt, imgs, dtype, device)
    n = len(imgs)
    t = args.outtype.upper()
    sides = {"ours": a, "transformers": b}
    figures = {k: rates(r) for k, r in sides.items()}
    print(f"{args.preset} shapes, {n} image documents ({', '.join(SIZES)}), one text query, device {device}; "
          f"transformers {dtype} SDPA")
    print(f"{'side':26s} {'size':>8s} {'images/s':>9s} {'encode s/img':>13s} {'decode tok/s':>13s} {'prompt tok/s':>13s} "
          f"{'tokens/img':>11s}")
    for name, key in ((f"ours (mmproj {t}, GGUF {t})", "ours"), (f"transformers {dtype}", "transformers")):
        for size, f in [("all", figures[key]), *figures[key]["sizes"].items()]:
            print(f"{name:26s} {size:>8s} {f['images_per_s']:9.2f} {f['encode_s_per_image']:13.3f} {f['decode_tokens_per_s']:13.0f} "
                  f"{f['prompt_tokens_per_s']:13.0f} {f['tokens_per_image']:11.0f}")
    ratio = (b["encode"] + b["decode"]) / (a["encode"] + a["decode"])
    diff = float(np.abs(a["scores"] - b["scores"]).max())
    if args.json:
        import json

        flat = {f"{k}_{m}": v for k, f in figures.items() for m, v in f.items() if m != "sizes"}
        args.json.write_text(json.dumps({
            "preset": args.preset, "images": n, "device": device, "transformers_dtype": dtype, "ours_type": t, **flat,
            "sizes": {size: {k: figures[k]["sizes"][size] for k in sides} for size in figures["ours"]["sizes"]},
            "ratio_images_per_s": ratio, "max_score_diff": diff, "ours_vision_backend": a["vision_backend"]}, indent=1))
    print(f"ours: {a['vision_backend']}")
    print(f"ours / transformers: images/s {ratio:.2f}x, encode {b['encode'] / a['encode']:.2f}x, decode {b['decode'] / a['decode']:.2f}x; "
          f"max |score difference| {diff:.2e} ({t} vs {dtype}, random weights)")


def rates(r: dict) -> dict:
    """images/s, encode s/image, decode tokens/s and prompt tokens/s (encode + decode) of one side, in all and per size."""
    def one(g: dict) -> dict:
        return {"images_per_s": g["images"] / (g["encode"] + g["decode"]), "encode_s_per_image": g["encode"] / g["images"],
                "decode_tokens_per_s": g["tokens"] / g["decode"], "prompt_tokens_per_s": g["tokens"] / (g["encode"] + g["decode"]),
                "tokens_per_image": g["tokens"] / g["images"]}

    return {**one(r), "sizes": {size: one(g) for size, g in r["sizes"].items()}}


if __name__ == "__main__":
    main()
