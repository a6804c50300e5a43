"""One backbone process per device, fed windows from the job, results returned in order."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

from reranker.errors import RerankerError
from reranker.settings import LoadSettings

if TYPE_CHECKING:  # the engine (llama.cpp) loads in the device processes only
    from reranker.engine.scoring import ScoredDocuments


def parse_devices(spec: str | None) -> list[str]:
    """`0,1` (GPU indices), `all` (every visible GPU), or `cpu,cpu` (CPU processes, for testing)."""
    if not spec:
        return []
    if spec == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise RerankerError("--devices all: torch sees no CUDA device; give GPU indices or 'cpu,cpu'")
        return [str(i) for i in range(n)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        if d != "cpu" and not d.isdigit():
            raise RerankerError(f"--devices {spec!r}: {d!r} is neither a GPU index nor 'cpu'")
        if d != "cpu":
            visible_gpu(d, os.environ.get("CUDA_VISIBLE_DEVICES"))  # an index past the job's own mask fails here
    return devices


def visible_gpu(index: str, mask: str | None) -> str:
    """The `CUDA_VISIBLE_DEVICES` entry of GPU `index` as this job sees its GPUs: `mask`'s entry `index` when the job
    runs under a mask (a scheduler's, a shared box's), so a device process never takes a GPU the job was not given."""
    if not mask or not mask.strip():
        return index
    visible = [d.strip() for d in mask.split(",") if d.strip()]
    if int(index) >= len(visible):
        raise RerankerError(f"--devices: GPU {index} is not among the {len(visible)} this job may use "
                            f"(CUDA_VISIBLE_DEVICES={mask}); give indices 0 to {len(visible) - 1}")
    return visible[int(index)]


def _worker(device: str, settings: LoadSettings, inbox: mp.Queue, outbox: mp.Queue, keep_hidden: bool = False) -> None:
    # Ctrl-C is the job's to handle: it stops feeding windows and closes the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Pin the GPU before llama.cpp or torch initialise CUDA in this process.
    if device != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpu(device, os.environ.get("CUDA_VISIBLE_DEVICES"))
    from reranker.api import Reranker
    from reranker.engine.scoring import score_prepared

    try:
        on_device = {"n_gpu_layers": 0, "device": "cpu"} if device == "cpu" else {"device": "cuda"}
        reranker = Reranker.from_settings(settings.replace(**on_device))
    except BaseException as e:
        outbox.put((-1, None, f"device {device}: {type(e).__name__}: {e}"))
        return
    parent = os.getppid()
    while True:
        try:
            msg = inbox.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:  # the job was killed (SIGKILL leaves daemon children behind)
                break
            continue
        if msg is None:
            break
        wid, prepared = msg
        try:
            outbox.put((wid, score_prepared(reranker, prepared, keep_hidden=keep_hidden), None))
        except BaseException as e:
            outbox.put((wid, None, f"device {device}: {type(e).__name__}: {e}"))
    reranker.close()


class DevicePool:
    """Scores windows on several processes; any free process takes the next window."""

    def __init__(self, devices: list[str], settings: LoadSettings, keep_hidden: bool = False) -> None:
        """Each process loads `settings` on its device; `keep_hidden`: each window's result has its pairs' hidden states."""
        ctx = mp.get_context("spawn")
        self.inbox: mp.Queue = ctx.Queue()
        self.outbox: mp.Queue = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(d, settings, self.inbox, self.outbox, keep_hidden), daemon=True,
                                  name=f"reranker-device-{d}") for d in devices]
        for p in self.procs:
            p.start()

    def __call__(self, windows: Iterator) -> Iterator[tuple[object, ScoredDocuments]]:
        pending: dict[int, object] = {}
        ready: dict[int, ScoredDocuments] = {}
        next_out = 0
        max_in_flight = 2 * len(self.procs)
        it = enumerate(windows)
        exhausted = False
        while True:
            while not exhausted and len(pending) < max_in_flight:
                try:
                    wid, window = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[wid] = window
                self.inbox.put((wid, window.prepared))
            if not pending:
                return
            wid, scored, error = self._get()
            if error:
                raise RerankerError(error)
            ready[wid] = scored
            while next_out in ready:
                yield pending.pop(next_out), ready.pop(next_out)
                next_out += 1

    def _get(self):
        while True:
            try:
                return self.outbox.get(timeout=1.0)
            except queue.Empty:  # check the processes are alive
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise RerankerError(f"device process(es) {', '.join(dead)} died; see the log above") from None

    def close(self) -> None:
        for _ in self.procs:
            self.inbox.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
