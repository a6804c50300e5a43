"""Evaluation sets of `reranker bench-quant`: BEIR folders, labelled JSONL pairs, synthetic pairs.

Every set is a list of queries, each with its candidate documents, plus relevance
judgements when the input has them. The same set is scored by every quantization level.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from reranker.errors import RerankerError
from reranker.jobs.readers import read_input
from reranker.jobs.records import Reject, Unit

log = logging.getLogger(__name__)

#: Run files a BEIR folder may hold, as `readers.read_input` looks for them.
RUN_NAMES = ("run.trec", "run.txt", "*.run")
SYNTHETIC_DOCS_PER_QUERY = 16
_WORDS = ("rerank model query document relevance vector index search retrieval token score neural ranking "
          "text code image quantization latency memory throughput 检索 排序 模型 café naïve").split()


@dataclass
class Query:
    """One query and its candidates, `(doc_id, text)` in input order."""

    query_id: str
    text: str
    docs: list[tuple[str, str]]


@dataclass
class EvalSet:
    """What every level scores: queries with candidates, and qrels (`{qid: {doc_id: grade}}`) or None."""

    kind: str  # "beir", "pairs-jsonl" or "synthetic"
    source: str
    queries: list[Query]
    qrels: dict[str, dict[str, int]] | None = None
    notes: list[str] = field(default_factory=list)

    def pairs(self) -> list[list[str]]:
        """`[query, document]` for every candidate, query by query."""
        return [[q.text, text] for q in self.queries for _, text in q.docs]

    def groups(self) -> list[int]:
        """Number of candidates of each query, in order (slices `pairs()`)."""
        return [len(q.docs) for q in self.queries]

    def summary(self) -> dict:
        """Sizes and provenance, for the report."""
        judged = None if self.qrels is None else sum(len(v) for v in self.qrels.values())
        return {"kind": self.kind, "source": self.source, "queries": len(self.queries),
                "pairs": sum(self.groups()), "judgements": judged, "notes": list(self.notes)}


def synthetic_set(n_pairs: int, seed: int = 0, docs_per_query: int = SYNTHETIC_DOCS_PER_QUERY) -> EvalSet:
    """`n_pairs` random pairs (fixed seed), in queries of `docs_per_query`; no judgements."""
    if n_pairs < 1:
        raise RerankerError(f"--synthetic {n_pairs}: give at least 1 pair")
    rng = random.Random(seed)
    queries = []
    for start in range(0, n_pairs, docs_per_query):
        qid = f"q{len(queries)}"
        text = " ".join(rng.choices(_WORDS, k=rng.randint(4, 12)))
        # 40-200 words: document lengths like short web passages, so tokens/s is not all overhead.
        docs = [(f"{qid}-d{i}", " ".join(rng.choices(_WORDS, k=rng.randint(40, 200))))
                for i in range(min(docs_per_query, n_pairs - start))]
        queries.append(Query(qid, text, docs))
    return EvalSet("synthetic", f"synthetic:{n_pairs}:seed={seed}", queries)


#: Sizes (width, height) of synthetic images, cycled: small to above max_pixels, portrait, landscape, a strip.
SYNTHETIC_IMAGE_SIZES = ((448, 336), (336, 560), (1024, 768), (224, 224), (896, 224))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _image_queries(docs: list[tuple[str, dict]], seed: int, docs_per_query: int, kind: str, source: str) -> EvalSet:
    """Image documents in queries of `docs_per_query`, each query random words (seeded): speed and drift only."""
    rng = random.Random(seed)
    queries = []
    for start in range(0, len(docs), docs_per_query):
        qid = f"q{len(queries)}"
        queries.append(Query(qid, " ".join(rng.choices(_WORDS, k=rng.randint(4, 12))), docs[start : start + docs_per_query]))
    return EvalSet(kind, source, queries)


def synthetic_image_set(n_images: int, folder: str | os.PathLike, seed: int = 0,
                        docs_per_query: int = SYNTHETIC_DOCS_PER_QUERY) -> EvalSet:
    """`n_images` seeded pictures (gradients and noise, of `SYNTHETIC_IMAGE_SIZES` in turn) written as PNGs into
    `folder`, as `{"image": path}` documents in queries of `docs_per_query`; no judgements."""
    import numpy as np
    from PIL import Image

    if n_images < 1:
        raise RerankerError(f"--synthetic-images {n_images}: give at least 1 image")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_images):
        w, h = SYNTHETIC_IMAGE_SIZES[i % len(SYNTHETIC_IMAGE_SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        a, b, c = rng.uniform(0.2, 3.0, size=3)
        base = np.stack([np.sin(xx / w * a * 6), np.cos(yy / h * b * 6), np.sin((xx + yy) / (w + h) * c * 6)], -1)
        pixels = np.clip((base + 1) * 110 + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        path = out / f"image-{i:05d}.png"
        Image.fromarray(pixels, "RGB").save(path)
        docs.append((path.stem, {"image": str(path.resolve())}))
    return _image_queries(docs, seed, docs_per_query, "synthetic-images", f"synthetic-images:{n_images}:seed={seed}")


def image_folder_set(folder: str | os.PathLike, seed: int = 0, docs_per_query: int = SYNTHETIC_DOCS_PER_QUERY) -> EvalSet:
    """The images of `folder` (by suffix, sorted by name; not its subfolders) as `{"image": path}` documents, in queries
    of `docs_per_query` with random queries (seeded); no judgements."""
    root = Path(folder)
    if not root.is_dir():
        raise RerankerError(f"image folder not found: {root}; give a folder of image files ({', '.join(IMAGE_SUFFIXES)})")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RerankerError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    docs = [(p.name, {"image": str(p.resolve())}) for p in files]
    return _image_queries(docs, seed, docs_per_query, "images", str(root))


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """BEIR `query-id corpus-id score` (TSV, header optional) or TREC `qid 0 docid rel` qrels."""
    p = Path(path)
    if not p.is_file():
        raise RerankerError(f"qrels file not found: {p}; give BEIR qrels/<split>.tsv or a TREC qrels file")
    qrels: dict[str, dict[str, int]] = {}
    with open(p, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (3, 4):
                raise RerankerError(f"{p}:{n}: expected `query-id corpus-id score` or `qid 0 docid rel`, got {len(parts)} fields")
            qid, doc_id, grade = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (parts[0], parts[2], parts[3])
            try:
                value = int(float(grade)) if float(grade).is_integer() else None
            except ValueError:
                if n == 1:  # BEIR's header line
                    continue
                value = None
            if value is None:
                raise RerankerError(f"{p}:{n}: relevance {grade!r} is not an integer grade")
            qrels.setdefault(qid, {})[doc_id] = value
    if not qrels:
        raise RerankerError(f"{p} holds no judgements")
    return qrels


def find_run(folder: Path) -> Path | None:
    """The first-stage run in a BEIR folder, None when there is none; several is an error."""
    found = [p for pattern in RUN_NAMES for p in sorted(folder.glob(pattern)) if p.is_file()]
    if len(found) > 1:
        raise RerankerError(f"several run files in {folder}: {', '.join(p.name for p in found)}; pass the one to rerank with --run")
    return found[0] if found else None


def beir_set(folder: str | os.PathLike, *, split: str = "test", qrels: str | os.PathLike | None = None,
             run: str | os.PathLike | None = None, depth: int = 100, negatives: int = 20, seed: int = 0,
             max_queries: int | None = None, work_dir: str | os.PathLike | None = None) -> EvalSet:
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv, optional run) as an evaluation set.

    With a run (`run.trec`, `run.txt` or `*.run` in the folder, or `run`), each judged query's
    top `depth` candidates are reranked. Without one, the candidates of each judged query are
    all its judged documents plus `negatives` random unjudged corpus documents (seeded), written
    as a run file into `work_dir`; metrics then compare the levels with each other, not with
    published BEIR numbers (Recall@100 is 1 whenever a query has at most 100 candidates).
    """
    root = Path(folder)
    if not root.is_dir():
        raise RerankerError(f"BEIR folder not found: {root}; give a folder with corpus.jsonl, queries.jsonl and qrels/{split}.tsv")
    judgements = read_qrels(qrels if qrels is not None else root / "qrels" / f"{split}.tsv")
    wanted = list(judgements)[:max_queries] if max_queries else list(judgements)
    run_path = Path(run) if run is not None else find_run(root)
    notes = []
    if run_path is None:
        if work_dir is None:
            raise RerankerError(f"{root} has no first-stage run; pass a work folder for the sampled candidates or a --run")
        run_path = _sampled_run(root / "corpus.jsonl", judgements, wanted, negatives, seed, Path(work_dir))
        depth = max(len(judgements[q]) for q in wanted) + negatives
        notes.append(f"no first-stage run: candidates are each query's judged documents plus {negatives} random "
                     f"corpus documents (seed {seed})")
    else:
        notes.append(f"candidates: top {depth} of {run_path.name} per judged query")
    keep = set(wanted)
    queries = [Query(u.query_id, u.query, u.docs)
               for u in _units(read_input(root, "beir", depth=depth, run=run_path), str(root)) if u.query_id in keep]
    if not queries:
        raise RerankerError(f"no judged query of {root} has candidates in {run_path}: do the qrels and the run use the same query ids?")
    scored = {q.query_id for q in queries}
    unscored = [q for q in wanted if q not in scored]
    if unscored:  # they stay in the qrels: a judged query the first stage found nothing for counts 0, as in trec_eval -c
        notes.append(f"{len(unscored)} of {len(wanted)} judged queries have no candidates in {run_path.name} "
                     f"(first: {unscored[0]!r}); they count 0 in nDCG, MRR and recall")
    return EvalSet("beir", str(root), queries, {q: judgements[q] for q in wanted}, notes)


def pairs_jsonl_set(path: str | os.PathLike) -> EvalSet:
    """Flat JSONL pairs `{"query_id", "query", "doc_id", "document", "label"}`, grouped by query id.

    `label` is an integer relevance grade (true/false count as 1/0); pairs without one are
    unjudged. With no label at all the set has no qrels, so only speed and fidelity are measured.
    """
    p = Path(path)
    labels = _labels(p)
    queries: dict[str, Query] = {}
    qrels: dict[str, dict[str, int]] = {}
    for unit in _units(read_input(p, "pairs-jsonl"), str(p)):
        (doc_id, text), = unit.docs
        q = queries.setdefault(unit.query_id, Query(unit.query_id, unit.query, []))
        if q.text != unit.query:  # scoring it against the first text would be silently wrong
            raise RerankerError(f'{unit.source}: query "{unit.query_id}" has another text here than in its first pair '
                                f"({_short(q.text)} then {_short(unit.query)}); give each query text its own query_id")
        if any(d == doc_id for d, _ in q.docs):
            raise RerankerError(f'{unit.source}: duplicate pair: doc "{doc_id}" is already a candidate of query "{unit.query_id}"')
        q.docs.append((doc_id, text))
        label = labels.get(int(unit.source.rsplit(":", 1)[1]))
        if label is not None:
            qrels.setdefault(unit.query_id, {})[doc_id] = label
    if not queries:
        raise RerankerError(f"{p} holds no valid pairs")
    return EvalSet("pairs-jsonl", str(p), list(queries.values()), qrels or None)


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _units(items, where: str) -> list[Unit]:
    units, rejects = [], []
    for item in items:
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        if not all(isinstance(t, str) for t in [item.query, *(d for _, d in item.docs)]):
            # Backbone levels are scored without a vision projector; image sets are the projector levels'.
            raise RerankerError(f"{item.source}: an image or PDF query or document; bench-quant measures backbone levels "
                                "on text pairs. Measure on a text set, and the vision projector's levels on images "
                                "with --mmproj FILE (or --mmproj-checkpoint DIR) and --images DIR")
        units.append(item)
    if rejects:  # the benchmark needs every level to see the same set, so bad records are left out, loudly
        log.warning("%s: %d records skipped; the first: %s: %s", where, len(rejects), rejects[0].source, rejects[0].reason)
    return units


def _labels(path: Path) -> dict[int, int]:
    """Line number -> label, numbered as `readers` numbers lines (1-based, blank lines counted)."""
    labels: dict[int, int] = {}
    if not path.is_file():
        raise RerankerError(f"input file not found: {path}")
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                obj = json.loads(line.removeprefix(b"\xef\xbb\xbf"))
            except ValueError:
                continue  # the reader rejects it with the reason
            label = obj.get("label") if isinstance(obj, dict) else None
            if label is None:
                continue
            if isinstance(label, bool) or (isinstance(label, float) and label.is_integer()):
                label = int(label)
            if not isinstance(label, int):
                raise RerankerError(f'{path}:{n}: "label" must be an integer relevance grade, got {label!r}')
            labels[n] = label
    return labels


def _sampled_run(corpus: Path, qrels: dict[str, dict[str, int]], qids: list[str], negatives: int, seed: int,
                 work_dir: Path) -> Path:
    if not corpus.is_file():
        raise RerankerError(f"BEIR corpus.jsonl not found: {corpus}")
    ids: list[str] = []
    with open(corpus, "rb") as f:
        for line in f:
            try:
                obj = json.loads(line.removeprefix(b"\xef\xbb\xbf"))
            except ValueError:
                continue  # rejected with its reason when the candidates are read
            if isinstance(obj, dict) and isinstance(obj.get("_id"), (str, int)):
                ids.append(str(obj["_id"]))
    rng = random.Random(seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / "sampled-candidates.run"
    with open(out, "w", encoding="utf-8") as f:
        for qid in qids:
            judged = set(qrels[qid])
            pool = [d for d in rng.sample(ids, min(len(ids), negatives + len(judged))) if d not in judged][:negatives]
            docs = sorted(judged) + pool
            rng.shuffle(docs)  # no order leaks from the run into ties
            for rank, doc_id in enumerate(docs, 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {len(docs) - rank} sampled\n")
    return out
