"""The conformance kit: checks every component of a family must pass.

Checks are plain functions ``check_x(cls, registry)`` that raise
:class:`CheckFailure` with a message naming the component, its plugin and
the fix (the pattern of scikit-learn's ``check_estimator``).
:func:`checks_for` picks the checks that apply to a class;
:func:`parametrize_with_checks` turns them into pytest parameters::

    from fedmedbench.testing import parametrize_with_checks
    from my_plugin import MyAlgorithm

    @parametrize_with_checks([MyAlgorithm])
    def test_conformance(component, check):
        check(component)

Checks that run a cell use the kit's own tiny components — a federation
(``fmb-kit-tabular``: three sites, a public split), a partitioner that keeps
its sites (``fmb-kit-natural``), a small MLP (``fmb-kit-mlp``), a linear
mean (``fmb-kit-mean``) and a plain FedAvg (``fmb-kit-fedavg``) — so a plugin
is tested without depending on any built-in.
"""

from __future__ import annotations

import inspect
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmedbench.components import (
    FAMILIES,
    STAGES,
    Adversary,
    Aggregator,
    Algorithm,
    Attack,
    Component,
    Compressor,
    Dataset,
    FederatedData,
    Model,
    Partitioner,
    PrivacyMechanism,
    Reporter,
    Site,
    Split,
    Task,
    TransportStage,
    stages_of,
    unimplemented_stage_methods,
)
from fedmedbench.errors import ConfigError
from fedmedbench.messages import Received
from fedmedbench.metrics import METRICS
from fedmedbench.models import build_model
from fedmedbench.registry import Registry, get_registry, hookimpl

KIT_DATASET = "fmb-kit-tabular"
KIT_ALGORITHM = "fmb-kit-fedavg"
KIT_PARTITIONER = "fmb-kit-natural"
KIT_MODEL = "fmb-kit-mlp"
KIT_AGGREGATOR = "fmb-kit-mean"


class CheckFailure(AssertionError):
    """A conformance check failed; the message names the component and the fix."""


def _fail(cls: type[Component], check: str, problem: str, fix: str) -> CheckFailure:
    plugin = getattr(cls, "plugin", "") or cls.__module__
    return CheckFailure(f"{check}: {cls.family} {cls.name!r} (plugin {plugin}): {problem}. "
                        f"Fix: {fix}")


# --------------------------------------------------------------------------
# the kit's own tiny components
# --------------------------------------------------------------------------


class KitTabular(Dataset):
    """Three small sites of a linearly separable-ish task with a public split."""

    name = KIT_DATASET
    run_defaults = {"batch_size": 8, "lr": 0.1, "local_steps": 3}

    def __init__(self) -> None:
        pass

    def load(self, *, seed: int) -> FederatedData:
        rng = np.random.default_rng(1234)
        w = rng.normal(size=5)

        def split(n: int, shift: float) -> Split:
            X = (rng.normal(size=(n, 5)) + shift).astype(np.float32)
            return Split(X, (X @ w > shift * w.sum()).astype(np.int64))

        sites = [Site(f"kit{i}", split(40, 0.3 * i), split(16, 0.3 * i)) for i in range(3)]
        task = Task(kind="binary", num_classes=2, input_shape=(5,), metric="accuracy",
                    model=KIT_MODEL)
        return FederatedData(task=task, sites=sites, public=split(20, 0.0))


class KitNatural(Partitioner):
    """Keeps the dataset's own sites."""

    name = KIT_PARTITIONER

    def __init__(self) -> None:
        pass

    def partition(self, data: FederatedData, *, seed: int) -> FederatedData:
        return data


class KitMLP(Model):
    """Flatten, one hidden layer of 8 tanh units, one logit per class."""

    name = KIT_MODEL

    def __init__(self) -> None:
        pass

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
        d = int(np.prod(input_shape))
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, num_classes))


class KitMean(Aggregator):
    """A linear mean of the updates, by examples or uniform."""

    name = KIT_AGGREGATOR

    def __init__(self, *, by: str = "examples") -> None:
        if by not in ("examples", "uniform"):
            raise ValueError(f"by = {by!r}; 'examples' or 'uniform'")
        self.by = by
        self.weighting = by

    def weights(self, received: Any) -> np.ndarray:
        raw = (np.asarray(received.num_examples, dtype=float) if self.by == "examples"
               else np.ones(len(received)))
        return raw / raw.sum()


class KitFedAvg(Algorithm):
    """Plain FedAvg (the base class's client and server updates)."""

    name = KIT_ALGORITHM
    vectorized = True

    def __init__(self) -> None:
        pass


class _KitPlugin:
    __name__ = "fedmedbench-conformance-kit"

    @hookimpl
    def register_datasets(self, register: Any) -> None:
        register(KitTabular)

    @hookimpl
    def register_algorithms(self, register: Any) -> None:
        register(KitFedAvg)

    @hookimpl
    def register_partitioners(self, register: Any) -> None:
        register(KitNatural)

    @hookimpl
    def register_models(self, register: Any) -> None:
        register(KitMLP)

    @hookimpl
    def register_aggregators(self, register: Any) -> None:
        register(KitMean)


KIT_PLUGIN = _KitPlugin()


def kit_registry(extra: list[Any] | None = None) -> Registry:
    """The installed plugins plus the kit's components (and ``extra`` plugins)."""
    return get_registry(extra=[KIT_PLUGIN, *(extra or [])])


def kit_cell(registry: Registry, **axes: Any) -> dict[str, Any]:
    """A tiny resolved cell on the kit dataset; ``axes`` override entries of
    the matrix ``[axes]`` table (e.g. ``privacy=[{"name": "dp-sgd"}]``)."""
    from fedmedbench.matrix import parse_matrix

    base = {"dataset": [KIT_DATASET], "algorithm": [KIT_ALGORITHM],
            "partitioner": [KIT_PARTITIONER], "model": [KIT_MODEL],
            "aggregator": [KIT_AGGREGATOR]}
    raw = {"name": "kit", "rounds": 2, "seeds": [0],
           "axes": {**base, **{k: [v] for k, v in axes.items() if k != "attacks"}},
           "run": {"clients_per_round": 3}}
    if "attacks" in axes:
        raw["evaluate"] = {"attacks": axes["attacks"]}
    m = parse_matrix(raw, registry=registry, source="<conformance kit>")
    return m.cells[0]


def _run(registry: Registry, **axes: Any) -> dict[str, Any]:
    from fedmedbench.engine import run_cell

    return run_cell(kit_cell(registry, **axes), registry=registry)


# --------------------------------------------------------------------------
# checks for every family
# --------------------------------------------------------------------------


def check_name(cls: type[Component], registry: Registry) -> None:
    """The component has a lower-case name and a one-line docstring."""
    n = cls.name
    if not n or n != n.lower() or " " in n or "_" in n:
        raise _fail(cls, "check_name", f"name {n!r} is not lower-case-with-dashes",
                    "set a class attribute like `name = \"my-method\"`")
    if not (cls.__doc__ or "").strip():
        raise _fail(cls, "check_name", "the class has no docstring",
                    "add a one-line docstring: `fedmedbench plugins` shows it")


def check_keyword_only_params(cls: type[Component], registry: Registry) -> None:
    """Every constructor parameter is keyword-only with a default; no *args/**kwargs."""
    sig = inspect.signature(cls.__init__)
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise _fail(cls, "check_keyword_only_params", f"__init__ takes *{p.name}",
                        "list every parameter explicitly after `*` so typos are caught")
        if p.kind is not p.KEYWORD_ONLY:
            raise _fail(cls, "check_keyword_only_params", f"parameter {p.name!r} is positional",
                        f"make it keyword-only: `def __init__(self, *, {p.name}=...)`")
        if p.default is p.empty:
            raise _fail(cls, "check_keyword_only_params", f"parameter {p.name!r} has no default",
                        "give every parameter a documented default")


def check_config_roundtrip(cls: type[Component], registry: Registry) -> None:
    """``cls(**cls().params())`` has the same params, and they are JSON."""
    try:
        obj = cls()
    except Exception as exc:
        raise _fail(cls, "check_config_roundtrip", f"cls() raised {type(exc).__name__}: {exc}",
                    "defaults must construct a working component") from exc
    try:
        params = obj.params()
    except AttributeError as exc:
        raise _fail(cls, "check_config_roundtrip", f"params() failed: {exc}",
                    "store each constructor argument under an attribute of the same name") from exc
    try:
        blob = json.dumps(params, sort_keys=True)
    except TypeError as exc:
        raise _fail(cls, "check_config_roundtrip", f"params are not JSON: {exc}",
                    "use numbers, strings, booleans, lists and dicts as parameter values") from exc
    again = cls(**json.loads(blob)).params()
    if json.dumps(again, sort_keys=True) != blob:
        raise _fail(cls, "check_config_roundtrip", f"params {params} came back as {again}",
                    "store constructor arguments unchanged")


# --------------------------------------------------------------------------
# family checks
# --------------------------------------------------------------------------


def check_dataset_loads(cls: type[Component], registry: Registry) -> None:
    """load() gives non-empty sites whose arrays match the task, and a model that fits."""
    data = cls().load(seed=0)  # type: ignore[attr-defined]
    if not isinstance(data, FederatedData) or not data.sites:
        raise _fail(cls, "check_dataset_loads", "load() did not return FederatedData with sites",
                    "return fedmedbench.FederatedData(task=..., sites=[Site(...), ...])")
    t = data.task
    if t.metric not in METRICS:
        raise _fail(cls, "check_dataset_loads", f"metric {t.metric!r} is unknown",
                    f"use one of {METRICS}")
    if t.model not in registry.names("model"):
        raise _fail(cls, "check_dataset_loads", f"model {t.model!r} is unknown",
                    f"use one of {registry.names('model')} or register it with register_models")
    for s in data.sites:
        for part, sp in (("train", s.train), ("test", s.test)):
            if tuple(sp.X.shape[1:]) != tuple(t.input_shape):
                raise _fail(cls, "check_dataset_loads",
                            f"site {s.name} {part} X has shape {sp.X.shape[1:]}, task says "
                            f"{t.input_shape}", "make Task.input_shape match the arrays")
            if sp.X.dtype != np.float32 or sp.y.dtype != np.int64:
                raise _fail(cls, "check_dataset_loads",
                            f"site {s.name} {part} has dtypes {sp.X.dtype}/{sp.y.dtype}",
                            "use float32 features and int64 labels")
            if len(sp) and (sp.y.min() < 0 or sp.y.max() >= t.num_classes):
                raise _fail(cls, "check_dataset_loads", f"site {s.name} {part} labels leave "
                            f"[0, {t.num_classes})", "encode labels as 0..num_classes-1")
            if len(sp) and not np.isfinite(sp.X).all():
                raise _fail(cls, "check_dataset_loads", f"site {s.name} {part} has NaN/inf "
                            "features", "impute missing values with training statistics")
        if len(s.train) == 0:
            raise _fail(cls, "check_dataset_loads", f"site {s.name} has no training rows",
                        "drop empty sites")
    try:
        model = build_model(t.model, t.input_shape, t.num_classes, registry=registry,
                            **t.model_kwargs)
    except ConfigError as exc:
        raise _fail(cls, "check_dataset_loads", f"the task's model does not build: {exc}",
                    "give Task.model_kwargs the model's own parameters") from exc
    out = model(torch.as_tensor(data.sites[0].train.X[:2]))
    if tuple(out.shape) != (min(2, len(data.sites[0].train)), t.num_classes):
        raise _fail(cls, "check_dataset_loads", f"default model output shape {tuple(out.shape)}",
                    "the model must output one logit per class")


def check_dataset_deterministic(cls: type[Component], registry: Registry) -> None:
    """The same seed gives the same arrays."""
    a, b = cls().load(seed=3), cls().load(seed=3)  # type: ignore[attr-defined]
    for sa, sb in zip(a.sites, b.sites):
        if not (np.array_equal(sa.train.X, sb.train.X) and np.array_equal(sa.train.y, sb.train.y)
                and np.array_equal(sa.test.y, sb.test.y)):
            raise _fail(cls, "check_dataset_deterministic", f"site {sa.name} differs between "
                        "two loads with seed=3", "draw all randomness from the seed")


def check_partitioner(cls: type[Component], registry: Registry) -> None:
    """Every training row lands in exactly one client or the public split (same
    count and labels; features may be transformed);
    no test row reaches training; the same seed gives the same partition."""
    data = KitTabular().load(seed=0)
    part = cls()
    out = part.partition(data, seed=0)  # type: ignore[attr-defined]
    again = part.partition(data, seed=0)  # type: ignore[attr-defined]

    def rows(splits: list[Split]) -> list[bytes]:
        return sorted(x.tobytes() for s in splits for x in s.X)

    def with_public(d: FederatedData) -> list[Split]:
        return [s.train for s in d.sites] + ([d.public] if d.public is not None else [])

    def labels(d: FederatedData) -> list[int]:
        return sorted(int(v) for sp in with_public(d) for v in sp.y)

    # rows may be transformed (feature-shift), but never lost, duplicated or invented
    if labels(out) != labels(data):
        raise _fail(cls, "check_partitioner", "training rows were lost, duplicated or invented",
                    "assign each pooled training row to exactly one client")
    test_rows = set(rows([s.test for s in data.sites]))
    if any(r in test_rows for r in rows([s.train for s in out.sites])):
        raise _fail(cls, "check_partitioner", "a test row reached a training split",
                    "partition train and test rows separately")
    if [len(s.train) for s in out.sites] != [len(s.train) for s in again.sites] or any(
            not np.array_equal(a.train.X, b.train.X) for a, b in zip(out.sites, again.sites)):
        raise _fail(cls, "check_partitioner", "two calls with seed=0 differ",
                    "draw all randomness from the seed")


def check_algorithm_runs(cls: type[Component], registry: Registry) -> None:
    """A two-round cell on the kit federation finishes ok with finite utility."""
    rec = _run(registry, algorithm={"name": cls.name})
    if rec["status"] == "skipped":
        return  # the algorithm declined the kit federation with a reason: allowed
    if rec["status"] != "ok":
        err = rec["error"] or {}
        raise _fail(cls, "check_algorithm_runs", f"the kit cell ended {rec['status']} in "
                    f"{err.get('hook') or 'the engine'}: {err.get('message')}",
                    _ALGORITHM_FIXES.get(str(err.get("hook")), "see the error above"))
    g = rec["metrics"]["utility"]["global"]
    if not (isinstance(g, float) and math.isfinite(g)):
        raise _fail(cls, "check_algorithm_runs", f"utility is {g}", "train a finite model")


_ALGORITHM_FIXES = {
    "client_update": ("return ctx.update(delta, **fields) with a (k, D) delta and exactly the "
                      "fields `sends` declares"),
    "server_update": "return the next global model, a flat vector of the model's size (D,)",
    "setup": ("setup(ctx) runs once on each party's instance: ctx.party says which, and "
              "ctx.state is that party's own"),
    "validate": "return None, or a reason string when the cell cannot run",
    "broadcast": "return a dict of the tensors `broadcasts` declares",
    "finalize": "return the (k, D) models to evaluate",
}


def check_aggregator(cls: type[Component], registry: Registry) -> None:
    """The aggregate has the update's shape, does not depend on client order,
    and equal updates aggregate to themselves; linear weights sum to 1."""
    from fedmedbench.components import WEIGHTINGS

    agg = cls()
    if getattr(agg, "weighting", None) not in WEIGHTINGS:
        raise _fail(cls, "check_aggregator", f"weighting is {getattr(agg, 'weighting', None)!r}",
                    f"declare `weighting` as one of {WEIGHTINGS}")
    keys = agg.client_metric_keys
    if not isinstance(keys, (tuple, list)) or not all(isinstance(k, str) for k in keys):
        raise _fail(cls, "check_aggregator", f"client_metric_keys is {keys!r}",
                    "declare the names client_metrics returns as a tuple of strings (the "
                    "engine calls client_metrics only when it names some)")
    g = torch.Generator().manual_seed(0)

    def batch(delta: torch.Tensor, order: list[int]) -> Received:
        return Received(round=1, kind="plaintext", clients=tuple(order),
                        num_examples=tuple(10 + i for i in order),
                        metrics={"loss": np.full(len(order), 0.5)},
                        rows={"delta": delta[order].clone()})

    delta = torch.randn(5, 12, generator=g)
    ups = batch(delta, [0, 1, 2, 3, 4])
    a = agg.aggregate(ups)  # type: ignore[attr-defined]
    if tuple(a.shape) != (12,):
        raise _fail(cls, "check_aggregator", f"aggregate shape {tuple(a.shape)} != (12,)",
                    "return one flat vector")
    b = agg.aggregate(batch(delta, [4, 3, 2, 1, 0]))  # type: ignore[attr-defined]
    if not torch.allclose(a, b, atol=1e-5):
        raise _fail(cls, "check_aggregator", "the result depends on the order of clients",
                    "aggregate as a function of the set of updates")
    same = batch(delta[:1].expand(5, -1), [0, 1, 2, 3, 4])
    if not torch.allclose(agg.aggregate(same), delta[0], atol=1e-5):  # type: ignore[attr-defined]
        raise _fail(cls, "check_aggregator", "five identical updates do not aggregate to that "
                    "update", "a mean-like rule must preserve agreement")
    if cls.linear:  # type: ignore[attr-defined]
        w = np.asarray(agg.weights(ups))  # type: ignore[attr-defined]
        if w.shape != (5,) or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-6):
            raise _fail(cls, "check_aggregator", f"weights {w} are not 5 non-negative numbers "
                        "summing to 1", "normalise the weights, or set linear = False")


def check_privacy(cls: type[Component], registry: Registry) -> None:
    """The mechanism implements the interface of every stage it inherits (its
    stages follow from them); a kit cell runs (or is skipped with a reason);
    DP accounting is a typed Accounting with ε, δ and the accountant."""
    stages = set(stages_of(cls))
    if not stages:
        raise _fail(cls, "check_privacy", "the class inherits no stage interface",
                    "inherit LocalStage, UpdateStage, TransportStage and/or ServerStage and "
                    "implement their methods")
    missing = unimplemented_stage_methods(cls)
    if missing:
        raise _fail(cls, "check_privacy", f"it inherits a stage but does not implement "
                    f"{', '.join(missing)} (a misspelt method name?)",
                    "implement the stage's method with exactly that name, or drop the interface")
    declared = cls.__dict__.get("stages")
    if isinstance(declared, (set, frozenset, tuple, list)) and set(declared) != stages:
        raise _fail(cls, "check_privacy", f"it declares stages {sorted(declared)} but implements "
                    f"{sorted(stages)}", "remove the `stages` attribute: stages follow from the "
                    "interfaces a mechanism inherits")
    if issubclass(cls, TransportStage) and cls.server_view not in ("aggregate", "ciphertext"):
        raise _fail(cls, "check_privacy", f"server_view is {cls.server_view!r}",
                    "a transport mechanism shows the server 'aggregate' or 'ciphertext'")
    assert stages <= set(STAGES)
    rec = _run(registry, privacy=[{"name": cls.name}])
    if rec["status"] == "skipped":
        # e.g. client-level DP needs an unweighted mean: try the kit cell that way
        rec = _run(registry, privacy=[{"name": cls.name}],
                   aggregator={"name": KIT_AGGREGATOR, "by": "uniform"})
    if rec["status"] == "skipped":
        raise _fail(cls, "check_privacy", f"the kit cell was skipped: "
                    f"{(rec['error'] or {}).get('message')}", "accept a plain FedAvg cell with "
                    "an example-weighted or uniform mean, so the mechanism can be exercised")
    if rec["status"] != "ok":
        raise _fail(cls, "check_privacy", f"the kit cell ended {rec['status']}: "
                    f"{(rec['error'] or {}).get('message')}", "see the error above")
    acc = rec["metrics"]["privacy"]["mechanisms"].get(cls.name, {})
    if acc.get("epsilon") is not None and (acc.get("delta") is None or not acc.get("accountant")):
        raise _fail(cls, "check_privacy", f"accounting {acc} gives ε without δ or accountant",
                    "return fedmedbench.Accounting(epsilon=..., delta=..., accountant=...)")
    against = [g.get("epsilon") for g in (acc.get("adversaries") or {}).values()]
    if cls.dp_unit is not None and all(  # type: ignore[attr-defined]
            e is None for e in [acc.get("epsilon"), *against]):
        raise _fail(cls, "check_privacy", f"it declares dp_unit={cls.dp_unit!r} but its "  # type: ignore[attr-defined]
                    f"accounting() reported no ε against any adversary",
                    "return an Accounting from accounting()")


def check_model(cls: type[Component], registry: Registry) -> None:
    """build() gives a module with one logit per class, deterministic for the
    torch seed; a model that declares ``vectorized`` runs under vmap."""
    comp = cls()
    shapes = [(5,), (1, 8, 8)]
    out = None
    for shape in shapes:
        try:
            torch.manual_seed(0)
            m1 = comp.build(shape, 3)  # type: ignore[attr-defined]
        except (ValueError, TypeError):
            continue  # e.g. a CNN asked for tabular input: another shape is tried
        torch.manual_seed(0)
        m2 = comp.build(shape, 3)  # type: ignore[attr-defined]
        x = torch.zeros((2, *shape))
        out = m1(x)
        if tuple(out.shape) != (2, 3):
            raise _fail(cls, "check_model", f"output shape {tuple(out.shape)} for input "
                        f"{tuple(x.shape)} and 3 classes", "return one logit per class")
        if any(not torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters())):
            raise _fail(cls, "check_model", "two builds under the same torch seed differ",
                        "draw the initialisation from torch's global generator")
        if comp.vectorized:
            from torch.func import functional_call, grad, vmap

            names = [n for n, _ in m1.named_parameters()]
            stacked = [torch.stack([p.detach(), p.detach()]) for p in m1.parameters()]

            def loss(ps: list, xb: torch.Tensor, m: torch.nn.Module = m1,
                     names: list = names) -> torch.Tensor:
                return functional_call(m, dict(zip(names, ps)), (xb,)).sum()

            try:
                vmap(grad(loss))(stacked, torch.zeros((2, 2, *shape)))
            except Exception as exc:
                raise _fail(cls, "check_model", f"it declares vectorized = True but vmap failed: "
                            f"{type(exc).__name__}: {exc}", "set vectorized = False (it then "
                            "runs on the loop backend) or avoid in-place buffer updates") from exc
        break
    if out is None:
        raise _fail(cls, "check_model", f"build() failed for every input shape {shapes}",
                    "accept tabular (d,) or image (C, H, W) inputs")


def check_compressor(cls: type[Component], registry: Registry) -> None:
    """compress keeps the update's shape and reports a positive byte count."""
    rec = _run(registry, compressor={"name": cls.name})
    if rec["status"] != "ok":
        raise _fail(cls, "check_compressor", f"the kit cell ended {rec['status']}: "
                    f"{(rec['error'] or {}).get('message')}",
                    "return Updates with same-size deltas and delta_bytes")
    if not rec["metrics"]["cost"]["bytes_up"] > 0:
        raise _fail(cls, "check_compressor", "no bytes were counted", "return the encoded size")


def check_adversary(cls: type[Component], registry: Registry) -> None:
    """corrupt_data keeps the split's length and label range; a kit cell runs."""
    data = KitTabular().load(seed=0)
    adv = cls()
    sp = adv.corrupt_data(data.sites[0].train, num_classes=2,  # type: ignore[attr-defined]
                          rng=np.random.default_rng(0))
    if len(sp) != len(data.sites[0].train) or sp.y.max() >= 2 or sp.y.min() < 0:
        raise _fail(cls, "check_adversary", "corrupt_data changed the split's size or label "
                    "range", "poison values, keep rows and label range")
    rec = _run(registry, adversary={"name": cls.name})
    if rec["status"] not in ("ok", "diverged"):
        raise _fail(cls, "check_adversary", f"the kit cell ended {rec['status']}: "
                    f"{(rec['error'] or {}).get('message')}", "see the error above")


def check_attack(cls: type[Component], registry: Registry) -> None:
    """On a kit cell the attack returns metrics, or not_applicable with a reason."""
    rec = _run(registry, attacks=[cls.name])
    if rec["status"] != "ok":
        raise _fail(cls, "check_attack", f"the kit cell ended {rec['status']}: "
                    f"{(rec['error'] or {}).get('message')}", "see the error above")
    res = rec["metrics"]["attacks"].get(cls.name)
    if isinstance(res, dict) and "failed" in res:
        err = res["failed"] or {}
        raise _fail(cls, "check_attack", f"evaluate failed: {err.get('message')}",
                    "implement evaluate(ctx) returning a dict of JSON numbers and strings "
                    "(or {'not_applicable': reason}); it must not raise")
    if not isinstance(res, dict) or not res or set(res) <= {"seconds"}:
        raise _fail(cls, "check_attack", f"evaluate returned {res!r}",
                    "return a dict of metrics or {'not_applicable': reason}")
    if "not_applicable" in res and not (isinstance(res["not_applicable"], str)
                                        and res["not_applicable"].strip()):
        raise _fail(cls, "check_attack", "not_applicable has no reason",
                    "say why the threat model gives the attacker nothing")


def check_reporter(cls: type[Component], registry: Registry) -> None:
    """write() on real records returns files that exist and are non-empty."""
    rec = _run(registry)
    with tempfile.TemporaryDirectory() as d:
        paths = cls().write([rec], Path(d))  # type: ignore[attr-defined]
        if not paths or not all(Path(p).is_file() and Path(p).stat().st_size for p in paths):
            raise _fail(cls, "check_reporter", f"write returned {paths!r}",
                        "write files into out_dir and return their paths")


_COMMON = [check_name, check_keyword_only_params, check_config_roundtrip]
_FAMILY_CHECKS: dict[type[Component], list[Callable[..., None]]] = {
    Dataset: [check_dataset_loads, check_dataset_deterministic],
    Model: [check_model],
    Partitioner: [check_partitioner],
    Algorithm: [check_algorithm_runs],
    Aggregator: [check_aggregator],
    PrivacyMechanism: [check_privacy],
    Compressor: [check_compressor],
    Adversary: [check_adversary],
    Attack: [check_attack],
    Reporter: [check_reporter],
}


def checks_for(cls: type[Component]) -> Iterator[Callable[..., None]]:
    """The checks that apply to ``cls``."""
    yield from _COMMON
    for base, checks in _FAMILY_CHECKS.items():
        if issubclass(cls, base):
            for c in checks:
                if c in (check_dataset_loads, check_dataset_deterministic) and getattr(
                        cls, "needs_user_files", False):
                    continue  # needs files the user supplies: its own tests use fixtures
                yield c


def _bound(check: Callable[..., None], registry: Registry | None) -> Callable[[type], None]:
    def run(cls: type[Component]) -> None:
        check(cls, registry or kit_registry())

    run.__name__ = check.__name__
    run.__doc__ = check.__doc__
    return run


def parametrize_with_checks(classes: list[type[Component]], *,
                            registry: Registry | None = None) -> Any:
    """A ``pytest.mark.parametrize("component, check", ...)`` over every
    applicable check of every class, with ids like ``fedavg-check_name``."""
    import pytest

    params, ids = [], []
    for cls in classes:
        for check in checks_for(cls):
            params.append((cls, _bound(check, registry)))
            ids.append(f"{cls.name}-{check.__name__}")
    return pytest.mark.parametrize("component, check", params, ids=ids)


def run_checks(target: str, *, registry: Registry | None = None,
               out: Callable[[str], None] = print) -> list[str]:
    """Run every applicable check on the components of a plugin (entry-point
    name) or on one component; print a line per check; return the failures."""
    reg = registry or kit_registry()
    infos = [i for i in reg.all() if target in (i.plugin, i.name)
             and i.plugin != KIT_PLUGIN.__name__]
    if not infos:
        from fedmedbench.errors import ConfigError

        raise ConfigError(f"no plugin or component named {target!r}; `fedmedbench plugins` "
                          f"lists plugins (column plugin) and components (column name)")
    failures = []
    for info in infos:
        for check in checks_for(info.cls):
            try:
                check(info.cls, reg)
                out(f"PASS {info.family} {info.name}: {check.__name__}")
            except Exception as exc:
                msg = str(exc) if isinstance(exc, CheckFailure) else (
                    f"{check.__name__}: {info.name}: {type(exc).__name__}: {exc}")
                failures.append(msg)
                out(f"FAIL {msg}")
    out(f"{len(failures)} failed" if failures else "all checks passed")
    return failures


__all__ = ["CheckFailure", "KIT_DATASET", "KIT_ALGORITHM", "checks_for", "kit_cell",
           "kit_registry", "parametrize_with_checks", "run_checks", *(
               f.__name__ for f in _COMMON), *(f.__name__ for fs in _FAMILY_CHECKS.values()
                                              for f in fs), "FAMILIES"]
