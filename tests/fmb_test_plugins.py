"""Deliberately misbehaving components for the harness's failure tests.

Loaded with ``FEDMEDBENCH_PLUGINS=fmb_test_plugins`` (tests/ is on sys.path).
"""

from __future__ import annotations

import os
import signal
import time

import torch

from fedmedbench import Algorithm, hookimpl


class Boom(Algorithm):
    """Raises inside client training in round 2."""

    name = "test-boom"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        if ctx.round == 2:
            raise RuntimeError("simulated bug in client training")
        return super().client_update(ctx, global_params)


class NaNTraining(Algorithm):
    """Sends a NaN update in round 2 (training that diverged)."""

    name = "test-nan"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        upd = super().client_update(ctx, global_params)
        if ctx.round == 2:
            upd.delta = torch.full_like(upd.delta, float("nan"))
        return upd


class Crash(Algorithm):
    """Kills its own process in round 1 (a segfault, an OOM kill)."""

    name = "test-crash"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        os.kill(os.getpid(), signal.SIGKILL)


class Sleepy(Algorithm):
    """Hangs in client training."""

    name = "test-sleepy"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        time.sleep(120)


#: what the observer hooks below saw, in order (a tracker would log these)
OBSERVED: list[tuple] = []


@hookimpl
def on_cell_start(cell):
    OBSERVED.append(("start", cell["cell_id"]))


@hookimpl
def on_round_end(cell, round, metrics):
    OBSERVED.append(("round", cell["cell_id"], round, metrics["loss"]))


@hookimpl
def on_cell_end(cell, record):
    OBSERVED.append(("end", cell["cell_id"], record["status"]))


@hookimpl
def register_algorithms(register):
    for cls in (Boom, NaNTraining, Crash, Sleepy):
        register(cls)
