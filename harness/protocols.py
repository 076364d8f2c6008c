"""Round protocols: who trains what, how a round runs, how a cell is scored.

An algorithm declares its protocol (:attr:`fedmedbench.Algorithm.protocol`):

- :class:`Federated` — sampled clients train from the global model; their
  updates pass the update-stage privacy, the compressor, the transport and
  the aggregator; the server applies the aggregate. The round is one linear
  function of stages, :meth:`Federated.round`, in the order of DESIGN's
  "One round".
- :class:`Pooled` — one party trains on every site's pooled training rows
  (the ``centralized`` upper baseline), with the work of a federated round.
- :class:`Isolated` — each site trains alone and is scored with its own
  model (the ``local`` lower baseline).
- :class:`Personalized` — each client keeps a model of its own, scored on its
  own test split; the server combines what the clients send and hands each
  client its next model (FedMD).

A protocol owns the models and the evaluation; the stages it runs go through
:class:`~fedmedbench.meters.Stages`, whose observers meter time and bytes and
record the server's view.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedmedbench.components import Message, Updates
from fedmedbench.errors import Diverged, PluginError
from fedmedbench.metrics import score

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.engine import CellRun

__all__ = ["RoundProtocol", "Federated", "Pooled", "Isolated", "Personalized", "PROTOCOLS",
           "protocol_for"]


class RoundProtocol:
    """Base: the cell's models, one round, evaluation.

    ``run`` is the :class:`~fedmedbench.engine.CellRun` holding the built
    components, the federation, the backend and the meters.
    """

    name: ClassVar[str] = ""
    #: clients train from the global model, and the server aggregates
    aggregates: ClassVar[bool] = False

    def __init__(self, run: CellRun) -> None:
        self.run = run
        self.ctx = run.ctx
        self.params: dict[int, torch.Tensor] = {}

    # -- models ---------------------------------------------------------------

    def init_models(self, w0: torch.Tensor) -> None:
        self.params = {0: w0.clone()}

    def global_params(self) -> torch.Tensor:
        return self.params[0]

    def final_models(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(the model an outside party attacks, each site's own final model)."""
        return self.params[0], {}

    # -- the round ------------------------------------------------------------

    def round(self, t: int) -> dict[str, Any]:
        raise NotImplementedError

    def check_finite(self, t: int) -> None:
        import torch

        for i, p in self.params.items():
            if not torch.isfinite(p).all():
                raise Diverged(f"round {t}: model {i} has non-finite parameters")

    # -- evaluation -----------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Utility of the global model: every site's test split and the pooled test set."""
        data, metric = self.ctx.data, self.ctx.data.task.metric
        model = self.run.eval_model
        from fedmedbench.models import set_flat_params
        from fedmedbench.training import predict_proba

        set_flat_params(model, self.global_params())
        per_site, pooled = _score_sites(metric, data, predict_proba(model, _pooled_X(data)))
        return _utility(metric, per_site, pooled)


class Federated(RoundProtocol):
    """Sampled clients train from the global model; the server aggregates."""

    name = "federated"
    aggregates = True

    def round(self, t: int) -> dict[str, Any]:
        run, ctx, c = self.run, self.ctx, self.run.components
        stage = run.stages.run
        clients = run.federation.sample(t, run.per_round)
        run.begin_round(t, clients)
        w = self.params[0]
        if not clients:  # an empty Poisson sample: central noise still runs (skipping it
            return self.empty_round(w)  # would reveal that nobody took part)
        stage("broadcast", c.algorithm, "bytes_down", self.broadcast, clients)
        updates = stage("local", c.algorithm, "client_update", run.backend.client_updates,
                        c.algorithm, clients, w)
        updates = stage("client_metrics", c.aggregator, "client_metrics",
                        run.backend.client_metrics, c.aggregator, updates, w)
        if c.adversary is not None:
            updates = stage("adversary", c.adversary, "corrupt_update", self.corrupt, updates)
        for m in c.update_stage:
            updates = stage("update", m, "process_update", m.process_update, ctx, updates)
        if c.compressor is not None:
            updates = stage("compress", c.compressor, "compress", c.compressor.compress, ctx,
                            updates)
        run.check_updates(updates)
        if run.sum_contributions:  # the update stage weighted each row: the server sums
            weights = np.ones(len(updates))
        elif c.aggregator.linear:
            weights = stage("weights", c.aggregator, "weights", c.aggregator.weights, updates)
        else:
            weights = None
        if c.transport is not None:
            sent = stage("metadata", None, "", _metadata, updates)
            messages = stage("encode", c.transport, "encode", self.encode, updates, weights)
            aggregate = stage("secure_aggregate", c.transport, "aggregate",
                              c.transport.aggregate, ctx, messages)
        else:
            sent = stage("send", None, "", _identity, updates)
            aggregate = (stage("aggregate", c.aggregator, "aggregate", _weighted, weights,
                               updates) if weights is not None else
                         stage("aggregate", c.aggregator, "aggregate", c.aggregator.aggregate,
                               updates))
        for m in c.server_stage:
            aggregate = stage("server", m, "process_aggregate", m.process_aggregate, ctx,
                              aggregate, sent)
        import torch

        run.check_vector(aggregate, c.aggregator if c.transport is None else c.transport,
                         "aggregate")
        if not torch.isfinite(aggregate).all():
            raise Diverged(f"round {t}: the aggregated update is not finite")
        self.params[0] = stage("server_update", c.algorithm, "server_update",
                               c.algorithm.server_update, ctx, w, aggregate, sent)
        run.check_vector(self.params[0], c.algorithm, "server_update")
        out: dict[str, Any] = {"clients": len(clients), "loss": run.reported_loss(updates)}
        shown = updates.metrics.get("contribution_weight") if run.sum_contributions else weights
        if shown is not None:
            out["weights"] = {ctx.clients[u].name: round(float(x), 6)
                              for u, x in zip(updates.clients, shown)}
        return out

    def empty_round(self, w: torch.Tensor) -> dict[str, Any]:
        import torch

        run, ctx, c = self.run, self.ctx, self.run.components
        if c.server_stage:
            none = Updates(clients=[], delta=torch.zeros((0, w.numel())), num_examples=[])
            aggregate = torch.zeros_like(w)
            for m in c.server_stage:
                aggregate = run.stages.run("server", m, "process_aggregate", m.process_aggregate,
                                           ctx, aggregate, none)
            self.params[0] = run.stages.run("server_update", c.algorithm, "server_update",
                                            c.algorithm.server_update, ctx, w, aggregate, none)
        return {"loss": None, "clients": 0}

    # -- stage bodies (no metering here: the observers do it) -------------------

    def broadcast(self, clients: list[int]) -> list[int]:
        """Bytes each participating client receives this round."""
        c = self.run.components
        model_bytes = self.ctx.layout.numel * 4
        per = int(c.algorithm.bytes_down(self.ctx, model_bytes))
        if c.transport is not None:
            per += int(c.transport.bytes_down(self.ctx))
        return [per] * len(clients)

    def corrupt(self, updates: Updates) -> Updates:
        run = self.run
        rows = [i for i, u in enumerate(updates.clients) if u in run.federation.malicious]
        if not rows:
            return updates
        adv = run.components.adversary
        assert adv is not None
        delta = updates.delta.clone()
        for i in rows:  # one call per malicious client, with its own seeded stream
            bad = adv.corrupt_update(self.ctx, updates.rows([i]),
                                     self.ctx.rng("adversary-update", self.ctx.round,
                                                  updates.clients[i]))
            delta[i] = bad.delta.reshape(-1).to(delta.dtype)
        return updates.replace(delta=delta)

    def encode(self, updates: Updates, weights: np.ndarray | None) -> list[Message]:
        t = self.run.components.transport
        assert t is not None and weights is not None
        return [t.encode(self.ctx, u, updates.delta[i] * float(weights[i]))
                for i, u in enumerate(updates.clients)]


def _delta(updates: Updates, i: int) -> torch.Tensor:
    """Row ``i``'s delta (clients of different architectures keep theirs apart)."""
    if updates.per_client is not None:
        return updates.per_client[updates.clients[i]]
    return updates.delta[i]


def _identity(updates: Updates) -> Updates:
    return updates


def _metadata(updates: Updates) -> Updates:
    """What reaches the server beside a transport-encoded update: everything
    but the deltas (zero rows of the same shape)."""
    import torch

    return updates.replace(delta=torch.zeros_like(updates.delta))


def _weighted(weights: np.ndarray, updates: Updates) -> torch.Tensor:
    import torch

    return torch.as_tensor(np.asarray(weights), dtype=updates.delta.dtype) @ updates.delta


class Pooled(RoundProtocol):
    """One party trains on the pooled training rows of every site.

    A round takes as many optimizer steps as a federated round's clients
    take together in expectation: ``q · Σ_i steps_i`` with ``q`` the
    client sampling rate of the cell's run settings (so with every client
    taking part, the steps of all sites; the budget is recorded).
    """

    name = "pooled"

    def __init__(self, run: CellRun) -> None:
        super().__init__(run)
        self.steps = pooled_steps(run)
        self.ctx._steps = lambda client: self.steps

    def round(self, t: int) -> dict[str, Any]:
        run, c = self.run, self.run.components
        run.begin_round(t, [0])
        w = self.params[0]
        updates = run.stages.run("local", c.algorithm, "client_update",
                                 run.backend.client_updates, c.algorithm, [0], w)
        run.check_updates(updates)
        self.params[0] = run.stages.run("server_update", c.algorithm, "server_update",
                                        c.algorithm.server_update, self.ctx, w,
                                        updates.delta[0], updates)
        return {"clients": 1, "loss": run.reported_loss(updates), "steps": self.steps}


def pooled_steps(run: CellRun) -> int:
    """Steps per pooled round: a federated round's expected work (module doc)."""
    sites = run.ctx.data.sites
    s = run.ctx.settings
    q = run.federation_sites_rate
    return max(1, int(round(q * sum(s.steps_for(len(site.train)) for site in sites))))


class Isolated(RoundProtocol):
    """Each site trains alone; each is scored with its own model.

    ``global`` utility is the mean over sites of each site's model on the
    pooled test set (how well one hospital's model serves everyone);
    ``per_site`` scores each site's model on its own test split;
    ``cross_site`` gives, per site, its model's unweighted mean over every
    site's test split (FLamby's "Local i" number) and ``cross_site_matrix``
    each of those scores (model's site → test site → score).
    """

    name = "isolated"

    def init_models(self, w0: torch.Tensor) -> None:
        self.params = {i: w0.clone() for i in range(self.ctx.num_clients)}
        for i, f in self.run.client_factories.items():  # clients with their own architecture
            from fedmedbench.models import get_flat_params

            self.params[i] = self.run.maybe_pretrain(f, get_flat_params(f()))

    def final_models(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return self.params[0], dict(self.params)

    def round(self, t: int) -> dict[str, Any]:
        run, c = self.run, self.run.components
        clients = list(range(self.ctx.num_clients))
        run.begin_round(t, clients)
        updates = run.stages.run("local", c.algorithm, "client_update",
                                 run.backend.client_updates, c.algorithm, clients, self.params)
        run.check_updates(updates)
        for i, u in enumerate(updates.clients):
            self.params[u] = run.stages.run(
                "server_update", c.algorithm, "server_update", c.algorithm.server_update,
                self.ctx, self.params[u], _delta(updates, i), updates.rows([i]))
        return {"clients": len(clients), "loss": run.reported_loss(updates)}

    def evaluate(self) -> dict[str, Any]:
        from fedmedbench.models import set_flat_params
        from fedmedbench.training import predict_proba

        data, metric = self.ctx.data, self.ctx.data.task.metric
        per_site: dict[str, float] = {}
        on_pooled = []
        matrix: dict[str, dict[str, float]] = {}
        X = _pooled_X(data)
        for i, site in enumerate(data.sites):
            model = self.run.model_for(i)
            set_flat_params(model, self.params[i])
            site_scores, pooled = _score_sites(metric, data, predict_proba(model, X))
            per_site[site.name] = site_scores[site.name]
            on_pooled.append(pooled)
            matrix[site.name] = site_scores
        cross = {name: float(np.nanmean(list(row.values()))) for name, row in matrix.items()}
        return _utility(metric, per_site, float(np.nanmean(on_pooled)), cross_site=cross,
                        cross_site_matrix=matrix)


class Personalized(Isolated):
    """Each client keeps its own model; the server combines what they send.

    Every client trains from its own model (``client_update`` receives it);
    the server sees only the fields the algorithm ``sends`` (FedMD: soft
    labels on public rows) and ``server_update`` is called once per client
    with that client's parameters, its delta and *every* client's update,
    returning that client's next model.
    """

    name = "personalized"
    aggregates = True

    def round(self, t: int) -> dict[str, Any]:
        run, c = self.run, self.run.components
        stage = run.stages.run
        clients = list(range(self.ctx.num_clients))
        run.begin_round(t, clients)
        stage("broadcast", c.algorithm, "bytes_down", self.broadcast, clients)
        updates = stage("local", c.algorithm, "client_update", run.backend.client_updates,
                        c.algorithm, clients, self.params)
        for m in c.update_stage:
            updates = stage("update", m, "process_update", m.process_update, self.ctx, updates)
        run.check_updates(updates)
        sent = stage("send", None, "", _identity, updates)
        for i, u in enumerate(updates.clients):
            self.params[u] = stage("server_update", c.algorithm, "server_update",
                                   c.algorithm.server_update, self.ctx, self.params[u],
                                   _delta(updates, i), sent)
        return {"clients": len(clients), "loss": run.reported_loss(updates)}

    def broadcast(self, clients: list[int]) -> list[int]:
        return [int(self.run.components.algorithm.bytes_down(self.ctx, 0)) for _ in clients]


PROTOCOLS: dict[str, type[RoundProtocol]] = {
    p.name: p for p in (Federated, Pooled, Isolated, Personalized)}


def protocol_for(name: str, *, algorithm: str, plugin: str) -> type[RoundProtocol]:
    if name not in PROTOCOLS:
        raise PluginError(f"algorithm {algorithm} declares protocol {name!r}; protocols are "
                          f"{', '.join(PROTOCOLS)}", plugin=plugin, component=algorithm,
                          hook="protocol", exc_type="ValueError")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------


def _pooled_X(data: Any) -> np.ndarray:
    return np.concatenate([s.test.X for s in data.sites if len(s.test)]) if any(
        len(s.test) for s in data.sites) else np.zeros((0, *data.task.input_shape), np.float32)


def _score_sites(metric: str, data: Any, proba: np.ndarray) -> tuple[dict[str, float], float]:
    """Per-site and pooled scores of predictions ``proba`` on the concatenated
    test splits (one forward pass serves every site)."""
    per_site, off, ys = {}, 0, []
    for s in data.sites:
        n = len(s.test)
        per_site[s.name] = float("nan") if n == 0 else score(metric, s.test.y, proba[off:off + n])
        ys.append(s.test.y)
        off += n
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    pooled = score(metric, y, proba) if len(y) else float("nan")
    return per_site, pooled


def _utility(metric: str, per_site: dict[str, float], pooled: float, **extra: Any
             ) -> dict[str, Any]:
    finite = [v for v in per_site.values() if not math.isnan(v)]
    return {"metric": metric, "global": pooled, "per_site": per_site,
            "per_site_mean": float(np.mean(finite)) if finite else float("nan"),
            "worst_site": min(finite) if finite else float("nan"), **extra}
