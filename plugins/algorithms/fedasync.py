"""FedAsync: asynchronous federated optimization with staleness-weighted mixing.

Xie, Koyejo, Gupta. "Asynchronous Federated Optimization". OPT workshop
(NeurIPS) 2020, arXiv:1903.03934 (2019).

Clients train from the model current when they were sent; the server
applies each update the moment it arrives, mixing the client's model into
the global one: ``x_t = (1 − α_t) x_{t−1} + α_t x_new`` with ``x_new =
x_τ + Δ`` (the model the client started from, version τ, plus its update)
and ``α_t = α · s(t − τ)``, the paper's polynomial staleness function
``s(τ) = (1 + τ)^(−a)``. In delta form, what the server applies is
``x_{t−1} + α_t (x_τ − x_{t−1} + Δ)``: the server keeps the versions it
sent (its own state) to know ``x_τ``.

It runs on the ``buffered`` protocol with a buffer of one
(:mod:`fedmedbench.protocols`): each arrival is one server update.
Privacy: a secure sum over one client is that client's update, so no
transport (secure aggregation, HE) can hide it; the cell is skipped with
that reason. Client-level DP (dp-fedavg) noises each update: one release
per arrival.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fedmedbench import Algorithm, CellContext, Range, Received

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench import CellFacts


class FedAsync(Algorithm):
    """Staleness-weighted asynchronous mixing (Xie et al. 2019).

    Parameters
    ----------
    alpha : float, default 0.6
        α, the mixing weight of a fresh update.
    a : float, default 0.5
        The exponent of the staleness function ``(1 + τ)^(−a)``.
    concurrency : int, default 0
        Clients training at once; 0 means the cell's clients per round.
    max_staleness : int, default 0
        Updates staler than this are discarded on arrival; 0 means
        ``4 · concurrency`` (the server keeps the models it sent that long).
    """

    name = "fedasync"
    protocol = "buffered"
    vectorized = True

    def __init__(self, *, alpha: Annotated[float, Range(gt=0, le=1)] = 0.6,
                 a: Annotated[float, Range(ge=0)] = 0.5,
                 concurrency: Annotated[int, Range(ge=0)] = 0,
                 max_staleness: Annotated[int, Range(ge=0)] = 0) -> None:
        self.alpha = alpha
        self.a = a
        self.concurrency = concurrency
        self.max_staleness = max_staleness

    def validate(self, facts: CellFacts) -> str | None:
        t = facts.transport
        if t is not None:
            return (f"fedasync applies each update alone (a buffer of one): {t.name}'s sum "
                    f"over one client is that client's update, so it hides nothing; use "
                    f"fedbuff (secure aggregation over a buffer)")
        return None

    def plan(self, num_clients: int, per_round: int) -> tuple[int, int, int]:
        """(1, concurrency, maximum staleness): the server keeps the models it
        sent for that many updates."""
        M = min(num_clients, self.concurrency or per_round)
        self._kept = self.max_staleness or 4 * M
        return 1, M, self._kept

    def staleness_weight(self, staleness: int) -> float:
        """``s(τ) = (1 + τ)^(−a)``."""
        return float((1.0 + staleness) ** -self.a) if staleness else 1.0

    def setup(self, ctx: CellContext) -> None:
        if ctx.party == "server":
            ctx.state["versions"] = {}

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        """``x_{t−1} + α (s(τ) Δ + s(τ) (x_τ − x_{t−1}))``: the aggregate is
        ``s(τ) Δ`` (the engine scaled the one update by its staleness weight)."""
        versions: dict[int, Any] = ctx.state["versions"]
        t = int(ctx.round)
        versions.setdefault(t - 1, global_params.clone())  # the model sent since the last update
        tau = int(received.staleness[0]) if received.staleness else 0
        s = self.staleness_weight(tau)
        drift = 0.0
        if tau:
            start = versions.get(t - 1 - tau)
            if start is None:
                raise ValueError(f"the model of version {t - 1 - tau} is no longer kept "
                                 f"(staleness {tau}); raise max_staleness")
            drift = start - global_params
        new = global_params + self.alpha * (aggregate + s * drift)
        keep = int(getattr(self, "_kept", 0) or self.max_staleness) + 1
        versions[t] = new.clone()
        for v in [v for v in versions if v < t - keep]:
            del versions[v]
        return new


COMPONENTS = (FedAsync,)
