"""FedAvgM: FedAvg with server momentum, as a third-party fedmedbench plugin.

Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification". arXiv:1909.06335, 2019.

The server keeps a momentum buffer ``v <- beta * v + aggregate`` and moves the
global model by ``server_lr * v``. Clients run plain local SGD (the default
``Algorithm.client_update``), so the algorithm declares ``vectorized = True``:
on fedmedbench's vectorized backend all sampled clients train at once.
"""

from __future__ import annotations

from typing import Annotated

from fedmedbench import Algorithm, Range, hookimpl


class FedAvgM(Algorithm):
    """FedAvg with server momentum (Hsu et al. 2019).

    Parameters
    ----------
    beta : float, default 0.9
        Server momentum in [0, 1); 0 is plain FedAvg.
    """

    name = "fedavgm"
    vectorized = True

    def __init__(self, *, beta: Annotated[float, Range(ge=0, lt=1)] = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta = {beta!r}: the momentum must be in [0, 1)")
        self.beta = beta

    def setup(self, ctx):
        ctx.state["momentum"] = None  # on the server's side: the server's own state

    def server_update(self, ctx, global_params, aggregate, received):
        v = ctx.state["momentum"]
        v = aggregate.clone() if v is None else self.beta * v + aggregate
        ctx.state["momentum"] = v
        return global_params + ctx.settings.server_lr * v


@hookimpl
def register_algorithms(register):
    register(FedAvgM)
