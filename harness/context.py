"""What components see of a running cell: narrow contexts of values, no
back-reference to the engine or to another party.

- :class:`CellContext` — what one party knows of the cell: public facts
  (settings, layout, example counts, the public split, seeded random
  streams), the current round and its participants, and that party's own
  ``state``. The clients' side and the server's side each have one
  (``party``); neither holds another party's data or objects.
- :class:`ClientContext` — the clients one ``Algorithm.client_update`` call
  trains (one on the loop backend, all sampled clients on the vectorized
  one): their data, sizes and steps, what the server broadcast, and the
  training service.
- :class:`ServerView` — what an honest-but-curious server read in a round
  (:mod:`fedmedbench.messages`).
- :class:`AttackContext` — what an attack may use, by threat model: values
  only (arrays, tensors, records), and two small documented services
  (:class:`ShadowTrainer`, :class:`BatchReplay`) holding values too.
- :class:`Canaries` — the records an auditing attack has the engine insert
  into training, each independently with probability 1/2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.components import FederatedData, ParamLayout, Site, Split, Task, Updates
from fedmedbench.messages import ServerView

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.facts import CellFacts
    from fedmedbench.training import ExtraLoss, RunSettings

__all__ = ["CellContext", "ClientContext", "ServerView", "AttackContext", "Canaries",
           "GradientCanaries", "ClientCanaries", "ShadowTrainer", "BatchReplay", "stable_int"]

PARTIES = ("clients", "server")


def stable_int(s: str) -> int:
    """A 32-bit integer from a string, stable across processes and versions."""
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")


@dataclass
class CellContext:
    """The running cell, as one party sees it.

    Attributes
    ----------
    party : {"clients", "server"}
        Whose context this is: the clients' side (local training, update
        privacy, compression, encoding) or the server's (aggregation,
        server privacy, the algorithm's server update).
    cell_id, seed, rounds
        The cell's id, seed and planned rounds.
    settings : RunSettings
        The resolved run settings.
    task : Task
        What is predicted, the metric, the input shape.
    client_names : list of str
        The training parties, by index (the pooled protocol has one, "pooled").
    num_examples : list of int
        Each training party's training-set size (public metadata: it is sent
        in the clear with every update).
    public : Split or None
        Data no client holds (distillation, pretraining), where there is one.
    layout : ParamLayout
        Names, shapes and offsets of the model's parameters in the flat vector.
    protocol : str
        The round protocol (``federated``, ``pooled``, ``isolated``, ``personalized``).
    sample_rate : float
        q, the expected fraction of clients per round.
    facts : CellFacts
        The declared facts of the cell's components.
    round : int
        The current round (1-based; 0 before round 1).
    participants : list of int
        The clients sampled in the current round.
    state : dict
        This party's own state between rounds (the server's, or the clients'
        side's): never shared with the other party.
    """

    cell_id: str
    seed: int
    rounds: int
    settings: RunSettings
    task: Task
    client_names: list[str]
    num_examples: list[int]
    public: Split | None
    layout: ParamLayout
    protocol: str
    sample_rate: float
    facts: CellFacts
    model_factory: Callable[[], torch.nn.Module]
    party: str = "clients"
    round: int = 0
    participants: list[int] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    #: per-client local steps of a round (a fixed number under the pooled protocol)
    fixed_steps: int | None = None
    #: the algorithm's :meth:`~fedmedbench.Algorithm.planned_steps`, as a pure function
    planned: Callable[[int, int], int] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.client_names)

    def for_party(self, party: str) -> CellContext:
        """A context of the same cell for ``party``, with a state of its own."""
        import dataclasses

        if party not in PARTIES:
            raise ValueError(f"party {party!r}; one of {PARTIES}")
        return dataclasses.replace(self, party=party, state={}, participants=[])

    def rng(self, purpose: str, *extra: int) -> np.random.Generator:
        """A generator derived from the cell seed, a purpose and extra ints
        (so that sampling, noise and masking draw independent streams)."""
        return np.random.default_rng([self.seed, stable_int(purpose), *extra])

    def torch_generator(self, purpose: str, *extra: int) -> torch.Generator:
        import torch

        return torch.Generator().manual_seed(int(self.rng(purpose, *extra).integers(2**62)))

    def batch_seed(self, client: int) -> int:
        """The seed of ``client``'s minibatch stream (both backends, local-stage
        mechanisms and the replay for attack scoring draw from it)."""
        from fedmedbench.training import batch_seeds

        return int(batch_seeds(self.seed, [client])[0])

    def steps_for(self, client: int) -> int:
        """Local optimizer steps of ``client`` in a round."""
        if self.fixed_steps is not None:
            return int(self.fixed_steps)
        return self.settings.steps_for(int(self.num_examples[client]))

    def planned_steps(self, client: int) -> int:
        """Local optimizer steps ``client`` takes over the whole run, every
        trainer of the algorithm counted (:meth:`Algorithm.planned_steps`)."""
        steps = self.steps_for(client)
        return (self.planned(steps, self.rounds) if self.planned is not None
                else self.rounds * steps)

    def steps_of(self, clients: Iterable[int], *, planned: bool = False) -> list[int]:
        """:meth:`steps_for` (``planned``: :meth:`planned_steps`) of each of
        ``clients``, worked out once per distinct example count (a client's
        steps depend on nothing else)."""
        how = self.planned_steps if planned else self.steps_for
        ne = self.num_examples
        seen: dict[int, int] = {}
        out = []
        for c in clients:
            n = ne[c]
            s = seen.get(n)
            if s is None:
                s = seen[n] = how(c)
            out.append(s)
        return out

    def model(self, params: torch.Tensor | None = None) -> torch.nn.Module:
        """A fresh instance of the cell's architecture, loaded with ``params``."""
        from fedmedbench.models import set_flat_params

        m = self.model_factory()
        if params is not None:
            set_flat_params(m, params)
        return m


class ClientContext:
    """The clients one :meth:`Algorithm.client_update` call trains.

    On the loop backend a call holds one client; on the vectorized backend all
    sampled clients of the round. Every tensor an algorithm builds has a
    leading client axis in :attr:`clients` order. ``cell`` is the clients'
    side's :class:`CellContext` (``cell.state`` is the clients' party state,
    never the server's); ``broadcast`` what the server sent this round
    (:meth:`Algorithm.broadcast`).
    """

    def __init__(self, cell: CellContext, clients: list[int], service: Any,
                 personal: torch.Tensor | None = None,
                 broadcast: Mapping[str, Any] | None = None) -> None:
        self.cell = cell
        self.clients = list(clients)
        self._service = service
        self._loss: np.ndarray | None = None
        #: (personalized protocol) each client's personal model, shape (k, D)
        self.personal = personal
        #: what the server sent the round's clients beside the model
        self.broadcast: Mapping[str, Any] = dict(broadcast or {})

    # -- what the clients know about themselves --------------------------------

    @property
    def round(self) -> int:
        return self.cell.round

    @property
    def client(self) -> int:
        """The one client of this call (loop backend)."""
        if len(self.clients) != 1:
            raise RuntimeError(
                f"this ClientContext trains {len(self.clients)} clients at once (vectorized "
                f"backend); use ctx.clients, or declare `vectorized = False` on the algorithm")
        return self.clients[0]

    @property
    def sites(self) -> list[Site]:
        """The clients' own data (each client holds only its own)."""
        return [self._service.site(c) for c in self.clients]

    @property
    def num_examples(self) -> list[int]:
        return [int(self.cell.num_examples[c]) for c in self.clients]

    @property
    def steps(self) -> list[int]:
        """Each client's local steps this round."""
        return self.cell.steps_of(self.clients)

    def holdout(self, i: int = 0) -> Split | None:
        """Training rows of the ``i``-th client of this call held out from its
        training for the aggregator's ``client_metrics`` (else ``None``)."""
        return self._service.holdout(self.clients[i])
    # -- services --------------------------------------------------------------

    def train(self, params: torch.Tensor, *, steps: list[int] | int | None = None,
              extra_loss: ExtraLoss | None = None,
              grad_offset: torch.Tensor | None = None,
              trainable: torch.Tensor | np.ndarray | None = None,
              trainer: str = "main") -> torch.Tensor:
        """Run local training from ``params`` ((D,) for every client, or
        (k, D)) and return the new parameters, shape (k, D): a new tensor
        the caller owns (``new.sub_(params)`` turns it into the deltas
        without another (k, D) allocation).

        ``steps`` (default: :attr:`steps`), ``extra_loss(w)`` — a
        data-independent function of one client's flat parameters added to
        its loss — and ``grad_offset`` ((D,) or (k, D), added to every
        step's gradient) apply on every backend. ``trainable`` (a boolean
        mask over the flat parameters, whole tensors only) freezes the other
        parameters: they get no gradient and do not move (FedRep's head and
        body phases). ``trainer`` names which of the client's trainers runs
        the steps: each has its own batch stream (seeded like the first),
        optimizer and module buffers (Ditto trains its personal model on
        ``"personal"``, so its batches are those local training would see).
        A local-stage privacy mechanism runs the steps (and counts them all).
        """
        return self._train(params, steps=steps, extra_loss=extra_loss, grad_offset=grad_offset,
                           trainable=trainable, trainer=trainer, delta=False)

    def train_delta(self, params: torch.Tensor, *, steps: list[int] | int | None = None,
                    extra_loss: ExtraLoss | None = None,
                    grad_offset: torch.Tensor | None = None,
                    trainable: torch.Tensor | np.ndarray | None = None,
                    trainer: str = "main") -> torch.Tensor:
        """:meth:`train`'s new parameters minus ``params``: the clients'
        deltas, shape (k, D), a new tensor the caller owns, the same numbers
        as ``train(params, ...).sub_(params)``; the compiled vectorized step
        writes them in the pass that gathers its parameter stacks (one
        (k, D) pass fewer)."""
        return self._train(params, steps=steps, extra_loss=extra_loss, grad_offset=grad_offset,
                           trainable=trainable, trainer=trainer, delta=True)

    def _train(self, params: torch.Tensor, *, steps: list[int] | int | None,
               extra_loss: ExtraLoss | None, grad_offset: torch.Tensor | None,
               trainable: torch.Tensor | np.ndarray | None, trainer: str,
               delta: bool) -> torch.Tensor:
        import torch

        k = len(self.clients)
        if steps is None:
            steps = self.steps
        elif isinstance(steps, int):
            steps = [steps] * k
        p = params if params.dim() == 2 else params.unsqueeze(0).expand(k, -1)
        off = None
        if grad_offset is not None:
            off = grad_offset if grad_offset.dim() == 2 else grad_offset.unsqueeze(0).expand(k, -1)
        mask = None if trainable is None else torch.as_tensor(np.asarray(trainable, dtype=bool))
        new, loss = self._service.train(self.clients, p, list(steps), extra_loss=extra_loss,
                                        grad_offset=off, trainable=mask, trainer=trainer,
                                        delta=delta)
        self._loss = loss
        return new if isinstance(new, torch.Tensor) else torch.stack(new)

    def model(self, params: torch.Tensor | None = None, i: int = 0) -> torch.nn.Module:
        """A fresh instance of the ``i``-th client's architecture, loaded with ``params``."""
        from fedmedbench.models import set_flat_params

        m = self._service.factory_for(self.clients[i])()
        if params is not None:
            set_flat_params(m, params)
        return m

    def update(self, delta: torch.Tensor, **extra: Any) -> Updates:
        """The clients' :class:`Updates`: ``delta`` of shape (k, D) and ``extra``
        fields with a leading client axis; the last training loss is kept as
        the client-side metric ``loss``."""
        if delta.dim() == 1:
            delta = delta.unsqueeze(0)
        metrics = {} if self._loss is None else {"loss": np.asarray(self._loss, dtype=float)}
        return Updates(clients=list(self.clients), delta=delta, num_examples=self.num_examples,
                       metrics=metrics, extra=extra)


@dataclass
class Canaries:
    """Audit records (Steinke, Nasr, Jagielski 2023): an attack that audits
    picks them before training (:meth:`fedmedbench.Attack.canaries`); the
    engine draws ``included`` — each canary in or out independently with
    probability 1/2, from the cell seed — and inserts the included ones into
    the training split of the client named by ``site`` before round 1 (under
    the pooled protocol, into the pooled party's). Non-canary data is always
    included.

    Attributes
    ----------
    X, y : numpy.ndarray
        ``m`` canary records (features shaped like the task's inputs, float32)
        and labels (int64).
    site : numpy.ndarray of int, shape (m,)
        The site whose training data receives each canary.
    included : numpy.ndarray of bool, shape (m,), or None
        Set by the engine: which canaries were trained on (ground truth for
        scoring; an attack must not use it to choose its guesses).
    """

    X: np.ndarray
    y: np.ndarray
    site: np.ndarray
    included: np.ndarray | None = None

    def __post_init__(self) -> None:
        m = len(self.y)
        if len(self.X) != m or len(self.site) != m:
            raise ValueError(f"Canaries: {len(self.X)} rows of X, {m} labels and "
                             f"{len(self.site)} sites; give one of each per canary")

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class GradientCanaries:
    """White-box audit canaries in gradient space (Dirac canaries; Nasr et al.
    2023, in the one-run framework of Steinke, Nasr, Jagielski 2023).

    Each canary is a coordinate of the flat parameter vector. An included
    canary takes part in its site's DP-SGD steps like one more record (each
    step independently, with the step's sampling rate q): its per-example
    gradient is the clipping norm C at its coordinate and 0 elsewhere, so
    clipping leaves it as it is. The local-stage mechanism inserts them
    (:meth:`fedmedbench.LocalStage.insert_gradient_canaries`).

    Attributes
    ----------
    coords : numpy.ndarray of int, shape (m,)
        Distinct coordinates of the flat parameter vector.
    site : numpy.ndarray of int, shape (m,)
        The site whose steps each canary joins.
    included : numpy.ndarray of bool, shape (m,), or None
        Set by the engine: each canary in or out with probability 1/2.
    """

    coords: np.ndarray
    site: np.ndarray
    included: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.coords) != len(self.site):
            raise ValueError(f"GradientCanaries: {len(self.coords)} coordinates and "
                             f"{len(self.site)} sites; give one of each per canary")
        if len(np.unique(self.coords)) != len(self.coords):
            raise ValueError("GradientCanaries: coordinates must be distinct")

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class ClientCanaries:
    """Audit canaries at client level (Andrew, Kairouz, Oh, Oprea, McMahan,
    Suriyakumar, "One-shot Empirical Privacy Estimation for Federated
    Learning", ICLR 2024), in the one-run framework.

    Each canary is a client of its own whose update, every round it is
    sampled (like any client, at the round's rate q), is a fixed random
    direction scaled to the round's largest real update norm (so client-level
    clipping leaves it at the clip); its updates then pass the update-stage
    privacy, the transport and the aggregation as any client's. The score is
    the cosine of the final model's change with the direction.

    Attributes
    ----------
    directions : numpy.ndarray, shape (m, D)
        Unit vectors over the flat parameter vector.
    included : numpy.ndarray of bool, shape (m,), or None
        Set by the engine: each canary client takes part (in) or never (out),
        with probability 1/2.
    """

    directions: np.ndarray
    included: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.directions)


class ShadowTrainer:
    """Trains a fresh model with the cell's own recipe (shadow-model attacks).

    Holds values only: the cell's initial model (a copy of its seeded
    initialisation, never trained), the run settings and the planned
    rounds. ``trainer(split, seed)`` runs ``rounds`` rounds' worth of local
    steps of plain SGD (the run's optimizer) on ``split`` from the initial
    model and returns the flat parameters. It cannot reach the run.
    """

    def __init__(self, initial: torch.nn.Module, settings: RunSettings, rounds: int) -> None:
        import copy

        self._initial = copy.deepcopy(initial)
        self.settings = settings
        self.rounds = int(rounds)

    def __call__(self, split: Split, seed: int) -> torch.Tensor:
        import copy

        import torch

        from fedmedbench.models import get_flat_params
        from fedmedbench.training import SGDTrainer

        torch.default_generator.manual_seed(int(seed))
        np.random.seed(int(seed) % 2**32)
        model = copy.deepcopy(self._initial)
        tr = SGDTrainer(model, split, self.settings, seed=int(seed))
        steps = self.settings.steps_for(len(split)) * self.rounds
        new, _ = tr.train(get_flat_params(model), steps)
        return new


@dataclass(frozen=True)
class BatchReplay:
    """Ground truth for scoring gradient inversion: the minibatches each
    client trained on in round 1, replayed from its rows and batch seed
    (values only: each client's training rows, seeds and the batch size).

    ``replay(client, steps)`` returns the first ``steps`` batches ``(X, y)``
    of ``client``'s round-1 stream, or ``None`` for a client it does not
    hold.
    """

    rows: Mapping[int, Split]
    seeds: Mapping[int, int]
    batch_size: int

    def __call__(self, client: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
        from fedmedbench.training import BatchStream

        split = self.rows.get(client)
        if split is None:
            return None
        stream = BatchStream(len(split), self.batch_size, self.seeds[client])
        out = []
        for _ in range(steps):
            idx = stream.next_indices()
            out.append((split.X[idx], split.y[idx]))
        return out


@dataclass
class AttackContext:
    """What an attack may use, by threat model: values, never the run.

    - outside attacker: ``final_params`` (the final global model; under the
      isolated and personalized protocols, site 0's own model) through
      :meth:`model`, and ``site_params`` (each site's own final model there);
    - server: ``server_views`` (round → :class:`ServerView`), whose ``kind``
      says what was readable;
    - ground truth for scoring: ``data`` (members are a client's training
      rows, non-members its test rows), ``client_batches`` and the
      ``canaries`` with their inclusion bits.

    ``train_shadow(split, seed)`` (a :class:`ShadowTrainer`) trains a fresh
    model with the cell's own training recipe. ``model_spec`` names the
    architecture (``{"name": ..., **params}``) that ``model_factory``
    builds, so that an isolated attack process (``[evaluate] isolate =
    true``) rebuilds it from the cell seed.
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
    protocol: str
    train_shadow: ShadowTrainer | Callable[[Split, int], torch.Tensor]
    mechanisms: list[str] = field(default_factory=list)
    site_params: dict[int, torch.Tensor] = field(default_factory=dict)
    #: where attacks may write files for the report (PNGs); ``None``: write nothing
    artifacts_dir: str | None = None
    #: ``client_batches(client, steps)``: ground truth for scoring only, the
    #: minibatches (X, y) that client trained on in round 1; ``None`` when they
    #: cannot be replayed (a local-stage mechanism samples its own batches)
    client_batches: BatchReplay | None = None
    #: the final model did not beat the majority-class baseline (see the record's
    #: ``utility.majority_baseline`` and ``utility.chance_level``)
    chance_level: bool = False
    #: the canaries inserted for an auditing attack, with their inclusion bits: records
    #: (:class:`Canaries`) or gradient-space coordinates (:class:`GradientCanaries`)
    canaries: Canaries | GradientCanaries | ClientCanaries | None = None
    #: the model every run starts from (the cell's seeded initialisation)
    initial_params: torch.Tensor | None = None
    #: running statistics (BatchNorm buffers) of ``final_params`` and of each
    #: ``site_params`` model; empty for models without buffers
    final_buffers: torch.Tensor | None = None
    site_buffers: dict[int, torch.Tensor] = field(default_factory=dict)
    #: the architecture ``model_factory`` builds (seeded with ``seed``)
    model_spec: dict[str, Any] | None = None
    #: why an auditing attack's canaries were not inserted, where they were not
    canary_problem: str | None = None

    def model(self, params: torch.Tensor | None = None) -> torch.nn.Module:
        """The architecture with ``params`` (default: the final model), in eval
        mode. Passed ``final_params`` or one of ``site_params`` (the same
        tensor), the model also gets that model's running statistics; any
        other vector gets the initial ones (what a server holds of statistics
        it was never sent)."""
        from fedmedbench.models import set_flat_buffers, set_flat_params

        m = self.model_factory()
        p = self.final_params if params is None else params
        set_flat_params(m, p)
        bufs = self.final_buffers if p is self.final_params else next(
            (self.site_buffers.get(i) for i, q in self.site_params.items() if q is p), None)
        if bufs is not None and bufs.numel():
            set_flat_buffers(m, bufs)
        m.eval()
        return m
