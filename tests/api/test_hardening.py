"""Hardening: threads, closed objects, bad text and arguments, non-finite scores, bad files, the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import modes_hold, write_gguf

from head import ScoringHead
from reranker import Reranker, RerankerError
from reranker.engine.backbone import VocabOnly
from reranker.engine.identity import cached_copies, clear_cache, with_identity_output
from reranker.gguf.hub import resolve

PAIRS = [["what is a reranker?", "A reranker scores documents."], ["机器学习", "机器学习是人工智能的一个分支。"],
         ["emoji 🎉", "Party 🎉 time"]]


def cli_process(*args: str | bytes) -> subprocess.CompletedProcess:
    """`python -m reranker ARGS` in a process of its own (bytes arguments pass through undecoded); stderr as text."""
    res = subprocess.run([sys.executable, "-m", "reranker", *args], capture_output=True, timeout=300)
    res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode(errors="backslashreplace")
    return res


@pytest.fixture()
def cli(cli_here):
    """`reranker ARGS` in this process (conftest's `cli_here`); only undecodable arguments need a process (`cli_process`)."""
    return cli_here


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.fixture()
def gguf_path(tiny_ggufs):
    return str(tiny_ggufs["f32"])


@pytest.fixture()
def head_npz(tiny_ggufs):
    return str(tiny_ggufs["f32"].parent / "mlp_weights.npz")


@pytest.fixture()
def own_reranker(gguf_path):
    """A Reranker of its own, for tests that close it."""
    r = Reranker.from_pretrained(gguf_path, device="cpu", n_ctx=1024, n_batch=512)
    yield r
    r.close()


# --- 1. threads --------------------------------------------------------------------------------

def test_threads_sharing_one_reranker_get_single_thread_scores(tiny_reranker):
    want = tiny_reranker.compute_score(PAIRS)
    got, errors = [], []

    def work():
        try:
            for _ in range(12):
                got.append(tiny_reranker.compute_score(PAIRS))
                got.append(tiny_reranker.rank(PAIRS[0][0], [d for _, d in PAIRS]))
        except Exception as e:  # any error fails the test below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    scores = [g for g in got if not isinstance(g[0], dict)]
    ranks = [g for g in got if isinstance(g[0], dict)]
    assert len(scores) == len(ranks) == 8 * 12
    assert all(s == want for s in scores)  # exactly, not approximately
    assert all(r == ranks[0] for r in ranks)


def test_close_while_threads_score_raises_instead_of_crashing(own_reranker):
    outcomes = []

    def work():
        try:
            while True:
                own_reranker.compute_score(PAIRS)
        except RerankerError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    own_reranker.close()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == 4 and all("closed" in o for o in outcomes), outcomes


def test_close_holds_the_projector_until_the_model_is_freed(own_reranker, monkeypatch):
    # A thread asking for the projector while close() frees the model must get "closed", not a new projector
    # loaded on the model being freed (which then segfaulted on its first image).
    backbone_close = own_reranker.backbone.close
    monkeypatch.setattr(own_reranker.backbone, "close", lambda: (time.sleep(1.0), backbone_close()))
    closer = threading.Thread(target=own_reranker.close)
    closer.start()
    time.sleep(0.3)  # close() has dropped the projector and is freeing the model
    with pytest.raises(RerankerError, match="this Reranker is closed"):
        _ = own_reranker.vision
    closer.join()
    assert own_reranker._vision is None and own_reranker.backbone.closed


# --- 2. closed objects -----------------------------------------------------------------------------

def test_closed_reranker_raises(own_reranker):
    tokenizer = own_reranker.backbone.tokenizer
    own_reranker.close()
    own_reranker.close()  # twice is fine
    for call in (lambda: own_reranker.compute_score(PAIRS), lambda: own_reranker.compute_score([]),
                 lambda: own_reranker.rank("q", ["d"]), lambda: own_reranker.embed(PAIRS), own_reranker.prompt_builder):
        with pytest.raises(RerankerError, match="this Reranker is closed"):
            call()
    with pytest.raises(RerankerError, match="Backbone .* is closed"):
        own_reranker.backbone.embed([[1, 2, 3]])
    with pytest.raises(RerankerError, match="model was freed"):
        tokenizer.encode("text")


def test_with_block_closes_the_reranker(own_reranker):
    with own_reranker as rr:
        assert rr is own_reranker and len(rr.compute_score(PAIRS[:2])) == 2
    with pytest.raises(RerankerError, match="this Reranker is closed"):
        own_reranker.compute_score(PAIRS[:2])


def test_tokenizer_of_a_closed_vocab_only_raises(gguf_path):
    vocab = VocabOnly(gguf_path)
    tokenizer = vocab.tokenizer
    assert tokenizer.encode("hello") and tokenizer.decode(tokenizer.encode("hello")) == "hello"
    vocab.close()
    vocab.close()
    with pytest.raises(RerankerError, match="model was freed"):
        tokenizer.encode("hello")
    with pytest.raises(RerankerError, match="model was freed"):
        tokenizer.decode([1, 2])


# --- 3. bad text and bad pairs -------------------------------------------------------------------

@pytest.mark.parametrize("pairs,match", [
    ([["q", "d"]] * 3 + [["q", "abcd\ud800e"]], r"pair 3: the document holds a lone surrogate \\ud800 at character 4"),
    ([["q\udcff", "d"]], r"pair 0: the query holds a lone surrogate \\udcff at character 1"),
    (None, "got NoneType"),
    (3, "got int"),
    ({"q": "d"}, "got dict"),
    ("qd", "pairs must be a list .* got str"),  # not read as the pair ("q", "d")
    (b"qd", "pairs must be a list .* got bytes"),
    ([["q", "d"], "qd"], "pair 1 must be a \\[query, document\\]"),
    ([{"q": "d"}], "pair 0 must be .* got dict"),
])
def test_bad_pairs_are_clear_errors(tiny_reranker, pairs, match):
    with pytest.raises(RerankerError, match=match):
        tiny_reranker.compute_score(pairs)


def test_lone_surrogate_in_rank_and_tokenizer(tiny_reranker):
    with pytest.raises(RerankerError, match=r"pair 1: the document holds a lone surrogate \\ud800"):
        tiny_reranker.rank("q", ["fine", "bad \ud800"])
    with pytest.raises(RerankerError, match=r"lone surrogate \\ud800 at character 2"):
        tiny_reranker.backbone.tokenizer.encode("ab\ud800")


def test_iterables_of_pairs_and_empty_input(tiny_reranker):
    want = tiny_reranker.compute_score(PAIRS)
    assert tiny_reranker.compute_score(tuple(p) for p in PAIRS) == want
    assert tiny_reranker.compute_score([]) == []
    assert tiny_reranker.rank("q", iter([])) == []
    docs = [d for _, d in PAIRS]
    assert tiny_reranker.rank(PAIRS[0][0], iter(docs), return_documents=True) == \
        tiny_reranker.rank(PAIRS[0][0], docs, return_documents=True)
    with pytest.raises(RerankerError, match="documents must be a list of strings, got NoneType"):
        tiny_reranker.rank("q", None)


# --- 4. top_k ------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [-1, 0, 1.5, True])
def test_top_k_must_be_positive(tiny_reranker, top_k):
    with pytest.raises(RerankerError, match="top_k="):
        tiny_reranker.rank("q", ["a", "b"], top_k=top_k)


def test_top_k_one_and_more_than_all(tiny_reranker):
    assert len(tiny_reranker.rank("q", ["a", "b"], top_k=1)) == 1
    assert len(tiny_reranker.rank("q", ["a", "b"], top_k=5)) == 2


# --- 5. non-finite scores ------------------------------------------------------------------------

def nan_head(hidden: int) -> ScoringHead:
    head = ScoringHead(hidden)
    with torch.no_grad():
        head.fc2.bias.fill_(float("nan"))
    return head


def test_nan_head_raises_not_nan_scores(tiny_reranker):
    broken = Reranker(tiny_reranker.backbone, nan_head(tiny_reranker.backbone.n_embd), device="cpu")
    with pytest.raises(RerankerError, match="non-finite score .* for pair 0; the head is likely broken"):
        broken.compute_score(PAIRS)
    with pytest.raises(RerankerError, match="non-finite score"):
        broken.rank("q", ["a", "b"])


def test_head_command_rejects_nan_npy(tmp_path, head_npz, tiny_reranker, cli):
    emb = np.random.default_rng(0).standard_normal((10, tiny_reranker.backbone.n_embd)).astype(np.float32)
    emb[7, 3] = np.nan
    np.save(tmp_path / "emb.npy", emb)
    assert_one_line_error(cli("head", str(tmp_path / "emb.npy"), "--head", head_npz, "--device", "cpu"), "embedding 7", "NaN or inf")


def test_head_command_checks_every_streamed_chunk(tmp_path, head_npz, tiny_reranker, cli):
    rows = np.random.default_rng(0).standard_normal((12, tiny_reranker.backbone.n_embd)).round(3).tolist()
    rows[9][0] = 1e39  # a float32 overflow: inf once read
    (tmp_path / "emb.json").write_text(str(rows))
    res = cli("head", str(tmp_path / "emb.json"), "--head", head_npz, "--device", "cpu", "--batch-size", "4")
    assert_one_line_error(res, "embedding 9")


def test_head_command_rejects_non_finite_scores(tmp_path, head_npz, tiny_reranker, cli):
    # Finite embeddings near float32's limit overflow inside the head: inf - inf = nan.
    signs = np.sign(np.random.default_rng(0).standard_normal((3, tiny_reranker.backbone.n_embd)))
    np.save(tmp_path / "emb.npy", (signs * 3e38).astype(np.float32))
    assert_one_line_error(cli("head", str(tmp_path / "emb.npy"), "--head", head_npz, "--device", "cpu"),
                          "non-finite score for embedding 0")


# --- 6. arguments, checked before any file is read -------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"max_length": -1}, "max_length=-1"), ({"max_length": 15}, "max_length=15"), ({"max_query_length": 0}, "max_query_length=0"),
    ({"n_batch": -1}, "n_batch=-1"), ({"n_batch": 0}, "n_batch=0"), ({"n_ctx": 8}, "n_ctx=8"),
    ({"n_threads": 0}, "n_threads=0"), ({"n_threads": -1}, "n_threads=-1"), ({"batch_size": 0}, "batch_size=0"),
    ({"device": "bogus"}, "device 'bogus' is not a torch device"), ({"kv_type": "f8"}, "kv_type='f8'"),
    # Values llama.cpp's C structs cannot hold (they wrap, then abort) or its thread pool cannot start (segfault).
    ({"n_threads": 100_000}, r"n_threads=100000 is invalid; it must be an integer from 1 to 512"),
    ({"n_ctx": 2**32 + 16}, r"n_ctx=4294967312 .* from 16 to 2147483647"), ({"n_batch": 2**31}, "n_batch=2147483648"),
    # Types: a wrong one is named, not a TypeError/KeyError from deep inside, nor a string taken as true.
    ({"quant": 5}, r"quant=5 must be a level name"), ({"flash_attn": "yes"}, r"flash_attn='yes' must be True, False or None"),
    ({"fast": "no"}, r"fast='no' must be True or False"), ({"bf16": "yes"}, r"bf16='yes' must be True, False or None"),
    ({"local_files_only": "x"}, r"local_files_only='x'"), ({"deterministic": 1}, r"deterministic=1 must be True or False"),
])
def test_from_pretrained_checks_arguments_first(tmp_path, kwargs, match):
    with pytest.raises(RerankerError, match=match):  # not "not found": nothing was read yet
        Reranker.from_pretrained(str(tmp_path / "missing.gguf"), **kwargs)


@pytest.mark.parametrize("model", [None, 5, "", "/tmp/a\x00b.gguf"])
def test_a_model_that_is_no_path_or_hub_id_is_named(model):
    with pytest.raises(RerankerError, match=r"^model=.* is not a model: pass a \.gguf path"):
        Reranker.from_pretrained(model)


def test_a_model_path_may_be_a_path_object(gguf_path, tiny_reranker):
    with Reranker.from_pretrained(Path(gguf_path), device="cpu") as rr:
        assert rr.compute_score([["q", "d"]]) == pytest.approx(tiny_reranker.compute_score([["q", "d"]]), abs=1e-6)


def test_call_arguments_are_checked(tiny_reranker):
    for kwargs in ({"batch_size": -1}, {"max_length": 3}, {"max_query_length": 0}):
        with pytest.raises(RerankerError, match="is invalid"):
            tiny_reranker.compute_score(PAIRS, **kwargs)


@pytest.mark.parametrize("args,needle", [
    (["rerank", "--max-length", "-1"], "max_length=-1"),
    (["rerank", "--max-query-length", "0"], "max_query_length=0"),
    (["rerank", "--n-batch", "-1"], "n_batch=-1"),
    (["rerank", "--n-batch", "0"], "n_batch=0"),
    (["rerank", "--n-ctx", "8"], "n_ctx=8"),
    (["rerank", "--threads", "0"], "n_threads=0"),
    (["rerank", "--threads", "-1"], "n_threads=-1"),
    (["rerank", "--device", "bogus"], "device 'bogus'"),
    (["rerank", "--top-n", "-1"], "top_k=-1"),
    (["embed", "-p", "x<|box_end|>", "--n-batch", "0"], "n_batch=0"),
    (["embed", "-p", "x<|box_end|>", "--threads", "0"], "n_threads=0"),
])
def test_cli_checks_arguments_first(tmp_path, args, needle, cli):
    command, *rest = args
    extra = ["-q", "q", "-d", "d"] if command == "rerank" else []
    assert_one_line_error(cli(command, "-m", str(tmp_path / "missing.gguf"), *extra, *rest), needle)


def test_head_command_checks_device(tmp_path, head_npz, cli):
    np.save(tmp_path / "emb.npy", np.zeros((2, 4), np.float32))
    assert_one_line_error(cli("head", str(tmp_path / "emb.npy"), "--head", head_npz, "--device", "bogus"), "device 'bogus'")


# --- 7. non-UTF-8 command-line arguments -----------------------------------------------------------

@pytest.mark.slow  # real processes
@pytest.mark.parametrize("args,needle", [
    ([b"-q", b"\xff", b"-d", b"d"], "the value of -q is not valid UTF-8"),
    ([b"-q", b"q", b"--document=a\xffb"], "--document is not valid UTF-8"),
])
def test_non_utf8_arguments(gguf_path, args, needle):
    assert_one_line_error(cli_process("rerank", "-m", gguf_path, *args), needle)


# --- 8. files ------------------------------------------------------------------------------------

@pytest.fixture()
def no_tokenizer_gguf(tmp_path):
    return write_gguf(tmp_path / "notok-F32.gguf", {}, {"token_embd.weight": np.zeros((4, 8), np.float32)})


@pytest.fixture()
def loop(tmp_path):
    path = tmp_path / "loop.gguf"
    path.symlink_to(path)
    return path


def test_bad_model_files_are_named(tmp_path, no_tokenizer_gguf, loop, head_npz):
    for fast in (True, False):
        with pytest.raises(RerankerError, match="has no tokenizer"):
            Reranker.from_pretrained(str(no_tokenizer_gguf), head=head_npz, fast=fast)
    with pytest.raises(RerankerError, match="GGUF file is a symlink loop"):
        Reranker.from_pretrained(str(loop), head=head_npz)
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(RerankerError, match="GGUF file is a directory"):
        Reranker.from_pretrained(str(tmp_path / "folder.gguf"), head=head_npz)


def test_bad_head_files_are_named(gguf_path, loop):
    with pytest.raises(RerankerError, match="head file is a symlink loop"):
        Reranker.from_pretrained(gguf_path, head=str(loop))


UNREADABLE = """
import sys
from reranker import Reranker, RerankerError
for model, head in (sys.argv[1:3], sys.argv[3:5]):
    try:
        Reranker.from_pretrained(model, head=head)
        print("loaded", model, head)
    except RerankerError as e:
        print(e)
"""


def test_unreadable_gguf_and_head(tmp_path, gguf_path, head_npz):
    """chmod 000 files, opened by a process for which file modes hold, root included (helpers.modes_hold)."""
    locked, locked_head = tmp_path / "locked-F32.gguf", tmp_path / "locked.npz"
    shutil.copy(gguf_path, locked)
    shutil.copy(head_npz, locked_head)
    locked.chmod(0)
    locked_head.chmod(0)
    res = subprocess.run([sys.executable, "-c", UNREADABLE, str(locked), head_npz, gguf_path, str(locked_head)],
                         capture_output=True, text=True, timeout=300, preexec_fn=modes_hold)
    assert res.returncode == 0, res.stderr
    gguf_error, head_error = res.stdout.splitlines()
    assert gguf_error.startswith(f"GGUF file is not readable (permission denied): {locked}; "), gguf_error
    assert f"not readable (permission denied): {locked_head}" in head_error, head_error


def test_fifo_gguf_is_not_a_regular_file(tmp_path, head_npz):
    fifo = tmp_path / "fifo-F32.gguf"
    os.mkfifo(fifo)
    with pytest.raises(RerankerError, match=f"GGUF file is not a regular file: {fifo}"):
        Reranker.from_pretrained(str(fifo), head=head_npz)


@pytest.mark.parametrize("case", ["no tokenizer", "model loop", "head loop", "head command loop", "directory"])
def test_bad_files_on_the_command_line(tmp_path, gguf_path, head_npz, no_tokenizer_gguf, loop, case, cli):
    rerank = ["rerank", "-q", "q", "-d", "d"]
    np.save(tmp_path / "emb.npy", np.zeros((2, 4), np.float32))
    (tmp_path / "folder.gguf").mkdir()
    args, needle = {
        "no tokenizer": (rerank + ["-m", str(no_tokenizer_gguf), "--head", head_npz], "has no tokenizer"),
        "model loop": (rerank + ["-m", str(loop)], "GGUF file is a symlink loop"),
        "head loop": (rerank + ["-m", gguf_path, "--head", str(loop)], "head file is a symlink loop"),
        "head command loop": (["head", str(tmp_path / "emb.npy"), "--head", str(loop)], "head file is a symlink loop"),
        "directory": (rerank + ["-m", str(tmp_path / "folder.gguf")], "GGUF file is a directory"),
    }[case]
    assert_one_line_error(cli(*args), needle)


def test_quant_must_match_a_local_file(gguf_path):
    assert resolve(gguf_path, "F32").gguf == resolve(gguf_path).gguf  # restating the level is fine
    assert resolve(gguf_path, "f32").gguf.name.endswith("F32.gguf")
    for quant in ("Q8_0", "F16"):
        with pytest.raises(RerankerError, match=f"quant='{quant}' but .* is F32"):
            Reranker.from_pretrained(gguf_path, quant=quant)


# --- 9. the identity-output cache ------------------------------------------------------------------

def write_small_gguf(path, value: float = 1.0):
    """A GGUF with just what the identity copy reads (a vocabulary of 32, hidden size 8): copies in milliseconds.
    Copies are keyed by content, so sources that must get copies of their own differ in `value`."""
    kv = {"qwen2vl.embedding_length": 8, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(32)]}
    return write_gguf(path, kv, {"token_embd.weight": np.full((32, 8), value, np.float32)})


@pytest.fixture()
def two_copies(tmp_path):
    """A cache holding two identity copies, of two source GGUFs that the test may change."""
    cache = tmp_path / "cache"
    sources = [write_small_gguf(tmp_path / name, value) for name, value in (("a-F32.gguf", 1.0), ("b-F32.gguf", 2.0))]
    for src in sources:
        with_identity_output(src, "f32", cache_dir=cache)
    return cache, sources


def test_cache_lists_and_clears_copies(two_copies):
    cache, (a, b) = two_copies
    copies = cached_copies(cache)
    assert [c.source for c in copies] == [a.resolve(), b.resolve()]
    assert not any(c.stale for c in copies) and all(c.size == c.path.stat().st_size > 0 for c in copies)
    os.utime(a, ns=(0, 0))  # touched, the same bytes: its copy is still the one used
    assert [c.stale for c in cached_copies(cache)] == [False, False]
    write_small_gguf(a, 3.0)  # the source changed: its copy will never be used again
    assert [c.stale for c in cached_copies(cache)] == [True, False]
    assert [c.source for c in clear_cache(cache, stale_only=True)] == [a.resolve()]
    assert [c.source for c in cached_copies(cache)] == [b.resolve()]
    b.unlink()  # the source is gone
    assert [c.stale for c in cached_copies(cache)] == [True]
    with_identity_output(a, "f32", cache_dir=cache)  # a fresh copy of the changed source
    assert len(clear_cache(cache)) == 2 and cached_copies(cache) == []


def test_cache_command(two_copies, cli):
    cache, (a, b) = two_copies
    a.unlink()
    env = {"RERANKER_CACHE": str(cache)}
    res = cli("cache", "list", env=env)
    assert res.returncode == 0, res.stderr
    assert "2 cached copies" in res.stdout and "1 stale" in res.stdout and str(b.resolve()) in res.stdout
    assert "current" in res.stdout and "in use" not in res.stdout  # it means "source unchanged", not "open"
    res = cli("cache", "clear", "--stale", env=env)
    assert res.returncode == 0 and "removed 1 cached copy" in res.stdout, res.stderr
    res = cli("cache", "clear", "--dir", str(cache))
    assert res.returncode == 0 and "removed 1 cached copy" in res.stdout, res.stderr
    assert cached_copies(cache) == []


def test_cache_clear_leaves_files_without_the_copy_marker(two_copies):
    """A file merely named like a copy (a user's text file, a GGUF of another tool) is neither listed nor deleted."""
    cache, (a, _) = two_copies
    impostors = [cache / "notes.identity-f32-0123456789abcdef.gguf", cache / "other.identity-f16-fedcba9876543210.gguf"]
    impostors[0].write_text("my notes\n")
    write_small_gguf(impostors[1])  # a real GGUF, but no identity copy
    assert len(cached_copies(cache)) == 2
    a.unlink()
    assert len(clear_cache(cache, stale_only=True)) == 1 and len(clear_cache(cache)) == 1
    assert all(p.is_file() for p in impostors) and impostors[0].read_text() == "my notes\n"
