"""`reranker score` with image documents: the API's scores, bad images rejected alone, resume, safety.

The reference for the scores is `Reranker.compute_score` on the same images (itself checked against
transformers' Qwen2-VL in tests/api/test_images.py): a job's window of N pairs is `compute_score`'s batch
of N, so the scores are equal (the one-path rule). The files are real PNGs written by PIL.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import zlib

import numpy as np
import pytest
from helpers import kill_when, read_jsonl, run, run_here, score_args, score_cmd, write_jsonl, write_pdf
from PIL import Image

from reranker.jobs.records import ImageDoc, Reject, Unit

QUERY = "a chart of the quarterly sales"


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def vision_gguf(tiny_vision_gguf):
    """The tiny F32 GGUF with its F32 mmproj and head beside it."""
    return tiny_vision_gguf


@pytest.fixture(scope="module")
def vision_reranker(vision_gguf):
    """A Reranker loaded as `score_args` loads the job's model (n_ctx 1024)."""
    from reranker import Reranker

    rr = Reranker.from_pretrained(str(vision_gguf), device="cpu", n_ctx=1024)
    yield rr
    rr.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder `imgs/` of PNGs of several sizes (relative paths in the inputs point into it), and bad files."""
    root = tmp_path_factory.mktemp("image-inputs")
    (root / "imgs").mkdir()
    for i, (w, h) in enumerate([(40, 30), (120, 80), (56, 200), (90, 90), (300, 60), (64, 64)]):
        picture(w, h, i).save(root / "imgs" / f"p{i}.png")
    data = (root / "imgs" / "p1.png").read_bytes()
    (root / "imgs" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "imgs" / "bomb.png").write_bytes(_bomb_png(30000, 30000))
    (root / "imgs" / "notes.txt").write_text("not an image")
    return root


def _bomb_png(w: int, h: int) -> bytes:
    """A small PNG whose header claims `w` x `h` pixels (900 megapixels): a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\x00" * (w // 8 + 1) * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _main(capsys, args):
    from reranker.cli import main

    capsys.readouterr()
    rc = main(args)
    return rc, capsys.readouterr().err


def test_readers_name_image_documents(images):
    """JSONL (nested and flat) and BEIR: image paths resolved against the naming file's folder, kept unread."""
    from reranker.jobs.readers import read_input

    root = images
    nested = write_jsonl(root / "nested.jsonl", [
        {"query_id": "q", "query": QUERY, "documents": [{"id": "a", "image": "imgs/p0.png"}, {"id": "t", "text": "words"},
                                                        {"id": "abs", "image": str(root / "imgs" / "p1.png")},
                                                        {"id": "both", "text": "x", "image": "imgs/p0.png"},
                                                        {"id": "n", "image": 5}, {"id": "u", "image": "https://x/y.png"}]}])
    items = list(read_input(nested))
    assert [type(x).__name__ for x in items] == ["Reject"] * 3 + ["Unit"]
    assert [(r.doc_index, r.reason.split(":")[0]) for r in items[:3]] == [(3, "both \"documents[3].text\" and \"documents[3].image\""),
                                                                         (4, "bad image"), (5, "bad image")]
    assert "a URL" in items[2].reason
    unit = items[3]
    assert unit.positions == [0, 1, 2]
    (_, a), (_, t), (_, b) = unit.docs
    assert isinstance(a, ImageDoc) and a.given == "imgs/p0.png" and a.source == root / "imgs" / "p0.png"
    assert t == "words" and b.source == root / "imgs" / "p1.png"
    flat = write_jsonl(root / "flat.jsonl", [{"query_id": "q", "query": QUERY, "doc_id": "d", "image": "imgs/p2.png"},
                                             {"query_id": "q", "query": QUERY, "doc_id": "e", "document": "text"}])
    units = list(read_input(flat))
    assert [u.docs[0][1].source if isinstance(u.docs[0][1], ImageDoc) else u.docs[0][1] for u in units] == \
        [root / "imgs" / "p2.png", "text"]
    beir = root / "beir"
    (beir / "pics").mkdir(parents=True)
    picture(50, 50, 9).save(beir / "pics" / "c.png")
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": QUERY}])
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d1", "text": "a text document"}, {"_id": "d2", "image": "pics/c.png"}])
    (beir / "run.trec").write_text("q1 Q0 d1 1 2.0 r\nq1 Q0 d2 2 1.0 r\n")
    (unit,) = list(read_input(beir))
    assert unit.docs[0] == ("d1", "a text document") and unit.docs[1][1].source == beir / "pics" / "c.png"


def test_parquet_image_column_paths_and_bytes(images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reranker.jobs.readers import read_input

    data = (images / "imgs" / "p3.png").read_bytes()
    path = images / "flat.parquet"
    pq.write_table(pa.table({"query_id": ["q", "q", "q"], "query": [QUERY] * 3, "doc_id": ["a", "b", "c"],
                             "image": pa.array([data, b"", data], pa.binary())}), path)
    items = list(read_input(path))
    assert isinstance(items[1], Reject) and "0 bytes" in items[1].reason
    assert [u.docs[0][1].source for u in items if isinstance(u, Unit)] == [data, data]
    strings = images / "paths.parquet"
    pq.write_table(pa.table({"query_id": ["q", "q"], "query": [QUERY] * 2, "doc_id": ["a", "b"],
                             "document": [None, "some text"], "image": ["imgs/p3.png", None]}), strings)
    a, b = read_input(strings)
    assert a.docs[0][1].source == images / "imgs" / "p3.png" and b.docs[0][1] == "some text"


def _nested_input(images, name="in.jsonl", n=6):
    """Records of two or three documents: images (relative paths) and texts mixed."""
    records = []
    for q in range(n):
        docs = [{"id": f"i{q}", "image": f"imgs/p{q % 6}.png"}, {"id": f"t{q}", "text": f"a text about sales number {q}"}]
        if q % 2:
            docs.append({"id": f"j{q}", "image": f"imgs/p{(q + 3) % 6}.png"})
        records.append({"query_id": f"q{q}", "query": f"{QUERY} {q}", "documents": docs})
    return write_jsonl(images / name, records), records


def test_image_job_equals_compute_score(vision_gguf, vision_reranker, images, tmp_path, capsys):
    inp, records = _nested_input(images, n=4)  # 2, 3, 2, 3 documents: windows of 5 pairs, as batches of 5
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(vision_gguf, inp, out, window=5) + ["--per", "pair"])
    assert rc == 0, err
    got = [(r["query_id"], r["doc_id"], r["score"]) for r in read_jsonl(out)]
    pairs = [[r["query"], {"image": images / d["image"]} if "image" in d else {"text": d["text"]}]
             for r in records for d in r["documents"]]
    want = vision_reranker.compute_score(pairs, batch_size=5)
    assert [(q, d) for q, d, _ in got] == [(r["query_id"], d["id"]) for r in records for d in r["documents"]]
    assert [s for _, _, s in got] == want  # exact: the same window is the same call
    summary = json.loads(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["pairs"] == 10 and summary["skipped"] == 0
    assert summary["tokens"] == vision_reranker.last_usage.tokens  # an image's rows count as its tokens


def test_bad_images_are_rejected_alone(vision_gguf, vision_reranker, images, tmp_path, capsys):
    os.mkfifo(images / "imgs" / "fifo.png") if not (images / "imgs" / "fifo.png").exists() else None
    if not (images / "imgs" / "dir.png").exists():
        (images / "imgs" / "dir.png").mkdir()
        os.symlink("/dev/zero", images / "imgs" / "zero.png")
    bad = ["missing.png", "truncated.png", "bomb.png", "notes.txt", "fifo.png", "dir.png", "zero.png"]
    docs = [{"id": "good0", "image": "imgs/p0.png"}]
    for i, name in enumerate(bad):
        docs += [{"id": f"bad{i}", "image": f"imgs/{name}"}, {"id": f"text{i}", "text": f"text {i}"}]
    docs.insert(3, {"id": 7})  # a text reject from the reader, among the image rejects
    inp = write_jsonl(images / "bad.jsonl", [{"query_id": "q", "query": QUERY, "documents": docs},
                                             {"query_id": "r", "query": QUERY, "documents": [{"id": "x", "image": "imgs/missing.png"}]},
                                             {"query_id": "s", "query": QUERY, "documents": [{"id": "y", "image": "imgs/p1.png"}]}])
    out = tmp_path / "out.jsonl"
    before = sorted((p.name, p.lstat().st_mtime_ns) for p in (images / "imgs").iterdir())
    rc, err = _main(capsys, score_args(vision_gguf, inp, out, window=64) + ["--on-error", "skip"])
    assert rc == 0, err
    assert sorted((p.name, p.lstat().st_mtime_ns) for p in (images / "imgs").iterdir()) == before  # nothing written beside them
    rejects = read_jsonl(out.with_name("out.jsonl.rejects.jsonl"))
    assert [(r["source"], r.get("doc_index")) for r in rejects] == \
        [(f"{inp}:1", i) for i in (1, 3, 4, 6, 8, 10, 12, 14)] + [(f"{inp}:2", 0)]
    reasons = [r["reason"] for r in rejects]
    assert "missing field" in reasons[1]
    image_reasons = reasons[:1] + reasons[2:]
    for reason, name in zip(image_reasons, bad + ["missing.png"]):
        assert f"imgs/{name}" in reason, (reason, name)
    assert "not found" in image_reasons[0] and "truncated" in image_reasons[1] and "decompression" in image_reasons[2]
    assert "not an image" in image_reasons[3] and "fifo" in image_reasons[4] and "folder" in image_reasons[5]
    assert "character device" in image_reasons[6]
    assert json.loads(rejects[0]["raw"]) == {"id": "bad0", "image": "imgs/missing.png"}
    lines = read_jsonl(out)
    assert [x["query_id"] for x in lines] == ["q", "s"]
    results = sorted((r["index"], r["doc_id"], r["relevance_score"], r["document"]) for r in lines[0]["results"])
    assert [(i, d) for i, d, _, _ in results] == [(0, "good0")] + [(2 * i + 2 + (i > 0), f"text{i}") for i in range(7)]
    assert results[0][3] == {"image": "imgs/p0.png"} and results[1][3] == {"text": "text 0"}
    # the record's other documents are scored as a record of them alone would be
    want = vision_reranker.compute_score([[QUERY, {"image": images / "imgs" / "p0.png"}]] +
                                         [[QUERY, f"text {i}"] for i in range(7)] + [[QUERY, {"image": images / "imgs" / "p1.png"}]],
                                         batch_size=64)
    assert [s for _, _, s, _ in results] + [lines[1]["results"][0]["relevance_score"]] == want
    assert json.loads(out.with_name("out.jsonl.summary.json").read_text())["skipped"] == 9


def test_on_error_fail_names_file_record_and_document(vision_gguf, images, tmp_path, capsys):
    inp = write_jsonl(images / "fail.jsonl", [{"query_id": "q", "query": QUERY, "documents": [
        {"id": "a", "image": "imgs/p0.png"}, {"id": "b", "image": "imgs/truncated.png"}]}])
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(vision_gguf, inp, out))
    assert rc == 2, err
    assert f"{inp}:1: unusable image imgs/truncated.png" in err and "(query 'q', document 1)" in err and "--on-error skip" in err


def test_no_projector_is_a_clear_error(tiny_ggufs, images, tmp_path, capsys):
    import shutil

    model = tmp_path / "model" / tiny_ggufs["f32"].name  # a GGUF with no mmproj-*.gguf beside it
    model.parent.mkdir()
    shutil.copy(tiny_ggufs["f32"], model)
    shutil.copy(tiny_ggufs["f32"].parent / "mlp_weights.npz", model.parent)
    texts = [{"query_id": f"t{i}", "query": QUERY, "documents": [f"text {i}", f"more text {i}"]} for i in range(4)]
    _, records = _nested_input(images, "one.jsonl", n=1)
    inp = write_jsonl(images / "texts-then-image.jsonl", texts + records)
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(model, inp, out))
    assert rc == 2 and f"{inp}:5: document 0 is an image" in err and "--mmproj" in err and "Traceback" not in err
    assert json.loads(out.with_name("out.jsonl.checkpoint.json").read_text())["consumed"] == 4  # the texts are kept
    rc, err = _main(capsys, score_args(model, inp, out, "--mmproj", images / "imgs" / "nothing.gguf"))
    assert rc == 2 and "nothing.gguf" in err
    # With the projector the job resumes (no image was scored without it) and ends as a clean run.
    mmproj = next(tiny_ggufs["f32"].parent.glob("mmproj-*.gguf"))
    rc, err = _main(capsys, score_args(model, inp, out, "--mmproj", mmproj))
    assert rc == 0 and "already" not in err, err
    clean = tmp_path / "clean.jsonl"
    assert _main(capsys, score_args(model, inp, clean, "--mmproj", mmproj))[0] == 0
    assert out.read_bytes() == clean.read_bytes()


@pytest.mark.slow
def test_sigkill_and_resume_with_images_equals_clean_run(vision_gguf, images, tmp_path):
    """Image documents and a whole PDF's pages (expanded by the reader, rendered per window) resume exactly."""
    inp, records = _nested_input(images, "many.jsonl", n=24)  # 60 pairs, and 3 in the PDF record: windows of 16 pairs
    if not (images / "imgs" / "doc.pdf").exists():
        write_pdf(images / "imgs" / "doc.pdf", pages=[(200, 300), (300, 200)])
    records.insert(9, {"query_id": "pdf", "query": QUERY, "documents": [{"id": "doc", "pdf": "imgs/doc.pdf"}, "a text"]})
    write_jsonl(inp, records)
    clean, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    assert run_here(score_cmd(vision_gguf, inp, clean)) == 0  # only the killed runs need processes of their own
    killed = 0
    for after, delay in [(2, 0.01), (8, 0.02)]:  # each kill leaves windows to do, so the last run writes the summary
        killed += kill_when(score_cmd(vision_gguf, inp, out), out, after, delay) == -signal.SIGKILL
    assert killed >= 1, "no run was killed mid-way: the test proves nothing"
    assert run_here(score_cmd(vision_gguf, inp, out)) == 0
    assert out.read_bytes() == clean.read_bytes()
    summary = json.loads(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["pairs"] == 63 and summary["tokens"] == json.loads(clean.with_name("clean.jsonl.summary.json").read_text())["tokens"]
    assert b'"doc#2"' in clean.read_bytes()


def test_fingerprint_covers_the_projector(vision_gguf, images, tmp_path, capsys):
    inp, _ = _nested_input(images, "two.jsonl", n=2)
    out = tmp_path / "out.jsonl"
    assert _main(capsys, score_args(vision_gguf, inp, out))[0] == 0
    state = json.loads(out.with_name("out.jsonl.checkpoint.json").read_text())
    mmproj = next(vision_gguf.parent.glob("mmproj-*.gguf"))
    assert state["fingerprint"]["vision"]["mmproj"]["path"] == str(mmproj.resolve())
    assert state["fingerprint"]["vision"]["sizing"]["max_pixels"] == 602112
    other = tmp_path / "mmproj-other.gguf"
    data = bytearray(mmproj.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    rc, err = _main(capsys, score_args(vision_gguf, inp, out, "--mmproj", other))
    assert rc == 2 and "different vision" in err and "--restart" in err


def _pictures(images, root):
    """A folder of its own holding copies of the fixture's pictures (and its truncated PNG), to change at will.
    Only those: other tests add special files to the fixture's folder (a link to /dev/zero, a folder)."""
    import shutil

    (root / "imgs").mkdir(parents=True)
    for f in [*(images / "imgs").glob("p[0-9].png"), images / "imgs" / "truncated.png"]:
        shutil.copy(f, root / "imgs")
    return root


def test_a_resume_refuses_image_files_changed_since_they_were_scored(vision_gguf, images, tmp_path, capsys, monkeypatch):
    """The input is hashed whole; the image files it names are stamped (size, modification time) per record."""
    root = _pictures(images, tmp_path / "in")
    inp, records = _nested_input(root, n=4)
    records.append({"query_id": "late", "query": QUERY, "documents": [{"id": "l", "image": "imgs/late.png"}]})
    write_jsonl(inp, records)
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(vision_gguf, inp, out, window=2))  # stops at the missing image
    assert rc == 2 and "imgs/late.png" in err, err
    checkpoint = out.with_name("out.jsonl.checkpoint.json")
    assert json.loads(checkpoint.read_text())["consumed"] == 4
    picture(64, 64, 99).save(root / "imgs" / "late.png")  # the record that stopped it: not scored yet, so no change
    draft = out.with_name("out.jsonl.partial")
    done = draft.read_bytes()
    p0 = root / "imgs" / "p0.png"
    st, data = p0.stat(), p0.read_bytes()
    for change in ["content", "time"]:
        if change == "content":
            picture(40, 30, 7).save(p0)  # another picture of the same size, written now
        else:
            p0.write_bytes(data)  # the same bytes, written now: the stamp cannot tell, so it refuses too
        rc, err = _main(capsys, score_args(vision_gguf, inp, out, window=2))
        assert rc == 2 and "image files of the first 4 records" in err and "--restart" in err, err
        assert draft.read_bytes() == done and json.loads(checkpoint.read_text())["consumed"] == 4  # left as it was
    os.utime(p0, ns=(st.st_atime_ns, st.st_mtime_ns))  # restored as it was: the job goes on
    monkeypatch.chdir(root)  # from another folder, the input spelt otherwise: the same files
    rc, err = _main(capsys, score_args(vision_gguf, inp.name, out, window=2))
    assert rc == 0, err
    monkeypatch.undo()
    clean = tmp_path / "clean.jsonl"
    assert _main(capsys, score_args(vision_gguf, inp, clean, window=2))[0] == 0
    assert out.read_bytes() == clean.read_bytes()
    # A finished job is checked too: not "already done" from files that are no longer those it scored.
    picture(40, 30, 7).save(p0)
    rc, err = _main(capsys, score_args(vision_gguf, inp, out, window=2))
    assert rc == 2 and "image files of the first 5 records" in err, err
    assert _main(capsys, score_args(vision_gguf, inp, out, "--restart", window=2))[0] == 0
    assert out.read_bytes() != clean.read_bytes()  # p0's pairs scored from its new picture


def test_ray_callable_scores_image_columns(vision_gguf, vision_reranker, images):
    """`RayReranker` called directly (what each actor runs): paths or bytes in an `image` column, text rows beside."""
    import pyarrow as pa

    from reranker import RerankerError
    from reranker.jobs.ray_data import RayReranker

    scorer = RayReranker(str(vision_gguf), load={"n_ctx": 1024}, drop=("image",))
    p0, p1 = images / "imgs" / "p0.png", images / "imgs" / "p1.png"
    want = vision_reranker.compute_score([[QUERY, {"image": p0}], [QUERY, "a text about sales"], [QUERY, {"image": p1}]])
    docs = [None, "a text about sales", None]
    paths = pa.table({"query": [QUERY] * 3, "document": docs, "image": [str(p0), None, str(p1)]})
    data = pa.table({"query": [QUERY] * 3, "document": docs, "image": pa.array([p0.read_bytes(), None, p1.read_bytes()], pa.binary())})
    for batch in (paths, data):  # one batch is one call, as compute_score's batch of 3
        out = scorer(batch)
        assert out.column_names == ["query", "document", "score"] and out.column("score").to_pylist() == want
    alone = scorer(pa.table({"query": [QUERY], "image": [str(p1)]})).column("score").to_pylist()  # no document column
    assert alone == pytest.approx(want[2:], abs=1e-6)  # a batch of one: packed alone, the last bits may differ
    with pytest.raises(RerankerError, match=r"row 1 image .*truncated\.png could not be decoded"):
        scorer(pa.table({"query": [QUERY] * 2, "image": [str(p0), str(images / "imgs" / "truncated.png")]}))
    with pytest.raises(RerankerError, match="row 0 of the batch: 'document' is None"):
        scorer(pa.table({"query": [QUERY], "document": pa.array([None], pa.string()), "image": pa.array([None], pa.string())}))


def _with_bad_images(images, name: str) -> object:
    """The mixed input, plus a record with a truncated image and a missing one between good documents, and one
    with a whole PDF (2 pages, rendered on the reader thread as images are decoded) and a page out of range."""
    inp, records = _nested_input(images, name, n=12)
    records.insert(5, {"query_id": "bad", "query": QUERY, "documents": [
        {"id": "t", "image": "imgs/truncated.png"}, {"id": "ok", "text": "sales"}, {"id": "m", "image": "imgs/missing.png"},
        {"id": "ok2", "image": "imgs/p4.png"}]})
    if not (images / "imgs" / "doc.pdf").exists():
        write_pdf(images / "imgs" / "doc.pdf", pages=[(200, 300), (300, 200)])
    records.insert(9, {"query_id": "pdf", "query": QUERY, "documents": [
        {"id": "doc", "pdf": "imgs/doc.pdf"}, {"id": "far", "pdf": "imgs/doc.pdf", "page": 3}, "a text"]})
    return write_jsonl(inp, records)


@pytest.mark.slow
def test_two_cpu_processes_equal_one_with_images(vision_gguf, images, tmp_path):
    """The projector reaches the device processes (found beside the GGUF by the preflight, passed on)."""
    inp = _with_bad_images(images, "devices.jsonl")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["--threads", "1", "--on-error", "skip", "--window", "6"]  # several windows for the two processes
    assert run_here(score_cmd(vision_gguf, inp, one, *args)) == 0
    res = run(score_cmd(vision_gguf, inp, two, "--devices", "cpu,cpu", *args))
    assert res.returncode == 0, res.stderr
    assert two.read_bytes() == one.read_bytes()
    assert two.with_name("two.jsonl.rejects.jsonl").read_bytes() == one.with_name("one.jsonl.rejects.jsonl").read_bytes()


@pytest.mark.slow
def test_ray_job_with_images_equals_the_local_job(ray_cluster, vision_gguf, images, tmp_path, capsys):
    import pyarrow.parquet as pq
    import torch

    root = _pictures(images, tmp_path / "in")
    inp = _with_bad_images(root, "ray.jsonl")
    records = read_jsonl(inp)
    records[0]["documents"][0]["image"] = "imgs/only.png"  # a picture of the first shard alone
    (root / "imgs" / "only.png").write_bytes((root / "imgs" / "p0.png").read_bytes())
    write_jsonl(inp, records)
    local, out = tmp_path / "local.parquet", tmp_path / "ray"
    args = ["--threads", "1", "--on-error", "skip"]

    def run_local(*extra):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a Ray actor (OMP_NUM_THREADS=1): the head's bits depend on torch's threads
        try:
            rc, err = _main(capsys, score_args(vision_gguf, inp, local, *args, *extra, window=8))
        finally:
            torch.set_num_threads(threads)
        assert rc == 0, err

    def run_ray():
        rc, err = _main(capsys, score_args(vision_gguf, inp, out, *args, "--engine", "ray", "--actors", "1", "--shard-windows", "2",
                                           window=8))
        assert rc == 0, err

    run_local()
    run_ray()
    assert pq.read_table(out).equals(pq.read_table(local)), "scores differ from the local job's"
    rejects = out.with_name("ray.rejects.jsonl").read_bytes()
    assert rejects == local.with_name("local.parquet.rejects.jsonl").read_bytes()
    assert [json.loads(x)["doc_index"] for x in rejects.decode().splitlines()] == [0, 2, 2]  # the PDF's pages are 0 and 1
    # An image file changed since (another picture of the same size): the rerun scores its shard again, the
    # other part stays.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    picture(40, 30, 7).save(root / "imgs" / "only.png")
    run_local("--restart")
    run_ray()
    assert pq.read_table(out).equals(pq.read_table(local)), "a part kept the scores of before"
    assert out.with_name("ray.rejects.jsonl").read_bytes() == local.with_name("local.parquet.rejects.jsonl").read_bytes()
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert sum(after[n] != before[n] for n in before) == 1, (before, after)  # the shard of that record only


def test_an_image_too_large_for_max_length_is_rejected_alone(vision_gguf, vision_reranker, images, tmp_path, capsys):
    from reranker.engine.vision import load
    from reranker.images.preprocess import Sizing
    from reranker.options import ImageRef

    small = vision_reranker.prompt_builder().build_parts(QUERY, load(ImageRef(images / "imgs" / "p5.png", "p5"), Sizing()))
    max_length = max(16, len(small.ids))  # p5 (2 x 2 merged patches) fits; p4 (11 x 2) does not
    link = images / "imgs" / "p5-link.png"  # a symbolic link to an image is followed, as any program opening it would
    if not link.is_symlink():
        os.symlink("p5.png", link)
    inp = write_jsonl(images / "long.jsonl", [{"query_id": "q", "query": QUERY, "documents": [
        {"id": "big", "image": "imgs/p4.png"}, {"id": "fits", "image": "imgs/p5-link.png"}]}])
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(vision_gguf, inp, out, "--max-length", max_length, "--on-error", "skip"))
    assert rc == 0, err
    (reject,) = read_jsonl(out.with_name("out.jsonl.rejects.jsonl"))
    assert reject["doc_index"] == 0 and "imgs/p4.png" in reject["reason"] and f"max_length={max_length}" in reject["reason"]
    (result,) = read_jsonl(out)[0]["results"]
    assert (result["index"], result["doc_id"], result["document"]) == (1, "fits", {"image": "imgs/p5-link.png"})
    want = vision_reranker.compute_score([[QUERY, {"image": images / "imgs" / "p5.png"}]], max_length=max_length)
    assert result["relevance_score"] == want[0]


def test_a_window_holds_at_most_window_images_images():
    """Records of image documents are cut into windows of at most WINDOW_IMAGES images, even under --window pairs."""
    from pathlib import Path

    from reranker.jobs.images import WINDOW_IMAGES
    from reranker.jobs.job import JobSpec, cut_windows

    def unit(i: int, n_images: int, n_texts: int = 0) -> Unit:
        docs = [(f"i{k}", ImageDoc(f"{k}.png", Path(f"/x/{k}.png"))) for k in range(n_images)] + [(f"t{k}", "text") for k in range(n_texts)]
        return Unit(i, f"q{i}", "query", docs, f"in.jsonl:{i + 1}")

    spec = JobSpec(input=None, output=Path("out.jsonl"))
    items = [unit(i, 3, 2) for i in range(200)]
    windows = list(cut_windows(iter(items), 0, 10_000, spec))
    counts = [sum(isinstance(d, ImageDoc) for u in w.units for _, d in u.docs) for w in windows]
    full = 3 * (WINDOW_IMAGES // 3)  # whole records of 3 images, up to the cap
    assert counts == [full] * (600 // full) + [600 % full] and sum(len(w.units) for w in windows) == 200
    assert [w.end for w in windows][-1] == 200 and all(w.items == w.units for w in windows)
    big = list(cut_windows(iter([unit(0, WINDOW_IMAGES + 5), unit(1, 1)]), 0, 10_000, spec))  # one record is never split
    assert [len(w.units[0].docs) for w in big] == [WINDOW_IMAGES + 5, 1]


def test_parquet_job_with_image_bytes(vision_gguf, vision_reranker, images, tmp_path, capsys):
    """Flat pairs in Parquet: encoded images (a binary column) and a text in one query; a corrupt blob rejected alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p0, p2 = images / "imgs" / "p0.png", images / "imgs" / "p2.png"
    inp = images / "pairs.parquet"
    pq.write_table(pa.table({"query_id": ["q"] * 4, "query": [QUERY] * 4, "doc_id": ["bytes", "bad", "more", "text"],
                             "document": [None, None, None, "a text about sales"],
                             "image": pa.array([p0.read_bytes(), b"\x89PNG not really", p2.read_bytes(), None], pa.binary())}), inp)
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, score_args(vision_gguf, inp, out, "--on-error", "skip", "--per", "pair", window=8))
    assert rc == 0, err
    (reject,) = read_jsonl(out.with_name("out.jsonl.rejects.jsonl"))
    assert reject["source"] == f"{inp}:row 1" and "<15 bytes>" in reject["reason"] and "not an image" in reject["reason"]
    got = read_jsonl(out)
    assert [r["doc_id"] for r in got] == ["bytes", "more", "text"]
    want = vision_reranker.compute_score([[QUERY, {"image": p0}], [QUERY, {"image": p2}], [QUERY, "a text about sales"]], batch_size=8)
    assert [r["score"] for r in got] == want
