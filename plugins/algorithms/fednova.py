"""FedNova: normalized averaging, which removes the objective inconsistency
that unequal numbers of local steps cause in FedAvg.

Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency Problem
in Heterogeneous Federated Optimization". NeurIPS 2020 (plain local SGD,
their ``a_i = [1, ..., 1]``, so ``||a_i||_1 = tau_i``).

One round, for a sampled client ``i`` with ``tau_i`` local steps::

    Delta_i = y_i - x                         # local SGD from x
    send d_i = Delta_i / tau_i                # the normalized update
     and t_i = p_i * tau_i                    # its share of the effective steps
    server: tau_eff = sum_i t_i;   x <- x + server_lr * tau_eff * sum_i p_i d_i

with ``p_i`` the aggregation weights (``n_i / n`` over the round's clients
under example weighting, ``1/k`` under uniform weighting). The server needs
only the sum of the ``t_i`` (declared ``summed``), so FedNova runs under
secure aggregation and HE: each client scales its ``t_i`` by its public
share before sending, and the server reads ``sum_i t_i`` from the secure
sum. With equal ``tau_i`` it is FedAvg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmedbench import CellContext, ClientContext, Received, Updates
from fedmedbench.plugins.algorithms.fedavg import FedAvg

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench import CellFacts


class FedNova(FedAvg):
    """Normalized averaging (Wang et al. 2020) for plain local SGD."""

    name = "fednova"
    sends = ("delta", "tau")
    summed = ("tau",)
    vectorized = True

    def __init__(self) -> None:
        pass

    def validate(self, facts: CellFacts) -> str | None:
        if facts.aggregator.weighting not in ("examples", "uniform"):
            return (f"FedNova's effective step count sum_i p_i tau_i needs weights the clients "
                    f"can compute from public counts; the aggregator is "
                    f"{facts.describe_aggregator()}")
        if facts.run.optimizer != "sgd" or float(facts.run.momentum) != 0.0:
            return (f"the normalisation ||a_i||_1 = tau_i holds for plain local SGD; the run "
                    f"uses optimizer={facts.run.optimizer!r}, momentum={facts.run.momentum}")
        if any(p.aggregate_as_sum for p in facts.privacy):
            return ("an update-stage mechanism weights the updates itself (a fixed "
                    "denominator), so the p_i FedNova scales tau_i by are not the ones applied")
        return None

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> Updates:
        import torch

        new = ctx.train(global_params)
        tau = torch.as_tensor(ctx.steps, dtype=torch.float32)
        cell = ctx.cell
        if cell.facts.aggregator.weighting == "examples":
            counts = [cell.num_examples[c] for c in cell.participants]
            share = torch.as_tensor(ctx.num_examples, dtype=torch.float32) / float(sum(counts))
        else:
            share = torch.full_like(tau, 1.0 / max(1, len(cell.participants)))
        return ctx.update((new - global_params) / tau.unsqueeze(1), tau=share * tau)

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        if not len(received):
            return global_params
        tau_eff = float(received.sum("tau"))
        return global_params + ctx.settings.server_lr * tau_eff * aggregate


COMPONENTS = (FedNova,)
