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
- :class:`Personalized` — each client keeps personal state (a model of its
  own, scored on its own test split) and sends the server only what the
  algorithm declares (:class:`~fedmedbench.components.Sharing`): the same
  round as :class:`Federated` over the shared part of the model (FedBN,
  FedRep, FedPer, Ditto, fine-tuning), or soft labels without any model
  update (FedMD).

A protocol owns the models and the evaluation; the stages it runs go through
:class:`~fedmedbench.meters.Stages`, whose observers meter time and bytes and
record the server's view.

Models with running statistics (BatchNorm buffers) run on the loop backend
(their :class:`~fedmedbench.Model` declares ``vectorized = False``). The
statistics live in each client's trainer module; a protocol decides whose
statistics a model is scored with. Under an algorithm that sends the whole
model, clients send them with the update and the server averages them (the
global model needs them; the record counts their bytes, the server's view
holds them, and rules refuse them beside protected updates); under an
algorithm with personal parameters, they stay on the clients (FedBN).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedmedbench.components import Algorithm, Message, Sharing, Updates
from fedmedbench.errors import Diverged, PluginError, Skip
from fedmedbench.metrics import score

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.engine import CellRun

__all__ = ["RoundProtocol", "Federated", "Pooled", "Isolated", "Personalized", "PROTOCOLS",
           "protocol_for", "sharing_of"]


class RoundProtocol:
    """Base: the cell's models, one round, evaluation.

    ``run`` is the :class:`~fedmedbench.engine.CellRun` holding the built
    components, the federation, the backend and the meters.
    """

    name: ClassVar[str] = ""
    #: clients train from the global model, and the server aggregates
    aggregates: ClassVar[bool] = False
    #: the clients of a round are sampled (run settings ``clients_per_round``,
    #: ``client_sampling``); otherwise every client takes part in every round
    samples_clients: ClassVar[bool] = False

    def __init__(self, run: CellRun) -> None:
        from fedmedbench.backends import flat_buffers
        from fedmedbench.facts import ModelFacts, model_problem

        self.run = run
        self.ctx = run.ctx
        self.params: dict[int, torch.Tensor] = {}
        self.sharing = sharing_of(run)
        probe = run.model_factory()
        name = run.model_component.name if run.model_component is not None else "model"
        self.model_facts = ModelFacts.of(name, probe)
        reason = model_problem(run.facts, self.model_facts,
                               sends_buffers=self.sharing.buffers == "sent")
        if reason:
            raise Skip(reason)
        #: the running statistics of a freshly built model (no training yet)
        self.buffers0 = flat_buffers(probe)
        #: the server's running statistics, averaged from what clients send
        self.global_buffers = self.buffers0.clone()

    # -- models ---------------------------------------------------------------

    def init_models(self, w0: torch.Tensor) -> None:
        self.params = {0: w0.clone()}
        self.run.bytes.describe(self.sharing)
        self.run.view_recorder.describe(self.sharing)

    def global_params(self) -> torch.Tensor:
        return self.params[0]

    def set_global(self, w: torch.Tensor) -> None:
        self.params[0] = w

    def final_models(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(the model an outside party attacks, each site's own final model)."""
        return self.params[0], {}

    def final_buffers(self) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The running statistics (BatchNorm buffers) of :meth:`final_models`'
        models: what they are scored with, so what an attack must load."""
        final, per_site = self.final_models()
        site = getattr(self, "site_buffers", None)
        bufs = {i: b for i in per_site if site is not None and (b := site(i)) is not None}
        return (bufs.get(0) if per_site else self.global_model_buffers()), bufs

    def record_metrics(self) -> dict[str, Any]:
        """Fields the protocol adds to the record's ``metrics`` beside ``utility``."""
        return {}

    # -- the round ------------------------------------------------------------

    def round(self, t: int) -> dict[str, Any]:
        raise NotImplementedError

    def check_finite(self, t: int) -> None:
        import torch

        for i, p in self.params.items():
            if not torch.isfinite(p).all():
                raise Diverged(f"round {t}: model {i} has non-finite parameters")

    # -- evaluation -----------------------------------------------------------

    def global_model_buffers(self) -> torch.Tensor:
        """The running statistics the global model is scored with."""
        return self.global_buffers

    def evaluate(self) -> dict[str, Any]:
        """Utility of the global model: every site's test split and the pooled test set."""
        data, metric = self.ctx.data, self.ctx.data.task.metric
        model = self.run.eval_model
        _load(model, self.global_params(), self.global_model_buffers())
        from fedmedbench.training import predict_proba

        per_site, pooled = _score_sites(metric, data, predict_proba(model, _pooled_X(data)))
        return _utility(metric, per_site, pooled)


def sharing_of(run: CellRun) -> Sharing:
    """The typed description of what each client sends
    (:class:`~fedmedbench.components.Sharing`), from the algorithm's declared
    ``sends``, ``shares`` and :meth:`~fedmedbench.Algorithm.shared_mask`."""
    from fedmedbench.backends import flat_buffers
    from fedmedbench.meters import calling

    alg, ctx, facts = run.components.algorithm, run.ctx, run.facts.algorithm
    layout = ctx.layout
    full = np.ones(layout.numel, dtype=bool)
    if facts.shares == "none":
        return Sharing(layout, np.zeros(layout.numel, dtype=bool), delta=False,
                       fields=tuple(alg.sends))
    mask = full
    if facts.shares == "part":
        with calling(alg, "shared_mask"):
            got = alg.shared_mask(ctx)
        if got is not None:
            mask = _checked_mask(got, layout, alg)
    bufs = int(flat_buffers(run.model_factory()).numel())
    mode = "none" if bufs == 0 else ("local" if facts.shares == "part" else "sent")
    fields = tuple(alg.sends) + (("buffers",) if mode == "sent" else ())
    return Sharing(layout, mask, delta=True, buffers=mode, buffer_numel=bufs, fields=fields)


def _checked_mask(got: Any, layout: Any, alg: Algorithm) -> np.ndarray:
    mask = np.asarray(got)
    problem = None
    if mask.dtype != bool or mask.shape != (layout.numel,):
        problem = (f"shared_mask returned an array of dtype {mask.dtype} and shape "
                   f"{mask.shape}; return a boolean mask of shape ({layout.numel},)")
    else:
        for n, sl in layout.slices().items():
            if mask[sl].any() and not mask[sl].all():
                problem = (f"shared_mask splits parameter tensor {n}: share or keep whole "
                           f"tensors")
                break
    if problem:
        raise PluginError(problem, plugin=alg.plugin, component=alg.name, hook="shared_mask",
                          exc_type="ValueError")
    return mask.copy()


def _load(model: Any, params: torch.Tensor, buffers: torch.Tensor | None) -> None:
    from fedmedbench.backends import load_flat_buffers
    from fedmedbench.models import set_flat_params

    set_flat_params(model, params)
    if buffers is not None and buffers.numel():
        load_flat_buffers(model, buffers)


class Federated(RoundProtocol):
    """Sampled clients train from the global model; the server aggregates.

    :class:`Personalized` runs this same round with its own starting models,
    personal state and sent part (the seams :meth:`start`, :meth:`local`,
    :meth:`send` and :meth:`after_server`); here they are the identity, so
    an algorithm that sends its whole model runs the same arithmetic under
    both protocols.
    """

    name = "federated"
    aggregates = True
    samples_clients = True

    def round(self, t: int) -> dict[str, Any]:
        run, ctx, c = self.run, self.ctx, self.run.components
        stage = run.stages.run
        clients = run.federation.sample(t, run.per_round)
        run.begin_round(t, clients)
        w = self.global_params()
        if not clients:  # an empty Poisson sample: central noise still runs (skipping it
            return self.empty_round(w)  # would reveal that nobody took part)
        stage("broadcast", c.algorithm, "bytes_down", self.broadcast, clients)
        start = self.start(clients, w)
        updates = stage("local", c.algorithm, "client_update", self.local, clients, start)
        updates = stage("client_metrics", c.aggregator, "client_metrics",
                        run.backend.client_metrics, c.aggregator, updates, start)
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
                              self.secure_aggregate, messages)
        else:
            sent = stage("send", None, "", self.send, updates)
            aggregate = (stage("aggregate", c.aggregator, "aggregate", _weighted, weights,
                               sent) if weights is not None else
                         stage("aggregate", c.aggregator, "aggregate", c.aggregator.aggregate,
                               sent))
        for m in c.server_stage:
            aggregate = stage("server", m, "process_aggregate", m.process_aggregate, ctx,
                              aggregate, sent)
        import torch

        run.check_vector(aggregate, c.aggregator if c.transport is None else c.transport,
                         "aggregate")
        if not torch.isfinite(aggregate).all():
            raise Diverged(f"round {t}: the aggregated update is not finite")
        if self.sharing.partial:  # only the shared parameters are averaged; noise a server
            aggregate = torch.where(torch.as_tensor(self.sharing.mask), aggregate,  # stage
                                    torch.zeros_like(aggregate))  # put elsewhere is discarded
        new = stage("server_update", c.algorithm, "server_update",
                    c.algorithm.server_update, ctx, w, aggregate, sent)
        run.check_vector(new, c.algorithm, "server_update")
        self.set_global(new)
        self.after_server(updates, weights)
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
            if self.sharing.partial:
                aggregate = torch.where(torch.as_tensor(self.sharing.mask), aggregate,
                                        torch.zeros_like(aggregate))
            self.set_global(run.stages.run("server_update", c.algorithm, "server_update",
                                           c.algorithm.server_update, ctx, w, aggregate, none))
        return {"loss": None, "clients": 0}

    # -- seams (the identity here; Personalized overrides them) -----------------

    def start(self, clients: list[int], w: torch.Tensor) -> torch.Tensor:
        """What the round's clients train from: the global model (D,)."""
        return w

    def local(self, clients: list[int], start: torch.Tensor) -> Updates:
        """Local training of ``clients`` from ``start`` (the "local" stage);
        with running statistics sent, each client starts from the server's
        and sends its own back (``extra["buffers"]``)."""
        b, alg = self.run.backend, self.run.components.algorithm
        if self.sharing.buffers != "sent":
            return b.client_updates(alg, clients, start)
        for cl in clients:
            b.load_buffers(cl, self.global_buffers)
        updates = b.client_updates(alg, clients, start)
        return _with_buffers(updates, b)

    def send(self, updates: Updates) -> Updates:
        """What reaches the server in plaintext: the delta's shared part only
        (zero elsewhere; its bytes are those of the sent coordinates)."""
        sh = self.sharing
        if not sh.partial:
            return updates
        import torch

        keep = torch.as_tensor(sh.mask)
        delta = torch.where(keep, updates.delta, torch.zeros_like(updates.delta))
        nbytes = updates.delta_bytes or [4 * sh.numel] * len(updates)
        return updates.replace(delta=delta, delta_bytes=list(nbytes))

    def after_server(self, updates: Updates, weights: np.ndarray | None) -> None:
        """After the server update: average the running statistics sent."""
        if self.sharing.buffers != "sent" or "buffers" not in updates.extra:
            return
        import torch

        if weights is None or self.run.sum_contributions:
            n = np.asarray(updates.num_examples, dtype=float)
            weights = n / n.sum()
        om = torch.as_tensor(np.asarray(weights, dtype=float), dtype=torch.float32)
        self.global_buffers = om @ updates.extra["buffers"].to(torch.float32)

    # -- stage bodies (no metering here: the observers do it) -------------------

    def broadcast(self, clients: list[int]) -> list[int]:
        """Bytes each participating client receives this round: the shared
        part of the global model (and its running statistics when they are
        averaged)."""
        c, sh = self.run.components, self.sharing
        model_bytes = 4 * sh.numel + (4 * sh.buffer_numel if sh.buffers == "sent" else 0)
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
        """Each client's weight-scaled vector, encoded: of a partial delta,
        only the shared coordinates (the transport sees exactly what is sent)."""
        t = self.run.components.transport
        assert t is not None and weights is not None
        idx = self.sharing.index if self.sharing.partial else None
        out = []
        for i, u in enumerate(updates.clients):
            v = updates.delta[i] * float(weights[i])
            out.append(t.encode(self.ctx, u, v if idx is None else v[idx]))
        return out

    def secure_aggregate(self, messages: list[Message]) -> torch.Tensor:
        """The transport's sum, back on the full parameter vector."""
        import torch

        t = self.run.components.transport
        assert t is not None
        total = t.aggregate(self.ctx, messages)
        if not self.sharing.partial:
            return total
        full = torch.zeros(self.ctx.layout.numel, dtype=total.dtype)
        full[self.sharing.index] = total.reshape(-1)
        return full


def _with_buffers(updates: Updates, backend: Any) -> Updates:
    """``updates`` with each client's running statistics after training."""
    import torch

    rows = [backend.buffers(cl) for cl in updates.clients]
    if any(r is None for r in rows):
        return updates
    return updates.replace(extra={**updates.extra, "buffers": torch.stack(rows)})


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

    def global_model_buffers(self) -> torch.Tensor:
        own = self.run.backend.buffers(0)  # the one party's own running statistics
        return self.buffers0 if own is None else own


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
        self.run.bytes.describe(self.sharing)
        self.run.view_recorder.describe(self.sharing)

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

    def site_buffers(self, i: int) -> torch.Tensor | None:
        """The running statistics site ``i``'s own model is scored with."""
        own = self.run.backend.buffers(i)
        return self.buffers0 if own is None else own

    def evaluate(self) -> dict[str, Any]:
        from fedmedbench.training import predict_proba

        data, metric = self.ctx.data, self.ctx.data.task.metric
        per_site: dict[str, float] = {}
        on_pooled = []
        matrix: dict[str, dict[str, float]] = {}
        X = _pooled_X(data)
        for i, site in enumerate(data.sites):
            model = self.run.model_for(i)
            _load(model, self.params[i],
                  None if i in self.run.client_factories else self.site_buffers(i))
            site_scores, pooled = _score_sites(metric, data, predict_proba(model, X))
            per_site[site.name] = site_scores[site.name]
            on_pooled.append(pooled)
            matrix[site.name] = site_scores
        cross = {name: float(np.nanmean(list(row.values()))) for name, row in matrix.items()}
        return _utility(metric, per_site, float(np.nanmean(on_pooled)), cross_site=cross,
                        cross_site_matrix=matrix)


class Personalized(Federated):
    """Each client keeps personal state; the server combines what they send.

    The server's view, bytes and every privacy stage apply to the part of
    the model the algorithm declares it shares (:attr:`sharing`, a
    :class:`~fedmedbench.components.Sharing`):

    - **model-sharing** algorithms (``"delta"`` in ``sends``) run the
      :class:`Federated` round on the shared parameters. Each sampled client
      starts from the global model on the shared parameters and its own
      personal values on the rest (:meth:`start`; ``ctx.personal`` holds its
      personal models), sends the shared part of its delta (:meth:`send`),
      and keeps the rest. With ``personal_model = "merged"`` a client's model
      is the global model on the shared parameters and its own on the rest
      (FedBN, FedRep, FedPer, fine-tuning); with ``"separate"`` it is a whole
      model of its own, returned in the update's ``personal`` field, which is
      never sent (Ditto). After the last round :meth:`Algorithm.finalize`
      runs on every site (fine-tuning);
    - **prediction-sharing** algorithms (no ``"delta"``: FedMD) send only
      their extra fields, and ``server_update`` is called once per client
      with that client's own parameters, its delta and *every* client's
      update, returning that client's next model.

    Evaluation: ``utility`` scores each site's test split with that site's
    own model (``per_site``, their mean, the worst site; ``global`` is the
    mean over sites of each site's model on the pooled test set, as for
    ``local``). Where the method has a global model (it shares the whole
    model: Ditto, fine-tuning), :meth:`record_metrics` adds
    ``utility_global``: the same fields for the global model.
    """

    name = "personalized"
    aggregates = True
    samples_clients = True

    def __init__(self, run: CellRun) -> None:
        super().__init__(run)
        alg = run.components.algorithm
        self.separate = run.facts.algorithm.personal_model == "separate"
        #: the trainer whose module holds a personal model's running statistics
        self.personal_trainer = "personal" if self.separate else "main"
        self.has_global = self.sharing.delta and not self.sharing.partial
        self.global_utility: dict[str, Any] | None = None
        self.finalizes = type(alg).finalize is not Algorithm.finalize
        self.personal_buffers: dict[int, torch.Tensor] = {}
        self._trained: dict[int, torch.Tensor] = {}

    # -- models ---------------------------------------------------------------

    def init_models(self, w0: torch.Tensor) -> None:
        Isolated.init_models(self, w0)  # type: ignore[arg-type]
        self.global_w = w0.clone()

    def global_params(self) -> torch.Tensor:
        return self.global_w

    def set_global(self, w: torch.Tensor) -> None:
        self.global_w = w

    def final_models(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return self.params[0], dict(self.params)

    def check_finite(self, t: int) -> None:
        import torch

        super().check_finite(t)
        if not torch.isfinite(self.global_w).all():
            raise Diverged(f"round {t}: the global model has non-finite parameters")

    def record_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sharing": self.sharing.describe()}
        if self.global_utility is not None:
            out["utility_global"] = self.global_utility
        return out

    # -- the round ------------------------------------------------------------

    def round(self, t: int) -> dict[str, Any]:
        out = super().round(t) if self.sharing.delta else self.round_without_delta(t)
        if t == self.ctx.rounds and self.finalizes:
            self.finalize()
        return out

    def start(self, clients: list[int], w: torch.Tensor) -> torch.Tensor:
        """Each client's starting model (k, D): the global model on the shared
        parameters, its own on the rest. When everything is shared, the
        global model (D,) itself, exactly as :class:`Federated` hands it out
        (algorithms written for the federated protocol then see what they
        expect)."""
        import torch

        if not self.sharing.partial:
            return w
        keep = torch.as_tensor(self.sharing.mask)
        return torch.stack([torch.where(keep, w, self.params[cl]) for cl in clients])

    def local(self, clients: list[int], start: torch.Tensor) -> Updates:
        import torch

        b, alg, sh = self.run.backend, self.run.components.algorithm, self.sharing
        personal = torch.stack([self.params[cl] for cl in clients])
        if sh.buffers == "sent":
            for cl in clients:
                b.load_buffers(cl, self.global_buffers)
        updates = b.client_updates(alg, clients, start, personal=personal)
        extra = dict(updates.extra)
        mine = extra.pop("personal", None)
        if self.separate:
            if mine is None or tuple(mine.shape) != tuple(updates.delta.shape):
                raise PluginError(
                    f"declares personal_model = 'separate' and must return each client's "
                    f"personal model as ctx.update(delta, personal=...) of shape "
                    f"{tuple(updates.delta.shape)}; got "
                    f"{None if mine is None else tuple(mine.shape)}", plugin=alg.plugin,
                    component=alg.name, hook="client_update", exc_type="ValueError")
            rows = mine.detach()
        else:
            rows = (start + updates.delta).detach()
        self._trained = {cl: rows[j].clone() for j, cl in enumerate(clients)}
        if self.separate or sh.buffers == "local":  # (sent and merged: the server's)
            for cl in clients:
                own = b.buffers(cl, self.personal_trainer)
                if own is not None:
                    self.personal_buffers[cl] = own
        updates = updates.replace(extra=extra)
        return _with_buffers(updates, b) if sh.buffers == "sent" else updates

    def after_server(self, updates: Updates, weights: np.ndarray | None) -> None:
        """Keep what the clients trained; merged models take the new global
        model on the shared parameters (every site can download it)."""
        import torch

        super().after_server(updates, weights)
        for cl, row in self._trained.items():
            self.params[cl] = row
        self._trained = {}
        if self.separate:
            return
        keep = torch.as_tensor(self.sharing.mask)
        for cl in range(self.ctx.num_clients):
            self.params[cl] = torch.where(keep, self.global_w, self.params[cl])
        if self.sharing.buffers == "sent":  # the shared layers' statistics are the server's
            self.personal_buffers = {}

    def finalize(self) -> None:
        """:meth:`Algorithm.finalize` on every site (the "finalize" stage)."""
        import torch

        run, alg = self.run, self.run.components.algorithm
        clients = list(range(self.ctx.num_clients))
        b = run.backend
        for cl in clients:  # start from the running statistics the model is scored with
            own = self.personal_buffers.get(cl)
            if self.sharing.buffers == "sent" and not self.separate:
                own = self.global_buffers
            if own is not None and own.numel():
                b.load_buffers(cl, own, self.personal_trainer)
        models = torch.stack([self.params[cl] for cl in clients])
        new = run.stages.run("finalize", alg, "finalize", b.finalize, alg, clients, models,
                             models)
        for j, cl in enumerate(clients):
            self.params[cl] = new[j].detach().clone()
            own = b.buffers(cl, self.personal_trainer)
            if own is not None:
                self.personal_buffers[cl] = own

    def round_without_delta(self, t: int) -> dict[str, Any]:
        """Prediction sharing (FedMD): no model update reaches the server."""
        run, c = self.run, self.run.components
        stage = run.stages.run
        clients = run.federation.sample(t, run.per_round)
        run.begin_round(t, clients)
        if not clients:
            return {"loss": None, "clients": 0}
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
        for u in updates.clients:
            own = run.backend.buffers(u)
            if own is not None:
                self.personal_buffers[u] = own
        return {"clients": len(clients), "loss": run.reported_loss(updates)}

    # -- evaluation -----------------------------------------------------------

    def site_buffers(self, i: int) -> torch.Tensor | None:
        if self.sharing.buffers == "sent" and not self.separate and i not in \
                self.personal_buffers:
            return self.global_buffers
        return self.personal_buffers.get(i, self.buffers0)

    def evaluate(self) -> dict[str, Any]:
        out = Isolated.evaluate(self)  # type: ignore[arg-type]
        if self.has_global:
            self.global_utility = RoundProtocol.evaluate(self)
        return out


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
