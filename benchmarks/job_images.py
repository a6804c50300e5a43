"""A `reranker score` job of image documents: images read and sized on the reader thread (what the job
does) against the same work done in the scoring thread, one window after the other.

Both runs are the real job (`run_job`, JSONL input with relative image paths, JSONL output), on the same
files and model, alternated `--repeats` times (best of each kept: the machine may be shared). The second
one replaces the job's reader thread (`jobs.job._prefetch`) by a plain loop, so each window's images are
read, decoded and resized by the thread that then encodes and decodes them: what the job would do
without reader-side preprocessing. Also printed: decode+resize alone per image (`engine.vision.load`).

    python benchmarks/job_images.py                   # `small` synthetic shapes, 96 images (CPU)
    python benchmarks/job_images.py --preset tiny --n 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE, os.path.join(_ROOT, "tests")]

from images import QUERY, images, model  # noqa: E402  (benchmarks/images.py: the same pictures and models)


def write_input(folder: Path, n: int, per_record: int) -> Path:
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images(n)):
        im.save(folder / "imgs" / f"{i}.png")
    records = [{"query_id": f"q{r}", "query": f"{QUERY} {r}",
                "documents": [{"id": f"d{i}", "image": f"imgs/{i}.png"} for i in range(r * per_record, min(n, (r + 1) * per_record))]}
               for r in range((n + per_record - 1) // per_record)]
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@contextlib.contextmanager
def in_scoring_thread(enabled: bool):
    """With `enabled`, the job's windows are prepared (images included) by the consuming thread, not ahead."""
    import reranker.jobs.job as job

    saved = job._prefetch
    if enabled:
        job._prefetch = lambda it, stop, depth=2: it
    try:
        yield
    finally:
        job._prefetch = saved


def run(inp: Path, out: Path, gguf: Path, window: int, threads: int | None, serial: bool) -> float:
    from reranker.jobs.job import JobSpec
    from reranker.jobs.run import run_job
    from reranker.settings import LoadSettings

    spec = JobSpec(input=inp, output=out, window=window, restart=True)
    with in_scoring_thread(serial):  # the job's own wall time: from its first window, the model already loaded
        summary = run_job(spec, LoadSettings(model=str(gguf), n_ctx=4096, n_threads=threads, device="cpu"), quiet=True)
    return summary["wall_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n", type=int, default=96, help="images (0.3 and 0.6 MP PNGs, alternating)")
    ap.add_argument("--per-record", type=int, default=8)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the job's own default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval (s) for both runs (Python's default: 0.005)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reranker-bench-images")
    args = ap.parse_args()

    from reranker.engine.vision import load
    from reranker.images.preprocess import Sizing
    from reranker.options import ImageRef

    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    _, gguf, mmproj = model(args.preset, args.cache)
    work = Path(tempfile.mkdtemp(prefix="job-images-"))
    inp = write_input(work, args.n, args.per_record)
    t = time.perf_counter()
    for p in sorted((work / "imgs").iterdir()):
        load(ImageRef(p, "image"), Sizing())
    load_s = (time.perf_counter() - t) / args.n
    times: dict[str, list[float]] = {"reader thread (the job)": [], "scoring thread": []}
    for _ in range(args.repeats):
        for name, serial in (("reader thread (the job)", False), ("scoring thread", True)):
            out = work / f"out-{serial}.jsonl"
            times[name].append(run(inp, out, gguf, args.window, args.threads, serial))
    a, b = (work / "out-False.jsonl").read_bytes(), (work / "out-True.jsonl").read_bytes()
    print(f"{args.preset} model, {args.n} images ({args.per_record} per record), window {args.window}, "
          f"{os.cpu_count()} CPUs, switch interval {sys.getswitchinterval()} s; decode+resize alone: {load_s * 1000:.1f} ms/image; outputs identical: {a == b}")
    for name, ts in times.items():
        best = min(ts)
        print(f"  images read and sized in the {name:24s} {best:6.2f} s  {args.n / best:6.1f} images/s   (runs: "
              f"{', '.join(f'{x:.2f}' for x in ts)})")


if __name__ == "__main__":
    main()
