"""Packaging: a third-party plugin installed with pip is discovered and runs in
a matrix; an installed wheel finds the shipped data without the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", *args], check=True, capture_output=True,
                   text=True)


def _env(extra_path: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` (the session's environment, ``spawn.environ``) without
    fedmedbench's settings, but its cache, with ``extra_path`` as PYTHONPATH."""
    env = {k: v for k, v in base.items() if not k.startswith("FEDMEDBENCH_")}
    env["PYTHONPATH"] = str(extra_path)
    env["FEDMEDBENCH_CACHE_DIR"] = base.get("FEDMEDBENCH_CACHE_DIR", "")
    return env


def _example_plugin_job(tmp_path: Path, spawn) -> dict:
    """Install examples/fedmedbench-fedavgm with pip into a target folder, list
    the plugins, run its matrix and check it (a background job, tests/conftest.py:
    it only runs subprocesses)."""
    site = tmp_path / "site"
    _pip("--no-build-isolation", "--target", str(site), str(ROOT / "examples/fedmedbench-fedavgm"))
    env = _env(site, spawn.environ)
    listed = subprocess.run([sys.executable, "-m", "fedmedbench.cli", "plugins"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    run = subprocess.run([sys.executable, "-m", "fedmedbench.cli", "run",
                          str(ROOT / "examples/fedmedbench-fedavgm/matrix.toml"),
                          "--out", str(tmp_path / "r"), "--no-progress"],
                         env=env, cwd=tmp_path, capture_output=True, text=True)
    check = subprocess.run([sys.executable, "-m", "fedmedbench.cli", "check", "fedavgm"],
                           env=env, cwd=tmp_path, capture_output=True, text=True)
    return {"plugins": listed.stdout, "run": run, "check": check,
            "recs": [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]}


@pytest.mark.slow
@pytest.mark.background(job=_example_plugin_job)
def test_example_plugin_is_discovered_and_runs(background):
    line = next(ln for ln in background["plugins"].splitlines() if " fedavgm " in ln)
    assert "fedmedbench-fedavgm" in line and "0.1.0" in line
    res = background["run"]
    assert res.returncode == 0, res.stderr
    assert "fedavgm[β=0.5]" in res.stdout  # its short label
    fedavgm = next(r for r in background["recs"] if r["config"]["algorithm"]["name"] == "fedavgm")
    assert fedavgm["status"] == "ok"
    assert fedavgm["provenance"]["plugins"]["fedavgm"]["distribution"] == "fedmedbench-fedavgm"
    res = background["check"]
    assert res.returncode == 0 and "all checks passed" in res.stdout


def _wheel_job(tmp_path: Path, spawn) -> dict:
    """Build the wheel, install it into a separate target, and use it from a
    project folder with its own ``plugins/`` and ``harness/`` packages (a
    background job, tests/conftest.py: it only runs subprocesses)."""
    import zipfile

    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(dist), str(ROOT)], capture_output=True, text=True)
    out: dict = {"wheel": res}
    if res.returncode != 0:
        return out
    wheel = next(dist.glob("fedmedbench-*.whl"))
    out["tops"] = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    site = tmp_path / "site"
    _pip("--target", str(site), str(wheel))
    out["site"] = site
    out["installed"] = {p: (site / p).exists() for p in (
        "datasets", "reports", "harness", "plugins")}
    out["csv"] = (site / "fedmedbench/_datasets/heart-disease/heart_disease_uci.csv").is_file()
    # a project directory with packages named like our repository folders
    proj = tmp_path / "project"
    for pkg in ("plugins", "harness"):
        (proj / pkg).mkdir(parents=True)
        (proj / pkg / "__init__.py").write_text(
            f"raise ImportError('the project\'s own {pkg} package was imported')\n")
    env = _env(site, spawn.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(proj), str(site)])
    code = ("import fedmedbench, json; from fedmedbench.datafiles import datasets_dir; "
            "from fedmedbench.registry import get_registry; reg = get_registry(); "
            "d = reg.build('dataset', {'name': 'heart-disease'}).load(seed=0); "
            "print(json.dumps([fedmedbench.__file__, str(datasets_dir()), len(d.sites), "
            "len(reg.all())]))")
    out["code"] = subprocess.run([sys.executable, "-c", code], env=env, cwd=proj,
                                 capture_output=True, text=True)
    out["listed"] = subprocess.run([sys.executable, "-m", "fedmedbench.cli", "plugins"],
                                   env=env, cwd=proj, capture_output=True, text=True)
    out["run"] = subprocess.run([sys.executable, "-m", "fedmedbench.cli", "run", "--select",
                                 "seed=0", "--out", str(tmp_path / "r"), "--no-progress"],
                                env=env, cwd=proj, capture_output=True, text=True)
    out["recs"] = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    return out


@pytest.mark.slow
@pytest.mark.background(job=_wheel_job)
def test_wheel_installs_one_import_package_and_ignores_shadowing_folders(background):
    """Build the wheel, install it into a separate target, and use it from a
    directory whose own ``plugins/`` and ``harness/`` packages come first on
    ``sys.path``: discovery, the shipped data and a quickstart run still work,
    and the wheel holds no top-level ``harness`` or ``plugins``."""
    b = background
    assert b["wheel"].returncode == 0, b["wheel"].stderr
    tops = b["tops"]
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedmedbench"}, tops
    site, installed = b["site"], b["installed"]
    assert b["csv"]
    assert not installed["datasets"] and not installed["reports"]
    assert not installed["harness"] and not installed["plugins"]
    out = b["code"]
    assert out.returncode == 0, out.stderr
    path, ddir, n, n_components = json.loads(out.stdout)
    assert path.startswith(str(site)) and ddir.startswith(str(site)) and n == 4
    listed = b["listed"]
    assert listed.returncode == 0, listed.stderr
    for name in ("heart-disease", "fedavg", "dp-sgd", "secagg", "mia-loss", "html"):
        assert f" {name} " in listed.stdout
    assert n_components == sum(1 for ln in listed.stdout.splitlines()[2:] if ln.strip())
    run = b["run"]
    assert run.returncode == 0, run.stderr
    recs = b["recs"]
    assert len(recs) == 9 and all(r["status"] == "ok" for r in recs)
