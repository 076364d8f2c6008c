"""The vectorized backend: all sampled clients of a round in one torch.func computation.

Each client's parameters are a row of a ``(k, D)`` matrix over the model's
flat parameter vector. One local step of every client is one call of
``vmap(grad(loss))`` over that matrix, with ``functional_call`` running the
cell's architecture on each row (PyTorch's model-ensembling recipe). Each
client draws its batches from its own :class:`~fedmedbench.training.BatchStream`
— the stream the loop backend uses, seeded the same — so both backends see
the same rows in the same order. Clients of unequal size are handled by
masks: a step's batches are padded to the largest one (padding rows weigh
0), and a client whose local steps are done is frozen (its parameters and
optimizer state stop changing). The optimizers are functional copies of
``torch.optim.SGD`` (momentum, weight decay) and ``torch.optim.Adam``,
operation for operation, so the backends agree to float tolerance.

A ``local``-stage privacy mechanism takes part through
:meth:`fedmedbench.LocalStage.vector_steps`, which returns an object with

- ``stream(client, n)``: the client's batch sampler (DP-SGD: Poisson), with
  ``next_indices()``;
- ``privatize(per_sample_grads, mask, clients) -> (k, D)``: the step's
  gradient from per-example gradients (DP-SGD: clip each, sum, add noise,
  divide by the expected batch size), called once per step with the clients
  active in it.

Per-example gradients are then computed with a nested ``vmap`` (over
clients, then examples), as Opacus does in its functorch mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.backends import LoopBackend, _checked
from fedmedbench.components import Updates
from fedmedbench.context import ClientContext
from fedmedbench.training import BatchStream, to_tensors

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.engine import CellRun
    from fedmedbench.training import ExtraLoss

__all__ = ["VectorBackend", "FunctionalModel", "functional_optimizer"]


class FunctionalModel:
    """The cell's architecture as a function of a flat parameter vector."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.spec = []
        off = 0
        for name, p in module.named_parameters():
            self.spec.append((name, off, off + p.numel(), tuple(p.shape)))
            off += p.numel()
        self.numel = off

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: w[a:b].view(shape) for n, a, b, shape in self.spec}

    def __call__(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        return functional_call(self.module, self.params(w), (x,))


class _SGD:
    """``torch.optim.SGD`` (no dampening, no Nesterov) on stacked parameters."""

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.buf: torch.Tensor | None = None

    def step(self, w: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        import torch

        if self.wd != 0:
            g = g.add(w, alpha=self.wd)
        if self.momentum != 0:
            if self.buf is None:
                new_buf = g.clone()
            else:
                new_buf = self.buf.mul(self.momentum).add(g)
            self.buf = new_buf if self.buf is None else torch.where(active, new_buf, self.buf)
            g = new_buf
        return torch.where(active, w.add(g, alpha=-self.lr), w)


class _Adam:
    """``torch.optim.Adam`` (no AMSGrad) on stacked parameters; clients in
    lockstep, so one step count serves all active rows."""

    def __init__(self, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, betas[0], betas[1], eps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.t = 0

    def step(self, w: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        import torch

        if self.m is None:
            self.m, self.v = torch.zeros_like(w), torch.zeros_like(w)
        assert self.v is not None
        self.t += 1
        if self.wd != 0:
            g = g.add(w, alpha=self.wd)
        m = self.m.lerp(g, 1 - self.b1)
        v = self.v.mul(self.b2).addcmul(g, g, value=1 - self.b2)
        bc1 = 1 - self.b1 ** self.t
        bc2 = 1 - self.b2 ** self.t
        denom = (v.sqrt() / bc2 ** 0.5).add(self.eps)
        new = w.addcdiv(m, denom, value=-(self.lr / bc1))
        self.m, self.v = torch.where(active, m, self.m), torch.where(active, v, self.v)
        return torch.where(active, new, w)


def functional_optimizer(settings: Any) -> _SGD | _Adam:
    """The functional twin of ``settings.make_optimizer`` (fresh state)."""
    if settings.optimizer == "sgd":
        return _SGD(float(settings.lr), float(settings.momentum), float(settings.weight_decay))
    if settings.optimizer == "adam":
        return _Adam(float(settings.lr), float(settings.weight_decay))
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; use 'sgd' or 'adam'")


class VectorBackend(LoopBackend):
    """All sampled clients of a round in one computation (module docstring)."""

    name = "vectorized"

    def __init__(self, run: CellRun) -> None:
        super().__init__(run)
        import torch

        self.fmodel = FunctionalModel(run.model_factory())
        xs, ys, self.offset = [], [], []
        off = 0
        for site in self.ctx.clients:
            X, y = to_tensors(site.train)
            xs.append(X)
            ys.append(y)
            self.offset.append(off)
            off += len(y)
        self.X = torch.cat(xs) if xs else torch.zeros(0)
        self.y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
        self.vlocal = (run.components.local_stage.vector_steps(self.ctx)
                       if run.components.local_stage is not None else None)
        self.streams: dict[int, Any] = {}

    def client_updates(self, algorithm: Any, clients: list[int],
                       params: torch.Tensor | dict[int, torch.Tensor], *,
                       personal: torch.Tensor | None = None) -> Updates:
        import torch

        ctx = ClientContext(self.ctx, list(clients), self, personal=personal)
        p = torch.stack([params[c] for c in clients]) if isinstance(params, dict) else params
        return _checked(algorithm.client_update(ctx, p), algorithm, list(clients))

    def finalize(self, algorithm: Any, clients: list[int], params: torch.Tensor,
                 personal: torch.Tensor | None = None) -> torch.Tensor:
        from fedmedbench.backends import _finalized

        ctx = ClientContext(self.ctx, list(clients), self, personal=personal)
        return _finalized(algorithm.finalize(ctx, params), algorithm, len(clients))

    def buffers(self, client: int, trainer: str = "main") -> torch.Tensor | None:
        """None: a model that runs vectorized updates no buffers while training."""
        return None

    def load_buffers(self, client: int, flat: torch.Tensor, trainer: str = "main") -> None:
        return None

    def stream(self, client: int, trainer: str = "main") -> Any:
        key = (client, trainer)
        if key not in self.streams:
            n = len(self.ctx.clients[client].train)
            self.streams[key] = (
                self.vlocal.stream(client, n) if self.vlocal is not None else
                BatchStream(n, self.ctx.settings.batch_size,
                            self.ctx.batch_seed(client)))
        return self.streams[key]

    def _gather(self, clients: list[int], active: list[bool], trainer: str = "main"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X, y, mask) of one step: each active client's next batch, padded."""
        import torch

        idx = [self.stream(c, trainer).next_indices() if a else None
               for c, a in zip(clients, active)]
        width = max([len(i) for i in idx if i is not None] + [1])
        rows = torch.zeros((len(clients), width), dtype=torch.long)
        mask = torch.zeros((len(clients), width), dtype=torch.float32)
        for j, (c, i) in enumerate(zip(clients, idx)):
            if i is not None and len(i):
                rows[j, :len(i)] = i + self.offset[c]
                mask[j, :len(i)] = 1.0
        return self.X[rows], self.y[rows], mask

    def train(self, clients: list[int], params: torch.Tensor, steps: list[int], *,
              extra_loss: ExtraLoss | None, grad_offset: torch.Tensor | None,
              trainable: torch.Tensor | None = None, trainer: str = "main"
              ) -> tuple[torch.Tensor, np.ndarray]:
        import torch
        from torch.func import grad, vmap

        from fedmedbench.errors import Diverged

        k = len(clients)
        fm = self.fmodel
        W = params.detach().to(torch.float32).clone()
        opt = functional_optimizer(self.ctx.settings)
        n_steps = torch.as_tensor(steps)
        loss_sum = torch.zeros(k, dtype=torch.float64)
        loss_cnt = torch.zeros(k, dtype=torch.float64)
        ce = torch.nn.functional.cross_entropy

        def batch_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
            loss = (ce(fm(w, x), y, reduction="none") * m).sum() / m.sum().clamp(min=1.0)
            total = loss + extra_loss(w) if extra_loss is not None else loss
            return total, loss

        def example_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
            loss = ce(fm(w, x.unsqueeze(0)), y.unsqueeze(0))
            return loss, loss

        step_grads = vmap(grad(batch_loss, has_aux=True))
        example_grads = vmap(vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0)))
        extra_grads = vmap(grad(extra_loss)) if extra_loss is not None else None
        free = None
        if trainable is not None:  # frozen coordinates keep their values and optimizer state
            if trainable.numel() != fm.numel:
                raise ValueError(f"trainable mask has {trainable.numel()} values, the model has "
                                 f"{fm.numel} parameters")
            free = trainable.reshape(1, -1).to(torch.bool)
        for s in range(int(max(steps, default=0))):
            active = [s < st for st in steps]
            X, Y, M = self._gather(clients, active, trainer)
            act = (n_steps > s).unsqueeze(1)
            if free is not None:
                act = act & free
            if self.vlocal is None:
                G, L = step_grads(W, X, Y, M)
            else:
                # (frozen parameters count in the clipping norm, as on the loop backend)
                per, per_loss = example_grads(W, X, Y)
                G = self.vlocal.privatize(per.reshape(k, M.shape[1], -1), M,
                                          [c for c, a in zip(clients, active) if a], active)
                L = (per_loss * M).sum(1) / M.sum(1).clamp(min=1.0)
                if extra_grads is not None:  # data-independent: after privatisation
                    G = G + extra_grads(W)
            if grad_offset is not None:
                G = G + grad_offset
            W = opt.step(W, G.detach(), act)
            seen = (M.sum(1) > 0) & (n_steps > s)
            loss_sum += torch.where(seen, L.detach().double(), torch.zeros((), dtype=torch.float64))
            loss_cnt += seen.double()
        mean = torch.where(loss_cnt > 0, loss_sum / loss_cnt.clamp(min=1), torch.nan).numpy()
        bad = [c for c, v, n in zip(clients, mean, loss_cnt.tolist()) if n and not np.isfinite(v)]
        if bad:
            raise Diverged(f"local training loss became {mean[clients.index(bad[0])]} "
                           f"(client {bad[0]})")
        return W, mean
