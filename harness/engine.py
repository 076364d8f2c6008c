"""The engine: :func:`run_cell` turns one resolved cell into a result record.

A cell runs in four parts, each with one job:

- :class:`Components` — the built components of the cell (and the privacy
  stack sorted by stage);
- :class:`~fedmedbench.federation.Federation` — the training parties, held-out
  rows, malicious clients, client sampling;
- a backend (:mod:`fedmedbench.backends`: ``loop`` or ``vectorized``) — local
  training, the service behind :class:`~fedmedbench.context.ClientContext`;
- :class:`~fedmedbench.meters.Stages` and its observers — time, bytes and the
  server's view.

The round itself belongs to the algorithm's protocol
(:mod:`fedmedbench.protocols`). :func:`run_cell` is pure: everything it needs
is in the cell. Every call into a plugin is attributed: an exception becomes
a ``failed`` record naming the plugin, component and hook, and a value that
is not JSON is converted (numpy and torch scalars) or refused with the hook
named.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmedbench.accounting import Accounting, headline
from fedmedbench.backends import BACKENDS, LoopBackend, choose_backend
from fedmedbench.components import (
    Adversary,
    Aggregator,
    Algorithm,
    Attack,
    Component,
    Compressor,
    Dataset,
    FederatedData,
    LocalStage,
    Model,
    ParamLayout,
    Partitioner,
    PrivacyMechanism,
    ServerStage,
    Split,
    TransportStage,
    Updates,
    UpdateStage,
)
from fedmedbench.context import AttackContext, Canaries, CellContext
from fedmedbench.errors import ConfigError, Diverged, PluginError, SettingWarning, Skip
from fedmedbench.facts import CellFacts, combination_problem, facts_of
from fedmedbench.federation import Federation, cell_rng, clients_per_round
from fedmedbench.meters import ByteMeter, Clock, Stages, ViewRecorder, calling, contained_message
from fedmedbench.protocols import RoundProtocol, protocol_for
from fedmedbench.registry import Registry, get_registry
from fedmedbench.schema import SCHEMA
from fedmedbench.training import RunSettings

__all__ = ["SCHEMA", "Components", "CellRun", "run_cell", "provenance", "attack_key", "to_json"]


# --------------------------------------------------------------------------
# the built components
# --------------------------------------------------------------------------


@dataclass
class Components:
    """The components of one cell, built from its resolved config."""

    dataset: Dataset
    partitioner: Partitioner
    model: Model | None
    algorithm: Algorithm
    aggregator: Aggregator
    privacy: list[PrivacyMechanism]
    compressor: Compressor | None
    adversary: Adversary | None
    attacks: list[tuple[str, Attack]] = field(default_factory=list)

    @classmethod
    def build(cls, cfg: dict[str, Any], reg: Registry) -> Components:
        def opt(family: str, key: str) -> Any:
            return reg.build(family, cfg[key]) if cfg.get(key) else None

        attacks = [reg.build("attack", a) for a in cfg.get("attacks", [])]
        return cls(
            dataset=reg.build("dataset", cfg["dataset"]),  # type: ignore[arg-type]
            partitioner=reg.build("partitioner", cfg["partitioner"]),  # type: ignore[arg-type]
            model=opt("model", "model"),
            algorithm=reg.build("algorithm", cfg["algorithm"]),  # type: ignore[arg-type]
            aggregator=reg.build("aggregator", cfg["aggregator"]),  # type: ignore[arg-type]
            privacy=[reg.build("privacy", p) for p in cfg["privacy"]],  # type: ignore[misc]
            compressor=opt("compressor", "compressor"), adversary=opt("adversary", "adversary"),
            attacks=[(attack_key(a, attacks), a) for a in attacks],  # type: ignore[misc]
        )

    def of_stage(self, iface: type) -> list[Any]:
        return [m for m in self.privacy if isinstance(m, iface)]

    @property
    def local_stage(self) -> LocalStage | None:
        ms = self.of_stage(LocalStage)
        return ms[0] if ms else None

    @property
    def update_stage(self) -> list[UpdateStage]:
        return self.of_stage(UpdateStage)

    @property
    def transport(self) -> TransportStage | None:
        ms = self.of_stage(TransportStage)
        return ms[0] if ms else None

    @property
    def server_stage(self) -> list[ServerStage]:
        return self.of_stage(ServerStage)

    def lifecycle(self) -> list[Component]:
        """Every component with ``setup``/``begin_round`` hooks, in round order."""
        out: list[Any] = [self.model, self.algorithm, self.aggregator, *self.privacy,
                          self.compressor, self.adversary]
        return [c for c in out if c is not None]


def attack_key(a: Attack, all_attacks: list[Attack]) -> str:
    """An attack's key in the record: its name; when the cell lists that attack
    more than once, its full label — the name plus the parameters that differ
    from their defaults (``mia-loss(target=client)``) — so both results stay."""
    if sum(1 for b in all_attacks if b.name == a.name) == 1:
        return a.name
    spec = type(a).param_spec()
    diff = {k: v for k, v in a.params().items()
            if k in spec and spec[k].default is not spec[k].empty
            and _jsonish(spec[k].default) != v}
    if not diff:
        return a.name
    return f"{a.name}({','.join(f'{k}={v}' for k, v in sorted(diff.items()))})"


def _jsonish(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# --------------------------------------------------------------------------
# one cell
# --------------------------------------------------------------------------


class CellRun:
    """One cell: build → validate → prepare → run → attacks (use :func:`run_cell`).

    After :meth:`run`, ``protocol.params`` holds the final models,
    ``views`` the server's views, ``history`` the rounds.
    """

    def __init__(self, cell: dict[str, Any], registry: Registry) -> None:
        self.cell = cell
        self.cfg = cell["config"]
        self.reg = registry
        self.history: list[dict[str, Any]] = []
        self.components = Components.build(self.cfg, registry)
        self.settings = RunSettings(**self.cfg["run"])
        self.rounds = int(self.cfg["rounds"])
        self.seed = int(self.cfg["seed"])
        c = self.components
        self.model_component = c.model
        self.facts: CellFacts = facts_of(
            dataset=c.dataset.name, model=c.model, algorithm=c.algorithm,
            aggregator=c.aggregator, privacy=c.privacy, compressor=c.compressor,
            adversary=c.adversary, run=self.settings, rounds=self.rounds)
        self.protocol_cls = protocol_for(c.algorithm.protocol, algorithm=c.algorithm.name,
                                         plugin=c.algorithm.plugin)
        self.sum_contributions = any(m.aggregate_as_sum for m in c.privacy)
        self.clock = Clock()
        self.bytes = ByteMeter(c.algorithm.sends)
        self.client_factories: dict[int, Callable[[], Any]] = {}
        self.backend_name = "loop"
        self.backend_reason = ""
        self.utility: dict[str, Any] = {}
        self.canaries: Canaries | None = None
        self.canary_attack: str | None = None

    # -- what tests and notebooks read after a run --------------------------------

    @property
    def final_params(self) -> dict[int, Any]:
        """The models after the last round (0: the global model; per site under
        the isolated and personalized protocols)."""
        return self.protocol.params

    @property
    def views(self) -> dict[int, Any]:
        """The server's :class:`~fedmedbench.ServerView` by round."""
        return self.view_recorder.views

    @property
    def malicious(self) -> set[int]:
        return self.federation.malicious

    @property
    def holdout(self) -> dict[int, Split]:
        return self.federation.holdout

    # -- validate --------------------------------------------------------------

    def validate(self) -> None:
        """Reject combinations that cannot work together (raises :class:`Skip`)."""
        reason = combination_problem(self.facts)
        if reason:
            raise Skip(reason)
        for comp in [self.components.dataset, self.components.partitioner,
                     *self.components.lifecycle()]:
            with calling(comp, "validate"):
                r = comp.validate(self.facts)
            if r:
                raise Skip(f"{comp.name}: {r}")

    # -- prepare ---------------------------------------------------------------

    def prepare(self) -> None:
        _seed_everything(self.seed)
        c = self.components
        with calling(c.dataset, "load"):
            raw = c.dataset.load(seed=self.seed)
        with calling(c.partitioner, "partition"):
            data: FederatedData = c.partitioner.partition(raw, seed=self.seed)
        if c.algorithm.needs_public and data.public is None:
            raise Skip(f"{c.algorithm.name} needs a public split and dataset {c.dataset.name} "
                       f"has none")
        if self.settings.pretrain_steps > 0 and data.public is None:
            raise Skip(f"pretrain_steps={self.settings.pretrain_steps} pretrains on the public "
                       f"split and dataset {c.dataset.name} has none (give the partitioner a "
                       f"public_fraction)")
        self.data = data
        task = data.task
        spec = dict(self.cfg.get("model") or {"name": task.model, **task.model_kwargs})
        if self.model_component is None:
            self.model_component = self.reg.build("model", spec, key="model")  # type: ignore[assignment]
        self.model_factory = self._factory(self.model_component)  # type: ignore[arg-type]
        proto = self.model_factory()
        self.eval_model = self.model_factory()
        protocol = self.protocol_cls
        holdout = 0.0
        with calling(c.aggregator, "holdout_fraction"):
            holdout = float(c.aggregator.holdout_fraction()) if protocol.aggregates else 0.0
        self.federation = Federation(
            data, pooled=protocol.name == "pooled", settings=self.settings, seed=self.seed,
            holdout_fraction=holdout,
            adversary=c.adversary if protocol.aggregates else None,
            call=self._call)
        self.canaries, self.canary_attack = self.pick_canaries(data)
        self.federation.insert_canaries(self.canaries, pooled=protocol.name == "pooled")
        n = self.federation.n
        self.per_round = self.federation.per_round(everyone=not protocol.samples_clients)
        # the pooled protocol does the work of a federated round at the cell's rate
        self.federation_sites_rate = (clients_per_round(len(data.sites), self.settings)
                                      / max(1, len(data.sites)))
        self.ctx = CellContext(
            cell_id=self.cell["cell_id"], seed=self.seed, rounds=self.rounds,
            settings=self.settings, data=data, clients=self.federation.clients,
            layout=ParamLayout.of(proto), protocol=protocol.name,
            sample_rate=self.per_round / n, facts=self.facts,
            model_factory=self.model_factory, _planned=c.algorithm.planned_steps)
        if protocol.name in ("isolated", "personalized"):
            for i in range(n):
                with calling(c.algorithm, "client_model"):
                    arch = c.algorithm.client_model(self.ctx, i)
                if arch is not None:
                    arch = dict(arch)
                    name = arch.pop("model")
                    comp = self.reg.build("model", {"name": name, **arch},
                                          key=f"{c.algorithm.name}.client_model")
                    self.client_factories[i] = self._factory(comp)  # type: ignore[arg-type]
        self.protocol: RoundProtocol = protocol(self)
        self.max_clients_per_call = self.per_round
        requested = str(self.cell.get("backend") or "auto")
        if requested not in BACKENDS:
            raise ConfigError(f"backend {requested!r}; choose one of {', '.join(BACKENDS)}")
        self.stages = Stages([])
        for comp in c.lifecycle():
            with calling(comp, "setup"):
                t0 = time.perf_counter()
                comp.setup(self.ctx)
                if isinstance(comp, PrivacyMechanism):
                    self.clock.seconds["privacy_s"] += time.perf_counter() - t0
        self.backend_name, self.backend_reason = choose_backend(self, requested)
        if self.backend_name == "vectorized":
            from fedmedbench.vectorized import VectorBackend

            self.backend: LoopBackend = VectorBackend(self)
        else:
            self.backend = LoopBackend(self)
        t = c.transport
        self.view_recorder = ViewRecorder(
            self.rounds, c.algorithm.sends, t.server_view if t is not None else None,
            global_params=lambda: self.protocol.global_params(),
            metric_keys=self.sent_metric_keys)
        self.stages = Stages([self.clock, self.bytes, self.view_recorder])

    def pick_canaries(self, data: FederatedData) -> tuple[Canaries | None, str | None]:
        """The canaries of the cell's auditing attack (at most one attack may
        insert them), with inclusion bits drawn here: each canary in or out
        of training independently with probability 1/2 (Steinke et al. 2023)."""
        picked = []
        for key, a in self.components.attacks:
            with calling(a, "canaries"):
                can = a.canaries(data, cell_rng(self.seed, "canary-pick"))
            if can is None:
                continue
            if not isinstance(can, Canaries):
                raise PluginError(f"canaries() returned {type(can).__name__}, not "
                                  f"fedmedbench.Canaries (or None)", plugin=a.plugin,
                                  component=a.name, hook="canaries", exc_type="TypeError")
            shape = tuple(data.task.input_shape)
            if tuple(can.X.shape[1:]) != shape or (len(can) and not (
                    0 <= int(np.min(can.site)) and int(np.max(can.site)) < len(data.sites))):
                raise PluginError(f"canaries() gave records of shape {tuple(can.X.shape[1:])} "
                                  f"for sites {sorted(set(np.asarray(can.site).tolist()))}; the "
                                  f"task's inputs are {shape} and the sites 0..{len(data.sites) - 1}",
                                  plugin=a.plugin, component=a.name, hook="canaries",
                                  exc_type="ValueError")
            picked.append((key, can))
        if not picked:
            return None, None
        if len(picked) > 1:
            raise ConfigError(f"attacks {[k for k, _ in picked]} each insert canaries into "
                              f"training; one run audits one set of canaries: list one "
                              f"auditing attack per matrix")
        key, can = picked[0]
        can = Canaries(np.asarray(can.X, dtype=np.float32), np.asarray(can.y, dtype=np.int64),
                       np.asarray(can.site, dtype=np.int64))
        can.included = cell_rng(self.seed, "canary-inclusion").random(len(can)) < 0.5
        return can, key

    def canary_summary(self) -> dict[str, Any] | None:
        """The record's ``metrics.canaries``: what the audit added to training."""
        can = self.canaries
        if can is None:
            return None
        inc = np.asarray(can.included, dtype=bool)
        return {"attack": self.canary_attack, "m": len(can), "included": int(inc.sum()),
                "per_site": {s.name: int((inc & (can.site == i)).sum())
                             for i, s in enumerate(self.data.sites)},
                "note": "the audit's canary records were trained on (each with probability "
                        "1/2): every utility and attack number of this cell is of that model"}

    def _factory(self, comp: Model) -> Callable[[], Any]:
        """A factory for ``comp``'s module; one seeded initialisation per cell."""
        import copy

        import torch

        task = self.data.task
        shape, classes = tuple(task.input_shape), int(task.num_classes)
        seed_torch(self.seed)
        with calling(comp, "build"):
            template = comp.build(shape, classes)

        def factory() -> torch.nn.Module:
            return copy.deepcopy(template)  # the seeded initialisation, never trained

        return factory

    def factory_for(self, client: int) -> Callable[[], Any]:
        return self.client_factories.get(client, self.model_factory)

    def model_for(self, client: int) -> Any:
        return self.factory_for(client)() if client in self.client_factories else self.eval_model

    def _call(self, comp: Component, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
        if hook == "corrupt_data":
            split, num_classes, rng = args
            with calling(comp, hook):
                return fn(split, num_classes=num_classes, rng=rng)
        with calling(comp, hook):
            return fn(*args)

    def maybe_pretrain(self, factory: Callable[[], Any], params: Any) -> Any:
        """Transfer learning: supervised steps on the public split (``pretrain_steps``)."""
        if self.settings.pretrain_steps <= 0:
            return params
        from fedmedbench.models import set_flat_params
        from fedmedbench.training import SGDTrainer

        assert self.data.public is not None
        model = factory()
        set_flat_params(model, params)
        tr = SGDTrainer(model, self.data.public, self.settings,
                        seed=int(cell_rng(self.seed, "pretrain").integers(2**62)))
        t0 = time.perf_counter()
        new, loss = tr.train(params, int(self.settings.pretrain_steps))
        self.clock.seconds["train_s"] += time.perf_counter() - t0
        self.pretrain_loss = loss
        return new

    # -- what clients send in the clear -------------------------------------------

    @property
    def dp(self) -> bool:
        return bool(self.facts.dp)

    def sent_metric_keys(self) -> set[str]:
        """Client-side numbers that reach the server in the clear: the
        aggregator's scores, and (without DP) each client's training loss."""
        keys = set(getattr(self, "_aggregator_keys", set()))
        if not self.dp:
            keys.add("loss")
        return keys

    def reported_loss(self, updates: Updates) -> float | None:
        """The round's mean client training loss for the history; under DP the
        clients do not send it (it is computed on private records, un-noised)."""
        if self.dp:
            return None
        loss = updates.metrics.get("loss")
        if loss is None or not len(loss):
            return None
        v = np.asarray(loss, dtype=float)
        if np.isinf(v).any():
            raise Diverged(f"a client's training loss is {float(v[np.isinf(v)][0])}")
        return float(np.nanmean(v)) if np.isfinite(v).any() else None

    # -- the round -----------------------------------------------------------

    def begin_round(self, t: int, clients: list[int]) -> None:
        self.ctx.round = t
        self.ctx.participants = list(clients)
        self.stages.round = t
        for comp in self.components.lifecycle():
            with calling(comp, "begin_round"):
                t0 = time.perf_counter()
                comp.begin_round(t)
                if isinstance(comp, PrivacyMechanism):
                    self.clock.seconds["privacy_s"] += time.perf_counter() - t0

    def check_updates(self, updates: Updates) -> None:
        import torch

        alg = self.components.algorithm
        if self.protocol_cls.name in ("federated", "pooled") and (
                updates.delta.shape[1] != self.ctx.layout.numel):
            raise PluginError(f"clients sent updates of {updates.delta.shape[1]} values; the "
                              f"model has {self.ctx.layout.numel} parameters",
                              plugin=alg.plugin, component=alg.name, hook="client_update",
                              exc_type="ValueError")
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

    def check_vector(self, v: Any, comp: Component, hook: str) -> None:
        """A hook's model-sized vector has the model's size."""
        n = self.ctx.layout.numel
        if tuple(v.shape) != (n,):
            raise PluginError(f"{hook} returned a tensor of shape {tuple(v.shape)}; the model "
                              f"has {n} parameters, so a flat vector of shape ({n},) is "
                              f"expected", plugin=comp.plugin or type(comp).__module__,
                              component=comp.name, hook=hook, exc_type="ValueError")

    def run(self, *, progress: Callable[[int], None] | None = None,
            hooks: Any = None) -> dict[str, Any]:
        from fedmedbench.models import get_flat_params

        self._aggregator_keys = _aggregator_metric_keys(self.components.aggregator)
        w0 = self.maybe_pretrain(self.model_factory, get_flat_params(self.model_factory()))
        self.initial_params = w0.clone()
        self.protocol.init_models(w0)
        every = max(1, int(self.settings.eval_every))
        utility = None
        for rnd in range(1, self.rounds + 1):
            entry: dict[str, Any] = {"round": rnd, **self.protocol.round(rnd)}
            self.protocol.check_finite(rnd)
            if rnd % every == 0 or rnd == self.rounds:
                utility = self.protocol.evaluate()
                entry["utility"] = utility["global"]
            if self.dp:
                entry["epsilon"] = self.privacy_block()["epsilon"]
            entry = {k: v for k, v in entry.items() if v is not None or k == "loss"}
            self.history.append(entry)
            if hooks is not None:
                _observe(hooks.on_round_end, cell=self.cell, round=rnd, metrics=entry)
            if progress:
                progress(rnd)
        assert utility is not None
        utility = {**utility, **self.chance(utility)}
        vdata = self.federation.validation_data(self.data)
        if vdata is not None:  # tuning reads this, never the test split
            utility = {**utility, "validation": self.evaluate_on(vdata)}
        self.utility = utility
        return utility

    def chance(self, utility: dict[str, Any]) -> dict[str, Any]:
        """``majority_baseline``: the best constant prediction (one class for
        every row) on the pooled test split, scored with the task's metric
        (accuracy: the majority class's rate; balanced accuracy and AUROC:
        0.5); ``chance_level``: the cell's utility does not beat it (``None``
        when either is undefined)."""
        from fedmedbench.metrics import score

        task = self.data.task
        ys = [s.test.y for s in self.data.sites if len(s.test)]
        if not ys:
            return {"majority_baseline": None, "chance_level": None}
        y = np.concatenate(ys)
        eye = np.eye(int(task.num_classes))
        base = [score(task.metric, y, np.repeat(eye[[c]], len(y), axis=0))
                for c in range(int(task.num_classes))]
        finite = [b for b in base if np.isfinite(b)]
        baseline = max(finite) if finite else None
        g = utility.get("global")
        level = (None if baseline is None or g is None or not np.isfinite(g)
                 else bool(g <= baseline + 1e-12))
        return {"majority_baseline": baseline, "chance_level": level}

    def evaluate_on(self, data: FederatedData) -> dict[str, Any]:
        """The protocol's evaluation of the current models with ``data``'s
        test splits (the validation rows) in place of the cell's."""
        held = self.ctx.data
        self.ctx.data = data
        try:
            return self.protocol.evaluate()
        finally:
            self.ctx.data = held

    # -- privacy -------------------------------------------------------------

    def accountings(self) -> dict[str, Accounting]:
        out = {}
        for m in self.components.privacy:
            with calling(m, "accounting"):
                acc = m.accounting()
            if acc is not None:
                if not isinstance(acc, Accounting):
                    raise PluginError(f"accounting() returned {type(acc).__name__}, not "
                                      f"fedmedbench.Accounting (or None)", plugin=m.plugin,
                                      component=m.name, hook="accounting", exc_type="TypeError")
                out[m.name] = acc
        return out

    def privacy_block(self) -> dict[str, Any]:
        """The record's ``metrics.privacy``: the headline guarantee (one
        consistent set of fields from one mechanism, see
        :func:`fedmedbench.accounting.headline`) and every mechanism's numbers."""
        accs = self.accountings()
        mechanisms: dict[str, Any] = {}
        for m in self.components.privacy:
            with calling(m, "report"):
                rep = to_json(m.report(), plugin=m, hook="report")
            acc = accs.get(m.name)
            mechanisms[m.name] = {**rep, **(acc.as_dict() if acc is not None else {}),
                                  "stages": sorted(m.stages)}
        crypto = self.components.transport is not None
        level = {(False, False): "none", (True, False): "dp", (False, True): "crypto",
                 (True, True): "dp+crypto"}[(bool(accs), crypto)]
        out = {**headline(accs), "level": level, "mechanisms": mechanisms}
        out["sent_in_clear"] = sorted({"num_examples", *self.sent_metric_keys()}) if \
            self.protocol_cls.aggregates else []
        if self.protocol_cls.aggregates:
            out["public"] = ("num_examples: each client's training-set size reaches the server "
                             "in the clear and is treated as public metadata (aggregation "
                             "weights use it); no privacy mechanism of the cell protects it")
        if self.dp:
            out["client_losses"] = ("not sent: under differential privacy each client's "
                                    "training loss is computed on private records without "
                                    "noise, so clients do not report it (history loss is null)")
        return out

    # -- attacks -------------------------------------------------------------

    def round1_batches(self, client: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Replay the first ``steps`` minibatches of ``client``'s round-1 stream;
        ``None`` under a local-stage mechanism, whose sampler is its own."""
        from fedmedbench.training import BatchStream

        if self.components.local_stage is not None or not 0 <= client < self.ctx.num_clients:
            return None
        split = self.ctx.clients[client].train
        stream = BatchStream(len(split), self.settings.batch_size, self.ctx.batch_seed(client))
        out = []
        for _ in range(steps):
            idx = stream.next_indices()
            out.append((split.X[idx], split.y[idx]))
        return out

    def attack_context(self) -> AttackContext:
        final, per_site = self.protocol.final_models()
        final_buffers, site_buffers = self.protocol.final_buffers()

        def train_shadow(split: Split, seed: int) -> Any:
            from fedmedbench.models import get_flat_params
            from fedmedbench.training import SGDTrainer

            _seed_everything(seed)
            model = self.model_factory()
            tr = SGDTrainer(model, split, self.settings, seed=seed)
            steps = self.settings.steps_for(len(split)) * self.rounds
            new, _ = tr.train(get_flat_params(model), steps)
            return new

        return AttackContext(  # members: the rows trained on (no validation or holdout rows)
            cell=self.cell, data=self.federation.trained_data(self.data),
            model_factory=self.factory_for(0),
            final_params=final, server_views=self.views, privacy=self.privacy_block(),
            settings=self.settings, rounds=self.rounds, seed=self.seed,
            protocol=self.protocol_cls.name, train_shadow=train_shadow,
            mechanisms=[m.name for m in self.components.privacy], site_params=per_site,
            artifacts_dir=self.cell.get("artifacts_dir"), client_batches=self.round1_batches,
            chance_level=bool(self.utility.get("chance_level")), canaries=self.canaries,
            initial_params=getattr(self, "initial_params", None),
            final_buffers=final_buffers, site_buffers=site_buffers)

    def chance_note(self) -> str:
        u = self.utility
        return (f"the model did not learn: its {u.get('metric')} {u.get('global'):.3f} does not "
                f"beat the majority-class baseline {u.get('majority_baseline'):.3f}, so an "
                f"attack's numbers here say nothing about what a trained model leaks")

    def cost_extra(self) -> dict[str, Any]:
        """Cost fields the privacy mechanisms report (``clipped_coordinates``:
        coordinates a transport clipped to its range before encoding)."""
        out: dict[str, Any] = {}
        for m in self.components.privacy:
            with calling(m, "report"):
                rep = m.report()
            v = rep.get("clipped_coordinates") if isinstance(rep, dict) else None
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                out["clipped_coordinates"] = out.get("clipped_coordinates", 0) + int(v)
        return out

    def run_attacks(self) -> dict[str, Any]:
        """Each attack's result, or ``{"failed": {...}}`` for one that raised or
        returned something that is not JSON (the cell's utility stays)."""
        if not self.components.attacks:
            return {}
        actx = self.attack_context()
        out: dict[str, Any] = {}
        for key, a in self.components.attacks:
            t0 = time.perf_counter()
            try:
                with calling(a, "evaluate"):
                    res = a.evaluate(actx)
                res = to_json(res, plugin=a, hook="evaluate")
                if not isinstance(res, dict):
                    raise PluginError(f"evaluate returned {type(res).__name__}, not a dict of "
                                      f"metrics", plugin=a.plugin, component=a.name,
                                      hook="evaluate", exc_type="TypeError")
                res.setdefault("seconds", round(time.perf_counter() - t0, 3))
                if actx.chance_level and not ({"not_applicable", "failed"} & set(res)):
                    res.setdefault("model_learned", False)
                    res.setdefault("chance_note", self.chance_note())
            except PluginError as exc:
                res = {"failed": _error(exc)}
            out[key] = res
        return out


def _observe(hook: Any, **kwargs: Any) -> None:
    """Call an observer hook's implementations one by one, so that one that
    raises (or calls ``sys.exit``) is named: the cell fails with its plugin."""
    for impl in reversed(hook.get_hookimpls()):  # pluggy's order: last registered first
        try:
            impl.function(**kwargs)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            from fedmedbench.errors import INTERRUPTED

            if isinstance(exc, KeyboardInterrupt) and INTERRUPTED.is_set():
                raise
            raise PluginError(contained_message(exc), plugin=impl.plugin_name,
                              component="(observer)", hook=hook.name,
                              exc_type=type(exc).__name__) from exc


def _aggregator_metric_keys(agg: Aggregator) -> set[str]:
    return {str(k) for k in agg.client_metric_keys}


# --------------------------------------------------------------------------
# values plugins hand back
# --------------------------------------------------------------------------


def to_json(v: Any, *, plugin: Component, hook: str, _depth: int = 0) -> Any:
    """A JSON-ready copy of a plugin's return value: numpy and torch scalars
    (and one-element tensors) become numbers, tuples lists; anything else that
    JSON cannot hold raises a :class:`PluginError` naming the plugin and hook."""
    if _depth > 50:
        raise PluginError("value nested more than 50 levels deep", plugin=plugin.plugin,
                          component=plugin.name, hook=hook, exc_type="TypeError")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return to_json(v.tolist(), plugin=plugin, hook=hook, _depth=_depth + 1)
    if type(v).__module__.startswith("torch") and hasattr(v, "numel") and hasattr(v, "tolist"):
        return to_json(v.detach().cpu().tolist(), plugin=plugin, hook=hook, _depth=_depth + 1)
    if isinstance(v, dict):
        bad = [k for k in v if not isinstance(k, str)]
        if bad:
            raise PluginError(f"returned a dict with a {type(bad[0]).__name__} key {bad[0]!r}; "
                              f"record keys are strings", plugin=plugin.plugin,
                              component=plugin.name, hook=hook, exc_type="TypeError")
        return {k: to_json(x, plugin=plugin, hook=hook, _depth=_depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json(x, plugin=plugin, hook=hook, _depth=_depth + 1) for x in v]
    raise PluginError(f"returned a {type(v).__module__}.{type(v).__name__} ({v!r:.60}), which a "
                      f"JSON record cannot hold; return numbers, strings, lists and dicts",
                      plugin=plugin.plugin, component=plugin.name, hook=hook,
                      exc_type="TypeError")


def _error(exc: PluginError) -> dict[str, Any]:
    return {"type": exc.exc_type, "message": str(exc), "plugin": exc.plugin,
            "component": exc.component, "hook": exc.hook, "traceback": _tb(exc)}


def seed_torch(seed: int) -> None:
    """``torch.manual_seed`` (the CPU generator; the accelerators' too where
    one is present: seeding them costs ~2 ms a call even when none is)."""
    import torch

    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))


def _seed_everything(seed: int) -> None:
    import torch

    seed_torch(seed)
    np.random.seed(seed % 2**32)
    torch.set_num_threads(1)


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def run_cell(cell: dict[str, Any], *, registry: Registry | None = None,
             progress: Callable[[int], None] | None = None,
             keep_run: bool = False) -> Any:
    """Run one cell and return its result record (never raises for a plugin
    error, a skip or divergence: those are statuses). With ``keep_run`` return
    ``(record, run)``: the :class:`CellRun` with its final models, server views
    and history, for tests and notebooks."""
    import torch

    reg = registry or get_registry()
    hooks = reg.hooks()
    t_start = time.perf_counter()
    record: dict[str, Any] = {
        "schema": SCHEMA, "cell_id": cell["cell_id"], "status": "ok", "error": None,
        "labels": cell.get("labels", {}), "matrix": cell.get("matrix"),
        "config": cell["config"], "metrics": {}, "history": [],
        "provenance": provenance(reg),
    }
    run: CellRun | None = None
    torch_threads = torch.get_num_threads()
    caught: list[warnings.WarningMessage] = []
    logged: list[logging.LogRecord] = []
    try:
        with warnings.catch_warnings(record=True) as caught, _captured_logs() as logged:
            warnings.simplefilter("always")
            run = CellRun(cell, reg)
            record["history"] = run.history
            record["protocol"] = run.protocol_cls.name
            _observe(hooks.on_cell_start, cell=cell)
            run.validate()
            run.prepare()
            record["backend"] = {"name": run.backend_name, "reason": run.backend_reason}
            if hasattr(run.backend, "kernel"):
                record["backend"]["kernel"] = run.backend.kernel
            utility = run.run(progress=progress, hooks=hooks)
            record["metrics"] = {"utility": utility, **run.protocol.record_metrics(),
                                 "privacy": run.privacy_block()}
            if "utility_global" in record["metrics"]:  # the same chance fields as utility's
                g = record["metrics"]["utility_global"]
                record["metrics"]["utility_global"] = {**g, **run.chance(g)}
            if run.canaries is not None:
                record["metrics"]["canaries"] = run.canary_summary()
            record["metrics"]["attacks"] = run.run_attacks()
    except Skip as exc:
        record["status"] = "skipped"
        record["error"] = {"type": "Skip", "message": str(exc), "plugin": None, "hook": None}
    except Diverged as exc:
        record["status"] = "diverged"
        record["error"] = {"type": "Diverged", "message": str(exc), "plugin": None, "hook": None}
    except PluginError as exc:
        record["status"] = "failed"
        record["error"] = _error(exc)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a harness or config problem inside the cell: recorded, not lost
        record["status"] = "failed"
        record["error"] = {"type": type(exc).__name__, "message": str(exc), "plugin": None,
                           "hook": None, "traceback": _tb(exc)}
    finally:
        torch.set_num_threads(torch_threads)
    record["warnings"] = _warning_summary(caught, logged)
    for w in record["warnings"]:  # settings that make a cell's numbers suspect: say so now
        if w["category"] == SettingWarning.__name__:
            print(f"fedmedbench: cell {cell['cell_id']}: warning: {w['message']}",
                  file=sys.stderr)
    if record["status"] != "ok" and run is not None and hasattr(run, "ctx"):
        with contextlib.suppress(Exception):
            record["metrics"].setdefault("privacy", run.privacy_block())
    cost: dict[str, Any] = {"bytes_up": 0, "bytes_down": 0, "train_s": 0.0, "privacy_s": 0.0}
    if run is not None:
        cost.update(bytes_up=run.bytes.up, bytes_down=run.bytes.down,
                    **{k: round(v, 4) for k, v in run.clock.seconds.items()})
        with contextlib.suppress(Exception):
            cost.update(run.cost_extra())
    record["metrics"]["cost"] = {**cost, "wall_s": round(time.perf_counter() - t_start, 4)}
    try:
        hooks.on_cell_end(cell=cell, record=record)
    except Exception as exc:  # an observer must not lose the record: warn and go on
        warnings.warn(f"an on_cell_end observer raised {type(exc).__name__}: {exc}; the "
                      f"record of cell {cell['cell_id']} is kept", RuntimeWarning, stacklevel=2)
    return (record, run) if keep_run else record


class _LogRecorder(logging.Handler):
    """Keeps the log records of warning level and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured_logs() -> Any:
    """Log records (warning and above) of every library while a cell runs.
    Libraries warn through :mod:`logging` too (Opacus's "First batch is
    empty" is ``logger.warning``): with this handler on the root logger they
    go into the record rather than to stderr through logging's last-resort
    handler, where they broke the progress bars."""
    rec = _LogRecorder()
    root = logging.getLogger()
    root.addHandler(rec)
    try:
        yield rec.records
    finally:
        root.removeHandler(rec)


def _warning_summary(caught: list[warnings.WarningMessage],
                     logged: list[logging.LogRecord] | None = None) -> list[dict[str, Any]]:
    """Distinct warnings raised while the cell ran (:mod:`warnings`, and
    :mod:`logging` records of warning level and above), with counts: they go
    into the record instead of breaking the progress bars. Each is
    ``{category, message, source, count}`` (a log record's category is its
    level, ``logging.WARNING``, and it also names its ``logger``)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}

    def add(category: str, message: str, source: str, **extra: Any) -> None:
        key = (category, message)
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = {"category": category, "message": message[:500], "source": source,
                         "count": 1, **extra}

    for w in caught:
        add(w.category.__name__, str(w.message), f"{w.filename}:{w.lineno}")
    for r in logged or []:
        try:
            msg = r.getMessage()
        except Exception:  # a library's bad format arguments: keep the template
            msg = str(r.msg)
        add(f"logging.{r.levelname}", msg, f"{r.pathname}:{r.lineno}", logger=r.name)
    return list(seen.values())


def _tb(exc: BaseException) -> str:
    """The original exception's traceback (the plugin's own frames: a
    PluginError is raised *from* what the plugin raised), its last frames."""
    orig = exc.__cause__ if isinstance(exc, PluginError) and exc.__cause__ else exc
    lines = traceback.format_exception(type(orig), orig, orig.__traceback__, limit=-12)
    return "".join(lines)[-4000:]


_PROVENANCE: dict[str, Any] | None = None


def provenance(reg: Registry) -> dict[str, Any]:
    """Versions of fedmedbench, of the plugins of ``reg`` with their
    distributions, python, torch and platform; the git commit where known."""
    global _PROVENANCE
    if _PROVENANCE is None:  # the parts that do not depend on the registry
        from importlib import metadata

        import torch

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
    """The commit of the code that runs, where it can be known:

    - a source checkout (an editable install): its HEAD;
    - a wheel installed from git (``pip install git+https://...@REV``): the
      commit pip resolved, from the install's ``direct_url.json`` (PEP 610);
    - otherwise (a wheel built from a folder, or from an index) the commit
      named by ``FEDMEDBENCH_GIT_COMMIT`` or GitHub's ``GITHUB_SHA`` (tox and
      CI set them), else ``None``: the version number identifies the code,
      and the folder a wheel was built from may have moved on since.
    """
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return (_direct_url_commit() or os.environ.get("FEDMEDBENCH_GIT_COMMIT")
                or os.environ.get("GITHUB_SHA") or None)
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _direct_url_commit(text: str | None = None) -> str | None:
    """The VCS commit in an install's PEP 610 ``direct_url.json`` (``text``,
    or the installed fedmedbench distribution's), or ``None``."""
    import json
    from importlib import metadata

    if text is None:
        try:
            text = metadata.distribution("fedmedbench").read_text("direct_url.json")
        except metadata.PackageNotFoundError:
            return None
    try:
        info = json.loads(text or "")
    except ValueError:
        return None
    vcs = info.get("vcs_info") if isinstance(info, dict) else None
    commit = vcs.get("commit_id") if isinstance(vcs, dict) else None
    return commit if isinstance(commit, str) and commit else None
