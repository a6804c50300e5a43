"""Shared fixtures: a synthetic tiny jina-reranker-m0, converted to GGUF as the release was."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from reranker.gguf.convert import convert
from reranker.synth.random_checkpoint import synth_checkpoint

# CI installs the test extra, so there a missing optional package is a broken install, not a reason to skip
# a module: `pytest.importorskip` fails instead (RERANKER_REQUIRE_EXTRAS=1, or CI=true as CI sets it).
REQUIRE_EXTRAS = os.environ.get("RERANKER_REQUIRE_EXTRAS") == "1" or os.environ.get("CI", "").lower() in ("1", "true")
_importorskip = pytest.importorskip


def _importorfail(modname: str, *args, **kwargs):
    try:
        return _importorskip(modname, *args, **kwargs)
    except pytest.skip.Exception as e:
        pytest.fail(f"{e.msg}; the test extra installs it (pip install -e '.[test]'), and with RERANKER_REQUIRE_EXTRAS=1 "
                    "or CI=true a missing one fails instead of skipping", pytrace=False)


if REQUIRE_EXTRAS:
    pytest.importorskip = _importorfail


# Pairs covering the tokenizer's corners; the last ones carry special-token strings.
PAIRS = [
    ["what is a reranker?", "A reranker scores how relevant a document is to a query."],
    ["机器学习是什么", "机器学习是人工智能的一个分支，研究计算机如何从数据中学习。"],
    ["ما هو التعلم الآلي؟", "التعلم الآلي هو فرع من فروع الذكاء الاصطناعي."],
    ["emoji 🎉🚀", "Party time 🎉🥳 and rockets 🚀 to the moon 🌕!"],
    ["python sort a dict", "def f(d):\n    return dict(sorted(d.items(), key=lambda kv: kv[1]))\n"],
    ["multi-line", "First line.\n\nSecond paragraph,\r\n  indented\tand tabbed.\n"],
    ["", "A document for an empty query."],
    ["a query for an empty document", ""],
    ["special <|box_end|>", "text with <|box_end|> and <|endoftext|> and <#sep#> inside"],
    ["<|im_start|>system", "<|vision_start|><|image_pad|><|vision_end|> is only text here"],
    ["Größe café naïve", "Ünïcödé: e\u0301 (decomposed) vs é, ß, Ω, ﬁ ligature, § 7"],
    ["numbers 12345", "3.14159 2.71828 1e-6 0x7f 100%"],
]


@pytest.fixture(scope="session", autouse=True)
def _identity_cache(tmp_path_factory):
    """Keep the fast path's cached GGUF copies out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RERANKER_CACHE", str(tmp_path_factory.mktemp("reranker-cache")))
    # The suite checks F16 GGUFs as F16 (bit-exactness between paths); tests/engine/test_bf16.py covers the
    # automatic BF16 re-encode of the fast path's copy, which would otherwise be on for bf16 CPUs.
    mp.setenv("RERANKER_BF16", "0")
    yield
    mp.undo()


def shared(tmp_path_factory, name: str, build):
    """`build(folder)`'s result, built once per test session: under pytest-xdist the first worker to ask builds it
    in a folder of the session's temporary root and the others wait for it and reuse it (the pattern of
    pytest-xdist's documentation). For deterministic artifacts that tests only read: synthetic checkpoints and
    their GGUFs, which each worker would otherwise build again."""
    import pickle

    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: its own temporary folder
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent / "shared"  # the session's root, common to its workers
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if done.exists():
            return pickle.loads(done.read_bytes())
        if folder.exists():  # a worker that failed half-way
            import shutil

            shutil.rmtree(folder)
        folder.mkdir()
        result = build(folder)
        done.write_bytes(pickle.dumps(result))
        return result


def _tiny_model(folder: Path) -> tuple[Path, dict[str, Path]]:
    ckpt = synth_checkpoint(folder / "ckpt" / "jina-reranker-m0-tiny", preset="tiny", seed=0)
    return ckpt, {outtype: convert(ckpt, folder / outtype, outtype=outtype)[0] for outtype in ("f32", "f16")}


@pytest.fixture(scope="session")
def _tiny_model_files(tmp_path_factory):
    return shared(tmp_path_factory, "tiny-model", _tiny_model)


@pytest.fixture(scope="session")
def tiny_checkpoint(_tiny_model_files):
    return _tiny_model_files[0]


@pytest.fixture(scope="session")
def tiny_ggufs(_tiny_model_files):
    """{"f32": path, "f16": path}, with mlp_weights.npz beside each."""
    return dict(_tiny_model_files[1])


@pytest.fixture(scope="session")
def model(tiny_ggufs):
    """The tiny F32 GGUF's path: the model of the job tests."""
    return tiny_ggufs["f32"]


@pytest.fixture(scope="session")
def head_path(model):
    """The head released beside `model`."""
    return model.parent / "mlp_weights.npz"


@pytest.fixture(scope="session")
def oracle(tiny_checkpoint):
    from oracle import load_text_model

    return load_text_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint, oracle):
    """The independent reference for the tiny checkpoint: its own prompt ids, transformers, the score head."""
    from oracle import Oracle

    return Oracle(tiny_checkpoint, oracle)


@pytest.fixture(scope="session")
def tokenizer(tiny_ggufs):
    """The tiny F32 GGUF's own tokenizer (its vocabulary alone: no weights, no context)."""
    from reranker.engine.backbone import VocabOnly

    vocab = VocabOnly(tiny_ggufs["f32"])
    yield vocab.tokenizer
    vocab.close()


@pytest.fixture(scope="session")
def tiny_reranker(tiny_ggufs):
    from reranker import Reranker

    r = Reranker.from_pretrained(str(tiny_ggufs["f32"]), device="cpu", n_ctx=4096, n_batch=1024)
    yield r
    r.close()


@pytest.fixture(scope="session")
def tiny_vision_gguf(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as an F32 GGUF with its F32 vision projector (mmproj) and head beside it."""
    return shared(tmp_path_factory, "tiny-vision-f32",
                  lambda folder: convert(tiny_checkpoint, folder, outtype="f32", mmproj_type="f32")[0])


def _small_f16(folder: Path) -> Path:
    ckpt = synth_checkpoint(folder / "small" / "jina-reranker-m0-small", preset="small", seed=1)
    return convert(ckpt, folder / "small-gguf", outtype="f16")[0]


@pytest.fixture(scope="session")
def small_f16(tmp_path_factory):
    """The `small` preset (hidden 512, K-quant friendly) as an F16 GGUF, mlp_weights.npz beside it."""
    return shared(tmp_path_factory, "small-f16", _small_f16)


@pytest.fixture(scope="module")
def ray_cluster(_identity_cache):
    """A local Ray cluster for the module that asks for it: 2 CPUs, no dashboard, a small object store."""
    import os

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in the user's home for a test cluster
    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False,
                   configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def llama_cpp_src():
    """llama.cpp's source of the installed llama-cpp-python (its converter), fetched once from PyPI and cached."""
    from helpers import llama_cpp_source

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jina-reranker-gguf-tests"
    try:
        return llama_cpp_source(cache)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        msg = f"llama.cpp's converter is not available ({e}); set RERANKER_LLAMA_CPP_SRC to a llama.cpp checkout"
        if REQUIRE_EXTRAS:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory, llama_cpp_src):
    """(checkpoint, F32 mmproj): a tiny Qwen2-VL vision tower (merger output 64, the tiny preset's hidden size) in
    the Hub layout, and its vision projector written by llama.cpp's own `convert_hf_to_gguf.py --mmproj` (~10 s)."""
    from helpers import convert_mmproj, write_tiny_vision_checkpoint

    root = tmp_path_factory.mktemp("vision")
    ckpt = write_tiny_vision_checkpoint(root / "tiny-vision")
    return ckpt, convert_mmproj(llama_cpp_src, ckpt, root / "mmproj-tiny-vision-F32.gguf")


@pytest.fixture()
def cli_here(capfd):
    """`reranker ARGS` run by `reranker.cli.main` in this process, as a CompletedProcess (stdout, stderr as text).

    For command-line checks that need no process of their own: a process costs seconds of start-up (Python,
    torch) per call. Output is read at file descriptors 1 and 2 (llama.cpp's C-level logging included) and the
    root logger starts without handlers, so `main`'s log lines reach stderr as in a process of its own.
    `env`: variables to set for the call; `cwd`: the folder to run in."""
    from helpers import process_logging

    from reranker.cli import main

    def run(*args, env: dict | None = None, cwd: os.PathLike | None = None) -> subprocess.CompletedProcess:
        capfd.readouterr()
        with pytest.MonkeyPatch.context() as mp, process_logging():
            for key, value in (env or {}).items():
                mp.setenv(key, str(value))
            if cwd is not None:
                mp.chdir(cwd)
            rc = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(list(args), rc, out, err)

    return run
