"""Faults for the executor tests, injected through an observer hook so that
they do not depend on any component's interface.

Loaded with ``FEDMEDBENCH_PLUGINS=fmb_executor_plugins`` (tests/ on sys.path).
``FMB_FAULT`` lists ``KIND:SEED`` or ``KIND:SEED:ALGORITHM`` (comma-separated):
when a cell of that seed (and algorithm) starts, the process running it

- ``die``: kills itself with SIGKILL (a segfault, the OOM killer), every try;
- ``die-once``: does so on the first try only (the retry runs normally);
- ``exit``: calls ``sys.exit(3)``;
- ``os-exit``: calls ``os._exit(7)``;
- ``hang``: sleeps for ten minutes.

Every start of a faulty cell appends ``SEED PID`` to ``$FMB_FAULT_DIR/attempts``.
With ``FMB_HANG_AT_IMPORT=1`` importing this module hangs in a worker
process (a multiprocessing child), not in the driver.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from fedmedbench import hookimpl

if os.environ.get("FMB_HANG_AT_IMPORT") == "1" and multiprocessing.parent_process() is not None:
    time.sleep(600)


def _fault(seed: int, algorithm: str) -> str | None:
    for item in os.environ.get("FMB_FAULT", "").split(","):
        kind, _, rest = item.strip().partition(":")
        s, _, alg = rest.partition(":")
        if s and int(s) == seed and alg in ("", algorithm):
            return kind
    return None


@hookimpl
def on_cell_start(cell):
    seed = cell["config"]["seed"]
    kind = _fault(seed, cell["config"]["algorithm"]["name"])
    if kind is None:
        return
    d = Path(os.environ["FMB_FAULT_DIR"])
    with open(d / "attempts", "a") as f:
        f.write(f"{seed} {os.getpid()}\n")
    if kind == "die-once":
        flag = d / f"died-{seed}"
        if flag.exists():
            return
        flag.touch()
        kind = "die"
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        sys.exit(3)
    elif kind == "os-exit":
        os._exit(7)
    elif kind == "hang":
        time.sleep(600)
