"""The scorer as a Ray Data callable class: `Dataset.map_batches(RayReranker, ...)`, one `Reranker` per actor.

Each actor loads the model once (`prepare_model`: resolved and, for the fast path, copied once per
node under a node-wide file lock) and scores `pyarrow.Table` batches with the code of
`Reranker.score_documents` and the local job's windows: `engine.scoring` (`prepare`, then
`score_prepared`: sort by length, pack decode calls, run the torch head). A batch is scored as one
window; with `group_column` (the driver's `_window`) each run of equal values is scored as its own
window, so a batch holding the local job's windows gives its scores bit for bit.

    import ray
    from reranker.jobs.ray_data import RayReranker, actor_options

    ds = ray.data.read_parquet("pairs/")          # query_id, query, doc_id, document
    ds = ds.map_batches(RayReranker, fn_constructor_kwargs={"model": "model.gguf"},
                        batch_format="pyarrow", batch_size=2048, **actor_options(actors=2))
    ds.write_parquet("scored/")                   # the input columns plus score

Ray is an optional dependency (the `ray` extra); this module imports it
only inside `require_ray`, so importing it, like importing `reranker`, works without Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reranker.defaults import HEAD_FILE, IDENTITY_DTYPE
from reranker.errors import RerankerError
from reranker.extras import install_hint
from reranker.options import ImageRef
from reranker.settings import LoadSettings

COLUMNS = {"query_id": "query_id", "query": "query", "doc_id": "doc_id", "document": "document", "image": "image",
           "pdf": "pdf", "page": "page"}
NODE_LOCK = ".ray-node-setup.lock"


def require_ray(why: str = "--engine ray") -> Any:
    """The `ray` module with Ray Data, or a RerankerError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RerankerError(f"{why} needs Ray with Ray Data, which is not installed: {install_hint('ray')}") from e
    return ray


@contextlib.contextmanager
def node_lock(cache_dir: Path) -> Iterator[None]:
    """An exclusive `flock` on `cache_dir/.ray-node-setup.lock`: actors starting together on one node
    take turns, so the first makes the fast path's copy (or downloads) and the others find it done."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / NODE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock; the file stays, so every actor locks the same inode


def prepare_model(model: str, head: str | None = None, *, bf16: bool | None = None, n_gpu_layers: int = -1,
                  identity_dtype: str | None = None, fast: bool = True) -> tuple[str, str, bool]:
    """(GGUF path, head path, whether this call wrote the fast path's copy), once per node.

    Resolves `model` (a path on this node or a shared file system, or a Hub id through the Hub
    cache) and makes the fast path's identity copy in `$RERANKER_CACHE`, both under `node_lock`,
    so concurrent actors of one node resolve and copy once. `bf16`, `n_gpu_layers`, `identity_dtype`
    and `fast` are `from_pretrained`'s, so it then finds the very copy made here.
    """
    from reranker.engine.identity import default_cache_dir, fast_path_gguf
    from reranker.gguf.hub import resolve

    cache = default_cache_dir()
    with node_lock(cache):
        files = resolve(model)
        wrote = False
        if fast:
            before = {p.name for p in cache.glob("*.gguf")}
            copy = fast_path_gguf(files.gguf, identity_dtype or IDENTITY_DTYPE, bf16, n_gpu_layers)
            wrote = copy.parent == cache and copy.name not in before
    head_path = head or (str(files.head) if files.head else None)
    if head_path is None:
        raise RerankerError(f"no {HEAD_FILE} beside {files.gguf}; pass head='path/to/{HEAD_FILE}'")
    return str(files.gguf), head_path, wrote


class RayReranker:
    """A Ray Data callable class: `pyarrow.Table` batches in, the same columns plus `score` out.

    `model`/`head`: as `Reranker.from_pretrained` (resolved on each node); `load`: its other
    keyword arguments (`n_ctx`, `n_batch`, `n_threads`, `max_length`, `bf16`, ...); or all of them as
    one `settings=LoadSettings(...)`. On an actor without a GPU (`ray.get_gpu_ids()` empty) the
    backbone and head run on the CPU.
    `columns` renames the input columns (keys `query_id`, `query`, `doc_id`, `document`, `image`, `pdf`,
    `page`; only `query` and `document` are needed unless `rank`). A row whose `image` (if the column exists)
    is not null has an image document: a path (a string, read on the actor's node: give absolute paths)
    or the encoded bytes (binary), scored through the projector (`settings.mmproj`, else the
    `mmproj-*.gguf` beside the GGUF); its `document` may be null. A row whose `pdf` is not null has a PDF
    page as its document (the `pdf` extra): the file's path or bytes, as `image`, and its `page` (from 1;
    null or no `page` column: the file must have one page); a batch opens each PDF once for all its rows'
    pages. A bad image or PDF fails the batch with an error naming its row (the `reranker score --engine ray`
    driver rejects such documents before they are sent). `rank=True` adds `rank`, 1-based by
    descending score within each run of one query id in the batch (ties by row order): give it
    batches that hold whole queries (e.g. `ds.groupby(query_id).map_groups(...)`, or the driver's
    shards). `stats=True` adds `_tokens` (prompt length) and `_truncated`. `drop` removes
    columns from the output (e.g. the texts, so they do not travel back).
    """

    def __init__(self, model: str | None = None, head: str | None = None, *, load: Mapping[str, Any] | None = None,
                 settings: LoadSettings | None = None, columns: Mapping[str, str] | None = None, rank: bool = False,
                 group_column: str | None = None, stats: bool = False, drop: tuple[str, ...] = ()) -> None:
        from reranker.api import Reranker

        if settings is None:
            if model is None:
                raise RerankerError("RayReranker needs model= (with load={...}) or settings=LoadSettings(...)")
            settings = LoadSettings(model=model, head=head, **dict(load or {}))
        elif model is not None or head is not None or load:
            raise RerankerError("RayReranker takes settings=LoadSettings(...) or model=/head=/load=, not both")
        if not _has_gpu():
            settings = settings.replace(n_gpu_layers=0, device="cpu")
        gguf, head_path, _ = prepare_model(settings.model, settings.head, bf16=settings.bf16, n_gpu_layers=settings.n_gpu_layers,
                                           identity_dtype=settings.identity_dtype, fast=settings.fast)
        self.reranker = Reranker.from_settings(settings.replace(model=gguf, head=head_path, quant=None))
        self.builder = self.reranker.prompt_builder()
        self.columns = {**COLUMNS, **(columns or {})}
        self.rank, self.group_column, self.stats, self.drop = rank, group_column, stats, tuple(drop)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from reranker.engine.scoring import prepare, score_prepared
        from reranker.jobs.writers import rank_table

        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        c = self.columns
        has = set(table.column_names)
        needed = ("query",) if c["image"] in has or c["pdf"] in has else ("query", "document")  # images alone will do
        missing = [c[k] for k in needed if c[k] not in table.column_names]
        if missing:
            raise RerankerError(f"batch lacks the column(s) {', '.join(missing)} (columns: {', '.join(table.column_names)}); "
                                "pass columns={'query': ..., 'document': ...} to name yours")
        queries = table.column(c["query"]).to_pylist()
        documents = table.column(c["document"]).to_pylist() if c["document"] in table.column_names else [None] * table.num_rows
        images = table.column(c["image"]).to_pylist() if c["image"] in table.column_names else None
        if images is not None:  # an image row's document is its image
            documents = [doc if image is None else _image_side(image, i) for i, (doc, image) in enumerate(zip(documents, images))]
        if c["pdf"] in has:  # a PDF row's document is its page
            pages = table.column(c["page"]).to_pylist() if c["page"] in has else [None] * table.num_rows
            for i, (pdf, page) in enumerate(zip(table.column(c["pdf"]).to_pylist(), pages)):
                if pdf is not None:
                    if images is not None and images[i] is not None:
                        raise RerankerError(f"row {i} of the batch has both {c['image']!r} and {c['pdf']!r}; a row's document is one of them")
                    documents[i] = _pdf_side(pdf, page, i)
        for name, values in ((c["query"], queries), (c["document"], documents)):
            bad_row = next((i for i, v in enumerate(values) if not isinstance(v, (str, ImageRef))), None)
            if bad_row is not None:  # `reranker score --engine ray` rejects these before they reach an actor
                raise RerankerError(f"row {bad_row} of the batch: {name!r} is {values[bad_row]!r}, not a string; "
                                    "filter or fill such rows first (e.g. ds.filter(expr=...))")
        scores = np.empty(len(queries), dtype=np.float32)
        prompts = []
        for start, end in _runs(table.column(self.group_column).to_numpy() if self.group_column else None, len(queries)):
            prepared = prepare(self.builder, self._loaded(list(zip(queries[start:end], documents[start:end]))))
            scores[start:end] = score_prepared(self.reranker, prepared, pair_name=lambda i, s=start: f"row {s + i}").scores
            prompts += prepared.prompts
        out = table.append_column("score", pa.array(scores, pa.float32()))
        if self.rank:
            if c["query_id"] not in out.column_names:
                raise RerankerError(f"rank=True needs the query id column {c['query_id']!r}")
            keys = pa.table({"query_id": out.column(c["query_id"]), "score": out.column("score")})
            out = out.append_column("rank", rank_table(pa, keys).column("rank"))
        if self.stats:
            out = out.append_column("_tokens", pa.array([len(p.ids) for p in prompts], pa.int32()))
            out = out.append_column("_truncated", pa.array([p.truncated for p in prompts], pa.bool_()))
        return out.drop_columns([n for n in self.drop if n in out.column_names])

    def _loaded(self, pairs: list) -> list:
        """`pairs` with each image document read and sized (`engine.vision.load`), named by its row on error;
        a PDF page rendered first, each PDF opened once for the batch."""
        if not any(isinstance(d, ImageRef) for _, d in pairs):
            return pairs
        from reranker.engine.vision import load
        from reranker.images.pdf import PdfDocuments  # opens nothing until a PDF row asks

        sizing = self.reranker.vision.sizing  # no projector: its error, before any image is read
        with PdfDocuments() as pdfs:
            return [(q, load(_rendered(d, pdfs), sizing) if isinstance(d, ImageRef) else d) for q, d in pairs]

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.reranker.close()


def _image_side(value: object, row: int) -> ImageRef:
    """An `image` cell as a document: a path or encoded bytes."""
    if not isinstance(value, (str, bytes, bytearray)):
        raise RerankerError(f"row {row} of the batch: 'image' is {type(value).__name__}, not a path (string) or encoded bytes")
    return ImageRef(bytes(value) if isinstance(value, bytearray) else value, f"row {row} image")


@dataclass(frozen=True)
class _PdfRow:
    """A row's PDF page: `source` a path or the file's bytes, `page` from 1 (None: the file's only page)."""

    source: str | bytes
    page: int | None


def _pdf_side(value: object, page: object, row: int) -> ImageRef:
    """A `pdf` cell (and its `page`) as a document, rendered when the batch's images are loaded."""
    from reranker.extras import require

    require("pdf", f"row {row} of the batch (a PDF)")
    if not isinstance(value, (str, bytes, bytearray)) or not value:
        raise RerankerError(f"row {row} of the batch: 'pdf' is {'empty' if isinstance(value, (str, bytes, bytearray)) else type(value).__name__}, "
                            "not a path (string) or the PDF file's bytes")
    if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
        raise RerankerError(f"row {row} of the batch: 'page' is {page!r}; a page is an integer >= 1 (pages count from 1; "
                            "a float column, as pandas makes of integers with nulls, needs a cast to int64)")
    from reranker.images.pdf import source_name

    source = bytes(value) if isinstance(value, bytearray) else value
    return ImageRef(_PdfRow(source, page), f"row {row} PDF {source_name(source)}" + (f"#{page}" if page is not None else ""))


def _rendered(ref: ImageRef, pdfs: Any) -> ImageRef:
    """`ref` as the image `engine.vision.load` takes: a PDF row's page rendered from `pdfs`, else `ref` itself."""
    if not isinstance(ref.source, _PdfRow):
        return ref
    row = ref.source
    page = row.page
    if page is None:  # one row, one score: a file of several pages needs its page named
        n = pdfs.page_count(row.source, ref.name)
        if n != 1:
            raise RerankerError(f"{ref.name} has {n} pages and the row gives no page; give it in a 'page' column (pages "
                                "count from 1), one row per page")
        page = 1
    return ImageRef(pdfs.render(row.source, page, ref.name), ref.name)


def _has_gpu() -> bool:
    """Whether Ray gave this actor a GPU; False outside Ray (where `get_gpu_ids` would start a cluster)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return bool(ray.get_gpu_ids())


def _runs(groups: np.ndarray | None, n: int) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values in `groups` (None: one run of all `n` rows)."""
    if groups is None or n == 0:
        return [(0, n)] if n else []
    cuts = np.flatnonzero(groups[1:] != groups[:-1]) + 1
    bounds = [0, *cuts.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:]))


def actor_options(actors: int = 1, *, gpus: bool | None = None, cpus_per_actor: float = 1.0,
                  max_task_retries: int = 3) -> dict[str, Any]:
    """`map_batches` keyword arguments for a fixed pool of `actors`, each one `Reranker`.

    `gpus=None`: one GPU per actor when the cluster has GPUs, else CPU actors. A killed actor is
    restarted (`max_restarts=-1`) and its batch retried up to `max_task_retries` times, so a
    batch that crashes its actor every time fails the job instead of looping (Ray Data's own
    default retries forever). Ray 2.60 deprecates passing these as `**ray_remote_args` without
    naming a replacement; `map_batches_quietly` passes them without the warning.
    """
    ray = require_ray("Ray Data scoring")
    if actors < 1:
        raise RerankerError(f"--actors {actors}: run at least 1 actor")
    if gpus is None:
        gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return {"compute": ray.data.ActorPoolStrategy(size=actors), "num_gpus": 1 if gpus else 0,
            "num_cpus": cpus_per_actor, "max_restarts": -1, "max_task_retries": max_task_retries}


def map_batches_quietly(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """`ds.map_batches(fn, **kwargs)` without Ray's deprecation warning for `max_restarts`/`max_task_retries`."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs)
