"""Local training: one persistent model, optimizer and batch stream per client.

Each client keeps its model object, optimizer and data stream for the whole
cell, so a ``local``-stage privacy mechanism (DP-SGD) wraps them exactly once
and keeps its accountant across rounds (re-wrapping every round is a known
Opacus pitfall). Each round the global parameters are copied in, the
optimizer state is reset, and ``steps`` optimizer steps run.

Without a local-stage mechanism batches come from a seeded permutation of
in-memory tensors (no DataLoader overhead); with one, a ``torch`` DataLoader
is built and handed to the mechanism (Opacus replaces it with Poisson sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmedbench.components import Split
from fedmedbench.constraints import Range
from fedmedbench.errors import Diverged
from fedmedbench.models import set_flat_params


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
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'sgd' or 'adam'")


def to_tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(split.X, dtype=torch.float32), torch.as_tensor(split.y, dtype=torch.long)


class BatchStream:
    """An endless stream of shuffled minibatches over in-memory tensors."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.X, self.y, self.bs = X, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())

    def _epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.y), generator=self.gen)
        for i in range(0, len(perm), self.bs):
            idx = perm[i:i + self.bs]
            yield self.X[idx], self.y[idx]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:
            self._it = self._epoch()
            return next(self._it)


class _LoaderBatches:
    """An endless stream over a (possibly Opacus-wrapped) DataLoader."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self._it: Iterator[Any] = iter(())

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)


@dataclass
class ClientTrainer:
    """Persistent training state of one client."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Any
    n: int
    extra: dict[str, Any] = field(default_factory=dict)


LossHook = Callable[[nn.Module], torch.Tensor]
GradHook = Callable[[nn.Module], None]


def make_trainer(model: nn.Module, split: Split, settings: RunSettings, *, seed: int,
                 wrap: Callable[[nn.Module, torch.optim.Optimizer, DataLoader], tuple] | None
                 ) -> ClientTrainer:
    """Build a client's trainer; ``wrap`` (local-stage privacy) receives a real
    DataLoader once and returns the wrapped (model, optimizer, loader)."""
    X, y = to_tensors(split)
    opt = settings.make_optimizer(model.parameters())
    if wrap is None:
        return ClientTrainer(model, opt, BatchStream(X, y, settings.batch_size, seed), len(y))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(X, y), batch_size=settings.batch_size, shuffle=True,
                        generator=gen)
    model, opt, loader = wrap(model, opt, loader)
    return ClientTrainer(model, opt, _LoaderBatches(loader), len(y))


def train_steps(trainer: ClientTrainer, params: torch.Tensor, steps: int, *,
                extra_loss: LossHook | None = None, grad_hook: GradHook | None = None,
                reset_optimizer: bool = True) -> tuple[torch.Tensor, float]:
    """Load ``params``, run ``steps`` optimizer steps, return (new params, mean loss).

    ``extra_loss(model)`` is added to the batch loss (FedProx's proximal term);
    ``grad_hook(model)`` runs after ``backward`` and before the step (SCAFFOLD's
    correction). Raises :class:`Diverged` on a non-finite loss.
    """
    model, opt = trainer.model, trainer.optimizer
    set_flat_params(_inner(model), params)
    if reset_optimizer:
        opt.state.clear()
    model.train()
    inner = _inner(model)
    params = [p for p in inner.parameters() if p.requires_grad]
    private = hasattr(opt, "pre_step") and hasattr(opt, "original_optimizer")  # Opacus
    total = torch.zeros(())
    count = 0
    for _ in range(steps):
        xb, yb = trainer.batches.next()
        opt.zero_grad(set_to_none=True)
        if len(yb) == 0:  # Poisson sampling can draw an empty batch
            opt.step()
            continue
        loss = nn.functional.cross_entropy(model(xb), yb)
        if extra_loss is not None and private:
            # Opacus rebuilds p.grad from the clipped, noised per-sample gradients and
            # would drop a regulariser's gradient. A data-independent term (FedProx's
            # proximal term) is added after privatisation: post-processing, no ε cost.
            loss.backward()
            if opt.pre_step():
                extra = torch.autograd.grad(extra_loss(inner), params, allow_unused=True)
                for p, g in zip(params, extra):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
                if grad_hook is not None:
                    grad_hook(inner)
                opt.original_optimizer.step()
            total += loss.detach()
            count += 1
            continue
        full = loss + extra_loss(inner) if extra_loss is not None else loss
        full.backward()
        if grad_hook is not None:
            grad_hook(inner)
        opt.step()
        total += loss.detach()
        count += 1
    mean = float(total) / count if count else float("nan")
    if count and not math.isfinite(mean):  # checked once per round: no sync per step
        raise Diverged(f"local training loss became {mean}")
    new = torch.cat([p.detach().reshape(-1) for p in inner.parameters()]).clone()
    return new, mean


def _inner(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)


@torch.no_grad()
def predict_proba(model: nn.Module, X: np.ndarray, *, batch_size: int = 2048) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(X), batch_size):
        xb = torch.as_tensor(X[i:i + batch_size], dtype=torch.float32)
        out.append(torch.softmax(model(xb), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@torch.no_grad()
def per_example_loss(model: nn.Module, split: Split, *, batch_size: int = 2048) -> np.ndarray:
    """Cross-entropy of each example (for membership inference)."""
    model.eval()
    out = []
    for i in range(0, len(split), batch_size):
        xb = torch.as_tensor(split.X[i:i + batch_size], dtype=torch.float32)
        yb = torch.as_tensor(split.y[i:i + batch_size], dtype=torch.long)
        out.append(nn.functional.cross_entropy(model(xb), yb, reduction="none").numpy())
    return np.concatenate(out) if out else np.zeros(0)
