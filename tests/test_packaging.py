"""Packaging: a third-party plugin installed with pip is discovered and runs in
a matrix; an installed wheel finds the shipped data without the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", *args], check=True, capture_output=True,
                   text=True)


def _env(extra_path: Path, cwd_free: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMEDBENCH_")}
    env["PYTHONPATH"] = str(extra_path)
    env["FEDMEDBENCH_CACHE_DIR"] = os.environ.get("FEDMEDBENCH_CACHE_DIR", "")
    return env


@pytest.mark.slow
def test_example_plugin_is_discovered_and_runs(tmp_path):
    site = tmp_path / "site"
    _pip("--no-build-isolation", "--target", str(site), str(ROOT / "examples/fedmedbench-fedavgm"))
    env = _env(site)
    out = subprocess.run([sys.executable, "-m", "harness.cli", "plugins"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if " fedavgm " in ln)
    assert "fedmedbench-fedavgm" in line and "0.1.0" in line
    res = subprocess.run([sys.executable, "-m", "harness.cli", "run",
                          str(ROOT / "examples/fedmedbench-fedavgm/matrix.toml"),
                          "--out", str(tmp_path / "r"), "--no-progress"],
                         env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "fedavgm(beta=0.5)" in res.stdout
    recs = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    fedavgm = next(r for r in recs if r["config"]["algorithm"]["name"] == "fedavgm")
    assert fedavgm["status"] == "ok"
    assert fedavgm["provenance"]["plugins"]["fedavgm"]["distribution"] == "fedmedbench-fedavgm"
    res = subprocess.run([sys.executable, "-m", "harness.cli", "check", "fedavgm"], env=env,
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and "all checks passed" in res.stdout


@pytest.mark.slow
def test_wheel_finds_shipped_data_without_the_source_tree(tmp_path):
    """Build the wheel, install it into a separate target, and load heart-disease
    from a directory where the source checkout is not importable."""
    if shutil.which("git") is None:  # pragma: no cover
        pytest.fail("git is needed to copy the tracked tree")
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(dist), str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wheel = next(dist.glob("fedmedbench-*.whl"))
    site = tmp_path / "site"
    _pip("--target", str(site), str(wheel))
    assert (site / "harness/_datasets/heart-disease/heart_disease_uci.csv").is_file()
    assert not (site / "datasets").exists() and not (site / "reports").exists()
    code = ("import harness, json; from harness.datafiles import datasets_dir; "
            "from harness.registry import get_registry; "
            "d = get_registry().build('dataset', {'name': 'heart-disease'}).load(seed=0); "
            "print(json.dumps([harness.__file__, str(datasets_dir()), len(d.sites)]))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(site), cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, ddir, n = json.loads(out.stdout)
    assert path.startswith(str(site)) and ddir.startswith(str(site)) and n == 4
