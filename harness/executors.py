"""Executors map :func:`fedmedbench.engine.run_cell` over cells and write records.

- ``local``: in-process, one cell after another (the default).
- ``process``: a pool of ``workers`` processes. A cell that raises, kills its
  worker or runs past ``cell_timeout`` seconds becomes a ``failed`` record
  with the reason; a dead or timed-out worker is replaced and every other
  cell completes.

Each record is written the moment its cell finishes, so an interrupted run
keeps everything finished before it, and the next run computes only the
missing cells (resume; ``force`` reruns everything).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from fedmedbench.engine import provenance, run_cell
from fedmedbench.registry import get_registry
from fedmedbench.results import clean_json, completed_ids, write_record
from fedmedbench.schema import SCHEMA

EXECUTORS = ("local", "process")


def execute(cells: list[dict[str, Any]], results_dir: Path, *, executor: str = "local",
            workers: int = 1, cell_timeout: float | None = None, force: bool = False,
            progress: bool = True,
            on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the cells not already done in ``results_dir``; return the new records."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    done = set() if force else completed_ids(results_dir)
    todo = [{**c, "artifacts_dir": str(results_dir / "artifacts" / c["cell_id"])}
            for c in cells if c["cell_id"] not in done]
    bar = _bar(len(cells), initial=len(cells) - len(todo), enabled=progress)
    out: list[dict[str, Any]] = []

    def finish(rec: dict[str, Any]) -> None:
        write_record(results_dir, rec)
        out.append(rec)
        if on_record:
            on_record(rec)
        if bar is not None:
            bar.set_postfix_str(f"{rec['status']} {rec['cell_id']}")
            bar.update(1)

    try:
        if executor == "local":
            reg = get_registry()
            for cell in todo:
                rb = _bar(cell["config"]["rounds"], enabled=progress, leave=False,
                          desc=_desc(cell))
                rec = run_cell(cell, registry=reg,
                               progress=(lambda r, rb=rb: rb.update(1)) if rb else None)
                if rb is not None:
                    rb.close()
                finish(rec)
        elif executor == "process":
            _run_pool(todo, workers=max(1, workers), timeout=cell_timeout, finish=finish)
        else:
            from fedmedbench.errors import ConfigError

            raise ConfigError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    finally:
        if bar is not None:
            bar.close()
    return out


def _desc(cell: dict[str, Any]) -> str:
    lab = cell.get("labels", {})
    return f"{lab.get('dataset', '')}/{lab.get('algorithm', '')}/{lab.get('privacy', '')}"


def _bar(total: int, *, initial: int = 0, enabled: bool = True, leave: bool = True,
         desc: str = "cells") -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=leave, file=sys.stderr,
                dynamic_ncols=True, disable=None)


# --------------------------------------------------------------------------
# process pool
# --------------------------------------------------------------------------


_STARTED = "started"


def _worker(conn: Connection) -> None:
    """Worker loop: receive a cell as JSON, send back its record as JSON."""
    import torch

    torch.set_num_threads(1)
    reg = get_registry()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        cell = json.loads(msg)
        conn.send(_STARTED)  # the timeout counts from here, not from process start-up
        rec = run_cell(cell, registry=reg)
        conn.send(json.dumps(clean_json(rec), allow_nan=False))


class _Slot:
    def __init__(self, ctx: Any) -> None:
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.cell: dict[str, Any] | None = None
        self.started = 0.0

    def stop(self) -> None:
        try:
            self.parent.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _failed(cell: dict[str, Any], message: str, kind: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "cell_id": cell["cell_id"], "status": "failed",
        "error": {"type": kind, "message": message, "plugin": None, "hook": None},
        "labels": cell.get("labels", {}), "matrix": cell.get("matrix"), "config": cell["config"], "metrics": {}, "history": [],
        "provenance": provenance(get_registry()),
    }


def _run_pool(cells: list[dict[str, Any]], *, workers: int, timeout: float | None,
              finish: Callable[[dict[str, Any]], None]) -> None:
    ctx = mp.get_context("spawn")
    queue = list(cells)
    slots = [_Slot(ctx) for _ in range(min(workers, len(queue)))]
    try:
        while queue or any(s.cell for s in slots):
            for s in slots:
                if s.cell is None and queue:
                    s.cell = queue.pop(0)
                    s.started = float("inf")  # until the worker says it started
                    s.parent.send(json.dumps(s.cell))
            busy = [s for s in slots if s.cell is not None]
            wait_for = None
            if timeout and any(s.started != float("inf") for s in busy):
                wait_for = max(0.0, min(s.started + timeout for s in busy) - time.monotonic())
            ready = wait([x for s in busy for x in (s.parent, s.proc.sentinel)],
                         timeout=wait_for)
            for i, s in enumerate(slots):
                if s.cell is None:
                    continue
                cell = s.cell
                if s.parent in ready:
                    try:
                        msg = s.parent.recv()
                        if msg == _STARTED:
                            s.started = time.monotonic()
                            continue
                        rec = json.loads(msg)
                    except (EOFError, OSError):
                        rec = None
                    if rec is not None:
                        s.cell = None
                        finish(rec)
                        continue
                if s.proc.sentinel in ready or not s.proc.is_alive():
                    code = s.proc.exitcode
                    finish(_failed(cell, f"the worker process died while running this cell "
                                         f"(exit code {code}); other cells were not affected",
                                   "WorkerDied"))
                    s.proc.join()
                    slots[i] = _Slot(ctx)
                elif timeout and time.monotonic() - s.started > timeout:
                    s.proc.kill()
                    s.proc.join()
                    finish(_failed(cell, f"the cell ran past --cell-timeout={timeout:g} s and "
                                         f"was stopped; raise the timeout or shrink the cell",
                                   "Timeout"))
                    slots[i] = _Slot(ctx)
    finally:
        for s in slots:
            s.stop()


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
