"""Long documents chunked: boundaries on characters, prompts that fit, scores that are the chunks' max,
and jobs that write chunk counts and resume exactly across chunked documents."""

from __future__ import annotations

import argparse
import json
import random
import signal
import unicodedata

import numpy as np
import pytest
from helpers import kill_when, run, run_here, score_args, write_nested
from oracle import assert_scores_close

from reranker import Chunking, Reranker, RerankerError
from reranker.defaults import QUERY_PREFIX, SCORE_TOKEN_ID
from reranker.engine.chunking import MARGIN, Chunker, char_boundaries, token_spans
from reranker.engine.prompts import PromptBuilder, format_prompt
from reranker.options import as_chunking

MAX_LENGTH = 64  # small, so short documents already need several chunks
CJK = "机器学习是人工智能的一个分支，研究计算机如何从数据中学习。🎉🥳👩‍👩‍👧 ﬁ e\u0301 § Ω résumé "
LONG = {
    "english": "A reranker scores how relevant a document is to a query. " * 30,
    "cjk-emoji": CJK * 12,
    "newlines": "\n\nFirst line.\r\n  indented\tand tabbed.   \n" * 25 + "   \n\n",
    "one-word": "x" * 900,
}


@pytest.fixture(scope="module")
def det(tiny_ggufs):
    """The F32 model in deterministic mode: a prompt's score does not depend on its batch."""
    r = Reranker.from_pretrained(str(tiny_ggufs["f32"]), device="cpu", n_ctx=512, max_length=MAX_LENGTH, deterministic=True)
    yield r
    r.close()


def check_spans(spans, safe, size, n, capped):
    assert spans[0][0] == 0 and (capped or spans[-1][1] == n)
    for (a, b), (c, d) in zip(spans, spans[1:]):
        assert a < c <= b < d, (a, b, c, d)  # moving forward, no gap
    previous_end = 0
    for a, b in spans:
        assert safe[a] and safe[b]
        low = max(a, previous_end) + 1  # longer than `size` only when no boundary past the last chunk is in reach
        assert b - a <= size or not any(safe[low : a + size + 1])
        previous_end = b


def test_token_spans_cover_the_tokens_on_safe_boundaries():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 200))
        safe = rng.random(n + 1) < rng.uniform(0.3, 1.0)
        safe[0] = safe[n] = True
        size = int(rng.integers(1, 40))
        overlap = int(rng.integers(0, size // 2 + 1))
        spans, capped = token_spans(safe, size, overlap, max_chunks=10_000)
        assert not capped
        check_spans(spans, safe, size, n, capped)
        if safe.all():  # no character to respect: exact sizes and overlaps
            assert all(b - a == size for a, b in spans[:-1])
            assert all(b - c == overlap or c == b for (_, b), (c, _) in zip(spans, spans[1:]))
        few, capped = token_spans(safe, size, overlap, max_chunks=2)
        assert few == spans[:2] and capped == (len(spans) > 2)


@pytest.mark.parametrize("size,overlap", [(8, 0), (9, 4), (13, 3), (31, 15), (64, 20)])
def test_chunk_boundaries_never_split_a_character(tokenizer, size, overlap):
    rng = random.Random(size)
    doc = " ".join(rng.choice(CJK.split()) + rng.choice(["", "🎉", "👩‍👩‍👧", "，"]) for _ in range(150))
    text = unicodedata.normalize("NFC", doc)
    ids = tokenizer.encode(doc)
    data, offsets, safe = char_boundaries(tokenizer.pieces(ids))
    assert data == text.encode("utf-8")
    assert not safe.all(), "the text must have tokens holding part of a character, or the test proves nothing"
    naive, _ = token_spans(np.ones_like(safe), size, overlap, 10_000)
    assert any(not safe[b] for _, b in naive), "a plain token split would cut a character here"
    spans, capped = token_spans(safe, size, overlap, 10_000)
    check_spans(spans, safe, size, len(ids), capped)
    # The public chunk texts (max_length leaves more room than `size`): whole characters of the
    # document, in order, each chunk starting inside or at the end of the one before, covering it all.
    chunker = Chunker(PromptBuilder(tokenizer, 512), Chunking(size=size, overlap=overlap, max_chunks=10_000))
    texts = chunker.chunk_texts("q", doc)
    assert len(texts) == len(spans) > 3 and "\ufffd" not in "".join(texts)
    assert text.startswith(texts[0])
    previous_start, previous_end = 0, len(texts[0])
    for t in texts[1:]:
        found = text.find(t, previous_start + 1)
        assert previous_start < found <= previous_end, t
        previous_start, previous_end = found, found + len(t)
    assert previous_end == len(text)
    assert all(len(tokenizer.encode(t)) <= size + 4 for t in texts)  # a chunk re-tokenises to about its span


@pytest.mark.parametrize("name", sorted(LONG))
@pytest.mark.parametrize("query", ["what is a reranker?", "机器学习 🎉", "", "long query " * 80])
def test_every_chunk_prompt_ends_with_query_and_scoring_token_and_fits(tokenizer, name, query):
    builder = PromptBuilder(tokenizer, MAX_LENGTH, max_query_length=24)
    for chunking in (Chunking(), Chunking(size=16, overlap=4), Chunking(size=20, overlap=0, aggregate="mean")):
        doc = Chunker(builder, chunking).prompts(query, LONG[name])
        assert doc.split and len(doc.prompts) > 1 and not doc.capped
        fitted, _ = builder.fit_query(query)
        for p in doc.prompts:
            assert p.ids[-1] == SCORE_TOKEN_ID and len(p.ids) <= MAX_LENGTH
            assert tokenizer.decode(p.ids[:-1]).endswith(QUERY_PREFIX + fitted)
            assert p.truncated == (fitted != query)  # the chunk itself was not cut


def test_a_document_that_fits_gives_the_unchunked_prompt(tokenizer):
    builder = PromptBuilder(tokenizer, MAX_LENGTH)
    chunker = Chunker(builder, Chunking(size=8, overlap=2))
    for doc in ("short", "", "机器学习 🎉", "word " * 40):
        got = chunker.prompts("query", doc)
        assert not got.split and got.prompts == [builder.build("query", doc)]
        assert chunker.chunk_texts("query", doc) == [doc]


@pytest.mark.parametrize("max_length, max_doc_length, size", [(1024, None, None), (512, 64, None), (512, 64, 200), (512, 64, 30)])
def test_a_document_over_max_doc_length_is_chunked_and_no_chunk_is_cut(tokenizer, max_length, max_doc_length, size):
    # The document fits the room the prompt leaves, but not the document cap (default at 1024 / 512: 512
    # tokens): chunks no longer than the cap (less MARGIN), none cut by it, together the whole document.
    builder = PromptBuilder(tokenizer, max_length, max_doc_length=max_doc_length)
    cap = builder.max_doc_length
    doc = LONG["english"] + LONG["cjk-emoji"] if max_doc_length is None else LONG["cjk-emoji"]
    assert cap < len(tokenizer.encode(doc)) and len(builder.prompt_ids("q", doc)) < builder.budget, "fits the room, not the cap"
    chunker = Chunker(builder, Chunking(size=size, overlap=4))
    got = chunker.prompts("q", doc)
    texts = chunker.chunk_texts("q", doc)
    assert got.split and not got.capped and not got.truncated and len(got.prompts) == len(texts) > 1
    limit = min(size or cap, cap - MARGIN)
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert max(lengths) <= limit + 4 and max(lengths) >= limit - 4, lengths  # the chunks use the room they have
    for t, p in zip(texts, got.prompts):
        assert p == builder.build_fitted("q", t)
        assert tokenizer.decode(p.ids[:-1]) == unicodedata.normalize("NFC", format_prompt("q", t))  # the whole chunk
    text = unicodedata.normalize("NFC", doc)
    assert text.startswith(texts[0]) and text.endswith(texts[-1])
    # Without chunking the same document is cut to the cap.
    plain = builder.build("q", doc)
    assert plain.truncated and len(plain.ids) < len(builder.prompt_ids("q", doc))


def test_an_image_querys_document_over_max_doc_length_is_chunked(tokenizer):
    from reranker.engine.segments import Embeddings

    def parts(p):
        return p.truncated, [x if isinstance(x, Embeddings) else list(x) for x in p.ids.parts]

    query = Embeddings(np.zeros((4, 8), np.float32), nx=2, ny=2)
    builder = PromptBuilder(tokenizer, 512, max_doc_length=64)
    doc = LONG["cjk-emoji"]
    assert len(builder.build_parts(query, doc).ids) < 400 and len(tokenizer.encode(doc)) > 64
    chunker = Chunker(builder, Chunking(overlap=4))
    got = chunker.image_query_prompts(query, doc)
    texts = chunker.chunk_texts(query, doc)
    assert got.split and not got.truncated and len(got.prompts) == len(texts) > 1
    assert max(len(tokenizer.encode(t)) for t in texts) <= 64 - MARGIN + 4
    assert [parts(p) for p in got.prompts] == [parts(builder.build_parts(query, t)) for t in texts]


def test_chunked_score_is_the_max_of_its_chunks_scored_alone(det, reference):
    # F32 weights and deterministic mode: a chunk scores the same inside the call and alone, so
    # the document's score must equal the best chunk's exactly.
    rng = random.Random(0)
    pairs = [["what is a reranker?", LONG["english"]], ["机器学习", LONG["cjk-emoji"]], ["short one", "a short document"],
             ["lines", LONG["newlines"]], ["", "x"]]
    pairs += [[" ".join(rng.choices(["alpha", "学习", "🎉", "beta"], k=3)), " ".join(rng.choices(["gamma", "机器", "δ"], k=rng.randint(1, 120)))]
              for _ in range(6)]
    chunking = Chunking(overlap=8)
    chunker = Chunker(det.prompt_builder(), chunking)
    texts = [chunker.chunk_texts(q, d) for q, d in pairs]
    alone = [[det.compute_score([q, t]) for t in ts] for (q, _), ts in zip(pairs, texts)]
    assert sum(len(a) > 1 for a in alone) >= 5, "several documents must be chunked"
    # Each chunk alone is scored right, not only consistently: the reference on that chunk's own prompt.
    assert_scores_close([s for a in alone for s in a], reference.scores([[q, t] for (q, _), ts in zip(pairs, texts) for t in ts]),
                        "f32", "a chunk's prompt")
    for how, expect in (("max", max), ("first", lambda a: a[0]),
                        ("mean", lambda a: float(np.float32(np.mean(np.array(a, dtype=np.float64)))))):
        scores = det.compute_score(pairs, chunking=Chunking(overlap=8, aggregate=how), batch_size=100)
        assert scores == [expect(a) for a in alone], how
        usage = det.last_usage
        assert usage.chunks == [len(a) for a in alone] and usage.best_chunk == [int(np.argmax(a)) for a in alone]
        assert usage.chunked == sum(len(a) > 1 for a in alone) and usage.capped == 0 == usage.truncated
    # Documents that fit score as without chunking; only a chunked call counts chunks.
    plain = det.compute_score(pairs)
    assert det.last_usage.chunks is None and det.last_usage.best_chunk is None
    chunked = det.compute_score(pairs, chunking=True)
    default = Chunker(det.prompt_builder(), Chunking())
    assert det.last_usage.chunks == [len(default.chunk_texts(q, d)) for q, d in pairs]
    fits = [len(a) == 1 for a in alone]
    assert any(fits) and [s for s, f in zip(chunked, fits) if f] == [p for p, f in zip(plain, fits) if f]
    ranked = det.rank(pairs[0][0], [pairs[0][1], "a short document"], chunking=chunking)
    by_id = {r["corpus_id"]: r for r in ranked}
    assert by_id[0]["score"] == max(alone[0]) and by_id[0]["chunks"] == len(alone[0])
    assert by_id[0]["best_chunk"] == int(np.argmax(alone[0])) and by_id[1]["chunks"] == 1
    assert "chunks" not in det.rank("q", ["d"])[0]


def test_max_chunks_caps_and_is_counted(det):
    pairs = [["q", LONG["english"]], ["q", "short"]]
    scores = det.compute_score(pairs, chunking=Chunking(size=16, overlap=0, max_chunks=3))
    usage = det.last_usage
    assert usage.chunks == [3, 1] and usage.capped == 1 == usage.truncated and usage.chunked == 1
    chunker = Chunker(det.prompt_builder(), Chunking(size=16, overlap=0, max_chunks=3))
    assert scores[0] == max(det.compute_score([["q", t] for t in chunker.chunk_texts("q", LONG["english"])]))


def test_chunking_settings_are_checked():
    for bad, match in ((dict(size=4), "chunk size"), (dict(size=16, overlap=16), "less than"), (dict(overlap=-1), "overlap"),
                       (dict(max_chunks=0), "max_chunks"), (dict(aggregate="median"), "aggregate")):
        with pytest.raises(RerankerError, match=match):
            Chunking(**bad)
    assert as_chunking(None) is None and as_chunking(False) is None and as_chunking(True) == Chunking()
    with pytest.raises(RerankerError, match="chunking="):
        as_chunking("yes")
    from reranker.cli.common import add_chunk_args, chunking_option

    p = argparse.ArgumentParser()
    add_chunk_args(p)
    assert chunking_option(p.parse_args([])) is None
    assert chunking_option(p.parse_args(["--chunk", "--chunk-size", "100", "--aggregate", "mean"])) == Chunking(100, aggregate="mean")
    with pytest.raises(RerankerError, match="without --chunk, --chunk-size has no effect"):
        chunking_option(p.parse_args(["--chunk-size", "100"]))
    with pytest.raises(RerankerError, match="chunk overlap"):
        chunking_option(p.parse_args(["--chunk", "--chunk-size", "100", "--chunk-overlap", "100"]))


def test_an_overlap_moves_each_chunk_on_by_half_a_chunk_unless_its_size_is_given():
    # An overlap as large as the room a prompt leaves would move each chunk on by one token: max_chunks
    # full-length prompts for a document two chunks long (64x the work, from a 2 KB request).
    assert Chunking(overlap=10**9).overlap_for(500) == 250 and Chunking().overlap_for(300) == 150
    assert Chunking(overlap=100).overlap_for(500) == 100
    assert Chunking(size=512, overlap=500).overlap_for(512) == 500  # both given and used: as asked
    assert Chunking(size=512, overlap=500).overlap_for(300) == 150  # the prompt leaves less room than size


# --- jobs ----------------------------------------------------------------------------------


def write_long_nested(path, n_queries=12, seed=0):
    write_nested(path, n_queries, seed, words="alpha beta gamma 机器 学习 🎉 résumé x=1 δ".split(), max_words=150, max_docs=5)


def job_args(model, inp, out, *extra):
    return score_args(model, inp, out, "--max-length", MAX_LENGTH, *extra, n_ctx=512, window=8)


def test_job_writes_chunk_counts_only_when_chunking(tiny_ggufs, det, tmp_path):
    from reranker.cli import main

    model = tiny_ggufs["f32"]
    inp = tmp_path / "in.jsonl"
    write_long_nested(inp)
    chunked, plain = tmp_path / "chunked.jsonl", tmp_path / "plain.jsonl"
    assert main(job_args(model, inp, chunked, "--chunk", "--chunk-overlap", "8", "--deterministic")) == 0
    assert main(job_args(model, inp, plain)) == 0
    records = [json.loads(line) for line in inp.read_text().splitlines()]
    pairs = [[r["query"], d] for r in records for d in r["documents"]]
    want = det.compute_score(pairs, chunking=Chunking(overlap=8))
    usage = det.last_usage
    got, k = [], 0
    for line, record in zip(chunked.read_text().splitlines(), records):
        results = sorted(json.loads(line)["results"], key=lambda r: r["index"])
        for r in results:
            assert (r["chunks"], r["best_chunk"]) == (usage.chunks[k + r["index"]], usage.best_chunk[k + r["index"]])
        got += [r["relevance_score"] for r in results]
        k += len(record["documents"])
    assert got == want and usage.chunked > 5
    summary = json.loads((tmp_path / "chunked.jsonl.summary.json").read_text())
    assert (summary["chunked"], summary["capped"], summary["pairs"]) == (usage.chunked, 0, len(pairs))
    assert summary["tokens"] == usage.tokens
    assert "chunks" not in plain.read_text() and "chunked" not in json.loads((tmp_path / "plain.jsonl.summary.json").read_text())
    # Another chunk setting is a different job: refused without --restart.
    assert main(job_args(model, inp, chunked, "--chunk", "--chunk-overlap", "4", "--deterministic")) == 2
    assert main(job_args(model, inp, plain, "--chunk")) == 2


@pytest.mark.slow
def test_parquet_and_per_pair_outputs_carry_chunk_columns(tiny_ggufs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from reranker.cli import main

    inp = tmp_path / "in.jsonl"
    write_long_nested(inp, n_queries=4)
    for name, extra in (("plain.parquet", []), ("chunked.parquet", ["--chunk", "--max-chunks", "2"])):
        assert main(job_args(tiny_ggufs["f32"], inp, tmp_path / name, *extra)) == 0
    assert pq.read_table(tmp_path / "plain.parquet").column_names == ["query_id", "doc_id", "score", "rank"]
    table = pq.read_table(tmp_path / "chunked.parquet")
    assert table.column_names == ["query_id", "doc_id", "score", "chunks", "best_chunk", "rank"]
    chunks = table.column("chunks").to_pylist()
    assert max(chunks) == 2 and min(chunks) == 1 and all(0 <= b < c for b, c in zip(table.column("best_chunk").to_pylist(), chunks))
    summary = json.loads((tmp_path / "chunked.parquet.summary.json").read_text())
    assert summary["capped"] > 0 and summary["truncated"] >= summary["capped"]
    assert main(job_args(tiny_ggufs["f32"], inp, tmp_path / "pairs.jsonl", "--chunk", "--per", "pair")) == 0
    lines = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert set(lines[0]) == {"query_id", "doc_id", "score", "chunks", "best_chunk"} and max(x["chunks"] for x in lines) > 1


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_sigkill_and_resume_across_chunked_documents_equals_clean_run(tiny_ggufs, tmp_path, suffix):
    import sys

    def cmd(out):
        return [sys.executable, "-m", "reranker", *job_args(tiny_ggufs["f32"], inp, out, "--chunk", "--chunk-size", "16",
                                                            "--chunk-overlap", "4", "--window", "4")]

    inp = tmp_path / "in.jsonl"
    write_long_nested(inp, n_queries=30)
    clean, out = tmp_path / f"clean{suffix}", tmp_path / f"out{suffix}"
    assert run_here(cmd(clean)) == 0  # only the killed runs need processes of their own
    kills = ((2, 0.01), (12, 0.05)) if suffix == ".jsonl" else ((12, 0.05),)  # Parquet's resume: test_job; here its chunk columns
    killed = sum(kill_when(cmd(out), out, after, delay) == -signal.SIGKILL for after, delay in kills)
    assert killed >= 1, "no run was killed mid-way: the test proves nothing"
    assert run_here(cmd(out)) == 0
    assert out.read_bytes() == clean.read_bytes()
    summary, clean_summary = (json.loads(p.with_name(p.name + ".summary.json").read_text()) for p in (out, clean))
    for key in ("pairs", "tokens", "chunked", "capped", "truncated"):
        assert summary[key] == clean_summary[key], key


def test_chunks_are_packed_with_the_other_prompts(tiny_reranker, monkeypatch):
    # Not one decode call per chunk: a chunked document's prompts share decode calls with the rest.
    from reranker.engine.backbone import Backbone

    calls = []
    decode = Backbone._decode
    monkeypatch.setattr(Backbone, "_decode", lambda self, chunks: calls.append(len(chunks)) or decode(self, chunks))
    pairs = [["q", LONG["english"]], ["q", "short"], ["q", LONG["cjk-emoji"]]]
    tiny_reranker.compute_score(pairs, max_length=MAX_LENGTH, chunking=Chunking(size=16, overlap=4))
    chunks = sum(tiny_reranker.last_usage.chunks)
    assert chunks > 40 and sum(calls) == chunks and len(calls) <= 2, calls


@pytest.mark.slow
def test_chunked_job_on_two_device_processes_gives_the_same_bytes(tiny_ggufs, tmp_path):
    import sys

    inp = tmp_path / "in.jsonl"
    write_long_nested(inp, n_queries=8)
    outs = [tmp_path / "one.jsonl", tmp_path / "two.jsonl"]
    assert run_here([sys.executable, "-m", "reranker", *job_args(tiny_ggufs["f32"], inp, outs[0], "--chunk")]) == 0
    # the pool spawns its device processes: from a process of its own, not from this test's worker
    res = run([sys.executable, "-m", "reranker", *job_args(tiny_ggufs["f32"], inp, outs[1], "--chunk", "--devices", "cpu,cpu")])
    assert res.returncode == 0, res.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes()
    lines = [json.loads(line) for line in outs[0].read_text().splitlines()]
    assert max(r["chunks"] for line in lines for r in line["results"]) > 1
