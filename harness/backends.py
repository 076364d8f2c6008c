"""Backends run clients' local training: ``loop`` (one client after another,
the reference) and ``vectorized`` (all sampled clients of a round in one
torch.func computation, :mod:`fedmedbench.vectorized`).

A backend is the training service behind
:class:`~fedmedbench.context.ClientContext`: the protocol asks it for the
round's :class:`~fedmedbench.Updates` (:meth:`LoopBackend.client_updates`),
which calls the algorithm's ``client_update`` — once per client on the loop
backend, once for all clients on the vectorized one — and ``ctx.train``
comes back here.

:func:`choose_backend` picks ``vectorized`` under ``auto`` when every
component of the cell says it can run there, and names the component that
made it fall back otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.components import LocalStage, Split, Updates
from fedmedbench.context import CellContext, ClientContext
from fedmedbench.meters import calling
from fedmedbench.training import SGDTrainer

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.engine import CellRun
    from fedmedbench.training import ExtraLoss, LocalTrainer

__all__ = ["BACKENDS", "LoopBackend", "choose_backend"]

BACKENDS = ("auto", "loop", "vectorized")


class LoopBackend:
    """One client after another: a persistent trainer per client (the
    harness's :class:`~fedmedbench.training.SGDTrainer`, or the local-stage
    mechanism's), created on the client's first round."""

    name = "loop"

    def __init__(self, run: CellRun) -> None:
        self.run = run
        self.ctx: CellContext = run.ctx
        self.local: LocalStage | None = run.components.local_stage
        self.trainers: dict[int, LocalTrainer] = {}
        #: one model and optimizer per architecture, shared by the clients' SGD trainers
        self._shared: dict[Any, tuple[Any, Any]] = {}

    # -- the protocol's entry points ------------------------------------------

    def client_updates(self, algorithm: Any, clients: list[int],
                       params: torch.Tensor | dict[int, torch.Tensor]) -> Updates:
        parts = []
        for c in clients:
            ctx = ClientContext(self.ctx, [c], self)
            # per-client models (isolated, personalized): always (k, D) rows
            p = params[c].unsqueeze(0) if isinstance(params, dict) else params
            parts.append(_checked(algorithm.client_update(ctx, p), algorithm, [c]))
        if len({int(u.delta.shape[1]) for u in parts}) > 1:
            # clients of different architectures: one batch of what they send, without
            # the deltas (their own models stay per client: ``per_client``)
            import torch

            merged = Updates.concat([u.replace(delta=torch.zeros((1, 0))) for u in parts])
            return merged.replace(per_client={u.clients[0]: u.delta[0] for u in parts})
        return Updates.concat(parts)

    def client_metrics(self, aggregator: Any, updates: Updates, w: torch.Tensor) -> Updates:
        """The aggregator's client-side numbers, computed by each client."""
        if not aggregator.client_metric_keys:  # it declares it reads none
            return updates
        extra: dict[str, list[float]] = {}
        for i, c in enumerate(updates.clients):
            got = aggregator.client_metrics(ClientContext(self.ctx, [c], self), w,
                                            updates.rows([i]))
            for k, v in (got or {}).items():
                extra.setdefault(k, []).append(float(np.asarray(v).reshape(-1)[0]))
        return updates.replace(metrics={**updates.metrics,
                                        **{k: np.asarray(v) for k, v in extra.items()}})

    # -- the ClientContext service --------------------------------------------

    def train(self, clients: list[int], params: torch.Tensor, steps: list[int], *,
              extra_loss: ExtraLoss | None, grad_offset: torch.Tensor | None
              ) -> tuple[torch.Tensor, np.ndarray]:
        import torch

        rows, losses = [], []
        for j, c in enumerate(clients):
            tr = self.trainer(c)
            with calling(self.local if self.local is not None else None, "train"):
                new, loss = tr.train(params[j], int(steps[j]), extra_loss=extra_loss,
                                     grad_offset=None if grad_offset is None else grad_offset[j])
            rows.append(new)
            losses.append(loss)
        return torch.stack(rows), np.asarray(losses, dtype=float)

    def trainer(self, client: int) -> LocalTrainer:
        """``client``'s trainer: the local-stage mechanism's (one model per
        client, made private once per cell), or an SGD trainer on the model and
        optimizer its architecture shares with the other clients."""
        if client not in self.trainers:
            data = self.ctx.clients[client].train
            factory = self.factory_for(client)
            if self.local is not None:
                with calling(self.local, "local_trainer"):  # type: ignore[arg-type]
                    self.trainers[client] = self.local.local_trainer(self.ctx, client,
                                                                     factory(), data)
            else:
                if factory not in self._shared:
                    model = factory()
                    self._shared[factory] = (model, self.ctx.settings.make_optimizer(
                        model.parameters()))
                model, opt = self._shared[factory]
                self.trainers[client] = SGDTrainer(model, data, self.ctx.settings,
                                                   seed=self.ctx.batch_seed(client),
                                                   optimizer=opt)
        return self.trainers[client]

    def holdout(self, client: int) -> Split | None:
        return self.run.federation.holdout.get(client)

    def factory_for(self, client: int) -> Callable[[], torch.nn.Module]:
        return self.run.factory_for(client)


def _checked(out: Any, algorithm: Any, clients: list[int]) -> Updates:
    from fedmedbench.errors import PluginError

    if not isinstance(out, Updates):
        raise PluginError(f"client_update returned {type(out).__name__}, not fedmedbench.Updates "
                          f"(return ctx.update(delta))", plugin=algorithm.plugin,
                          component=algorithm.name, hook="client_update", exc_type="TypeError")
    if list(out.clients) != list(clients):
        raise PluginError(f"client_update for clients {clients} returned updates of "
                          f"{list(out.clients)}", plugin=algorithm.plugin,
                          component=algorithm.name, hook="client_update", exc_type="ValueError")
    return out


def choose_backend(run: CellRun, requested: str) -> tuple[str, str]:
    """(backend, reason) for the cell: ``requested`` is ``auto``, ``loop`` or
    ``vectorized``; a component that cannot run vectorized forces ``loop``
    (named in the reason; an explicit ``vectorized`` then falls back too)."""
    if requested == "loop":
        return "loop", "requested"
    c = run.components
    blockers = []
    if not c.algorithm.vectorized:
        blockers.append(f"algorithm {c.algorithm.name} (vectorized = False)")
    if run.model_component is not None and not run.model_component.vectorized:
        blockers.append(f"model {run.model_component.name} (vectorized = False)")
    if run.client_factories:
        blockers.append(f"algorithm {c.algorithm.name} gives clients their own architectures")
    if c.local_stage is not None and c.local_stage.vector_steps(run.ctx) is None:
        blockers.append(f"privacy {c.local_stage.name} has no vectorized form")  # type: ignore[attr-defined]
    if blockers:
        return "loop", "fell back to loop: " + "; ".join(blockers)
    if requested == "auto" and run.max_clients_per_call < 2:
        return "loop", "one client per round: nothing to vectorize"
    return "vectorized", "requested" if requested == "vectorized" else (
        "every component of the cell runs vectorized")
