"""SCAFFOLD: stochastic controlled averaging. Each client corrects its local
gradients by the difference between the server's control variate ``c`` and its
own ``c_i`` (estimates of the global and the local update direction), which
removes the client drift that non-IID data causes in FedAvg.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning". ICML 2020 (Algorithm 1, control
variates by option II).

One round, for a sampled client ``i`` with ``K`` local steps of size ``lr``::

    y  <- x;  K times: y <- y - lr * (g_i(y) - c_i + c)
    c_i+ = c_i - c + (x - y) / (K * lr)                 # option II
    send dy = y - x  and  dc = c_i+ - c_i
    server: x <- x + server_lr * mean(dy);  c <- c + (1 / N) * sum(dc)

``control = "examples"`` moves ``c`` by the clients' training-set shares
instead, ``c <- c + sum(n_i / n * dc_i)`` (n: all clients' examples), the
weighting of the example-weighted mean of the updates: what FLamby's
Scaffold computes (owkin/FLamby ``flamby/strategies/scaffold.py``, whose
correction is ``(y_i - x_next) / (K lr)`` summed over rounds, with ``x_next``
the example-weighted mean); with every client in every round the two agree
exactly.

Each client's control variate ``c_i`` lives on the clients' side (their
party state, what each hospital keeps between rounds); the server's ``c``
lives on the server's side and is broadcast with the model each round.
Each client uploads ``dc`` beside its update, so SCAFFOLD's traffic is twice
FedAvg's both ways (the cost counts both, from what is sent). The server
needs only the sum of the ``dc`` (declared ``summed``): under secure
aggregation or HE it is protected with the update and the server reads its
sum only. Under ``control = "examples"`` each client scales its ``dc`` by
its public share ``n_i / n`` before sending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from fedmedbench import CellContext, ClientContext, Received, Updates
from fedmedbench.plugins.algorithms.fedavg import FedAvg

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench import CellFacts


class Scaffold(FedAvg):
    """SCAFFOLD with option-II control variates (Karimireddy et al. 2020).

    The local step size is the run setting ``lr``, the server step
    ``server_lr`` (the paper's ``eta_g``, default 1), the number of local
    steps the run's ``local_steps``/``local_epochs``.

    Parameters
    ----------
    control : {"uniform", "examples"}, default "uniform"
        How the server's control variate moves: the paper's ``(1/N) Σ dc_i``,
        or weighted by training-set size (FLamby's Scaffold; module docstring).

    Each client sends ``control_delta`` beside its update (declared in
    ``sends`` and ``summed``: a transport protects it with the update, and
    the server reads only its sum). Client-level DP still refuses it (its
    noise covers the update only). Skipped where option II's arithmetic does
    not hold: an optimizer other than plain SGD (``adam``, momentum). Under
    DP-SGD the correction is added to the privatised gradient
    (post-processing, no ε cost).
    """

    name = "scaffold"
    sends = ("delta", "control_delta")
    summed = ("control_delta",)
    broadcasts = ("c",)

    def __init__(self, *, control: Literal["uniform", "examples"] = "uniform") -> None:
        self.control = control

    def validate(self, facts: CellFacts) -> str | None:
        run = facts.run
        if run.optimizer != "sgd" or float(run.momentum) != 0.0:
            return (f"option-II control variates assume plain SGD local steps; the run uses "
                    f"optimizer={run.optimizer!r}, momentum={run.momentum}")
        return None

    def setup(self, ctx: CellContext) -> None:
        import torch

        if ctx.party == "server":
            ctx.state["scaffold_c"] = torch.zeros(ctx.layout.numel)
        else:  # each client's own c_i, on the clients' side
            ctx.state["scaffold_ci"] = {}

    def broadcast(self, ctx: CellContext) -> dict[str, torch.Tensor]:
        return {"c": ctx.state["scaffold_c"]}

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> Updates:
        import torch

        own = ctx.cell.state["scaffold_ci"]
        c: torch.Tensor = ctx.broadcast["c"]
        zero = torch.zeros_like(c)
        ci = torch.stack([own.get(k, zero) for k in ctx.clients])
        steps = torch.as_tensor(ctx.steps, dtype=torch.float32).unsqueeze(1)
        lr = float(ctx.cell.settings.lr)
        new = ctx.train(global_params, grad_offset=c - ci)
        ci_new = ci - c + (global_params - new) / (steps * lr)
        for j, k in enumerate(ctx.clients):
            own[k] = ci_new[j]
        dc = ci_new - ci
        if self.control == "examples":  # n_i / n: public shares
            total = float(sum(ctx.cell.num_examples))
            share = torch.as_tensor(ctx.num_examples, dtype=dc.dtype) / total
            dc = dc * share.unsqueeze(1)
        return ctx.update(new - global_params, control_delta=dc)

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        if len(received):
            total = received.sum("control_delta")
            if self.control == "uniform":
                total = total / ctx.num_clients
            ctx.state["scaffold_c"] = ctx.state["scaffold_c"] + total
        return global_params + ctx.settings.server_lr * aggregate


COMPONENTS = (Scaffold,)
