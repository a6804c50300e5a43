"""Input readers and output writers of the scoring job, on small real files."""

from __future__ import annotations

import json
import math
import re
import sys
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reranker.errors import RerankerError
from reranker.extras import install_hint
from reranker.jobs import writers
from reranker.jobs.readers import read_input
from reranker.jobs.records import Reject, Unit
from reranker.jobs.writers import RejectsWriter, open_writer


def write_lines(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def split(items):
    items = list(items)
    units = [x for x in items if isinstance(x, Unit)]
    rejects = [x for x in items if isinstance(x, Reject)]
    return units, rejects


# --- readers ----------------------------------------------------------------------------------


def test_nested_jsonl_strings_and_objects(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"query": "what is a reranker?", "documents": ["A reranker scores.", "Bananas."]}),
        "",
        json.dumps({"query_id": "q7", "query": "机器学习", "documents": [{"id": "a", "text": "学习"}, {"text": "no id"}, {"id": 12, "text": "int id"}]}),
        "   ",
        json.dumps({"query_id": 3, "query": "", "documents": ["empty query is fine"]}),
    ])
    units, rejects = split(read_input(path))
    assert rejects == []
    assert units == [
        Unit(0, "0", "what is a reranker?", [("0", "A reranker scores."), ("1", "Bananas.")], f"{path}:1"),
        Unit(1, "q7", "机器学习", [("a", "学习"), ("1", "no id"), ("12", "int id")], f"{path}:3"),
        Unit(2, "3", "", [("0", "empty query is fine")], f"{path}:5"),
    ]


def test_flat_pairs_jsonl_one_unit_per_pair(tmp_path):
    rows = [{"query_id": "q1", "query": "Q one", "doc_id": f"d{i}", "document": f"doc {i}"} for i in range(3)]
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(r) for r in rows])
    expected = [Unit(i, "q1", "Q one", [(f"d{i}", f"doc {i}")], f"{path}:{i + 1}") for i in range(3)]
    assert list(read_input(path)) == expected
    assert list(read_input(path, "pairs-jsonl")) == expected
    other = write_lines(tmp_path / "pairs.txt", [json.dumps(r) for r in rows])
    assert [u.docs for u in read_input(other, "jsonl")] == [u.docs for u in expected]


def test_parquet_nested_and_flat(tmp_path):
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"query_id": ["q1", None], "query": ["first", "second"],
                             "documents": [["a", "b"], ["c", "   "]]}), nested)
    assert list(read_input(nested)) == [  # a blank document is scored like any other
        Unit(0, "q1", "first", [("0", "a"), ("1", "b")], f"{nested}:row 0"),
        Unit(1, "1", "second", [("0", "c"), ("1", "   ")], f"{nested}:row 1"),
    ]

    objects = tmp_path / "objects.pq"
    docs = pa.array([[{"id": "x", "text": "ex"}, {"id": "y", "text": "why"}]],
                    pa.list_(pa.struct([("id", pa.string()), ("text", pa.string())])))
    pq.write_table(pa.table({"query": ["q"], "documents": docs}), objects)
    assert list(read_input(objects)) == [Unit(0, "0", "q", [("x", "ex"), ("y", "why")], f"{objects}:row 0")]

    flat = tmp_path / "flat.data"
    pq.write_table(pa.table({"query_id": ["q1", "q1", "q2"], "query": ["a", "a", "b"], "doc_id": ["d1", "d2", "d3"],
                             "document": ["one", "two", "three"], "extra": [1, 2, 3]}), flat)
    assert list(read_input(flat, "parquet")) == [
        Unit(0, "q1", "a", [("d1", "one")], f"{flat}:row 0"),
        Unit(1, "q1", "a", [("d2", "two")], f"{flat}:row 1"),
        Unit(2, "q2", "b", [("d3", "three")], f"{flat}:row 2"),
    ]


def test_parquet_without_the_columns_or_pyarrow(tmp_path, monkeypatch):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"q": ["x"]}), bad)
    with pytest.raises(RerankerError, match="missing query_id, query, doc_id, document"):
        read_input(bad)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(RerankerError, match=re.escape(f"needs pyarrow, which is not installed: {install_hint('parquet')}")):
        read_input(bad)  # the hint for this install (tests/cli/test_extras.py checks it follows the install)


def beir_folder(tmp_path):
    folder = tmp_path / "beir"
    folder.mkdir()
    write_lines(folder / "corpus.jsonl", [json.dumps(d) for d in [
        {"_id": "d1", "title": "Title One", "text": "text one"},
        {"_id": "d2", "title": "", "text": "text two"},
        {"_id": "d3", "text": "text three"},
        {"_id": "d4", "title": "T4", "text": "text four"},
        {"_id": "d5", "title": "T5", "text": "never a candidate"},
    ]])
    write_lines(folder / "queries.jsonl", [json.dumps(q) for q in [
        {"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "unused"},
    ]])
    write_lines(folder / "run.trec", [
        "q2 Q0 d1 1 9.0 bm25",
        "q1 Q0 d2 1 5.0 bm25",
        "q2 Q0 d3 2 8.0 bm25",
        "q1 Q0 d1 2 7.0 bm25",  # listed after d2 with a higher score
        "q1 Q0 d3 3 5.0 bm25",  # ties with d2, which the run lists first
        "q2 Q0 d4 3 1.0 bm25",  # cut by depth 3
        "q1 Q0 d4 4 1.0 bm25",  # cut by depth 3
        "q2 Q0 d9 4 2.0 bm25",  # kept, but not in the corpus
    ])
    return folder


def test_beir_interleaved_run_depth_and_titles(tmp_path):
    folder = beir_folder(tmp_path)
    run = folder / "run.trec"
    units, rejects = split(read_input(folder, depth=3))
    assert units == [
        Unit(0, "q2", "second", [("d1", "Title One text one"), ("d3", "text three")], f"{run}:1"),
        Unit(1, "q1", "first", [("d1", "Title One text one"), ("d2", "text two"), ("d3", "text three")], f"{run}:2"),
    ]
    assert rejects == [Reject(f"{run}:8", f'unknown doc id: "d9" is not in {folder / "corpus.jsonl"}', "q2 Q0 d9 4 2.0 bm25")]
    # The run file itself, or explicit paths, name the same input.
    assert split(read_input(run, depth=3)) == (units, rejects)
    other = tmp_path / "bm25.run"
    other.write_bytes(run.read_bytes())
    got = split(read_input(None, queries=folder / "queries.jsonl", corpus=folder / "corpus.jsonl", run=other, depth=1))
    assert [(u.query_id, [d for d, _ in u.docs]) for u in got[0]] == [("q2", ["d1"]), ("q1", ["d1"])]


def test_beir_unknown_query_and_bad_corpus_lines(tmp_path):
    folder = beir_folder(tmp_path)
    with open(folder / "run.trec", "ab") as f:
        f.write(b"q4 Q0 d1 1 1.0 bm25\nq1 Q0 d5 9 0.5\n")
    with open(folder / "corpus.jsonl", "ab") as f:
        f.write(b'{"_id": "d1", "text": "duplicate"}\n{"_id": "d6", "text": \n')
    units, rejects = split(read_input(folder, depth=3))
    assert [u.query_id for u in units] == ["q2", "q1"]
    got = [(r.source.rsplit("/", 1)[1], r.reason.split(":")[0]) for r in rejects]
    assert got == [  # the run, queries and corpus are read first; then candidates, query by query
        ("run.trec:10", "malformed run line"),
        ("corpus.jsonl:6", "duplicate id"),
        ("corpus.jsonl:7", "malformed JSON"),
        ("run.trec:8", "unknown doc id"),
        ("run.trec:9", "unknown query id"),
    ]


def test_bad_records_are_rejected_with_line_and_reason(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        json.dumps({"query": "ok", "documents": ["fine"]}),  # 1
        '{"query": "q", "documents": [',  # 2
        json.dumps({"documents": ["x"]}),  # 3
        json.dumps({"query": 5, "documents": ["x"]}),  # 4
        b'{"query": "caf\xe9", "documents": ["x"]}',  # 5: Latin-1, not UTF-8
        json.dumps({"query": "q", "documents": ["ok", " \t\n"]}),  # 6
        json.dumps({"query": "q", "documents": []}),  # 7
        "",  # 8: blank, skipped
        json.dumps({"query": "q", "documents": [{"id": "a", "text": None}]}),  # 9
        "[1, 2]",  # 10
        json.dumps({"query": "q", "documents": [{"id": 1.5, "text": "x"}]}),  # 11
        '{"query": "\\ud800", "documents": ["x"]}',  # 12: a lone surrogate
        json.dumps({"query": "q", "documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}),  # 13
        json.dumps({"query": "", "documents": ["last"]}),  # 14
    ])
    units, rejects = split(read_input(path))
    # Blank documents (6) are scored; a bad document (9, 11, 13) is rejected alone, its record keeps the rest.
    assert [(u.index, u.query_id, u.source, u.docs, u.positions) for u in units] == [
        (0, "0", f"{path}:1", [("0", "fine")], None), (1, "5", f"{path}:6", [("0", "ok"), ("1", " \t\n")], None),
        (2, "11", f"{path}:13", [("a", "x")], [0]), (3, "12", f"{path}:14", [("0", "last")], None),
    ]
    assert [(r.source, r.reason.split(":")[0]) for r in rejects] == [(f"{path}:{n}", kind) for n, kind in [
        (2, "malformed JSON"), (3, 'missing field "query"'), (4, "non-string text"), (5, "invalid UTF-8"),
        (7, "empty documents list"), (9, "non-string text"), (10, "not a JSON object"),
        (11, "bad id"), (12, "invalid UTF-8"), (13, "duplicate doc id"),
    ]]
    assert [(r.query_id, r.doc_index) for r in rejects] == [(None, None)] * 5 + [("7", 0), (None, None), ("9", 0), (None, None), ("11", 1)]
    assert rejects[0].raw == '{"query": "q", "documents": ['
    assert rejects[3].raw == '{"query": "caf\\xe9", "documents": ["x"]}'
    assert "byte 15" in rejects[3].reason
    assert rejects[5] == Reject(f"{path}:9", 'non-string text: "documents[0].text" is null (query \'7\', document 0)',
                                '{"id": "a", "text": null}', query_id="7", doc_index=0)
    assert rejects[7].reason == 'bad id: "documents[0].id" must be a string or an integer, got a number (query \'9\', document 0)'
    assert rejects[9].reason == 'duplicate doc id: "a" in documents[0] and documents[1] (query \'11\', document 1)'

    flat = write_lines(tmp_path / "bad_pairs.jsonl", [
        json.dumps({"query_id": "q", "query": "a", "doc_id": "d1", "document": "one"}),
        json.dumps({"query_id": "q", "query": "a", "document": "two"}),
        json.dumps({"query_id": "q", "query": "a", "doc_id": "d3", "document": ""}),
        json.dumps({"query_id": "q", "query": "a", "doc_id": "d4", "document": ["x"]}),
    ])
    units, rejects = split(read_input(flat))
    assert [(u.index, u.docs, u.source) for u in units] == [(0, [("d1", "one")], f"{flat}:1"), (1, [("d3", "")], f"{flat}:3")]
    assert [(r.source, r.reason, r.query_id, r.doc_index) for r in rejects] == [
        (f"{flat}:2", 'missing field "doc_id"', None, None),
        (f"{flat}:4", 'non-string text: "document" is an array', None, None),
    ]


def test_nested_jsonl_rejects_bad_documents_one_by_one(tmp_path):
    path = write_lines(tmp_path / "docs.jsonl", [
        json.dumps({"query_id": "q1", "query": "Q", "documents": [
            "good",  # 0
            "",  # 1: empty, scored
            {"id": "x", "text": 5},  # 2: non-string text
            {"id": "w", "text": "  "},  # 3: blank, scored
            {"id": "y"},  # 4: no text
            {"id": True, "text": "t"},  # 5: bad id
            {"id": "w", "text": "again"},  # 6: duplicate of 3
            {"id": " ", "text": "t"},  # 7: blank id
            ["a list"],  # 8: not a string or an object
            {"text": "no id"},  # 9: id "9"
        ]}),
        json.dumps({"query_id": "q2", "query": "all bad", "documents": [None, {"text": ["x"]}]}),
        json.dumps({"query_id": "q3", "query": "empty list", "documents": []}),
        json.dumps({"query": "Q4", "documents": [{"id": "d", "text": ""}]}),
    ])
    items = list(read_input(path))
    src = [f"{path}:{n}" for n in range(1, 5)]

    def why(reason, qid, i):
        return f"{reason} (query {qid!r}, document {i})"

    assert items == [
        Reject(src[0], why('non-string text: "documents[2].text" is a number', "q1", 2), '{"id": "x", "text": 5}', "q1", 2),
        Reject(src[0], why('missing field "documents[4].text"', "q1", 4), '{"id": "y"}', "q1", 4),
        Reject(src[0], why('bad id: "documents[5].id" must be a string or an integer, got a boolean', "q1", 5),
               '{"id": true, "text": "t"}', "q1", 5),
        Reject(src[0], why('duplicate doc id: "w" in documents[3] and documents[6]', "q1", 6), '{"id": "w", "text": "again"}', "q1", 6),
        Reject(src[0], why('bad id: "documents[7].id" is empty', "q1", 7), '{"id": " ", "text": "t"}', "q1", 7),
        Reject(src[0], why('non-string text: "documents[8]" is an array', "q1", 8), '["a list"]', "q1", 8),
        Unit(0, "q1", "Q", [("0", "good"), ("1", ""), ("w", "  "), ("9", "no id")], src[0], [0, 1, 3, 9]),
        # every document bad: its rejects, no unit, and the next unit's index stays dense
        Reject(src[1], why('non-string text: "documents[0]" is null', "q2", 0), "null", "q2", 0),
        Reject(src[1], why('non-string text: "documents[1].text" is an array', "q2", 1), '{"text": ["x"]}', "q2", 1),
        Reject(src[2], 'empty documents list: "documents" is []', json.dumps({"query_id": "q3", "query": "empty list", "documents": []})),
        Unit(1, "3", "Q4", [("d", "")], src[3]),
    ]
    assert [items[6].position(i) for i in range(4)] == [0, 1, 3, 9]
    assert items[-1].position(0) == 0
    # A lone surrogate in one document rejects that document; its raw text keeps the escape, so it can be written.
    surrogate = write_lines(tmp_path / "surrogate.jsonl", ['{"query": "q", "documents": ["ok", "\\ud800", {"text": "\\udc00 é"}]}'])
    units, rejects = split(read_input(surrogate))
    assert units == [Unit(0, "0", "q", [("0", "ok")], f"{surrogate}:1", [0])]
    assert [(r.reason.split(":")[0], r.raw, r.doc_index) for r in rejects] == [
        ("invalid UTF-8", "\\ud800", 1), ("invalid UTF-8", '{"text": "\\udc00 é"}', 2)]
    w = RejectsWriter(tmp_path / "surrogate.rejects.jsonl")
    for r in rejects:
        w.write(r)
    w.close(final=True)
    assert [json.loads(x)["raw"] for x in (tmp_path / "surrogate.rejects.jsonl").read_text(encoding="utf-8").splitlines()] == [
        "\\ud800", '{"text": "\\udc00 é"}']


def test_nested_parquet_rejects_bad_documents_one_by_one(tmp_path):
    path = tmp_path / "docs.parquet"
    doc = pa.struct([("id", pa.string()), ("text", pa.string())])
    pq.write_table(pa.table({
        "query_id": ["q1", "q2", None, "q4"],
        "query": ["one", "two", "three", "four"],
        "documents": pa.array([
            [{"id": "a", "text": "A"}, {"id": "b", "text": ""}, {"id": "c", "text": None},
             {"id": "a", "text": "dup"}, {"id": None, "text": "no id"}, {"id": "e", "text": " \n"}],
            [{"id": "x", "text": None}],
            [],
            [{"id": "z", "text": ""}],
        ], pa.list_(doc)),
    }), path)
    items = list(read_input(path))
    src = [f"{path}:row {n}" for n in range(4)]
    assert items == [
        Reject(src[0], 'non-string text: "documents[2].text" is null (query \'q1\', document 2)', '{"id": "c", "text": null}', "q1", 2),
        Reject(src[0], 'duplicate doc id: "a" in documents[0] and documents[3] (query \'q1\', document 3)',
               '{"id": "a", "text": "dup"}', "q1", 3),
        Unit(0, "q1", "one", [("a", "A"), ("b", ""), ("4", "no id"), ("e", " \n")], src[0], [0, 1, 4, 5]),
        Reject(src[1], 'non-string text: "documents[0].text" is null (query \'q2\', document 0)', '{"id": "x", "text": null}', "q2", 0),
        Reject(src[2], 'empty documents list: "documents" is []', '{"query": "three", "documents": [], "query_id": null}'),
        Unit(1, "q4", "four", [("z", "")], src[3]),
    ]
    # a list of strings: a null item is one bad document
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"query": ["q"], "documents": [["", None, "x"]]}), strings)
    assert list(read_input(strings)) == [
        Reject(f"{strings}:row 0", 'non-string text: "documents[1]" is null (query \'0\', document 1)', "null", "0", 1),
        Unit(0, "0", "q", [("0", ""), ("2", "x")], f"{strings}:row 0", [0, 2]),
    ]


def test_beir_blank_corpus_entry_is_an_empty_document(tmp_path):
    folder = beir_folder(tmp_path)
    with open(folder / "corpus.jsonl", "ab") as f:
        f.write(b'{"_id": "d0", "title": " ", "text": ""}\n{"_id": "d00", "text": "  "}\n')
    with open(folder / "run.trec", "ab") as f:
        f.write(b"q1 Q0 d0 5 6.0 bm25\nq1 Q0 d00 6 5.5 bm25\n")
    units, rejects = split(read_input(folder, depth=4))
    assert [r.reason.split(":")[0] for r in rejects] == ["unknown doc id"]
    assert units[1] == Unit(1, "q1", "first", [("d1", "Title One text one"), ("d0", ""), ("d00", "  "), ("d2", "text two")],
                            f"{folder / 'run.trec'}:2")


def test_reader_errors_name_the_input(tmp_path):
    with pytest.raises(RerankerError, match="input file not found"):
        read_input(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(RerankerError, match="cannot tell the format"):
        read_input(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RerankerError, match="queries.jsonl not found"):
        read_input(tmp_path / "empty")


def test_jsonl_streams_with_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"query_id": "q", "query": "a query", "doc_id": "d", "document": "x" * 400}) + "\n"
    with open(path, "w") as f:
        f.write(line * 50_000)  # 22 MB
    tracemalloc.start()
    count = sum(1 for _ in read_input(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 50_000 and peak < 2_000_000


# --- writers ----------------------------------------------------------------------------------


def make_units(n=10):
    units, scores = [], []
    for i in range(n):
        units.append(Unit(i, f"q{i}", f"query {i} ü", [(f"d{i}-{j}", f"doc {j} of {i} 🎉") for j in range(3)], f"in:{i + 1}"))
        scores.append([0.25 + 0.01 * i, 0.5, 0.25 + 0.01 * i if i % 3 == 0 else 0.75])  # ties every third unit
    return units, scores


def read_trec(path):
    rows = []
    for line in path.read_text().splitlines():
        qid, q0, doc, rank, score, tag = line.split()
        rows.append((qid, q0, doc, int(rank), float(score), tag))
    return rows


def test_jsonl_per_query_round_trip(tmp_path):
    units, scores = make_units(3)
    w = open_writer(tmp_path / "out.jsonl", model="m0")
    for u, s in zip(units, scores):
        w.write(u, s, tokens=100 + u.index)
    w.commit()
    w.close(final=True)
    assert not (tmp_path / "out.jsonl.partial").exists()
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines[1] == {
        "query_id": "q1", "query": "query 1 ü", "model": "m0", "usage": {"total_tokens": 101},
        "results": [
            {"index": 2, "doc_id": "d1-2", "relevance_score": 0.75, "document": {"text": "doc 2 of 1 🎉"}},
            {"index": 1, "doc_id": "d1-1", "relevance_score": 0.5, "document": {"text": "doc 1 of 1 🎉"}},
            {"index": 0, "doc_id": "d1-0", "relevance_score": 0.26, "document": {"text": "doc 0 of 1 🎉"}},
        ],
    }
    assert [r["index"] for r in lines[0]["results"]] == [1, 0, 2]  # 0 and 2 tie: lower index first


def test_jsonl_per_pair_round_trip(tmp_path):
    units, scores = make_units(2)
    w = open_writer(tmp_path / "out.ndjson", "jsonl", per="pair")
    for u, s in zip(units, scores):
        w.write(u, s, 0)
    w.close(final=True)
    got = [json.loads(x) for x in (tmp_path / "out.ndjson").read_text().splitlines()]
    assert got == [{"query_id": u.query_id, "doc_id": d, "score": s} for u, ss in zip(units, scores) for (d, _), s in zip(u.docs, ss)]


def test_parquet_round_trip_and_flat_pair_ranks(tmp_path):
    units, scores = make_units(3)
    flat = [Unit(3 + i, "qf", "flat", [(f"f{i}", "t")], f"p:{i}") for i in range(4)]
    w = open_writer(tmp_path / "out.parquet")
    for u, s in zip(units, scores):
        w.write(u, s, 0)
    for u, s in zip(flat, [0.1, 0.9, 0.5, 0.9]):
        w.write(u, [s], 0)
    w.close(final=True)
    assert not (tmp_path / "out.parquet.parts").exists()
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.types == [pa.string(), pa.string(), pa.float32(), pa.int32()]
    rows = table.to_pylist()
    assert [r["doc_id"] for r in rows] == [d for u in units for d, _ in u.docs] + ["f0", "f1", "f2", "f3"]
    assert [r["score"] for r in rows] == pytest.approx([s for ss in scores for s in ss] + [0.1, 0.9, 0.5, 0.9])
    assert [r["rank"] for r in rows] == [2, 1, 3, 3, 2, 1, 3, 2, 1] + [4, 1, 3, 2]


def test_jsonl_flat_pairs_of_a_query_make_one_ranking(tmp_path):
    # README: "one line per query"; flat pairs are a unit each, merged at the final close as TREC re-ranks them.
    units, scores = make_units(2)
    flat = [Unit(2 + i, "qf", "flat", [(f"f{i}", f"t{i}")], f"p:{i}", pair=True) for i in range(4)]
    w = open_writer(tmp_path / "out.jsonl", model="m0")
    for u, s in zip(units, scores):
        w.write(u, s, 10)
    w.commit()  # a commit between a query's pairs changes nothing
    for u, s in zip(flat, [0.1, 0.9, 0.5, 0.9]):
        w.write(u, [s], 7)
    w.write(Unit(6, "qg", "other", [("g0", "t")], "p:4", pair=True), [0.3], 5)
    w.close(final=True)
    text = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    lines = [json.loads(x) for x in text.splitlines()]
    assert [x["query_id"] for x in lines] == ["q0", "q1", "qf", "qg"]
    assert lines[2] == {"query_id": "qf", "query": "flat", "model": "m0", "usage": {"total_tokens": 28}, "results": [
        {"index": 1, "doc_id": "f1", "relevance_score": 0.9, "document": {"text": "t1"}},
        {"index": 3, "doc_id": "f3", "relevance_score": 0.9, "document": {"text": "t3"}},
        {"index": 2, "doc_id": "f2", "relevance_score": 0.5, "document": {"text": "t2"}},
        {"index": 0, "doc_id": "f0", "relevance_score": 0.1, "document": {"text": "t0"}},
    ]}
    assert lines[3]["results"] == [{"index": 0, "doc_id": "g0", "relevance_score": 0.3, "document": {"text": "t"}}]
    # Nested records' lines are copied byte for byte.
    w2 = open_writer(tmp_path / "nested.jsonl", model="m0")
    for u, s in zip(units, scores):
        w2.write(u, s, 10)
    w2.close(final=True)
    assert text.startswith((tmp_path / "nested.jsonl").read_text(encoding="utf-8"))


def test_trec_round_trip_and_flat_pair_ranks(tmp_path):
    units, scores = make_units(2)
    flat = [Unit(2 + i, "qf", "flat", [(f"f{i}", "t")], f"p:{i}") for i in range(3)]
    w = open_writer(tmp_path / "out.trec", run_tag="rr")
    for u, s in zip(units, scores):
        w.write(u, s, 0)
    w.commit()
    for u, s in zip(flat, [0.1, 0.9, 0.5]):
        w.write(u, [s], 0)
    w.close(final=True)
    assert read_trec(tmp_path / "out.trec") == [
        ("q0", "Q0", "d0-1", 1, 0.5, "rr"), ("q0", "Q0", "d0-0", 2, 0.25, "rr"), ("q0", "Q0", "d0-2", 3, 0.25, "rr"),
        ("q1", "Q0", "d1-2", 1, 0.75, "rr"), ("q1", "Q0", "d1-1", 2, 0.5, "rr"), ("q1", "Q0", "d1-0", 3, 0.26, "rr"),
        ("qf", "Q0", "f1", 1, 0.9, "rr"), ("qf", "Q0", "f2", 2, 0.5, "rr"), ("qf", "Q0", "f0", 3, 0.1, "rr"),
    ]
    assert (tmp_path / "out.trec").read_text().splitlines()[0] == "q0 Q0 d0-1 1 0.50000000 rr"
    with pytest.raises(RerankerError, match="whitespace"):
        open_writer(tmp_path / "o.trec").write(Unit(0, "a b", "q", [("d", "t")], "in:3"), [0.5], 0)


def test_trec_run_evaluated_by_ir_measures(tmp_path):
    ir_measures = pytest.importorskip("ir_measures")
    from ir_measures import RR, nDCG

    w = open_writer(tmp_path / "run.trec")
    w.write(Unit(0, "q1", "one", [("a", "A"), ("b", "B"), ("c", "C")], "in:1"), [0.9, 0.5, 0.7], 30)
    w.write(Unit(1, "q2", "two", [("d", "D"), ("e", "E"), ("f", "F")], "in:2"), [0.2, 0.8, 0.6], 30)
    w.close(final=True)
    (tmp_path / "qrels").write_text("q1 0 b 1\nq2 0 e 1\nq2 0 d 1\nq2 0 f 0\n")
    # By hand. q1 ranks a, c, b; only b (rank 3) is relevant:
    #   nDCG@10 = (1/log2(4)) / (1/log2(2)) = 0.5, RR = 1/3.
    # q2 ranks e, f, d; e (rank 1) and d (rank 3) are relevant:
    #   DCG = 1/log2(2) + 1/log2(4) = 1.5, IDCG = 1/log2(2) + 1/log2(3) = 1.6309298, nDCG@10 = 0.9197208, RR = 1.
    # Means: nDCG@10 = (0.5 + 0.9197208) / 2 = 0.7098604, MRR@10 = (1/3 + 1) / 2 = 0.6666667.
    got = ir_measures.calc_aggregate([nDCG @ 10, RR @ 10], ir_measures.read_trec_qrels(str(tmp_path / "qrels")),
                                     ir_measures.read_trec_run(str(tmp_path / "run.trec")))
    assert got[nDCG @ 10] == pytest.approx((0.5 + 1.5 / (1 + 1 / math.log2(3))) / 2, abs=1e-6)
    assert got[nDCG @ 10] == pytest.approx(0.7098604, abs=1e-6)
    assert got[RR @ 10] == pytest.approx(2 / 3, abs=1e-6)


# --- crash safety -----------------------------------------------------------------------------


def single_pass(path, fmt, units, scores, **kw):
    w = open_writer(path, fmt, **kw)
    for u, s in zip(units, scores):
        w.write(u, s, 7)
    w.commit()
    w.close(final=True)
    return path.read_bytes()


def interrupted(path, fmt, units, scores, make=open_writer, **kw):
    """Write 0..9 committing after 4, crash with units 5..9 (and a torn line) on disk, resume at 5."""
    w = make(path, fmt, **kw)
    w.resume({})
    for u, s in zip(units[:5], scores[:5]):
        w.write(u, s, 7)
    state = json.loads(json.dumps(w.commit()))  # as the checkpoint stores it
    for u, s in zip(units[5:], scores[5:]):
        w.write(u, s, 7)
    w.close(final=False)  # closing flushes: the uncommitted lines do reach the disk
    for partial in path.parent.glob(path.name + ".partial"):
        with open(partial, "ab") as f:
            f.write(b'{"query_id": "torn')
    w = make(path, fmt, **kw)
    w.resume(state)
    for u, s in zip(units[5:], scores[5:]):
        w.write(u, s, 7)
    w.commit()
    w.close(final=True)
    return path.read_bytes()


@pytest.mark.parametrize("fmt,per", [("jsonl", "query"), ("jsonl", "pair"), ("trec", "query")])
def test_resume_equals_single_pass_text_formats(tmp_path, fmt, per):
    units, scores = make_units()
    clean = single_pass(tmp_path / f"a.{fmt}", fmt, units, scores, per=per)
    resumed = interrupted(tmp_path / f"b.{fmt}", fmt, units, scores, per=per)
    assert resumed == clean and clean.count(b"\n") == (10 if (fmt, per) == ("jsonl", "query") else 30)


def test_resume_equals_single_pass_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "PARQUET_ROW_GROUP", 7)  # several row groups, cut across parts and queries
    units, scores = make_units()
    clean = single_pass(tmp_path / "a.parquet", "parquet", units, scores)

    def small_parts(path, fmt):
        return writers.ParquetWriter(path, part_rows=4)  # parts beyond the commit survive the crash

    resumed = interrupted(tmp_path / "b.parquet", "parquet", units, scores, make=small_parts)
    assert resumed == clean
    meta = pq.ParquetFile(tmp_path / "b.parquet").metadata
    assert meta.num_rows == 30 and meta.num_row_groups == 5
    assert pq.read_table(tmp_path / "b.parquet").column("rank").to_pylist()[:6] == [2, 1, 3, 3, 2, 1]


def test_resume_rejects_file(tmp_path):
    rejects = [Reject(f"in.jsonl:{i}", "malformed JSON: x", None if i % 2 else f"raw {i} é") for i in range(10)]
    clean = RejectsWriter(tmp_path / "a.jsonl")
    for r in rejects:
        clean.write(r)
    clean.close(final=True)
    w = RejectsWriter(tmp_path / "b.jsonl")
    for r in rejects[:5]:
        w.write(r)
    state = w.commit()
    for r in rejects[5:8]:
        w.write(r)
    w.close(final=False)
    with open(tmp_path / "b.jsonl", "ab") as f:
        f.write(b'{"source": "to')  # a torn last line
    w = RejectsWriter(tmp_path / "b.jsonl")
    w.resume(state)
    for r in rejects[5:]:
        w.write(r)
    w.close(final=True)
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()][1] == {"source": "in.jsonl:1", "reason": "malformed JSON: x", "raw": None}


@pytest.mark.parametrize("name", ["o.jsonl", "o.trec", "o.parquet"])
def test_resume_after_final_close_keeps_the_output(tmp_path, name):
    # A crash after the final close but before the job recorded it: resuming must not lose the file.
    units, scores = make_units(2)
    w = open_writer(tmp_path / name)
    for u, s in zip(units, scores):
        w.write(u, s, 1)
    state = w.commit()
    w.close(final=True)
    done = (tmp_path / name).read_bytes()
    w = open_writer(tmp_path / name)
    w.resume(state)
    assert w.commit() == state
    w.close(final=True)
    assert (tmp_path / name).read_bytes() == done


def test_fresh_start_empties_and_changed_output_is_refused(tmp_path):
    units, scores = make_units(2)
    path = tmp_path / "o.jsonl"
    path.write_text("old finished output\n")
    w = open_writer(path)
    w.write(units[0], scores[0], 1)
    state = w.commit()
    w.close(final=False)
    assert not path.exists()  # the stale file went at the fresh start
    partial = tmp_path / "o.jsonl.partial"
    partial.write_bytes(partial.read_bytes()[:-10])
    with pytest.raises(RerankerError, match="start the job over"):
        open_writer(path).resume(state)
    with pytest.raises(RerankerError, match="not a parquet state"):
        open_writer(tmp_path / "o.parquet").resume(state)
