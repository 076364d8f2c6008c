"""Base classes of the component families and the data types they exchange.

Every component is a class with a unique ``name`` and keyword-only constructor
arguments with defaults: its configuration *is* its signature, so a matrix
entry such as ``{name = "fedprox", mu = 0.01}`` validates against
``FedProx.__init__`` and round-trips through JSON (:meth:`Component.params`).

Updates travel through the round as flat ``float32`` vectors over the model's
parameters (:class:`ParamLayout` maps names and shapes to slices), so clipping,
noise, masking, encryption and robust aggregation all work on one shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from fedmedbench.engine import AttackContext, ClientContext, RoundContext

__all__ = [
    "Component",
    "Split",
    "Site",
    "Task",
    "FederatedData",
    "ParamLayout",
    "ClientUpdate",
    "Message",
    "Dataset",
    "Partitioner",
    "Algorithm",
    "Aggregator",
    "PrivacyMechanism",
    "Compressor",
    "Adversary",
    "Attack",
    "Reporter",
    "FAMILIES",
    "STAGES",
]


# --------------------------------------------------------------------------
# component base
# --------------------------------------------------------------------------


class Component:
    """Base of every plugin component.

    Subclasses set ``name`` (unique across all plugins, lower-case with dashes)
    and take only keyword-only constructor arguments with defaults. The
    harness fills ``plugin`` and ``distribution`` at registration.
    """

    family: ClassVar[str] = ""
    name: ClassVar[str] = ""
    #: set at registration: the entry-point name and the distribution it came from
    plugin: ClassVar[str] = ""
    distribution: ClassVar[str] = ""
    version: ClassVar[str] = ""

    @classmethod
    def param_spec(cls) -> dict[str, inspect.Parameter]:
        """The constructor's keyword-only parameters, by name."""
        sig = inspect.signature(cls.__init__)
        return {
            n: p
            for n, p in sig.parameters.items()
            if n != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def params(self) -> dict[str, Any]:
        """The resolved configuration: every constructor parameter's value.

        A component stores each constructor argument under an attribute of the
        same name (the scikit-learn convention); this reads them back.
        """
        return {n: _jsonable(getattr(self, n)) for n in self.param_spec()}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: what a matrix cell records."""
        return {"name": self.name, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


@dataclass
class Split:
    """Arrays of one split: ``X`` float32 features (any shape after the batch
    axis), ``y`` int64 class labels."""

    X: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.X) != len(self.y):
            raise ValueError(f"Split has {len(self.X)} rows of X but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.X[idx], self.y[idx])

    @staticmethod
    def concat(splits: list[Split]) -> Split:
        splits = [s for s in splits if len(s)]
        if not splits:
            raise ValueError("cannot concatenate zero non-empty splits")
        return Split(np.concatenate([s.X for s in splits]), np.concatenate([s.y for s in splits]))


@dataclass
class Site:
    """One client: a hospital, a batch, or a partition of pooled data."""

    name: str
    train: Split
    test: Split
    #: an optional data-quality score in [0, 1] (e.g. 1 - missing-value rate)
    quality: float | None = None


@dataclass
class Task:
    """What is predicted and how it is scored.

    ``metric`` is one of ``accuracy``, ``balanced_accuracy``, ``auroc``
    (:mod:`fedmedbench.metrics`). ``model`` names a default architecture in
    :mod:`fedmedbench.models` and ``model_kwargs`` configures it.
    """

    kind: str  # "binary" | "multiclass"
    num_classes: int
    input_shape: tuple[int, ...]
    metric: str = "accuracy"
    model: str = "logistic"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_names: list[str] | None = None


@dataclass
class FederatedData:
    """Per-site train/test splits of one dataset, plus an optional public split
    (data no client holds: for distillation or pretraining)."""

    task: Task
    sites: list[Site]
    public: Split | None = None
    #: True when ``sites`` are real institutions / batches (natural partition)
    natural: bool = True

    def pooled_train(self) -> Split:
        return Split.concat([s.train for s in self.sites])

    def pooled_test(self) -> Split:
        return Split.concat([s.test for s in self.sites])

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


# --------------------------------------------------------------------------
# updates
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of a model's parameters in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> ParamLayout:
        items = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        return cls(tuple(n for n, _ in items), tuple(s for _, s in items))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s)) if s else 1 for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        out, off = {}, 0
        for n, k in zip(self.names, self.sizes):
            out[n] = slice(off, off + k)
            off += k
        return out

    def select(self, prefixes: list[str] | tuple[str, ...]) -> np.ndarray:
        """Boolean mask over the flat vector for parameters whose name starts
        with any of ``prefixes`` (e.g. ``["fc"]`` selects ``fc.weight``, ``fc.bias``)."""
        mask = np.zeros(self.numel, dtype=bool)
        for n, s in self.slices().items():
            if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes):
                mask[s] = True
        return mask


@dataclass
class ClientUpdate:
    """What one client sends for one round, before transport encoding.

    ``delta`` is the flat float32 vector ``w_local - w_global``;
    ``num_examples`` the client's training set size; ``metrics`` the client's
    own numbers (``loss``, ...); ``extra`` algorithm state that travels with
    the update (SCAFFOLD's control-variate delta, FedMD's soft labels).
    """

    client: int
    delta: torch.Tensor
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Message:
    """A transport-encoded update: the opaque ``payload`` and its serialized
    size in bytes (what crosses the network)."""

    client: int
    payload: Any
    nbytes: int


# --------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------


class Dataset(Component):
    """A loader giving per-site train/test splits (:class:`FederatedData`).

    ``card`` names a folder under ``datasets/`` holding ``card.toml`` and the
    shipped files (``None`` for generators). ``default_partitioner`` is used
    when the matrix leaves the partitioner axis out. ``run_defaults`` are run
    settings (``lr``, ``batch_size``, ``local_steps``, ...) that suit the
    dataset; the matrix ``[run]`` table overrides them.
    """

    family: ClassVar[str] = "dataset"
    card: ClassVar[str | None] = None
    default_partitioner: ClassVar[dict[str, Any]] = {"name": "natural"}
    run_defaults: ClassVar[dict[str, Any]] = {}
    #: True when the loader needs files the user supplies (not shipped)
    needs_user_files: ClassVar[bool] = False

    def load(self, *, seed: int) -> FederatedData:
        """Return the data for ``seed`` (the same data for the same seed)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A summary for ``fedmedbench datasets`` (card fields are added by the harness)."""
        return {}

    def check_files(self) -> None:
        """Check, before anything trains, that the files :meth:`load` reads are
        there and intact; raise :class:`~fedmedbench.DataError` naming each
        file and how to obtain or repair it.

        Matrix validation calls it once per dataset of the matrix, so it should
        be cheap: existence, headers, checksums (memoised), not a full parse.
        The default checks nothing (generators have no files). Shipped data:
        ``fedmedbench.check_card_files(self.card)`` verifies every file the
        card lists against its sha256.
        """
        return None


class Partitioner(Component):
    """Splits a dataset into clients. ``natural`` keeps the dataset's sites."""

    family: ClassVar[str] = "partitioner"

    def partition(self, data: FederatedData, *, seed: int) -> FederatedData:
        raise NotImplementedError


class Algorithm(Component):
    """Client update + server update.

    ``topology`` tells the engine who trains what:

    - ``"federated"``: every sampled site trains from the global model; the
      server aggregates updates (FedAvg and friends);
    - ``"centralized"``: one party trains on the pooled data (upper baseline);
    - ``"local"``: each site trains alone and is evaluated with its own model;
    - ``"personalized"``: each site keeps its own model (evaluated like
      ``local``, possibly of its own architecture, :meth:`client_model`) and
      the server combines what the clients send in ``ClientUpdate.extra``
      (FedMD's soft labels); :meth:`server_update` is called once per client
      with that client's parameters and delta and *every* update.

    The default :meth:`client_update` runs local SGD through
    ``ctx.train(...)`` and returns the parameter delta; the default
    :meth:`server_update` adds the aggregate to the global model.
    """

    family: ClassVar[str] = "algorithm"
    topology: ClassVar[str] = "federated"
    #: the algorithm needs ``FederatedData.public`` (distillation)
    needs_public: ClassVar[bool] = False
    #: the server must see each client's model (distillation): rules out transport privacy
    needs_individual_updates: ClassVar[bool] = False

    def setup(self, ctx: RoundContext) -> None:
        """Called once per cell before round 1 (allocate server/client state)."""

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> ClientUpdate:
        new = ctx.train(global_params)
        return ctx.update(new - global_params)

    def server_update(
        self, ctx: RoundContext, global_params: torch.Tensor, aggregate: torch.Tensor,
        updates: list[ClientUpdate],
    ) -> torch.Tensor:
        """Return the next global model. ``aggregate`` is the aggregated delta;
        ``updates`` carry only metadata and ``extra`` when a transport mechanism
        hides the deltas (their ``delta`` is then empty)."""
        return global_params + aggregate

    def validate(self, cell: Mapping[str, Any]) -> str | None:
        """Return a reason string if this algorithm cannot run the cell."""
        return None

    def client_model(self, ctx: RoundContext, client: int) -> dict[str, Any] | None:
        """(``local``/``personalized`` topologies) The architecture of
        ``client``'s model as ``{"model": name, **kwargs}`` for
        :func:`fedmedbench.build_model`, or ``None`` for the task's default."""
        return None

    def bytes_down(self, ctx: RoundContext, model_bytes: int) -> int:
        """Bytes the server sends each participating client per round
        (default: the global model, ``model_bytes``; ``0`` under the
        ``personalized`` topology, where no global model exists)."""
        return model_bytes


class Aggregator(Component):
    """How the server combines client updates.

    A ``linear`` aggregator is a weighted mean with weights from update
    metadata (:meth:`weights`): it also works over a secure sum, where the
    engine pre-scales each update by its weight. A non-linear rule (median,
    Krum) needs plaintext updates and overrides :meth:`aggregate`.
    """

    family: ClassVar[str] = "aggregator"
    linear: ClassVar[bool] = True

    def weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """Non-negative weights summing to 1, one per update."""
        raise NotImplementedError

    def aggregate(self, updates: list[ClientUpdate]) -> torch.Tensor:
        w = torch.as_tensor(self.weights(updates), dtype=torch.float32)
        return torch.stack([u.delta for u in updates]).T @ w

    def holdout_fraction(self) -> float:
        """Fraction of each client's training rows the engine holds out (seeded)
        for :meth:`client_metrics` to score on; those rows are not trained on."""
        return 0.0

    def client_metrics(self, ctx: ClientContext, global_params: torch.Tensor,
                       update: ClientUpdate) -> dict[str, float]:
        """Runs **on the client** after local training: numbers the rule needs
        (a quality score, accuracy on ``ctx.holdout``), merged into
        ``update.metrics`` and sent in plaintext with the update's metadata."""
        return {}


STAGES = ("local", "update", "transport", "server")


class PrivacyMechanism(Component):
    """A protection at one or more stages of the round (DESIGN, "One round").

    ``stages`` is a subset of ``STAGES``:

    - ``local``: wraps a client's local training (:meth:`make_private`, DP-SGD);
    - ``update``: transforms a client's update (:meth:`process_update`, clipping, noise);
    - ``transport``: encodes updates so the server sees only ``Message``s and
      :meth:`aggregate` returns only their **sum** (secure aggregation, HE);
    - ``server``: transforms the aggregate (:meth:`process_aggregate`, central DP).

    ``server_view`` (transport mechanisms) says what an honest-but-curious
    server reads: ``"aggregate"`` or ``"ciphertext"``.
    """

    family: ClassVar[str] = "privacy"
    stages: ClassVar[frozenset[str]] = frozenset()
    server_view: ClassVar[str] = "plaintext"

    def validate(self, cell: Mapping[str, Any]) -> str | None:
        """Return a reason string if the mechanism cannot run this cell."""
        return None

    def setup(self, ctx: RoundContext) -> None:
        """Called once per cell before round 1."""

    def make_private(self, ctx: ClientContext, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, loader: Any) -> tuple[Any, Any, Any]:
        """(``local``) Wrap a client's model, optimizer and data loader, once per
        client per cell; return the wrapped triple."""
        return model, optimizer, loader

    def process_update(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        """(``update``) Return the update to send."""
        return update

    def encode(self, ctx: RoundContext, client: int, vector: torch.Tensor) -> Message:
        """(``transport``) Encode a (weight-scaled) client vector."""
        raise NotImplementedError

    def aggregate(self, ctx: RoundContext, messages: list[Message]) -> torch.Tensor:
        """(``transport``) Return the plaintext sum of the encoded vectors."""
        raise NotImplementedError

    def bytes_down(self, ctx: RoundContext) -> int:
        """(``transport``) Extra bytes sent to each client per round (keys, masks)."""
        return 0

    def process_aggregate(self, ctx: RoundContext, aggregate: torch.Tensor,
                          n_clients: int) -> torch.Tensor:
        """(``server``) Return the aggregate the server update uses."""
        return aggregate

    def accounting(self) -> dict[str, Any]:
        """What was spent so far: for DP ``{"epsilon", "delta", "accountant",
        "noise_multiplier", ...}`` (ε always with its δ), else ``{}``."""
        return {}


class Compressor(Component):
    """Lossy encoding of client updates. :meth:`compress` returns the decoded
    update the server will use and the encoded size in bytes."""

    family: ClassVar[str] = "compressor"

    def compress(self, ctx: RoundContext, update: ClientUpdate) -> tuple[ClientUpdate, int]:
        raise NotImplementedError


class Adversary(Component):
    """Malicious client behaviour during training. A ``fraction`` of clients
    (chosen with the cell seed) are malicious; :meth:`corrupt_data` changes
    their training data once, :meth:`corrupt_update` each update they send."""

    family: ClassVar[str] = "adversary"

    def __init__(self, *, fraction: float = 0.0) -> None:
        self.fraction = fraction

    def corrupt_data(self, split: Split, *, num_classes: int, rng: np.random.Generator) -> Split:
        return split

    def corrupt_update(self, ctx: RoundContext, update: ClientUpdate,
                       rng: np.random.Generator) -> ClientUpdate:
        return update


class Attack(Component):
    """An evaluation of what leaks, run after training on what the threat
    model exposes (:class:`fedmedbench.engine.AttackContext`).

    :meth:`evaluate` returns a dict of metrics, or
    ``{"not_applicable": reason}`` when the attacker's view gives it nothing.
    """

    family: ClassVar[str] = "attack"

    def evaluate(self, ctx: AttackContext) -> dict[str, Any]:
        raise NotImplementedError


class Reporter(Component):
    """A writer of reports from result records; returns the paths it wrote."""

    family: ClassVar[str] = "reporter"

    def write(self, records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        raise NotImplementedError


FAMILIES: dict[str, type[Component]] = {
    "dataset": Dataset,
    "partitioner": Partitioner,
    "algorithm": Algorithm,
    "aggregator": Aggregator,
    "privacy": PrivacyMechanism,
    "compressor": Compressor,
    "adversary": Adversary,
    "attack": Attack,
    "reporter": Reporter,
}

ModelFactory = Callable[[], torch.nn.Module]
