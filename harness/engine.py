"""The round engine: :func:`run_cell` turns one resolved cell into a record.

One round (DESIGN, "One round")::

    server: global model w_t, sampled clients S_t
    each client i in S_t:
        u_i = algorithm.client_update(w_t, data_i)   # local-stage privacy wraps training
        u_i = adversary(u_i)            if i is malicious
        u_i = privacy[update](u_i)      # clipping, client-side noise
        u_i = compressor(u_i)
        m_i = privacy[transport].encode(weight_i * u_i)
    server:
        A = privacy[transport].aggregate({m_i})  or  aggregator({u_i}) in plaintext
        A = privacy[server](A)          # central noise
        w_{t+1} = algorithm.server_update(w_t, A)

:func:`run_cell` is pure: everything it needs is in the cell. Every call into
a plugin goes through :meth:`CellRun.call`, so an exception becomes a
``failed`` record naming the plugin, component and hook.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmedbench.components import (
    Algorithm,
    ClientUpdate,
    Component,
    FederatedData,
    Message,
    ParamLayout,
    PrivacyMechanism,
    Site,
    Split,
)
from fedmedbench.errors import ConfigError, DataError, Diverged, PluginError, Skip
from fedmedbench.metrics import score
from fedmedbench.models import build_model, get_flat_params, set_flat_params
from fedmedbench.registry import Registry, get_registry
from fedmedbench.training import (
    BatchStream,
    ClientTrainer,
    RunSettings,
    make_trainer,
    predict_proba,
    to_tensors,
    train_steps,
)

SCHEMA = "fedmedbench.result/1"
VIEW_ROUNDS = (1,)  # rounds whose server view is kept for attacks (plus the last)


# --------------------------------------------------------------------------
# contexts handed to plugins
# --------------------------------------------------------------------------


@dataclass
class ServerView:
    """What an honest-but-curious server could read in one round.

    ``kind`` is ``"plaintext"`` (``updates`` holds each client's delta as
    sent), ``"aggregate"`` (secure aggregation: only ``aggregate``, the sum of
    ``len(clients)`` weight-scaled updates) or ``"ciphertext"`` (HE: nothing
    readable). ``global_params`` is the model the clients started from.
    """

    round: int
    kind: str
    clients: list[int]
    global_params: torch.Tensor
    updates: dict[int, torch.Tensor] = field(default_factory=dict)
    num_examples: dict[int, int] = field(default_factory=dict)
    aggregate: torch.Tensor | None = None


@dataclass
class RoundContext:
    """State of a running cell shared with plugins.

    Attributes: ``data`` (partitioned :class:`FederatedData`), ``settings``
    (:class:`RunSettings`), ``rounds`` planned, ``round`` (1-based, current),
    ``seed``, ``layout`` (:class:`ParamLayout`), ``num_clients``,
    ``sample_rate`` (q, the per-round client sampling rate), ``topology``,
    ``state`` (a dict algorithms may use for server state).
    """

    cell: dict[str, Any]
    data: FederatedData
    settings: RunSettings
    rounds: int
    seed: int
    layout: ParamLayout
    model_factory: Callable[[], torch.nn.Module]
    num_clients: int
    sample_rate: float
    topology: str
    clients: list[Site]
    round: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    #: clients sampled in the current round (transport protocols set up keys among them)
    participants: list[int] = field(default_factory=list)
    _run: CellRun | None = None

    def rng(self, purpose: str, *extra: int) -> np.random.Generator:
        """A generator derived from the cell seed, a purpose and extra ints
        (so that sampling, noise and masking draw independent streams)."""
        return np.random.default_rng([self.seed, _stable_int(purpose), *extra])

    def torch_generator(self, purpose: str, *extra: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.rng(purpose, *extra).integers(2**62)))

    def steps_for(self, client: int) -> int:
        """Local steps of ``client`` this round. ``centralized`` gets the budget
        of every site together (``local_steps`` × sites), so that pooled
        training sees as many examples per round as a full FedAvg round."""
        if self.topology == "centralized" and self.settings.local_steps > 0:
            return int(self.settings.local_steps) * len(self.data.sites)
        return self.settings.steps_for(len(self.clients[client].train))


@dataclass
class ClientContext:
    """A sampled client's view for :meth:`Algorithm.client_update`."""

    round_ctx: RoundContext
    client: int
    site: Site
    _run: CellRun

    @property
    def round(self) -> int:
        return self.round_ctx.round

    @property
    def num_examples(self) -> int:
        return len(self.site.train)

    def train(self, params: torch.Tensor, *, steps: int | None = None,
              extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
              grad_hook: Callable[[torch.nn.Module], None] | None = None) -> torch.Tensor:
        """Run local SGD from ``params`` on this client's training data and
        return the new parameters (local-stage privacy applies)."""
        return self._run.train_client(self, params, steps=steps, extra_loss=extra_loss,
                                      grad_hook=grad_hook)

    @property
    def holdout(self) -> Split | None:
        """Training rows held out from this client's training for the
        aggregator's :meth:`~fedmedbench.Aggregator.client_metrics` (else ``None``)."""
        return self._run.holdout.get(self.client)

    def model(self, params: torch.Tensor | None = None) -> torch.nn.Module:
        """A fresh instance of this client's architecture, loaded with ``params``."""
        m = self._run.factory_for(self.client)()
        if params is not None:
            set_flat_params(m, params)
        return m

    def update(self, delta: torch.Tensor, **extra: Any) -> ClientUpdate:
        loss = self._run.last_loss.get(self.client)
        return ClientUpdate(client=self.client, delta=delta, num_examples=self.num_examples,
                            metrics={} if loss is None else {"loss": loss}, extra=extra)


@dataclass
class AttackContext:
    """What an attack may use, by threat model.

    - outside attacker: ``final_params`` through ``model_factory``;
    - server: ``server_views`` (round → :class:`ServerView`), whose ``kind``
      says what was readable;
    - ground truth for scoring: ``data`` (members are a client's training
      rows, non-members its test rows).

    ``train_shadow(split, seed)`` trains a fresh model with the cell's own
    training recipe (for shadow-model attacks).
    """

    cell: dict[str, Any]
    data: FederatedData
    model_factory: Callable[[], torch.nn.Module]
    final_params: torch.Tensor
    server_views: dict[int, ServerView]
    privacy: dict[str, Any]
    settings: RunSettings
    rounds: int
    seed: int
    topology: str
    train_shadow: Callable[[Split, int], torch.Tensor]
    mechanisms: list[str] = field(default_factory=list)
    #: where attacks may write files for the report (PNGs); ``None``: write nothing
    artifacts_dir: str | None = None
    #: ``client_batches(client, steps)``: ground truth for scoring only, the
    #: minibatches (X, y) that client trained on in round 1; ``None`` when they
    #: cannot be replayed (a local-stage mechanism samples its own batches)
    client_batches: Callable[[int, int], list[tuple[np.ndarray, np.ndarray]] | None] | None = None

    def model(self, params: torch.Tensor | None = None) -> torch.nn.Module:
        m = self.model_factory()
        set_flat_params(m, self.final_params if params is None else params)
        m.eval()
        return m


# --------------------------------------------------------------------------
# the cell
# --------------------------------------------------------------------------


class CellRun:
    """One cell's execution. Use :func:`run_cell`."""

    def __init__(self, cell: dict[str, Any], registry: Registry) -> None:
        self.cell = cell
        self.cfg = cell["config"]
        self.reg = registry
        self.last_loss: dict[int, float] = {}
        self.trainers: dict[int, ClientTrainer] = {}
        self.cost = {"bytes_up": 0, "bytes_down": 0, "train_s": 0.0, "privacy_s": 0.0}
        self.history: list[dict[str, Any]] = []

    # -- plugin calls --------------------------------------------------------

    @contextlib.contextmanager
    def calling(self, comp: Component, hook: str) -> Iterator[None]:
        try:
            yield
        except (PluginError, Diverged, Skip, ConfigError, DataError):
            raise
        except Exception as exc:
            raise PluginError(
                f"{type(exc).__name__}: {exc}", plugin=comp.plugin or type(comp).__module__,
                component=comp.name, hook=hook, exc_type=type(exc).__name__,
            ) from exc

    def call(self, comp: Component, hook: str, *args: Any, **kwargs: Any) -> Any:
        with self.calling(comp, hook):
            return getattr(comp, hook)(*args, **kwargs)

    # -- build ---------------------------------------------------------------

    def build(self) -> None:
        cfg, reg = self.cfg, self.reg
        self.seed = int(cfg["seed"])
        _seed_everything(self.seed)
        self.dataset = reg.build("dataset", cfg["dataset"])
        self.partitioner = reg.build("partitioner", cfg["partitioner"])
        self.algorithm: Algorithm = reg.build("algorithm", cfg["algorithm"])  # type: ignore[assignment]
        self.aggregator = reg.build("aggregator", cfg["aggregator"])
        self.privacy: list[PrivacyMechanism] = [reg.build("privacy", p) for p in cfg["privacy"]]  # type: ignore[misc]
        self.compressor = reg.build("compressor", cfg["compressor"]) if cfg.get("compressor") else None
        self.adversary = reg.build("adversary", cfg["adversary"]) if cfg.get("adversary") else None
        self.attacks = [reg.build("attack", a) for a in cfg.get("attacks", [])]
        self.settings = RunSettings(**cfg["run"])
        self.rounds = int(cfg["rounds"])
        self.transport = [m for m in self.privacy if "transport" in m.stages]
        self.topology = self.algorithm.topology

    def validate(self) -> None:
        """Reject combinations that cannot work together (raises :class:`Skip`)."""
        info = cell_info(self.cfg, self.reg)
        reason = combination_problem(info)
        if reason:
            raise Skip(reason)
        for comp in [self.algorithm, *self.privacy]:
            r = self.call(comp, "validate", info)
            if r:
                raise Skip(f"{comp.name}: {r}")

    def prepare(self) -> None:
        raw = self.call(self.dataset, "load", seed=self.seed)
        data: FederatedData = self.call(self.partitioner, "partition", raw, seed=self.seed)
        if self.algorithm.needs_public and data.public is None:
            raise Skip(f"{self.algorithm.name} needs a public split and dataset "
                       f"{self.dataset.name} has none")
        if self.settings.pretrain_steps > 0 and data.public is None:
            raise Skip(f"pretrain_steps={self.settings.pretrain_steps} pretrains on the public "
                       f"split and dataset {self.dataset.name} has none (give the partitioner "
                       f"a public_fraction)")
        self.data = data
        task = data.task
        torch.manual_seed(self.seed)
        proto = build_model(task.model, task.input_shape, task.num_classes, **task.model_kwargs)
        self.init_state = {k: v.clone() for k, v in proto.state_dict().items()}

        def factory() -> torch.nn.Module:
            m = build_model(task.model, task.input_shape, task.num_classes, **task.model_kwargs)
            m.load_state_dict(self.init_state)
            return m

        self.model_factory = factory
        self.eval_model = factory()
        layout = ParamLayout.of(proto)
        if self.topology == "centralized":
            clients = [Site("pooled", data.pooled_train(), data.pooled_test())]
        else:
            clients = list(data.sites)
        n = len(clients)
        cpr = self.settings.clients_per_round
        k = n if self.topology != "federated" else (
            max(1, min(n, cpr)) if isinstance(cpr, int) else max(1, int(math.ceil(cpr * n))))
        self.k = k
        self.holdout: dict[int, Split] = {}
        self.client_factories: dict[int, Callable[[], torch.nn.Module]] = {}
        self.ctx = RoundContext(
            cell=self.cell, data=data, settings=self.settings, rounds=self.rounds,
            seed=self.seed, layout=layout, model_factory=factory, num_clients=n,
            sample_rate=k / n, topology=self.topology, clients=clients, _run=self,
        )
        frac = float(self.call(self.aggregator, "holdout_fraction"))
        if frac > 0 and self.topology == "federated":
            for i, site in enumerate(clients):
                perm = self.ctx.rng("holdout", i).permutation(len(site.train))
                kh = min(len(perm) - 1, int(round(frac * len(perm))))
                if kh >= 1:
                    self.holdout[i] = site.train.subset(np.sort(perm[:kh]))
                    clients[i] = Site(site.name, site.train.subset(np.sort(perm[kh:])),
                                      site.test, site.quality)
        if self.topology in ("local", "personalized"):
            for i in range(n):
                spec = self.call(self.algorithm, "client_model", self.ctx, i)
                if spec is not None:
                    self.client_factories[i] = self._arch_factory(dict(spec))
        # adversaries poison their data once
        self.malicious: set[int] = set()
        if self.adversary is not None and self.topology == "federated":
            frac = float(getattr(self.adversary, "fraction", 0.0))
            m = int(round(frac * n))
            rng = self.ctx.rng("adversary")
            self.malicious = set(rng.choice(n, size=m, replace=False).tolist()) if m else set()
            for i in sorted(self.malicious):
                site = clients[i]
                poisoned = self.call(self.adversary, "corrupt_data", site.train,
                                     num_classes=task.num_classes, rng=rng)
                clients[i] = Site(site.name, poisoned, site.test, site.quality)
        self.call(self.algorithm, "setup", self.ctx)
        for m in self.privacy:
            t0 = time.perf_counter()
            self.call(m, "setup", self.ctx)
            self.cost["privacy_s"] += time.perf_counter() - t0

    def _arch_factory(self, spec: dict[str, Any]) -> Callable[[], torch.nn.Module]:
        """A factory for architecture ``spec``; one seeded initialisation per spec."""
        task = self.data.task
        name = spec.pop("model")
        torch.manual_seed(self.seed)
        init = build_model(name, task.input_shape, task.num_classes, **spec).state_dict()

        def factory() -> torch.nn.Module:
            m = build_model(name, task.input_shape, task.num_classes, **spec)
            m.load_state_dict(init)
            return m

        return factory

    def factory_for(self, client: int) -> Callable[[], torch.nn.Module]:
        return self.client_factories.get(client, self.model_factory)

    def pretrain(self, factory: Callable[[], torch.nn.Module], params: torch.Tensor
                 ) -> torch.Tensor:
        """Transfer learning: supervised steps on the public split (``pretrain_steps``)."""
        assert self.data.public is not None
        tr = make_trainer(factory(), self.data.public, self.settings,
                          seed=int(self.ctx.rng("pretrain").integers(2**62)), wrap=None)
        t0 = time.perf_counter()
        params, loss = train_steps(tr, params, int(self.settings.pretrain_steps))
        self.cost["train_s"] += time.perf_counter() - t0
        self.pretrain_loss = loss
        return params

    # -- training ------------------------------------------------------------

    def train_client(self, cctx: ClientContext, params: torch.Tensor, *, steps: int | None,
                     extra_loss: Any, grad_hook: Any) -> torch.Tensor:
        i = cctx.client
        if i not in self.trainers:
            local = [m for m in self.privacy if "local" in m.stages]
            wrap = None
            if local:
                def wrap(model: Any, opt: Any, loader: Any) -> tuple:
                    for m in local:
                        t0 = time.perf_counter()
                        model, opt, loader = self.call(m, "make_private", cctx, model, opt, loader)
                        self.cost["privacy_s"] += time.perf_counter() - t0
                    return model, opt, loader
            self.trainers[i] = make_trainer(
                self.factory_for(i)(), cctx.site.train, self.settings,
                seed=self.batch_seed(i), wrap=wrap)
        steps = self.ctx.steps_for(i) if steps is None else steps
        t0 = time.perf_counter()
        new, loss = train_steps(self.trainers[i], params, steps, extra_loss=extra_loss,
                                grad_hook=grad_hook)
        self.cost["train_s"] += time.perf_counter() - t0
        self.last_loss[i] = loss
        return new

    def sample(self, rnd: int) -> list[int]:
        n, k = self.ctx.num_clients, self.k
        if k == n:
            return list(range(n))
        rng = self.ctx.rng("sampling", rnd)
        if self.settings.client_sampling == "poisson":
            return [i for i in range(n) if rng.random() < k / n]
        return sorted(rng.choice(n, size=k, replace=False).tolist())

    def run_round(self, rnd: int, params: dict[int, torch.Tensor]) -> dict[str, Any]:
        ctx = self.ctx
        ctx.round = rnd
        if self.topology == "local":
            losses = []
            for i in range(ctx.num_clients):
                cctx = ClientContext(ctx, i, ctx.clients[i], self)
                upd = self.call(self.algorithm, "client_update", cctx, params[i])
                self._check_update(upd)
                upd = self._privacy_update(upd)
                params[i] = self.call(self.algorithm, "server_update", ctx, params[i],
                                      upd.delta, [upd])
                losses.append(upd.metrics.get("loss", float("nan")))
            return {"loss": float(np.nanmean(losses)), "clients": list(range(ctx.num_clients))}
        if self.topology == "personalized":
            return self._personalized_round(params)

        w = params[0]
        sampled = self.sample(rnd)
        ctx.participants = list(sampled)
        if not sampled:
            return {"loss": float("nan"), "clients": []}
        nbytes_model = w.numel() * 4
        if self.topology == "federated":
            self.cost["bytes_down"] += int(self.call(self.algorithm, "bytes_down", ctx,
                                                     nbytes_model)) * len(sampled)
        updates: list[ClientUpdate] = []
        for i in sampled:
            cctx = ClientContext(ctx, i, ctx.clients[i], self)
            upd = self.call(self.algorithm, "client_update", cctx, w)
            self._check_update(upd)
            upd.metrics.update(self.call(self.aggregator, "client_metrics", cctx, w, upd))
            if i in self.malicious and self.adversary is not None:
                upd = self.call(self.adversary, "corrupt_update", ctx, upd,
                                ctx.rng("adversary-update", rnd, i))
            upd = self._privacy_update(upd)
            if self.compressor is not None:
                upd, nbytes = self.call(self.compressor, "compress", ctx, upd)
                upd.metrics["bytes"] = nbytes
            updates.append(upd)

        keep_view = rnd in VIEW_ROUNDS or rnd == self.rounds
        if self.transport:
            mech = self.transport[0]
            weights = self.call(self.aggregator, "weights", updates)
            t0 = time.perf_counter()
            msgs: list[Message] = []
            for u, wt in zip(updates, weights):
                msgs.append(self.call(mech, "encode", ctx, u.client, u.delta * float(wt)))
            agg = self.call(mech, "aggregate", ctx, msgs)
            self.cost["privacy_s"] += time.perf_counter() - t0
            self.cost["bytes_up"] += sum(m.nbytes for m in msgs)
            self.cost["bytes_down"] += self.call(mech, "bytes_down", ctx) * len(sampled)
            if keep_view:
                self.views[rnd] = ServerView(
                    rnd, mech.server_view, [u.client for u in updates], w.clone(),
                    num_examples={u.client: u.num_examples for u in updates},
                    aggregate=agg.clone() if mech.server_view == "aggregate" else None)
            # the deltas themselves never reach the server
            meta = [ClientUpdate(u.client, torch.empty(0), u.num_examples, u.metrics, u.extra)
                    for u in updates]
        else:
            weights = (self.call(self.aggregator, "weights", updates)
                       if self.aggregator.linear else None)
            agg = self.call(self.aggregator, "aggregate", updates)
            if self.topology == "federated":  # pooled training sends nothing
                self.cost["bytes_up"] += sum(int(u.metrics.get("bytes", u.delta.numel() * 4))
                                             for u in updates)
            if keep_view:
                self.views[rnd] = ServerView(
                    rnd, "plaintext", [u.client for u in updates], w.clone(),
                    updates={u.client: u.delta.clone() for u in updates},
                    num_examples={u.client: u.num_examples for u in updates})
            meta = updates
        for m in self.privacy:
            if "server" in m.stages:
                t0 = time.perf_counter()
                agg = self.call(m, "process_aggregate", ctx, agg, len(updates))
                self.cost["privacy_s"] += time.perf_counter() - t0
        if not torch.isfinite(agg).all():
            raise Diverged(f"round {rnd}: the aggregated update is not finite")
        params[0] = self.call(self.algorithm, "server_update", ctx, w, agg, meta)
        losses = [u.metrics.get("loss", float("nan")) for u in updates]
        out = {"loss": float(np.nanmean(losses)) if losses else float("nan"),
               "clients": list(sampled)}
        if weights is not None:  # the aggregator's weights, recorded in the history
            out["weights"] = {ctx.clients[u.client].name: round(float(wt), 6)
                              for u, wt in zip(updates, weights)}
        return out

    def _personalized_round(self, params: dict[int, torch.Tensor]) -> dict[str, Any]:
        """Every client trains its own model; the server combines what they send
        (``extra``) and each client's next model comes from ``server_update``."""
        ctx = self.ctx
        clients = list(range(ctx.num_clients))
        self.cost["bytes_down"] += sum(int(self.call(self.algorithm, "bytes_down", ctx, 0))
                                       for _ in clients)
        updates = []
        for i in clients:
            cctx = ClientContext(ctx, i, ctx.clients[i], self)
            upd = self.call(self.algorithm, "client_update", cctx, params[i])
            self._check_update(upd)
            updates.append(self._privacy_update(upd))
        # what crosses the network is the algorithm's to say (FedMD: soft labels)
        self.cost["bytes_up"] += sum(int(u.metrics.get("bytes", u.delta.numel() * 4))
                                     for u in updates)
        for u in updates:
            params[u.client] = self.call(self.algorithm, "server_update", ctx,
                                         params[u.client], u.delta, updates)
        losses = [u.metrics.get("loss", float("nan")) for u in updates]
        return {"loss": float(np.nanmean(losses)), "clients": clients}

    def _privacy_update(self, upd: ClientUpdate) -> ClientUpdate:
        for m in self.privacy:
            if "update" in m.stages:
                t0 = time.perf_counter()
                upd = self.call(m, "process_update", self.ctx, upd)
                self.cost["privacy_s"] += time.perf_counter() - t0
        return upd

    def _check_update(self, upd: ClientUpdate) -> None:
        if not isinstance(upd, ClientUpdate):
            raise PluginError(f"client_update returned {type(upd).__name__}, not a "
                              f"fedmedbench.ClientUpdate (use ctx.update(delta))",
                              plugin=self.algorithm.plugin, component=self.algorithm.name,
                              hook="client_update", exc_type="TypeError")
        if self.topology in ("federated", "centralized") and (
                upd.delta.numel() != self.ctx.layout.numel):
            raise PluginError(f"client {upd.client} sent an update of {upd.delta.numel()} "
                              f"values; the model has {self.ctx.layout.numel} parameters",
                              plugin=self.algorithm.plugin, component=self.algorithm.name,
                              hook="client_update", exc_type="ValueError")
        if not torch.isfinite(upd.delta).all():
            raise Diverged(f"client {upd.client} sent a non-finite update")
        # a NaN loss means no loss was measured (every Poisson batch of the round
        # was empty, DP-SGD); local training raises Diverged on a measured one
        if math.isinf(upd.metrics.get("loss", 0.0)):
            raise Diverged(f"client {upd.client} training loss is {upd.metrics['loss']}")

    # -- evaluation ----------------------------------------------------------

    def evaluate(self, params: dict[int, torch.Tensor]) -> dict[str, Any]:
        data, metric = self.data, self.data.task.metric
        per_site: dict[str, float] = {}
        if self.topology in ("local", "personalized"):
            pooled_scores = []
            pooled = data.pooled_test()
            for i, site in enumerate(data.sites):
                model = self.eval_model if i not in self.client_factories else \
                    self.client_factories[i]()
                set_flat_params(model, params[i])
                per_site[site.name] = _score(metric, model, site.test)
                pooled_scores.append(_score(metric, model, pooled))
            glob = float(np.nanmean(pooled_scores))
        else:
            set_flat_params(self.eval_model, params[0])
            for site in data.sites:
                per_site[site.name] = _score(metric, self.eval_model, site.test)
            glob = _score(metric, self.eval_model, data.pooled_test())
        finite = [v for v in per_site.values() if not math.isnan(v)]
        return {"metric": metric, "global": glob, "per_site": per_site,
                "worst_site": min(finite) if finite else float("nan")}

    def privacy_accounting(self) -> dict[str, Any]:
        mechanisms = {m.name: self.call(m, "accounting") for m in self.privacy}
        out: dict[str, Any] = {"level": _privacy_level(self.privacy, mechanisms),
                               "mechanisms": mechanisms}
        for acc in mechanisms.values():
            if acc.get("epsilon") is not None:
                for k in ("epsilon", "delta", "accountant", "noise_multiplier", "unit"):
                    if k in acc:
                        out.setdefault(k, acc[k])
        out.setdefault("epsilon", None)
        out.setdefault("delta", None)
        return out

    # -- main ----------------------------------------------------------------

    def run(self, *, progress: Callable[[int], None] | None = None,
            hooks: Any = None) -> dict[str, Any]:
        self.views: dict[int, ServerView] = {}
        w0 = get_flat_params(self.model_factory())
        if self.settings.pretrain_steps > 0:
            w0 = self.pretrain(self.model_factory, w0)
        n_models = self.ctx.num_clients if self.topology in ("local", "personalized") else 1
        params = {i: w0.clone() for i in range(n_models)}
        for i, f in self.client_factories.items():  # clients with their own architecture
            params[i] = get_flat_params(f())
            if self.settings.pretrain_steps > 0:
                params[i] = self.pretrain(f, params[i])
        every = max(1, int(self.settings.eval_every))
        utility = None
        for rnd in range(1, self.rounds + 1):
            info = self.run_round(rnd, params)
            for i, p in params.items():
                if not torch.isfinite(p).all():
                    raise Diverged(f"round {rnd}: model {i} has non-finite parameters")
            entry: dict[str, Any] = {"round": rnd, "loss": info["loss"],
                                     "clients": len(info["clients"])}
            if "weights" in info:
                entry["weights"] = info["weights"]
            if rnd % every == 0 or rnd == self.rounds:
                utility = self.evaluate(params)
                entry["utility"] = utility["global"]
            eps = self.privacy_accounting().get("epsilon") if self.privacy else None
            if eps is not None:
                entry["epsilon"] = eps
            self.history.append(entry)
            if hooks is not None:
                hooks.on_round_end(cell=self.cell, round=rnd, metrics=entry)
            if progress:
                progress(rnd)
        self.final_params = params
        assert utility is not None
        return utility

    def batch_seed(self, client: int) -> int:
        """The seed of ``client``'s minibatch stream (training and its replay)."""
        return int(self.ctx.rng("batches", client).integers(2**62))

    def round1_batches(self, client: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Replay the first ``steps`` minibatches of ``client``'s round-1 stream
        (the seed ``train_client`` gives its trainer); ``None`` under a
        local-stage mechanism, whose loader samples its own batches."""
        if any("local" in m.stages for m in self.privacy) or not 0 <= client < len(self.ctx.clients):
            return None
        X, y = to_tensors(self.ctx.clients[client].train)
        stream = BatchStream(X, y, self.settings.batch_size, self.batch_seed(client))
        return [tuple(t.numpy() for t in stream.next()) for _ in range(steps)]  # type: ignore[misc]

    def run_attacks(self) -> dict[str, Any]:
        if not self.attacks:
            return {}
        privacy = self.privacy_accounting()
        final = self.final_params[0]

        def train_shadow(split: Split, seed: int) -> torch.Tensor:
            _seed_everything(seed)
            tr = make_trainer(self.model_factory(), split, self.settings, seed=seed, wrap=None)
            p = get_flat_params(tr.model)
            steps = self.settings.steps_for(len(split)) * self.rounds
            p, _ = train_steps(tr, p, steps)
            return p

        actx = AttackContext(
            cell=self.cell, data=self.data, model_factory=self.factory_for(0),
            final_params=final, server_views=self.views, privacy=privacy,
            settings=self.settings, rounds=self.rounds, seed=self.seed,
            topology=self.topology, train_shadow=train_shadow,
            mechanisms=[m.name for m in self.privacy],
            artifacts_dir=self.cell.get("artifacts_dir"), client_batches=self.round1_batches,
        )
        out = {}
        for a in self.attacks:
            t0 = time.perf_counter()
            res = self.call(a, "evaluate", actx)
            res = dict(res)
            res.setdefault("seconds", round(time.perf_counter() - t0, 3))
            out[a.name] = res
        return out


def _score(metric: str, model: torch.nn.Module, split: Split) -> float:
    if len(split) == 0:
        return float("nan")
    return score(metric, split.y, predict_proba(model, split.X))


def _privacy_level(mechs: list[PrivacyMechanism], acc: dict[str, dict]) -> str:
    dp = any(a.get("epsilon") is not None for a in acc.values())
    crypto = any("transport" in m.stages for m in mechs)
    return {(False, False): "none", (True, False): "dp", (False, True): "crypto",
            (True, True): "dp+crypto"}[(dp, crypto)]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.set_num_threads(1)


def _stable_int(s: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")


# --------------------------------------------------------------------------
# validation shared by the matrix (before training) and the engine
# --------------------------------------------------------------------------


def cell_info(cfg: dict[str, Any], reg: Registry) -> dict[str, Any]:
    """What components see in ``validate``: the resolved config plus facts
    about the other components (topology, linearity, transport)."""
    alg = reg.get("algorithm", cfg["algorithm"]["name"]).cls
    agg = reg.get("aggregator", cfg["aggregator"]["name"]).cls
    # instances, not classes: a mechanism's view may depend on its parameters
    # (he-ckks encrypting only some layers shows the server the rest)
    privs = [reg.build("privacy", p) for p in cfg["privacy"]]
    return {
        **cfg,
        "topology": alg.topology,
        "aggregator_linear": agg.linear,
        "needs_individual_updates": alg.needs_individual_updates,
        "privacy_stages": [sorted(p.stages) for p in privs],
        "transport_view": next((p.server_view for p in privs if "transport" in p.stages), None),
    }


def combination_problem(info: dict[str, Any]) -> str | None:
    """The engine's own rules for stacks that cannot work; ``None`` if fine."""
    transports = [p["name"] for p, st in zip(info["privacy"], info["privacy_stages"])
                  if "transport" in st]
    if len(transports) > 1:
        return (f"two transport mechanisms {transports}: an update can be encoded by only one "
                f"(stack an update-stage mechanism such as dp-fedavg with one transport)")
    if transports and info["topology"] != "federated":
        return (f"{transports[0]} protects aggregation, and {info['algorithm']['name']} "
                f"({info['topology']}) aggregates nothing")
    if transports and not info["aggregator_linear"]:
        return (f"aggregator {info['aggregator']['name']} is non-linear and needs plaintext "
                f"updates, but {transports[0]} shows the server only a sum")
    if transports and info["needs_individual_updates"]:
        return (f"{info['algorithm']['name']} needs every client's model at the server, but "
                f"{transports[0]} shows the server only a sum")
    if info["transport_view"] == "ciphertext":
        servers = [p["name"] for p, st in zip(info["privacy"], info["privacy_stages"])
                   if "server" in st]
        if servers:
            return (f"{servers[0]} adds noise at the server, but under {transports[0]} the "
                    f"server never sees the aggregate in plaintext")
    return None


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def run_cell(cell: dict[str, Any], *, registry: Registry | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run one cell and return its result record (never raises for a plugin
    error, a skip or divergence: those are statuses)."""
    reg = registry or get_registry()
    hooks = reg.hooks()
    t_start = time.perf_counter()
    run = CellRun(cell, reg)
    record: dict[str, Any] = {
        "schema": SCHEMA, "cell_id": cell["cell_id"], "status": "ok", "error": None,
        "labels": cell.get("labels", {}), "matrix": cell.get("matrix"),
        "config": cell["config"], "metrics": {}, "history": run.history,
        "provenance": provenance(reg),
    }
    torch_threads = torch.get_num_threads()
    try:
        run.build()
        record["topology"] = run.topology
        hooks.on_cell_start(cell=cell)
        run.validate()
        run.prepare()
        utility = run.run(progress=progress, hooks=hooks)
        record["metrics"] = {"utility": utility, "privacy": run.privacy_accounting()}
        record["metrics"]["attacks"] = run.run_attacks()
    except Skip as exc:
        record["status"] = "skipped"
        record["error"] = {"type": "Skip", "message": str(exc), "plugin": None, "hook": None}
    except Diverged as exc:
        record["status"] = "diverged"
        record["error"] = {"type": "Diverged", "message": str(exc), "plugin": None, "hook": None}
    except PluginError as exc:
        record["status"] = "failed"
        record["error"] = {"type": exc.exc_type, "message": str(exc), "plugin": exc.plugin,
                           "component": exc.component, "hook": exc.hook,
                           "traceback": _tb(exc)}
    except Exception as exc:  # a harness or config problem inside the cell: recorded, not lost
        record["status"] = "failed"
        record["error"] = {"type": type(exc).__name__, "message": str(exc), "plugin": None,
                           "hook": None, "traceback": _tb(exc)}
    finally:
        torch.set_num_threads(torch_threads)
    if record["status"] != "ok" and hasattr(run, "ctx"):
        with contextlib.suppress(Exception):
            record["metrics"].setdefault("privacy", run.privacy_accounting())
    record["metrics"]["cost"] = {**{k: (round(v, 4) if isinstance(v, float) else v)
                                    for k, v in run.cost.items()},
                                 "wall_s": round(time.perf_counter() - t_start, 4)}
    try:
        hooks.on_cell_end(cell=cell, record=record)
    except Exception as exc:  # an observer must not lose the record: warn and go on
        import warnings

        warnings.warn(f"an on_cell_end observer raised {type(exc).__name__}: {exc}; the "
                      f"record of cell {cell['cell_id']} is kept", RuntimeWarning, stacklevel=2)
    return record


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)[-6:])[-4000:]


_PROVENANCE: dict[str, Any] | None = None


def provenance(reg: Registry) -> dict[str, Any]:
    """Versions of fedmedbench, of the plugins of ``reg`` with their
    distributions, python, torch and platform; the git commit where known."""
    global _PROVENANCE
    if _PROVENANCE is None:  # the parts that do not depend on the registry
        from importlib import metadata

        try:
            version = metadata.version("fedmedbench")
        except metadata.PackageNotFoundError:
            version = "unknown"
        _PROVENANCE = {
            "fedmedbench": version, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "git_commit": _git_commit(),
        }
    plugins = {i.plugin: {"distribution": i.distribution, "version": i.version}
               for i in reg.all()}
    return {**_PROVENANCE, "plugins": plugins}


def _git_commit() -> str | None:
    """The source checkout's HEAD; for an installed wheel (tox, CI), the commit
    named by ``FEDMEDBENCH_GIT_COMMIT`` or GitHub's ``GITHUB_SHA``."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return os.environ.get("FEDMEDBENCH_GIT_COMMIT") or os.environ.get("GITHUB_SHA") or None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
