"""Executors map :func:`fedmedbench.engine.run_cell` over cells and write records.

- ``local``: in-process, one cell after another (the default). With a
  ``cell_timeout`` each cell runs in one child process instead, so that a
  cell past its time can be stopped.
- ``process``: a pool of ``workers`` processes on this machine.
- ``dask``: dask.distributed (:mod:`fedmedbench.executors_dask`): a
  ``LocalCluster`` of worker processes, an existing scheduler, or a
  SLURM/PBS cluster through dask-jobqueue.

Whatever the executor, the driver alone writes records, one per cell, the
moment its cell finishes, so an interrupted run keeps everything finished
before it, and the next run computes only the missing cells (resume;
``force`` reruns everything). Outside the in-process executor a cell that
kills its worker (a crash, the OOM killer, a plugin's ``os._exit``) is
retried ``retries`` times on a fresh worker and then recorded ``failed``
with the reason, and a cell past ``cell_timeout`` seconds, counted from when
it was handed to a worker (the worker's start-up and plugin imports
included), is recorded ``failed`` and its process killed. Every other cell
completes. Pool workers exit when their driver dies.
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from fedmedbench import results as _results
from fedmedbench.engine import run_cell
from fedmedbench.errors import ConfigError
from fedmedbench.registry import get_registry
from fedmedbench.results import RecordNotReadable, clean_json, completed_ids, write_record

EXECUTORS = ("local", "process", "dask")
#: keys of a matrix file's ``[executor]`` table
EXECUTOR_KEYS = ("name", "workers", "scheduler", "cluster", "retries", "cell_timeout")
DEFAULT_RETRIES = 1
#: the longest single wait of the pool's driver loop (bounds huge timeouts)
_MAX_WAIT_S = 3600.0


@dataclass
class Execution:
    """What :func:`execute` did: the records it wrote, and the ids of every
    cell it was given (done before or computed now)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    cell_ids: set[str] = field(default_factory=set)


def execute(cells: Iterable[dict[str, Any]], results_dir: Path, *, executor: str = "local",
            workers: int | None = None, cell_timeout: float | None = None,
            retries: int = DEFAULT_RETRIES, scheduler: str | None = None,
            cluster: str | Path | None = None, force: bool = False, progress: bool = True,
            total: int | None = None,
            on_record: Callable[[dict[str, Any]], None] | None = None) -> Execution:
    """Run the cells not already done in ``results_dir`` and write their records.

    Parameters
    ----------
    cells
        Cells (an iterator is consumed lazily, one cell at a time).
    results_dir
        Where records go, one ``<cell_id>.json`` per cell.
    executor
        ``local``, ``process`` or ``dask``.
    workers
        Worker processes for ``process`` and a dask ``LocalCluster``
        (default: :func:`default_workers`).
    cell_timeout
        Seconds a cell may take from being handed to a worker, or ``None``.
    retries
        How often a cell whose worker died is tried again before it is
        recorded ``failed`` (not used in-process).
    scheduler, cluster
        ``dask`` only: a scheduler address, or a dask-jobqueue config file.
    force
        Rerun cells that already have an ``ok`` record.
    progress
        Progress bars on stderr.
    total
        The number of cells to run (those not done yet), for the progress
        bar, when ``cells`` is an iterator.
    on_record
        Called with each record after it is written.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    cell_timeout = check_timeout(cell_timeout, "--cell-timeout")
    workers = default_workers() if workers is None else workers
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    from fedmedbench.fileio import refuse_symlink

    refuse_symlink(results_dir / "artifacts")  # cells write their files there: never a link
    done = set() if force else completed_ids(results_dir)
    if total is None and isinstance(cells, (list, tuple)):
        total = sum(c["cell_id"] not in done for c in cells)
    bar = Progress(total, enabled=progress)
    result = Execution()

    def todo() -> Iterator[dict[str, Any]]:
        for c in cells:
            result.cell_ids.add(c["cell_id"])
            if c["cell_id"] in done:
                continue
            yield {**c, "artifacts_dir": str(results_dir / "artifacts" / c["cell_id"])}

    def finish(rec: dict[str, Any]) -> None:
        rec = explain(rec)
        try:
            write_record(results_dir, rec)
        except (TypeError, ValueError) as exc:  # a value that is not JSON: name it, go on
            rec = failed_record(rec, f"the cell's record cannot be written as JSON "
                                     f"({type(exc).__name__}: {exc})", "RecordNotJSON")
            write_record(results_dir, rec)
        except RecordNotReadable as exc:  # what `run` and `report` could not read back
            rec = unreadable_record(rec, exc)
            write_record(results_dir, rec)
        result.records.append(rec)
        if on_record:
            on_record(rec)
        bar.finished(rec)

    try:
        if executor == "local" and cell_timeout is None:
            _run_local(todo(), finish=finish, progress=progress)
        elif executor in ("local", "process"):
            # a timed cell runs in a child process, so that it can be stopped
            _run_pool(todo(), workers=1 if executor == "local" else max(1, workers),
                      timeout=cell_timeout, retries=retries, finish=finish)
        else:
            from fedmedbench.executors_dask import run_dask

            run_dask(todo(), workers=max(1, workers), scheduler=scheduler, cluster=cluster,
                     timeout=cell_timeout, retries=retries, finish=finish)
    finally:
        bar.close()
    return result


def default_workers() -> int:
    """The default worker count of the process executor and of a local dask
    cluster: one per CPU core, less one core for the driver, at least one.
    Measured on a 2-core machine (docs/cli.md): the quickstart
    took 41-42 s with one worker and 50-63 s with two, which compete with the
    driver and each other for the two cores (in-process: 35-37 s)."""
    return max(1, (os.cpu_count() or 1) - 1)


# --------------------------------------------------------------------------
# settings: the command line, a matrix file's [executor] table
# --------------------------------------------------------------------------


def check_timeout(value: Any, where: str) -> float | None:
    """``None`` or a positive, finite number of seconds; else :class:`ConfigError`."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{where} = {value!r}: a cell timeout is a positive, finite number "
                          f"of seconds (e.g. 600); leave it out for no timeout")
    return float(value)


def _check_int(value: Any, where: str, *, least: int, most: int = 100_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ConfigError(f"{where} = {shown}: expected an integer from {least} to {most:,}")
    return value


def _check_scheduler(value: Any, where: str) -> str:
    """A usable dask scheduler address (``tcp://HOST:PORT``), checked before
    anything connects (:func:`fedmedbench.executors_dask.check_address`)."""
    from fedmedbench.executors_dask import check_address

    return check_address(value, where)


def executor_table(raw: Any, *, where: str, base: Path | None = None) -> dict[str, Any]:
    """Check a matrix file's ``[executor]`` table and return its settings.

    Keys: ``name`` (``local``, ``process``, ``dask``), ``workers``,
    ``scheduler`` (a dask address), ``cluster`` (a dask-jobqueue config file,
    relative to the matrix file), ``retries``, ``cell_timeout``. The command
    line overrides each. None of them changes a cell or its id.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    bad = sorted(set(raw) - set(EXECUTOR_KEYS))
    if bad:
        import difflib

        hints = [f"{b!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(
            b, EXECUTOR_KEYS, n=1)) else repr(b) for b in bad]
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: "
                          f"{', '.join(EXECUTOR_KEYS)}")
    out: dict[str, Any] = {}
    if "name" in raw:
        if raw["name"] not in EXECUTORS:
            raise ConfigError(f"{where}: name = {raw['name']!r}; choose one of "
                              f"{', '.join(EXECUTORS)}")
        out["name"] = raw["name"]
    if "workers" in raw:
        out["workers"] = _check_int(raw["workers"], f"{where}: workers", least=1)
    if "retries" in raw:
        out["retries"] = _check_int(raw["retries"], f"{where}: retries", least=0)
    if "cell_timeout" in raw:
        out["cell_timeout"] = check_timeout(raw["cell_timeout"], f"{where}: cell_timeout")
    if "scheduler" in raw:
        out["scheduler"] = _check_scheduler(raw["scheduler"], f"{where}: scheduler")
    if "cluster" in raw:
        if not isinstance(raw["cluster"], str):
            raise ConfigError(f"{where}: cluster = {raw['cluster']!r}: expected the path of "
                              f"a dask-jobqueue config file")
        p = Path(raw["cluster"]).expanduser()
        out["cluster"] = str(p if p.is_absolute() or base is None else base / p)
    return out


def resolve_settings(table: dict[str, Any], *, executor: str | None = None,
                     workers: int | None = None, scheduler: str | None = None,
                     cluster: str | None = None, retries: int | None = None,
                     cell_timeout: float | None = None) -> dict[str, Any]:
    """The executor settings of a run: the command line's (non-``None``)
    values over the matrix's ``[executor]`` table over the defaults; the
    keyword arguments of :func:`execute`."""
    cli = {"name": executor, "workers": workers, "scheduler": scheduler, "cluster": cluster,
           "retries": retries, "cell_timeout": cell_timeout}
    s = {**table, **{k: v for k, v in cli.items() if v is not None}}
    if scheduler is not None or cluster is not None:  # an address given here replaces the file's
        s["scheduler"], s["cluster"] = scheduler, cluster
    if scheduler is not None:
        _check_scheduler(scheduler, "--scheduler")
    if workers is not None:
        _check_int(workers, "--workers", least=1)
    if retries is not None:
        _check_int(retries, "--retries", least=0)
    check_timeout(cell_timeout, "--cell-timeout")
    name = s.get("name") or ("dask" if s.get("scheduler") or s.get("cluster") else "local")
    if s.get("scheduler") and s.get("cluster"):
        raise ConfigError("give a dask scheduler address or a cluster config file, not both "
                          f"(scheduler {s['scheduler']!r}, cluster {s['cluster']!r})")
    if name != "dask" and (s.get("scheduler") or s.get("cluster")):
        what = "--scheduler" if s.get("scheduler") else "--cluster"
        raise ConfigError(f"{what} needs --executor dask (the executor is {name!r})")
    if s.get("cluster") and not Path(s["cluster"]).is_file():
        raise ConfigError(f"cluster config file {s['cluster']} does not exist")
    return {"executor": name, "workers": s.get("workers"), "scheduler": s.get("scheduler"),
            "cluster": s.get("cluster"), "retries": s.get("retries", DEFAULT_RETRIES),
            "cell_timeout": s.get("cell_timeout")}


# --------------------------------------------------------------------------
# records the executor makes itself
# --------------------------------------------------------------------------


def failed_record(cell: dict[str, Any], message: str, kind: str, *,
                  tb: str | None = None) -> dict[str, Any]:
    """A ``failed`` record for a cell (or a record) that the executor had to
    stop or could not get a record for; ``kind`` is the error type
    (:func:`fedmedbench.results.failed_record`)."""
    return _results.failed_record(cell, message, kind, tb=tb)


def unreadable_record(rec: dict[str, Any], exc: RecordNotReadable) -> dict[str, Any]:
    """The ``failed`` record that replaces a record ``run`` could not read back
    (too large, or a value a reader refuses): it names the field and the
    plugin that reported it."""
    return _results.failed_record(
        rec, f"the cell ended {rec.get('status')!r}, but its record cannot be kept: {exc}",
        "RecordTooLarge" if exc.too_large else "RecordNotReadable", plugin=exc.plugin,
        component=exc.component)


def explain(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` with a cause a reader can act on where the bare error has none:
    a ``MemoryError`` names the cell's dataset and its parameters."""
    err = rec.get("error")
    if not (rec.get("status") == "failed" and isinstance(err, dict)
            and err.get("type") == "MemoryError"):
        return rec
    ds = (rec.get("config") or {}).get("dataset") or {}
    params = ", ".join(f"{k}={v}" for k, v in sorted(ds.items()) if k != "name")
    what = f"{ds.get('name')}({params})" if params else str(ds.get("name"))
    msg = str(err.get("message") or "").strip() or "MemoryError"
    rec = {**rec, "error": {**err, "message": (
        f"the cell ran out of memory ({msg}); its dataset {what} may need more memory than "
        f"this machine has: make the dataset smaller in the matrix, or run the cell on a "
        f"larger machine")}}
    return rec


def run_one(cell: dict[str, Any], reg: Any,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """:func:`run_cell`, with a ``sys.exit()`` from plugin code made the
    cell's ``failed`` record instead of the end of the run (or the worker)."""
    try:
        return run_cell(cell, registry=reg, progress=progress)
    except SystemExit as exc:
        return failed_record(cell, f"code run by this cell called sys.exit({exc.code!r}); the "
                                   f"cell was stopped and the other cells went on",
                             "SystemExit", tb=_tb(exc))


def record_json(rec: dict[str, Any], cell: dict[str, Any]) -> str:
    """A record as JSON for the trip from a worker to the driver; a record
    that is not JSON becomes a ``failed`` record that says why."""
    try:
        _results.encode_record(rec)  # what the driver could not write, it never receives
        return json.dumps(clean_json(rec), allow_nan=False)
    except (TypeError, ValueError) as exc:
        return json.dumps(clean_json(failed_record(
            cell, f"the cell's record cannot be written as JSON ({type(exc).__name__}: {exc})",
            "RecordNotJSON")), allow_nan=False)
    except RecordNotReadable as exc:
        return json.dumps(clean_json(unreadable_record(explain(rec), exc)), allow_nan=False)


def death_reason(exitcode: int | None) -> str:
    """How a worker process ended, from its exit code (read after ``join()``)."""
    if exitcode is None:
        return "stopped for an unknown reason"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"was killed by {name} (likely out of memory, or killed by hand)"
        return f"was killed by {name}"
    return (f"exited with code {exitcode} (code in the cell called os._exit() or the "
            f"interpreter aborted)")


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)[-8:])[-4000:]


def _desc(cell: dict[str, Any]) -> str:
    """A cell's progress-bar label, from its short labels."""
    from fedmedbench.errors import printable
    from fedmedbench.matrix import short_label

    lab = cell.get("labels", {})
    return printable("/".join(short_label(str(lab.get(a, "")))
                              for a in ("dataset", "algorithm", "privacy")), keep_newlines=False)


def _bar(total: int | None, *, initial: int = 0, enabled: bool = True, leave: bool = True,
         desc: str = "cells", bar_format: str | None = None) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=leave, file=sys.stderr,
                dynamic_ncols=True, disable=None, bar_format=bar_format)


def estimate_remaining(started: float, finished: list[float], remaining: int) -> float | None:
    """Seconds until ``remaining`` more cells finish, from the times
    (``time.monotonic()``) the cells of this run finished so far.

    The time to the first finish carries the run's start-up (imports, the
    first data load, worker start), so once two cells have finished the rate
    is the mean gap between finishes after the first; with one finish it is
    that cell's time. Cells already done before the run are not counted, so
    a resumed run does not look faster than it is. ``None`` before any cell
    has finished."""
    if not finished:
        return None
    if len(finished) == 1:
        per = finished[0] - started
    else:
        per = (finished[-1] - finished[0]) / (len(finished) - 1)
    return max(0.0, per) * max(0, remaining)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """The cells bar of a run: it counts the cells to run (not those done
    before) and shows the ETA of :func:`estimate_remaining`; disabled, it
    does nothing."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, total: int | None, *, enabled: bool = True) -> None:
        self.total = total
        self.started = time.monotonic()
        self.finished_at: list[float] = []
        self.bar = _bar(total, enabled=enabled, bar_format=self.FORMAT if total else None)

    def eta(self) -> float | None:
        """Seconds left, or ``None`` (nothing finished yet, or no total)."""
        if self.total is None:
            return None
        return estimate_remaining(self.started, self.finished_at,
                                  self.total - len(self.finished_at))

    def finished(self, rec: dict[str, Any]) -> None:
        self.finished_at.append(time.monotonic())
        if self.bar is None:
            return
        eta = f"eta {_clock(self.eta())}, " if self.total else ""
        self.bar.set_postfix_str(f"{eta}last {rec['status']}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------
# in-process
# --------------------------------------------------------------------------


def _run_local(cells: Iterator[dict[str, Any]], *, finish: Callable[[dict[str, Any]], None],
               progress: bool) -> None:
    reg = get_registry()
    for cell in cells:
        cell = copy.deepcopy(cell)  # cells of one point share sub-dicts; a plugin may mutate
        rb = _bar(cell["config"]["rounds"], enabled=progress, leave=False, desc=_desc(cell))
        tick: Callable[[int], Any] | None = (lambda r, rb=rb: rb.update(1)) if rb else None
        rec = run_one(cell, reg, progress=tick)
        if rb is not None:
            rb.close()
        finish(rec)


# --------------------------------------------------------------------------
# process pool
# --------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (its driver) dies: the kernel's
    parent-death signal on Linux, and a thread watching ``os.getppid()``
    everywhere (it also ends a process whose main thread hangs)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the driver died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="fedmedbench-parent-watch", daemon=True).start()


def _worker(conn: Connection, parent_pid: int) -> None:
    """Worker loop: receive a cell as JSON, send back its record as JSON."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    import torch

    torch.set_num_threads(1)
    try:
        reg, startup = get_registry(), None
    except Exception as exc:  # plugins that fail to import here: every cell says so
        reg, startup = None, exc
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        cell = json.loads(msg)
        if startup is not None:
            rec = failed_record_bare(cell, f"the worker could not load the plugins: "
                                           f"{type(startup).__name__}: {startup}",
                                     "WorkerStartup", tb=_tb(startup))
            out = json.dumps(rec)
        else:
            out = record_json(run_one(cell, reg), cell)
        try:
            conn.send(out)
        except OSError:  # the driver is gone
            os._exit(0)


def failed_record_bare(cell: dict[str, Any], message: str, kind: str, *,
                       tb: str | None = None) -> dict[str, Any]:
    """:func:`failed_record` without the plugins in the provenance (for a
    worker whose plugins did not load)."""
    return _results.failed_record(cell, message, kind, tb=tb, registry=False)


class _Slot:
    """One worker process and the cell it holds (with its try number and
    the time it was handed out)."""

    def __init__(self, ctx: Any) -> None:
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, os.getpid()), daemon=True)
        self.proc.start()
        child.close()
        self.cell: dict[str, Any] | None = None
        self.tries = 0
        self.handed = 0.0

    def give(self, cell: dict[str, Any], tries: int) -> None:
        self.cell, self.tries, self.handed = cell, tries, time.monotonic()
        self.parent.send(json.dumps(cell))

    def kill(self) -> int | None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.parent.close()
        return self.proc.exitcode

    def stop(self) -> None:
        try:
            self.parent.send(None)
        except OSError:
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _run_pool(cells: Iterator[dict[str, Any]], *, workers: int, timeout: float | None,
              retries: int, finish: Callable[[dict[str, Any]], None]) -> None:
    ctx = mp.get_context("spawn")
    again: deque[tuple[dict[str, Any], int]] = deque()  # cells to try again, with their tries
    slots: list[_Slot] = []

    def next_job() -> tuple[dict[str, Any], int] | None:
        if again:
            return again.popleft()
        cell = next(cells, None)
        return None if cell is None else (cell, 0)

    try:
        while True:
            for s in slots:  # hand out work; the timeout counts from here
                if s.cell is None and (job := next_job()):
                    s.give(*job)
            while len(slots) < workers and (job := next_job()):
                slots.append(_Slot(ctx))
                slots[-1].give(*job)
            busy = [s for s in slots if s.cell is not None]
            if not busy:
                break
            wait_for = _MAX_WAIT_S
            if timeout is not None:
                wait_for = max(0.0, min(min(s.handed + timeout for s in busy) - time.monotonic(),
                                        _MAX_WAIT_S))
            ready = set(wait([x for s in busy for x in (s.parent, s.proc.sentinel)],
                             timeout=wait_for))
            for s in busy:
                cell = s.cell
                assert cell is not None
                rec = None
                if s.parent in ready:
                    try:
                        rec = json.loads(s.parent.recv())
                    except (EOFError, OSError):
                        rec = None
                if rec is not None:
                    s.cell = None
                    finish(rec)
                elif s.proc.sentinel in ready or not s.proc.is_alive():
                    reason = death_reason(s.kill())
                    slots.remove(s)
                    if s.tries < retries:
                        again.append((cell, s.tries + 1))
                    else:
                        tries = f" on each of {s.tries + 1} tries" if s.tries else ""
                        finish(failed_record(
                            cell, f"the worker process {reason} while running this cell"
                                  f"{tries}; other cells were not affected", "WorkerDied"))
                elif timeout is not None and time.monotonic() - s.handed > timeout:
                    s.kill()
                    slots.remove(s)
                    finish(failed_record(
                        cell, f"the cell ran past --cell-timeout={timeout:g} s (counted from "
                              f"when it was handed to a worker, start-up included) and its "
                              f"process was killed; raise the timeout or shrink the cell",
                        "Timeout"))
    finally:
        for s in slots:
            s.stop()
