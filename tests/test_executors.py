"""Executors and matrix streaming: lazy, bounded matrices; shards; timeouts
that hold in every executor; pool workers that die with their driver; the
dask executor (LocalCluster, an existing scheduler, dask-jobqueue scripts).

Faults are injected by ``tests/fmb_executor_plugins.py`` (an observer hook).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedmedbench import executors
from fedmedbench import matrix as matrix_mod
from fedmedbench.cli import main
from fedmedbench.errors import ConfigError
from fedmedbench.matrix import AXES, _label, _matches, cell_id, load_matrix, parse_matrix, resolve
from fedmedbench.registry import get_registry
from fedmedbench.results import load_records, read_record

TESTS = Path(__file__).parent
ROOT = TESTS.parent

#: one FedAvg cell per seed; the faults pick seeds
FAULTY = """
name = "faulty"
rounds = 2
seeds = [{seeds}]
[axes]
dataset = [{{ name = "synthetic-tabular", n_samples = 200 }}]
algorithm = ["fedavg"]
"""

SMALL = """
name = "small"
rounds = 3
seeds = [0, 1]
[axes]
dataset = [{ name = "synthetic-tabular", n_samples = 400 }]
algorithm = ["centralized", "local", "fedavg"]
"""

TIMING = {"wall_s", "train_s", "privacy_s", "seconds"}


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``faults("die:1,hang:2")`` arms the fault plugin for those seeds;
    returns the attempts log (``[(seed, pid), ...]`` read on call)."""
    d = tmp_path / "faults"
    d.mkdir()
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_executor_plugins")
    monkeypatch.setenv("FMB_FAULT_DIR", str(d))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.syspath_prepend(str(TESTS))

    def arm(spec: str):
        monkeypatch.setenv("FMB_FAULT", spec)

        def attempts() -> list[tuple[int, int]]:
            p = d / "attempts"
            lines = p.read_text().split() if p.exists() else []
            return [(int(s), int(pid)) for s, pid in zip(lines[::2], lines[1::2])]

        return attempts

    return arm


def _by_seed(records):
    return {r["config"]["seed"]: r for r in records}


def _strip_timing(v):
    if isinstance(v, dict):
        return {k: _strip_timing(x) for k, x in v.items() if k not in TIMING}
    if isinstance(v, list):
        return [_strip_timing(x) for x in v]
    return v


def _metrics(records):
    """Each record's status, metrics and history without what measures this
    machine: the report's own rule (wall seconds, and the virtual clock,
    which scales a step time measured here or read from the cache, and says
    which), then any ``seconds`` left."""
    from fedmedbench.report import strip_timings

    return {r["cell_id"]: (r["status"], _strip_timing(r["metrics"]), r["history"])
            for r in strip_timings(records)}


# --------------------------------------------------------------------------
# lazy, bounded matrices
# --------------------------------------------------------------------------


def _eager_cells(m, reg):
    """How 0.1 expanded a matrix (eagerly): the reference for ids and order."""
    cells, seen = [], set()
    for combo in itertools.product(*(m.axes[a] for a in AXES), m.seeds):
        point, seed = dict(zip(AXES, combo[:-1])), combo[-1]
        if any(all(_matches(point[k], v) for k, v in e.items()) for e in m.exclude):
            continue
        cfg = resolve(point, seed, m, reg)
        cid = cell_id(cfg)
        if cid not in seen:
            seen.add(cid)
            cells.append({"cell_id": cid, "matrix": m.name, "config": cfg,
                          "labels": {a: "default" if a == "model" and point[a] is None
                                     else _label(point[a]) for a in AXES}})
    return cells


DUPLICATES = {  # values that resolve to the same cell, seeds repeated, an exclude
    "seeds": [0, 0, 1],
    "axes": {"dataset": ["heart-disease"], "partitioner": ["default", "natural"],
             "algorithm": ["fedavg", {"name": "fedavg"}, "local",
                           {"name": "fedprox", "mu": 0.01}, {"name": "fedprox", "mu": 0.1}]},
    "exclude": [{"algorithm": "local", "partitioner": "natural"},
                {"algorithm": "fedprox(mu=0.1)", "partitioner": "default"}],
}


@pytest.mark.parametrize("source", [None, *sorted((ROOT / "matrices").glob("*.toml")),
                                    "duplicates"], ids=lambda s: getattr(s, "stem", str(s)))
def test_streamed_cells_equal_eager_expansion(source):
    reg = get_registry()
    m = parse_matrix(DUPLICATES) if source == "duplicates" else load_matrix(source)
    want = _eager_cells(m, reg)
    assert m.cells == want  # same ids, configs, labels and order as 0.1
    assert m.count() == len(want)
    assert [c["cell_id"] for c in m.iter_cells()] == [c["cell_id"] for c in want]


def test_count_and_first_cell_do_not_generate_the_matrix(monkeypatch):
    raw = {"seeds": list(range(1000)), "axes": {
        "dataset": [{"name": "synthetic-tabular", "n_samples": 100 + i} for i in range(10)],
        "algorithm": ["fedavg", *({"name": "fedprox", "mu": 0.01 * (i + 1)} for i in range(9))],
        "privacy": [{"name": "dp-sgd", "epsilon": float(i + 1)} for i in range(10)]},
        "exclude": [{"algorithm": "fedavg", "privacy": "dp-sgd(epsilon=1.0)"}]}
    m = parse_matrix(raw)
    calls = []
    real = matrix_mod.resolve
    monkeypatch.setattr(matrix_mod, "resolve", lambda *a: (calls.append(1), real(*a))[1])
    assert m.count() == (1000 - 10) * 1000  # 10 datasets x 1 point excluded, x 1000 seeds
    assert calls == []  # counted, not generated
    first = next(m.iter_cells())
    assert first["config"]["seed"] == 0 and len(calls) == 1  # one point resolved, not 990
    with pytest.raises(ConfigError, match=r"990,000 cells, over the cap of 100,000.*"
                                          r"--max-cells 990000"):
        m.check_size()


def test_bad_run_settings_are_found_before_any_cell_is_generated():
    # a [run.NAME] table that makes one combination invalid, at the end of a
    # matrix that is no longer expanded up front
    raw = {"seeds": list(range(50)), "axes": {
        "dataset": ["heart-disease", {"name": "synthetic-tabular", "n_samples": 200}],
        "algorithm": ["fedavg", "local", "fedprox"]},
        "run": {"fedprox": {"optimizer": "rmsprop"}}}
    with pytest.raises(ConfigError, match=r"run settings for .* / fedprox: optimizer = 'rmsprop'"):
        parse_matrix(raw)
    # ... and none when every cell of that combination is excluded
    m = parse_matrix({**raw, "exclude": [{"algorithm": "fedprox"}]})
    assert m.count() == 2 * 2 * 50


def test_matrix_over_the_cap_is_refused_unless_raised(tmp_path, capsys):
    f = tmp_path / "big.toml"
    seeds = ", ".join(map(str, range(60)))
    f.write_text(f'seeds = [{seeds}]\n[axes]\nalgorithm = ["fedavg", "local"]\n'
                 f'dataset = [{{ name = "synthetic-tabular", n_samples = 200 }}]\n')
    assert main(["run", str(f), "--dry-run", "--max-cells", "100"]) == 2
    assert "120 cells, over the cap of 100" in capsys.readouterr().err
    assert main(["run", str(f), "--dry-run", "--max-cells", "120"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 120
    assert main(["run", str(f), "--dry-run", "--max-cells", "0"]) == 2


# --------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------


@pytest.mark.parametrize("source", [None, ROOT / "matrices" / "privacy.toml"],
                         ids=["quickstart", "privacy"])
def test_shards_cover_every_cell_exactly_once(source, capsys):
    whole = [c["cell_id"] for c in load_matrix(source).iter_cells()]
    shards = []
    for i in range(1, 5):
        args = ["run", *([str(source)] if source else []), "--dry-run", "--shard", f"{i}/4"]
        assert main(args) == 0
        shards.append([line.split()[0] for line in capsys.readouterr().out.splitlines()])
    assert sorted(itertools.chain(*shards)) == sorted(whole)  # every cell, none twice
    assert all(shards)  # no empty shard for these matrices
    for i, ids in enumerate(shards):  # the rule: int(cell_id, 16) % N == I - 1
        assert all(int(c, 16) % 4 == i for c in ids)


@pytest.mark.parametrize("spec", ["0/4", "5/4", "1/0", "a/b", "3"])
def test_bad_shard_is_a_usage_error(spec, capsys):
    assert main(["run", "--dry-run", "--shard", spec]) == 2
    assert f"--shard {spec!r}: expected I/N with 1 <= I <= N" in capsys.readouterr().err


# --------------------------------------------------------------------------
# executor settings
# --------------------------------------------------------------------------


def test_executor_table_in_the_matrix_file(tmp_path):
    (tmp_path / "c.toml").write_text('kind = "slurm"\nmemory = "1GB"\n')
    raw = {"axes": {"dataset": ["heart-disease"], "algorithm": ["fedavg"]},
           "executor": {"name": "process", "workers": 3, "retries": 0, "cell_timeout": 60}}
    m = parse_matrix(raw)
    assert [c["cell_id"] for c in m.iter_cells()] == [
        c["cell_id"] for c in parse_matrix({**raw, "executor": {}}).iter_cells()]  # ids kept
    s = executors.resolve_settings(m.executor)
    assert s == {"executor": "process", "workers": 3, "scheduler": None, "cluster": None,
                 "retries": 0, "cell_timeout": 60.0}
    # the command line wins; an address implies dask
    s = executors.resolve_settings(m.executor, executor="dask", workers=2,
                                   scheduler="tcp://10.0.0.1:8786")
    assert (s["executor"], s["workers"], s["scheduler"]) == ("dask", 2, "tcp://10.0.0.1:8786")
    t = executors.executor_table({"cluster": "c.toml"}, where="m", base=tmp_path)
    assert executors.resolve_settings(t)["executor"] == "dask"
    assert executors.resolve_settings(t)["cluster"] == str(tmp_path / "c.toml")


@pytest.mark.parametrize("table, message", [
    ({"worker": 2}, "unknown key(s) 'worker' (did you mean 'workers'?)"),
    ({"name": "ray"}, "name = 'ray'; choose one of local, process, dask"),
    ({"workers": 0}, "workers = 0: expected an integer from 1 to 100,000"),
    ({"retries": -1}, "retries = -1: expected an integer from 0 to 100,000"),
    ({"cell_timeout": float("inf")}, "cell_timeout = inf: a cell timeout is a positive"),
    ({"scheduler": "localhost"}, "scheduler = 'localhost' has no scheme; give a dask scheduler "
                                    "address such as tcp://HOST:PORT"),
])
def test_bad_executor_table_is_a_config_error(table, message):
    raw = {"axes": {"dataset": ["heart-disease"], "algorithm": ["fedavg"]}, "executor": table}
    with pytest.raises(ConfigError) as e:
        parse_matrix(raw, source="m.toml")
    assert "m.toml: [executor]" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "0", "-inf"])
def test_cell_timeout_must_be_positive_and_finite(value, capsys):
    assert main(["run", "--dry-run", f"--cell-timeout={value}"]) == 2
    assert "a cell timeout is a positive, finite number of seconds" in capsys.readouterr().err


def test_scheduler_needs_the_dask_executor(capsys):
    assert main(["run", "--dry-run", "--executor", "process", "--scheduler",
                 "tcp://127.0.0.1:1"]) == 2
    assert "--scheduler needs --executor dask" in capsys.readouterr().err


def test_worker_death_reason_names_the_signal():
    assert "SIGKILL (likely out of memory" in executors.death_reason(-signal.SIGKILL)
    assert "killed by SIGSEGV" in executors.death_reason(-signal.SIGSEGV)
    assert "exited with code 7" in executors.death_reason(7)


def test_record_that_is_not_json_becomes_a_failed_record():
    cell = next(load_matrix(None, select=["algorithm=local", "seed=0"]).iter_cells())
    rec = json.loads(executors.record_json({"cell_id": cell["cell_id"], "x": {1, 2}}, cell))
    assert rec["status"] == "failed" and rec["error"]["type"] == "RecordNotJSON"
    assert "not JSON serializable" in rec["error"]["message"]


# --------------------------------------------------------------------------
# timeouts and worker deaths: local and process executors
# --------------------------------------------------------------------------


def _fault_run(fault: str, seeds: str, args: tuple[str, ...], tmp: Path, spawn) -> dict:
    """``fedmedbench run`` of FAULTY with the fault plugin armed with ``fault``,
    in a driver process of its own (a background job, tests/conftest.py, for
    the runs that wait out a cell timeout): its exit status and pid, the
    records, the attempts log."""
    (tmp / "faults").mkdir()
    (tmp / "matrix.toml").write_text(FAULTY.format(seeds=seeds))
    base = spawn.environ  # the session's environment, not a foreground test's
    env = {**base, "FEDMEDBENCH_PLUGINS": "fmb_executor_plugins",
           "FMB_FAULT_DIR": str(tmp / "faults"), "FMB_FAULT": fault,
           "PYTHONPATH": os.pathsep.join([str(TESTS),
                                          *filter(None, [base.get("PYTHONPATH")])])}
    p = spawn([sys.executable, "-m", "fedmedbench.cli", "run", str(tmp / "matrix.toml"),
               "--out", str(tmp / "results"), "--no-progress", "--no-report", *args],
              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=600)
    records, _ = load_records([tmp / "results"]) if (tmp / "results").exists() else ([], [])
    log = tmp / "faults" / "attempts"
    lines = log.read_text().split() if log.exists() else []
    return {"code": p.returncode, "pid": p.pid, "err": err.decode(), "records": records,
            "attempts": [(int(a), int(b)) for a, b in zip(lines[::2], lines[1::2])]}


@pytest.mark.slow
@pytest.mark.background(job=functools.partial(_fault_run, "hang:1", "0, 1",
                                              ("--cell-timeout", "20")), waits=True)
def test_local_executor_enforces_the_cell_timeout(background):
    code, records = background["code"], background["records"]
    assert code == 1, background["err"][-2000:]  # returned at all: the hung cell was stopped
    by = _by_seed(records)
    assert by[0]["status"] == "ok"
    assert by[1]["status"] == "failed" and by[1]["error"]["type"] == "Timeout"
    assert "--cell-timeout=20 s" in by[1]["error"]["message"]
    (_, pid), = background["attempts"]  # the hung cell ran in a child, which was killed
    assert pid != background["pid"] and not _alive(pid)


def test_timeout_counts_from_hand_out_so_a_hang_at_import_is_stopped(faults, run_matrix,
                                                                     monkeypatch):
    faults("")
    monkeypatch.setenv("FMB_HANG_AT_IMPORT", "1")  # the workers hang importing the plugin
    code, records = run_matrix(FAULTY.format(seeds="0"), "--executor", "process",
                               "--workers", "1", "--cell-timeout", "4")
    assert code == 1  # returned at all: the worker hanging at import was stopped
    (rec,) = records
    assert rec["error"]["type"] == "Timeout" and "start-up included" in rec["error"]["message"]


def test_a_huge_finite_timeout_is_accepted(run_matrix):
    # 0.1: OverflowError from the pool's wait(); a timeout of ~31,700 years holds
    code, records = run_matrix(FAULTY.format(seeds="0"), "--executor", "process",
                               "--workers", "1", "--cell-timeout", "1e12")
    assert code == 0 and [r["status"] for r in records] == ["ok"]


@pytest.mark.slow
def test_pool_retries_a_dead_worker_then_records_why(faults, run_matrix, tmp_path):
    attempts = faults("die:1,die-once:2,exit:3")
    code, records = run_matrix(FAULTY.format(seeds="0, 1, 2, 3"), "--executor", "process",
                               "--workers", "2", "--retries", "1")
    assert code == 1
    by = _by_seed(records)
    assert by[0]["status"] == "ok" and by[2]["status"] == "ok"  # died once, then ran
    err = by[1]["error"]
    assert by[1]["status"] == "failed" and err["type"] == "WorkerDied"
    assert "killed by SIGKILL (likely out of memory" in err["message"]
    assert "on each of 2 tries" in err["message"]
    assert by[3]["status"] == "failed"  # a plugin's sys.exit is that cell's failure, named
    assert "sys.exit(3)" in by[3]["error"]["message"]
    tries = {}
    for seed, pid in attempts():
        tries.setdefault(seed, []).append(pid)
    assert len(tries[1]) == 2 and len(set(tries[1])) == 2  # retried on a fresh worker
    assert len(tries[2]) == 2 and len(tries[3]) == 1
    # the healthy cells match the in-process executor
    _, local = run_matrix(FAULTY.format(seeds="0, 2"), out=tmp_path / "local")
    assert _metrics(local) == _metrics([by[0], by[2]])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (dead) parent to be reaped counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _spawn_driver(tmp_path: Path, text: str, *args: str) -> tuple[subprocess.Popen, Path]:
    mfile = tmp_path / "driver.toml"
    mfile.write_text(textwrap.dedent(text))
    out = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "fedmedbench.cli", "run", str(mfile),
                             "--out", str(out), "--no-progress", "--no-report", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    return proc, out


def _wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_pool_workers_exit_when_the_driver_is_killed(faults, tmp_path):
    attempts = faults("hang:0")
    proc, _ = _spawn_driver(tmp_path, FAULTY.format(seeds="0"), "--executor", "process",
                            "--workers", "1")
    try:
        _wait_for(lambda: len(attempts()) == 1, 90, "the hung cell to start")
        (_, worker), = attempts()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not _alive(worker), 30, f"worker {worker} to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"Traceback" not in proc.stderr.read()


# --------------------------------------------------------------------------
# dask
# --------------------------------------------------------------------------

needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason="needs dask.distributed: pip install 'fedmedbench[dask]'")


@needs_dask
@pytest.mark.slow
def test_dask_local_cluster_matches_local_and_retries_a_dead_worker(faults, run_matrix,
                                                                    tmp_path):
    attempts = faults("die:1:fedavg")  # one cell's worker dies on every try
    code, dask = run_matrix(SMALL, "--executor", "dask", "--workers", "2",
                            out=tmp_path / "dask")
    assert code == 1 and len(dask) == 6
    failed = [r for r in dask if r["status"] != "ok"]
    assert [(r["labels"]["algorithm"], r["config"]["seed"]) for r in failed] == [("fedavg", 1)]
    err = failed[0]["error"]
    assert err["type"] == "WorkerDied" and "died on each of 2 tries" in err["message"]
    pids = [pid for _, pid in attempts()]
    assert len(pids) == 2 and len(set(pids)) == 2  # tried again, in a fresh worker
    # every other cell: the in-process executor's records, metric for metric
    faults("")
    code, local = run_matrix(SMALL, "--select", "seed=0", out=tmp_path / "local")
    assert code == 0
    code, local1 = run_matrix(SMALL, "--select", "seed=1", "--select",
                              "algorithm=centralized,local", out=tmp_path / "local")
    assert code == 0 and len(local1) == 5
    ok = [r for r in dask if r["status"] == "ok"]
    assert len(ok) == 5 and _metrics(ok) == _metrics(local1)


@needs_dask
@pytest.mark.slow
@pytest.mark.background(job=functools.partial(_fault_run, "hang:0", "0", (
    "--executor", "dask", "--workers", "1", "--cell-timeout", "20")), waits=True)
def test_dask_stops_a_hung_cell_and_kills_its_worker(background):
    code, records = background["code"], background["records"]
    assert code == 1, background["err"][-2000:]
    (rec,) = records
    assert rec["error"]["type"] == "Timeout" and "--cell-timeout=20 s" in rec["error"]["message"]
    ((_, hung),) = background["attempts"]
    _wait_for(lambda: not _alive(hung), 30, "the hung cell's worker to be killed")


@needs_dask
def test_dask_refuses_workers_without_the_drivers_plugins(faults, run_matrix, capsys):
    import distributed

    faults("")
    # an existing cluster whose workers do not load the test plugin
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  env={"FEDMEDBENCH_PLUGINS": ""}) as cluster:
        code, records = run_matrix(FAULTY.format(seeds="0"), "--executor", "dask",
                                   "--scheduler", cluster.scheduler_address)
        worker = next(iter(cluster.scheduler_info["workers"]))
    assert code == 2 and records == []
    err = capsys.readouterr().err
    assert f"worker {worker} lacks plugin 'fmb_executor_plugins'" in err


@needs_dask
@pytest.mark.slow
def test_dask_driver_killed_then_rerun_computes_only_missing_cells(faults, tmp_path,
                                                                   monkeypatch):
    faults("hang:5")  # the run cannot finish: it is killed with cells done and cells running
    text = FAULTY.format(seeds="0, 1, 2, 3, 4, 5")
    proc, out = _spawn_driver(tmp_path, text, "--executor", "dask", "--workers", "2")
    try:
        _wait_for(lambda: len(list(out.glob("*.json"))) >= 2, 120, "two records")
        import psutil

        kids = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_for(lambda: not any(_alive(k.pid) for k in kids), 45, "the workers to exit")
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}
    assert all(read_record(out / n)["status"] == "ok" for n in before)  # nothing half-written
    # the rerun (in-process, the hang disarmed) computes only the missing cells
    monkeypatch.setenv("FMB_FAULT", "")
    ran = []
    real = executors.run_cell
    monkeypatch.setattr(executors, "run_cell", lambda c, **kw: (ran.append(c["cell_id"]),
                                                                real(c, **kw))[1])
    (tmp_path / "driver.toml").write_text(textwrap.dedent(text))
    assert main(["run", str(tmp_path / "driver.toml"), "--out", str(out), "--no-progress",
                 "--no-report"]) == 0
    records, _ = load_records([out])
    assert len(records) == 6 and len(ran) == 6 - len(before)
    assert not {f"{c}.json" for c in ran} & set(before)
    assert all((out / n).read_bytes() == b for n, b in before.items())  # untouched


def _ctrl_c_job(tmp: Path, spawn) -> dict:
    """A dask run whose cell 2 hangs, interrupted by a Ctrl-C to its process
    group once cells 0 and 1 are recorded (a background job, tests/conftest.py)."""
    import psutil

    (tmp / "faults").mkdir()
    (tmp / "driver.toml").write_text(textwrap.dedent(FAULTY.format(seeds="0, 1, 2")))
    out = tmp / "results"
    base = spawn.environ  # the session's environment, not a foreground test's
    env = {**base, "FEDMEDBENCH_PLUGINS": "fmb_executor_plugins",
           "FMB_FAULT_DIR": str(tmp / "faults"), "FMB_FAULT": "hang:2",
           "PYTHONPATH": os.pathsep.join([str(TESTS),
                                          *filter(None, [base.get("PYTHONPATH")])])}
    proc = spawn([sys.executable, "-m", "fedmedbench.cli", "run", str(tmp / "driver.toml"),
                  "--out", str(out), "--no-progress", "--no-report", "--executor", "dask",
                  "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(list(out.glob("*.json"))) >= 2, 120, "two records")
        kids = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    records, _ = load_records([out])
    workers_exited = True
    try:
        _wait_for(lambda: not any(_alive(k.pid) for k in kids), 45, "the workers to exit")
    except AssertionError:
        workers_exited = False
    return {"code": code, "err": err, "records": records, "workers_exited": workers_exited}


@needs_dask
@pytest.mark.slow
@pytest.mark.background(job=_ctrl_c_job)  # cells 0 and 1 finish, cell 2 would never
def test_dask_ctrl_c_cancels_the_futures_and_keeps_finished_records(background):
    assert background["code"] == 130
    err = background["err"]
    assert "interrupted; finished cells are saved" in err and "Traceback" not in err
    records = background["records"]
    assert sorted(r["config"]["seed"] for r in records) == [0, 1]
    assert all(r["status"] == "ok" for r in records)
    assert background["workers_exited"], "timed out waiting for the workers to exit"


def test_jobqueue_slurm_and_pbs_job_scripts(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from fedmedbench.executors_dask import jobqueue_cluster, load_cluster_config

    f = tmp_path / "cluster.toml"
    f.write_text(textwrap.dedent("""
        kind = "slurm"
        jobs = 4
        cores = 8
        memory = "32GB"
        walltime = "04:00:00"
        queue = "cpu"
        account = "proj123"
        job_script_prologue = ["source ~/fmb/bin/activate"]
        job_extra_directives = ["--constraint=intel"]
        [env]
        FEDMEDBENCH_CACHE_DIR = "/scratch/fmb cache"
    """))
    cfg = load_cluster_config(f)
    cluster = jobqueue_cluster(cfg)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    for directive in ("#SBATCH -p cpu", "#SBATCH -A proj123", "#SBATCH -t 04:00:00",
                      "#SBATCH -n 1", "#SBATCH --cpus-per-task=8", "#SBATCH --constraint=intel"):
        assert directive in lines, (directive, script)
    assert any(x.startswith("#SBATCH --mem=") for x in lines)
    exports = lines.index("export FEDMEDBENCH_CACHE_DIR='/scratch/fmb cache'")
    assert exports < lines.index("source ~/fmb/bin/activate")
    cmd = next(x for x in lines if "distributed.cli.dask_worker" in x)
    assert "--nthreads 1" in cmd and "--nworkers 8" in cmd and "--nanny" in cmd
    assert cfg["jobs"] == 4

    f.write_text('kind = "pbs"\nmemory = "8GB"\nqueue = "batch"\nwalltime = "01:00:00"\n'
                 'resource_spec = "select=1:ncpus=2"\ncores = 2\n')
    cluster = jobqueue_cluster(load_cluster_config(f))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#PBS -q batch" in script and "#PBS -l select=1:ncpus=2" in script
    assert "#PBS -l walltime=01:00:00" in script and "--nworkers 2" in script

    for text, message in [('kind = "lsf"\nmemory = "1GB"', "kind = 'lsf'; choose one of"),
                          ('kind = "slurm"\nmemory = "1GB"\nprocesses = 2',
                           "one single-threaded worker process per core"),
                          ('kind = "slurm"', "`memory` (per job"),
                          ('kind = "slurm"\nmemory = "1GB"\njobs = 0', "jobs = 0")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_cluster_config(f)
