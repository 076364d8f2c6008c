"""Base classes of the component families and the data types they exchange.

Every component is a class with a unique ``name`` and keyword-only constructor
arguments with defaults: its configuration *is* its signature, so a matrix
entry such as ``{name = "fedprox", mu = 0.01}`` validates against
``FedProx.__init__`` and round-trips through JSON (:meth:`Component.params`).

Components state facts about themselves as typed attributes (an aggregator's
weighting, a privacy mechanism's server view, what an algorithm's clients
send); the engine collects them into :class:`fedmedbench.facts.CellFacts`, and
every combination rule reads those facts, never another component's
parameter names.

On the clients' side, what they computed travels as one :class:`Updates`
batch: a ``(clients, parameters)`` float32 matrix of deltas over the model's
flat parameter vector (:class:`ParamLayout` maps names and shapes to slices),
so clipping, noise and compression work on one shape, for one client or a
whole round at once. What crosses to the server is another type, built once
at the boundary from the declared fields only
(:class:`fedmedbench.messages.Sent`), and what the server can read of it a
third (:class:`fedmedbench.messages.Received`): see ``docs/architecture.md``.

Every component acting on both sides of the round (an algorithm's client and
server halves, an aggregator's client-side scores and server-side rule, a
privacy mechanism with an update and a server stage) is built once per
party: the clients' instance and the server's instance share no state, and
each gets its own party's :class:`~fedmedbench.CellContext` (``ctx.party``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import torch

    from fedmedbench.accounting import Accounting
    from fedmedbench.context import (
        AttackContext,
        Canaries,
        CellContext,
        ClientCanaries,
        ClientContext,
        GradientCanaries,
    )
    from fedmedbench.facts import CellFacts
    from fedmedbench.messages import Received
    from fedmedbench.training import LocalTrainer

__all__ = [
    "Component", "Split", "Site", "Task", "FederatedData", "ParamLayout", "Updates", "Message",
    "Dataset", "Partitioner", "Model", "Algorithm", "Aggregator", "PrivacyMechanism",
    "LocalStage", "UpdateStage", "TransportStage", "ServerStage", "Compressor", "Adversary",
    "Attack", "Reporter", "FAMILIES", "STAGES", "PROTOCOLS", "WEIGHTINGS", "Sharing", "SHARES",
    "PERSONAL_MODELS", "Network", "SiteProfile", "Availability", "RoundAborted", "DROP_PHASES", "DropPhase",
]


# --------------------------------------------------------------------------
# component base
# --------------------------------------------------------------------------


#: Component.param_spec's signatures, by (class, constructor)
_PARAM_SPECS: dict[tuple[Any, Any], dict[str, inspect.Parameter]] = {}


class Component:
    """Base of every plugin component.

    Subclasses set ``name`` (unique across all plugins, lower-case with dashes)
    and take only keyword-only constructor arguments with defaults. The
    harness fills ``plugin``, ``distribution`` and ``version`` at registration.

    Lifecycle: the engine builds a fresh instance per cell and party (a
    component acting on both the clients' and the server's side gets one
    instance on each), calls :meth:`setup` once before round 1,
    :meth:`begin_round` at the start of every round (after the round's
    clients are sampled), :meth:`end_round` when a round ends (aborted or
    not) and :meth:`close` when training ends (failed or not), so no
    component has to detect a new cell or round by itself.
    """

    family: ClassVar[str] = ""
    name: ClassVar[str] = ""
    #: set at registration: the entry-point name and the distribution it came from
    plugin: ClassVar[str] = ""
    distribution: ClassVar[str] = ""
    version: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check every constructor call against the parameters' annotations
        (:class:`~fedmedbench.Range`, ``Literal``, the types): the same
        rules, and the same :class:`~fedmedbench.errors.ParameterError`,
        whether a matrix builds the component or code calls ``FedProx(mu=-1)``,
        so a constructor does not re-check what its annotations state."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "__fedmedbench_checked__", False):
            return
        import functools

        from fedmedbench.constraints import check_values, rules_of

        @functools.wraps(init)
        def checked(self: Any, *args: Any, **params: Any) -> None:
            check_values(type(self).name or type(self).__name__, rules_of(cls), params)
            init(self, *args, **params)

        checked.__fedmedbench_checked__ = True  # type: ignore[attr-defined]
        cls.__init__ = checked  # type: ignore[method-assign]

    @classmethod
    def param_spec(cls) -> dict[str, inspect.Parameter]:
        """The constructor's keyword-only parameters, by name (read once per
        class and constructor: ``inspect.signature`` costs ~40 µs, and a cell
        checks every component's parameters)."""
        key = (cls, cls.__init__)
        spec = _PARAM_SPECS.get(key)
        if spec is None:
            sig = inspect.signature(cls.__init__)
            spec = _PARAM_SPECS[key] = {
                n: p
                for n, p in sig.parameters.items()
                if n != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY
            }
        return dict(spec)

    def params(self) -> dict[str, Any]:
        """The resolved configuration: every constructor parameter's value.

        A component stores each constructor argument under an attribute of the
        same name (the scikit-learn convention); this reads them back.
        """
        return {n: _jsonable(getattr(self, n)) for n in self.param_spec()}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: what a matrix cell records."""
        return {"name": self.name, **self.params()}

    def validate(self, facts: CellFacts) -> str | None:
        """Say whether this component can run the cell ``facts`` describes.

        Parameters
        ----------
        facts : CellFacts
            The declared facts of every component of the cell and its run
            settings (:mod:`fedmedbench.facts`).

        Returns
        -------
        str or None
            A reason the cell cannot run (it is then recorded ``skipped``
            with that reason), or ``None`` when it can.
        """
        return None

    def setup(self, ctx: CellContext) -> None:
        """Allocate per-cell state, once, before round 1.

        Parameters
        ----------
        ctx : CellContext
            The context of the party this instance belongs to
            (``ctx.party``: ``"clients"`` or ``"server"``); ``ctx.state`` is
            that party's own state.
        """

    def begin_round(self, round: int) -> None:
        """Start round ``round`` (1-based), after its clients are sampled
        (``ctx.participants`` of the context given to :meth:`setup`)."""

    def end_round(self, round: int) -> None:
        """End round ``round``: drop what lives only for a round (a secure
        aggregation's client secrets, per-client ciphertexts). Called when
        the round ends, also when it was aborted."""

    def close(self) -> None:
        """Training is over (finished or failed): drop what lives for the
        cell (a CKKS secret key). Called once; the instance is not used
        afterwards."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
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
    (:mod:`fedmedbench.metrics`). ``model`` names a default architecture (a
    registered :class:`Model`) and ``model_kwargs`` configures it; a matrix
    may choose another with its ``model`` axis.
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
    #: the sites' rows as one party pooling them holds them, when pooling changes
    #: the preprocessing (FLamby standardises pooled training with pooled
    #: statistics, each hospital with its own): the same sites, rows and order
    #: as ``sites``. The pooled protocol trains on these; ``None``: on ``sites``.
    pooled_sites: list[Site] | None = None

    def pooled_train(self) -> Split:
        return Split.concat([s.train for s in self.sites])

    def pooled_test(self) -> Split:
        return Split.concat([s.test for s in self.sites])

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


# --------------------------------------------------------------------------
# what travels
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

    def select(self, prefixes: Sequence[str]) -> np.ndarray:
        """Boolean mask over the flat vector for parameters whose name starts
        with any of ``prefixes`` (e.g. ``["fc"]`` selects ``fc.weight``, ``fc.bias``)."""
        mask = np.zeros(self.numel, dtype=bool)
        for n, s in self.slices().items():
            if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes):
                mask[s] = True
        return mask


@dataclass
class Updates:
    """What the clients of one call computed, one row per client, on the
    clients' side of the round (local training, the adversary, update-stage
    privacy and compression all read and return it). It never reaches the
    server: the engine builds what is sent from its declared fields
    (:class:`fedmedbench.messages.Sent`).

    Attributes
    ----------
    clients : list of int
        Client indices, one per row.
    delta : torch.Tensor, shape (k, D)
        ``w_local - w_global`` of each client, float32, over the flat
        parameter vector.
    num_examples : list of int
        Each client's training-set size. Sent in the clear (public metadata:
        the record names it as such).
    metrics : dict of str to numpy.ndarray, shape (k,)
        Client-side numbers (``loss``; an aggregator's ``quality`` or
        ``holdout_score``). Only those an aggregator reads are sent.
    extra : dict
        Fields with a leading client axis that travel with the update
        (SCAFFOLD's ``control_delta`` of shape (k, D), FedMD's ``scores``).
        Every key must be declared in :attr:`Algorithm.sends` (the
        personalized protocol's ``personal`` model, which never leaves the
        client, aside): an undeclared one is refused with the plugin and
        field named.
    delta_bytes : list of int or None
        The encoded size of each row's delta when a compressor encoded it
        (``None``: float32, ``4 * D`` bytes a row).
    per_client : dict of int to torch.Tensor or None
        Clients of different architectures (FedMD) cannot share one (k, D)
        matrix: their deltas are kept here by client, and ``delta`` is (k, 0).
    """

    clients: list[int]
    delta: torch.Tensor
    num_examples: list[int]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    delta_bytes: list[int] | None = None
    per_client: dict[int, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        k = len(self.clients)
        if self.delta.dim() != 2 or self.delta.shape[0] != k:
            raise ValueError(f"Updates of {k} clients need a ({k}, D) delta, got shape "
                             f"{tuple(self.delta.shape)}")
        if len(self.num_examples) != k:
            raise ValueError(f"Updates of {k} clients got {len(self.num_examples)} example counts")

    def __len__(self) -> int:
        return len(self.clients)

    def replace(self, **changes: Any) -> Updates:
        """A copy with ``changes`` (metrics and extra copied, not shared)."""
        base = {"metrics": dict(self.metrics), "extra": dict(self.extra)}
        return dataclasses.replace(self, **{**base, **changes})

    def rows(self, idx: Sequence[int]) -> Updates:
        """The updates of rows ``idx`` (positions, not client ids)."""
        idx = list(idx)
        sel = np.asarray(idx, dtype=np.int64)
        return Updates(
            clients=[self.clients[i] for i in idx], delta=self.delta[list(idx)],
            num_examples=[self.num_examples[i] for i in idx],
            metrics={k: np.asarray(v)[sel] for k, v in self.metrics.items()},
            extra={k: _take(v, idx) for k, v in self.extra.items()},
            delta_bytes=None if self.delta_bytes is None else [self.delta_bytes[i] for i in idx])

    @staticmethod
    def concat(parts: Sequence[Updates]) -> Updates:
        """One batch from per-client (or per-bucket) batches, rows in order."""
        import torch

        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        keys = set(parts[0].metrics)
        return Updates(
            clients=[c for p in parts for c in p.clients],
            delta=torch.cat([p.delta for p in parts]),
            num_examples=[n for p in parts for n in p.num_examples],
            metrics={k: np.concatenate([np.asarray(p.metrics[k]) for p in parts])
                     for k in keys if all(k in p.metrics for p in parts)},
            extra={k: _cat([p.extra[k] for p in parts]) for k in parts[0].extra
                   if all(k in p.extra for p in parts)},
            delta_bytes=None if any(p.delta_bytes is None for p in parts)
            else [b for p in parts for b in p.delta_bytes])  # type: ignore[union-attr]

    def row_bytes(self, sends: Sequence[str]) -> list[int]:
        """Bytes each client sends of the fields in ``sends`` (``"delta"`` and
        keys of :attr:`extra`): a field's serialized size, from its encoding."""
        k, d = len(self), int(self.delta.shape[1])
        out = [0] * k
        for name in sends:
            if name == "delta":
                sizes = self.delta_bytes or [4 * d] * k
            else:
                sizes = [_nbytes(x) for x in _per_row(self.extra[name], k)]
            out = [a + int(b) for a, b in zip(out, sizes)]
        return out


def _take(v: Any, idx: list[int]) -> Any:
    if isinstance(v, list):
        return [v[i] for i in idx]
    return v[idx]


def _cat(vs: list[Any]) -> Any:
    import torch

    if isinstance(vs[0], torch.Tensor):
        return torch.cat(vs)
    if isinstance(vs[0], np.ndarray):
        return np.concatenate(vs)
    return [x for v in vs for x in v]


def _per_row(v: Any, k: int) -> list[Any]:
    return list(v) if isinstance(v, list) else [v[i] for i in range(k)]


def _nbytes(x: Any) -> int:
    if hasattr(x, "element_size") and hasattr(x, "numel"):
        return int(x.numel() * x.element_size())
    return int(np.asarray(x).nbytes)


#: what part of its model a client's delta carries (:attr:`Algorithm.shares`)
SHARES = ("model", "part", "none")
#: how a client's personal model relates to the global one (:attr:`Algorithm.personal_model`)
PERSONAL_MODELS = ("merged", "separate")


@dataclass(frozen=True)
class Sharing:
    """What each client sends the server of its model every round: the typed
    description the protocol derives from the algorithm's declared
    :attr:`Algorithm.shares` and :meth:`Algorithm.shared_mask` over the
    cell's :class:`ParamLayout`.

    Bytes, the server's view and every update- and transport-stage mechanism
    apply to exactly this part: a client's sent delta is zero outside
    ``mask``, a transport encodes only the ``numel`` sent coordinates, and
    the server's view marks them ``readable``.

    Attributes
    ----------
    layout : ParamLayout
        The model's parameters.
    mask : numpy.ndarray of bool, shape (D,)
        True where clients send their delta and the server averages it (the
        *shared* parameters); False where each client keeps its own (the
        *personal* ones). All True for algorithms that send the whole model.
    delta : bool
        The clients send (part of) their delta at all (False: FedMD, which
        sends soft labels only).
    buffers : {"sent", "local", "none"}
        The model's running statistics (BatchNorm buffers): sent with the
        update and averaged (whole-model algorithms: the global model needs
        them), kept by each client (algorithms with personal parameters:
        they belong to the client's own normalisation), or absent.
    buffer_numel : int
        Values of those running statistics (float32 each).
    fields : tuple of str
        What is sent: ``"delta"``, ``"buffers"`` when sent, and the
        algorithm's other :attr:`Algorithm.sends` keys.
    """

    layout: ParamLayout
    mask: np.ndarray
    delta: bool = True
    buffers: str = "none"
    buffer_numel: int = 0
    fields: tuple[str, ...] = ("delta",)

    @property
    def partial(self) -> bool:
        """Only part of the model is sent (some parameters stay on the clients)."""
        return self.delta and not bool(self.mask.all())

    @property
    def numel(self) -> int:
        """Parameters each client sends (0 without a delta)."""
        return int(self.mask.sum()) if self.delta else 0

    @property
    def index(self) -> Any:
        """The sent coordinates as a ``torch.long`` index."""
        import torch

        return torch.as_tensor(np.flatnonzero(self.mask), dtype=torch.long)

    def names(self, shared: bool = True) -> list[str]:
        """Parameter tensors sent (``shared``) or kept on the clients."""
        sl = self.layout.slices()
        return [n for n in self.layout.names if bool(self.mask[sl[n]].all()) == shared
                and (shared or not self.mask[sl[n]].any())]

    def describe(self) -> dict[str, Any]:
        """The record's ``sharing`` block (JSON)."""
        return {"sent": list(self.fields), "parameters_sent": self.numel,
                "parameters": self.layout.numel, "kept_on_clients": self.names(shared=False)
                if self.delta else list(self.layout.names),
                "buffers": self.buffers, "buffer_values": self.buffer_numel}


@dataclass
class Message:
    """A transport-encoded update: the opaque ``payload`` and its serialized
    size in bytes (what crosses the network).

    ``readable`` is what the server can read of it without any key:
    ``(mask, values)`` over the flat parameter vector (partial HE sends the
    unencrypted layers in plaintext), or ``None`` when nothing is readable.
    A transport may grow ``nbytes`` while it aggregates (secure
    aggregation's unmasking shares are sent then); the engine reads it after.
    """

    client: int
    payload: Any
    nbytes: int
    readable: tuple[np.ndarray, torch.Tensor] | None = None


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
        """Load (or generate) the federation's data.

        Parameters
        ----------
        seed : int
            The cell's seed; the same seed gives the same data (shipped
            datasets with a fixed split ignore it).

        Returns
        -------
        FederatedData
            Per-site train and test splits, the task, a public split where
            there is one.
        """
        raise NotImplementedError(f"dataset {self.name!r} does not implement load(seed=...)")

    def describe(self) -> dict[str, Any]:
        """A summary for ``fedmedbench datasets`` (card fields are added by the harness)."""
        return {}

    def outside_threat_model(self) -> list[str]:
        """What this loader computes across sites before training, outside the
        federation (pooled standardisation statistics): each item a sentence
        naming what it reads and what it reveals. The record lists them under
        ``privacy.outside_threat_model``; an empty list (the default) says the
        preparation reads each site's rows only.
        """
        return []

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
        """Split ``data`` into the cell's clients.

        Parameters
        ----------
        data : FederatedData
            What the dataset loaded.
        seed : int
            The cell's seed (all randomness drawn from it).

        Returns
        -------
        FederatedData
            The clients as sites; test rows never move into a training split.
        """
        raise NotImplementedError(f"partitioner {self.name!r} does not implement partition()")


class Model(Component):
    """A model architecture: a factory of ``torch.nn.Module``.

    :meth:`build` returns a fresh module for an input shape (after the batch
    axis) and a number of classes; it must output one logit per class and be
    deterministic for the torch seed (the engine seeds it). ``vectorized``
    says the module runs under ``torch.func.functional_call`` + ``vmap``
    (no BatchNorm running statistics updated in place, no dropout).
    """

    family: ClassVar[str] = "model"
    vectorized: bool = True

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
        """A fresh module, initialised from torch's global generator (the
        engine seeds it).

        Parameters
        ----------
        input_shape : tuple of int
            One input's shape, after the batch axis.
        num_classes : int

        Returns
        -------
        torch.nn.Module
            One logit per class for inputs of shape ``(batch, *input_shape)``.
        """
        raise NotImplementedError(f"model {self.name!r} does not implement build()")


#: round protocols an algorithm may declare (:mod:`fedmedbench.protocols`)
PROTOCOLS = ("federated", "pooled", "isolated", "personalized", "buffered")


class Algorithm(Component):
    """Client update + server update.

    Declared facts:

    - ``protocol``: which round protocol runs it (:mod:`fedmedbench.protocols`):
      ``"federated"`` (sampled clients train from the global model, the server
      aggregates their updates), ``"pooled"`` (one party trains on the pooled
      data: the upper baseline), ``"isolated"`` (each site alone: the lower
      baseline), ``"personalized"`` (each client keeps a model of its own,
      evaluated on its own test split, and the server combines what the
      clients send);
    - ``sends``: exactly what each client sends the server every round:
      ``"delta"`` and/or keys of :attr:`Updates.extra` (SCAFFOLD: ``("delta",
      "control_delta")``; FedMD: ``("scores",)``). A client's message is
      built from these fields only (an undeclared extra field is refused),
      and bytes up and the server's view are computed from them;
    - ``summed``: the sent fields other than ``"delta"`` of which the server
      needs only the **sum** over the round's clients (SCAFFOLD's
      ``control_delta``, FedNova's ``tau``). Under a transport mechanism
      (secure aggregation, HE) they are protected with the delta and the
      server reads their sum (:meth:`Received.sum`); a sent field not
      declared here cannot run under a transport (the cell is skipped with
      the reason). Clients that want a weighted sum scale their rows first;
    - ``broadcasts``: what the server sends every round's clients beside the
      model, returned by :meth:`broadcast` (SCAFFOLD: ``("c",)``) and read by
      the clients as ``ctx.broadcast[name]``; its bytes are billed down;
    - ``needs_public``: the algorithm needs :attr:`FederatedData.public`;
    - ``needs_individual_updates``: the server uses each client's model
      (distillation), which rules out transport privacy;
    - ``vectorized``: :meth:`client_update` is written for a batch of clients
      (every tensor has a leading client axis), so the vectorized backend may
      run all sampled clients in one call;
    - ``shares`` (personalized protocol): ``"model"`` (the clients send their
      whole delta) or ``"part"`` (only the parameters :meth:`shared_mask`
      selects: FedBN everything but normalisation layers, FedRep/FedPer the
      body). The protocol turns it into a :class:`Sharing`, and bytes, the
      server's view and update/transport privacy apply to exactly that part;
    - ``personal_model`` (personalized protocol): ``"merged"`` (a client's
      model is the global model on the shared parameters and its own on the
      rest: FedBN, FedRep, FedPer, fine-tuning) or ``"separate"`` (each client
      keeps a whole model of its own beside the global one and returns it as
      the ``personal`` extra field of its update, which is never sent: Ditto).

    The clients' half (:meth:`client_update`, :meth:`finalize`) and the
    server's half (:meth:`server_update`, :meth:`broadcast`) run on two
    instances, one per party, each with its own ``ctx.state``: what the
    server knows of the clients is what they sent.
    """

    family: ClassVar[str] = "algorithm"
    protocol: ClassVar[str] = "federated"
    sends: ClassVar[tuple[str, ...]] = ("delta",)
    summed: ClassVar[tuple[str, ...]] = ()
    broadcasts: ClassVar[tuple[str, ...]] = ()
    needs_public: ClassVar[bool] = False
    needs_individual_updates: ClassVar[bool] = False
    vectorized: ClassVar[bool] = False
    shares: ClassVar[str] = "model"
    personal_model: ClassVar[str] = "merged"

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> Updates:
        """Train the clients of ``ctx`` and return what they computed.

        Runs on the clients' side.

        Parameters
        ----------
        ctx : ClientContext
            The clients of this call (one on the loop backend, all of the
            round's on the vectorized one), their data and the training
            service (``ctx.train``), what the server broadcast this round
            (``ctx.broadcast``) and the clients' party state
            (``ctx.cell.state``).
        global_params : torch.Tensor, shape (D,) or (k, D)
            The global model; under the isolated protocol each client's own
            model, and under the personalized one each client's starting
            model (the global model on the shared parameters, its own on the
            rest; ``ctx.personal`` holds its personal models).

        Returns
        -------
        Updates
            ``ctx.update(delta, **fields)``: the deltas (k, D) and the fields
            :attr:`sends` declares.
        """
        return ctx.update(ctx.train_delta(global_params))  # train(...) - global_params

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        """Return the next global model.

        Runs on the server's side.

        Parameters
        ----------
        ctx : CellContext
            The server's context (``ctx.state`` is the server's state).
        global_params : torch.Tensor, shape (D,)
            The model the round's clients started from (a copy).
        aggregate : torch.Tensor, shape (D,)
            The aggregated delta, after the server-stage privacy.
        received : Received
            What the server can read of the round's messages: under
            plaintext each client's declared fields (``received.rows``,
            ``received.delta``); under a transport only sums
            (``received.sum("control_delta")``); the clients, their example
            counts and the numbers sent in the clear.

        Returns
        -------
        torch.Tensor, shape (D,)
        """
        return global_params + aggregate

    def broadcast(self, ctx: CellContext) -> dict[str, torch.Tensor]:
        """What the server sends the round's clients beside the model.

        Runs on the server's side at the start of every round; the keys must
        be those :attr:`broadcasts` declares. The clients read them as
        ``ctx.broadcast[name]`` in :meth:`client_update`; each value's bytes
        are billed down per client.

        Returns
        -------
        dict of str to torch.Tensor
            Empty by default.
        """
        return {}

    def client_model(self, ctx: CellContext, client: int) -> dict[str, Any] | None:
        """The architecture of ``client``'s model (isolated and personalized
        protocols).

        Returns
        -------
        dict or None
            ``{"model": name, **params}``, or ``None`` for the cell's model.
        """
        return None

    def shared_mask(self, ctx: CellContext) -> np.ndarray | None:
        """(``shares = "part"``) Which parameters the clients send.

        Parameters
        ----------
        ctx : CellContext
            ``ctx.layout`` is the flat parameter layout; ``ctx.model()``
            builds the architecture to inspect.

        Returns
        -------
        numpy.ndarray of bool, shape (D,), or None
            True for the parameters the clients send and the server
            averages, False for those each client keeps (whole tensors
            only); ``None``: all.
        """
        return None

    def planned_steps(self, steps: int, rounds: int) -> int:
        """The local optimizer steps one client takes over the whole run.

        Parameters
        ----------
        steps : int
            The local steps a round gives the client.
        rounds : int
            The planned rounds.

        Returns
        -------
        int
            Every trainer counted (a second model's, the steps of
            :meth:`finalize`): what a local-stage privacy mechanism plans its
            budget on (``dp-sgd``'s ``epsilon`` target). Default
            ``rounds * steps``.
        """
        return int(rounds) * int(steps)

    def finalize(self, ctx: ClientContext, params: torch.Tensor) -> torch.Tensor:
        """(personalized protocol) Each site's last step after the last round.

        Runs on the clients' side, on every site, through the same training
        service as local training (fine-tuning).

        Parameters
        ----------
        ctx : ClientContext
        params : torch.Tensor, shape (k, D)
            The sites' models.

        Returns
        -------
        torch.Tensor, shape (k, D)
            The models to evaluate (default: unchanged).
        """
        return params


#: how a linear aggregator weights clients (:attr:`Aggregator.weighting`)
WEIGHTINGS = ("uniform", "examples", "data-dependent")


class Aggregator(Component):
    """How the server combines client updates.

    Declared facts: ``linear`` (a weighted mean with weights from update
    metadata, :meth:`weights`, which also works over a secure sum where each
    update is pre-scaled by its weight; a non-linear rule such as the median
    needs plaintext updates and overrides :meth:`aggregate`); ``weighting``
    (``"uniform"``, ``"examples"`` — proportional to training-set sizes — or
    ``"data-dependent"``, from numbers the clients compute); and
    ``sends_private_scores`` (clients send numbers computed on their private
    records in the clear, such as accuracy on a held-out part);
    ``client_metric_keys`` (the names of the numbers :meth:`client_metrics`
    returns: what the clients send beside their updates; the engine calls
    :meth:`client_metrics` only when it names some).

    :meth:`client_metrics` runs on the clients' side, :meth:`weights` and
    :meth:`aggregate` on the server's (two instances).
    """

    family: ClassVar[str] = "aggregator"
    linear: ClassVar[bool] = True
    weighting: str = "data-dependent"
    sends_private_scores: bool = False
    client_metric_keys: tuple[str, ...] = ()

    def weights(self, received: Received) -> np.ndarray:
        """The clients' aggregation weights.

        Runs on the server's side, from what it can read in the clear:
        ``received.clients``, ``received.num_examples`` and
        ``received.metrics`` (under a transport, before the clients encode:
        each client scales its update by its weight).

        Returns
        -------
        numpy.ndarray, shape (k,)
            Non-negative weights summing to 1, one per client.
        """
        raise NotImplementedError(f"aggregator {self.name!r} is linear but implements no "
                                  f"weights()")

    def aggregate(self, received: Received) -> torch.Tensor:
        """The aggregated delta from the clients' plaintext updates.

        Runs on the server's side; called only without a transport (a
        linear rule's default is ``weights(received) @ received.delta``).

        Parameters
        ----------
        received : Received
            ``received.delta`` holds each client's delta (k, D).

        Returns
        -------
        torch.Tensor, shape (D,)
        """
        import torch

        w = torch.as_tensor(self.weights(received), dtype=torch.float32)
        return w @ received.delta

    def holdout_fraction(self) -> float:
        """Fraction of each client's training rows the engine holds out (seeded)
        for :meth:`client_metrics` to score on; those rows are not trained on."""
        return 0.0

    def client_metrics(self, ctx: ClientContext, global_params: torch.Tensor,
                       updates: Updates) -> dict[str, np.ndarray]:
        """Numbers the rule needs, computed **on the clients** after local training.

        Parameters
        ----------
        ctx : ClientContext
            One client (``ctx.holdout(0)`` its held-out rows).
        global_params : torch.Tensor, shape (D,)
            The model the client started from.
        updates : Updates
            That client's update.

        Returns
        -------
        dict of str to numpy.ndarray
            One number per row for each of :attr:`client_metric_keys`; they
            are sent in the clear with the update.
        """
        return {}


# -- privacy: one interface per stage ------------------------------------------


class LocalStage:
    """Privacy at the **local** stage: the mechanism owns how a client's local
    optimiser steps run (DP-SGD). The engine asks it for one trainer per
    client, once per cell."""

    def local_trainer(self, ctx: CellContext, client: int, model: torch.nn.Module,
                      data: Split) -> LocalTrainer:
        """A trainer for one client.

        Parameters
        ----------
        ctx : CellContext
            The clients' context (run settings ``ctx.settings``).
        client : int
        model : torch.nn.Module
            A fresh module of the client's architecture, the trainer's own.
        data : Split
            The client's training rows.

        Returns
        -------
        LocalTrainer
            Its ``train(params, steps, ...)`` runs the client's private steps.
        """
        raise NotImplementedError

    def insert_gradient_canaries(self, ctx: CellContext, canaries: GradientCanaries) -> bool:
        """Take an audit's gradient-space canaries into the clients' steps.

        Called once before round 1 with the canaries the engine included
        (``canaries.included`` set; only the included ones join steps).

        Returns
        -------
        bool
            True when the mechanism inserts them; False (the default) when it
            cannot, and the audit then reports ``not_applicable``.
        """
        return False

    def vector_steps(self, ctx: CellContext) -> Any:
        """The mechanism's form for the vectorized backend.

        Returns
        -------
        object or None
            An object with ``stream(client, n)`` and ``privatize(grads, mask,
            clients, active)`` (see :mod:`fedmedbench.vectorized`), or
            ``None`` when the mechanism runs only on the loop backend.
        """
        return None


class UpdateStage:
    """Privacy at the **update** stage: transforms what the clients send
    (clipping, client-side noise) before any transport encoding. Runs on the
    clients' side."""

    def process_update(self, ctx: CellContext, updates: Updates) -> Updates:
        """Protect the clients' updates.

        Parameters
        ----------
        ctx : CellContext
            The clients' context.
        updates : Updates
            What the round's clients computed (after the adversary).

        Returns
        -------
        Updates
            What they send instead; numbers added to ``updates.metrics`` must
            be among :attr:`PrivacyMechanism.metric_keys` (they are sent in
            the clear).
        """
        raise NotImplementedError


class TransportStage:
    """Privacy at the **transport** stage: encodes each client's
    (weight-scaled) vector so that the server reads only :class:`Message`s,
    and returns only their **sum** (secure aggregation, HE).

    ``server_view`` says what an honest-but-curious server reads:
    ``"aggregate"`` (the sum) or ``"ciphertext"`` (nothing; the key holder is
    another party). ``drops_clients`` says the protocol may leave clients'
    inputs out of a round (dropouts).

    The mechanism simulates its parties (the clients' encoders, the
    aggregating server, a key holder): it is the only holder of their
    secrets, no other component is handed it, and it drops a round's
    secrets in :meth:`end_round` and the cell's in :meth:`close`.
    """

    server_view: str = "aggregate"
    drops_clients: bool = False

    def encode(self, ctx: CellContext, client: int, vector: torch.Tensor) -> Message:
        """Encode one client's vector (the client's side).

        Parameters
        ----------
        ctx : CellContext
            The clients' context (``ctx.round``, ``ctx.participants``).
        client : int
        vector : torch.Tensor, shape (n,)
            The client's weight-scaled shared delta coordinates followed by
            the algorithm's summed fields (:attr:`Algorithm.summed`); ``n``
            may exceed ``ctx.layout.numel``, and the coordinates past the
            model's are those fields.

        Returns
        -------
        Message
        """
        raise NotImplementedError

    def aggregate(self, ctx: CellContext, messages: list[Message]) -> torch.Tensor:
        """The sum of the encoded vectors (the server's side, with the key
        holder's decryption where there is one).

        Returns
        -------
        torch.Tensor, shape (n,)
            The sum, of the length of the encoded vectors.
        """
        raise NotImplementedError

    def bytes_down(self, ctx: CellContext) -> int:
        """Extra bytes sent to each participating client per round (keys)."""
        return 0

    def drop(self, ctx: CellContext, dropped: dict[int, str]) -> bool:
        """The network twin's dropouts of this round (:mod:`fedmedbench.clock`).

        Called on the server's side after every client of the round encoded
        (:meth:`encode`) and before :meth:`aggregate`, only in rounds where
        some client drops.

        Parameters
        ----------
        ctx : CellContext
            The server's context.
        dropped : dict of int to str
            Each dropped client and when it dropped (:data:`DROP_PHASES`):
            ``"masking"`` (its encoded input never reached the server: it
            went offline or missed the deadline before its upload ended) or
            ``"unmasking"`` (its input arrived, then it went offline before
            the protocol's last step).

        Returns
        -------
        bool
            ``True`` when the protocol takes them through its own recovery
            (secure aggregation: their masks are reconstructed away, or the
            round aborts with :class:`RoundAborted` past the threshold); then
            :meth:`aggregate`, given every message, returns the **unscaled**
            sum of the inputs that reached the server (the engine rescales).
            ``False`` (the default): the engine leaves the ``"masking"``
            dropouts' messages out of :meth:`aggregate` itself.
        """
        return False


class ServerStage:
    """Privacy at the **server** stage: transforms the aggregate (central DP).
    Runs on the server's side."""

    def process_aggregate(self, ctx: CellContext, aggregate: torch.Tensor,
                          received: Received) -> torch.Tensor:
        """Protect the aggregate.

        Parameters
        ----------
        ctx : CellContext
            The server's context.
        aggregate : torch.Tensor, shape (D,)
        received : Received
            What the server read of the round (the numbers sent in the
            clear: ``received.metrics``).

        Returns
        -------
        torch.Tensor, shape (D,)
        """
        raise NotImplementedError


#: the stages of the round, and the interface (and its method) of each
STAGES = ("local", "update", "transport", "server")
STAGE_INTERFACES: dict[str, tuple[type, tuple[str, ...]]] = {
    "local": (LocalStage, ("local_trainer",)),
    "update": (UpdateStage, ("process_update",)),
    "transport": (TransportStage, ("encode", "aggregate")),
    "server": (ServerStage, ("process_aggregate",)),
}


class PrivacyMechanism(Component):
    """A protection at one or more stages of the round (DESIGN, "One round").

    A mechanism inherits the interface of each stage it acts at —
    :class:`LocalStage`, :class:`UpdateStage`, :class:`TransportStage`,
    :class:`ServerStage` — and implements its method(s); its :attr:`stages`
    follow from that (the conformance kit fails a class that inherits an
    interface without implementing it).

    Declared facts: ``dp_unit`` (``"record"`` or ``"client"``: what one unit
    of its differential-privacy guarantee is; ``None`` without DP);
    ``drops_clients``; ``needs_uniform_weights``; ``aggregate_as_sum`` (its
    update stage scales each client's contribution itself — a
    fixed-denominator estimator — so the server sums the rows instead of
    taking the aggregator's weighted mean); ``run_defaults`` (run settings
    the mechanism's guarantee assumes, e.g. Poisson client sampling, applied
    unless the matrix sets them); ``metric_keys`` (numbers its update stage
    adds to each client's ``updates.metrics``: they are sent in the clear,
    and named in the record's ``sent_in_clear``).

    Instances: a mechanism with an update stage and a server stage gets one
    instance on each side (they share no state: the server's half reads what
    the clients' half sent); a transport mechanism is one instance, held by
    the engine alone. :meth:`accounting` and :meth:`report` are read from
    the instance that saw the whole round: the server's where the mechanism
    has a server or transport stage, else the clients'.

    :meth:`accounting` returns what was spent as one typed
    :class:`~fedmedbench.accounting.Accounting` (DP mechanisms) and
    :meth:`report` the mechanism's other numbers (bytes, quantisation,
    dropouts).
    """

    family: ClassVar[str] = "privacy"
    dp_unit: ClassVar[str | None] = None
    drops_clients: bool = False
    needs_uniform_weights: bool = False
    aggregate_as_sum: ClassVar[bool] = False
    run_defaults: ClassVar[dict[str, Any]] = {}
    metric_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def stages(self) -> frozenset[str]:
        """The stages this mechanism acts at (from the interfaces it inherits)."""
        return stages_of(type(self))

    def accounting(self) -> Accounting | None:
        """What was spent so far (DP: ε with its δ, the accountant, σ, q, steps);
        ``None`` for a mechanism without a DP guarantee."""
        return None

    def broadcast(self, ctx: CellContext) -> dict[str, Any]:
        """What the server's instance sends the clients' instance at the start
        of a round (an adaptive clipping norm); billed down per client.

        Runs on the server's side, for a mechanism with a server stage.

        Returns
        -------
        dict of str to torch.Tensor
            Empty by default.
        """
        return {}

    def contribution_weights(self, ctx: CellContext, received: Received) -> np.ndarray | None:
        """(``aggregate_as_sum``) The weight each received client's update
        carries in the sum, as the server computes it from public metadata;
        shown as the round's weights in the history. ``None``: not known."""
        return None

    def receive_broadcast(self, ctx: CellContext, fields: dict[str, Any]) -> None:
        """The clients' instance receives what :meth:`broadcast` sent (the
        clients' side, before local training)."""

    def report(self) -> dict[str, Any]:
        """The mechanism's own numbers for the record (JSON values)."""
        return {}


def stages_of(cls: type) -> frozenset[str]:
    """The stages whose interface ``cls`` inherits."""
    return frozenset(s for s, (iface, _) in STAGE_INTERFACES.items() if issubclass(cls, iface))


def unimplemented_stage_methods(cls: type) -> list[str]:
    """``stage.method`` names that ``cls`` inherits from a stage interface but
    does not override (a declared stage without an implementation)."""
    out = []
    for stage, (iface, methods) in STAGE_INTERFACES.items():
        if issubclass(cls, iface):
            out += [f"{stage}: {m}" for m in methods
                    if getattr(cls, m, None) is getattr(iface, m)]
    return out


class Compressor(Component):
    """Lossy encoding of client updates. :meth:`compress` returns the updates
    the server will use (decoded) with ``delta_bytes``, the encoded size of
    each row. ``preserves_norm_bound``: the decoded update never has a larger
    L2 norm than the input (what client-level DP's clipping needs)."""

    family: ClassVar[str] = "compressor"
    preserves_norm_bound: ClassVar[bool] = False

    def compress(self, ctx: CellContext, updates: Updates) -> Updates:
        """Encode the clients' updates (the clients' side).

        Parameters
        ----------
        ctx : CellContext
            The clients' context (``ctx.rng`` for seeded randomness).
        updates : Updates
            What the round's clients send, after update-stage privacy.

        Returns
        -------
        Updates
            The decoded updates the server will use, with ``delta_bytes``:
            each row's encoded size.
        """
        raise NotImplementedError(f"compressor {self.name!r} does not implement compress()")


class Adversary(Component):
    """Malicious client behaviour during training. A ``fraction`` of clients
    (chosen with the cell seed) are malicious; :meth:`corrupt_data` changes
    their training data once, :meth:`corrupt_update` the rows they send."""

    family: ClassVar[str] = "adversary"

    def __init__(self, *, fraction: float = 0.0) -> None:
        self.fraction = fraction

    def corrupt_data(self, split: Split, *, num_classes: int, rng: np.random.Generator) -> Split:
        """A malicious client's training data, changed once before round 1.

        Parameters
        ----------
        split : Split
            Its training rows.
        num_classes : int
        rng : numpy.random.Generator
            Seeded from the cell.

        Returns
        -------
        Split
            As many rows, labels in ``range(num_classes)`` (default: unchanged).
        """
        return split

    def corrupt_update(self, ctx: CellContext, updates: Updates,
                       rng: np.random.Generator) -> Updates:
        """``updates`` holds one malicious client's row (``rng`` is that
        client's seeded stream for this round); return what it sends."""
        return updates


class Attack(Component):
    """An evaluation of what leaks, run after training on what the threat
    model exposes (:class:`fedmedbench.context.AttackContext`).

    :meth:`evaluate` returns a dict of metrics (JSON values), or
    ``{"not_applicable": reason}`` when the attacker's view gives it nothing.
    """

    family: ClassVar[str] = "attack"

    def canaries(self, data: FederatedData, rng: np.random.Generator) -> Canaries | None:
        """An auditing attack's canary records, picked before training from the
        partitioned ``data`` with ``rng`` (seeded): the engine includes each
        one in training with probability 1/2 and hands them back, with the
        inclusion bits, in :attr:`AttackContext.canaries`. ``None`` (the
        default): the attack inserts nothing and training is unchanged."""
        return None

    def gradient_canaries(self, layout: ParamLayout, data: FederatedData,
                          rng: np.random.Generator) -> GradientCanaries | None:
        """A white-box auditing attack's gradient-space canaries, picked before
        training (coordinates of ``layout``'s flat vector and their sites).

        The engine includes each with probability 1/2 and hands them to the
        cell's local-stage privacy mechanism; they come back, with their
        inclusion bits, in :attr:`AttackContext.canaries`. ``None`` (the
        default): nothing is inserted.
        """
        return None

    def canary_clients(self, layout: ParamLayout, data: FederatedData,
                       rng: np.random.Generator) -> ClientCanaries | None:
        """A client-level auditing attack's canary clients, picked before
        training (a random direction of ``layout``'s flat vector each).

        The engine includes each with probability 1/2 as a client of its own
        (federated protocol) and hands them back, with the inclusion bits, in
        :attr:`AttackContext.canaries`. ``None`` (the default): none.
        """
        return None

    def evaluate(self, ctx: AttackContext) -> dict[str, Any]:
        """Attack the cell as its threat model allows.

        Parameters
        ----------
        ctx : AttackContext
            Values only: the final models, the server's views, the ground
            truth for scoring, the privacy record.

        Returns
        -------
        dict
            JSON metrics, or ``{"not_applicable": reason}`` when the
            attacker's view gives it nothing.
        """
        raise NotImplementedError(f"attack {self.name!r} does not implement evaluate()")


class Reporter(Component):
    """A writer of reports from result records; returns the paths it wrote."""

    family: ClassVar[str] = "reporter"

    def write(self, records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """Write reports of ``records`` into ``out_dir``.

        Parameters
        ----------
        records : list of dict
            Result records (``fedmedbench.result/1``), already validated.
        out_dir : pathlib.Path
            The report folder (it exists; never write outside it).

        Returns
        -------
        list of pathlib.Path
            The files written.
        """
        raise NotImplementedError(f"reporter {self.name!r} does not implement write()")


# --------------------------------------------------------------------------
# networks: the hospital-network twin (fedmedbench.clock)
# --------------------------------------------------------------------------

#: when a dropped client dropped out of a round (:meth:`TransportStage.drop`)
DropPhase = Literal["masking", "unmasking"]
#: the values of :data:`DropPhase`
DROP_PHASES: tuple[str, ...] = typing.get_args(DropPhase)


class RoundAborted(RuntimeError):
    """A transport could not complete the round (too few clients left to
    unmask the sum): nothing is released and the global model is not
    updated. Under a network that drops clients the engine records the
    round as aborted and goes on (``history[t]["aborted"]``); otherwise the
    cell fails, as before the twin."""


@dataclass(frozen=True)
class Availability:
    """When a site is online: ``kind`` is ``"always"``; ``"onoff"`` (an
    alternating renewal process: exponential online periods of mean
    ``mean_up_s`` and offline periods of mean ``mean_down_s`` seconds,
    started in its stationary state); or ``"trace"`` (``intervals``: the
    (start, end) seconds of each online period, repeated every
    ``period_s`` seconds; offline between them)."""

    kind: str = "always"
    mean_up_s: float = math.inf
    mean_down_s: float = 0.0
    intervals: tuple[tuple[float, float], ...] = ()
    period_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("always", "onoff", "trace"):
            raise ValueError(f"availability kind {self.kind!r}; one of always, onoff, trace")
        if self.kind == "onoff" and not (self.mean_up_s > 0 and self.mean_down_s >= 0):
            raise ValueError(f"on/off availability needs mean_up_s > 0 and mean_down_s >= 0, "
                             f"got {self.mean_up_s!r} and {self.mean_down_s!r}")
        if self.kind == "trace":
            if not self.intervals:
                raise ValueError("a trace availability needs at least one online interval")
            last = -math.inf
            for a, b in self.intervals:
                if not (math.isfinite(a) and math.isfinite(b) and a >= last and b > a):
                    raise ValueError(f"trace intervals must be increasing (start, end) pairs "
                                     f"with end > start; got {self.intervals[:4]!r}...")
                last = b
            if not self.period_s >= last:
                raise ValueError(f"a trace's period_s ({self.period_s!r}) must be at least the "
                                 f"end of its last interval ({last})")

    @property
    def always(self) -> bool:
        return self.kind == "always" or (self.kind == "onoff" and self.mean_down_s == 0)

    def describe(self) -> dict[str, Any]:
        if self.kind == "onoff":
            return {"kind": "onoff", "mean_up_s": self.mean_up_s,
                    "mean_down_s": self.mean_down_s}
        if self.kind == "trace":
            return {"kind": "trace", "intervals": len(self.intervals),
                    "period_s": self.period_s}
        return {"kind": "always"}


@dataclass(frozen=True)
class SiteProfile:
    """One site's compute, links and availability (a :class:`Network` gives one per client).

    Attributes
    ----------
    speed : float
        Compute speed relative to this machine: a local step takes
        ``reference_step_s / speed`` seconds (the reference step time of
        the cell's model, measured here: :func:`fedmedbench.clock.reference_step`).
        The mechanisms' cryptographic seconds are scaled the same way.
    up_mbps, down_mbps : float
        Uplink and downlink bandwidth in megabits (10^6 bits) per second;
        ``math.inf`` is a link of no transfer time.
    latency_ms : float
        One-way latency in milliseconds, paid once per message each way.
    availability : Availability
    preset : str
        The name of the preset the profile comes from (for the record).
    """

    speed: float = 1.0
    up_mbps: float = math.inf
    down_mbps: float = math.inf
    latency_ms: float = 0.0
    availability: Availability = field(default_factory=Availability)
    preset: str = "uniform"

    def __post_init__(self) -> None:
        for k in ("speed", "up_mbps", "down_mbps"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and v > 0) or math.isnan(v):
                raise ValueError(f"site profile {self.preset!r}: {k} = {v!r}; it must be > 0")
        if not (self.latency_ms >= 0 and math.isfinite(self.latency_ms)):
            raise ValueError(f"site profile {self.preset!r}: latency_ms = {self.latency_ms!r}; "
                             f"it must be a finite number >= 0")

    @property
    def ideal(self) -> bool:
        """Equal speed, infinite links, no latency, always online (``uniform``)."""
        return (self.speed == 1.0 and self.up_mbps == math.inf and self.down_mbps == math.inf
                and self.latency_ms == 0 and self.availability.always)

    def describe(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isinf(x) else float(x)

        return {"preset": self.preset, "speed": float(self.speed), "up_mbps": num(self.up_mbps),
                "down_mbps": num(self.down_mbps), "latency_ms": float(self.latency_ms),
                "availability": self.availability.describe()}


class Network(Component):
    """Site profiles of a federation: the hospital-network twin's input
    (:mod:`fedmedbench.clock`).

    :meth:`profiles` gives each training party a :class:`SiteProfile`
    (compute speed relative to this machine, links, availability); the
    engine's virtual clock turns them, the round's steps and the bytes each
    message carried into virtual seconds, stragglers and dropouts. The base
    class is ``uniform``: every site at this machine's speed, with links of
    no transfer time and always online, which changes no result.

    Declared facts: ``card`` (where each preset number comes from: a dict
    with ``sources`` and ``notes``, kept in the record); ``deadline_s``
    (synchronous rounds end at this many virtual seconds and the clients not
    done are dropouts; ``None``: the server waits for the slowest client);
    ``reference_step_s`` (pin the reference step time instead of measuring
    it on this machine, for numbers comparable across machines; ``None``:
    measured).
    """

    family: ClassVar[str] = "network"
    card: ClassVar[dict[str, Any]] = {}
    deadline_s: float | None = None
    reference_step_s: float | None = None

    def profiles(self, names: Sequence[str], num_examples: Sequence[int],
                 rng: np.random.Generator) -> Sequence[SiteProfile]:
        """Each training party's profile.

        Parameters
        ----------
        names : sequence of str
            The parties' names (the sites; ``"pooled"`` under the pooled
            protocol).
        num_examples : sequence of int
            Their training-set sizes (public metadata).
        rng : numpy.random.Generator
            Seeded from the cell: draw any random assignment from it.

        Returns
        -------
        sequence of SiteProfile
            One per party, in order.
        """
        one = SiteProfile()  # frozen: one value serves every site
        return [one] * len(names)


#: the plugin families by name, and the base class of each
FAMILIES: dict[str, type[Component]] = {
    "dataset": Dataset,
    "partitioner": Partitioner,
    "model": Model,
    "algorithm": Algorithm,
    "aggregator": Aggregator,
    "privacy": PrivacyMechanism,
    "compressor": Compressor,
    "adversary": Adversary,
    "attack": Attack,
    "reporter": Reporter,
    "network": Network,
}

