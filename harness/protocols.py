"""The round: one implementation, four settings.

An algorithm declares its protocol (:attr:`fedmedbench.Algorithm.protocol`),
and each protocol is a :class:`Setting` of the same :class:`Round`:

- ``federated`` — sampled clients train from the global model; what they
  send passes the transport and the aggregator; the server applies the
  aggregate (DESIGN's "One round");
- ``personalized`` — the same round, where each client also keeps a model
  of its own and sends only what the algorithm declares
  (:class:`~fedmedbench.components.Sharing`: the shared part of the model
  for FedBN, FedRep, FedPer, Ditto, fine-tuning; soft labels only for
  FedMD), scored on its own test split;
- ``pooled`` — one party holding every site's training rows (the
  ``centralized`` upper baseline), with the work of a federated round;
- ``isolated`` — each site trains alone and is scored with its own model
  (the ``local`` lower baseline);
- ``buffered`` — asynchronous rounds on the virtual clock
  (:class:`fedmedbench.clock.AsyncTwin`): the server keeps ``concurrency``
  clients training, each arriving update joins a buffer with its staleness,
  and ``buffer_size`` arrivals make one server update (FedBuff, Nguyen et
  al. 2022; FedAsync, Xie et al. 2019, is a buffer of one). Clients sent
  the same model version train together (one backend call: the vectorized
  backend's window). Under a transport (secure aggregation) the protocol
  runs over each buffer's clients, so the server reads the buffer's sum
  only (the FedBuff paper's secure aggregation over the buffer, there in a
  trusted execution environment); client-level DP (dp-fedavg) clips each
  update and noises each buffer's sum: one release per server update.

Every round runs beside the network twin's virtual clock
(:mod:`fedmedbench.clock`) when the cell has one: it adds ``clock_s`` and
``bytes`` to the round's history entry, and under a network with outages or
a deadline the clients that drop out go through the transport's own dropout
path (:meth:`~fedmedbench.components.TransportStage.drop`); the server reads
what the others sent. Under the default ``uniform`` network nobody drops and
the round is the one without a clock.

One federated round, by the types that cross (:mod:`fedmedbench.messages`)::

    Server.broadcast            -> Broadcast        (published: bytes down, the view's model)
    Clients.compute             -> Updates          (clients' side only)
    Clients.seal                -> Sent             (declared fields, copies; or transport Messages)
    transport.aggregate / read  -> Received         (published: bytes up, the server's view)
    Server.aggregate, protect   -> aggregate
    Server.update               -> the next global model

The round holds the two parties and the transport mechanism (which
simulates its own parties); it hands each component only its own party's
objects, and the server's side only values built from what was sent.
Evaluation (the benchmark's referee, outside the threat model) scores the
models on every site's test split.

Models with running statistics (BatchNorm buffers) run on the loop backend.
The statistics live in each client's trainer; under an algorithm that sends
the whole model, clients send them with the update (the ``buffers`` field)
and the server averages them; under an algorithm with personal parameters
they stay on the clients (FedBN).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.components import Algorithm, Sharing, Updates
from fedmedbench.errors import Diverged, PluginError
from fedmedbench.messages import Broadcast, Received, _frozen, receive
from fedmedbench.metrics import score

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.cell import Cell
    from fedmedbench.context import CellContext
    from fedmedbench.facts import CellFacts
    from fedmedbench.meters import Stages
    from fedmedbench.parties import Clients, Server

__all__ = ["Setting", "SETTINGS", "PROTOCOLS", "Round", "setting_for", "sharing_of"]


@dataclass(frozen=True)
class Setting:
    """How the round runs for a protocol.

    Attributes
    ----------
    name : str
    aggregates : bool
        Clients train from the global model and the server aggregates what
        they send.
    samples_clients : bool
        The round's clients are sampled (run settings ``clients_per_round``,
        ``client_sampling``); otherwise every client takes part every round.
    pooled : bool
        One training party holds every site's training rows.
    own_models : bool
        Each site keeps a model of its own and is scored with it.
    """

    name: str
    aggregates: bool
    samples_clients: bool
    pooled: bool = False
    own_models: bool = False
    asynchronous: bool = False


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("federated", aggregates=True, samples_clients=True),
    Setting("personalized", aggregates=True, samples_clients=True, own_models=True),
    Setting("pooled", aggregates=False, samples_clients=False, pooled=True),
    Setting("isolated", aggregates=False, samples_clients=False, own_models=True),
    Setting("buffered", aggregates=True, samples_clients=True, asynchronous=True),
)}
#: the protocols algorithms may declare
PROTOCOLS = tuple(SETTINGS)


def setting_for(alg: Algorithm) -> Setting:
    name = str(alg.protocol)
    if name not in SETTINGS:
        raise PluginError(f"algorithm {alg.name} declares protocol {name!r}; protocols are "
                          f"{', '.join(SETTINGS)}", plugin=alg.plugin, component=alg.name,
                          hook="protocol", exc_type="ValueError")
    return SETTINGS[name]


def buffered_plan(alg: Algorithm, num_clients: int, per_round: int) -> tuple[int, int, int]:
    """(buffer size K, concurrency M, maximum staleness) of an algorithm of
    the ``buffered`` protocol, for ``num_clients`` clients and the cell's
    ``per_round`` clients per round: its ``plan(num_clients, per_round)``
    (every algorithm of the protocol declares it, with ``staleness_weight``),
    checked: 1 <= K <= M <= num_clients, staleness >= 0 (0: unbounded)."""
    from fedmedbench.meters import calling

    for need in ("plan", "staleness_weight"):
        if not callable(getattr(alg, need, None)):
            raise PluginError(f"declares protocol 'buffered' and has no {need}(): an algorithm "
                              f"of the buffered protocol declares plan(num_clients, per_round) "
                              f"-> (buffer_size, concurrency, max_staleness) and "
                              f"staleness_weight(staleness) -> float", plugin=alg.plugin,
                              component=alg.name, hook=need, exc_type="TypeError")
    with calling(alg, "plan"):
        got = alg.plan(int(num_clients), int(per_round))  # type: ignore[attr-defined]
    try:
        K, M, S = (int(x) for x in got)
    except (TypeError, ValueError):
        K = M = S = -1
    if not (1 <= K <= M <= num_clients and S >= 0):
        raise PluginError(f"plan({num_clients}, {per_round}) returned {got!r}; return "
                          f"(buffer_size, concurrency, max_staleness) with 1 <= buffer_size <= "
                          f"concurrency <= {num_clients} (the clients) and max_staleness >= 0",
                          plugin=alg.plugin, component=alg.name, hook="plan",
                          exc_type="ValueError")
    return K, M, S


def sharing_of(alg: Algorithm, ctx: CellContext, facts: CellFacts,
               factory: Callable[[], Any]) -> Sharing:
    """The typed description of what each client sends
    (:class:`~fedmedbench.components.Sharing`), from the algorithm's declared
    ``sends``, ``shares`` and :meth:`~fedmedbench.Algorithm.shared_mask`."""
    from fedmedbench.meters import calling
    from fedmedbench.models import get_flat_buffers

    layout = ctx.layout
    af = facts.algorithm
    if af.shares == "none":
        return Sharing(layout, np.zeros(layout.numel, dtype=bool), delta=False,
                       fields=tuple(alg.sends))
    mask = np.ones(layout.numel, dtype=bool)
    if af.shares == "part":
        with calling(alg, "shared_mask"):
            got = alg.shared_mask(ctx)
        if got is not None:
            mask = _checked_mask(got, layout, alg)
    from fedmedbench.cell import peek_model

    bufs = int(get_flat_buffers(peek_model(factory)).numel())
    mode = "none" if bufs == 0 else ("local" if af.shares == "part" else "sent")
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
    from fedmedbench.models import set_flat_buffers, set_flat_params

    set_flat_params(model, params)
    if buffers is not None and buffers.numel():
        set_flat_buffers(model, buffers)


def local_received(updates: Updates, i: int) -> Received:
    """A site's own update as it applies it itself (isolated and pooled
    protocols: nothing crosses to a server)."""
    rows: dict[str, Any] = {"delta": _delta(updates, i).unsqueeze(0).detach().clone()}
    for k, v in updates.extra.items():
        rows[k] = v[i:i + 1] if not isinstance(v, list) else [v[i]]
    return Received(round=0, kind="plaintext", clients=(int(updates.clients[i]),),
                    num_examples=(int(updates.num_examples[i]),),
                    metrics=_frozen({k: np.asarray(v)[[i]] for k, v in updates.metrics.items()}),
                    rows=_frozen(rows))


def _delta(updates: Updates, i: int) -> torch.Tensor:
    """Row ``i``'s delta (clients of different architectures keep theirs apart)."""
    if updates.per_client is not None:
        return updates.per_client[updates.clients[i]]
    return updates.delta[i]


class Round:
    """One round of a cell, for its :class:`Setting` (module docstring).

    Parameters
    ----------
    cell : Cell
        The built cell (components, data, contexts).
    clients, server : Clients, Server
        The two parties.
    stages : Stages
        Runs and publishes the stages (time, bytes, the server's view).
    """

    def __init__(self, cell: Cell, clients: Clients, server: Server, stages: Stages) -> None:
        self.cell = cell
        self.setting = cell.setting
        self.clients = clients
        self.server = server
        self.stages = stages
        self.transport = cell.transport
        self.sharing = cell.sharing
        self.federation = cell.federation
        alg = cell.server.algorithm
        self.separate = cell.facts.algorithm.personal_model == "separate"
        #: the trainer whose module holds a personal model's running statistics
        self.personal_trainer = "personal" if self.separate else "main"
        self.has_global = self.setting.aggregates and self.sharing.delta and (
            not self.setting.own_models or not self.sharing.partial)
        self.finalizes = type(alg).finalize is not Algorithm.finalize
        self.global_utility: dict[str, Any] | None = None
        #: the last evaluation's predictions: "pooled" (y, proba) of the global model on
        #: the pooled test rows, "sites" each site's (y, proba) on its own test rows
        self.predictions: dict[str, Any] = {}
        #: the global model's, where personal models are scored beside one
        self.global_predictions: dict[str, Any] = {}
        from fedmedbench.cell import peek_model
        from fedmedbench.models import get_flat_buffers

        #: the running statistics of a freshly built model (no training yet)
        self.buffers0 = get_flat_buffers(peek_model(cell.factory))
        self.eval_model = cell.factory()
        self.numel = cell.layout.numel
        #: the network twin's virtual clock (:mod:`fedmedbench.clock`; set by the engine);
        #: ``None``: no clock (``network = "none"``)
        self.twin: Any = None
        #: measured seconds of the transport's per-round key setup (``begin_round``)
        self._transport_begin_s = 0.0
        #: why the transport aborted the last aborted round
        self._aborted = ""
        self._last_sent_bytes = 0
        self._last_row_bytes: list[int] = []

    # -- models ------------------------------------------------------------------------

    def init_models(self, w0: torch.Tensor, *, pretrain: Callable[[Callable[[], Any]],
                                                                  torch.Tensor] | None = None
                    ) -> None:
        self.server.params = w0.clone()
        self.server.buffers = self.buffers0.clone()
        if self.setting.own_models:
            cl = self.clients
            cl.models = {i: w0.clone() for i in range(self.cell.clients_ctx.num_clients)}
            for i, f in self.cell.client_factories.items():  # their own architectures
                from fedmedbench.models import get_flat_params

                cl.models[i] = pretrain(f) if pretrain is not None else get_flat_params(f())

    @property
    def global_params(self) -> torch.Tensor:
        assert self.server.params is not None
        return self.server.params

    def final_models(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(the model an outside party attacks, each site's own final model)."""
        if self.setting.own_models:
            return self.clients.models[0], dict(self.clients.models)
        return self.global_params, {}

    def final_buffers(self) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The running statistics (BatchNorm buffers) of :meth:`final_models`'
        models: what they are scored with, so what an attack must load."""
        _, per_site = self.final_models()
        if per_site:
            bufs = {i: b for i in per_site if (b := self.site_buffers(i)) is not None}
            return bufs.get(0), bufs
        return self.global_model_buffers(), {}

    def params_by_model(self) -> dict[int, torch.Tensor]:
        """The models after the last round (0: the global model; per site under
        the isolated and personalized protocols)."""
        if self.setting.own_models:
            return dict(self.clients.models)
        return {0: self.global_params}

    # -- the round -----------------------------------------------------------------------

    def run(self, t: int) -> dict[str, Any]:
        if self.setting.asynchronous:
            return self.buffered_round(t)
        if self.setting.pooled:
            return self.pooled_round(t)
        if not self.setting.aggregates:
            return self.isolated_round(t)
        if not self.sharing.delta:
            return self.prediction_round(t)
        out = self.federated_round(t)
        if self.setting.own_models and t == self.cell.rounds and self.finalizes:
            self.finalize()
        return out

    def begin(self, t: int, clients: list[int]) -> None:
        for ctx in (self.cell.clients_ctx, self.cell.server_ctx):
            ctx.round = t
            ctx.participants = list(clients)
        for comp in self.cell.all_components():
            self._lifecycle(comp, "begin_round", t)

    def end(self, t: int) -> None:
        """Every component's ``end_round`` (also after an aborted round)."""
        for comp in self.cell.all_components():
            self._lifecycle(comp, "end_round", t)

    def _lifecycle(self, comp: Any, hook: str, t: int) -> None:
        import time

        from fedmedbench.components import PrivacyMechanism

        stage = hook if isinstance(comp, PrivacyMechanism) else ""
        t0 = time.perf_counter()
        self.stages.run(stage, comp, hook, getattr(comp, hook), t)
        if comp is self.transport and hook == "begin_round":  # the clients' key setup
            self._transport_begin_s = time.perf_counter() - t0

    def reported_loss(self, updates: Updates) -> float | None:
        """The round's mean client training loss for the history; under DP the
        clients do not send it (it is computed on private records, un-noised)."""
        if self.cell.dp:
            return None
        loss = updates.metrics.get("loss")
        if loss is None or not len(loss):
            return None
        v = np.asarray(loss, dtype=float)
        finite = np.isfinite(v)
        if finite.all():  # np.nanmean's sum and division, without its NaN-masked copy
            return float(v.mean())
        if np.isinf(v).any():
            raise Diverged(f"a client's training loss is {float(v[np.isinf(v)][0])}")
        return float(np.nanmean(v)) if finite.any() else None

    def federated_round(self, t: int) -> dict[str, Any]:
        """Sampled clients train from the global model (their own on the
        personal parameters); the server aggregates what they send."""
        import torch

        cl, sv, stage = self.clients, self.server, self.stages.run
        twin = self.twin
        clients = self.federation.sample(t, self.cell.per_round) + self.sample_canaries(t)
        unavailable: list[int] = []
        if twin is not None:  # the sampled clients offline at the round's start take no part
            clients, unavailable = twin.available(clients)
        self.begin(t, clients)
        if not clients:  # an empty Poisson sample: central noise still runs (skipping it
            out: dict[str, Any] = self.empty_round(t)  # would reveal that nobody took part)
            if twin is not None:
                out.update(twin.close_round(twin.timeline([], down_bytes=0, up_bytes=[]),
                                            unavailable=unavailable, round=t))
            return out
        bc = sv.broadcast(clients)
        self.stages.publish(bc)
        cl.deliver(bc)
        start = self.start(clients, bc.params)
        personal = (torch.stack([cl.models[c] for c in clients])
                    if self.setting.own_models else None)
        if self.sharing.buffers == "sent":  # each client starts from the server's statistics
            for c in clients:
                cl.backend.load_buffers(c, sv.buffers)
        updates = cl.train(clients, start, bc, personal=personal)
        updates = self.keep_personal(clients, start, updates)
        updates = cl.protect(updates, start)
        cl.check(updates, numel=self.numel)
        loss = self.reported_loss(updates)
        clock = _RoundClock(twin, clients, bc) if twin is not None else None
        if self.transport is not None:  # the metadata crosses first; clients scale, encode
            weights = self.weights(receive(cl.metadata(updates), sharing=self.sharing,
                                           numel=self.numel))
            got = self.through_transport(updates, weights, clock)
            if got is None:  # the transport aborted (the twin's dropouts): nothing released
                return {"clients": len(clients), "loss": loss,
                        **clock.close(t, unavailable=unavailable, contributors=(),  # type: ignore[union-attr]
                                      aborted=self._aborted)}
            received = got
            aggregate = received.sums["delta"]
        else:
            sent = stage("send", None, "", cl.seal, updates)
            if clock is not None and twin.drops:  # whose message never arrived
                clock.timeline(up_bytes=sent.row_bytes)
                if clock.tl is not None and clock.tl.lost:
                    sent = _without(sent, clock.tl.lost)
            self.stages.publish(sent)
            received = receive(sent, sharing=self.sharing, numel=self.numel)
            if clock is not None and clock.tl is not None and clock.tl.lost:
                received = dataclasses.replace(received, dropped=tuple(sorted(clock.tl.lost)))
            self.stages.publish(received)
            if clock is not None:
                clock.sent(sent)
            if not len(received):  # every message was lost on the way
                del updates
                out = self.lost_round(t, received)
                out.update({"clients": len(clients), "loss": loss})
                out.update(clock.close(t, unavailable=unavailable,  # type: ignore[union-attr]
                                       contributors=()))
                return out
            weights = self.weights(received)
            aggregate = sv.aggregate(received, weights)
        del updates  # what the clients computed stays on their side
        aggregate = sv.protect(aggregate, received)
        self._check_aggregate(t, aggregate)
        if self.sharing.partial:  # only the shared parameters are averaged; noise a server
            aggregate = torch.where(torch.as_tensor(self.sharing.mask), aggregate,  # stage
                                    torch.zeros_like(aggregate))  # put elsewhere is discarded
        new = sv.update(aggregate, received)
        self._check_vector(new, sv.parts.algorithm, "server_update")
        sv.params = new
        self.after_server(received, weights)
        out = {"clients": len(clients), "loss": loss}
        shown = self.shown_weights(received, weights)
        if shown is not None:
            out["weights"] = shown
        if clock is not None:
            out.update(clock.close(t, unavailable=unavailable,
                                   contributors=received.contributors))
        return out

    def lost_round(self, t: int, received: Received) -> dict[str, Any]:
        """Every client's message was lost (the twin): the server has nothing
        to aggregate; its server-stage privacy still runs on a zero
        aggregate, as after an empty sample."""
        return self.empty_round(t)

    def sample_canaries(self, t: int) -> list[int]:
        """An audit's canary clients of round ``t``: each independently with the
        round's rate q (all of them when every client takes part)."""
        ids = self.cell.canary_clients
        if not ids:
            return []
        q = float(self.cell.clients_ctx.sample_rate)
        if q >= 1.0:
            return list(ids)
        from fedmedbench.federation import cell_rng

        draw = cell_rng(self.cell.seed, "canary-client-sampling", t).random(len(ids))
        return [c for c, u in zip(ids, draw) if u < q]

    def shown_weights(self, received: Received, weights: Any) -> dict[str, float] | None:
        """The round's weights for its history entry, by client name (rounded
        to 6 digits): what a summing mechanism says each update carries
        (:meth:`contribution_weights`), else the aggregation weights."""
        shown = self.contribution_weights(received) if self.cell.sum_contributions else weights
        if shown is None:
            return None
        names = self.cell.clients_ctx.client_names
        vals = shown.tolist() if hasattr(shown, "tolist") else list(shown)  # one copy
        return {names[u]: round(float(x), 6) for u, x in zip(received.clients, vals)}

    def contribution_weights(self, received: Received) -> np.ndarray | None:
        """Under a mechanism that weights the rows itself, the weights its
        server half says each received update carries (for the history)."""
        for m in self.server.parts.server_stage:
            if m.aggregate_as_sum:  # type: ignore[attr-defined]
                w = self.stages.run("", m, "contribution_weights", m.contribution_weights,
                                    self.server.ctx, received)
                if w is not None:
                    return np.asarray(w, dtype=float)
        return None

    def weights(self, received: Received) -> np.ndarray | None:
        """The aggregation weights, computed by the server from what it reads
        in the clear (``None``: a non-linear rule)."""
        if self.cell.sum_contributions:  # the update stage weighted each row: the server sums
            return np.ones(len(received))
        if not self.server.parts.aggregator.linear:
            return None
        return self.server.weights(received)

    def through_transport(self, updates: Updates, weights: np.ndarray | None,
                          clock: _RoundClock | None = None, *,
                          staleness: Sequence[int] = ()) -> Received | None:
        """Encode on the clients' side, aggregate on the server's (the
        transport's parties), and read the sums. With the twin's dropouts
        the transport takes them through its own recovery
        (:meth:`~fedmedbench.components.TransportStage.drop`); ``None`` when
        it aborted the round (under a network that drops clients)."""
        import time

        from fedmedbench.components import Message, RoundAborted, TransportStage

        t, cl, sv = self.transport, self.clients, self.server
        assert t is not None and weights is not None
        encode_s: dict[int, float] = {}

        def encode(client: int, vector: torch.Tensor) -> Message:
            t0 = time.perf_counter()
            msg = t.encode(cl.ctx, client, vector)
            encode_s[int(client)] = time.perf_counter() - t0
            if not isinstance(msg, Message):
                raise TypeError(f"encode returned {type(msg).__module__}."
                                f"{type(msg).__name__}, not fedmedbench.Message")
            return msg

        sent = self.stages.run("encode", t, "encode", cl.seal, updates, weights, encode)
        messages = list(sent.messages)
        lost: set[int] = set()
        if clock is not None:  # each client's cryptographic seconds: its key setup share and
            share = self._transport_begin_s / max(1, len(sent.clients))  # its encoding
            clock.crypto = {c: share + encode_s.get(c, 0.0) for c in sent.clients}
            recovers = type(t).drop is not TransportStage.drop
            clock.timeline(up_bytes=[int(m.nbytes) for m in messages], unmasking=recovers)
            dropped = clock.tl.phases if clock.tl is not None else {}
            if dropped:
                took = bool(self.stages.run("drop", t, "drop", t.drop, sv.ctx, dict(dropped)))
                lost = set(clock.tl.lost)  # type: ignore[union-attr]
                if not took:
                    messages = [m for m in messages if m.client not in lost]
        t0 = time.perf_counter()
        try:
            total = self.stages.run("secure_aggregate", t, "aggregate", t.aggregate, sv.ctx,
                                    messages)
        except PluginError as exc:
            if clock is None or not clock.twin.drops or not isinstance(exc.__cause__,
                                                                       RoundAborted):
                raise
            clock.server_s = time.perf_counter() - t0
            self._aborted = f"{type(exc.__cause__).__name__}: {exc.__cause__}"
            self.stages.publish(sent)  # what crossed before the abort
            clock.sent(sent)
            return None
        if clock is not None:
            clock.server_s = time.perf_counter() - t0
        expect = sum(n for _, n in sent.layout)
        if tuple(total.reshape(-1).shape) != (expect,):
            raise PluginError(f"aggregate returned a tensor of shape {tuple(total.shape)}; the "
                              f"encoded vectors have {expect} values, so their sum of shape "
                              f"({expect},) is expected", plugin=t.plugin, component=t.name,
                              hook="aggregate", exc_type="ValueError")
        if lost and not self.cell.sum_contributions and tuple(total.shape) == (expect,):
            # the mean over the clients whose input arrived: the delta's weighted sum over
            # them, divided by their weights' share (a fixed-denominator estimator, where
            # an update stage weights the rows itself, takes a missing row as zero)
            keep = [i for i, c in enumerate(sent.clients) if c not in lost]
            share = float(np.asarray(weights, dtype=float)[keep].sum())
            total = total.reshape(-1).clone()
            n = sent.layout[0][1]
            if share > 0:
                total[:n] = total[:n] / share
        self.stages.publish(sent)  # its messages' bytes are final once the sum is out
        received = receive(sent, sharing=self.sharing, numel=self.numel, total=total,
                           transport=t.name)
        if lost or staleness:
            received = dataclasses.replace(received, dropped=tuple(sorted(lost)),
                                           staleness=tuple(int(x) for x in staleness))
        self.stages.publish(received)
        self._last_sent_bytes, self._last_row_bytes = sent.nbytes, sent.row_bytes
        if clock is not None:
            clock.sent(sent)
        return received

    def empty_round(self, t: int) -> dict[str, Any]:
        import torch

        sv = self.server
        if sv.parts.server_stage:
            none = Received(round=t, kind="plaintext", clients=(), num_examples=(),
                            metrics=_frozen({}),
                            rows=_frozen({"delta": torch.zeros((0, self.numel))}))
            aggregate = sv.protect(torch.zeros(self.numel), none)
            if self.sharing.partial:
                aggregate = torch.where(torch.as_tensor(self.sharing.mask), aggregate,
                                        torch.zeros_like(aggregate))
            sv.params = sv.update(aggregate, none)
        return {"loss": None, "clients": 0}

    def _check_aggregate(self, t: int, aggregate: torch.Tensor) -> None:
        import torch

        comp = self.server.parts.aggregator if self.transport is None else self.transport
        self._check_vector(aggregate, comp, "aggregate")
        if not torch.isfinite(aggregate).all():
            raise Diverged(f"round {t}: the aggregated update is not finite")

    def _check_vector(self, v: Any, comp: Any, hook: str) -> None:
        """A hook's model-sized vector has the model's size."""
        n = self.numel
        if tuple(v.shape) != (n,):
            raise PluginError(f"{hook} returned a tensor of shape {tuple(v.shape)}; the model "
                              f"has {n} parameters, so a flat vector of shape ({n},) is "
                              f"expected", plugin=comp.plugin or type(comp).__module__,
                              component=comp.name, hook=hook, exc_type="ValueError")

    # -- personal state (personalized protocol) ----------------------------------------

    def start(self, clients: list[int], w: torch.Tensor) -> torch.Tensor:
        """What the round's clients train from: the global model (D,); under
        a partial send each client's own values on its personal parameters
        (k, D)."""
        import torch

        if not (self.setting.own_models and self.sharing.partial):
            return w
        keep = torch.as_tensor(self.sharing.mask)
        cl = self.clients
        return torch.stack([torch.where(keep, w, cl.models[c]) for c in clients])

    def keep_personal(self, clients: list[int], start: torch.Tensor, updates: Updates
                      ) -> Updates:
        """On the clients' side: the model each client keeps (its personal
        model, or where its training ended), its running statistics, and the
        update without the ``personal`` field (it never leaves the client)."""
        cl, sh = self.clients, self.sharing
        b = cl.backend
        if self.sharing.buffers == "sent":
            updates = _with_buffers(updates, b)
        if not self.setting.own_models:
            return updates
        extra = dict(updates.extra)
        mine = extra.pop("personal", None)
        alg = cl.parts.algorithm
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
        cl.trained = {c: rows[j].clone() for j, c in enumerate(clients)}
        if self.separate or sh.buffers == "local":  # (sent and merged: the server's)
            for c in clients:
                own = b.buffers(c, self.personal_trainer)
                if own is not None:
                    cl.personal_buffers[c] = own
        return updates.replace(extra=extra)

    def after_server(self, received: Received, weights: np.ndarray | None) -> None:
        """Average the running statistics sent (the server); keep what the
        clients trained, and merge the new global model's shared parameters
        into every site's model (every site can download it)."""
        import torch

        sv, cl = self.server, self.clients
        if self.sharing.buffers == "sent" and "buffers" in received.rows:
            if weights is None or self.cell.sum_contributions:
                n = np.asarray(received.num_examples, dtype=float)
                weights = n / n.sum()
            om = torch.as_tensor(np.asarray(weights, dtype=float), dtype=torch.float32)
            sv.buffers = om @ received.rows["buffers"].to(torch.float32)
        if not self.setting.own_models:
            return
        for c, row in cl.trained.items():
            cl.models[c] = row
        cl.trained = {}
        if self.separate:
            return
        keep = torch.as_tensor(self.sharing.mask)
        for c in range(self.cell.clients_ctx.num_clients):
            cl.models[c] = torch.where(keep, self.global_params, cl.models[c])
        if self.sharing.buffers == "sent":  # the shared layers' statistics are the server's
            cl.personal_buffers = {}

    def finalize(self) -> None:
        """:meth:`Algorithm.finalize` on every site (the "finalize" stage)."""
        import torch

        cl = self.clients
        alg = cl.parts.algorithm
        clients = list(range(self.cell.clients_ctx.num_clients))
        b = cl.backend
        for c in clients:  # start from the running statistics the model is scored with
            own = cl.personal_buffers.get(c)
            if self.sharing.buffers == "sent" and not self.separate:
                own = self.server.buffers
            if own is not None and own.numel():
                b.load_buffers(c, own, self.personal_trainer)
        models = torch.stack([cl.models[c] for c in clients])
        new = self.stages.run("finalize", alg, "finalize", b.finalize, alg, clients, models,
                              models)
        for j, c in enumerate(clients):
            cl.models[c] = new[j].detach().clone()
            own = b.buffers(c, self.personal_trainer)
            if own is not None:
                cl.personal_buffers[c] = own

    def prediction_round(self, t: int) -> dict[str, Any]:
        """Prediction sharing (FedMD): no model update reaches the server;
        each client applies its own update, and the server reads the fields
        the algorithm sends (its server update keeps its own state)."""
        cl, sv, stage = self.clients, self.server, self.stages.run
        clients = self.federation.sample(t, self.cell.per_round)
        self.begin(t, clients)
        if not clients:
            return {"loss": None, "clients": 0}
        bc = sv.broadcast(clients)
        self.stages.publish(bc)
        updates = cl.train(clients, dict(cl.models), bc)
        for m in cl.parts.update_stage:
            updates = stage("update", m, "process_update", m.process_update, cl.ctx, updates)
        cl.check(updates, numel=None)
        loss = self.reported_loss(updates)
        for i, u in enumerate(updates.clients):  # each client applies its own update
            cl.models[u] = cl.models[u] + _delta(updates, i)
        for u in updates.clients:
            own = cl.backend.buffers(u)
            if own is not None:
                cl.personal_buffers[u] = own
        sent = stage("send", None, "", cl.seal, updates)
        self.stages.publish(sent)
        received = receive(sent, sharing=self.sharing, numel=self.numel)
        self.stages.publish(received)
        del updates
        import torch

        sv.params = sv.update(torch.zeros(self.numel), received)
        out = {"clients": len(clients), "loss": loss}
        if self.twin is not None:  # timed; the twin drops no client of a prediction round
            tl = self.twin.timeline(list(sent.clients), down_bytes=bc.per_client_bytes,
                                    up_bytes=sent.row_bytes, dropping=False)
            out.update(self.twin.close_round(tl, contributors=sent.clients, round=t,
                                             bytes_up=sent.nbytes, bytes_down=bc.nbytes))
        return out

    # -- the other settings --------------------------------------------------------------

    def isolated_round(self, t: int) -> dict[str, Any]:
        """Each site trains alone and applies its own update."""
        cl, sv = self.clients, self.server
        clients = list(range(self.cell.clients_ctx.num_clients))
        self.begin(t, clients)
        updates = cl.train(clients, cl.models, None)
        cl.check(updates, numel=None)
        alg = sv.parts.algorithm
        for i, u in enumerate(updates.clients):
            cl.models[u] = self.stages.run(
                "server_update", alg, "server_update", alg.server_update, sv.ctx,
                cl.models[u], _delta(updates, i).detach().clone(), local_received(updates, i))
        out = {"clients": len(clients), "loss": self.reported_loss(updates)}
        if self.twin is not None:  # each site alone: the round lasts its slowest site's training
            out.update(self.twin.close_round(None, compute_only=clients,
                                             contributors=clients, round=t))
        return out

    def pooled_round(self, t: int) -> dict[str, Any]:
        """One party trains on the pooled rows: the work of a federated round."""
        cl, sv = self.clients, self.server
        self.begin(t, [0])
        w = self.global_params
        updates = cl.train([0], w, None)
        cl.check(updates, numel=self.numel)
        alg = sv.parts.algorithm
        sv.params = self.stages.run("server_update", alg, "server_update", alg.server_update,
                                    sv.ctx, w.detach().clone(), updates.delta[0].detach().clone(),
                                    local_received(updates, 0))
        out = {"clients": 1, "loss": self.reported_loss(updates),
               "steps": self.cell.clients_ctx.fixed_steps}
        if self.twin is not None:  # one party trains on the pooled rows, at this machine's speed
            out.update(self.twin.close_round(None, compute_only=[0], contributors=[0], round=t))
        return out

    # -- the buffered (asynchronous) protocol ------------------------------------------

    def buffered_round(self, t: int) -> dict[str, Any]:
        """One server update of an asynchronous protocol (module docstring):
        the twin runs dispatches and arrivals until the buffer is full; the
        clients sent the current model train together now (their updates
        wait on their side until they arrive); the buffer's updates are
        protected, sent (through the transport: one secure sum per buffer)
        and aggregated with their staleness weights."""

        cl, sv, stage = self.clients, self.server, self.stages.run
        twin = self.twin
        alg = sv.parts.algorithm
        entries, arrived = twin.next_buffer()
        buffer = sorted(entries, key=lambda e: e.client)
        clients = [e.client for e in buffer]
        version = twin.version
        staleness = [version - e.version for e in buffer]
        self.begin(t, clients)
        batch = twin.to_train(version)
        bc = None
        if batch:  # one window: every client sent model `version` trains in one call
            bc = sv.broadcast(batch)
            self.stages.publish(bc)
            cl.deliver(bc)
            w = bc.params
            if self.sharing.buffers == "sent":
                for c in batch:
                    cl.backend.load_buffers(c, sv.buffers)
            trained = cl.train(batch, w, bc)
            trained = self.keep_personal(batch, w, trained)
            trained = cl.protect_trained(trained, w)
            for j, c in enumerate(trained.clients):
                cl.pending[int(c)] = trained.rows([j])
            twin.observe_down(bc.per_client_bytes)
        updates = Updates.concat([cl.pending.pop(c) for c in clients])
        cl.pending = {c: u for c, u in cl.pending.items() if twin.in_flight_since(c) is not None}
        updates = cl.protect_sending(updates)
        cl.check(updates, numel=self.numel)
        loss = self.reported_loss(updates)
        with_staleness = stage("staleness", alg, "staleness_weight", _staleness_weights, alg,
                               staleness)
        t0_server = time.perf_counter()
        if self.transport is not None:
            weights = self.weights(receive(cl.metadata(updates), sharing=self.sharing,
                                           numel=self.numel))
            weights = _scaled(weights, with_staleness)
            got = self.through_transport(updates, weights, None, staleness=staleness)
            assert got is not None
            received = got
            aggregate = received.sums["delta"]
            sent_bytes, row_bytes = self._last_sent_bytes, self._last_row_bytes
        else:
            sent = stage("send", None, "", cl.seal, updates)
            self.stages.publish(sent)
            sent_bytes, row_bytes = sent.nbytes, sent.row_bytes
            received = dataclasses.replace(receive(sent, sharing=self.sharing, numel=self.numel),
                                           staleness=tuple(staleness))
            self.stages.publish(received)
            weights = _scaled(self.weights(received), with_staleness)
            aggregate = sv.aggregate(received, weights)
        del updates
        aggregate = sv.protect(aggregate, received)
        self._check_aggregate(t, aggregate)
        new = sv.update(aggregate, received)
        self._check_vector(new, alg, "server_update")
        sv.params = new
        self.after_server(received, weights)
        server_s = time.perf_counter() - t0_server if self.transport is not None else 0.0
        twin.observe_up(row_bytes)
        out: dict[str, Any] = {"clients": len(clients), "loss": loss, "trained": len(batch)}
        shown = self.shown_weights(received, weights)
        if shown is not None:
            out["weights"] = shown
        out.update(twin.applied(buffer, arrived, server_s=server_s, bytes_up=sent_bytes,
                                bytes_down=bc.nbytes if bc is not None else 0, round=t,
                                contributors=received.contributors))
        return out

    def check_finite(self, t: int) -> None:
        import torch

        for i, p in self.params_by_model().items():
            if not torch.isfinite(p).all():
                raise Diverged(f"round {t}: model {i} has non-finite parameters")
        if self.setting.own_models and self.setting.aggregates and \
                not torch.isfinite(self.global_params).all():
            raise Diverged(f"round {t}: the global model has non-finite parameters")

    # -- evaluation ------------------------------------------------------------------------

    def global_model_buffers(self) -> torch.Tensor:
        """The running statistics the global model is scored with."""
        if self.setting.pooled:
            own = self.clients.backend.buffers(0)  # the one party's own running statistics
            return self.buffers0 if own is None else own
        assert self.server.buffers is not None
        return self.server.buffers

    def site_buffers(self, i: int) -> torch.Tensor | None:
        """The running statistics site ``i``'s own model is scored with."""
        cl = self.clients
        if not self.setting.aggregates:
            own = cl.backend.buffers(i)
            return self.buffers0 if own is None else own
        if self.sharing.buffers == "sent" and not self.separate and i not in \
                cl.personal_buffers:
            return self.server.buffers
        return cl.personal_buffers.get(i, self.buffers0)

    def evaluate(self, data: Any = None) -> dict[str, Any]:
        """Utility on every site's test split (``data``: another
        :class:`FederatedData` whose test splits to score, the validation
        rows). The global model's, or under the isolated and personalized
        protocols each site's own (and ``global_utility`` the global
        model's, where there is one)."""
        data = data if data is not None else self.cell.data
        if not self.setting.own_models:
            return self._evaluate_global(data)
        out = self._evaluate_sites(data)
        if self.setting.aggregates and self.has_global:
            sites_pred = self.predictions
            self.global_utility = self._evaluate_global(data)
            self.global_predictions, self.predictions = self.predictions, sites_pred
        return out

    def _evaluate_global(self, data: Any) -> dict[str, Any]:
        from fedmedbench.training import predict_proba

        metric = data.task.metric
        model = self.eval_model
        _load(model, self.global_params, self.global_model_buffers())
        proba = predict_proba(model, _pooled_X(data))
        per_site, pooled = _score_sites(metric, data, proba)
        y = np.concatenate([s.test.y for s in data.sites]) if data.sites else np.zeros(0)
        off = np.concatenate([[0], np.cumsum([len(s.test) for s in data.sites])])
        self.predictions = {"pooled": (y, proba), "sites": {
            s.name: (s.test.y, proba[off[i]:off[i + 1]]) for i, s in enumerate(data.sites)}}
        return _utility(metric, per_site, pooled)

    def _evaluate_sites(self, data: Any) -> dict[str, Any]:
        """Each site's own model: ``global`` is the mean over sites of each
        site's model on the pooled test set (how well one hospital's model
        serves everyone); ``per_site`` each site's model on its own test
        split; ``cross_site`` per site its model's unweighted mean over every
        site's test split (FLamby's "Local i") and ``cross_site_matrix`` each
        of those scores (model's site → test site → score)."""
        from fedmedbench.training import predict_proba

        metric = data.task.metric
        per_site: dict[str, float] = {}
        on_pooled = []
        matrix: dict[str, dict[str, float]] = {}
        X = _pooled_X(data)
        own = self.cell.client_factories
        off = np.concatenate([[0], np.cumsum([len(s.test) for s in data.sites])])
        sites_pred = {}
        for i, site in enumerate(data.sites):
            model = own[i]() if i in own else self.eval_model
            _load(model, self.clients.models[i], None if i in own else self.site_buffers(i))
            proba = predict_proba(model, X)
            site_scores, pooled = _score_sites(metric, data, proba)
            per_site[site.name] = site_scores[site.name]
            on_pooled.append(pooled)
            matrix[site.name] = site_scores
            sites_pred[site.name] = (site.test.y, proba[off[i]:off[i + 1]])
        self.predictions = {"pooled": None, "sites": sites_pred}
        cross = {name: float(np.nanmean(list(row.values()))) for name, row in matrix.items()}
        return _utility(metric, per_site, float(np.nanmean(on_pooled)), cross_site=cross,
                        cross_site_matrix=matrix)

    def record_metrics(self) -> dict[str, Any]:
        """Fields the protocol adds to the record's ``metrics`` beside ``utility``."""
        if not (self.setting.own_models and self.setting.aggregates):
            return {}
        out: dict[str, Any] = {"sharing": self.sharing.describe()}
        if self.global_utility is not None:
            out["utility_global"] = self.global_utility
        return out


class _RoundClock:
    """One synchronous round's bookkeeping for the twin: the clients it
    timed, what crossed, the cryptographic seconds measured."""

    def __init__(self, twin: Any, clients: list[int], broadcast: Broadcast) -> None:
        self.twin = twin
        self.clients = list(clients)
        self.broadcast = broadcast
        self.tl: Any = None
        #: per client: its share of the transport's key setup and its encoding (seconds)
        self.crypto: dict[int, float] = {}
        #: the server's (the transport's aggregating party's) seconds
        self.server_s = 0.0
        self.bytes_up = 0

    def timeline(self, *, up_bytes: Sequence[int], unmasking: bool = False) -> None:
        self.tl = self.twin.timeline(self.clients, down_bytes=self.broadcast.per_client_bytes,
                                     up_bytes=list(up_bytes), crypto_s=self.crypto,
                                     unmasking=unmasking)

    def sent(self, sent: Any) -> None:
        self.bytes_up = int(sent.nbytes)
        if self.tl is None:
            self.timeline(up_bytes=sent.row_bytes)

    def close(self, t: int, *, unavailable: Sequence[int], contributors: Iterable[int],
              aborted: str | None = None) -> dict[str, Any]:
        if self.tl is None:
            self.timeline(up_bytes=[0] * len(self.clients))
        return self.twin.close_round(self.tl, unavailable=unavailable,
                                     contributors=contributors, server_s=self.server_s,
                                     client_crypto_s=sum(self.crypto.values()),
                                     aborted=aborted, round=t, bytes_up=self.bytes_up,
                                     bytes_down=self.broadcast.nbytes)


def _without(sent: Any, lost: set[int]) -> Any:
    """``sent`` without the messages of ``lost`` (plaintext: they never arrived)."""
    keep = [i for i, c in enumerate(sent.clients) if c not in lost]

    def take(v: Any) -> Any:
        return [v[i] for i in keep] if isinstance(v, (list, tuple)) else v[keep]

    return dataclasses.replace(
        sent, clients=tuple(sent.clients[i] for i in keep),
        num_examples=tuple(sent.num_examples[i] for i in keep),
        metrics=_frozen({k: np.asarray(v)[keep] for k, v in sent.metrics.items()}),
        fields=_frozen({k: take(v) for k, v in sent.fields.items()}),
        field_bytes=_frozen({k: tuple(v[i] for i in keep) for k, v in sent.field_bytes.items()}))


def _staleness_weights(alg: Algorithm, staleness: Sequence[int]) -> np.ndarray:
    """The algorithm's weight of each buffered update, from its staleness."""
    out = np.array([float(alg.staleness_weight(int(s))) for s in staleness],  # type: ignore[attr-defined]
                   dtype=float)
    if not (np.isfinite(out).all() and (out >= 0).all()):
        raise ValueError(f"staleness_weight gave {out.tolist()} for staleness "
                         f"{list(staleness)}; return finite weights >= 0")
    return out


def _scaled(weights: np.ndarray | None, s: np.ndarray) -> np.ndarray | None:
    """Aggregation weights times staleness weights (unchanged when every
    update is fresh and weighs 1)."""
    if weights is None or bool((s == 1.0).all()):
        return weights
    return np.asarray(weights, dtype=float) * s


def _with_buffers(updates: Updates, backend: Any) -> Updates:
    """``updates`` with each client's running statistics after training."""
    import torch

    rows = [backend.buffers(cl) for cl in updates.clients]
    if any(r is None for r in rows):
        return updates
    return updates.replace(extra={**updates.extra, "buffers": torch.stack(rows)})


# --------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------


def _pooled_X(data: Any) -> np.ndarray:
    return np.concatenate([s.test.X for s in data.sites if len(s.test)]) if any(
        len(s.test) for s in data.sites) else np.zeros((0, *data.task.input_shape), np.float32)


def _score_sites(metric: str, data: Any, proba: np.ndarray) -> tuple[dict[str, float], float]:
    """Per-site and pooled scores of predictions ``proba`` on the concatenated
    test splits (one forward pass serves every site; every site scored in one
    pass, :func:`fedmedbench.metrics.score_sites`)."""
    from fedmedbench.metrics import score_sites

    sizes = [len(s.test) for s in data.sites]
    ys = [s.test.y for s in data.sites]
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if len(y):
        scores = score_sites(metric, y, proba, offsets=offsets, n_sites=len(sizes))
    else:
        scores = np.full(len(sizes), np.nan)
    per_site = {s.name: float(v) for s, v in zip(data.sites, scores)}
    pooled = score(metric, y, proba) if len(y) else float("nan")
    return per_site, pooled


def _utility(metric: str, per_site: dict[str, float], pooled: float, **extra: Any
             ) -> dict[str, Any]:
    finite = [v for v in per_site.values() if not math.isnan(v)]
    return {"metric": metric, "global": pooled, "per_site": per_site,
            "per_site_mean": float(np.mean(finite)) if finite else float("nan"),
            "worst_site": min(finite) if finite else float("nan"), **extra}
