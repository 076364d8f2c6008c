"""The ``dask`` executor: cells on dask.distributed workers.

Three ways to get workers (README, "Many machines"):

- no address: a ``LocalCluster`` on this machine, ``workers`` worker
  processes with one thread each (their nannies live in the driver, the
  worker processes exit when it dies);
- ``scheduler="tcp://HOST:PORT"``: a running cluster;
- ``cluster=FILE``: a SLURM or PBS cluster through dask-jobqueue, from a
  small TOML file (:func:`load_cluster_config`, :func:`jobqueue_cluster`).

The driver submits at most as many cells as the workers have threads, so a
cell starts as soon as it is submitted, and keeps every cell's submission
time: a cell past ``timeout`` seconds is recorded ``failed`` and the worker
process running it is killed (a nanny starts a new one). The driver writes
each record the moment its future completes (``as_completed``). A cell whose
worker died (``KilledWorker``) is submitted again ``retries`` times, then
recorded ``failed`` with the reason. Before the first cell, every worker's
plugins and versions are compared with the driver's (``Client.run``), and a
worker that lacks one, or has another version, stops the run with a message
naming the worker and the plugin; each cell checks again on the worker that
runs it, so a worker that joins later is held to the same rule.

Install with ``pip install 'fedmedbench[dask]'`` (dask-jobqueue comes with
``fedmedbench[cluster]``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tomllib

from fedmedbench.errors import ConfigError
from fedmedbench.executors import _tb, failed_record, record_json, run_one
from fedmedbench.registry import Registry, get_registry

#: dask-jobqueue keyword arguments a cluster file may set, beside ``kind``,
#: ``jobs`` and ``env``
JOBQUEUE_KEYS = ("cores", "memory", "walltime", "queue", "account", "job_name",
                 "job_script_prologue", "job_extra_directives", "job_directives_skip",
                 "local_directory", "log_directory", "interface", "python", "death_timeout",
                 "resource_spec")
CLUSTER_KINDS = ("slurm", "pbs")
_POLL_S = 0.05
#: a worker preload (the text of a module) for the local cluster: Ctrl-C in the
#: terminal reaches the whole process group; the driver alone handles it
_IGNORE_SIGINT = """
import signal
try:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
except ValueError:  # not the main thread
    pass
"""


def _dask() -> tuple[Any, Any]:
    try:
        import dask
        import distributed
    except ImportError:
        raise ConfigError("--executor dask needs dask.distributed: "
                          "pip install 'fedmedbench[dask]'") from None
    return dask, distributed


# --------------------------------------------------------------------------
# plugins on the workers
# --------------------------------------------------------------------------


def plugin_signature(reg: Registry) -> dict[str, dict[str, Any]]:
    """Every plugin of ``reg``: its distribution, version and components."""
    dists = {id(p): (d.metadata["name"], d.version) for p, d in reg.pm.list_plugin_distinfo()}
    sig: dict[str, dict[str, Any]] = {}
    for name, plugin in reg.pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        dist, version = dists.get(id(plugin), ("(not installed)", ""))
        sig[name] = {"distribution": dist, "version": version, "components": []}
    for info in reg.all():
        sig.setdefault(info.plugin, {"distribution": info.distribution,
                                     "version": info.version, "components": []})
        sig[info.plugin]["components"].append(info.name)
    return sig


def plugin_mismatch(have: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]],
                    worker: str) -> str | None:
    """Why a worker with plugins ``have`` cannot run cells for a driver with
    plugins ``want``, or ``None`` when it can (extra plugins are fine)."""
    for name, w in sorted(want.items()):
        h = have.get(name)
        if h is None:
            comps = ", ".join(w["components"]) or "no components"
            return (f"worker {worker} lacks plugin {name!r} (distribution "
                    f"{w['distribution']} {w['version']}, {comps}) that this driver has: "
                    f"install the same plugins on every worker (a module named in "
                    f"FEDMEDBENCH_PLUGINS must be importable there and named in the workers' "
                    f"FEDMEDBENCH_PLUGINS too)")
        if (h["distribution"], h["version"]) != (w["distribution"], w["version"]):
            return (f"worker {worker} has plugin {name!r} from {h['distribution']} "
                    f"{h['version']}, this driver from {w['distribution']} {w['version']}: "
                    f"install the same versions on every worker")
        if sorted(h["components"]) != sorted(w["components"]):
            missing = sorted(set(w["components"]) - set(h["components"]))
            return (f"worker {worker}'s plugin {name!r} registers other components than this "
                    f"driver's (missing there: {', '.join(missing) or 'none'}; extra: "
                    f"{', '.join(sorted(set(h['components']) - set(w['components']))) or 'none'}"
                    f"): install the same plugin version on every worker")
    return None


def _worker_signature() -> dict[str, dict[str, Any]]:
    """Run on each worker by :func:`check_workers`."""
    return plugin_signature(get_registry())


def check_workers(client: Any, want: dict[str, dict[str, Any]]) -> None:
    """Compare every worker's plugins with ``want``; :class:`ConfigError`
    naming the first worker that differs or cannot load its plugins."""
    found = client.run(_worker_signature, on_error="return")
    for worker, have in sorted(found.items()):
        if isinstance(have, BaseException):
            raise ConfigError(f"worker {worker} cannot load fedmedbench's plugins "
                              f"({type(have).__name__}: {have}); install fedmedbench and the "
                              f"same plugins there")
        problem = plugin_mismatch(have, want, worker)
        if problem:
            raise ConfigError(problem)


# --------------------------------------------------------------------------
# what runs on a worker
# --------------------------------------------------------------------------


def run_task(cell_json: str, want: dict[str, dict[str, Any]]) -> str:
    """One cell on a dask worker: its record as JSON (the driver writes it)."""
    import torch

    torch.set_num_threads(1)
    cell = json.loads(cell_json)
    reg = get_registry()
    problem = plugin_mismatch(plugin_signature(reg), want, _worker_address())
    if problem:
        return record_json(failed_record(cell, problem, "PluginMismatch"), cell)
    return record_json(run_one(cell, reg), cell)


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "(unknown)"


async def _exit_soon() -> bool:
    """Run on a worker whose cell ran out of time: end its process (its
    nanny, where it has one, starts a fresh worker)."""
    asyncio.get_running_loop().call_later(0.05, os._exit, 1)
    return True


def _processing_on(key: str, dask_scheduler: Any = None) -> str | None:
    """Run on the scheduler: the address of the worker running task ``key``."""
    ts = dask_scheduler.tasks.get(key)
    return ts.processing_on.address if ts is not None and ts.processing_on else None


# --------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------


def run_dask(cells: Iterator[dict[str, Any]], *, workers: int, scheduler: str | None,
             cluster: str | Path | None, timeout: float | None, retries: int,
             finish: Callable[[dict[str, Any]], None]) -> None:
    """Run ``cells`` on dask workers, calling ``finish`` with each record."""
    dask, distributed = _dask()
    want = plugin_signature(get_registry())
    owned = None
    # the driver retries cells whose worker died itself, so the scheduler (ours)
    # gives up on a task at the first death; one task per worker thread at a time
    with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                          "distributed.scheduler.worker-saturation": 1.0}):
        if scheduler:
            try:
                client = distributed.Client(scheduler, timeout="30s")
            except (OSError, TimeoutError) as exc:
                raise ConfigError(f"--scheduler {scheduler}: cannot connect ({exc}); is a "
                                  f"dask scheduler running there?") from None
        elif cluster:
            cfg = load_cluster_config(cluster)
            owned = jobqueue_cluster(cfg)
            owned.scale(jobs=cfg["jobs"])
            client = distributed.Client(owned)
        else:
            owned = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                             processes=True, dashboard_address=None,
                                             silence_logs=logging.CRITICAL,
                                             preload=[_IGNORE_SIGINT])
            client = distributed.Client(owned)
    try:
        try:
            client.wait_for_workers(1, timeout=30)
        except (TimeoutError, distributed.TimeoutError):
            where = scheduler or "the cluster's queue"
            print(f"fedmedbench: waiting for a first dask worker ({where})", file=sys.stderr)
            client.wait_for_workers(1)
        check_workers(client, want)
        _drive(client, distributed, cells, want=want, timeout=timeout, retries=retries,
               finish=finish)
    finally:
        client.close()
        if owned is not None:
            owned.close()


class _Job:
    def __init__(self, future: Any, cell: dict[str, Any], tries: int) -> None:
        self.future, self.cell, self.tries = future, cell, tries
        self.handed = time.monotonic()


def _drive(client: Any, distributed: Any, cells: Iterator[dict[str, Any]], *,
           want: dict[str, dict[str, Any]], timeout: float | None, retries: int,
           finish: Callable[[dict[str, Any]], None]) -> None:
    KilledWorker = distributed.KilledWorker  # noqa: N806
    done = distributed.as_completed()
    inflight: dict[str, _Job] = {}
    again: deque[tuple[dict[str, Any], int]] = deque()
    more = True
    capacity, checked = 1, 0.0

    def next_job() -> tuple[dict[str, Any], int] | None:
        nonlocal more
        if again:
            return again.popleft()
        cell = next(cells, None) if more else None
        more = cell is not None
        return None if cell is None else (cell, 0)

    try:
        while True:
            if time.monotonic() - checked > 2.0:  # workers may come and go
                capacity = max(1, sum(client.nthreads().values()))
                checked = time.monotonic()
            while len(inflight) < capacity and (job := next_job()):
                cell, tries = job
                fut = client.submit(run_task, json.dumps(cell), want, pure=False,
                                    key=f"fedmedbench-cell-{cell['cell_id']}-{tries}-"
                                        f"{os.urandom(4).hex()}")
                inflight[fut.key] = _Job(fut, cell, tries)
                done.add(fut)
            if not inflight:
                return
            batch = done.next_batch(block=False)
            if not batch:
                if timeout is not None:
                    now = time.monotonic()
                    for key, j in list(inflight.items()):
                        if now - j.handed > timeout:
                            inflight.pop(key)
                            _stop(client, j.future)
                            finish(failed_record(
                                j.cell, f"the cell ran past --cell-timeout={timeout:g} s "
                                        f"(counted from when it was handed to dask, worker "
                                        f"start-up included) and its worker process was killed; "
                                        f"raise the timeout or shrink the cell", "Timeout"))
                time.sleep(_POLL_S)
                continue
            for fut in batch:
                j = inflight.pop(fut.key, None)
                if j is None:  # a cell given up on (timeout): its outcome is ignored
                    continue
                if fut.status == "finished":
                    finish(json.loads(fut.result()))
                    continue
                exc = fut.exception() if fut.status == "error" else None
                if isinstance(exc, KilledWorker) or exc is None:
                    if j.tries < retries:
                        again.append((j.cell, j.tries + 1))
                        continue
                    last = getattr(getattr(exc, "last_worker", None), "address", "?")
                    tries = f" on each of {j.tries + 1} tries" if j.tries else ""
                    finish(failed_record(
                        j.cell, f"the dask worker process running this cell died{tries} (last "
                                f"on {last}: a crash, the out-of-memory killer, or os._exit in "
                                f"the cell); other cells were not affected", "WorkerDied"))
                else:
                    finish(failed_record(j.cell, f"{type(exc).__name__}: {exc}",
                                         type(exc).__name__, tb=_tb(exc)))
    except BaseException:  # Ctrl-C or an error: stop what runs, keep what was written
        if inflight:
            client.cancel([j.future for j in inflight.values()], force=True)
        raise


def _stop(client: Any, future: Any) -> None:
    """Kill the worker process running ``future`` and forget the future."""
    try:
        addr = client.run_on_scheduler(_processing_on, future.key)
        if addr:
            client.run(_exit_soon, workers=[addr], on_error="ignore")
    finally:
        client.cancel([future], force=True)


# --------------------------------------------------------------------------
# SLURM and PBS through dask-jobqueue
# --------------------------------------------------------------------------


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Read and check a cluster file (TOML)::

        kind = "slurm"              # or "pbs"
        jobs = 4                    # batch jobs to submit
        cores = 8                   # per job: 8 worker processes, one thread each
        memory = "32GB"             # per job
        walltime = "04:00:00"
        queue = "cpu"
        account = "proj123"
        job_script_prologue = ["module load python/3.11", "source ~/fmb/bin/activate"]
        job_extra_directives = ["--constraint=intel"]

        [env]                       # exported in the job script before the workers start
        FEDMEDBENCH_CACHE_DIR = "/scratch/fmb-cache"

    Other keys are dask-jobqueue's keyword arguments: see :data:`JOBQUEUE_KEYS`.
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"cluster config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cluster config file {p}: {exc}") from None
    where = f"cluster config {p}"
    kind = raw.get("kind")
    if kind not in CLUSTER_KINDS:
        raise ConfigError(f"{where}: kind = {kind!r}; choose one of {', '.join(CLUSTER_KINDS)}")
    bad = sorted(set(raw) - {"kind", "jobs", "env", *JOBQUEUE_KEYS})
    if bad:
        hint = (" (a job runs one single-threaded worker process per core, so `processes` is "
                "not set here)" if "processes" in bad else "")
        raise ConfigError(f"{where}: unknown key(s) {bad}{hint}; allowed: kind, jobs, env, "
                          f"{', '.join(JOBQUEUE_KEYS)}")
    jobs = raw.get("jobs", 1)
    cores = raw.get("cores", 1)
    for key, v in (("jobs", jobs), ("cores", cores)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: {key} = {v!r}: expected an integer of at least 1")
    if "memory" not in raw:
        raise ConfigError(f"{where}: `memory` (per job, e.g. \"16GB\") is required")
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{where}: [env] must be a table of strings")
    for key in ("job_script_prologue", "job_extra_directives", "job_directives_skip"):
        v = raw.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}: {key} must be a list of strings")
    return {**raw, "jobs": jobs, "cores": cores, "env": env}


def jobqueue_cluster(cfg: dict[str, Any]) -> Any:
    """A dask-jobqueue ``SLURMCluster`` or ``PBSCluster`` for a checked
    cluster config (:func:`load_cluster_config`); nothing is submitted
    before ``scale()``. Each job runs ``cores`` worker processes with one
    thread each, after ``export``-ing ``env``."""
    _dask()
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError("--cluster needs dask-jobqueue: pip install 'fedmedbench[cluster]'"
                          ) from None
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[cfg["kind"]]
    kwargs = {k: v for k, v in cfg.items() if k in JOBQUEUE_KEYS}
    if cfg["kind"] != "pbs" and "resource_spec" in kwargs:
        raise ConfigError("resource_spec is a PBS setting; SLURM takes job_extra_directives")
    exports = [f"export {k}={shlex.quote(v)}" for k, v in cfg["env"].items()]
    kwargs["job_script_prologue"] = [*exports, *kwargs.get("job_script_prologue", [])]
    kwargs["processes"] = cfg["cores"]  # one thread per worker process
    with _dask()[0].config.set({"distributed.scheduler.allowed-failures": 0,
                                "distributed.scheduler.worker-saturation": 1.0}):
        return cls(**kwargs)
