"""Local training: run settings, minibatch streams, and the loop trainer.

A :class:`LocalTrainer` runs one client's local optimiser steps. The harness's
own :class:`SGDTrainer` keeps one model, optimizer and batch stream per client
for the whole cell; each round the parameters are loaded, the optimizer
state is reset and ``steps`` optimizer steps run. A ``local``-stage privacy
mechanism (DP-SGD) supplies its own trainer instead
(:meth:`fedmedbench.LocalStage.local_trainer`): the harness knows nothing of
how it privatises its steps.

Batches come from :class:`BatchStream`: a seeded permutation of the client's
rows per epoch, endless across rounds, from a counter-based generator
(:func:`epoch_orders`). The vectorized backend (:mod:`fedmedbench.vectorized`)
computes the same batches for all its clients in one call, so both backends
see the same data in the same order.

Two hooks shape a client's objective, identically on both backends:
``extra_loss(w)`` — a data-independent function of the client's flat
parameter vector added to the batch loss (FedProx's proximal term) — and
``grad_offset`` — a flat vector added to every step's gradient (SCAFFOLD's
correction ``c - c_i``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import numpy as np

from fedmedbench.components import Split
from fedmedbench.constraints import Range
from fedmedbench.errors import Diverged
from fedmedbench.models import add_flat_grad, get_flat_params

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass
class RunSettings:
    """Run settings of a cell (the matrix ``[run]`` table over dataset defaults).

    Attributes
    ----------
    clients_per_round : int or float
        An integer is a count of clients per round (``3``); a float is a
        fraction of all clients (``0.5``; the default ``1.0`` is every client).
    client_sampling : str
        ``"fixed"`` (exactly that many, without replacement) or ``"poisson"``
        (each client independently with rate q; what DP accountants assume).
    local_steps : int
        Optimizer steps per client per round; 0 means ``local_epochs`` epochs.
    local_epochs : float
        Passes over the client's data per round when ``local_steps`` is 0.
    batch_size, lr, optimizer, momentum, weight_decay, server_lr, eval_every
        As named; ``optimizer`` is ``"sgd"`` or ``"adam"``.
    pretrain_steps : int
        Transfer learning: optimizer steps of supervised pretraining of the
        initial model on the dataset's public split before round 1 (every
        algorithm; 0, the default, turns it off; a cell whose data has no
        public split is skipped).
    validation : float
        Fraction of each site's training rows carved out (seeded, never
        trained on) as a validation split, in [0, 1): the record reports the
        final model's ``utility.validation``, performance weighting scores
        on it, and tuning reads it; the test split is only for reporting.
        0, the default, carves nothing.
    """

    # the Range annotations are checked before anything trains (fedmedbench.constraints)
    clients_per_round: Annotated[float, Range(gt=0)] = 1.0
    client_sampling: str = "fixed"
    local_steps: Annotated[int, Range(ge=0)] = 0
    local_epochs: Annotated[float, Range(gt=0)] = 1.0
    batch_size: Annotated[int, Range(ge=1)] = 32
    lr: Annotated[float, Range(gt=0)] = 0.1
    optimizer: str = "sgd"
    momentum: Annotated[float, Range(ge=0)] = 0.0
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    server_lr: Annotated[float, Range(gt=0)] = 1.0
    eval_every: Annotated[int, Range(ge=1)] = 1
    pretrain_steps: Annotated[int, Range(ge=0)] = 0
    validation: Annotated[float, Range(ge=0, lt=1)] = 0.0

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are fine)."""
        out = []
        c = self.clients_per_round
        if isinstance(c, bool) or not (isinstance(c, int) and c >= 1
                                       or isinstance(c, float) and 0 < c <= 1):
            out.append(f"clients_per_round = {c!r}: an integer count >= 1, or a float "
                       f"fraction in (0, 1]")
        if self.client_sampling not in ("fixed", "poisson"):
            out.append(f"client_sampling = {self.client_sampling!r}: 'fixed' or 'poisson'")
        if self.optimizer not in ("sgd", "adam"):
            out.append(f"optimizer = {self.optimizer!r}: 'sgd' or 'adam'")
        for k in ("batch_size", "eval_every"):
            if int(getattr(self, k)) < 1:
                out.append(f"{k} = {getattr(self, k)!r}: at least 1")
        if self.local_steps < 0 or self.local_epochs <= 0:
            out.append("local_steps must be >= 0 and local_epochs > 0")
        if not self.lr > 0:
            out.append(f"lr = {self.lr!r}: must be > 0")
        return out

    @classmethod
    def fields(cls) -> dict[str, Any]:
        return {k: v.default for k, v in cls.__dataclass_fields__.items()}  # type: ignore[attr-defined]

    def steps_for(self, n: int) -> int:
        if self.local_steps > 0:
            return int(self.local_steps)
        return max(1, math.ceil(self.local_epochs * math.ceil(n / self.batch_size)))

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        import torch

        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'sgd' or 'adam'")


def to_tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's rows as float32 features and int64 labels (no copy where
    the arrays already have those types)."""
    import torch

    return torch.as_tensor(split.X, dtype=torch.float32), torch.as_tensor(split.y, dtype=torch.long)


# -- minibatch orders ----------------------------------------------------------

_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (the golden ratio)
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


# the same constants as numpy scalars, made once (a scalar made per call costs more
# than the operation on a short array)
_U30, _U27, _U31, _U1 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(1)
_UM1, _UM2, _UGAMMA = np.uint64(_M1), np.uint64(_M2), np.uint64(_GAMMA)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, in place on a uint64 array (numpy's
    array arithmetic wraps modulo 2**64 without a warning)."""
    z ^= z >> _U30
    z *= _UM1
    z ^= z >> _U27
    z *= _UM2
    z ^= z >> _U31
    return z


def _mix_int(z: int) -> int:
    """:func:`_mix` of one Python int (no array round trip)."""
    z ^= z >> 30
    z = (z * _M1) & _MASK64
    z ^= z >> 27
    z = (z * _M2) & _MASK64
    return z ^ (z >> 31)


def splitmix64(seeds: Any, i: Any) -> np.ndarray:
    """Output ``i`` (from 0) of the SplitMix64 generators seeded ``seeds``
    (Steele, Lea & Flood, OOPSLA 2014; the generator Java's
    ``SplittableRandom`` and numpy's seeding of PCG64 build on), elementwise
    with broadcasting: ``mix(seed + (i + 1)·γ)`` in uint64 arithmetic. A
    counter-based generator: any output of any stream is one array
    operation away, which is what lets the vectorized backend draw every
    client's batches at once."""
    z = np.atleast_1d(np.asarray(i, dtype=np.uint64)) + np.uint64(1)
    z = z * np.uint64(_GAMMA) + np.atleast_1d(np.asarray(seeds, dtype=np.uint64))
    return _mix(z)


def batch_seeds(cell_seed: int, clients: Any) -> np.ndarray:
    """The seeds of ``clients``' minibatch streams in a cell seeded
    ``cell_seed`` (:meth:`CellContext.batch_seed`): outputs ``clients`` of a
    SplitMix64 stream seeded from the cell seed, below 2**62."""
    return (splitmix64(_batch_base(int(cell_seed)), clients) >> np.uint64(2)).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _batch_base(cell_seed: int) -> int:
    """The seed of the cell's stream of batch seeds (a Generator made once
    per cell seed, not once per client)."""
    from fedmedbench.context import stable_int

    return int(np.random.default_rng([cell_seed, stable_int("batches")]).integers(2**62))


#: segments at most this long on average are ordered by one global sort (the measured
#: crossover: 20 segments of 144 rows 0.11 ms by one sort, 0.31 ms one by one; of 500
#: rows 0.82 against 0.40 ms)
_SMALL_SEGMENTS = 256


def epoch_orders(seeds: Any, epochs: Any, sizes: Any) -> np.ndarray:
    """Row orders of minibatch epochs, concatenated: segment ``j`` is the
    order of ``sizes[j]`` rows in epoch ``epochs[j]`` of the stream seeded
    ``seeds[j]``.

    The order of epoch ``e`` of a stream seeded ``s`` over ``n`` rows: row
    ``i`` gets the key ``splitmix64(h, i)`` with ``h = splitmix64(s, e)``,
    and the rows are sorted by their keys' top ``64 - b`` bits (``b`` the
    bit length of ``n - 1``, at least 1), ties by row index: a uniformly
    random permutation up to 2**-(64-b) key collisions, a function of
    ``(s, e, n)`` alone. Many short segments (many clients with few rows)
    are ordered by one sort of all of them; long ones one by one. Both
    give the same orders (tested).
    """
    sizes = np.atleast_1d(np.asarray(sizes, dtype=np.int64))
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    h = splitmix64(seeds, epochs)
    if len(sizes) > 1 and total <= _SMALL_SEGMENTS * len(sizes):
        # b: bit length of max(n - 1, 1), exact through frexp's exponent (_order's b)
        b = np.frexp(np.maximum(sizes - 1, 1).astype(np.float64))[1].astype(np.uint64)
        nmax = int(sizes.max())
        if len(sizes) * nmax <= 2 * total:
            # similar sizes: one row each of a (segments, longest) array, sorted row by row
            # as _order sorts one, the padding (all ones) last (10 segments of 288 rows:
            # 0.04 ms, against 0.19 ms by lexsort)
            i = np.arange(nmax, dtype=np.uint64)
            real = i[None, :] < sizes.astype(np.uint64)[:, None]
            z = _sorted_keys(h.astype(np.uint64)[:, None], i, (i + _U1) * _UGAMMA, b[:, None],
                             pad=~real)
            return z[real].view(np.int64)
        start = np.cumsum(sizes) - sizes
        seg = np.repeat(np.arange(len(sizes)), sizes)
        i = np.arange(total, dtype=np.int64) - start[seg]
        keys = splitmix64(h[seg], i) >> b[seg]
        order = np.lexsort((keys, seg))  # by segment, then key; stable: ties by row
        return order - start[seg]
    return np.concatenate([_order(hj, n) for hj, n in zip(h.tolist(), sizes.tolist())])


def _order(h: int, n: int) -> np.ndarray:
    """One epoch's order of ``n`` rows from its key seed ``h``
    (:func:`epoch_orders`): the keys' top bits above the row index, so that
    the values are distinct and one plain sort orders them."""
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    i = np.arange(n, dtype=np.uint64)
    return _order_of(h, i, (i + _U1) * _UGAMMA)


def _order_of(h: int, i: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """:func:`_order` from the row indices ``i`` (uint64, ``n >= 2`` of
    them) and their counter steps ``(i + 1)·γ`` (a stream of fixed ``n``
    makes both once)."""
    n = len(i)
    z = _sorted_keys(np.uint64(h), i, steps, np.uint64((n - 1).bit_length()))
    return z.view(np.int64)  # below n: the same values as int64


def _sorted_keys(h: Any, i: np.ndarray, steps: np.ndarray, b: Any,
                 pad: np.ndarray | None = None) -> np.ndarray:
    """The row indices ``i`` (uint64) sorted by their SplitMix64 keys' top
    ``64 - b`` bits along the last axis, ties by index: the keys of counter
    steps ``steps`` from ``h`` (broadcast), with ``i`` in their low ``b``
    bits so that every value is distinct and a plain sort orders them;
    ``pad``: positions set to all ones first (sorted last)."""
    z = steps + h
    _mix(z)
    z >>= b
    z <<= b
    z |= i
    if pad is not None:
        z[pad] = np.uint64(_MASK64)
    z.sort(axis=-1)
    z &= (_U1 << b) - _U1
    return z


class BatchStream:
    """An endless stream of shuffled minibatch indices over ``n`` rows: epoch
    ``e``'s order is :func:`epoch_orders` of ``(seed, e, n)``, the last
    batch of an epoch smaller. Batch ``t`` (from 0) is rows
    ``order(e)[q·bs : (q+1)·bs]`` with ``e, q = divmod(t, ceil(n / bs))``,
    a function of ``t`` alone: the vectorized backend computes every
    client's batches of a round in one call from the clients' seeds and
    batch counts (:meth:`VectorBackend.plan`), the same rows in the same
    order as this stream gives them step by step on the loop backend."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.bs = int(n), int(batch_size)
        self.seed = int(seed)
        self.per_epoch = max(1, -(-self.n // self.bs))
        #: batches handed out so far
        self.drawn = 0
        self._epoch = -1
        self._order = np.zeros(0, dtype=np.int64)
        self._i = np.arange(self.n, dtype=np.uint64)
        self._steps = (self._i + _U1) * _UGAMMA

    def order(self, epoch: int) -> np.ndarray:
        """The row order of ``epoch`` (from 0): :func:`epoch_orders` of
        ``(seed, epoch, n)``."""
        h = _mix_int((self.seed + (int(epoch) + 1) * _GAMMA) & _MASK64)
        if self.n <= 1:
            return np.arange(self.n, dtype=np.int64)
        return _order_of(h, self._i, self._steps)

    def next_indices(self) -> np.ndarray:
        """The next batch's row indices (int64)."""
        e, q = divmod(self.drawn, self.per_epoch)
        if e != self._epoch:
            self._order, self._epoch = self.order(e), e
        self.drawn += 1
        return self._order[q * self.bs:(q + 1) * self.bs]


ExtraLoss = Callable[["torch.Tensor"], "torch.Tensor"]


class LocalTrainer(Protocol):
    """One client's local training (what a ``local``-stage mechanism supplies)."""

    def train(self, params: torch.Tensor, steps: int, *, extra_loss: ExtraLoss | None = None,
              grad_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Load the flat ``params``, run ``steps`` optimizer steps, return the
        new flat parameters and the mean training loss (NaN if no step saw a
        record). ``extra_loss`` and ``grad_offset`` as in the module docstring."""
        ...  # pragma: no cover


def flat_buffer(model: nn.Module) -> torch.Tensor:
    """One flat tensor holding the model's parameters, which become views into
    it (made once per model): loading and reading a client's parameters is
    then one copy, not one per tensor."""
    import torch

    buf = model.__dict__.get("_fedmedbench_flat")
    if buf is None:
        params = list(model.parameters())
        buf = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        off = 0
        for p in params:
            n = p.numel()
            p.data = buf[off:off + n].view_as(p)
            off += n
        object.__setattr__(model, "_fedmedbench_flat", buf)
    return buf


def grad_reset(opt: Any) -> Callable[[], None]:
    """``opt.zero_grad(set_to_none=True)`` as a function: for torch's own
    ``zero_grad``, ``p.grad = None`` on every parameter, without its profiler
    scaffolding (a quarter of a 2-step client's overhead over a bare loop,
    measured); an optimizer with a ``zero_grad`` of its own (per-sample
    gradients, ...) keeps it."""
    import torch

    if type(opt).zero_grad is not torch.optim.Optimizer.zero_grad:
        return lambda: opt.zero_grad(set_to_none=True)
    tensors = [p for g in opt.param_groups for p in g["params"]]

    def reset() -> None:
        for p in tensors:
            p.grad = None

    return reset


class SGDTrainer:
    """The harness's local trainer: one client's :class:`BatchStream` and data
    (cross-entropy, the run's optimizer). The model and optimizer may be shared
    by every client of a cell (``optimizer``): each round loads the client's
    parameters and resets the optimizer state, so nothing of one client
    carries over to another."""

    def __init__(self, model: nn.Module, data: Split, settings: RunSettings, *, seed: int,
                 optimizer: Any = None) -> None:
        self.model = model
        self.X, self.y = to_tensors(data)
        self.stream = BatchStream(len(data), settings.batch_size, seed)
        self.flat = flat_buffer(model)
        self.optimizer = optimizer or settings.make_optimizer(model.parameters())
        model.train()  # trainers' models are never switched to eval

    def train(self, params: torch.Tensor, steps: int, *, extra_loss: ExtraLoss | None = None,
              grad_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        import torch
        from torch import nn

        model, opt = self.model, self.optimizer
        with torch.no_grad():
            self.flat.copy_(params)
        opt.state.clear()
        zero_grad = grad_reset(opt)
        total, count = torch.zeros(()), 0
        for _ in range(steps):
            idx = torch.from_numpy(self.stream.next_indices())
            zero_grad()
            loss = nn.functional.cross_entropy(model(self.X[idx]), self.y[idx])
            full = (loss + extra_loss(get_flat_params(model, grad=True)) if extra_loss is not None
                    else loss)
            full.backward()
            if grad_offset is not None:
                add_flat_grad(model, grad_offset)
            opt.step()
            total += loss.detach()
            count += 1
        return finish_local(model, total, count, flat=self.flat)


def finish_local(model: nn.Module, total: torch.Tensor, count: int,
                 flat: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(new flat parameters, mean loss) after local steps; raises
    :class:`Diverged` on a non-finite measured loss (checked once per round)."""
    mean = float(total) / count if count else float("nan")
    if count and not math.isfinite(mean):
        raise Diverged(f"local training loss became {mean}")
    if flat is not None:
        return flat.detach().clone(), mean
    return get_flat_params(model), mean


def predict_proba(model: nn.Module, X: np.ndarray, *, batch_size: int = 2048) -> np.ndarray:
    """Class probabilities of ``model`` on ``X`` (softmax of its logits, in
    batches of ``batch_size``, without gradients), as an ``(n, classes)`` array."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(X), batch_size):
            xb = torch.as_tensor(X[i:i + batch_size], dtype=torch.float32)
            out.append(torch.softmax(model(xb), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def per_example_loss(model: nn.Module, split: Split, *, batch_size: int = 2048) -> np.ndarray:
    """Cross-entropy of each example (for membership inference)."""
    import torch
    from torch import nn

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            xb = torch.as_tensor(split.X[i:i + batch_size], dtype=torch.float32)
            yb = torch.as_tensor(split.y[i:i + batch_size], dtype=torch.long)
            out.append(nn.functional.cross_entropy(model(xb), yb, reduction="none").numpy())
    return np.concatenate(out) if out else np.zeros(0)
