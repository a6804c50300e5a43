"""A job's window of PDF pages: each file opened once for the window (what the job does) against once per page.

Loading a window (`jobs.images.load_window_images`: render, decode, resize) of one record holding a whole
PDF of `--pages` pages, as the job's reader thread does, timed two ways on the same file: the job's own
(`pdf_documents()` keeps the file open across its pages) and the same work with a fresh open per page
(the file opened as data, PDFium's load, which parses the cross-reference table and walks the page
tree, one page rendered, closed: what the job did before). Alternated `--repeats` times, best of each
kept (the machine may be shared); the sized pixels of both are checked equal. The prompt-fit check
(`build_parts`, the same in both) is left out, so no model is needed.

The pages are pictures (pypdfium2 writes them: tests/helpers.py `write_pdf`) of varied sizes.

    python benchmarks/job_pdf.py                 # 50 and 500 pages
    python benchmarks/job_pdf.py --pages 200 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [os.path.join(_ROOT, "tests")]


class _NoPromptCheck:
    """The window's prompt-fit check, left out (the same work either way; it needs a model)."""

    def build_parts(self, query, doc) -> None:
        return None


class _OpenPerPage:
    """`pdf_documents()` as the job had it before: every page from a fresh open, closed after it."""

    def __init__(self, make) -> None:
        self._make = make

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def render(self, source, page, name, **kw):
        with self._make() as once:
            return once.render(source, page, name, **kw)


@contextlib.contextmanager
def open_per_page(enabled: bool):
    import reranker.jobs.images as job_images

    saved = job_images.pdf_documents
    if enabled:
        job_images.pdf_documents = lambda: _OpenPerPage(saved)
    try:
        yield
    finally:
        job_images.pdf_documents = saved


def load_window(path: Path, pages: int, per_page: bool):
    from reranker.images.preprocess import Sizing
    from reranker.jobs.images import ImageSettings, load_window_images
    from reranker.jobs.records import ImageDoc, Unit

    unit = Unit(0, "q", "a chart of the quarterly sales", [(f"p{n}", ImageDoc(path.name, path, n)) for n in range(1, pages + 1)], "bench:1")
    with open_per_page(per_page):
        t = time.perf_counter()
        units, rejects, sides = load_window_images([unit], _NoPromptCheck(), ImageSettings(path, Sizing()))
        seconds = time.perf_counter() - t
    assert not rejects and len(sides[0]) == pages
    return seconds, sides[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    from helpers import write_pdf

    work = Path(tempfile.mkdtemp(prefix="job-pdf-"))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    for pages in args.pages:
        path = work / f"{pages}.pdf"
        write_pdf(path, pages=[(300 + 37 * (i % 9), 400 - 23 * (i % 7)) for i in range(pages)])
        times: dict[bool, list[float]] = {False: [], True: []}
        sides = {}
        for _ in range(args.repeats):
            for per_page in (False, True):
                seconds, sides[per_page] = load_window(path, pages, per_page)
                times[per_page].append(seconds)
        from reranker.jobs.images import pdf_documents

        opens = []
        for _ in range(20):  # one open alone (file opened as data, PDFium's load, page count, close): what is saved per page
            t = time.perf_counter()
            with pdf_documents() as once:
                once.page_count(path, "bench")
            opens.append(time.perf_counter() - t)
        same = all(np.array_equal(np.asarray(a.pixels.image), np.asarray(b.pixels.image)) for a, b in zip(sides[False], sides[True]))
        one, each = min(times[False]), min(times[True])
        print(f"{pages:4d} pages ({path.stat().st_size / 1e6:.1f} MB): one open per window {one:6.2f} s "
              f"({one / pages * 1000:5.1f} ms/page), one per page {each:6.2f} s ({each / pages * 1000:5.1f} ms/page): "
              f"{each / one:.2f}x; one open alone {min(opens) * 1000:.2f} ms; pixels identical: {same}; load average {os.getloadavg()[0]:.1f}")
        print(f"      runs: one per window {', '.join(f'{x:.2f}' for x in times[False])}; "
              f"one per page {', '.join(f'{x:.2f}' for x in times[True])}")


if __name__ == "__main__":
    main()
