"""Progress of a long job: a tqdm bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("reranker.jobs")


class Progress:
    """Counts input records (the bar's unit, for the ETA), pairs and tokens, with their rates."""

    def __init__(self, total: int | None = None, initial: int = 0, quiet: bool = False, interval: float = 30.0) -> None:
        self.total, self.done = total, initial
        self.pairs = self.tokens = 0
        self.start = self._last_log = time.perf_counter()
        self.interval = interval
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="rec", desc="Scoring", dynamic_ncols=True, file=sys.stderr)

    def update(self, records: int, pairs: int, tokens: int) -> None:
        self.done += records
        self.pairs += pairs
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.pairs / elapsed:,.1f} pairs/s, {self.tokens / elapsed:,.0f} tok/s", refresh=False)
            self.bar.update(records)
        elif not self.quiet and time.perf_counter() - self._last_log >= self.interval:
            self._last_log = time.perf_counter()
            of = f"/{self.total}" if self.total else ""
            log.info("scored %d%s records, %d pairs (%.1f pairs/s, %.0f tokens/s)", self.done, of, self.pairs,
                        self.pairs / elapsed, self.tokens / elapsed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def count_records(path, input_format: str) -> int | None:
    """Records in the input when cheap to know (lines of a JSONL, rows of a Parquet), for the ETA.

    None when not: the count only feeds the bar, so an unreadable file is the reader's to report.
    """
    try:
        if input_format in ("jsonl", "pairs-jsonl"):
            n = 0
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    n += block.count(b"\n")
            return n
        if input_format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # pyarrow raises its own types (ArrowInvalid for a file that is not Parquet)
        pass
    return None
