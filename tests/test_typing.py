"""mypy over the engine (``harness/``, imported as ``fedmedbench``) and the
built-in plugins (``plugins/``) reports no error, with the configuration
committed in mypy.ini (issue 18.6). It runs as a background job
(tests/conftest.py): mypy is a subprocess that uses the second core while the
other tests run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mypy_job(tmp_path: Path, spawn) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "mypy.ini"),
         "--cache-dir", str(tmp_path / "mypy-cache"), "harness", "plugins"],
        cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[test]' installs it)")
@pytest.mark.background(job=_mypy_job)
def test_mypy_finds_no_error_in_the_engine_and_the_builtins(background):
    out = background.stdout + background.stderr
    assert background.returncode == 0, out[-6000:]
    assert "Success: no issues found" in out
