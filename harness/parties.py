"""The parties of a round: the clients and the server.

Each party holds its own objects and nothing of the other's:

- :class:`Clients` — the training parties' side: their data and held-out
  rows (the federation), the training backend, the clients' instances of
  the algorithm, the aggregator (its client-side scores), the adversary,
  the update- and local-stage privacy and the compressor, the clients'
  party state, and each site's personal model where the protocol keeps one.
  It turns a :class:`~fedmedbench.messages.Broadcast` into the round's
  :class:`~fedmedbench.Updates`, and those into what is sent
  (:meth:`Clients.seal`).
- :class:`Server` — the global model and its running statistics, the
  server's instances of the algorithm, the aggregator and the server-stage
  privacy, and the server's state. It sends the :class:`Broadcast`, reads a
  :class:`~fedmedbench.messages.Received` and applies the next model.

A transport mechanism (secure aggregation, HE) simulates its own parties
and is held by the round alone (:mod:`fedmedbench.protocols`); neither
party here holds it. Every value handed to server-side code is built from
what was sent, by copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.backends import ClientData, choose_backend, make_backend
from fedmedbench.components import Message, Updates
from fedmedbench.errors import Diverged, PluginError
from fedmedbench.messages import Broadcast, Received, Sent, seal

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.cell import Cell
    from fedmedbench.meters import Stages

__all__ = ["Clients", "Server"]


class Clients:
    """The clients' side of a cell (module docstring)."""

    def __init__(self, cell: Cell, stages: Stages, *, requested_backend: str,
                 batch_norm: bool = False, device: str = "cpu") -> None:
        self.ctx = cell.clients_ctx
        self.parts = cell.clients
        self.sharing = cell.sharing
        self.stages = stages
        self.malicious = set(cell.federation.malicious)
        self.sent_metric_keys = cell.sent_metric_keys()
        self.sends = tuple(cell.facts.algorithm.sends)
        self.summed = tuple(getattr(cell.clients.algorithm, "summed", ()) or ())
        self.backend_name, self.backend_reason = choose_backend(cell, requested_backend,
                                                                batch_norm=batch_norm)
        self.backend = make_backend(self.backend_name, ClientData(
            ctx=self.ctx, sites=list(cell.federation.clients),
            holdout=dict(cell.federation.holdout), factories=dict(cell.client_factories),
            factory=cell.factory, local=cell.clients.local_stage), device=device)
        #: where the clients train: the vectorized backend's device, else the CPU
        self.device = str(getattr(self.backend, "device", "cpu"))
        if device != "cpu" and self.device == "cpu":
            self.backend_reason += (f"; trains on the CPU (device {device} needs the "
                                    f"vectorized backend)")
        #: each site's own model (isolated and personalized protocols)
        self.models: dict[int, torch.Tensor] = {}
        #: each site's own running statistics (personal normalisation, a pooled party's)
        self.personal_buffers: dict[int, torch.Tensor] = {}
        #: what the round's clients trained, kept until the server has answered
        self.trained: dict[int, torch.Tensor] = {}
        #: (buffered protocol) each client's update, trained and waiting on its side
        #: until it arrives at the server (the virtual clock's arrival)
        self.pending: dict[int, Updates] = {}
        #: an audit's canary clients (ids after the real clients') and their directions
        self.canary_ids = tuple(cell.canary_clients)
        self.canary_directions: dict[int, Any] = {}
        if self.canary_ids:
            import torch

            can = cell.canaries
            rows = np.flatnonzero(np.asarray(can.included, dtype=bool))  # type: ignore[union-attr]
            d = np.asarray(can.directions, dtype=np.float32)  # type: ignore[union-attr]
            self.canary_directions = {c: torch.as_tensor(d[j])
                                      for c, j in zip(self.canary_ids, rows)}

    # -- the round on the clients' side ------------------------------------------------

    def train(self, clients: list[int], start: torch.Tensor | dict[int, torch.Tensor],
              broadcast: Broadcast | None, *, personal: torch.Tensor | None = None) -> Updates:
        """Local training of ``clients`` from ``start`` (the "local" stage),
        with what the server broadcast this round."""
        fields = dict(broadcast.fields) if broadcast is not None else {}
        return self.stages.run("local", self.parts.algorithm, "client_update", self._local,
                               clients, start, personal, fields)

    def protect(self, updates: Updates, start: torch.Tensor) -> Updates:
        """What the clients do to their updates before sending: the
        aggregator's client-side scores, the adversary, the update-stage
        privacy and the compressor."""
        return self.protect_sending(self.protect_trained(updates, start))

    def protect_trained(self, updates: Updates, start: torch.Tensor) -> Updates:
        """The first half of :meth:`protect`, right after training (it needs
        the model the clients started from): the aggregator's client-side
        scores and the adversary."""
        p, stage = self.parts, self.stages.run
        updates = stage("client_metrics", p.aggregator, "client_metrics",
                        self.backend.client_metrics, p.aggregator, updates, start)
        if p.adversary is not None:
            updates = stage("adversary", p.adversary, "corrupt_update", self._corrupt, updates)
        return updates

    def protect_sending(self, updates: Updates) -> Updates:
        """The second half of :meth:`protect`, when the updates leave (under
        the buffered protocol, for the clients of one buffer): the
        update-stage privacy and the compressor."""
        p, stage = self.parts, self.stages.run
        for m in p.update_stage:
            updates = stage("update", m, "process_update", m.process_update, self.ctx, updates)
        if p.compressor is not None:
            updates = stage("compress", p.compressor, "compress", p.compressor.compress,
                            self.ctx, updates)
        return updates

    def deliver(self, broadcast: Broadcast) -> None:
        """Hand each client-side privacy instance what its server half sent."""
        for m in self.parts.update_stage:
            fields = broadcast.privacy.get(m.name)
            if fields:
                self.stages.run("privacy_broadcast", m, "receive_broadcast", m.receive_broadcast,
                                self.ctx, dict(fields))

    def _local(self, clients: list[int], start: Any, personal: Any,
               fields: Mapping[str, Any]) -> Updates:
        canaries = [c for c in clients if c in self.canary_directions]
        if not canaries:
            return self.backend.client_updates(self.parts.algorithm, clients, start,
                                               personal=personal, broadcast=fields)
        real = [c for c in clients if c not in self.canary_directions]
        parts = [self.backend.client_updates(self.parts.algorithm, real, start,
                                             personal=personal, broadcast=fields)] if real else []
        return Updates.concat([*parts, self._canary_updates(canaries, parts)])

    def _canary_updates(self, canaries: list[int], real: list[Updates]) -> Updates:
        """Canary clients' updates: each its direction, scaled to the round's
        largest real update norm (1 when no real client took part)."""
        import torch

        norm = float(real[0].delta.norm(dim=1).max()) if real and len(real[0]) else 1.0
        delta = torch.stack([self.canary_directions[c] for c in canaries]) * norm
        metrics = {k: np.full(len(canaries), np.nan) for k in (real[0].metrics if real else {})}
        return Updates(clients=list(canaries), delta=delta.to(torch.float32),
                       num_examples=[int(self.ctx.num_examples[c]) for c in canaries],
                       metrics=metrics)

    def _corrupt(self, updates: Updates) -> Updates:
        rows = [i for i, u in enumerate(updates.clients) if u in self.malicious]
        if not rows:
            return updates
        adv = self.parts.adversary
        assert adv is not None
        delta = updates.delta.clone()
        for i in rows:  # one call per malicious client, with its own seeded stream
            bad = adv.corrupt_update(self.ctx, updates.rows([i]),
                                     self.ctx.rng("adversary-update", self.ctx.round,
                                                  updates.clients[i]))
            delta[i] = bad.delta.reshape(-1).to(delta.dtype)
        return updates.replace(delta=delta)

    def check(self, updates: Updates, *, numel: int | None) -> None:
        """What the clients computed has the model's size and is finite."""
        import torch

        alg = self.parts.algorithm
        if numel is not None and updates.delta.shape[1] != numel:
            raise PluginError(f"clients sent updates of {updates.delta.shape[1]} values; the "
                              f"model has {numel} parameters", plugin=alg.plugin,
                              component=alg.name, hook="client_update", exc_type="ValueError")
        # a sum is non-finite when any term is (or, never in practice, when it overflows):
        # one reduction, then the exact per-client check only on the way to the error
        if not bool(torch.isfinite(updates.delta.sum())) and not bool(
                torch.isfinite(updates.delta).all()):
            bad = int(torch.nonzero(~torch.isfinite(updates.delta).all(1))[0])
            raise Diverged(f"client {updates.clients[bad]} sent a non-finite update")
        if "loss" in updates.metrics:
            v = np.asarray(updates.metrics["loss"], dtype=float)
            if np.isinf(v).any():
                raise Diverged(f"a client's training loss is {float(v[np.isinf(v)][0])}")

    def metadata(self, updates: Updates) -> Sent:
        """What crosses before a transport encodes: the clients, their example
        counts and the numbers sent in the clear (the server derives the
        aggregation weights from them)."""
        return Sent(round=int(self.ctx.round), clients=tuple(int(c) for c in updates.clients),
                    num_examples=tuple(int(n) for n in updates.num_examples),
                    metrics={k: np.asarray(v, dtype=float).copy()
                             for k, v in updates.metrics.items()
                             if k in self.sent_metric_keys})

    def seal(self, updates: Updates, weights: np.ndarray | None = None,
             encode: Callable[[int, torch.Tensor], Message] | None = None) -> Sent:
        """What the clients send: :func:`fedmedbench.messages.seal`."""
        return seal(updates, round=self.ctx.round, sharing=self.sharing, sends=self.sends,
                    summed=self.summed, metric_keys=self.sent_metric_keys,
                    algorithm=self.parts.algorithm, encode=encode, weights=weights)


class Server:
    """The server's side of a cell (module docstring)."""

    def __init__(self, cell: Cell, stages: Stages, *, transport_bytes_down: Callable[[], int]
                 ) -> None:
        self.ctx = cell.server_ctx
        self.parts = cell.server
        self.sharing = cell.sharing
        self.stages = stages
        self.transport_bytes_down = transport_bytes_down
        self.params: torch.Tensor | None = None
        self.buffers: torch.Tensor | None = None

    def broadcast(self, clients: list[int]) -> Broadcast:
        """The model (its shared part) and the algorithm's broadcast fields,
        for the round's clients; bytes per client from what is sent."""
        alg, sh = self.parts.algorithm, self.sharing
        assert self.params is not None
        fields = self.stages.run("broadcast", alg, "broadcast", alg.broadcast, self.ctx)
        declared = set(getattr(alg, "broadcasts", ()) or ())
        extra = sorted(set(fields) - declared)
        if extra:
            raise PluginError(f"broadcast returned field(s) {extra} that `broadcasts` "
                              f"{tuple(sorted(declared))} does not declare",
                              plugin=alg.plugin, component=alg.name, hook="broadcast",
                              exc_type="ValueError")
        from fedmedbench.messages import _copy, _frozen, _nbytes

        copied = {k: _copy(v) for k, v in fields.items()}
        privacy: dict[str, Any] = {}
        for m in self.parts.server_stage:  # a mechanism's server half to its clients' half
            got = self.stages.run("privacy_broadcast", m, "broadcast", m.broadcast, self.ctx)
            if got:
                privacy[m.name] = _frozen({k: _copy(v) for k, v in dict(got).items()})
        model_bytes = 4 * sh.numel + (4 * sh.buffer_numel if sh.buffers == "sent" else 0)
        per = model_bytes + sum(_nbytes(v) for v in copied.values()) + sum(
            _nbytes(v) for f in privacy.values() for v in f.values()) + \
            int(self.transport_bytes_down())
        return Broadcast(round=int(self.ctx.round), clients=tuple(int(c) for c in clients),
                         params=self.params.detach().clone(), fields=_frozen(copied),
                         per_client_bytes=int(per), privacy=_frozen(privacy))

    def weights(self, received: Received) -> np.ndarray:
        agg = self.parts.aggregator
        return self.stages.run("weights", agg, "weights", agg.weights, received)

    def aggregate(self, received: Received, weights: np.ndarray | None) -> torch.Tensor:
        """The aggregate of plaintext updates: the weighted mean (linear rules)
        or the aggregator's own rule."""
        import torch

        agg = self.parts.aggregator
        if weights is not None:
            return self.stages.run(
                "aggregate", agg, "aggregate",
                lambda: torch.as_tensor(np.asarray(weights),
                                        dtype=received.delta.dtype) @ received.delta)
        return self.stages.run("aggregate", agg, "aggregate", agg.aggregate, received)

    def protect(self, aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        """Server-stage privacy, in stack order."""
        for m in self.parts.server_stage:
            aggregate = self.stages.run("server", m, "process_aggregate", m.process_aggregate,
                                        self.ctx, aggregate, received)
        return aggregate

    def update(self, aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        """The algorithm's server update, from copies of what the server holds."""
        alg = self.parts.algorithm
        assert self.params is not None
        return self.stages.run("server_update", alg, "server_update", alg.server_update,
                               self.ctx, self.params.detach().clone(),
                               aggregate.detach().clone(), received)
