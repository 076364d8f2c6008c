"""Building a cell: components per party, declared facts, data, federation.

:func:`build_cell` turns one resolved cell (a matrix point) into a
:class:`Cell`, once, before round 1: it builds every component (a component
acting on both sides of the round once per party), collects the declared
facts and applies the combination rules (a :class:`~fedmedbench.errors.Skip`
names the reason), loads and partitions the data, carves the validation and
holdout rows, inserts an audit's canaries, builds the model factories and
the two parties' contexts, and calls every component's ``setup``.

The :class:`Cell` it returns does not change afterwards; the round
(:mod:`fedmedbench.protocols`) and the parties (:mod:`fedmedbench.parties`)
get from it the parts they need, explicitly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.components import (
    Adversary,
    Aggregator,
    Algorithm,
    Attack,
    Component,
    Compressor,
    FederatedData,
    LocalStage,
    Model,
    Network,
    ParamLayout,
    PrivacyMechanism,
    ServerStage,
    Sharing,
    SiteProfile,
    TransportStage,
    UpdateStage,
    stages_of,
)
from fedmedbench.context import Canaries, CellContext, ClientCanaries, GradientCanaries
from fedmedbench.errors import ConfigError, PluginError, Skip
from fedmedbench.facts import CellFacts, ModelFacts, combination_problem, facts_of, model_problem
from fedmedbench.federation import Federation, cell_rng, clients_per_round
from fedmedbench.meters import calling

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.protocols import Setting
    from fedmedbench.registry import Registry
    from fedmedbench.training import RunSettings

__all__ = ["Cell", "PartyComponents", "build_cell", "attack_key", "seed_torch",
           "seed_everything", "ModelFactory", "peek_model", "tune_allocator"]


@dataclass(frozen=True)
class PartyComponents:
    """The component instances one party runs (a party's own objects)."""

    algorithm: Algorithm
    aggregator: Aggregator
    update_stage: tuple[UpdateStage, ...] = ()
    server_stage: tuple[ServerStage, ...] = ()
    local_stage: LocalStage | None = None
    compressor: Compressor | None = None
    adversary: Adversary | None = None

    def lifecycle(self) -> list[Component]:
        out: list[Any] = [self.algorithm, self.aggregator, self.local_stage, *self.update_stage,
                          *self.server_stage, self.compressor, self.adversary]
        return _unique(out)


@dataclass(frozen=True)
class Cell:
    """One built cell (module docstring). Nothing here changes after build."""

    cell: Mapping[str, Any]
    seed: int
    rounds: int
    settings: RunSettings
    setting: Setting
    facts: CellFacts
    data: FederatedData
    federation: Federation
    model: Model
    factory: Callable[[], torch.nn.Module]
    client_factories: Mapping[int, Callable[[], torch.nn.Module]]
    model_spec: Mapping[str, Any]
    client_specs: Mapping[int, Mapping[str, Any]]
    layout: ParamLayout
    sharing: Sharing
    clients: PartyComponents
    server: PartyComponents
    transport: TransportStage | None
    #: each privacy mechanism, in stack order, as (name, the instance that reports it)
    privacy: tuple[tuple[str, PrivacyMechanism], ...]
    attacks: tuple[tuple[str, Attack], ...]
    clients_ctx: CellContext
    server_ctx: CellContext
    per_round: int
    canaries: Canaries | GradientCanaries | ClientCanaries | None = None
    canary_attack: str | None = None
    #: the ids of the included canary clients (after the real ones)
    canary_clients: tuple[int, ...] = ()
    #: why an auditing attack's canaries were not inserted (none could take them)
    canary_problem: str | None = None
    #: what the dataset's preparation computed across sites, outside the federation
    outside_threat_model: tuple[str, ...] = ()
    setup_seconds: float = 0.0
    pretrain_loss: list[float] = field(default_factory=list)
    #: the network twin's input (:mod:`fedmedbench.clock`): the network (``None``: the twin
    #: is off, ``network = "none"``), its label, and each training party's profile
    network: Network | None = None
    network_label: str = "uniform"
    site_profiles: tuple[SiteProfile, ...] = ()
    #: (buffered protocol) buffer size, concurrency and maximum staleness
    buffer_plan: tuple[int, int, int] | None = None

    @property
    def id(self) -> str:
        return str(self.cell["cell_id"])

    @property
    def dp(self) -> bool:
        return bool(self.facts.dp)

    @property
    def sum_contributions(self) -> bool:
        """An update stage weights each row itself (a fixed-denominator
        estimator): the server sums the rows."""
        return any(m.aggregate_as_sum for _, m in self.privacy)

    def factory_for(self, client: int) -> Callable[[], torch.nn.Module]:
        return self.client_factories.get(client, self.factory)

    def all_components(self) -> list[Component]:
        """Every built instance with lifecycle hooks (both parties, the transport)."""
        out: list[Any] = [self.model, *self.clients.lifecycle(), *self.server.lifecycle(),
                          self.transport]
        return _unique(out)

    def sent_metric_keys(self) -> set[str]:
        """Client-side numbers that reach the server in the clear: the
        aggregator's scores, the privacy mechanisms' declared metadata, and
        (without DP) each client's training loss."""
        keys = {str(k) for k in self.server.aggregator.client_metric_keys}
        for _, m in self.privacy:
            keys |= {str(k) for k in m.metric_keys}
        if not self.dp:
            keys.add("loss")
        return keys


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


def seed_torch(seed: int) -> None:
    """``torch.manual_seed`` (the CPU generator; the accelerators' too where
    one is present: seeding them costs ~2 ms a call even when none is)."""
    import torch

    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))


#: glibc's malloc: requests up to this many bytes come from the heap, not fresh mmaps
MMAP_THRESHOLD = 64 << 20
#: and this much freed memory may stay at the heap's top before it goes back to the system
TRIM_THRESHOLD = 256 << 20
_ALLOCATOR: dict[str, Any] = {}


def tune_allocator() -> dict[str, Any]:
    """Keep glibc from mapping and unmapping every large tensor (once per
    process; ``FEDMEDBENCH_TUNE_MALLOC=0`` leaves the allocator alone).

    glibc serves a request above its mmap threshold (128 KiB, raised by
    itself up to 32 MiB as blocks are freed) with fresh pages, each
    faulted in on first touch and unmapped on free. A vectorized round at
    1,000 clients allocates several (k, D) matrices (19 MB for the digits
    MLP) and paid ~50 ms of page faults per cell, a quarter of the cell
    (measured). Raising the thresholds (:data:`MMAP_THRESHOLD`,
    :data:`TRIM_THRESHOLD`) lets freed blocks be reused; the cost is up to
    ``TRIM_THRESHOLD`` bytes of freed memory kept by the process. Returns
    what was set (empty where the C library is not glibc)."""
    if _ALLOCATOR or os.environ.get("FEDMEDBENCH_TUNE_MALLOC", "1") == "0":
        return _ALLOCATOR
    _ALLOCATOR["tried"] = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
            _ALLOCATOR["mmap_threshold"] = MMAP_THRESHOLD
        if libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            _ALLOCATOR["trim_threshold"] = TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        pass
    return _ALLOCATOR


def seed_everything(seed: int) -> None:
    import torch

    seed_torch(seed)
    np.random.seed(seed % 2**32)
    torch.set_num_threads(1)
    tune_allocator()


class ModelFactory:
    """A factory of one seeded module: each call returns a deep copy of the
    template (the seeded initialisation, never trained); :meth:`peek` hands
    the harness the template itself for reading (its structure, parameter
    names, initial values) without the copy."""

    def __init__(self, template: torch.nn.Module) -> None:
        self._template = template

    def __call__(self) -> torch.nn.Module:
        import copy

        return copy.deepcopy(self._template)

    def peek(self) -> torch.nn.Module:
        """The template, not a copy: read it, never train, move or change it."""
        return self._template


def peek_model(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``factory``'s template where it is a :class:`ModelFactory` (to read
    only; a deep copy costs 0.2 ms for a small MLP, and a cell read one 5
    times), else a fresh module."""
    peek = getattr(factory, "peek", None)
    return peek() if callable(peek) else factory()


def model_factory(comp: Model, shape: tuple[int, ...], classes: int, seed: int
                  ) -> ModelFactory:
    """A factory of ``comp``'s module: one seeded initialisation (the same for
    the same seed in every process), deep-copied on each call."""
    seed_torch(seed)
    with calling(comp, "build"):
        template = comp.build(tuple(shape), int(classes))
    return ModelFactory(template)


def build_cell(cell: dict[str, Any], reg: Registry, *, setup_clock: dict[str, float] | None = None
               ) -> Cell:
    """Build, validate and prepare ``cell`` (module docstring)."""
    from fedmedbench.protocols import setting_for, sharing_of
    from fedmedbench.training import RunSettings

    cfg = cell["config"]
    settings = RunSettings(**cfg["run"])
    rounds, seed = int(cfg["rounds"]), int(cfg["seed"])

    def build(family: str, spec: Any, key: str | None = None) -> Any:
        return reg.build(family, spec, key=key)

    dataset = build("dataset", cfg["dataset"])
    partitioner = build("partitioner", cfg["partitioner"])
    model = build("model", cfg["model"]) if cfg.get("model") else None
    alg_c, alg_s = build("algorithm", cfg["algorithm"]), build("algorithm", cfg["algorithm"])
    agg_c, agg_s = build("aggregator", cfg["aggregator"]), build("aggregator", cfg["aggregator"])
    compressor = build("compressor", cfg["compressor"]) if cfg.get("compressor") else None
    adversary = build("adversary", cfg["adversary"]) if cfg.get("adversary") else None
    # privacy: one instance per party that runs a stage of it; a transport is one instance
    homes: list[tuple[str, PrivacyMechanism]] = []
    updates_c, servers_s, extra_instances = [], [], []
    local, transport = None, None
    for spec in cfg["privacy"]:
        cls = reg.get("privacy", spec["name"]).cls
        stages = stages_of(cls)
        if "transport" in stages:
            m = build("privacy", spec)
            transport = transport if transport is not None else m
            if transport is not m:  # two transports: combination_problem refuses it below
                extra_instances.append(m)
            homes.append((m.name, m))
            continue
        client_m = build("privacy", spec) if stages & {"local", "update"} else None
        server_m = build("privacy", spec) if "server" in stages else None
        if client_m is not None and "local" in stages and local is None:
            local = client_m
        if client_m is not None and "update" in stages:
            updates_c.append(client_m)
        if server_m is not None:
            servers_s.append(server_m)
        home = server_m if server_m is not None else client_m
        if home is None:  # a mechanism that declares no stage: kept for its report
            home = build("privacy", spec)
        homes.append((home.name, home))
    attacks_built = [build("attack", a) for a in cfg.get("attacks", [])]
    attacks = tuple((attack_key(a, attacks_built), a) for a in attacks_built)
    facts = facts_of(dataset=dataset.name, model=model, algorithm=alg_s, aggregator=agg_s,
                     privacy=[m for _, m in homes], compressor=compressor,
                     adversary=adversary, run=settings, rounds=rounds)
    setting = setting_for(alg_s)
    # -- validate ---------------------------------------------------------------
    reason = combination_problem(facts)
    if reason:
        raise Skip(reason)
    privacy_instances = [m for _, m in homes] + updates_c + servers_s + extra_instances
    if local is not None:
        privacy_instances.append(local)
    checked: set[int] = set()
    for comp in [dataset, partitioner, model, alg_c, alg_s, agg_c, agg_s, *privacy_instances,
                 compressor, adversary]:
        if comp is None or id(comp) in checked:
            continue
        checked.add(id(comp))
        with calling(comp, "validate"):
            r = comp.validate(facts)
        if r:
            raise Skip(f"{comp.name}: {r}")
    # -- data -------------------------------------------------------------------
    seed_everything(seed)
    with calling(dataset, "load"):
        raw = dataset.load(seed=seed)
    with calling(partitioner, "partition"):
        data: FederatedData = partitioner.partition(raw, seed=seed)
    if alg_s.needs_public and data.public is None:
        raise Skip(f"{alg_s.name} needs a public split and dataset {dataset.name} has none")
    if settings.pretrain_steps > 0 and data.public is None:
        raise Skip(f"pretrain_steps={settings.pretrain_steps} pretrains on the public split "
                   f"and dataset {dataset.name} has none (give the partitioner a "
                   f"public_fraction)")
    task = data.task
    spec = dict(cfg.get("model") or {"name": task.model, **task.model_kwargs})
    if model is None:
        model = build("model", spec, key="model")
    shape, classes = tuple(task.input_shape), int(task.num_classes)
    factory = model_factory(model, shape, classes, seed)
    probe = factory.peek()  # read only: the layout and the model's facts
    with calling(agg_s, "holdout_fraction"):
        holdout = float(agg_s.holdout_fraction()) if setting.aggregates else 0.0

    def call(comp: Component, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
        if hook == "corrupt_data":
            split, num_classes, rng = args
            with calling(comp, hook):
                return fn(split, num_classes=num_classes, rng=rng)
        with calling(comp, hook):
            return fn(*args)

    federation = Federation(data, pooled=setting.pooled, settings=settings, seed=seed,
                            holdout_fraction=holdout,
                            adversary=adversary if setting.aggregates else None, call=call,
                            tuning=cfg.get("tuning"))
    # each party's example count as it is public (sent in the clear, declared on the card):
    # taken before an audit's canaries are inserted, so that no count reveals them
    public_counts = [len(s.train) for s in federation.clients]
    canaries, canary_attack = _pick_canaries(attacks, data, seed)
    federation.insert_canaries(canaries, pooled=setting.pooled)
    n = federation.n
    per_round = federation.per_round(everyone=not setting.samples_clients)
    buffer_plan = None
    if setting.name == "buffered":  # a release is one buffer: k = the buffer's size
        from fedmedbench.protocols import buffered_plan

        buffer_plan = buffered_plan(alg_s, n, per_round)
        per_round = buffer_plan[0]
    fixed_steps = None
    if setting.pooled:  # the pooled party does the work of a federated round at the cell's rate
        q = clients_per_round(len(data.sites), settings) / max(1, len(data.sites))
        fixed_steps = max(1, int(round(q * sum(settings.steps_for(len(s.train))
                                                 for s in federation.source.sites))))
    layout = ParamLayout.of(probe)
    names = [s.name for s in federation.clients]
    ccan, cattack = _pick_canary_clients(attacks, layout, data, seed)
    canary_ids: tuple[int, ...] = ()
    problem = None
    if ccan is not None:
        if canaries is not None:
            raise ConfigError(f"attacks {[canary_attack, cattack]} each insert canaries into "
                              f"training; one run audits one set of canaries: list one "
                              f"auditing attack per matrix")
        extra = [f for f in alg_s.sends if f != "delta"]
        if setting.name != "federated" or extra or "delta" not in alg_s.sends:
            problem = (f"canary clients send a model update and nothing else in a federated "
                       f"round; {alg_s.name} runs the {setting.name} protocol"
                       + (f" and sends {extra}" if extra else ""))
        else:
            inc = np.asarray(ccan.included, dtype=bool)
            canary_ids = tuple(range(n, n + int(inc.sum())))
            names += [f"canary-{j}" for j in np.flatnonzero(inc)]
            public_counts = public_counts + [max(public_counts)] * len(canary_ids)
            canaries, canary_attack = ccan, cattack
    clients_ctx = CellContext(
        cell_id=str(cell["cell_id"]), seed=seed, rounds=rounds, settings=settings, task=task,
        client_names=names, num_examples=public_counts, public=data.public,
        layout=layout, protocol=setting.name, sample_rate=per_round / n, facts=facts,
        model_factory=factory, party="clients", fixed_steps=fixed_steps,
        planned=alg_c.planned_steps)
    server_ctx = clients_ctx.for_party("server")
    # per-client architectures (isolated and personalized protocols)
    client_factories: dict[int, Callable[[], Any]] = {}
    client_specs: dict[int, dict[str, Any]] = {}
    if setting.own_models:
        for i in range(n):
            with calling(alg_c, "client_model"):
                arch = alg_c.client_model(clients_ctx, i)
            if arch is not None:
                arch = dict(arch)
                name = arch.pop("model")
                comp = build("model", {"name": name, **arch}, key=f"{alg_c.name}.client_model")
                client_factories[i] = model_factory(comp, shape, classes, seed)
                client_specs[i] = comp.config()
    sharing = sharing_of(alg_s, clients_ctx, facts, factory)
    mfacts = ModelFacts.of(model.name, probe)
    reason = model_problem(facts, mfacts, sends_buffers=sharing.buffers == "sent")
    if reason:
        raise Skip(reason)
    requested = str(cell.get("backend") or "auto")
    from fedmedbench.backends import BACKENDS

    if requested not in BACKENDS:
        raise ConfigError(f"backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    clients = PartyComponents(algorithm=alg_c, aggregator=agg_c, update_stage=tuple(updates_c),
                              local_stage=local, compressor=compressor, adversary=adversary)
    server = PartyComponents(algorithm=alg_s, aggregator=agg_s, server_stage=tuple(servers_s))
    # gradient-space canaries: the local-stage mechanism takes them into the clients' steps
    gcan, gattack = _pick_gradient_canaries(attacks, layout, data, seed)
    if gcan is not None:
        if canaries is not None:
            raise ConfigError(f"attacks {[canary_attack, gattack]} each insert canaries into "
                              f"training; one run audits one set of canaries: list one "
                              f"auditing attack per matrix")
        canaries, canary_attack = gcan, gattack
    network, net_label, profiles = _network(cfg, reg, federation, public_counts, seed,
                                            pooled=setting.pooled)
    if network is None and setting.asynchronous:
        raise Skip(f"{alg_s.name} runs the buffered (asynchronous) protocol, whose rounds the "
                   f"virtual clock orders; give the cell a network (the default, uniform, "
                   f"or another), not network = \"none\"")
    if network is not None:
        reason = _network_problem(network, profiles, transport, setting, alg_s, agg_s)
        if reason:
            raise Skip(reason)
    built = Cell(
        cell=cell, seed=seed, rounds=rounds, settings=settings, setting=setting, facts=facts,
        data=data, federation=federation, model=model, factory=factory,
        client_factories=client_factories, model_spec=model.config(), client_specs=client_specs,
        layout=layout, sharing=sharing, clients=clients, server=server, transport=transport,
        privacy=tuple(homes), attacks=attacks, clients_ctx=clients_ctx, server_ctx=server_ctx,
        per_round=per_round, canaries=canaries, canary_attack=canary_attack,
        canary_clients=canary_ids, canary_problem=problem,
        outside_threat_model=tuple(_outside(dataset)), network=network,
        network_label=net_label, site_profiles=tuple(profiles), buffer_plan=buffer_plan)
    # -- setup: each instance with its own party's context ------------------------------
    privacy_s = 0.0
    for comp in built.all_components():
        ctx = server_ctx if _on_server(comp, server) else clients_ctx
        t0 = time.perf_counter()
        with calling(comp, "setup"):
            comp.setup(ctx)
        if isinstance(comp, PrivacyMechanism):
            privacy_s += time.perf_counter() - t0
    if setup_clock is not None:
        setup_clock["privacy_s"] = setup_clock.get("privacy_s", 0.0) + privacy_s
    if isinstance(canaries, GradientCanaries):
        took = False
        if local is not None:
            with calling(local, "insert_gradient_canaries"):  # type: ignore[arg-type]
                took = bool(local.insert_gradient_canaries(clients_ctx, canaries))
        if not took:
            problem = ("gradient-space canaries join a local-stage privacy mechanism's steps "
                       + (f"and {local.name} does not insert them"  # type: ignore[attr-defined]
                          if local is not None else "and the cell has none (no DP-SGD)"))
            import dataclasses

            built = dataclasses.replace(built, canaries=None, canary_problem=problem)
    return built


def _network(cfg: Mapping[str, Any], reg: Registry, federation: Federation,
             counts: list[int], seed: int, *, pooled: bool
             ) -> tuple[Network | None, str, list[SiteProfile]]:
    """The cell's network (the base :class:`Network` is ``uniform``; ``None``:
    the twin is off), its label and each training party's profile (the
    pooled protocol's one party, the baseline, computes at this machine's
    speed and sends nothing)."""
    from fedmedbench.clock import network_label, profiles_of

    if "network" in cfg and cfg["network"] is None:
        return None, "none", []
    spec = cfg.get("network")
    network = reg.build("network", spec) if spec else Network()
    if pooled:
        return network, network_label(spec), [SiteProfile(preset="pooled")]
    names = [s.name for s in federation.clients]
    profiles = profiles_of(network, names, counts[:len(names)], seed)
    return network, network_label(spec), profiles


def _network_problem(network: Network, profiles: list[SiteProfile],
                     transport: TransportStage | None, setting: Setting, alg: Algorithm,
                     agg: Aggregator) -> str | None:
    """Combinations the twin cannot run (the reason a cell is skipped)."""
    drops = setting.name != "buffered" and (  # asynchronous arrivals drop no protocol's input
        network.deadline_s is not None or not all(p.availability.always for p in profiles))
    if drops and transport is not None and type(transport).drop is TransportStage.drop:
        return (f"network {network.name or 'uniform'} drops clients (availability or a "
                f"deadline), and {transport.name} has no dropout path for the twin "
                f"(TransportStage.drop): its sum would be left with clients whose inputs "
                f"never arrived; implement drop(), or use a network without outages")
    if drops and transport is not None and transport.drops_clients:
        return (f"{transport.name} injects its own random dropouts and network "
                f"{network.name} decides who drops out: set {transport.name}'s dropout rate "
                f"to 0 under a network, or use the uniform network")
    if setting.name == "buffered" and not agg.linear:
        return (f"{alg.name} scales each buffered update by its staleness inside a weighted "
                f"mean, and aggregator {agg.name} is not linear; use weighted-mean")
    return None


def _outside(dataset: Any) -> list[str]:
    with calling(dataset, "outside_threat_model"):
        got = dataset.outside_threat_model()
    if not isinstance(got, (list, tuple)) or not all(isinstance(x, str) for x in got):
        raise PluginError(f"outside_threat_model() returned {got!r}; return a list of "
                          f"sentences", plugin=dataset.plugin, component=dataset.name,
                          hook="outside_threat_model", exc_type="TypeError")
    return list(got)


def _on_server(comp: Any, server: PartyComponents) -> bool:
    return any(comp is c for c in server.lifecycle())


def _pick_canary_clients(attacks: tuple[tuple[str, Attack], ...], layout: ParamLayout,
                         data: FederatedData, seed: int
                         ) -> tuple[ClientCanaries | None, str | None]:
    """The canary clients of the cell's client-level auditing attack, with
    inclusion bits drawn here (each in with probability 1/2)."""
    picked = []
    for key, a in attacks:
        with calling(a, "canary_clients"):
            can = a.canary_clients(layout, data, cell_rng(seed, "canary-client-pick"))
        if can is None:
            continue
        if not isinstance(can, ClientCanaries):
            raise PluginError(f"canary_clients() returned {type(can).__name__}, not "
                              f"fedmedbench.ClientCanaries (or None)", plugin=a.plugin,
                              component=a.name, hook="canary_clients", exc_type="TypeError")
        d = np.asarray(can.directions, dtype=np.float32)
        if d.ndim != 2 or d.shape[1] != layout.numel or not np.isfinite(d).all():
            raise PluginError(f"canary_clients() gave directions of shape {d.shape}; expected "
                              f"(m, {layout.numel}) finite values", plugin=a.plugin,
                              component=a.name, hook="canary_clients", exc_type="ValueError")
        norms = np.linalg.norm(d, axis=1, keepdims=True)
        picked.append((key, ClientCanaries(d / np.maximum(norms, 1e-12))))
    if not picked:
        return None, None
    if len(picked) > 1:
        raise ConfigError(f"attacks {[k for k, _ in picked]} each insert canaries into "
                          f"training; one run audits one set of canaries: list one "
                          f"auditing attack per matrix")
    key, can = picked[0]
    can.included = cell_rng(seed, "canary-client-inclusion").random(len(can)) < 0.5
    return can, key


def _pick_gradient_canaries(attacks: tuple[tuple[str, Attack], ...], layout: ParamLayout,
                            data: FederatedData, seed: int
                            ) -> tuple[GradientCanaries | None, str | None]:
    """The gradient-space canaries of the cell's white-box auditing attack,
    with inclusion bits drawn here (each in with probability 1/2)."""
    picked = []
    for key, a in attacks:
        with calling(a, "gradient_canaries"):
            can = a.gradient_canaries(layout, data, cell_rng(seed, "gradient-canary-pick"))
        if can is None:
            continue
        if not isinstance(can, GradientCanaries):
            raise PluginError(f"gradient_canaries() returned {type(can).__name__}, not "
                              f"fedmedbench.GradientCanaries (or None)", plugin=a.plugin,
                              component=a.name, hook="gradient_canaries", exc_type="TypeError")
        coords = np.asarray(can.coords, dtype=np.int64)
        site = np.asarray(can.site, dtype=np.int64)
        if len(coords) and (coords.min() < 0 or coords.max() >= layout.numel
                            or site.min() < 0 or site.max() >= len(data.sites)):
            raise PluginError(f"gradient_canaries() gave coordinates outside 0..{layout.numel - 1}"
                              f" or sites outside 0..{len(data.sites) - 1}", plugin=a.plugin,
                              component=a.name, hook="gradient_canaries", exc_type="ValueError")
        picked.append((key, GradientCanaries(coords, site)))
    if not picked:
        return None, None
    if len(picked) > 1:
        raise ConfigError(f"attacks {[k for k, _ in picked]} each insert canaries into "
                          f"training; one run audits one set of canaries: list one "
                          f"auditing attack per matrix")
    key, can = picked[0]
    can.included = cell_rng(seed, "gradient-canary-inclusion").random(len(can)) < 0.5
    return can, key


def _pick_canaries(attacks: tuple[tuple[str, Attack], ...], data: FederatedData, seed: int
                   ) -> tuple[Canaries | None, str | None]:
    """The canaries of the cell's auditing attack (at most one attack may
    insert them), with inclusion bits drawn here: each canary in or out
    of training independently with probability 1/2 (Steinke et al. 2023)."""
    picked = []
    for key, a in attacks:
        with calling(a, "canaries"):
            can = a.canaries(data, cell_rng(seed, "canary-pick"))
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
    can.included = cell_rng(seed, "canary-inclusion").random(len(can)) < 0.5
    return can, key


def _unique(items: list[Any]) -> list[Any]:
    """``items`` without ``None`` and without a second reference to the same object."""
    seen: set[int] = set()
    out = []
    for c in items:
        if c is not None and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out
