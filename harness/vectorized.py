"""The vectorized backend: all sampled clients of a round in one torch.func computation.

Each client's parameters are a row of a ``(k, D)`` matrix over the model's
flat parameter vector. One local step of every client is one call of
``vmap(grad(loss))`` over that matrix, with ``functional_call`` running the
cell's architecture on each row (PyTorch's model-ensembling recipe). Each
client's batches are those of its own :class:`~fedmedbench.training.BatchStream`
— the stream the loop backend uses, seeded the same — computed for all
clients of a round at once (:meth:`VectorBackend.plan`), so both backends
see the same rows in the same order. Clients of unequal size are handled by
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

from fedmedbench.backends import ClientData, LoopBackend, _checked
from fedmedbench.components import Split, Updates
from fedmedbench.context import ClientContext
from fedmedbench.training import batch_seeds, epoch_orders, to_tensors

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.training import ExtraLoss

__all__ = ["VectorBackend", "FunctionalModel", "functional_optimizer", "resolve_device", "DEVICES"]


class FunctionalModel:
    """The cell's architecture as a function of its parameters, held either as
    one flat vector per client or as stacked per-parameter tensors (the form
    the vmapped steps use: slicing a flat vector inside ``grad`` costs a
    scatter per parameter in the backward pass)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.spec = []
        off = 0
        for name, p in module.named_parameters():
            self.spec.append((name, off, off + p.numel(), tuple(p.shape)))
            off += p.numel()
        self.numel = off
        self.names = [n for n, _, _, _ in self.spec]

    def split(self, W: torch.Tensor) -> list[torch.Tensor]:
        """(k, D) flat rows -> per-parameter tensors of shape (k, *shape)."""
        k = W.shape[0]
        return [W[:, a:b].reshape(k, *shape) for _, a, b, shape in self.spec]

    def join(self, P: list[torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors (k, *shape) -> (k, D) flat rows."""
        import torch

        return torch.cat([p.reshape(p.shape[0], -1) for p in P], dim=1)

    def __call__(self, ps: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        return functional_call(self.module, dict(zip(self.names, ps)), (x,))

    @staticmethod
    def flat(ps: list[torch.Tensor]) -> torch.Tensor:
        """One client's parameters as a flat vector (for ``extra_loss``)."""
        import torch

        return torch.cat([p.reshape(-1) for p in ps])


class _SGD:
    """``torch.optim.SGD`` (no dampening, no Nesterov) on stacked parameters."""

    @staticmethod
    def _all(active: torch.Tensor) -> bool:
        return bool(active.all())

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.buf: list[torch.Tensor] | None = None

    def step(self, P: list[torch.Tensor], G: list[torch.Tensor], active: torch.Tensor
             ) -> list[torch.Tensor]:
        import torch

        if self.momentum == 0 and self.wd == 0 and self._all(active):
            torch._foreach_add_(P, G, alpha=-self.lr)  # P holds the backend's own copies
            return P
        out, bufs = [], []
        for j, (w, g) in enumerate(zip(P, G)):
            act = active.view(-1, *([1] * (w.dim() - 1)))
            if self.wd != 0:
                g = g.add(w, alpha=self.wd)
            if self.momentum != 0:
                if self.buf is None:
                    new_buf = g.clone()
                    bufs.append(new_buf)
                else:
                    new_buf = self.buf[j].mul(self.momentum).add(g)
                    bufs.append(torch.where(act, new_buf, self.buf[j]))
                g = new_buf
            new = w.add(g, alpha=-self.lr)
            out.append(new if self._all(active) else torch.where(act, new, w))
        if self.momentum != 0:
            self.buf = bufs
        return out


class _Adam:
    """``torch.optim.Adam`` (no AMSGrad) on stacked parameters; clients in
    lockstep, so one step count serves all active rows."""

    def __init__(self, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, betas[0], betas[1], eps
        self.m: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.t = 0

    def step(self, P: list[torch.Tensor], G: list[torch.Tensor], active: torch.Tensor
             ) -> list[torch.Tensor]:
        import torch

        if self.m is None:
            self.m = [torch.zeros_like(w) for w in P]
            self.v = [torch.zeros_like(w) for w in P]
        assert self.v is not None
        self.t += 1
        bc1 = 1 - self.b1 ** self.t
        bc2 = 1 - self.b2 ** self.t
        out = []
        for j, (w, g) in enumerate(zip(P, G)):
            act = active.view(-1, *([1] * (w.dim() - 1)))
            if self.wd != 0:
                g = g.add(w, alpha=self.wd)
            m = self.m[j].lerp(g, 1 - self.b1)
            v = self.v[j].mul(self.b2).addcmul(g, g, value=1 - self.b2)
            denom = (v.sqrt() / bc2 ** 0.5).add(self.eps)
            out.append(torch.where(act, w.addcdiv(m, denom, value=-(self.lr / bc1)), w))
            self.m[j], self.v[j] = torch.where(act, m, self.m[j]), torch.where(act, v, self.v[j])
        return out


def functional_optimizer(settings: Any) -> _SGD | _Adam:
    """The functional twin of ``settings.make_optimizer`` (fresh state)."""
    if settings.optimizer == "sgd":
        return _SGD(float(settings.lr), float(settings.momentum), float(settings.weight_decay))
    if settings.optimizer == "adam":
        return _Adam(float(settings.lr), float(settings.weight_decay))
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; use 'sgd' or 'adam'")


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: Any = None) -> torch.device:
    """The torch device the vectorized backend trains on: ``None`` or
    ``"cpu"`` the CPU (the default and the reference), ``"cuda"`` (or
    ``"cuda:N"``) a CUDA device, ``"auto"`` CUDA when one is present, else
    the CPU. Asking for CUDA where there is none is an error that says so."""
    import torch

    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device)
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device {name!r}: one of {', '.join(DEVICES)} (or cuda:N)")
        dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: torch {torch.__version__} sees no CUDA "
                         f"device here; use 'cpu' or 'auto'")
    return dev


class VectorBackend(LoopBackend):
    """All sampled clients of a round in one computation (module docstring).

    ``kernel`` says which step runs (recorded as the record's
    ``backend.kernel``): ``"compiled"``, or the path that runs instead with
    the reason (``"batched layers (not compiled: Dropout (layer '2') with
    p=0.5 ...)"``, ``"vmap (...)"``, the per-example path of a local-stage
    mechanism); ``kernel_reason`` holds the reason alone (None when
    compiled). ``device`` is where the clients' parameters, batches and
    steps live (:func:`resolve_device`; CPU by default, the reference):
    ``train`` takes and returns CPU tensors whatever it is.
    """

    name = "vectorized"

    def __init__(self, parts: ClientData, *, device: Any = None) -> None:
        super().__init__(parts)
        import torch

        self.device = resolve_device(device)
        # the seeded template, read only (its structure and parameter names; the compiled
        # step never calls it): a copy is made below for a kernel that calls the module
        # (torch.func swaps its parameters) and by ``to`` before moving it
        peek = getattr(parts.factory, "peek", None)
        module = peek() if callable(peek) else parts.factory()
        self._module_is_template = callable(peek)
        self.fmodel = FunctionalModel(module)
        # every site's rows in one tensor (as to_tensors converts them), one copy each
        trains = [site.train for site in parts.sites]
        self._n = np.asarray([len(t.y) for t in trains], dtype=np.int64)
        self._row0 = np.cumsum(self._n) - self._n
        self.offset = self._row0.tolist()
        rows = [t for t in trains if len(t.y)]
        if rows:
            self.X, self.y = to_tensors(Split(np.concatenate([np.asarray(t.X) for t in rows]),
                                              np.concatenate([np.asarray(t.y) for t in rows])))
        else:
            self.X, self.y = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        self.vlocal = (parts.local.vector_steps(self.ctx) if parts.local is not None else None)
        self.streams: dict[tuple[int, str], Any] = {}
        #: every client's minibatch seed (``CellContext.batch_seed``), and per trainer how
        #: many batches each client drew so far (:meth:`plan`)
        self._seeds = batch_seeds(self.ctx.seed, np.arange(len(self._n)))
        self.drawn: dict[str, np.ndarray] = {}
        self.compiled: Any = None
        self.twin: Any = None
        self.kernel_reason: str | None = None
        if self.vlocal is not None:
            self.kernel_reason = (f"privacy {getattr(parts.local, 'name', 'local stage')} clips "
                                  f"per-example gradients")
            self.kernel = f"vmap per example ({self.kernel_reason})"
        elif not len(self.X):
            self.kernel_reason = "no training rows to check the model on"
            self.kernel = f"vmap ({self.kernel_reason})"
        else:
            # ops with analytic backward passes, read from the fx graph once (compiled.py);
            # else one batched kernel per layer and autograd (batched.py); else vmap
            from fedmedbench.batched import batched_twin
            from fedmedbench.compiled import DRAWS_ON_COMPILED_ONLY, compile_model, drawing_dropout

            self.compiled, why = compile_model(module, self.X[:2])
            if self.compiled is not None:
                self.kernel = "compiled"
            elif drawing_dropout(module):
                raise ValueError(f"the model's {drawing_dropout(module)} "
                                 f"{DRAWS_ON_COMPILED_ONLY}, and the model does not compile here "
                                 f"({why}); run it with backend = 'loop'")
            else:
                self._own_module()  # the twin calls the module's layers
                self.twin = batched_twin(self.fmodel.module, self.X[:2])
                self.kernel_reason = why
                self.kernel = (f"{'batched layers' if self.twin is not None else 'vmap'} "
                               f"(not compiled: {why})")
        if self.compiled is None:
            self._own_module()
        if self.device.type != "cpu":
            self.to(self.device)

    def _own_module(self) -> None:
        """A module of this backend's own in place of the cell's template."""
        if self._module_is_template:
            self.fmodel = FunctionalModel(self.parts.factory())
            self._module_is_template = False

    def to(self, device: Any) -> VectorBackend:
        """Train on ``device`` from now on (:func:`resolve_device`): the clients'
        rows and the architecture move there; ``train`` still takes and
        returns CPU tensors."""
        self._own_module()
        self.device = resolve_device(device)
        self.X, self.y = self.X.to(self.device), self.y.to(self.device)
        self.fmodel.module.to(self.device)
        return self

    def client_updates(self, algorithm: Any, clients: list[int],
                       params: torch.Tensor | dict[int, torch.Tensor], *,
                       personal: torch.Tensor | None = None,
                       broadcast: Any = None) -> Updates:
        import torch

        ctx = ClientContext(self.ctx, list(clients), self, personal=personal,
                            broadcast=broadcast)
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
        """The local-stage mechanism's sampler of ``client`` (DP-SGD's Poisson
        stream); without one, batches come from :meth:`plan`."""
        assert self.vlocal is not None
        key = (client, trainer)
        if key not in self.streams:
            self.streams[key] = self.vlocal.stream(client, len(self.parts.sites[client].train))
        return self.streams[key]

    def _gather(self, clients: list[int], active: list[bool], trainer: str = "main"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X, y, mask) of one step: each active client's next batch, padded."""
        import torch

        streams = self.streams
        idx = [(streams.get((c, trainer)) or self.stream(c, trainer)).next_indices() if a
               else None for c, a in zip(clients, active)]
        lens = np.fromiter((0 if i is None else len(i) for i in idx), dtype=np.int64,
                           count=len(idx))
        width = max(1, int(lens.max(initial=0)))
        if int(lens.min(initial=0)) == width:  # every client a full batch: one stack
            rows = np.stack([i for i in idx if i is not None])
        else:
            rows = np.zeros((len(clients), width), dtype=np.int64)
            for j, i in enumerate(idx):
                if i is not None:
                    rows[j, :len(i)] = i
        mask = np.arange(width)[None, :] < lens[:, None]
        rows = np.where(mask, rows + self._offsets(clients)[:, None], 0)
        X, Y = self._rows(torch.from_numpy(rows).to(self.device))
        return X, Y, torch.from_numpy(mask.astype(np.float32)).to(self.device)

    def _rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training rows ``idx`` (k, w): X (k, w, ...) and y (k, w), by
        ``index_select`` on the flattened indices (3-5x faster than advanced
        indexing, ``X[idx]``, for these shapes; the same values)."""
        flat = idx.reshape(-1)
        shape = tuple(idx.shape)
        return (self.X.index_select(0, flat).view(*shape, *self.X.shape[1:]),
                self.y.index_select(0, flat).view(shape))

    def _offsets(self, clients: list[int]) -> np.ndarray:
        key = tuple(clients)
        if getattr(self, "_off_key", None) != key:
            self._off_key = key
            self._off = np.asarray([self.offset[c] for c in clients], dtype=np.int64)
        return self._off

    def plan(self, clients: list[int], steps: list[int], trainer: str = "main"
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every batch of every client for one call of :meth:`train`, from one
        :func:`~fedmedbench.training.epoch_orders` call for all of them and
        array operations: ``(rows, valid, lens)`` with ``rows`` (S, k, W) the
        rows of :attr:`X` (0 where padding), ``valid`` (S, k, W) the real
        rows and ``lens`` (S, k) each batch's size (0 once a client's steps
        are done), S the most steps and W the largest batch. The rows and
        their order are those each client's
        :class:`~fedmedbench.training.BatchStream` gives step by step on the
        loop backend (a batch is a function of the client's seed and how
        many batches it drew before: :attr:`drawn` counts them per trainer).
        """
        k = len(clients)
        S = int(max(steps, default=0))
        st = np.asarray(steps, dtype=np.int64)
        cl = np.asarray(clients, dtype=np.int64)
        n = self._n[cl] if k else np.zeros(0, dtype=np.int64)
        bs = int(self.ctx.settings.batch_size)
        done = self.drawn.get(trainer)
        if done is None:
            done = self.drawn[trainer] = np.zeros(len(self._n), dtype=np.int64)
        t0 = done[cl]
        per_epoch = np.maximum(-(-n // bs), 1)
        # a client of 0 or 1 rows has one batch an epoch, always the same: no order to draw
        drawn = np.flatnonzero((n > 1) & (st > 0))
        e0 = t0 // per_epoch
        first = np.where((n > 1) & (st > 0), t0 - e0 * per_epoch, 0)  # batch within epoch e0
        m = ((t0 + st - 1) // per_epoch - e0 + 1)[drawn]  # epochs each drawn client reads
        sizes = np.minimum(n, 1)
        sizes[drawn] = m * n[drawn]
        start = np.cumsum(sizes) - sizes
        flat = np.zeros(int(sizes.sum()), dtype=np.int64)  # one-row clients: row 0
        if len(drawn):
            seg = np.repeat(drawn, m)  # one segment per (client, epoch), client-major
            seg_epoch = np.repeat(e0[drawn], m) + (np.arange(len(seg)) - np.repeat(
                np.cumsum(m) - m, m))
            orders = epoch_orders(self._seeds[cl[seg]], seg_epoch, n[seg])
            drawn_sizes = sizes[drawn]
            flat[np.repeat(start[drawn] - (np.cumsum(drawn_sizes) - drawn_sizes), drawn_sizes)
                 + np.arange(int(drawn_sizes.sum()))] = orders
        done[cl] = t0 + st
        t = np.arange(S)[:, None]
        e, q = np.divmod(first + t, per_epoch)  # (S, k): epoch and batch within it
        lens = np.where(t < st, np.minimum(np.maximum(n - q * bs, 0), bs), 0)  # (np.clip: slower)
        width = max(1, int(lens.max(initial=0)))
        r = np.arange(width)
        valid = r < lens[..., None]
        if flat.size:
            stride = np.zeros(k, dtype=np.int64)  # one order an epoch, drawn clients only
            stride[drawn] = n[drawn]
            pos = np.where(valid, (start + e * stride + q * bs)[..., None] + r, 0)
            rows = np.where(valid, flat[pos] + self._row0[cl][:, None], 0)
        else:
            rows = np.zeros(valid.shape, dtype=np.int64)
        return rows, valid, lens

    def _batches(self, rows: np.ndarray, valid: np.ndarray, lens: np.ndarray, *,
                 norm: bool = False) -> Any:
        """(X, y, mask) of each step of a :meth:`plan`, padded to the step's
        largest batch; ``norm``: with each step's (mask / d, −d), ``d`` a
        client's row count (at least 1), as
        :meth:`~fedmedbench.compiled.CompiledModel.loss_and_grads` takes them,
        computed for the round at once. Each step's tensors are views of the
        round's (``unbind``), sliced only when the step is narrower."""
        import torch

        R = torch.from_numpy(rows).to(self.device)
        V = torch.from_numpy(valid).to(self.device, torch.float32)
        widths = np.maximum(lens.max(axis=1, initial=0), 1).tolist() if len(lens) else []
        if not widths:
            return
        full = R.shape[2]
        Rs, Vs = R.unbind(0), V.unbind(0)
        if norm:
            d = V.sum(2).clamp(min=1.0)
            Ws, Ds = (V / d.unsqueeze(2)).unsqueeze(2).unbind(0), d.neg().unbind(0)
        for t, w in enumerate(widths):
            if w == full:
                r, m = Rs[t], Vs[t]
                n = (Ws[t], Ds[t]) if norm else None
            else:
                r, m = Rs[t][:, :w], Vs[t][:, :w]
                n = (Ws[t][..., :w], Ds[t]) if norm else None
            yield (*self._rows(r), m, n) if norm else (*self._rows(r), m)

    def _twin_step(self, P: list[torch.Tensor], X: torch.Tensor, Y: torch.Tensor,
                   M: torch.Tensor, extra_loss: ExtraLoss | None
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every client's gradient from one batched forward pass and ordinary
        autograd: client c's loss depends only on client c's parameters."""
        import torch
        from torch.func import vmap

        leaves = [p.detach().requires_grad_(True) for p in P]
        out = self.twin(leaves, X)  # type: ignore[misc]
        k, width = M.shape
        ce = torch.nn.functional.cross_entropy(out.reshape(k * width, -1), Y.reshape(-1),
                                               reduction="none").reshape(k, width)
        L = (ce * M).sum(1) / M.sum(1).clamp(min=1.0)
        total = L.sum()
        if extra_loss is not None:
            fm = self.fmodel
            total = total + vmap(lambda *ps: extra_loss(fm.flat(list(ps))))(*leaves).sum()
        return list(torch.autograd.grad(total, leaves)), L.detach()

    def _frozen(self, trainable: torch.Tensor | None) -> list[int]:
        """Indices of the parameter tensors ``trainable`` (a flat boolean mask,
        whole tensors only) freezes. In DP-SGD their per-example gradients
        still count in the clipping norm (a valid, slightly looser bound), as
        on the loop backend."""
        if trainable is None:
            return []
        fm = self.fmodel
        if trainable.numel() != fm.numel:
            raise ValueError(f"trainable mask has {trainable.numel()} values, the model has "
                             f"{fm.numel} parameters")
        out = []
        for j, (name, a, b, _) in enumerate(fm.spec):
            part = trainable[a:b]
            if bool(part.any()) and not bool(part.all()):
                raise ValueError(f"trainable masks whole parameter tensors: {name} is partly "
                                 f"frozen")
            if not bool(part.any()):
                out.append(j)
        return out

    def train(self, clients: list[int], params: torch.Tensor, steps: list[int], *,
              extra_loss: ExtraLoss | None, grad_offset: torch.Tensor | None,
              trainable: torch.Tensor | None = None, trainer: str = "main",
              delta: bool = False) -> tuple[torch.Tensor, np.ndarray]:
        """The clients' new rows (``delta``: minus ``params``) and losses."""
        if self.compiled is not None:
            return self._train_compiled(clients, params, steps, extra_loss=extra_loss,
                                        grad_offset=grad_offset, trainable=trainable,
                                        trainer=trainer, delta=delta)
        import torch
        from torch.func import grad, vmap

        k = len(clients)
        fm = self.fmodel
        dev = self.device
        P = [p.clone() for p in fm.split(params.detach().to(dev, torch.float32))]
        offset = fm.split(grad_offset.to(dev, torch.float32)) if grad_offset is not None \
            else None
        opt = functional_optimizer(self.ctx.settings)
        n_steps = torch.as_tensor(steps, device=dev)
        loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
        loss_cnt = torch.zeros(k, dtype=torch.float64, device=dev)
        ce = torch.nn.functional.cross_entropy

        def batch_loss(ps: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss = (ce(fm(ps, x), y, reduction="none") * m).sum() / m.sum().clamp(min=1.0)
            total = loss + extra_loss(fm.flat(ps)) if extra_loss is not None else loss
            return total, loss

        def example_loss(ps: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
            loss = ce(fm(ps, x.unsqueeze(0)), y.unsqueeze(0))
            return loss, loss

        step_grads = vmap(grad(batch_loss, has_aux=True))
        example_grads = vmap(vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0)))
        extra_grads = (vmap(grad(lambda ps: extra_loss(fm.flat(ps))))
                       if extra_loss is not None else None)
        # frozen parameter tensors (``trainable``) keep their values: no gradient, and put
        # back after each step (weight decay and momentum would move them otherwise)
        frozen = self._frozen(trainable)
        fixed = {j: P[j].clone() for j in frozen}
        # every step's batches drawn at once (a local-stage mechanism's sampler: step by step)
        batches = self._batches(*self.plan(clients, steps, trainer)) if self.vlocal is None \
            else None
        for s in range(int(max(steps, default=0))):
            active = [s < st for st in steps]
            X, Y, M = (next(batches) if batches is not None
                       else self._gather(clients, active, trainer))
            act = n_steps > s
            if self.twin is not None:
                G, L = self._twin_step(P, X, Y, M, extra_loss)
            elif self.vlocal is None:
                G, L = step_grads(P, X, Y, M)
            else:
                per, per_loss = example_grads(P, X, Y)
                flat = torch.cat([g.reshape(k, M.shape[1], -1) for g in per], dim=2)
                G = fm.split(self.vlocal.privatize(
                    flat, M, [c for c, a in zip(clients, active) if a], active))
                L = (per_loss * M).sum(1) / M.sum(1).clamp(min=1.0)
                if extra_grads is not None:  # data-independent: after privatisation
                    G = [g + e for g, e in zip(G, extra_grads(P))]
            if offset is not None:
                G = [g + o for g, o in zip(G, offset)]
            G = [g.detach() if j not in fixed else torch.zeros_like(g) for j, g in enumerate(G)]
            P = opt.step(P, G, act)
            for j in frozen:
                P[j] = fixed[j]
            seen = (M.sum(1) > 0) & act
            loss_sum += torch.where(seen, L.detach().double(), torch.zeros((), dtype=torch.float64,
                                                                           device=dev))
            loss_cnt += seen.double()
        W = fm.join(P)
        return self._finish(clients, W.sub_(params.to(W)) if delta else W, loss_sum, loss_cnt)

    def _train_compiled(self, clients: list[int], params: torch.Tensor, steps: list[int], *,
                        extra_loss: ExtraLoss | None, grad_offset: torch.Tensor | None,
                        trainable: torch.Tensor | None, trainer: str, delta: bool = False
                        ) -> tuple[torch.Tensor, np.ndarray]:
        """:meth:`train` on the compiled step (:class:`~fedmedbench.compiled.CompiledTrainer`:
        analytic gradients into preallocated buffers, the optimizer in place).
        SCAFFOLD's ``grad_offset`` and ``extra_loss``'s gradient (FedProx's
        proximal term: data-independent, so its gradient is computed apart,
        by ``torch.func``, and added to the batch gradient, as on the
        per-example path) enter through the trainer's gradient hook, which
        also zeroes the gradients of frozen tensors; those are put back
        after each step (weight decay and momentum would move them)."""
        import torch

        from fedmedbench.compiled import CompiledTrainer, inplace_optimizer

        fm, dev = self.fmodel, self.device
        rows, valid, lens = self.plan(clients, steps, trainer)
        frozen = self._frozen(trainable)
        start = fm.split(params.detach().to(dev, torch.float32))
        tr = CompiledTrainer(self.compiled, start, inplace_optimizer(self.ctx.settings))
        offset = fm.split(grad_offset.to(dev, torch.float32)) if grad_offset is not None \
            else None
        extra_grads = None
        if extra_loss is not None:
            from torch.func import grad, vmap

            extra_grads = vmap(grad(lambda ps: extra_loss(fm.flat(ps))))
        if offset is not None or extra_grads is not None or frozen:
            def hook(G: list[torch.Tensor]) -> None:
                if offset is not None:
                    torch._foreach_add_(G, offset)
                if extra_grads is not None:
                    torch._foreach_add_(G, [g.detach() for g in extra_grads(tr.P)])
                for j in frozen:
                    G[j].zero_()

            tr.grad_hook = hook
        fixed = [(tr.P[j], tr.P[j].clone()) for j in frozen]
        act_np: np.ndarray = np.less(np.arange(rows.shape[0])[:, None], np.asarray(steps))
        every = [bool(v) for v in np.atleast_1d(act_np.all(axis=1))]
        act = torch.from_numpy(act_np).to(dev)
        drops = self.compiled.dropouts
        if drops:  # each client's masks from its own stream: its seed, step and the layer
            from fedmedbench.context import stable_int
            from fedmedbench.training import splitmix64

            cl = np.asarray(clients, dtype=np.int64)
            seeds = splitmix64(self._seeds[cl], stable_int(f"dropout:{trainer}") % 2**62)
            first = self.drawn[trainer][cl] - np.asarray(steps, dtype=np.int64)
        losses = []
        for s, (X, Y, M, norm) in enumerate(self._batches(rows, valid, lens, norm=True)):
            if drops:
                self.compiled.draw(seeds, first + s)
            losses.append(tr.step(X, Y, M, None if every[s] else act[s], every[s], norm))
            for p, keep in fixed:
                p.copy_(keep)
        if drops:
            self.compiled.draw()
        seen = torch.from_numpy(lens > 0).to(dev)
        if losses:
            L = torch.stack(losses).double()
            loss_sum = torch.where(seen, L, torch.zeros((), dtype=L.dtype, device=dev)).sum(0)
        else:
            loss_sum = torch.zeros(len(clients), dtype=torch.float64, device=dev)
        return self._finish(clients, tr.flat(minus=start if delta else None), loss_sum,
                            seen.double().sum(0))

    def _finish(self, clients: list[int], W: torch.Tensor, loss_sum: torch.Tensor,
                loss_cnt: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(the new (k, D) rows on the CPU, each client's mean loss); raises
        :class:`~fedmedbench.errors.Diverged` on a non-finite one."""
        import torch

        from fedmedbench.errors import Diverged

        mean = torch.where(loss_cnt > 0, loss_sum / loss_cnt.clamp(min=1), torch.nan).cpu().numpy()
        bad = np.flatnonzero((loss_cnt.cpu().numpy() > 0) & ~np.isfinite(mean))
        if len(bad):
            raise Diverged(f"local training loss became {mean[bad[0]]} (client {clients[bad[0]]})")
        return W.cpu(), mean
