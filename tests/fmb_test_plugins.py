"""Deliberately misbehaving components for the harness's failure tests.

Loaded with ``FEDMEDBENCH_PLUGINS=fmb_test_plugins`` (tests/ is on sys.path).
"""

from __future__ import annotations

import os
import signal
import time

import torch

from fedmedbench import Algorithm, Attack, TransportStage, hookimpl
from fedmedbench.plugins.privacy.dp_fedavg import DPFedAvg
from fedmedbench.plugins.privacy.dp_sgd import DPSGD
from fedmedbench.plugins.privacy.secagg import SecAgg


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




# -- plugins that misbehave in every way a plugin can (issue 13) ----------------


class Exits(Algorithm):
    """Calls sys.exit(0) in client training (it must not end the run with 'ok')."""

    name = "test-exits"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        import sys

        sys.exit(0)


class Interrupts(Algorithm):
    """Raises KeyboardInterrupt itself (not a Ctrl-C)."""

    name = "test-interrupts"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        raise KeyboardInterrupt


class WrongShape(Algorithm):
    """Returns a global model of the wrong size from server_update."""

    name = "test-wrong-shape"

    def __init__(self) -> None:
        pass

    def server_update(self, ctx, global_params, aggregate, updates):
        return global_params[:3]


#: the fault of a "seeded" test-chaos cell, by its seed
CHAOS_BY_SEED = ("raise", "exit", "hang", "alloc", "none", "raise", "exit", "alloc", "none",
                 "raise")


class Chaos(Algorithm):
    """Misbehaves as told: ``fault`` is none, raise, exit, hang or alloc (allocate
    until an address-space limit set for the call, then restore it), or
    "seeded": the fault :data:`CHAOS_BY_SEED` gives the cell's seed."""

    name = "test-chaos"

    def __init__(self, *, fault: str = "none") -> None:
        self.fault = fault

    def client_update(self, ctx, global_params):
        fault = CHAOS_BY_SEED[ctx.cell.seed % 10] if self.fault == "seeded" else self.fault
        if fault == "raise":
            raise RuntimeError("chaos: a bug")
        if fault == "exit":
            import sys

            sys.exit(4)
        if fault == "hang":
            time.sleep(600)
        if fault == "alloc":
            import resource

            old = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (3 << 30, old[1]))
            try:
                hog = []
                while True:
                    hog.append(bytearray(256 << 20))
            finally:
                hog = []
                resource.setrlimit(resource.RLIMIT_AS, old)
        return super().client_update(ctx, global_params)


class ValueAttack(Attack):
    """Returns what it is told: a torch scalar (convertible) or a set (not JSON)."""

    name = "test-value-attack"

    def __init__(self, *, kind: str = "tensor") -> None:
        self.kind = kind

    def evaluate(self, ctx):
        if self.kind == "tensor":
            return {"auc": torch.tensor(0.5), "counts": torch.tensor([1, 2])}
        return {"auc": {0.5, 0.6}}


@hookimpl
def register_attacks(register):
    register(ValueAttack)


@hookimpl
def register_algorithms(register):
    for cls in (Boom, NaNTraining, Crash, Sleepy, Exits, Interrupts, WrongShape, Chaos):
        register(cls)


class WrongAccountantDPSGD(DPSGD):
    """A deliberately broken accountant: trains with the σ that gives ε =
    ``actual`` and records ε = ``claim`` (the audit must flag it)."""

    name = "test-dp-sgd-wrong-accountant"

    def __init__(self, *, claim: float = 1.0, actual: float = 50.0) -> None:
        super().__init__(epsilon=actual)
        self.claim, self.actual = float(claim), float(actual)

    def accounting(self):
        import dataclasses

        acc = super().accounting()
        if acc is None:
            return None
        lie = {k: dataclasses.replace(g, epsilon=self.claim) for k, g in acc.adversaries.items()}
        return dataclasses.replace(acc, epsilon=self.claim, target_epsilon=self.claim,
                                   adversaries=lie)


class WrongAccountantDPFedAvg(DPFedAvg):
    """Client-level twin: distributed noise for ε = ``actual`` recorded as ``claim``."""

    name = "test-dp-fedavg-wrong-accountant"

    def __init__(self, *, claim: float = 1.0, actual: float = 50.0) -> None:
        super().__init__(epsilon=actual)
        self.claim, self.actual = float(claim), float(actual)

    def accounting(self):
        import dataclasses

        acc = super().accounting()
        if acc is None:
            return None
        lie = {k: dataclasses.replace(g, epsilon=self.claim) for k, g in acc.adversaries.items()}
        return dataclasses.replace(acc, epsilon=self.claim, target_epsilon=self.claim,
                                   adversaries=lie)


class NoDropSecAgg(SecAgg):
    """A transport with no dropout path for the network twin (the base
    class's ``drop``): a cell whose network drops clients is skipped."""

    name = "test-secagg-no-drop"
    drop = TransportStage.drop


@hookimpl
def register_privacy(register):
    register(WrongAccountantDPSGD)
    register(WrongAccountantDPFedAvg)
    register(NoDropSecAgg)
