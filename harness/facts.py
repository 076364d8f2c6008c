"""Declared capabilities of a cell's components, and the engine's combination rules.

Every rule that says "this combination does not hold" reads a typed
:class:`CellFacts`, built from what each component states about itself
(:attr:`Aggregator.weighting`, :attr:`TransportStage.server_view`,
:attr:`Algorithm.sends`, ...), never from another plugin's parameter names.
A component with other parameter names but the same declared facts gets
exactly the same refusals.

:func:`combination_problem` holds the engine's own rules (those about the
round's shape); each component adds its own in ``validate(facts)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedmedbench.components import (
    PERSONAL_MODELS,
    SHARES,
    WEIGHTINGS,
    Adversary,
    Aggregator,
    Algorithm,
    Compressor,
    Model,
    PrivacyMechanism,
    TransportStage,
    stages_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from fedmedbench.training import RunSettings

__all__ = ["AlgorithmFacts", "AggregatorFacts", "PrivacyFacts", "CompressorFacts",
           "CellFacts", "ModelFacts", "facts_of", "combination_problem", "model_problem"]


@dataclass(frozen=True)
class AlgorithmFacts:
    name: str
    protocol: str
    sends: tuple[str, ...]
    needs_public: bool
    needs_individual_updates: bool
    vectorized: bool
    #: what part of the model a client's delta carries: "model" (all of it), "part"
    #: (the parameters of :meth:`Algorithm.shared_mask`), "none" (no delta is sent)
    shares: str = "model"
    #: "merged" | "separate" (:attr:`Algorithm.personal_model`)
    personal_model: str = "merged"
    #: sent fields of which the server needs only the sum (:attr:`Algorithm.summed`)
    summed: tuple[str, ...] = ()
    #: what the server sends the clients beside the model (:attr:`Algorithm.broadcasts`)
    broadcasts: tuple[str, ...] = ()


@dataclass(frozen=True)
class AggregatorFacts:
    name: str
    linear: bool
    #: "uniform" | "examples" | "data-dependent"
    weighting: str
    sends_private_scores: bool


@dataclass(frozen=True)
class PrivacyFacts:
    name: str
    stages: frozenset[str]
    #: transport mechanisms: "aggregate" | "ciphertext"; else None
    server_view: str | None
    drops_clients: bool
    needs_uniform_weights: bool
    #: "record" | "client" | None
    dp_unit: str | None
    aggregate_as_sum: bool


@dataclass(frozen=True)
class CompressorFacts:
    name: str
    preserves_norm_bound: bool


@dataclass(frozen=True)
class CellFacts:
    """What the components of one cell state about themselves, plus the run
    settings, the number of rounds and the dataset's name."""

    dataset: str
    model: str | None
    algorithm: AlgorithmFacts
    aggregator: AggregatorFacts
    privacy: tuple[PrivacyFacts, ...]
    compressor: CompressorFacts | None
    adversary: str | None
    run: RunSettings
    rounds: int

    @property
    def transports(self) -> list[PrivacyFacts]:
        return [p for p in self.privacy if "transport" in p.stages]

    @property
    def transport(self) -> PrivacyFacts | None:
        """The (single) transport mechanism of the stack, if any."""
        t = self.transports
        return t[0] if t else None

    @property
    def drops_clients(self) -> bool:
        return any(p.drops_clients for p in self.privacy)

    @property
    def dp(self) -> list[PrivacyFacts]:
        """The mechanisms with a differential-privacy guarantee."""
        return [p for p in self.privacy if p.dp_unit is not None]

    def describe_aggregator(self) -> str:
        a = self.aggregator
        return f"{a.name} ({'linear' if a.linear else 'non-linear'}, weights: {a.weighting})"


def _aggregator_facts(agg: Aggregator) -> AggregatorFacts:
    weighting = str(agg.weighting)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"aggregator {agg.name!r} declares weighting={weighting!r}; use one of "
                         f"{', '.join(WEIGHTINGS)}")
    return AggregatorFacts(agg.name, bool(agg.linear), weighting, bool(agg.sends_private_scores))


def _privacy_facts(m: PrivacyMechanism) -> PrivacyFacts:
    stages = stages_of(type(m))
    view = str(m.server_view) if isinstance(m, TransportStage) else None
    return PrivacyFacts(m.name, stages, view, bool(m.drops_clients),
                        bool(m.needs_uniform_weights), m.dp_unit, bool(m.aggregate_as_sum))


def _shares(alg: Algorithm) -> str:
    shares = str(alg.shares)
    if shares not in SHARES[:2]:
        raise ValueError(f"algorithm {alg.name!r} declares shares={shares!r}; use 'model' (the "
                         f"whole delta) or 'part' (the parameters shared_mask selects)")
    if alg.protocol in ("pooled", "isolated") or "delta" not in tuple(alg.sends):
        return "none"
    return shares


def _summed(alg: Algorithm) -> tuple[str, ...]:
    summed = tuple(str(f) for f in getattr(alg, "summed", ()) or ())
    bad = [f for f in summed if f == "delta" or f not in tuple(alg.sends)]
    if bad:
        raise ValueError(f"algorithm {alg.name!r} declares summed={summed!r}; summed fields must "
                         f"be fields it sends other than 'delta' (sends={tuple(alg.sends)!r})")
    return summed


def _personal_model(alg: Algorithm) -> str:
    pm = str(alg.personal_model)
    if pm not in PERSONAL_MODELS:
        raise ValueError(f"algorithm {alg.name!r} declares personal_model={pm!r}; use one of "
                         f"{', '.join(PERSONAL_MODELS)}")
    return pm


def facts_of(*, dataset: str, model: Model | None, algorithm: Algorithm, aggregator: Aggregator,
             privacy: Sequence[PrivacyMechanism], compressor: Compressor | None,
             adversary: Adversary | None, run: RunSettings, rounds: int) -> CellFacts:
    """Collect the declared facts of built components into :class:`CellFacts`."""
    alg = AlgorithmFacts(algorithm.name, algorithm.protocol, tuple(algorithm.sends),
                         bool(algorithm.needs_public), bool(algorithm.needs_individual_updates),
                         bool(algorithm.vectorized), _shares(algorithm),
                         _personal_model(algorithm), _summed(algorithm),
                         tuple(str(b) for b in getattr(algorithm, "broadcasts", ()) or ()))
    comp = (CompressorFacts(compressor.name, bool(compressor.preserves_norm_bound))
            if compressor is not None else None)
    return CellFacts(
        dataset=dataset, model=model.name if model is not None else None, algorithm=alg,
        aggregator=_aggregator_facts(aggregator),
        privacy=tuple(_privacy_facts(m) for m in privacy), compressor=comp,
        adversary=adversary.name if adversary is not None else None, run=run, rounds=rounds)


def combination_problem(f: CellFacts) -> str | None:
    """The engine's own rules for stacks that cannot work; ``None`` if fine."""
    transports = [p.name for p in f.transports]
    alg = f.algorithm
    sending = [p.name for p in f.privacy if p.stages & {"update", "transport", "server"}]
    if sending and alg.protocol in ("pooled", "isolated"):
        return (f"{sending[0]} protects what clients send the server, and {alg.name} "
                f"({alg.protocol} protocol) sends nothing")
    if len(transports) > 1:
        return (f"two transport mechanisms {transports}: an update can be encoded by only one "
                f"(stack an update-stage mechanism such as dp-fedavg with one transport)")
    if transports and alg.shares == "none":
        return (f"{transports[0]} protects aggregation, and {alg.name} ({alg.protocol} "
                f"protocol) aggregates no model updates")
    if alg.shares == "part" and f.compressor is not None:
        return (f"compressor {f.compressor.name} encodes the whole parameter vector, and "
                f"{alg.name} sends only part of it (the rest stays on the clients): the "
                f"encoding and its bytes would cover parameters that are never sent")
    if transports and not f.aggregator.linear:
        return (f"aggregator {f.aggregator.name} is non-linear and needs plaintext updates, but "
                f"{transports[0]} shows the server only a sum")
    if transports and alg.needs_individual_updates:
        return (f"{alg.name} needs every client's model at the server, but {transports[0]} "
                f"shows the server only a sum")
    if transports and any(s != "delta" and s not in alg.summed for s in alg.sends):
        extra = [s for s in alg.sends if s != "delta" and s not in alg.summed]
        return (f"{alg.name} also sends {extra} with each update, and the server needs each "
                f"client's value (they are not declared `summed`), which {transports[0]} "
                f"would hide: {transports[0]} shows the server only sums")
    client_dp = [p.name for p in f.privacy if p.dp_unit == "client"]
    if client_dp and any(s != "delta" for s in alg.sends):
        extra = [s for s in alg.sends if s != "delta"]
        return (f"{client_dp[0]} clips and noises the model delta only, and {alg.name} also "
                f"sends {extra}, which is computed from the same private update and would "
                f"reach the server un-noised, so the client-level guarantee would not hold")
    t = f.transport
    if t is not None and t.drops_clients and f.aggregator.weighting != "uniform":
        return (f"{t.name} drops clients and rescales the survivors' sum by n/k, which is the "
                f"mean only for uniform weights, and the aggregator is "
                f"{f.describe_aggregator()}; use {{name = \"weighted-mean\", by = \"uniform\"}}")
    needs_uniform = [p.name for p in f.privacy if p.needs_uniform_weights]
    if needs_uniform and f.aggregator.weighting != "uniform":
        return (f"{needs_uniform[0]} needs uniform client weights and the aggregator is "
                f"{f.describe_aggregator()}; use {{name = \"weighted-mean\", by = \"uniform\"}}")
    if f.dp and f.aggregator.sends_private_scores:
        return (f"{f.aggregator.name} has each client send a score computed on its private "
                f"records in the clear every round, outside the guarantee of "
                f"{f.dp[0].name}; weight by examples or uniformly")
    return None


@dataclass(frozen=True)
class ModelFacts:
    """What the cell's built architecture holds beyond its parameters
    (known once the model is built, before round 1).

    ``batch_norm`` names the BatchNorm layers (they mix the examples of a
    batch, and their running statistics are buffers computed from the
    training records); ``buffer_numel`` counts those statistics' values.
    """

    name: str
    batch_norm: tuple[str, ...] = ()
    buffer_numel: int = 0

    @classmethod
    def of(cls, name: str, module: Any) -> ModelFacts:
        from torch import nn

        bn = tuple(n for n, m in module.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm))
        numel = sum(int(b.numel()) for n, b in module.named_buffers()
                    if b.is_floating_point())
        return cls(name, bn, numel)


def model_problem(f: CellFacts, m: ModelFacts, *, sends_buffers: bool) -> str | None:
    """Rules about the built model: ``sends_buffers`` says the clients send
    their running statistics with the update (whole-model algorithms)."""
    record_dp = [p.name for p in f.privacy if p.dp_unit == "record" and "local" in p.stages]
    if m.batch_norm and record_dp:
        return (f"{record_dp[0]} clips each example's gradient, and model {m.name} has "
                f"BatchNorm layers ({', '.join(m.batch_norm[:3])}), which mix the examples "
                f"of a batch and keep running statistics of the records: per-example "
                f"gradients do not exist (Opacus refuses BatchNorm); use a model with "
                f"norm = \"group\" or \"none\"")
    protected = [p.name for p in f.privacy if p.stages & {"update", "transport", "server"}]
    if sends_buffers and m.buffer_numel and protected:
        return (f"model {m.name} keeps running statistics ({m.buffer_numel} values of "
                f"BatchNorm buffers) computed from the clients' records; {f.algorithm.name} "
                f"sends them with the update to average them, in the clear and un-noised, "
                f"beside the update that {protected[0]} protects; use fedbn (they stay on "
                f"the clients) or a model without BatchNorm")
    return None


def describe(f: CellFacts) -> dict[str, Any]:
    """The facts as JSON (kept in the record, so a reader sees what rules saw)."""
    import dataclasses

    d = dataclasses.asdict(f)
    d["run"] = dataclasses.asdict(f.run)
    d["privacy"] = [{**p, "stages": sorted(p["stages"])} for p in d["privacy"]]
    return d
