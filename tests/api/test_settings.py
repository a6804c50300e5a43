"""`LoadSettings`: one typed object for loading a model; README's documented signature is the code's."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from reranker import Reranker, RerankerError
from reranker.cli.common import add_model_args
from reranker.defaults import DEFAULT_REPO
from reranker.settings import LoadSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_signature() -> list[tuple[str, object, str]]:
    """(name, default, kind) of each parameter of README's `from_pretrained(...)` line, parsed as Python."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"`from_pretrained\((.*?)\)`", text, re.S)
    assert m, "README has no `from_pretrained(...)` signature"
    fn = ast.parse(f"def f({' '.join(m.group(1).split())}): pass").body[0]
    args = fn.args
    out = []
    positional = args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for a, d in zip(positional, defaults):
        out.append((a.arg, ast.literal_eval(d) if d is not None else inspect.Parameter.empty, "positional"))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, ast.literal_eval(d), "keyword"))
    return out


def code_signature() -> list[tuple[str, object, str]]:
    params = list(inspect.signature(Reranker.from_pretrained).parameters.values())
    kind = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional", inspect.Parameter.KEYWORD_ONLY: "keyword"}
    out = [(p.name, p.default, kind[p.kind]) for p in params]
    # README writes the first parameter without its default (the Hub repo id, given in prose).
    assert out[0] == ("model", DEFAULT_REPO, "positional")
    return [("model", inspect.Parameter.empty, "positional"), *out[1:]]


def test_readme_documents_from_pretrained_exactly():
    assert readme_signature() == code_signature()


def test_load_settings_has_every_from_pretrained_option_with_its_default():
    fields = {f.name: f.default for f in dataclasses.fields(LoadSettings)}
    params = {p.name: p.default for p in inspect.signature(Reranker.from_pretrained).parameters.values()}
    assert fields == params


def test_settings_are_frozen_keyword_only_and_checked_when_built():
    s = LoadSettings(model="m.gguf", n_ctx=512)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.n_ctx = 1024
    with pytest.raises(TypeError):
        LoadSettings("m.gguf")  # keyword-only
    for kwargs, message in [({"n_batch": 0}, r"n_batch=0 is invalid; it must be an integer from 1 to 2147483647"),
                            ({"max_length": 8}, r"max_length=8 is invalid; it must be an integer >= 16"),
                            ({"batch_size": True}, r"batch_size=True is invalid"),
                            ({"kv_type": "q9"}, r"kv_type='q9' is not one of"),
                            ({"bf16": True, "fast": False}, r"bf16=True .* needs fast=True"),
                            ({"deterministic": 1}, r"deterministic=1 must be True or False")]:
        with pytest.raises(RerankerError, match=message):
            LoadSettings(**kwargs)
        with pytest.raises(RerankerError, match=message):  # from_pretrained checks through the same object
            Reranker.from_pretrained("does-not-exist.gguf", **kwargs)
    with pytest.raises(RerankerError, match="n_threads=0"):
        s.replace(n_threads=0)


def test_prompt_length_and_fingerprint():
    assert LoadSettings().prompt_length == 10240
    assert LoadSettings(n_ctx=1024).prompt_length == 1024
    assert LoadSettings(n_ctx=1024, max_length=512).prompt_length == 512
    assert LoadSettings().fingerprint() == {"fast": True, "identity_dtype": "f32"}
    assert LoadSettings(bf16=True, deterministic=True).fingerprint() == {"fast": True, "identity_dtype": "f32", "bf16": True,
                                                                          "deterministic": True}
    # Settings that move scores only within llama.cpp's tolerance are not part of a job's identity.
    assert LoadSettings(n_batch=512, n_threads=3, device="cpu").fingerprint() == LoadSettings().fingerprint()


def test_from_args_maps_every_model_option():
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["-m", "x.gguf", "--head", "h.npz", "--n-gpu-layers", "0", "--n-ctx", "2048", "--n-batch", "256",
                         "--threads", "3", "--bf16", "off", "--max-length", "1000", "--max-query-length", "100",
                         "--max-doc-length", "300", "--device", "cpu", "--deterministic"])
    assert LoadSettings.from_args(args) == LoadSettings(model="x.gguf", head="h.npz", n_gpu_layers=0, n_ctx=2048, n_batch=256,
                                                        n_threads=3, bf16=False, max_length=1000, max_query_length=100,
                                                        max_doc_length=300, device="cpu", deterministic=True)
    assert LoadSettings.from_args(p.parse_args([])) == LoadSettings()
    assert LoadSettings.from_args(p.parse_args(["--bf16", "on"]), n_gpu_layers=0).bf16 is True


def test_from_settings_loads_what_from_pretrained_loads(tiny_ggufs, tiny_reranker):
    from conftest import PAIRS

    s = LoadSettings(model=str(tiny_ggufs["f32"]), device="cpu", n_ctx=4096, n_batch=1024)
    with Reranker.from_settings(s) as rr:
        assert rr.settings == s and tiny_reranker.settings == s
        assert rr.compute_score(PAIRS) == tiny_reranker.compute_score(PAIRS)
