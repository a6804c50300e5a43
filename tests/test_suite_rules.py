"""Rules of the suite itself: in CI a missing test extra fails instead of skipping (tests/conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.slow  # a pytest process each
@pytest.mark.parametrize("require", [False, True], ids=["developer", "ci"])
def test_a_missing_extra_skips_only_outside_ci(tmp_path, require):
    (tmp_path / "test_needs_an_extra.py").write_text(
        'import pytest\n\nmissing = pytest.importorskip("reranker_no_such_extra")\n\n\ndef test_it():\n    pass\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "RERANKER_REQUIRE_EXTRAS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if require:
        env["RERANKER_REQUIRE_EXTRAS"] = "1"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          str(tmp_path / "test_needs_an_extra.py")], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    if require:
        assert res.returncode != 0 and "1 error" in res.stdout, res.stdout
        assert "could not import 'reranker_no_such_extra'" in res.stdout and "pip install -e '.[test]'" in res.stdout, res.stdout
    else:
        assert res.returncode in (0, 5) and "1 skipped" in res.stdout, res.stdout  # 5: no test ran


def test_ci_runs_the_readmes_test_command():
    """CI runs the command README gives a newcomer (with the extras required), so the two cannot drift apart."""
    root = TESTS.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2, "README opens with two commands: install and run, then run the tests"
    readme_pytest = blocks[1].split("&&")[-1].strip()
    ci = [line for line in (root / ".ci" / "run").read_text(encoding="utf-8").splitlines() if "pytest" in line
          and not line.lstrip().startswith("#")]
    assert ci == [f"RERANKER_REQUIRE_EXTRAS=1 {readme_pytest}"], (ci, readme_pytest)
