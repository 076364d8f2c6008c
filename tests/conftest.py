"""Shared fixtures: an isolated cache, and a helper that runs a matrix text."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("FEDMEDBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def run_matrix(tmp_path: Path):
    """``run_matrix(toml_text, *cli_args) -> (exit_code, records)``: write the
    matrix, run ``fedmedbench run`` on it in-process, return the records."""
    from fedmedbench.cli import main
    from fedmedbench.results import load_records

    def _run(text: str, *args: str, out: Path | None = None):
        mfile = tmp_path / "matrix.toml"
        mfile.write_text(textwrap.dedent(text))
        out = out or tmp_path / "results"
        code = main(["run", str(mfile), "--out", str(out), "--no-progress", "--no-report", *args])
        records, _ = load_records([out]) if out.exists() else ([], [])
        return code, records

    return _run
