"""The harness end to end: quickstart, resume, determinism, failures, executors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmedbench import engine, executors
from fedmedbench.cli import main
from fedmedbench.errors import ConfigError, PluginConflictError
from fedmedbench.matrix import cell_id, load_matrix, parse_matrix
from fedmedbench.registry import get_registry, hookimpl
from fedmedbench.results import load_records, read_record, write_record

SMALL = """
name = "small"
rounds = 3
seeds = [0, 1]
[axes]
dataset = [{ name = "synthetic-tabular", n_samples = 400 }]
algorithm = ["centralized", "local", "fedavg"]
"""


@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load tests/fmb_test_plugins.py (misbehaving algorithms) as a plugin."""
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_test_plugins")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_quickstart_prints_table_with_every_hospital(quickstart, capsys):
    # every table, per-site ones included, is --verbose (the default is the headline); the
    # quickstart's cells ran once for the session (conftest.quickstart_results)
    tmp_path = quickstart("results")
    code = main(["run", "--out", str(tmp_path), "--no-progress", "--verbose"])
    out, err = capsys.readouterr()
    assert code == 0 and "27 already done, 0 to run" in err
    for word in ("fedavg", "centralized", "local", "fedprox", "dp-sgd", "secagg", "Cleveland",
                 "Hungary", "Switzerland", "VA Long Beach", "accuracy"):
        assert word in out
    m = load_matrix(None)
    records, _ = load_records([tmp_path])
    assert {r["cell_id"] for r in records} == {c["cell_id"] for c in m.cells}
    assert all(r["status"] == "ok" for r in records)
    # the heart-disease cells (the synthetic-imaging ones are the gradient-inversion
    # target: their single-image rounds do not train the model)
    records = [r for r in records if r["config"]["dataset"]["name"] == "heart-disease"]
    assert len(records) == 18
    by_alg = {}
    for r in records:
        by_alg.setdefault(r["config"]["algorithm"]["name"], []).append(
            r["metrics"]["utility"]["global"])
    # real learning on real data: every method beats the majority class (~0.55)
    assert min(min(v) for v in by_alg.values()) > 0.6
    dp = [r for r in records if r["labels"]["privacy"] != "none"
          and "dp-sgd" in r["labels"]["privacy"]]
    assert len(dp) == 3 and all(2.8 <= r["metrics"]["privacy"]["epsilon"] <= 3.0
                                and r["metrics"]["privacy"]["delta"] == 1e-5 for r in dp)
    assert all("mia-loss" in r["metrics"]["attacks"] for r in records)
    assert sorted(records[0]["metrics"]["utility"]["per_site"]) == [
        "Cleveland", "Hungary", "Switzerland", "VA Long Beach"]


def test_interrupted_run_resumes_only_missing_cells(tmp_path, run_matrix, monkeypatch):
    calls: list[str] = []
    real = executors.run_cell

    def flaky(cell, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(cell["cell_id"])
        return real(cell, **kw)

    monkeypatch.setattr(executors, "run_cell", flaky)
    code, records = run_matrix(SMALL)
    assert code == 130 and len(records) == 3  # three finished cells saved
    before = {r["cell_id"]: json.dumps(r, sort_keys=True) for r in records}

    calls.clear()
    monkeypatch.setattr(executors, "run_cell", lambda cell, **kw: (calls.append(
        cell["cell_id"]), real(cell, **kw))[1])
    code, records = run_matrix(SMALL)
    assert code == 0 and len(records) == 6
    assert len(calls) == 3 and not set(calls) & set(before)  # only the missing cells ran
    kept = {r["cell_id"]: json.dumps(r, sort_keys=True) for r in records if r["cell_id"] in before}
    assert kept == before  # records written before are untouched

    calls.clear()
    code, _ = run_matrix(SMALL, "--force")
    assert code == 0 and len(calls) == 6


def test_same_cell_twice_gives_identical_metrics():
    m = parse_matrix({"rounds": 3, "axes": {"dataset": ["heart-disease"],
                                            "algorithm": ["fedavg"]},
                      "run": {"clients_per_round": 2}})
    a, b = engine.run_cell(m.cells[0]), engine.run_cell(m.cells[0])
    assert a["status"] == "ok"
    assert a["metrics"]["utility"] == b["metrics"]["utility"]
    assert a["history"] == b["history"]
    other = parse_matrix({"rounds": 3, "seeds": [1], "axes": {"dataset": ["heart-disease"],
                                                              "algorithm": ["fedavg"]},
                          "run": {"clients_per_round": 2}})
    c = engine.run_cell(other.cells[0])
    assert c["history"] != a["history"]  # the seed matters (client sampling, init, batches)


def test_cell_ids_are_stable_and_sensitive():
    raw = {"rounds": 2, "axes": {"dataset": ["heart-disease"],
                                 "algorithm": ["fedavg", "local"]}}
    a, b = parse_matrix(raw), parse_matrix(raw)
    assert [c["cell_id"] for c in a.cells] == [c["cell_id"] for c in b.cells]
    raw2 = {**raw, "run": {"lr": 0.01}}
    assert not {c["cell_id"] for c in a.cells} & {c["cell_id"] for c in parse_matrix(raw2).cells}
    # defaults written out or left implicit resolve to the same cell
    raw3 = {"rounds": 2, "axes": {"dataset": ["heart-disease"], "algorithm": ["fedavg", "local"],
                                  "aggregator": [{"name": "weighted-mean", "by": "examples"}]}}
    assert [c["cell_id"] for c in parse_matrix(raw3).cells] == [c["cell_id"] for c in a.cells]


def test_select_and_exclude_slice_the_matrix():
    raw = {"rounds": 2, "seeds": [0, 1],
           "axes": {"dataset": ["heart-disease", "synthetic-tabular"],
                    "algorithm": ["fedavg", "local", "centralized"]},
           "exclude": [{"dataset": "synthetic-tabular", "algorithm": "local"}]}
    assert len(parse_matrix(raw).cells) == 2 * 3 * 2 - 2
    m = parse_matrix(raw, select=["algorithm=fedavg,local", "seed=1"])
    assert {c["labels"]["algorithm"] for c in m.cells} == {"fedavg", "local"}
    assert {c["config"]["seed"] for c in m.cells} == {1}
    with pytest.raises(ConfigError, match="axis algorithm has"):
        parse_matrix(raw, select=["algorithm=fedsgd"])


@pytest.mark.parametrize("text, fragment", [
    ("rounds = [", "not valid TOML"),
    ("rounds = 2\n[axes]\ndataset = ['heart-disease']\nalgorithm = ['fedavgg']",
     "no algorithm 'fedavgg'; did you mean 'fedavg'?"),
    ("rounds = 2\n[axes]\ndataset = ['heart-disease']\nalgorithm = [{name='fedavg'}]\n"
     "aggregator = [{name='weighted-mean', byy='examples'}]",
     "weighted-mean has no parameter 'byy'; did you mean 'by'?"),
    ("rounds = 2\n[axes]\ndataset = [{name='synthetic-tabular', n_sites='four'}]\n"
     "algorithm = ['fedavg']", "n_sites = 'four' has type str; expected int"),
    ("rounds = 2\n[axes]\ndataset = ['heart-disease']\nalgorithm = ['fedavg']\n[run]\nlrr = 1",
     "unknown run setting; did you mean 'lr'?"),
    ("rounds = 2\nseed = 3\n[axes]\ndataset = ['heart-disease']\nalgorithm = ['fedavg']",
     "unknown top-level key(s) 'seed' (did you mean 'seeds'?)"),
    ("rounds = 0\n[axes]\ndataset = ['heart-disease']\nalgorithm = ['fedavg']",
     "rounds = 0; it must be at least 1"),
    ("rounds = 2\n[axes]\ndataset = ['fedavg']\nalgorithm = ['fedavg']",
     "'fedavg' is a algorithm, not a dataset"),
])
def test_bad_matrix_exits_2_with_a_clear_message(tmp_path, capsys, text, fragment):
    f = tmp_path / "m.toml"
    f.write_text(text)
    assert main(["run", str(f), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(f) in err or fragment in err
    assert not (tmp_path / "r").exists()  # nothing trained


def test_plugin_error_nan_and_other_cells(test_plugins, run_matrix, capsys):
    code, records = run_matrix("""
        rounds = 3
        [axes]
        dataset = [{ name = "synthetic-tabular", n_samples = 400 }]
        algorithm = ["test-boom", "test-nan", "fedavg"]
    """)
    assert code == 1
    by = {r["config"]["algorithm"]["name"]: r for r in records}
    boom = by["test-boom"]
    assert boom["status"] == "failed"
    assert boom["error"]["plugin"] == "fmb_test_plugins"
    assert boom["error"]["hook"] == "client_update"
    assert boom["error"]["type"] == "RuntimeError"
    assert "simulated bug" in boom["error"]["message"]
    nan = by["test-nan"]
    assert nan["status"] == "diverged" and "non-finite" in nan["error"]["message"]
    assert len(nan["history"]) == 1  # round 1 kept, round 2 diverged
    assert by["fedavg"]["status"] == "ok"


def test_real_training_that_overflows_is_diverged(run_matrix):
    code, records = run_matrix("""
        rounds = 3
        [axes]
        dataset = [{ name = "synthetic-tabular", n_samples = 400 }]
        algorithm = ["fedavg", "centralized"]
        [run.fedavg]
        lr = 3e38
    """)
    assert code == 1
    by = {r["config"]["algorithm"]["name"]: r for r in records}
    assert by["fedavg"]["status"] == "diverged"
    assert "loss became nan" in by["fedavg"]["error"]["message"]
    assert by["centralized"]["status"] == "ok"  # the other cell is unaffected


CRASH_AND_SLEEP = """
    rounds = 2
    [axes]
    dataset = [{ name = "synthetic-tabular", n_samples = 200 }]
    algorithm = ["test-crash", "fedavg", "test-sleepy", "local"]
"""


def _crash_and_timeout_job(tmp: Path, spawn) -> dict:
    """``fedmedbench run`` of CRASH_AND_SLEEP under the process executor (a
    background job, tests/conftest.py: the sleepy cell waits out its timeout)."""
    import os
    import subprocess
    import sys
    import textwrap

    here = Path(__file__).parent
    (tmp / "matrix.toml").write_text(textwrap.dedent(CRASH_AND_SLEEP))
    base = spawn.environ  # the session's environment, not a foreground test's
    env = {**base, "FEDMEDBENCH_PLUGINS": "fmb_test_plugins",
           "PYTHONPATH": os.pathsep.join([str(here), base.get("PYTHONPATH", "")])}
    p = spawn([sys.executable, "-m", "fedmedbench.cli", "run", str(tmp / "matrix.toml"),
               "--out", str(tmp / "results"), "--no-progress", "--no-report",
               "--executor", "process", "--workers", "2",
               "--cell-timeout", "40"],  # worker start-up counts too
              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=600)
    records, _ = load_records([tmp / "results"])
    return {"code": p.returncode, "err": err.decode(), "records": records}


@pytest.mark.background(job=_crash_and_timeout_job, waits=True)
def test_process_executor_survives_crash_and_timeout(test_plugins, run_matrix, tmp_path,
                                                     background):
    code, records = background["code"], background["records"]
    assert code == 1, background["err"][-2000:]
    by = {r["config"]["algorithm"]["name"]: r for r in records}
    assert by["test-crash"]["status"] == "failed"
    assert by["test-crash"]["error"]["type"] == "WorkerDied"
    assert by["test-sleepy"]["status"] == "failed"
    assert by["test-sleepy"]["error"]["type"] == "Timeout"
    assert by["fedavg"]["status"] == "ok" and by["local"]["status"] == "ok"
    # the pool gives the same metrics as the in-process executor
    _, local = run_matrix(CRASH_AND_SLEEP, "--select", "algorithm=fedavg,local",
                          out=tmp_path / "local")
    assert sorted((r["cell_id"], json.dumps(r["metrics"]["utility"])) for r in local) == sorted(
        (r["cell_id"], json.dumps(r["metrics"]["utility"])) for r in records
        if r["status"] == "ok")


def test_other_schema_record_is_refused_and_kept(tmp_path, capsys):
    m = load_matrix(None, select=["algorithm=fedavg", "seed=0"])
    rec = engine.run_cell(m.cells[0])
    rec["schema"] = "fedmedbench.result/0"
    path = write_record(tmp_path, rec)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "fedmedbench.result/0" in err and "--force" in err
    assert main(["run", "--out", str(tmp_path), "--no-progress", "--select",
                 "algorithm=fedavg", "--select", "seed=0"]) == 2
    assert json.loads(path.read_text())["schema"] == "fedmedbench.result/0"  # not lost
    other = {**rec, "schema": engine.SCHEMA, "config": {**rec["config"], "seed": 1}}
    write_record(tmp_path, {**other, "cell_id": cell_id(other["config"])})
    assert main(["report", str(tmp_path), "--skip-invalid"]) == 0
    assert "skipped" in capsys.readouterr().err


def test_records_are_json_and_atomic(tmp_path):
    m = load_matrix(None, select=["algorithm=local", "seed=0"])
    rec = engine.run_cell(m.cells[0])
    path = write_record(tmp_path, rec)
    assert read_record(path)["cell_id"] == rec["cell_id"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left
    for key in ("schema", "cell_id", "status", "error", "config", "metrics", "history",
                "provenance"):
        assert key in rec
    assert set(rec["metrics"]["cost"]) >= {"bytes_up", "bytes_down", "wall_s", "train_s",
                                           "privacy_s"}
    assert rec["provenance"]["torch"] and rec["provenance"]["python"]


class _Dupe:
    __name__ = "dupe-plugin"

    @hookimpl
    def register_algorithms(self, register):
        from fedmedbench import Algorithm

        class Again(Algorithm):
            """A second fedavg."""

            name = "fedavg"

            def __init__(self) -> None:
                pass

        register(Again)


def test_duplicate_names_and_disabling(monkeypatch):
    with pytest.raises(PluginConflictError) as e:
        get_registry(extra=[_Dupe()], refresh=True)
    msg = str(e.value)
    assert "'fedavg' is registered twice" in msg and "algorithms" in msg
    assert "dupe-plugin" in msg and "fedmedbench" in msg
    monkeypatch.setenv("FEDMEDBENCH_DISABLE_PLUGINS", "algorithms")
    reg = get_registry(extra=[_Dupe()], refresh=True)  # no clash once built-ins are blocked
    assert reg.get("algorithm", "fedavg").plugin == "dupe-plugin"
    assert "centralized" not in reg.names("algorithm")


def test_observer_hooks_see_every_round(test_plugins, run_matrix):
    import fmb_test_plugins

    fmb_test_plugins.OBSERVED.clear()
    text = """
        rounds = 3
        [axes]
        dataset = [{ name = "synthetic-tabular", n_samples = 400 }]
        algorithm = ["fedavg"]
    """
    code, records = run_matrix(text)
    assert code == 0
    cid = records[0]["cell_id"]
    seen = fmb_test_plugins.OBSERVED
    assert seen[0] == ("start", cid) and seen[-1] == ("end", cid, "ok")
    rounds = [e for e in seen if e[0] == "round"]
    assert [e[2] for e in rounds] == [1, 2, 3]
    assert [e[3] for e in rounds] == [h["loss"] for h in records[0]["history"]]
