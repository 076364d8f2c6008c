"""The ``dask`` executor: cells on dask.distributed workers.

Three ways to get workers (docs/running.md, "Many machines"):

- no address: a ``LocalCluster`` on this machine, ``workers`` worker
  processes with one thread each (their nannies live in the driver, the
  worker processes exit when it dies);
- ``scheduler="tcp://HOST:PORT"``: a running cluster;
- ``cluster=FILE``: a SLURM or PBS cluster through dask-jobqueue, from a
  small TOML file (:func:`load_cluster_config`, :func:`jobqueue_cluster`).

The driver submits at most as many cells as the workers have threads, so a
cell starts as soon as it is submitted, and keeps every cell's submission
time. The driver writes each record the moment its future completes
(``as_completed``).

Every failure has a deadline and an honest count. A task tells the scheduler
when it starts (an event, ``fedmedbench-started``, sent before the cell runs),
so the driver counts the tries that really ran, however often the scheduler
itself retried them (an external scheduler keeps its own
``distributed.scheduler.allowed-failures``). A cell whose worker died
(``KilledWorker``) is submitted again until ``retries + 1`` tries ran, then
recorded ``WorkerDied`` with that count; a task that died before it started
(handed to a worker that was being killed) is resubmitted without counting.
A cell past ``timeout`` seconds is recorded ``Timeout`` and the worker running
it is killed (a nanny starts a new one), and no cell is handed out until that
worker has left; a cell that no worker started by then is ``NotStarted``, not
a timeout. The scheduler address, the first answer of the scheduler and each
worker's plugin check have a deadline (``FEDMEDBENCH_DASK_TIMEOUT`` seconds,
default 30): a scheduler that accepts and never answers, a server that is not
dask, or a worker whose plugin import hangs is a named configuration error.
A scheduler that dies mid-run (``kill -9``) stops the run with
:class:`~fedmedbench.errors.ExecutorLost` (exit 1): the cells it had
finished are saved, the ones it was running are recorded ``SchedulerLost``. Before the first cell, every worker's
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
import math
import os
import shlex
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tomllib

from fedmedbench.errors import ConfigError, ExecutorLost
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
#: the event topic a task logs on the scheduler when its cell starts
STARTED = "fedmedbench-started"
#: environment variable: seconds to wait for a scheduler's or a worker's answer
TIMEOUT_ENV = "FEDMEDBENCH_DASK_TIMEOUT"
#: how often a task that died before it started is handed out again
_MAX_UNSTARTED = 3


def answer_timeout() -> float:
    """Seconds to wait for the scheduler's or a worker's answer
    (``FEDMEDBENCH_DASK_TIMEOUT``, default 30)."""
    raw = os.environ.get(TIMEOUT_ENV, "30")
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return v


def _bounded(fn: Callable[[], Any], seconds: float, on_timeout: Callable[[], Exception]) -> Any:
    """``fn()`` in a helper thread, waited for at most ``seconds``; past that,
    ``on_timeout()`` is raised (the thread is abandoned: it is a daemon)."""
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=go, name="fedmedbench-dask-call", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise on_timeout()
    if "error" in box:
        raise box["error"]
    return box.get("value")
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


def check_workers(client: Any, want: dict[str, dict[str, Any]],
                  timeout: float | None = None) -> None:
    """Compare every worker's plugins with ``want``; :class:`ConfigError`
    naming the first worker that differs, cannot load its plugins, or does
    not answer within ``timeout`` seconds (a plugin import that hangs)."""
    timeout = answer_timeout() if timeout is None else timeout
    workers = sorted(client.run_on_scheduler(_worker_addresses))
    found: dict[str, Any] = {}
    lock = threading.Lock()

    def ask(w: str) -> None:
        try:
            res = client.run(_worker_signature, workers=[w], on_error="return")
        except BaseException as exc:  # the client closed under an abandoned ask
            res = {w: exc}
        with lock:
            found.update(res)

    threads = [threading.Thread(target=ask, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    with lock:
        silent = [w for w in workers if w not in found]
    if silent:
        raise ConfigError(
            f"dask worker {silent[0]}{f' (and {len(silent) - 1} more)' if len(silent) > 1 else ''}"
            f" did not answer within {timeout:g} s when asked for its fedmedbench plugins: "
            f"importing a plugin hangs there, or the worker is stuck; fix or stop that worker "
            f"(raise the wait with {TIMEOUT_ENV}=SECONDS)")
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


def _mark_started(key: str) -> None:
    """Tell the scheduler (and wait for its answer) that task ``key`` starts
    its cell on this worker: the driver counts tries from these events."""
    try:
        from distributed import get_worker
        from distributed.utils import sync

        w = get_worker()
        sync(w.loop, w.scheduler.log_event, topic=STARTED,
             msg={"key": key, "worker": w.address, "pid": os.getpid()},
             callback_timeout=answer_timeout())
    except Exception:  # not on a worker (tests), or the scheduler is gone: run anyway
        pass


def run_task(cell_json: str, want: dict[str, dict[str, Any]], key: str = "") -> str:
    """One cell on a dask worker: its record as JSON (the driver writes it)."""
    if key:
        _mark_started(key)
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


def _worker_addresses(dask_scheduler: Any = None) -> list[str]:
    """Run on the scheduler: the addresses of its workers."""
    return list(dask_scheduler.workers)


def _started(dask_scheduler: Any = None) -> list[tuple[str, str]]:
    """Run on the scheduler: ``(task key, worker)`` of every cell start logged."""
    out = []
    for _, msg in dask_scheduler.get_events(STARTED):
        if isinstance(msg, dict):
            out.append((str(msg.get("key")), str(msg.get("worker"))))
    return out


# --------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------

_SCHEMES = {
    "tls": "a tls:// scheduler needs dask's TLS certificates, which fedmedbench does not "
           "configure (reach it through an SSH tunnel as tcp://)",
    "ucx": "ucx:// needs UCX (ucx-py), which fedmedbench does not support",
    "inproc": "inproc:// reaches only a scheduler inside this very process",
    "ws": "a websocket scheduler is not supported", "wss": "a websocket scheduler is not "
                                                           "supported",
}


def check_address(value: Any, where: str) -> str:
    """A dask scheduler address fedmedbench can use: ``tcp://HOST:PORT``
    with a port from 1 to 65535; else a :class:`ConfigError` that says why."""
    import re

    fix = "give a dask scheduler address such as tcp://HOST:PORT (tcp://10.0.0.5:8786)"
    if not isinstance(value, str) or not value.strip() or len(value) > 1000:
        raise ConfigError(f"{where} = {str(value)[:80]!r}: {fix}")
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise ConfigError(f"{where} = {value!r} has no scheme; {fix}: write tcp://{value}")
    scheme = scheme.lower()
    if scheme != "tcp":
        why = _SCHEMES.get(scheme, f"{scheme}:// is not a dask address scheme fedmedbench "
                                   f"supports")
        raise ConfigError(f"{where} = {value!r}: {why}; {fix}")
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})/?", rest)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"{where} = {value!r}: the address needs a host and a port from 1 to "
                          f"65535 (the scheduler's port, 8786 by default); {fix}")
    return value


async def _probe(address: str, seconds: float) -> Any:
    """Ask what listens at ``address`` who it is (dask's ``identity``), each
    step within ``seconds``."""
    from distributed.comm import connect

    comm = await asyncio.wait_for(connect(address, timeout=seconds), seconds)
    try:
        await asyncio.wait_for(comm.write({"op": "identity", "reply": True}), seconds)
        return await asyncio.wait_for(comm.read(), seconds)
    finally:
        comm.abort()


def _connect(distributed: Any, scheduler: str, seconds: float) -> Any:
    """A client of the scheduler at ``scheduler``, or a :class:`ConfigError`
    within about ``seconds`` whatever is listening there: the address is first
    asked who it is, and only a dask scheduler gets a client."""
    def late() -> Exception:
        return ConfigError(
            f"--scheduler {scheduler}: no dask scheduler answered there within {seconds:g} s "
            f"(something accepts the connection but does not speak dask, or the scheduler "
            f"hangs); check the address and that `dask scheduler` runs there (raise the wait "
            f"with {TIMEOUT_ENV}=SECONDS)")

    def refused(why: str) -> Exception:
        return ConfigError(f"--scheduler {scheduler}: not a dask scheduler there ({why}); check "
                           f"the address and that `dask scheduler` runs there")

    try:
        ident = _bounded(lambda: asyncio.run(_probe(scheduler, seconds)), seconds * 3 + 5, late)
    except ConfigError:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        raise late() from None
    except BaseException as exc:  # refused, reset, or bytes that are not dask's protocol
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise refused(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(ident, dict) or ident.get("type") != "Scheduler":
        raise refused(f"it answered {str(ident)[:80]!r} instead of a scheduler's identity")
    try:
        return _bounded(lambda: distributed.Client(scheduler, timeout=f"{seconds}s"),
                        seconds + 10, late)
    except ConfigError:
        raise
    except Exception as exc:
        raise refused(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None


def run_dask(cells: Iterator[dict[str, Any]], *, workers: int, scheduler: str | None,
             cluster: str | Path | None, timeout: float | None, retries: int,
             finish: Callable[[dict[str, Any]], None]) -> None:
    """Run ``cells`` on dask workers, calling ``finish`` with each record."""
    dask, distributed = _dask()
    want = plugin_signature(get_registry())
    wait_s = answer_timeout()
    # distributed logs its reconnection attempts with tracebacks; what went wrong is
    # recorded and printed in fedmedbench's own words instead
    names = ["distributed", *(n for n in logging.root.manager.loggerDict
                              if n.startswith("distributed."))]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    _run_dask(dask, distributed, cells, want=want, wait_s=wait_s, workers=workers,
              scheduler=scheduler, cluster=cluster, timeout=timeout, retries=retries,
              finish=finish)
    # a lost scheduler leaves the client reconnecting in the background: its logs stay
    # silenced on that path (the run ends with ExecutorLost), restored otherwise
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)


def _run_dask(dask: Any, distributed: Any, cells: Iterator[dict[str, Any]], *,
              want: dict[str, dict[str, Any]], wait_s: float, workers: int,
              scheduler: str | None, cluster: str | Path | None, timeout: float | None,
              retries: int, finish: Callable[[dict[str, Any]], None]) -> None:
    owned = None
    # the driver retries cells whose worker died itself, so the scheduler (ours)
    # gives up on a task at the first death; one task per worker thread at a time
    with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                          "distributed.scheduler.worker-saturation": 1.0}):
        if scheduler:
            check_address(scheduler, "--scheduler")
            client = _connect(distributed, scheduler, wait_s)
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
    where = scheduler or (owned.scheduler_address if owned is not None else "the cluster")
    try:
        try:
            client.wait_for_workers(1, timeout=wait_s)
        except (TimeoutError, distributed.TimeoutError):
            print(f"fedmedbench: waiting for a first dask worker ({scheduler or 'the cluster'})",
                  file=sys.stderr)
            _wait_for_workers(client, where)
        check_workers(client, want, wait_s)
        _drive(client, distributed, cells, want=want, timeout=timeout, retries=retries,
               finish=finish, where=where)
    finally:
        try:
            _bounded(lambda: client.close(timeout=wait_s), wait_s + 5, lambda: TimeoutError())
        except Exception:  # a scheduler that is gone: nothing left to close
            pass
        if owned is not None:
            owned.close()


def _wait_for_workers(client: Any, where: str) -> None:
    """Wait for a first worker for as long as it takes (a batch queue), but
    not past the scheduler's death."""
    while True:
        if client.status not in ("running", "connecting", "newly-created"):
            raise ExecutorLost(f"the dask scheduler at {where} went away before a worker "
                               f"joined; nothing ran")
        try:
            client.wait_for_workers(1, timeout=5)
            return
        except Exception:  # timed out: look again
            continue


class _Job:
    def __init__(self, future: Any, cell: dict[str, Any], tries: int, unstarted: int) -> None:
        self.future, self.cell = future, cell
        #: tries that ran before this submission; submissions that never started
        self.tries, self.unstarted = tries, unstarted
        self.handed = time.monotonic()


def _drive(client: Any, distributed: Any, cells: Iterator[dict[str, Any]], *,
           want: dict[str, dict[str, Any]], timeout: float | None, retries: int,
           finish: Callable[[dict[str, Any]], None], where: str = "the scheduler") -> None:
    KilledWorker = distributed.KilledWorker  # noqa: N806
    done = distributed.as_completed()
    inflight: dict[str, _Job] = {}
    again: deque[tuple[dict[str, Any], int, int]] = deque()
    more = True
    capacity, checked = 1, 0.0
    killing: dict[str, float] = {}  # workers killed for a timeout -> when (none handed out)
    wait_s = answer_timeout()

    def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """A call to the scheduler, bounded; its death is :class:`ExecutorLost`."""
        def lost() -> Exception:
            return ExecutorLost(f"the dask scheduler at {where} stopped answering")

        if client.status not in ("running",):
            raise lost()
        try:
            return _bounded(lambda: fn(*args, **kw), wait_s, lost)
        except ExecutorLost:
            raise
        except (OSError, distributed.comm.CommClosedError, TimeoutError,
                distributed.TimeoutError, asyncio.CancelledError) as exc:
            raise ExecutorLost(f"the dask scheduler at {where} went away ({type(exc).__name__}: "
                               f"{exc})") from None

    def starts() -> dict[str, int]:
        out: dict[str, int] = {}
        for key, _ in call(client.run_on_scheduler, _started):
            out[key] = out.get(key, 0) + 1
        return out

    def next_job() -> tuple[dict[str, Any], int, int] | None:
        nonlocal more
        if again:
            return again.popleft()
        cell = next(cells, None) if more else None
        more = cell is not None
        return None if cell is None else (cell, 0, 0)

    def handing_out() -> bool:
        """Nothing is handed out while a worker killed for a timeout is still there
        (a cell given to it would die with it without having run)."""
        if not killing:
            return True
        alive = set(call(client.run_on_scheduler, _worker_addresses))
        now = time.monotonic()
        for addr, t in list(killing.items()):
            if addr not in alive or now - t > wait_s:
                killing.pop(addr)
        return not killing

    try:
        while True:
            if client.status != "running":
                raise ExecutorLost(f"the dask scheduler at {where} went away (the connection "
                                   f"to it was lost)")
            if time.monotonic() - checked > 2.0:  # workers may come and go
                capacity = max(1, sum(call(client.nthreads).values()))
                checked = time.monotonic()
            if len(inflight) < capacity and (again or more) and handing_out():
                while len(inflight) < capacity and (job := next_job()):
                    cell, tries, unstarted = job
                    key = (f"fedmedbench-cell-{cell['cell_id']}-{tries}-{unstarted}-"
                           f"{os.urandom(4).hex()}")
                    fut = call(client.submit, run_task, json.dumps(cell), want, key, pure=False,
                               key=key)
                    inflight[fut.key] = _Job(fut, cell, tries, unstarted)
                    done.add(fut)
            if not inflight and not again and not more:
                return
            batch = done.next_batch(block=False)
            if not batch:
                if timeout is not None:
                    now = time.monotonic()
                    late = [k for k, j in inflight.items() if now - j.handed > timeout]
                    if late:
                        began = starts()
                        for key in late:
                            j = inflight.pop(key)
                            _give_up(client, call, j, key, began.get(key, 0), timeout, killing,
                                     finish)
                time.sleep(_POLL_S)
                continue
            for fut in batch:
                j = inflight.pop(fut.key, None)  # type: ignore[arg-type]
                if j is None:  # a cell given up on (timeout): its outcome is ignored
                    continue
                if fut.status == "finished":
                    finish(json.loads(call(fut.result)))
                    continue
                if fut.status == "cancelled" or client.status != "running":
                    inflight[fut.key] = j  # the scheduler is gone: recorded below
                    raise ExecutorLost(f"the dask scheduler at {where} went away (its tasks "
                                       f"were cancelled)")
                exc = call(fut.exception) if fut.status == "error" else None
                if isinstance(exc, KilledWorker) or exc is None:
                    ran = starts().get(fut.key, 0)
                    tries = j.tries + ran
                    if ran == 0 and j.unstarted < _MAX_UNSTARTED:
                        # its worker died before the cell started: not a try of this cell
                        again.append((j.cell, j.tries, j.unstarted + 1))
                        continue
                    if tries < retries + 1:
                        again.append((j.cell, tries, j.unstarted))
                        continue
                    last = getattr(getattr(exc, "last_worker", None), "address", "?")
                    own = (f"; the scheduler retried it {ran - 1} time(s) itself (its "
                           f"distributed.scheduler.allowed-failures)" if ran > 1 else "")
                    finish(failed_record(
                        j.cell, f"the dask worker process running this cell died on each of "
                                f"{tries} tries (last on {last}: a crash, the out-of-memory "
                                f"killer, or os._exit in the cell){own}; other cells were not "
                                f"affected", "WorkerDied"))
                else:
                    finish(failed_record(j.cell, f"{type(exc).__name__}: {exc}",
                                         type(exc).__name__, tb=_tb(exc)))
    except ExecutorLost as lost:
        for j in inflight.values():
            finish(failed_record(
                j.cell, f"{lost}, while this cell was in flight; its result could not be "
                        f"recovered from the workers: run again to compute it", "SchedulerLost"))
        raise ExecutorLost(f"{lost}; {len(inflight)} cell(s) in flight were recorded failed "
                           f"(SchedulerLost), finished cells are saved: start the scheduler "
                           f"and its workers again and rerun to compute the rest") from None
    except BaseException:  # Ctrl-C or an error: stop what runs, keep what was written
        if inflight and client.status == "running":
            try:
                _bounded(lambda: client.cancel([j.future for j in inflight.values()],
                                               force=True), wait_s, lambda: TimeoutError())
            except Exception as exc:  # the original error is what the user must see
                logging.getLogger("fedmedbench").warning(
                    "could not cancel %d cell(s) still on the Dask cluster (%s: %s); they may "
                    "keep running there", len(inflight), type(exc).__name__, exc)
        raise


def _give_up(client: Any, call: Callable[..., Any], j: _Job, key: str, ran: int,
             timeout: float, killing: dict[str, float],
             finish: Callable[[dict[str, Any]], None]) -> None:
    """Record a cell past ``timeout`` honestly: ``NotStarted`` when no worker
    started it, ``WorkerDied`` when its worker died and none took it again,
    else ``Timeout`` (and the worker running it is killed)."""
    addr = call(client.run_on_scheduler, _processing_on, key)
    if ran == 0:
        n = len(call(client.run_on_scheduler, _worker_addresses))
        _cancel(client, call, j.future)
        finish(failed_record(
            j.cell, f"no dask worker started this cell within --cell-timeout={timeout:g} s "
                    f"({n} worker(s) connected to the scheduler now): it never ran; add workers "
                    f"or raise the timeout, and run again", "NotStarted"))
        return
    if addr is None:
        _cancel(client, call, j.future)
        finish(failed_record(
            j.cell, f"the dask worker running this cell died ({j.tries + ran} tries ran) and no "
                    f"worker took it again within --cell-timeout={timeout:g} s; other cells "
                    f"were not affected", "WorkerDied"))
        return
    try:
        call(client.run, _exit_soon, workers=[addr], on_error="ignore")
    finally:
        _cancel(client, call, j.future)
    killing[addr] = time.monotonic()
    finish(failed_record(
        j.cell, f"the cell ran past --cell-timeout={timeout:g} s (counted from when it was "
                f"handed to dask, worker start-up included) and its worker process was killed; "
                f"raise the timeout or shrink the cell", "Timeout"))


def _cancel(client: Any, call: Callable[..., Any], future: Any) -> None:
    call(client.cancel, [future], force=True)


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
    except (RecursionError, ValueError) as exc:  # nested too deeply; a 5000-digit integer
        raise ConfigError(f"cluster config file {p} is not a usable cluster file "
                          f"({type(exc).__name__}: {str(exc)[:120]})") from None
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
