"""Optional packages: a missing one is found before anything loads or is written, and the hint matches the install.

A package is made missing for real: a subprocess whose `sitecustomize` (first on PYTHONPATH) puts None in
`sys.modules` under its name, so every `import` of it raises ImportError as on a machine without it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from helpers import score_args, write_jsonl

from reranker.cli import build_parser
from reranker.extras import DIST, EXTRAS, install_hint

ROOT = Path(__file__).resolve().parents[2]


def without(modules: list[str], tmp_path: Path, *args: str, cache: Path) -> subprocess.CompletedProcess:
    """`python -m reranker ARGS` in `tmp_path`, where importing any of `modules` fails."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RERANKER_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "reranker", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)


def expected_hint(extra: str, cwd: Path, monkeypatch) -> str:
    monkeypatch.chdir(cwd)  # the hint says `.` only when run from the checkout
    return install_hint(extra)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_parquet_output_without_pyarrow_fails_before_the_model_loads(model, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"query": "q", "documents": ["d1", "d2"]}])
    out, cache = tmp_path / "x.parquet", tmp_path / "cache"
    for attempt in range(2):  # the rerun must not "resume after 0 records" of a job that never started
        err = one_line_error(without(["pyarrow"], tmp_path, *score_args(model, inp, out), cache=cache))
        assert f"writing {out} needs pyarrow, which is not installed: {expected_hint('parquet', tmp_path, monkeypatch)}" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "shim"], f"attempt {attempt}: a file was written"
        assert not cache.exists()  # the model was not loaded: the fast path's copy was never written


def test_parquet_input_without_pyarrow(model, tmp_path, monkeypatch):
    inp = tmp_path / "in.parquet"
    inp.write_bytes(b"PAR1")  # never opened: the check comes first
    err = one_line_error(without(["pyarrow"], tmp_path, *score_args(model, inp, tmp_path / "out.jsonl"),
                                 cache=tmp_path / "cache"))
    assert f"reading {inp} needs pyarrow" in err and expected_hint("parquet", tmp_path, monkeypatch) in err
    assert not (tmp_path / "out.jsonl.checkpoint.json").exists() and not (tmp_path / "cache").exists()


def test_bench_quant_without_scipy_fails_before_scoring(tiny_ggufs, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    res = without(["scipy"], tmp_path, "bench-quant", str(tiny_ggufs["f16"]), "--synthetic", "8", "--levels", "Q8_0",
                  "-o", str(out), "--no-progress", cache=tmp_path / "cache")
    err = one_line_error(res)
    assert f"reranker bench-quant needs scipy, which is not installed: {expected_hint('bench', tmp_path, monkeypatch)}" in err
    assert not out.exists() and not (tmp_path / "cache").exists()  # no level made, no reference scored


@pytest.mark.parametrize("module", ["fastapi", "httpx"])
def test_serve_without_its_extra_names_this_install(model, tmp_path, monkeypatch, module):
    """httpx (image URLs) is checked with the rest of the extra, with or without --image-url-hosts."""
    err = one_line_error(without([module], tmp_path, "serve", "-m", str(model), "--port", "0", cache=tmp_path / "cache"))
    assert f"reranker serve needs {module}, which is not installed: {expected_hint('serve', tmp_path, monkeypatch)}" in err
    assert not (tmp_path / "cache").exists()  # before the model loads


def fake_dist(tmp_path: Path, monkeypatch, direct_url: dict | None) -> None:
    """A dist-info of this distribution first on sys.path: what pip leaves after an install of that kind."""
    info = tmp_path / "site" / "jina_reranker_gguf-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1.0\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert Path(metadata.distribution(DIST).locate_file("")) == info.parent  # the fake one is the one found


@pytest.mark.parametrize("kind", ["editable", "folder", "index", "vcs"])
def test_install_hint_follows_the_install(kind, tmp_path, monkeypatch):
    checkout = tmp_path / "my checkout"
    checkout.mkdir()
    url = {"editable": {"url": checkout.as_uri(), "dir_info": {"editable": True}},
           "folder": {"url": checkout.as_uri(), "dir_info": {}},
           "index": None,
           "vcs": {"url": "https://github.com/x/y.git", "vcs_info": {"vcs": "git", "commit_id": "0" * 40}}}[kind]
    fake_dist(tmp_path, monkeypatch, url)
    monkeypatch.chdir(tmp_path)
    want = {"editable": f"pip install -e '{checkout}[serve]'", "folder": f"pip install '{checkout}[serve]'",
            "index": f"pip install '{DIST}[serve]'", "vcs": f"pip install '{DIST}[serve]'"}[kind]
    assert install_hint("serve") == want
    if kind == "editable":  # from the checkout itself, README's own command
        monkeypatch.chdir(checkout)
        assert install_hint("serve") == "pip install -e '.[serve]'"


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_extras_match_the_installed_metadata():
    """Each extra's modules come from distributions that extra installs, and the test extra installs them all."""
    extras: dict[str, set[str]] = {}
    for req in metadata.requires(DIST) or []:  # pyproject's extras as pip recorded them: 'pyarrow>=14; extra == "parquet"'
        if m := re.search(r"""extra\s*==\s*["']([\w-]+)["']""", req):
            extras.setdefault(m.group(1), set()).add(_name(req))
    owners = metadata.packages_distributions()
    for extra, modules in EXTRAS.items():
        assert extra in extras, f"{extra} is not an extra of {DIST}"
        for module in modules:
            dists = {d.lower().replace("_", "-") for d in owners.get(module.split(".")[0], [])}
            assert dists, f"{module} is not installed: the test extra installs every extra's packages"
            assert dists & extras[extra], f"{module} comes from {dists}, which the {extra} extra does not list ({extras[extra]})"
            assert dists & extras["test"], f"the test extra lacks {dists}"


def test_every_cli_flag_has_help():
    def undocumented(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from undocumented(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(undocumented(build_parser(), "reranker")) == []


def test_rerank_pdf_without_pypdfium2_fails_before_the_model_loads(model, tmp_path, monkeypatch):
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(b"%PDF-1.4\n")  # never opened: the check comes first
    err = one_line_error(without(["pypdfium2"], tmp_path, "rerank", "-m", str(model), "-q", "q", "--pdf", str(pdf),
                                 cache=tmp_path / "cache"))
    assert f"reading PDF {pdf} needs pypdfium2, which is not installed: {expected_hint('pdf', tmp_path, monkeypatch)}" in err
    assert not (tmp_path / "cache").exists()  # the model was not loaded
