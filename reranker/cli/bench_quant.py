"""`reranker bench-quant`: quantization levels of one model (and of its vision projector), measured on the same evaluation set."""

from __future__ import annotations

import argparse

from reranker.cli.common import add_backbone_args, mode_options
from reranker.errors import RerankerError
from reranker.gguf.quantize import BENCH_LEVELS

DEFAULT_OUT = "bench-quant"
#: The BEIR set's options and their defaults.
BEIR_DEFAULTS = {"split": "test", "qrels": None, "run": None, "depth": 100, "negatives": 20, "max_queries": None}


def _levels(text: str) -> list[str]:
    return [x for x in (s.strip() for s in text.split(",")) if x]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the `bench-quant` command to the `reranker` command line."""
    p = sub.add_parser(
        "bench-quant", help="measure quantization levels: size, memory, speed, fidelity to F16, retrieval quality",
        description="Make the missing quantization levels of a model and measure each on the same evaluation set.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="an F16/BF16/F32 GGUF, a folder or Hub repo id holding several levels, or several GGUF files")
    p.add_argument("--levels", type=_levels, default=None,
                   help=f"comma-separated levels (default: {','.join(BENCH_LEVELS)}; with several files: those files)")
    p.add_argument("--reference", default=None, help="level of the reference file (default: the first of F32, BF16, F16 found)")
    p.add_argument("--head", default=None, help="mlp_weights.npz (default: the one beside the reference)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--beir", metavar="DIR", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv, optional run")
    src.add_argument("--pairs", metavar="FILE", help='JSONL of {"query_id", "query", "doc_id", "document", "label"}')
    src.add_argument("--synthetic", type=int, metavar="N", help="N random pairs (speed and fidelity only)")
    p.add_argument("--mmproj", dest="mmproj_files", metavar="FILE", action="append", default=[],
                   help="a vision projector level to measure (repeatable; the F32 one is the reference): mmproj-*.gguf")
    p.add_argument("--mmproj-checkpoint", metavar="DIR",
                   help="make the projector levels from this checkpoint, as `reranker convert --mmproj-type` does "
                        "(into OUT/mmproj/, reused on later runs)")
    p.add_argument("--mmproj-levels", type=_levels, default=None,
                   help="projector levels made from --mmproj-checkpoint (default: F32,F16,Q8_0)")
    images = p.add_mutually_exclusive_group()
    images.add_argument("--images", metavar="DIR", help="the projector levels' image set: the image files of DIR")
    images.add_argument("--synthetic-images", type=int, metavar="N",
                        help="the projector levels' image set: N seeded synthetic images of a few sizes (default: 32)")
    # The BEIR options default to None so that one given without --beir is an error, not silently ignored.
    p.add_argument("--split", default=None, help=f"BEIR qrels split (default: {BEIR_DEFAULTS['split']})")
    p.add_argument("--qrels", default=None, help="BEIR: qrels file (default: DIR/qrels/<split>.tsv)")
    p.add_argument("--run", default=None, help="BEIR: first-stage TREC run (default: run.trec, run.txt or *.run in DIR)")
    p.add_argument("--depth", type=int, default=None,
                   help=f"BEIR: run candidates reranked per query (default: {BEIR_DEFAULTS['depth']})")
    p.add_argument("--negatives", type=int, default=None,
                   help="BEIR without a run: random corpus documents added to each query's judged ones "
                        f"(default: {BEIR_DEFAULTS['negatives']})")
    p.add_argument("--max-queries", type=int, default=None, help="BEIR: only the first N judged queries")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic pairs and sampled negatives (default: %(default)s)")
    p.add_argument("-o", "--out", default=DEFAULT_OUT,
                   help="output folder: bench_quant.{md,json,png}, scores.npz, made GGUFs in gguf/ (default: %(default)s)")
    add_backbone_args(p)
    p.add_argument("--batch-size", type=int, default=256, help="pairs per compute_score batch (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=8, help="pairs scored before timing (default: %(default)s)")
    p.add_argument("--recalibrate", action="store_true",
                   help="fit a correction of each level's scores towards the reference (a*logit+b, and a refit of the head's "
                        "last layer) on half of the queries; report fidelity before/after on the other half, and write the "
                        "corrected heads to OUT/recalibrated/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from reranker.extras import require

    # Before any level is made or scored: the comparison (scipy), the metrics and the plot come last.
    require("bench", "reranker bench-quant")
    from reranker.bench.quant import Settings, bench_quant, plan_levels
    from reranker.bench.report import failed_levels, markdown, write_outputs
    from reranker.bench.sets import beir_set, pairs_jsonl_set, synthetic_set

    beir = _check(args)
    projectors_asked = bool(args.mmproj_files or args.mmproj_checkpoint)
    if args.beir is None and args.pairs is None and args.synthetic is None and not projectors_asked:
        raise RerankerError("give an evaluation set: --beir DIR, --pairs FILE or --synthetic N (or projector levels: "
                            "--mmproj FILE / --mmproj-checkpoint DIR)")
    if not projectors_asked and (args.images is not None or args.synthetic_images is not None or args.mmproj_levels):
        raise RerankerError("--images, --synthetic-images and --mmproj-levels are for projector levels: add --mmproj FILE "
                            "or --mmproj-checkpoint DIR")
    if args.synthetic is not None:
        eval_set = synthetic_set(args.synthetic, seed=args.seed)
    elif args.pairs is not None:
        eval_set = pairs_jsonl_set(args.pairs)
    elif args.beir is not None:
        eval_set = beir_set(args.beir, **beir, seed=args.seed, work_dir=f"{args.out}/work")
    else:  # projector levels only: the backbone is the reference, no level of it is made
        if args.levels:
            raise RerankerError("--levels are backbone levels, measured on a text set: add --beir, --pairs or --synthetic")
        eval_set = None
    plan = plan_levels(args.models, args.out, levels=args.levels if eval_set is not None else [], reference=args.reference,
                       head=args.head)
    projectors = image_set = None
    if projectors_asked:
        from reranker.bench.quant import plan_projectors
        from reranker.bench.sets import image_folder_set, synthetic_image_set

        projectors = plan_projectors(plan.reference.path, args.out, files=args.mmproj_files, checkpoint=args.mmproj_checkpoint,
                                     levels=args.mmproj_levels)
        image_set = image_folder_set(args.images, seed=args.seed) if args.images is not None else \
            synthetic_image_set(32 if args.synthetic_images is None else args.synthetic_images, f"{args.out}/work/images",
                                seed=args.seed)
    settings = Settings(n_threads=args.threads, n_ctx=args.n_ctx, n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers,
                        batch_size=args.batch_size, max_length=args.max_length, max_query_length=args.max_query_length,
                        max_doc_length=args.max_doc_length, device=args.device, warmup=args.warmup)
    report = bench_quant(plan, eval_set, args.out, settings, quantize_threads=args.threads, progress=not args.no_progress,
                         recalibrate=args.recalibrate, projectors=projectors, image_set=image_set)
    paths = write_outputs(report, args.out)
    print(markdown(report))
    for path in paths.values():
        print(path)
    failed = failed_levels(report)
    if failed:
        raise RerankerError(f"{len(failed)} level(s) could not be made or measured: {', '.join(failed)} (the report above "
                            "has the other levels, and why each of these failed)")


def _check(args: argparse.Namespace) -> dict[str, object]:
    """Every option checked before any level is made or scored (a worker's traceback is no message); returns the
    BEIR set's options, their defaults filled in."""
    from reranker.api import resolve_device
    from reranker.settings import LoadSettings

    for name, low in (("depth", 1), ("batch_size", 1), ("n_batch", 1), ("negatives", 0), ("max_queries", 1),
                      ("warmup", 0), ("synthetic", 1), ("synthetic_images", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise RerankerError(f"--{name.replace('_', '-')} {value} must be at least {low}")
    if args.levels == []:
        raise RerankerError("--levels is empty; name the levels to measure, e.g. --levels Q8_0,Q4_K_M (or leave it out)")
    beir = mode_options(args, BEIR_DEFAULTS, args.beir is not None, "applies to a BEIR set only; add --beir DIR or drop it")
    if args.bf16 != "auto":
        raise RerankerError("--bf16 does not apply to bench-quant: each level is measured as stored (the F16 row runs "
                            "F16); to measure BF16, include it in --levels (made from the reference)")
    # The lengths, llama.cpp's settings and the head's device, with the messages `from_pretrained` gives.
    LoadSettings(model=args.models[0], n_ctx=args.n_ctx, n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers,
                 n_threads=args.threads, max_length=args.max_length, max_query_length=args.max_query_length,
                 max_doc_length=args.max_doc_length)
    resolve_device(args.device)
    return beir
