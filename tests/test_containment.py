"""Every plugin call is contained (issue 13, item 1): whatever a plugin does —
raises, calls ``sys.exit``, raises KeyboardInterrupt, returns a value that is
not JSON or of the wrong shape, hangs, runs out of memory — becomes that cell's
record naming plugin, component and hook, and every other cell runs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_test_plugins")
    monkeypatch.syspath_prepend(str(HERE))


SMALL = """
    rounds = 2
    [axes]
    dataset = [{ name = "synthetic-tabular", n_samples = 200 }]
    algorithm = ALGS
"""


@pytest.mark.parametrize("executor", ["local", "process"])
def test_sys_exit_and_keyboard_interrupt_in_a_plugin_fail_only_their_cell(
        test_plugins, run_matrix, executor):
    args = ("--executor", "process", "--workers", "1") if executor == "process" else ()
    code, recs = run_matrix(SMALL.replace("ALGS", '["test-exits", "test-interrupts", "fedavg"]'),
                            *args)
    assert code == 1  # some cell failed: never sys.exit(0)'s "all ok"
    by = {r["config"]["algorithm"]["name"]: r for r in recs}
    assert by["fedavg"]["status"] == "ok"
    for name, kind in (("test-exits", "SystemExit"), ("test-interrupts", "KeyboardInterrupt")):
        err = by[name]["error"]
        assert by[name]["status"] == "failed", err
        assert (err["type"], err["component"], err["hook"]) == (kind, name, "client_update")
        assert err["plugin"] == "fmb_test_plugins"
        assert "fmb_test_plugins.py" in err["traceback"]  # the plugin's own file and line


def test_a_hook_value_of_the_wrong_shape_names_the_hook(test_plugins, run_matrix):
    code, recs = run_matrix(SMALL.replace("ALGS", '["test-wrong-shape"]'))
    assert code == 1
    err = recs[0]["error"]
    assert err["hook"] == "server_update" and err["component"] == "test-wrong-shape"
    assert "shape (3,)" in err["message"] and "flat vector" in err["message"]


@pytest.mark.parametrize("executor", ["local", "process"])
def test_attack_values_are_converted_or_refused_with_the_hook(test_plugins, run_matrix,
                                                            executor, tmp_path):
    args = ("--executor", "process", "--workers", "1") if executor == "process" else ()
    text = SMALL.replace("ALGS", '["fedavg", "local"]') + """
    [evaluate]
    attacks = [{ name = "test-value-attack", kind = "tensor" },
               { name = "test-value-attack", kind = "set" }]
    """
    code, recs = run_matrix(text, *args)
    assert code == 0 and len(recs) == 2  # the cells stay ok: only the attack failed
    for r in recs:
        assert r["status"] == "ok" and r["metrics"]["utility"]["global"] > 0
        att = r["metrics"]["attacks"]
        good, bad = att["test-value-attack"], att["test-value-attack(kind=set)"]  # default: name
        assert good["auc"] == 0.5 and good["counts"] == [1, 2]  # torch values converted
        fail = bad["failed"]
        assert fail["hook"] == "evaluate" and fail["plugin"] == "fmb_test_plugins"
        assert "builtins.set" in fail["message"] and "JSON" in fail["message"]
    # every record on disk is valid JSON (nothing was lost to a write error)
    for p in (tmp_path / "results").glob("*.json"):
        json.loads(p.read_text())


# --------------------------------------------------------------------------
# chaos
# --------------------------------------------------------------------------

CHAOS = """
name = "chaos"
rounds = 2
seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
[axes]
dataset = [{ name = "synthetic-tabular", n_samples = 200 }]
algorithm = ["fedavg", "local", "centralized", { name = "test-chaos", fault = "seeded" }]
[evaluate]
attacks = [{ name = "test-value-attack", kind = "tensor" }]
"""


def _chaos_job(tmp: Path, spawn) -> dict:
    """The chaos run's subprocess work (a background job, tests/conftest.py):
    three kill -9s of the driver at random moments and a rerun after each,
    then a clean in-process run of the healthy cells."""
    matrix = tmp / "chaos.toml"
    matrix.write_text(CHAOS)
    out = tmp / "out"
    base = spawn.environ  # the session's environment, not a foreground test's
    env = {**base, "FEDMEDBENCH_PLUGINS": "fmb_test_plugins",
           "PYTHONPATH": os.pathsep.join([str(HERE), base.get("PYTHONPATH", "")])}
    args = [str(matrix), "--out", str(out), "--executor", "process", "--workers", "2",
            "--cell-timeout", "45", "--retries", "0", "--no-progress", "--no-report"]
    cli = [sys.executable, "-m", "fedmedbench.cli", "run"]
    rng = random.Random(0)
    for _ in range(3):
        p = spawn([*cli, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(4, 12))
        os.kill(p.pid, signal.SIGKILL)  # the driver only; its workers must follow it
        p.wait()
    p = spawn([*cli, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=900)
    clean = tmp / "clean"
    res = subprocess.run([*cli, str(matrix), "--out", str(clean), "--select",
                          "algorithm=fedavg,local,centralized", "--no-progress", "--no-report"],
                         env=env, capture_output=True)
    return {"code": p.returncode, "err": err.decode(), "clean_code": res.returncode,
            "clean_err": res.stderr.decode(),
            "recs": [json.loads(f.read_text()) for f in out.glob("*.json")],
            "temps": list(out.glob(".*.tmp")) + list(out.glob("*.tmp")),
            "clean": [json.loads(f.read_text()) for f in clean.glob("*.json")]}


@pytest.mark.slow
@pytest.mark.background(job=_chaos_job)
def test_chaos_every_cell_ends_with_an_attributed_record(background):
    """40 cells under the process executor: plugins that raise, call sys.exit,
    hang, allocate until a limit, return torch values; three kill -9s of the
    driver at random moments, a rerun after each. Every cell ends with a
    record, every fault is attributed, no temp file remains, and the healthy
    cells' metrics equal a clean in-process run's. (The runs are a
    background job: they start with the test session, see tests/conftest.py.)"""
    run = background
    assert run["code"] == 1, run["err"][-2000:]  # the faulty cells failed
    recs = run["recs"]
    assert len(recs) == 40, len(recs)
    assert not run["temps"]
    sys.path.insert(0, str(HERE))
    from fmb_test_plugins import CHAOS_BY_SEED

    for r in recs:
        alg = r["config"]["algorithm"]
        fault = CHAOS_BY_SEED[r["config"]["seed"]] if alg["name"] == "test-chaos" else None
        if fault in (None, "none"):
            assert r["status"] == "ok", r["error"]
            assert r["metrics"]["attacks"]["test-value-attack"]["auc"] == 0.5
        elif fault == "hang":
            assert r["status"] == "failed" and r["error"]["type"] == "Timeout"
        else:
            err = r["error"]
            want = {"raise": "RuntimeError", "exit": "SystemExit", "alloc": "MemoryError"}[fault]
            assert r["status"] == "failed" and err["type"] == want, err
            assert (err["plugin"], err["component"], err["hook"]) == (
                "fmb_test_plugins", "test-chaos", "client_update")
    # the healthy cells equal a clean in-process run
    assert run["clean_code"] == 0, run["clean_err"][-2000:]
    want = {w["cell_id"]: w for w in run["clean"]}
    got = {r["cell_id"]: r for r in recs if r["cell_id"] in want}
    assert len(want) == 30 and set(got) == set(want)
    for cid, w in want.items():
        assert got[cid]["metrics"]["utility"] == w["metrics"]["utility"]
        assert got[cid]["history"] == w["history"]
