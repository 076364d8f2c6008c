"""The engine: :func:`run_cell` turns one resolved cell into a result record.

A cell runs in four steps, each with one home:

- :func:`fedmedbench.cell.build_cell` builds it once: every component (once
  per party where it acts on both sides), the declared facts and their
  rules, the data, the federation, the contexts;
- the parties (:mod:`fedmedbench.parties`): the clients' side (data,
  training backend, the clients' components) and the server's (the global
  model, the server's components);
- the round (:mod:`fedmedbench.protocols`), one implementation whose
  settings are the protocols, passing typed messages between the parties
  (:mod:`fedmedbench.messages`), observed by the meters (time, bytes, the
  server's view: :mod:`fedmedbench.meters`);
- the attacks, on an :class:`~fedmedbench.AttackContext` of values, in this
  process or (``[evaluate] isolate = true``) in a separate one
  (:mod:`fedmedbench.isolate`).

:func:`run_cell` is pure: everything it needs is in the cell. Every call into
a plugin is attributed: an exception becomes a ``failed`` record naming the
plugin, component and hook, and a value that is not JSON is converted (numpy
and torch scalars) or refused with the hook named.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmedbench.accounting import Accounting, headline
from fedmedbench.cell import Cell, attack_key, build_cell, peek_model, seed_torch
from fedmedbench.components import Component, FederatedData, Site, Split
from fedmedbench.context import AttackContext, BatchReplay, ShadowTrainer
from fedmedbench.errors import Diverged, PluginError, SettingWarning, Skip, printable
from fedmedbench.federation import cell_rng
from fedmedbench.messages import ServerView
from fedmedbench.meters import ByteMeter, Clock, Stages, ViewRecorder, calling, contained_message
from fedmedbench.parties import Clients, Server
from fedmedbench.protocols import Round
from fedmedbench.registry import Registry, get_registry
from fedmedbench.results import error_block, new_record, provenance
from fedmedbench.schema import SCHEMA

__all__ = ["SCHEMA", "CellOutcome", "run_cell", "provenance", "attack_key", "to_json",
           "seed_torch"]


# --------------------------------------------------------------------------
# training one cell
# --------------------------------------------------------------------------


class Training:
    """The rounds of one built cell: the parties, the round, the meters, the
    history, and the referee's evaluation. The engine's own object: no
    component is handed it."""

    def __init__(self, cell: Cell, *, backend: str, clock: Clock, device: str = "cpu",
                 keep_views: bool = True) -> None:
        from fedmedbench.facts import ModelFacts

        self.cell = cell
        self.clock = clock
        self.bytes = ByteMeter()
        t = cell.transport
        self.views = ViewRecorder(cell.rounds, cell.sharing,
                                  t.server_view if t is not None else None)
        # the server's views serve the attacks and keep_run's outcome; a cell with
        # neither does not copy them (two (k, D) copies and per-client dicts)
        self.stages = Stages(clock, [self.bytes, *([self.views] if keep_views else [])])
        mfacts = ModelFacts.of(cell.model.name, peek_model(cell.factory))
        self.clients = Clients(cell, self.stages, requested_backend=backend,
                               batch_norm=bool(mfacts.batch_norm), device=device)
        ctx = cell.clients_ctx

        def transport_bytes() -> int:
            if t is None:
                return 0
            with calling(t, "bytes_down"):  # type: ignore[arg-type]
                return int(t.bytes_down(ctx))

        self.server = Server(cell, self.stages, transport_bytes_down=transport_bytes)
        self.round = Round(cell, self.clients, self.server, self.stages)
        from fedmedbench.clock import twin_of

        #: the network twin's virtual clock (:mod:`fedmedbench.clock`), ``None`` when off
        self.twin = twin_of(cell)
        self.round.twin = self.twin
        self.history: list[dict[str, Any]] = []
        self.utility: dict[str, Any] = {}
        self.initial_params: Any = None

    def pretrain(self, factory: Callable[[], Any], params: Any) -> Any:
        """Transfer learning: supervised steps on the public split (``pretrain_steps``)."""
        cell = self.cell
        if cell.settings.pretrain_steps <= 0:
            return params
        from fedmedbench.models import set_flat_params
        from fedmedbench.training import SGDTrainer

        assert cell.data.public is not None
        model = factory()
        set_flat_params(model, params)
        tr = SGDTrainer(model, cell.data.public, cell.settings,
                        seed=int(cell_rng(cell.seed, "pretrain").integers(2**62)))
        t0 = time.perf_counter()
        new, _ = tr.train(params, int(cell.settings.pretrain_steps))
        self.clock.seconds["train_s"] += time.perf_counter() - t0
        return new

    def run(self, *, progress: Callable[[int], None] | None = None,
            hooks: Any = None) -> dict[str, Any]:
        from fedmedbench.models import get_flat_params

        cell = self.cell
        w0 = self.pretrain(cell.factory, get_flat_params(peek_model(cell.factory)))
        self.initial_params = w0.clone()
        self.round.init_models(w0, pretrain=lambda f: self.pretrain(f, get_flat_params(f())))
        every = max(1, int(cell.settings.eval_every))
        utility = None
        for rnd in range(1, cell.rounds + 1):
            try:
                entry: dict[str, Any] = {"round": rnd, **self.round.run(rnd)}
            finally:
                self.round.end(rnd)
            self.round.check_finite(rnd)
            if rnd % every == 0 or rnd == cell.rounds:
                utility = self.round.evaluate()
                entry["utility"] = utility["global"]
            if cell.dp:  # against the headline adversary (None: not protected), and each
                block = privacy_block(cell)
                entry["epsilon"] = block["epsilon"]
                entry["epsilon_by_adversary"] = block["by_adversary"]
            entry = {k: v for k, v in entry.items() if v is not None or k in ("loss", "epsilon")}
            self.history.append(entry)
            if hooks is not None and hooks.on_round_end.get_hookimpls():
                _observe(hooks.on_round_end, cell=dict(cell.cell), round=rnd,
                         metrics=_json_copy(entry))
            if progress:
                progress(rnd)
        assert utility is not None
        utility = {**utility, **chance(cell.data, utility, self.round.predictions)}
        vdata = cell.federation.validation_data(cell.data)
        role = (cell.cell.get("config", {}).get("tuning") or {}).get("role")
        if vdata is not None and cell.dp and role != "tune":
            utility = {**utility, "validation": {"not_published": (
                "a validation score is computed on private rows without noise: a DP cell "
                "does not publish it (a tuning trial does, inside its protocol: fedmedbench "
                "tune)")}}
        elif vdata is not None:  # tuning reads this, never the test split
            utility = {**utility, "validation": self.round.evaluate(vdata)}
        self.utility = utility
        return utility

    # -- after training ---------------------------------------------------------------

    def attack_context(self) -> AttackContext:
        """What the attacks get: values only (no back-reference to the run)."""
        cell = self.cell
        final, per_site = self.round.final_models()
        final_buffers, site_buffers = self.round.final_buffers()
        replay = None
        if cell.clients.local_stage is None:  # a local-stage mechanism samples its own batches
            from fedmedbench.training import batch_seeds

            ctx = cell.clients_ctx
            replay = BatchReplay(rows={i: Split(s.train.X, s.train.y)
                                       for i, s in enumerate(cell.federation.clients)},
                                 seeds=dict(enumerate(batch_seeds(
                                     ctx.seed, np.arange(ctx.num_clients)).tolist())),
                                 batch_size=int(cell.settings.batch_size))
        spec = dict(cell.client_specs.get(0, cell.model_spec))
        factory = cell.factory_for(0)
        return AttackContext(  # members: the rows trained on (no validation or holdout rows)
            cell=_json_copy(dict(cell.cell)), data=cell.federation.trained_data(cell.data),
            model_factory=_factory_copy(factory),
            final_params=final.detach().clone(),
            server_views=dict(self.views.views), privacy=_json_copy(privacy_block(cell)),
            settings=cell.settings, rounds=cell.rounds, seed=cell.seed,
            protocol=cell.setting.name,
            train_shadow=ShadowTrainer(cell.factory(), cell.settings, cell.rounds),
            mechanisms=[name for name, _ in cell.privacy],
            site_params={i: p.detach().clone() for i, p in per_site.items()},
            artifacts_dir=cell.cell.get("artifacts_dir"), client_batches=replay,
            chance_level=bool(self.utility.get("chance_level")), canaries=cell.canaries,
            initial_params=None if self.initial_params is None else self.initial_params.clone(),
            final_buffers=None if final_buffers is None else final_buffers.clone(),
            site_buffers={i: b.clone() for i, b in site_buffers.items()}, model_spec=spec,
            canary_problem=cell.canary_problem)

    def canary_summary(self) -> dict[str, Any] | None:
        """The record's ``metrics.canaries``: what the audit added to training."""
        from fedmedbench.context import ClientCanaries, GradientCanaries

        can, cell = self.cell.canaries, self.cell
        if can is None:
            if cell.canary_problem:
                return {"attack": None, "not_inserted": cell.canary_problem}
            return None
        inc = np.asarray(can.included, dtype=bool)
        if isinstance(can, ClientCanaries):
            return {"attack": cell.canary_attack, "kind": "clients", "m": len(can),
                    "included": int(inc.sum()),
                    "note": "the audit's canary clients took part in the rounds they were "
                            "sampled in (each included with probability 1/2): every utility "
                            "and attack number of this cell is of that model"}
        gradient = isinstance(can, GradientCanaries)
        return {"attack": cell.canary_attack, "kind": "gradients" if gradient else "records",
                "m": len(can), "included": int(inc.sum()),
                "per_site": {s.name: int((inc & (can.site == i)).sum())
                             for i, s in enumerate(cell.data.sites)},
                "note": ("the audit's gradient-space canaries joined the private steps (each "
                         "with probability 1/2)" if gradient else
                         "the audit's canary records were trained on (each with probability "
                         "1/2)") + ": every utility and attack number of this cell is of that "
                        "model"}

    def outcome(self) -> CellOutcome:
        cell = self.cell
        fed = cell.federation
        return CellOutcome(
            final_models=self.round.params_by_model(), views=dict(self.views.views),
            history=self.history, global_params=self.round.global_params,
            sites=list(fed.clients), holdout=dict(fed.holdout),
            validation=dict(fed.validation), malicious=set(fed.malicious), data=cell.data,
            model_factory=cell.factory, layout=cell.layout, sharing=cell.sharing,
            sent_fields=tuple(cell.sharing.fields), backend=self.clients.backend_name,
            site_buffers={i: b for i in range(cell.clients_ctx.num_clients)
                          if (b := self.round.site_buffers(i)) is not None}
            if cell.setting.own_models else {},
            canaries=cell.canaries, training=self, ctx=cell.clients_ctx, federation=fed,
            server_state=cell.server_ctx.state, global_buffers=self.server.buffers,
            initial_buffers=self.round.buffers0,
            client_factories=dict(cell.client_factories))


@dataclass
class CellOutcome:
    """What tests and notebooks read after a run (``run_cell(..., keep_run=True)``):
    the final models, the server's views by round and the history, and the
    federation's parties and held-out rows."""

    #: each model's final parameters by model index (0: the global model; under the
    #: personalized and isolated protocols, each site's own)
    final_models: dict[int, Any]
    views: dict[int, ServerView]
    history: list[dict[str, Any]]
    global_params: Any
    #: each client's rows (a :class:`Site` per client index)
    sites: list[Site]
    holdout: dict[int, Split]
    validation: dict[int, Split]
    malicious: set[int]
    data: FederatedData
    model_factory: Callable[[], Any]
    layout: Any
    sharing: Any
    sent_fields: tuple[str, ...]
    backend: str
    site_buffers: dict[int, Any] = field(default_factory=dict)
    canaries: Any = None
    training: Training | None = None
    #: the clients' context (layout, steps, batch seeds)
    ctx: Any = None
    #: the clients' data: their training parties, validation and held-out rows
    federation: Any = None
    #: the server's state after the last round (``ctx.state`` of the server's side)
    server_state: dict[str, Any] = field(default_factory=dict)
    #: the server's running statistics (BatchNorm buffers), and a fresh model's
    global_buffers: Any = None
    initial_buffers: Any = None
    client_factories: dict[int, Callable[[], Any]] = field(default_factory=dict)

    def attack_context(self) -> AttackContext:
        assert self.training is not None
        return self.training.attack_context()

    def factory_for(self, client: int) -> Callable[[], Any]:
        return self.client_factories.get(client, self.model_factory)


def _factory_copy(factory: Callable[[], Any]) -> Callable[[], Any]:
    """A factory over a copy of ``factory``'s initial module (the closure then
    holds no object of the run)."""
    import copy

    template = factory()

    def build() -> Any:
        return copy.deepcopy(template)

    return build


def _json_copy(v: Any) -> Any:
    import json

    from fedmedbench.results import clean_json

    return json.loads(json.dumps(clean_json(v), default=str))


CHANCE_TEST = (
    "one-sided test that the score beats the majority-class baseline, over the test rows "
    "(accuracy: exact binomial; balanced accuracy: per-class binomials; AUROC: DeLong); "
    "at chance when p >= 0.05. Global-model cells are tested on the pooled test rows "
    "against the best constant prediction; cells scored per site (local, personalized) "
    "on the mean over sites against the mean of each site's own majority class (from its "
    "training labels)")


def chance(data: FederatedData, utility: dict[str, Any],
           predictions: dict[str, Any] | None = None) -> dict[str, Any]:
    """How the cell's utility compares with what needs no learning.

    ``majority_baseline``: the best constant prediction (one class for every
    row) on the pooled test split, scored with the task's metric;
    ``majority_baseline_per_site``: each site predicting its own training
    labels' majority class on its own test rows (what a hospital gets
    alone without a model). With the evaluation's ``predictions``: a
    one-sided test (:data:`CHANCE_TEST`) gives ``chance_p_value``, ``ci95``
    (the utility's 95% interval over test rows) and ``chance_level`` (not
    beyond chance at 5%), and per site ``per_site_at_chance``; without
    them ``chance_level`` is the bare comparison (utility <= baseline)."""
    from fedmedbench.metrics import beats_chance_many, score

    task = data.task
    ys = [s.test.y for s in data.sites if len(s.test)]
    if not ys:
        return {"majority_baseline": None, "chance_level": None}
    y = np.concatenate(ys)
    C = int(task.num_classes)
    eye = np.eye(C)

    def constant(c: int, n: int) -> np.ndarray:
        return np.repeat(eye[[c]], n, axis=0)

    if task.metric == "accuracy" and np.issubdtype(y.dtype, np.integer) and int(y.min()) >= 0:
        # a constant c scores the share of rows labelled c: score()'s mean of (c == y), a
        # sum of exact ones over n, from one bincount instead of C scored arrays
        base = (np.bincount(y, minlength=C)[:C] / len(y)).tolist()
    else:
        base = [score(task.metric, y, constant(c, len(y))) for c in range(C)]
    finite = [b for b in base if np.isfinite(b)]
    baseline = max(finite) if finite else None
    # each site's own majority class on its test rows, every site in one score_sites pass
    tested_sites = [s for s in data.sites if len(s.test)]
    per_site_base: dict[str, float | None] = {s.name: None for s in data.sites}
    if tested_sites:
        from fedmedbench.metrics import score_sites

        n_train = np.asarray([len(s.train) for s in tested_sites])
        y_train = np.concatenate([np.asarray(s.train.y, dtype=np.int64) for s in tested_sites])
        counts = np.bincount(np.repeat(np.arange(len(tested_sites)), n_train) * C + y_train,
                             minlength=len(tested_sites) * C).reshape(-1, C)
        major = counts.argmax(1)  # 0 for a site without training rows
        n_test = np.asarray([len(s.test) for s in tested_sites])
        y_test = np.concatenate([np.asarray(s.test.y) for s in tested_sites])
        site_base = score_sites(task.metric, y_test, eye[np.repeat(major, n_test)],
                                offsets=np.concatenate([[0], np.cumsum(n_test)]))
        per_site_base.update((s.name, float(b) if np.isfinite(b) else None)
                             for s, b in zip(tested_sites, site_base.tolist()))
    g = utility.get("global")
    out: dict[str, Any] = {"majority_baseline": baseline,
                           "majority_baseline_per_site": per_site_base,
                           "chance_test": CHANCE_TEST}
    level = (None if baseline is None or g is None or not np.isfinite(g)
             else bool(g <= baseline + 1e-12))
    if not predictions:
        return {**out, "chance_level": level}
    sites = predictions.get("sites") or {}
    tested = [name for name, (ys_, _) in sites.items()
              if per_site_base.get(name) is not None and len(ys_)]
    site_tests: dict[str, dict[str, Any]] = {
        name: {"p_value": None, "ci95": None, "se": None, "at_chance": None} for name in sites}
    pooled = predictions.get("pooled")
    pooled_item = (pooled[0], pooled[1], baseline) if pooled is not None and \
        baseline is not None else None
    # every site's test and the pooled one in one SciPy call (each item's numbers are those
    # of a call of its own: beats_chance_many works element by element)
    items = [(*sites[n], per_site_base[n]) for n in tested]
    tests = beats_chance_many(task.metric, items + [pooled_item] if pooled_item else items) \
        if items or pooled_item else []
    site_tests.update(zip(tested, tests))
    out["per_site_at_chance"] = {k: v["at_chance"] for k, v in site_tests.items()}
    if pooled_item is not None:
        t = tests[-1]
    else:  # scored per site: the mean over sites against the mean of their own baselines
        from scipy.stats import norm

        ok = [(utility["per_site"][k], per_site_base[k], v["se"]) for k, v in site_tests.items()
              if v["se"] is not None and per_site_base.get(k) is not None
              and np.isfinite(utility["per_site"].get(k, float("nan")))]
        if not ok:
            return {**out, "chance_level": level}
        est = float(np.mean([a for a, _, _ in ok]))
        b = float(np.mean([b for _, b, _ in ok]))
        se = float(np.sqrt(np.sum(np.square([s for _, _, s in ok]))) / len(ok))
        p = float(norm.sf((est - b) / se)) if se > 0 else (0.0 if est > b else 1.0)
        t = {"p_value": p, "ci95": [est - 1.959964 * se, est + 1.959964 * se], "se": se,
             "at_chance": bool(p >= 0.05)}
        out["per_site_mean_baseline"] = b
    return {**out, "chance_level": t["at_chance"], "chance_p_value": t["p_value"],
            "ci95": t["ci95"], "se": t["se"]}


# --------------------------------------------------------------------------
# privacy
# --------------------------------------------------------------------------


def accountings(cell: Cell) -> dict[str, Accounting]:
    out = {}
    for name, m in cell.privacy:
        with calling(m, "accounting"):
            acc = m.accounting()
        if acc is not None:
            if not isinstance(acc, Accounting):
                raise PluginError(f"accounting() returned {type(acc).__name__}, not "
                                  f"fedmedbench.Accounting (or None)", plugin=m.plugin,
                                  component=m.name, hook="accounting", exc_type="TypeError")
            out[name] = acc
    return out


def privacy_block(cell: Cell) -> dict[str, Any]:
    """The record's ``metrics.privacy``: the headline guarantee (one
    consistent set of fields from one mechanism, see
    :func:`fedmedbench.accounting.headline`) and every mechanism's numbers."""
    accs = accountings(cell)
    mechanisms: dict[str, Any] = {}
    for name, m in cell.privacy:
        with calling(m, "report"):
            rep = to_json(m.report(), plugin=m, hook="report")
        acc = accs.get(name)
        mechanisms[name] = {**rep, **(acc.as_dict() if acc is not None else {}),
                            "stages": sorted(m.stages)}
    crypto = cell.transport is not None
    level = {(False, False): "none", (True, False): "dp", (False, True): "crypto",
             (True, True): "dp+crypto"}[(bool(accs), crypto)]
    adversary = str(cell.cell.get("config", {}).get("headline_adversary") or "server")
    out = {**headline(accs, adversary), "level": level, "mechanisms": mechanisms}
    out["outside_threat_model"] = list(cell.outside_threat_model)
    aggregates = cell.setting.aggregates
    out["sent_in_clear"] = sorted({"num_examples", *cell.sent_metric_keys()}) if aggregates \
        else []
    if aggregates:
        out["public"] = ("num_examples: each client's training-set size reaches the server "
                         "in the clear and is treated as public metadata (aggregation "
                         "weights use it); no privacy mechanism of the cell protects it")
    if cell.dp:
        out["client_losses"] = ("not sent: under differential privacy each client's "
                                "training loss is computed on private records without "
                                "noise, so clients do not report it (history loss is null)")
    return out


def cost_extra(cell: Cell) -> dict[str, Any]:
    """Cost fields the privacy mechanisms report (``clipped_coordinates``:
    coordinates a transport clipped to its range before encoding)."""
    out: dict[str, Any] = {}
    for _, m in cell.privacy:
        with calling(m, "report"):
            rep = m.report()
        v = rep.get("clipped_coordinates") if isinstance(rep, dict) else None
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out["clipped_coordinates"] = out.get("clipped_coordinates", 0) + int(v)
    return out


# --------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------


def chance_note(utility: dict[str, Any]) -> str:
    u = utility
    return (f"the model did not learn: its {u.get('metric')} {u.get('global'):.3f} does not "
            f"beat the majority-class baseline {u.get('majority_baseline'):.3f}, so an "
            f"attack's numbers here say nothing about what a trained model leaks")


def run_attacks(attacks: tuple[tuple[str, Any], ...], actx: AttackContext,
                utility: dict[str, Any], *, isolate: bool = False,
                shadow_spec: dict[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
    """Each attack's result, or ``{"failed": {...}}`` for one that raised or
    returned something that is not JSON (the cell's utility stays). With
    ``isolate`` they run in a separate process that receives only the
    serialized context (:mod:`fedmedbench.isolate`)."""
    if not attacks:
        return {}
    if isolate:
        from fedmedbench.isolate import run_isolated

        raw = run_isolated([(k, a.config()) for k, a in attacks], actx,
                           shadow_spec=dict(shadow_spec or actx.model_spec or {}),
                           timeout=timeout)
    else:
        raw = {key: evaluate_attack(a, actx) for key, a in attacks}
    out = {}
    for key, res in raw.items():
        if actx.chance_level and isinstance(res, dict) and not (
                {"not_applicable", "failed"} & set(res)):
            res.setdefault("model_learned", False)
            res.setdefault("chance_note", chance_note(utility))
        out[key] = res
    return out


def evaluate_attack(a: Any, actx: AttackContext) -> dict[str, Any]:
    """One attack on ``actx``: its JSON result, or ``{"failed": ...}``.
    The torch and numpy global generators are seeded with the cell seed
    first, so an attack gives the same numbers in any process."""
    t0 = time.perf_counter()
    try:
        seed_torch(actx.seed)
        np.random.seed(actx.seed % 2**32)
        with calling(a, "evaluate"):
            res = a.evaluate(actx)
        res = to_json(res, plugin=a, hook="evaluate")
        if not isinstance(res, dict):
            raise PluginError(f"evaluate returned {type(res).__name__}, not a dict of "
                              f"metrics", plugin=a.plugin, component=a.name,
                              hook="evaluate", exc_type="TypeError")
        res.setdefault("seconds", round(time.perf_counter() - t0, 3))
    except PluginError as exc:
        res = {"failed": _error(exc)}
    return res


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
    return error_block(exc.exc_type, str(exc), plugin=exc.plugin, component=exc.component,
                       hook=exc.hook, tb=_tb(exc))


def run_cell(cell: dict[str, Any], *, registry: Registry | None = None,
             progress: Callable[[int], None] | None = None,
             keep_run: bool = False) -> Any:
    """Run one cell and return its result record (never raises for a plugin
    error, a skip or divergence: those are statuses). With ``keep_run`` return
    ``(record, outcome)``: a :class:`CellOutcome` with the final models, the
    server's views and the history, for tests and notebooks."""
    import torch

    reg = registry or get_registry()
    hooks = reg.hooks()
    t_start = time.perf_counter()
    record = new_record(cell, registry=reg)
    built: Cell | None = None
    training: Training | None = None
    clock = Clock()
    torch_threads = torch.get_num_threads()
    caught: list[warnings.WarningMessage] = []
    logged: list[logging.LogRecord] = []
    try:
        with warnings.catch_warnings(record=True) as caught, _captured_logs() as logged:
            warnings.simplefilter("always")
            with contextlib.suppress(Exception):
                record["protocol"] = str(reg.get("algorithm", cell["config"]["algorithm"][
                    "name"]).cls.protocol)
            _observe(hooks.on_cell_start, cell=cell)
            built = build_cell(cell, reg, setup_clock=clock.seconds)
            record["protocol"] = built.setting.name
            training = Training(built, backend=str(cell.get("backend") or "auto"), clock=clock,
                                device=str(cell.get("device") or "cpu"),
                                keep_views=keep_run or bool(built.attacks))
            record["history"] = training.history
            record["backend"] = {"name": training.clients.backend_name,
                                 "reason": training.clients.backend_reason,
                                 "device": training.clients.device}
            if hasattr(training.clients.backend, "kernel"):
                record["backend"]["kernel"] = training.clients.backend.kernel
            try:
                utility = training.run(progress=progress, hooks=hooks)
            finally:
                _close(built)
            record["metrics"] = {"utility": utility, **training.round.record_metrics(),
                                 "privacy": privacy_block(built)}
            if training.twin is not None:
                from fedmedbench.clock import clock_record

                record["metrics"]["clock"] = clock_record(
                    training.twin, training.history, settings=cell.get("clock"),
                    accounting=record["metrics"]["privacy"],
                    asynchronous=built.setting.asynchronous)
            if "utility_global" in record["metrics"]:  # the same chance fields as utility's
                g = record["metrics"]["utility_global"]
                record["metrics"]["utility_global"] = {
                    **g, **chance(built.data, g, training.round.global_predictions)}
            if built.canaries is not None or built.canary_problem:
                record["metrics"]["canaries"] = training.canary_summary()
            isolate = bool(cell.get("isolate_attacks", False))
            record["metrics"]["attacks"] = run_attacks(
                built.attacks, training.attack_context(), utility, isolate=isolate,
                shadow_spec=dict(built.model_spec)) if built.attacks else {}
            if built.attacks:
                record["metrics"]["attacks_isolated"] = isolate
    except Skip as exc:
        record["status"] = "skipped"
        record["error"] = error_block("Skip", str(exc))
    except Diverged as exc:
        record["status"] = "diverged"
        record["error"] = error_block("Diverged", str(exc))
    except PluginError as exc:
        record["status"] = "failed"
        record["error"] = _error(exc)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a harness or config problem inside the cell: recorded, not lost
        record["status"] = "failed"
        record["error"] = error_block(type(exc).__name__, str(exc), tb=_tb(exc))
    finally:
        torch.set_num_threads(torch_threads)
        if built is not None and training is None:
            _close(built)
    record["warnings"] = _warning_summary(caught, logged)
    for w in record["warnings"]:  # settings that make a cell's numbers suspect: say so now
        if w["category"] == SettingWarning.__name__:
            print(printable(f"fedmedbench: cell {cell['cell_id']}: warning: {w['message']}"),
                  file=sys.stderr)
    if record["status"] != "ok" and built is not None:
        with contextlib.suppress(Exception):
            record["metrics"].setdefault("privacy", privacy_block(built))
    cost: dict[str, Any] = {"bytes_up": 0, "bytes_down": 0, "train_s": 0.0, "privacy_s": 0.0}
    if training is not None:
        cost.update(bytes_up=training.bytes.up, bytes_down=training.bytes.down)
    cost.update({k: round(v, 4) for k, v in clock.seconds.items()})
    if built is not None:
        with contextlib.suppress(Exception):
            cost.update(cost_extra(built))
    record["metrics"]["cost"] = {**cost, "wall_s": round(time.perf_counter() - t_start, 4)}
    try:
        hooks.on_cell_end(cell=cell, record=record)
    except Exception as exc:  # an observer must not lose the record: warn and go on
        warnings.warn(f"an on_cell_end observer raised {type(exc).__name__}: {exc}; the "
                      f"record of cell {cell['cell_id']} is kept", RuntimeWarning, stacklevel=2)
    if keep_run:
        return record, (training.outcome() if training is not None else None)
    return record


def _close(cell: Cell) -> None:
    """Every component's ``close`` (training is over, finished or not): the
    secrets that live for the cell are dropped here. A close that raises is
    recorded as a warning, never losing the record."""
    for comp in cell.all_components():
        try:
            with calling(comp, "close"):
                comp.close()
        except PluginError as exc:
            warnings.warn(f"{exc}", RuntimeWarning, stacklevel=2)


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
