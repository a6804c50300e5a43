"""The query-id rule, checked between the input readers and the job's windows, for every format.

Outputs key results by query id: a TREC run ranks each query's lines 1, 2, ..., evaluators read
one ranking per query, and the writers re-rank runs of consecutive lines of one query. So:

- a query id's records form one contiguous run: flat pairs of one query are adjacent records
  (lines, rows), and a record holding documents (nested JSONL or Parquet, a BEIR query) is the
  only record with its query id in the input;
- a query id has one query text;
- a (query id, doc id) pair appears once (inside one record the readers already reject a
  repeated doc id).

A unit that breaks a rule becomes a `Reject` (`--on-error fail`: the error that stops the job)
whose reason names the query id and the earlier record; none of its pairs is scored or written,
so nothing is written twice. The reader's own rejects pass through, and a rejected unit does
not end the run of the query it interrupts.

The stage yields one item per item it reads, and each decision depends only on the items
before it, so a resumed job, which feeds the records it skips through the same stage, decides
exactly as the uninterrupted run did. It keeps one entry per query id (its first record) and
the doc ids of the current flat-pair run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator

from reranker.jobs.records import Reject, Unit


def _short(text: str, limit: int = 60) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def _raw(unit: Unit) -> str:
    """The unit's record, rebuilt as JSON, for the rejects file."""
    def doc(text) -> dict:  # an image document: as the input gave it
        return {"text": text} if isinstance(text, str) else text.as_json()

    if unit.pair:
        (doc_id, text), = unit.docs
        obj = {"query_id": unit.query_id, "query": unit.query, "doc_id": doc_id,
               **({"document": text} if isinstance(text, str) else text.as_json())}
    else:
        obj = {"query_id": unit.query_id, "query": unit.query, "documents": [{"id": d, **doc(t)} for d, t in unit.docs]}
    return json.dumps(obj, ensure_ascii=False)


def trec_problem(ident: str) -> str | None:
    """Why `ident` cannot stand in a TREC run (whose columns are separated by whitespace), or None."""
    return "is empty or holds whitespace, which a TREC run cannot carry" if not ident or any(c.isspace() for c in ident) \
        else None


def ids_a_trec_run_can_carry(items: Iterable[Unit | Reject]) -> Iterator[Unit | Reject]:
    """For a TREC output: a unit whose query id a run line cannot carry becomes a `Reject`, and so does each
    document whose doc id it cannot carry (the record's other documents are scored). Before `one_run_per_query`."""
    fix = "; write JSONL or Parquet, or fix the id"
    for item in items:
        if isinstance(item, Reject):
            yield item
            continue
        problem = trec_problem(item.query_id)
        if problem is not None:
            yield Reject(item.source, f"bad TREC id: query id {item.query_id!r} {problem}{fix}", _raw(item))
            continue
        bad = {i: p for i, (doc_id, _) in enumerate(item.docs) if (p := trec_problem(doc_id)) is not None}
        if not bad:
            yield item
            continue
        if item.pair:
            yield Reject(item.source, f"bad TREC id: doc id {item.docs[0][0]!r} {bad[0]}{fix}", _raw(item))
            continue
        for i, problem in bad.items():
            doc_id, text = item.docs[i]
            raw = json.dumps({"id": doc_id, **({"text": text} if isinstance(text, str) else text.as_json())}, ensure_ascii=False)
            yield Reject(item.source, f"bad TREC id: doc id {doc_id!r} {problem}{fix}", raw,
                         query_id=item.query_id, doc_index=item.position(i))
        keep = [i for i in range(len(item.docs)) if i not in bad]
        if keep:
            yield dataclasses.replace(item, docs=[item.docs[i] for i in keep], positions=[item.position(i) for i in keep])


def one_run_per_query(items: Iterable[Unit | Reject]) -> Iterator[Unit | Reject]:
    """Pass `items` through, turning each unit that breaks the query-id rule into a `Reject`.

    Accepted units are renumbered so their `index` stays dense.
    """
    first: dict[str, str] = {}  # query id -> source of its first record
    run_qid: str | None = None  # the flat-pair run going on, its query text and doc ids
    run_query = ""
    run_docs: dict[str, str] = {}
    index = 0
    for item in items:
        if isinstance(item, Reject):
            yield item
            continue
        qid, reason = item.query_id, None
        if item.pair and qid == run_qid:
            doc_id = item.docs[0][0]
            if item.query != run_query:
                reason = (f'different query text: query "{qid}" is {_short(run_query)} at {first[qid]}, '
                          f"here {_short(item.query)}; a query id has one text")
            elif doc_id in run_docs:
                reason = f'duplicate pair: query "{qid}" with doc "{doc_id}" is already at {run_docs[doc_id]}'
            else:
                run_docs[doc_id] = item.source
        elif qid in first:
            if item.pair:
                reason = (f'query id not contiguous: query "{qid}" had its pairs from {first[qid]} on, and other '
                          "records came since; a query's pairs must be adjacent records")
            else:
                reason = (f'duplicate query id: "{qid}" is already the query of {first[qid]}; one record must hold '
                          "all of a query's documents")
                if qid.isdigit():  # a record without one is given its record number: say so
                    reason += ' (a record without "query_id" is given its record number: give every record one, or none)'
        else:
            first[qid] = item.source
            run_qid, run_query = (qid, item.query) if item.pair else (None, "")
            run_docs = {item.docs[0][0]: item.source} if item.pair else {}
        if reason is not None:
            yield Reject(item.source, reason, _raw(item))
            continue
        opens = first[qid] == item.source
        yield item if item.index == index and opens else dataclasses.replace(item, index=index, opens_query=opens)
        index += 1
