"""A compiled training step for stacks of k client models (prototype, issue 22 item 1).

:mod:`fedmedbench.batched` evaluates a model's ``torch.fx`` graph node by node
on every step and leaves the backward pass to autograd, which hands back
fresh ``(k, *shape)`` gradients each step. Here the graph is read **once**
into a list of ops, each with its forward and its analytic backward written
against preallocated buffers, and the optimizers update preallocated
parameter and state buffers in place:

- :func:`compile_model` traces a module and returns a :class:`CompiledModel`,
  or ``(None, reason)`` naming the first layer it cannot compile;
- :meth:`CompiledModel.loss_and_grads` gives every client's masked mean
  cross-entropy (padding rows weigh 0; the loss is summed over clients, so
  each client's slice of the gradient is its own gradient) -- the quantity
  ``VectorBackend._twin_step`` differentiates with autograd;
- :class:`InPlaceSGD` and :class:`InPlaceAdam` are ``vectorized._SGD`` and
  ``vectorized._Adam``, operation for operation, on buffers updated in place;
- :class:`CompiledTrainer` holds the stacked parameters and runs one step.

Layers: ``Linear``; ``Conv2d`` (zero padding, one grouped convolution over
the k clients); ``ReLU``, ``Tanh``, ``Sigmoid``, ``GELU``, ``LeakyReLU``,
``Identity``, ``Dropout(p=0)``; ``MaxPool2d``, ``AvgPool2d``,
``AdaptiveAvgPool2d``; ``LayerNorm``, ``GroupNorm``; ``Flatten`` and
``flatten`` past the batch axis; residual adds of two tensors of one shape;
``Dropout`` that draws, each client's masks from its own counter-based
stream (:class:`_Dropout`, :meth:`CompiledModel.draw`). Anything else
(BatchNorm's running statistics, functional dropout, shared parameters,
other functions) makes :func:`compile_model` return ``None`` with the
reason, and the caller keeps the vmap path.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["CompiledModel", "compile_model", "InPlaceSGD", "InPlaceAdam", "inplace_optimizer",
           "CompiledTrainer", "traced_graph"]


class _Unsupported(Exception):
    """A node the compiler does not handle; ``str()`` is the reason."""


# --------------------------------------------------------------------------
# ops: forward and analytic backward on (k, B, ...) tensors
# --------------------------------------------------------------------------


class _TransposedViews:
    """``views(t, slot)`` is ``t.transpose(1, 2)``, the view kept in ``slot``
    while ``t`` is the same tensor (a parameter stack updated in place over a
    round, a buffer reused step after step): a dispatch saved each step."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, t: torch.Tensor, slot: str) -> torch.Tensor:
        last = self._last.get(slot)
        if last is not None and last[0] is t:
            return last[1]
        v = t.transpose(1, 2)
        self._last[slot] = (t, v)
        return v


class _Op:
    """One node of the compiled graph. ``ins``: input slots; ``params``:
    indices of its parameters in the model's parameter list (None when
    absent); buffers are cached per input shape."""

    ins: tuple[int, ...] = ()
    params: tuple[int | None, ...] = ()

    def __init__(self) -> None:
        self._bufs: dict[tuple, Any] = {}
        self.transposed = _TransposedViews()

    def buf(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(shape), like.dtype, like.device)
        b = self._bufs.get(key)
        if b is None:
            import torch

            b = self._bufs[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return b

    def forward(self, xs: list[torch.Tensor], P: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, g: torch.Tensor, xs: list[torch.Tensor], y: torch.Tensor,
                 P: list[torch.Tensor], GP: list[torch.Tensor], need: list[bool]
                 ) -> list[torch.Tensor | None]:
        """Gradients of the inputs (None where ``need`` is False); parameter
        gradients are written into ``GP``."""
        raise NotImplementedError

    def backward_sgd(self, g: torch.Tensor, xs: list[torch.Tensor], y: torch.Tensor,
                     P: list[torch.Tensor], GP: list[torch.Tensor], need: list[bool],
                     lr: float) -> list[torch.Tensor | None]:
        """:meth:`backward` followed by plain SGD on this op's parameters
        (``P[j] -= lr · GP[j]``), after the input gradients are computed from
        the parameters as they were. Ops may fuse the update (:class:`_Linear`)."""
        import torch

        out = self.backward(g, xs, y, P, GP, need)
        if not self.params:
            return out
        used = [j for j in self.params if j is not None]
        if used:
            torch._foreach_add_([P[j] for j in used], [GP[j] for j in used], alpha=-lr)
        return out


class _Linear(_Op):
    """``x W^T + b`` per client as one batched matrix product (the weight
    stored (k, out, in), :class:`CompiledTrainer`'s layout); the bias is
    added after the product (cheaper than ``baddbmm``'s broadcast copy)."""

    def __init__(self, w: int, b: int | None) -> None:
        super().__init__()
        self.w = w
        self.params = (w, b)

    def forward(self, xs, P):
        import torch

        x = xs[0]
        w, b = self.params
        W = P[w]
        k, fin, fout = x.shape[0], x.shape[-1], W.shape[1]
        flat = x.dim() == 3  # (k, B, in): no reshaping views (a dispatch each, every step)
        x3 = x if flat else x.reshape(k, -1, fin)
        out = self.buf("y", (k, x3.shape[1], fout), x)
        torch.bmm(x3, self.transposed(W, "w"), out=out)
        if b is not None:
            out.add_(P[b].unsqueeze(1))
        return out if flat else out.view(*x.shape[:-1], fout)

    def backward(self, g, xs, y, P, GP, need):
        import torch

        x = xs[0]
        w, b = self.params
        k, fin = x.shape[0], x.shape[-1]
        flat = x.dim() == 3
        g3 = g if g.dim() == 3 else g.reshape(k, -1, g.shape[-1])
        x3 = x if flat else x.reshape(k, -1, fin)
        torch.bmm(g3.transpose(1, 2), x3, out=GP[w])
        if b is not None:
            torch.sum(g3, dim=1, out=GP[b])
        if not need[0]:
            return [None]
        dx = self.buf("dx", (k, g3.shape[1], fin), g)
        torch.bmm(g3, P[w], out=dx)
        return [dx if flat else dx.view(x.shape)]

    def backward_sgd(self, g, xs, y, P, GP, need, lr):
        """The input gradient from the weights as they were, then the SGD
        step fused into one batched product, ``W += -lr · gᵀx``
        (``baddbmm_``): the weight gradient is never written out and read
        back (at 1,000 clients of 2-row batches 1.1 ms a step for the 64×64
        layer, against 2.0 ms for the product and the update apart, measured)."""
        import torch

        x = xs[0]
        w, b = self.params
        W = P[w]
        if not W.is_contiguous():  # a layout this op does not fuse
            return super().backward_sgd(g, xs, y, P, GP, need, lr)
        k, fin = x.shape[0], x.shape[-1]
        flat = x.dim() == 3
        g3 = g if g.dim() == 3 else g.reshape(k, -1, g.shape[-1])
        x3 = x if flat else x.reshape(k, -1, fin)
        dx = None
        if need[0]:
            dx = self.buf("dx", (k, g3.shape[1], fin), g)
            torch.bmm(g3, W, out=dx)
        W.baddbmm_(self.transposed(g3, "g"), x3, alpha=-lr)
        if b is not None:
            P[b].add_(g3.sum(1), alpha=-lr)
        return [None if dx is None else (dx if flat else dx.view(x.shape))]


class _Act(_Op):
    """Elementwise activations; backward from the output (ReLU, Tanh, Sigmoid)
    or the input (GELU, LeakyReLU) with ATen's own backward kernels."""

    def __init__(self, kind: str, *, approximate: str = "none", slope: float = 0.01) -> None:
        super().__init__()
        self.kind, self.approximate, self.slope = kind, approximate, slope

    def forward(self, xs, P):
        import torch

        x = xs[0]
        out = self.buf("y", x.shape, x)
        if self.kind == "relu":
            torch.clamp_min(x, 0, out=out)
        elif self.kind == "tanh":
            torch.tanh(x, out=out)
        elif self.kind == "sigmoid":
            torch.sigmoid(x, out=out)
        elif self.kind == "gelu":
            torch.ops.aten.gelu.out(x, approximate=self.approximate, out=out)
        elif self.kind == "leaky_relu":
            torch.ops.aten.leaky_relu.out(x, self.slope, out=out)
        return out

    def backward(self, g, xs, y, P, GP, need):
        import torch

        if not need[0]:
            return [None]
        a = torch.ops.aten
        dx = self.buf("dx", g.shape, g)
        if self.kind == "relu":
            a.threshold_backward.grad_input(g, y, 0, grad_input=dx)
        elif self.kind == "tanh":
            a.tanh_backward.grad_input(g, y, grad_input=dx)
        elif self.kind == "sigmoid":
            a.sigmoid_backward.grad_input(g, y, grad_input=dx)
        elif self.kind == "gelu":
            a.gelu_backward.grad_input(g, xs[0], approximate=self.approximate, grad_input=dx)
        elif self.kind == "leaky_relu":
            a.leaky_relu_backward.grad_input(g, xs[0], self.slope, False, grad_input=dx)
        return [dx]


class _Identity(_Op):
    def forward(self, xs, P):
        return xs[0]

    def backward(self, g, xs, y, P, GP, need):
        return [g if need[0] else None]


class _Dropout(_Op):
    """Inverted dropout (``nn.Dropout(p)`` in training mode), each client's
    masks from its own stream: for client c at the local step its backend
    counts ``t``, element ``i`` of its batch (row-major over its own rows, so
    padding never shifts a real row's draw) is kept when the top 53 bits of
    ``splitmix64(h, i)`` are at least ``p·2**53``, with ``h =
    splitmix64(splitmix64(seed_c, layer), t)``: a function of the client's
    seed, its step and the layer alone, whoever trains beside it. Kept
    values are scaled by ``1 / (1 - p)``. :meth:`CompiledModel.draw` sets
    the round's seeds and each step's counters; without them (the compile
    check) the op is the identity, as ``nn.Dropout`` in evaluation mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.layer = 0  #: its index among the model's dropout ops (compile_model)
        self.h: Any = None  #: (k,) uint64 stream keys of the current step, or None
        self._mask: Any = None

    def forward(self, xs, P):
        import math

        import numpy as np
        import torch

        from fedmedbench.training import splitmix64

        x = xs[0]
        if self.h is None:
            self._mask = None
            return x
        k = x.shape[0]
        n = x[0].numel() if k else 0
        u = splitmix64(np.asarray(self.h, dtype=np.uint64)[:, None],
                       np.arange(n, dtype=np.uint64)[None, :]) >> np.uint64(11)
        keep = u >= np.uint64(math.ceil(self.p * 2.0 ** 53))
        mask = self.buf("mask", tuple(x.shape), x)
        mask.copy_(torch.from_numpy(keep).view(x.shape))
        mask.mul_(1.0 / (1.0 - self.p))
        self._mask = mask
        return torch.mul(x, mask, out=self.buf("y", tuple(x.shape), x))

    def backward(self, g, xs, y, P, GP, need):
        if not need[0]:
            return [None]
        return [g if self._mask is None else g * self._mask]


class _Flatten(_Op):
    def __init__(self, start: int, end: int) -> None:
        super().__init__()
        self.start, self.end = start, end  # on the (k, B, ...) tensor

    def forward(self, xs, P):
        return xs[0].flatten(self.start, self.end)

    def backward(self, g, xs, y, P, GP, need):
        return [g.reshape(xs[0].shape) if need[0] else None]


class _Add(_Op):
    def forward(self, xs, P):
        import torch

        a, b = xs
        if a.shape != b.shape:
            raise _Unsupported(f"add of shapes {tuple(a.shape)} and {tuple(b.shape)}")
        return torch.add(a, b, out=self.buf("y", a.shape, a))

    def backward(self, g, xs, y, P, GP, need):
        return [g if n else None for n in need]


class _Pool(_Op):
    """2-d pooling of every client's examples at once on the (k·B, C, H, W) view."""

    def __init__(self, kind: str, **kw: Any) -> None:
        super().__init__()
        self.kind, self.kw = kind, kw

    def forward(self, xs, P):
        import torch

        a = torch.ops.aten
        x = xs[0]
        xv = x.reshape(-1, *x.shape[2:])
        kw = self.kw
        if self.kind == "max":
            out, idx = a.max_pool2d_with_indices(xv, kw["kernel"], kw["stride"], kw["padding"],
                                                 kw["dilation"], kw["ceil_mode"])
            self._idx = idx
        elif self.kind == "avg":
            out = a.avg_pool2d(xv, kw["kernel"], kw["stride"], kw["padding"], kw["ceil_mode"],
                               kw["count_include_pad"], kw["divisor_override"])
        else:
            out = a._adaptive_avg_pool2d(xv, kw["output_size"])
        return out.view(*x.shape[:2], *out.shape[1:])

    def backward(self, g, xs, y, P, GP, need):
        import torch

        if not need[0]:
            return [None]
        a = torch.ops.aten
        x = xs[0]
        xv = x.reshape(-1, *x.shape[2:])
        gv = g.reshape(-1, *g.shape[2:])
        kw = self.kw
        if self.kind == "max":
            dx = a.max_pool2d_with_indices_backward(gv, xv, kw["kernel"], kw["stride"],
                                                    kw["padding"], kw["dilation"],
                                                    kw["ceil_mode"], self._idx)
        elif self.kind == "avg":
            dx = a.avg_pool2d_backward(gv, xv, kw["kernel"], kw["stride"], kw["padding"],
                                       kw["ceil_mode"], kw["count_include_pad"],
                                       kw["divisor_override"])
        else:
            dx = a._adaptive_avg_pool2d_backward(gv, xv)
        return [dx.view(x.shape)]


class _Conv2d(_Op):
    """k clients' convolutions as one grouped convolution over (B, k·C, H, W)."""

    def __init__(self, w: int, b: int | None, stride: list[int], padding: list[int],
                 dilation: list[int], groups: int) -> None:
        super().__init__()
        self.params = (w, b)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, xs, P):
        import torch

        x = xs[0]
        w, b = self.params
        W = P[w]
        k, B, C = x.shape[:3]
        xt = self.buf("xt", (B, k * C, *x.shape[3:]), x)
        xt.view(B, k, C, *x.shape[3:]).copy_(x.transpose(0, 1))
        self._xt = xt
        out = torch.ops.aten.convolution(
            xt, W.reshape(-1, *W.shape[2:]), None if b is None else P[b].reshape(-1),
            self.stride, self.padding, self.dilation, False, [0, 0], k * self.groups)
        cout = W.shape[1]
        y = self.buf("y", (k, B, cout, *out.shape[2:]), x)
        y.copy_(out.view(B, k, cout, *out.shape[2:]).transpose(0, 1))
        return y

    def backward(self, g, xs, y, P, GP, need):
        import torch

        x = xs[0]
        w, b = self.params
        W = P[w]
        k, B, cout = g.shape[:3]
        gt = self.buf("gt", (B, k * cout, *g.shape[3:]), g)
        gt.view(B, k, cout, *g.shape[3:]).copy_(g.transpose(0, 1))
        dx, dw, db = torch.ops.aten.convolution_backward(
            gt, self._xt, W.reshape(-1, *W.shape[2:]), [k * cout] if b is not None else None,
            self.stride, self.padding, self.dilation, False, [0, 0], k * self.groups,
            [bool(need[0]), True, b is not None])
        GP[w].copy_(dw.view(W.shape))
        if b is not None:
            GP[b].copy_(db.view(k, cout))
        if not need[0]:
            return [None]
        out = self.buf("dx", x.shape, x)
        out.copy_(dx.view(B, k, *x.shape[2:]).transpose(0, 1))
        return [out]


class _GroupNorm(_Op):
    def __init__(self, groups: int, eps: float, w: int | None, b: int | None) -> None:
        super().__init__()
        self.groups, self.eps, self.params = groups, eps, (w, b)

    def _affine_view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(x.shape[0], 1, x.shape[2], *([1] * (x.dim() - 3)))

    def forward(self, xs, P):
        import torch

        x = xs[0]
        k, B, C = x.shape[:3]
        hw = x[0, 0, 0].numel()
        xh, mean, rstd = torch.ops.aten.native_group_norm(x.reshape(k * B, C, -1), None, None,
                                                          k * B, C, hw, self.groups, self.eps)
        self._xhat, self._mean, self._rstd = xh.view(x.shape), mean, rstd
        w, b = self.params
        if w is None:
            return self._xhat
        out = self.buf("y", x.shape, x)
        torch.mul(self._xhat, self._affine_view(P[w], x), out=out)
        if b is not None:
            out.add_(self._affine_view(P[b], x))
        return out

    def backward(self, g, xs, y, P, GP, need):
        import torch

        x = xs[0]
        k, B, C = x.shape[:3]
        w, b = self.params
        red = [1, *range(3, x.dim())]
        if w is not None:
            torch.sum(g * self._xhat, dim=red, out=GP[w])
            if b is not None:
                torch.sum(g, dim=red, out=GP[b])
            g = g * self._affine_view(P[w], x)
        if not need[0]:
            return [None]
        hw = x[0, 0, 0].numel()
        dx = torch.ops.aten.native_group_norm_backward(
            g.reshape(k * B, C, -1), x.reshape(k * B, C, -1), self._mean, self._rstd, None,
            k * B, C, hw, self.groups, [True, False, False])[0]
        return [dx.view(x.shape)]


class _LayerNorm(_Op):
    def __init__(self, shape: list[int], eps: float, w: int | None, b: int | None) -> None:
        super().__init__()
        self.shape, self.eps, self.params = shape, eps, (w, b)

    def _affine_view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(x.shape[0], *([1] * (x.dim() - 1 - len(self.shape))), *self.shape)

    def forward(self, xs, P):
        import torch

        x = xs[0]
        xh, mean, rstd = torch.ops.aten.native_layer_norm(x, self.shape, None, None, self.eps)
        self._xhat, self._mean, self._rstd = xh, mean, rstd
        w, b = self.params
        if w is None:
            return xh
        out = self.buf("y", x.shape, x)
        torch.mul(xh, self._affine_view(P[w], x), out=out)
        if b is not None:
            out.add_(self._affine_view(P[b], x))
        return out

    def backward(self, g, xs, y, P, GP, need):
        import torch

        x = xs[0]
        w, b = self.params
        red = list(range(1, x.dim() - len(self.shape)))
        if w is not None:
            torch.sum(g * self._xhat, dim=red, out=GP[w])
            if b is not None:
                torch.sum(g, dim=red, out=GP[b])
            g = g * self._affine_view(P[w], x)
        if not need[0]:
            return [None]
        dx = torch.ops.aten.native_layer_norm_backward(
            g, x, self.shape, self._mean, self._rstd, None, None, [True, False, False])[0]
        return [dx]


# --------------------------------------------------------------------------
# the compiled model
# --------------------------------------------------------------------------


class CompiledModel:
    """A traced module as a list of ops with analytic backward passes.

    ``names``/``shapes``: the module's parameters in ``named_parameters()``
    order (the order of ``FunctionalModel.split``); stacked parameters are
    ``[(k, *shape), ...]`` in that order.
    """

    def __init__(self, ops: list[tuple[_Op, int]], n_slots: int, out_slot: int,
                 names: list[str], shapes: list[tuple[int, ...]]) -> None:
        self.ops = ops  # (op, output slot), in execution order
        self.n_slots, self.out_slot = n_slots, out_slot
        self.names, self.shapes = names, shapes
        need = [False] * n_slots  # which slots depend on a parameter
        for op, out in ops:
            need[out] = any(p is not None for p in op.params) or any(need[i] for i in op.ins)
        #: the backward pass's order: (op, output slot, input slots, which inputs need a gradient)
        self._back = [(op, out, op.ins, [need[i] for i in op.ins]) for op, out in reversed(ops)]
        self._transposed = _TransposedViews()
        self._consumers = [0] * n_slots
        for op, _ in ops:
            for i in op.ins:
                self._consumers[i] += 1
        owners = [j for op, _ in self.ops for j in op.params if j is not None]
        #: every parameter belongs to one op: SGD may be fused into the backward pass
        self.fusable = len(owners) == len(set(owners))
        self._loss_bufs: dict[tuple, Any] = {}
        self._grads: dict[tuple, list[torch.Tensor]] = {}
        self._grads_of: Any = None
        self._grads_last: list[torch.Tensor] = []
        #: the dropout ops that draw, in graph order (:meth:`draw` keys their masks)
        self.dropouts = [op for op, _ in ops if isinstance(op, _Dropout)]
        for j, op in enumerate(self.dropouts):
            op.layer = j
        self._drop_seeds: Any = None

    def draw(self, seeds: Any = None, counters: Any = None) -> None:
        """Key the dropout masks of the next steps: ``seeds`` (k,) each
        client's dropout seed, ``counters`` (k,) its step count (call again
        each step); ``draw()`` turns dropout off (the identity)."""
        import numpy as np

        from fedmedbench.training import splitmix64

        for op in self.dropouts:
            if seeds is None:
                op.h = None
                continue
            base = splitmix64(np.asarray(seeds, dtype=np.uint64), op.layer)
            op.h = splitmix64(base, np.asarray(counters, dtype=np.uint64))

    def forward(self, P: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Logits (k, B, C) and every slot's value (for the backward pass).
        The returned tensors are buffers reused by the next call."""
        vals: list[Any] = [None] * self.n_slots
        vals[0] = x
        for op, out in self.ops:
            vals[out] = op.forward([vals[i] for i in op.ins], P)
        return vals[self.out_slot], vals

    def grad_buffers(self, P: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preallocated parameter gradients (zeros for parameters no op uses)."""
        import torch

        if P is self._grads_of:  # the trainer's own list, step after step
            return self._grads_last
        key = tuple((tuple(p.shape), p.stride(), p.dtype, str(p.device)) for p in P)
        if key not in self._grads:
            self._grads[key] = [torch.zeros_like(p) for p in P]
        self._grads_of, self._grads_last = P, self._grads[key]  # holds P: its id stays its own
        return self._grads_last

    def loss_and_grads(self, P: list[torch.Tensor], X: torch.Tensor, Y: torch.Tensor,
                       M: torch.Tensor, *, sgd_lr: float | None = None,
                       norm: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every client's masked mean cross-entropy ``L`` (k,) and the gradient
        of ``L.sum()`` with respect to the stacked parameters ``P``: what
        ``VectorBackend._twin_step`` computes with autograd. ``X`` (k, B, ...),
        ``Y`` (k, B) int64, ``M`` (k, B) float row weights (0 for padding).
        The gradients are buffers that the next call overwrites.

        ``sgd_lr``: also take a plain SGD step (every row, no momentum or
        weight decay), each op updating its parameters right after its
        backward pass (:meth:`_Op.backward_sgd`); only for a model whose
        parameters each belong to one op (:attr:`fusable`). The returned
        gradients are then not all written.

        ``norm``: ``(M / d, -d)`` shaped (k, 1, B) and (k,), with ``d`` each
        client's row count ``M.sum(1).clamp(min=1)``, when the caller has
        them (:meth:`~fedmedbench.vectorized.VectorBackend.plan` gives a
        round's at once): the same values this computes otherwise."""
        import torch

        z, vals = self.forward(P, X)
        k, width, C = z.shape
        key = (k, width, C, z.dtype, z.device)
        bufs = self._loss_bufs.get(key)
        if bufs is None:
            # logits class-major, (k, C, B): log-softmax over a middle axis of length C
            # is ~10x faster than over a last axis of 10 classes
            dev = z.device
            rows = torch.arange(k, device=dev).repeat_interleave(width) * (C * width) \
                + torch.arange(width, device=dev).repeat(k)
            zt, logp, dz = (torch.empty(k, C, width, dtype=z.dtype, device=dev)
                            for _ in range(3))
            # the flat and transposed views made once: a dispatch each, every step otherwise
            bufs = self._loss_bufs[key] = (
                zt, logp, logp.view(-1), dz, dz.view(-1), dz.transpose(1, 2), rows,
                torch.full((k * width,), -1.0, dtype=z.dtype, device=dev))
        zt, logp, logp_flat, dz, dz_flat, dz_t, rows, minus = bufs
        if norm is None:
            d = M.sum(1).clamp(min=1.0)
            norm = (M / d.unsqueeze(1)).unsqueeze(1), d.neg()
        weight, neg_d = norm
        zt.copy_(self._transposed(z, "logits"))  # the last op's buffer, step after step
        torch._log_softmax(zt, 1, False, out=logp)  # aten's out= op, without torch.ops' frame
        pick = torch.add(rows, Y.reshape(-1), alpha=width)  # rows + y·B, one op
        # L = Σ(−log p·M)/d, written Σ(log p·M)/(−d): the same floats (negation is exact)
        L = logp_flat.index_select(0, pick).view(k, width).mul_(M).sum(1).div_(neg_d)
        # d(Σ_c L_c)/dz = M / d · (softmax(z) − onehot(y))
        torch.exp(logp, out=dz)
        dz_flat.index_add_(0, pick, minus)
        dz.mul_(weight)
        GP = self.grad_buffers(P)
        grads: list[Any] = [None] * self.n_slots
        grads[self.out_slot] = dz_t  # (k, B, C), strided
        for op, out, ins, need in self._back:
            g = grads[out]
            if g is None:
                continue
            xs = [vals[i] for i in ins]
            back = (op.backward(g, xs, vals[out], P, GP, need) if sgd_lr is None
                    else op.backward_sgd(g, xs, vals[out], P, GP, need, sgd_lr))
            for i, gi in zip(ins, back):
                if gi is None:
                    continue
                grads[i] = gi if grads[i] is None else grads[i] + gi
        return L, GP


# --------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------

_ACTS = {"ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "GELU": "gelu",
         "LeakyReLU": "leaky_relu"}


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _shifted(d: int) -> int:
    return d + 1 if d >= 0 else d


def _module_op(sub: Any, target: str, index: dict[str, int]) -> _Op:
    from torch import nn

    kind = type(sub).__name__
    label = f"{kind} (layer '{target}')"

    def param(name: str) -> int | None:
        p = getattr(sub, name, None)
        if p is None:
            return None
        q = f"{target}.{name}"
        if q not in index:
            raise _Unsupported(f"{label}: parameter {name} is not a trainable parameter")
        return index[q]

    def weight(name: str) -> int:
        i = param(name)
        if i is None:
            raise _Unsupported(f"{label}: no {name}")
        return i

    if type(sub) is nn.Linear:
        return _Linear(weight("weight"), param("bias"))
    if type(sub) is nn.Conv2d:
        if sub.padding_mode != "zeros" or isinstance(sub.padding, str):
            raise _Unsupported(f"{label} with padding {sub.padding!r}, mode {sub.padding_mode}")
        return _Conv2d(weight("weight"), param("bias"), _pair(sub.stride), _pair(sub.padding),
                       _pair(sub.dilation), int(sub.groups))
    if type(sub) in (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU):
        # an ``inplace`` flag changes nothing here: every output has its own buffer
        return _Act(_ACTS[kind], approximate=getattr(sub, "approximate", "none"),
                    slope=float(getattr(sub, "negative_slope", 0.01)))
    if type(sub) is nn.Identity or (type(sub) is nn.Dropout and sub.p == 0):
        return _Identity()
    if type(sub) is nn.Dropout and 0 < sub.p < 1:
        return _Dropout(float(sub.p))
    if type(sub) is nn.Flatten:
        if sub.start_dim == 0:
            raise _Unsupported(f"{label} over the batch axis")
        return _Flatten(_shifted(sub.start_dim), _shifted(sub.end_dim))
    if type(sub) is nn.MaxPool2d:
        if sub.return_indices:
            raise _Unsupported(f"{label} returning indices")
        return _Pool("max", kernel=_pair(sub.kernel_size),
                     stride=_pair(sub.stride if sub.stride is not None else sub.kernel_size),
                     padding=_pair(sub.padding), dilation=_pair(sub.dilation),
                     ceil_mode=bool(sub.ceil_mode))
    if type(sub) is nn.AvgPool2d:
        return _Pool("avg", kernel=_pair(sub.kernel_size),
                     stride=_pair(sub.stride if sub.stride is not None else sub.kernel_size),
                     padding=_pair(sub.padding), ceil_mode=bool(sub.ceil_mode),
                     count_include_pad=bool(sub.count_include_pad),
                     divisor_override=sub.divisor_override)
    if type(sub) is nn.AdaptiveAvgPool2d:
        size = sub.output_size
        if size is None or (not isinstance(size, int) and None in tuple(size)):
            raise _Unsupported(f"{label} with output size {size!r}")
        return _Pool("adaptive", output_size=_pair(size))
    if type(sub) is nn.GroupNorm:
        w, b = (param("weight"), param("bias")) if sub.affine else (None, None)
        return _GroupNorm(int(sub.num_groups), float(sub.eps), w, b)
    if type(sub) is nn.LayerNorm:
        w = param("weight") if sub.elementwise_affine else None
        b = param("bias") if sub.elementwise_affine else None
        return _LayerNorm([int(s) for s in sub.normalized_shape], float(sub.eps), w, b)
    if kind == "Dropout":
        raise _Unsupported(f"{label} with p={sub.p}")
    raise _Unsupported(label)


def _function_op(node: Any) -> tuple[_Op, list[Any]]:
    """A call_function / call_method node: (op, tensor arguments)."""
    import torch
    from torch.nn import functional as F

    t, args, kw = node.target, list(node.args), dict(node.kwargs)
    name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
    label = f"{'method' if node.op == 'call_method' else 'function'} {name} (node '{node.name}')"
    is_node = [hasattr(a, "op") for a in args]
    if node.op == "call_method" and t == "flatten" or t is torch.flatten:
        start = kw.get("start_dim", args[1] if len(args) > 1 else 0)
        end = kw.get("end_dim", args[2] if len(args) > 2 else -1)
        if start == 0:
            raise _Unsupported(f"{label} over the batch axis")
        return _Flatten(_shifted(start), _shifted(end)), args[:1]
    acts: dict[Any, str] = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh",
                            F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}
    if node.op == "call_method" and t in ("relu", "tanh", "sigmoid") and len(args) == 1:
        return _Act(t), args
    if node.op == "call_function" and t in acts and len(args) == 1 and not kw.get("inplace"):
        return _Act(acts[t]), args
    if node.op == "call_function" and t is F.gelu and len(args) == 1:
        return _Act("gelu", approximate=kw.get("approximate", "none")), args
    if t in (operator.add, torch.add) and len(args) == 2 and all(is_node) and not kw:
        return _Add(), args
    raise _Unsupported(label)


def drawing_dropout(module: torch.nn.Module) -> str:
    """The module's first dropout that draws, named as records name it
    (``""`` where none draws): the compiled step draws its masks, the
    vectorized backend's other paths cannot."""
    from torch import nn

    for name, m in module.named_modules():
        if type(m) is nn.Dropout and m.p > 0:
            return f"Dropout (layer '{name}') with p={float(m.p):g}"
    return ""


#: why a model with such a dropout leaves a vectorized path (after ``drawing_dropout``)
DRAWS_ON_COMPILED_ONLY = "draws masks, which the vectorized backend does on its compiled step only"


_GRAPHS: dict[Any, Any] = {}
_GRAPHS_MAX = 64


def _structure(module: torch.nn.Module) -> Any:
    """A hashable description of everything a module's trace can depend on:
    each submodule's class, its plain attributes (sizes, flags, strides) and
    its parameters' and buffers' names and shapes; ``None`` when a module
    holds anything else (a hook, a tensor attribute, an object), which makes
    its trace uncacheable."""
    plain = (int, float, str, bool, type(None))
    out = []
    for name, m in module.named_modules():
        attrs: list[tuple[str, Any]] = []
        for key, v in vars(m).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(v, plain):
                attrs.append((key, v))
            elif isinstance(v, (tuple, list)) and all(isinstance(x, plain) for x in v):
                attrs.append((key, tuple(v)))
            elif isinstance(v, (dict, set)) and not v:
                continue  # empty hook tables and the like
            else:
                return None
        params = tuple((n, tuple(p.shape), p.dtype, bool(p.requires_grad))
                       for n, p in m._parameters.items() if p is not None)
        bufs = tuple((n, tuple(b.shape)) for n, b in m._buffers.items() if b is not None)
        out.append((name, type(m), tuple(attrs), params, bufs))
    return tuple(out)


def traced_graph(module: torch.nn.Module) -> Any:
    """The module's ``torch.fx`` graph (``Tracer().trace``), traced once per
    architecture in a process: modules of one class with the same plain
    attributes and parameter shapes (a cell's fresh instances of its model,
    the next cell's) share it. The graph names submodules and parameters by
    their qualified names, so it serves every such instance; a module with
    hooks or non-plain attributes is traced every time."""
    import torch.fx

    key = _structure(module)
    if key is not None:
        try:
            hit = _GRAPHS.get(key)
        except TypeError:  # an unhashable attribute value
            key, hit = None, None
        if hit is not None:
            return hit
    graph = torch.fx.Tracer().trace(module)
    if key is not None:
        if len(_GRAPHS) >= _GRAPHS_MAX:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[key] = graph
    return graph


def compile_model(module: torch.nn.Module, example: torch.Tensor | None = None
                  ) -> tuple[CompiledModel | None, str | None]:
    """``(CompiledModel, None)`` for ``module``, or ``(None, reason)`` naming
    the layer that cannot be compiled. With ``example`` (one client's batch
    of inputs) the compiled forward pass is checked against the module."""
    import torch

    for name, m in module.named_modules():
        if len(list(m.buffers(recurse=False))):
            return None, (f"{type(m).__name__} (layer '{name}') keeps buffers (running "
                          f"statistics) that training updates in place")
    try:
        graph = traced_graph(module)
    except Exception as exc:  # data-dependent control flow and the like
        return None, f"the model cannot be traced by torch.fx ({type(exc).__name__}: {exc})"
    names = [n for n, _ in module.named_parameters()]
    shapes = [tuple(p.shape) for _, p in module.named_parameters()]
    index = {n: i for i, n in enumerate(names)}
    slots: dict[str, int] = {}
    ops: list[tuple[_Op, int]] = []
    used: set[int] = set()
    out_slot = None
    try:
        for node in graph.nodes:
            if node.op == "placeholder":
                if slots:
                    raise _Unsupported(f"a second input '{node.name}'")
                slots[node.name] = 0
                continue
            if node.op == "output":
                res = node.args[0]
                if not hasattr(res, "name") or res.name not in slots:
                    raise _Unsupported("an output that is not one tensor")
                out_slot = slots[res.name]
                continue
            if node.op == "call_module":
                sub = module.get_submodule(str(node.target))
                op = _module_op(sub, str(node.target), index)
                args = list(node.args)
                if len(args) != 1 or node.kwargs:
                    raise _Unsupported(f"{type(sub).__name__} (layer '{node.target}') called "
                                       f"with {len(args)} arguments")
            elif node.op in ("call_function", "call_method"):
                op, args = _function_op(node)
            else:
                raise _Unsupported(f"{node.op} '{node.target}' (parameters must belong to "
                                   f"their layers)")
            missing = [a for a in args if not hasattr(a, "name") or a.name not in slots]
            if missing:
                raise _Unsupported(f"node '{node.name}' takes a non-tensor argument")
            for p in op.params:
                if p is None:
                    continue
                if p in used:
                    raise _Unsupported(f"parameter {names[p]} is shared by two layers")
                used.add(p)
            op.ins = tuple(slots[a.name] for a in args)
            slots[node.name] = len(slots)
            ops.append((op, slots[node.name]))
    except _Unsupported as exc:
        return None, str(exc)
    if out_slot is None:
        return None, "the graph has no output"
    model = CompiledModel(ops, len(slots), out_slot, names, shapes)
    if example is not None:
        k = 2
        P = [p.detach().unsqueeze(0).expand(k, *p.shape).clone() for p in module.parameters()]
        was = module.training
        try:
            with torch.no_grad():
                got, _ = model.forward(P, example.unsqueeze(0).expand(k, *example.shape)
                                       .contiguous())
                if model.dropouts:  # the compiled dropout undrawn is evaluation mode's
                    module.eval()
                want = module(example)
        except _Unsupported as exc:
            return None, str(exc)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            return None, f"the compiled forward pass failed ({type(exc).__name__}: {exc})"
        finally:
            module.train(was)
        if got.dim() != 3 or tuple(got.shape) != (k, *want.shape):
            return None, f"the model's output has shape {tuple(want.shape)}, not (batch, classes)"
        if not torch.allclose(got[0], want, atol=1e-5, rtol=1e-4):
            return None, "the compiled forward pass does not reproduce the module's output"
    return model, None


# --------------------------------------------------------------------------
# optimizers in place: vectorized._SGD / _Adam, operation for operation
# --------------------------------------------------------------------------


class InPlaceSGD:
    """``vectorized._SGD`` (``torch.optim.SGD`` without dampening or Nesterov)
    updating the stacked parameters and momentum buffers in place."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.buf: list[torch.Tensor] | None = None
        self._started = False
        self._tmp: list[torch.Tensor] | None = None

    def step(self, P: list[torch.Tensor], G: list[torch.Tensor], active: torch.Tensor,
             every: bool | None = None) -> None:
        """One step of the rows ``active`` marks; ``every``: whether that is all
        of them, when the caller knows (saves a device-to-host read)."""
        import torch

        if every is None:
            every = bool(active.all())
        if self.momentum == 0 and self.wd == 0 and every:
            torch._foreach_add_(P, G, alpha=-self.lr)
            return
        if self.momentum != 0 and self.buf is None:
            self.buf = [torch.empty_like(w) for w in P]
        if self.wd != 0 and self._tmp is None:
            self._tmp = [torch.empty_like(w) for w in P]
        for j, (w, g) in enumerate(zip(P, G)):
            act = active.view(-1, *([1] * (w.dim() - 1)))
            if self.wd != 0:
                assert self._tmp is not None
                g = torch.add(g, w, alpha=self.wd, out=self._tmp[j])
            if self.momentum != 0:
                assert self.buf is not None
                b = self.buf[j]
                if not self._started:  # the first step: buf = g for every row
                    b.copy_(g)
                    g = b
                elif every:
                    g = b.mul_(self.momentum).add_(g)
                else:
                    new = b.mul(self.momentum).add(g)
                    b.copy_(torch.where(act, new, b))
                    g = new
            if every:
                w.add_(g, alpha=-self.lr)
            else:
                w.copy_(torch.where(act, w.add(g, alpha=-self.lr), w))
        self._started = True


class InPlaceAdam:
    """``vectorized._Adam`` (``torch.optim.Adam`` without AMSGrad) updating the
    stacked parameters and moment buffers in place; one step count for all
    rows, as the clients run in lockstep."""

    def __init__(self, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, betas[0], betas[1], eps
        self.m: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.t = 0
        self._tmp: list[torch.Tensor] | None = None
        self._den: list[torch.Tensor] | None = None

    def step(self, P: list[torch.Tensor], G: list[torch.Tensor], active: torch.Tensor,
             every: bool | None = None) -> None:
        import torch

        if self.m is None:
            self.m = [torch.zeros_like(w) for w in P]
            self.v = [torch.zeros_like(w) for w in P]
            self._tmp = [torch.empty_like(w) for w in P]
            self._den = [torch.empty_like(w) for w in P]
        assert self.v is not None and self._tmp is not None and self._den is not None
        self.t += 1
        bc1 = 1 - self.b1 ** self.t
        bc2 = 1 - self.b2 ** self.t
        if every is None:
            every = bool(active.all())
        for j, (w, g) in enumerate(zip(P, G)):
            if self.wd != 0:
                g = torch.add(g, w, alpha=self.wd, out=self._tmp[j])
            m, v = self.m[j], self.v[j]
            if every:
                m.lerp_(g, 1 - self.b1)
                v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
                den = torch.sqrt(v, out=self._den[j]).div_(bc2 ** 0.5).add_(self.eps)
                w.addcdiv_(m, den, value=-(self.lr / bc1))
                continue
            act = active.view(-1, *([1] * (w.dim() - 1)))
            m_new = m.lerp(g, 1 - self.b1)
            v_new = v.mul(self.b2).addcmul(g, g, value=1 - self.b2)
            den = (v_new.sqrt() / bc2 ** 0.5).add(self.eps)
            w.copy_(torch.where(act, w.addcdiv(m_new, den, value=-(self.lr / bc1)), w))
            m.copy_(torch.where(act, m_new, m))
            v.copy_(torch.where(act, v_new, v))


def inplace_optimizer(settings: Any) -> InPlaceSGD | InPlaceAdam:
    """The in-place twin of ``vectorized.functional_optimizer(settings)``."""
    if settings.optimizer == "sgd":
        return InPlaceSGD(float(settings.lr), float(settings.momentum),
                          float(settings.weight_decay))
    if settings.optimizer == "adam":
        return InPlaceAdam(float(settings.lr), float(settings.weight_decay))
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; use 'sgd' or 'adam'")


# --------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------


class CompiledTrainer:
    """k clients' models trained together: ``P`` (stacked parameters, owned
    and updated in place), the compiled model and an in-place optimizer.

    ``step(X, Y, M, active)`` runs one local step of every client (inactive
    rows keep their parameters and optimizer state) and returns the clients'
    losses. ``grad_hook(G)``, when given, may change the gradient buffers
    in place before the update (a SCAFFOLD offset, frozen tensors).
    """

    def __init__(self, model: CompiledModel, params: list[torch.Tensor],
                 optimizer: InPlaceSGD | InPlaceAdam,
                 grad_hook: Callable[[list[torch.Tensor]], None] | None = None) -> None:
        import torch

        self.model = model
        # each parameter one contiguous (k, *shape) tensor, linear weights as (k, out, in):
        # measured against (k, in, out) storage and against views into one (k, D) buffer
        # (batched products over a strided batch copy their operand), it is the fastest
        # layout for the three products of a linear layer at every k and batch width tried
        self.P = [p.detach().clone(memory_format=torch.contiguous_format) for p in params]
        self.opt = optimizer
        self.grad_hook = grad_hook
        #: plain SGD with every row active runs fused into the backward pass
        #: (:meth:`CompiledModel.loss_and_grads`'s ``sgd_lr``); False: gradient, then step
        self.fuse = True
        self._all: torch.Tensor | None = None

    def step(self, X: torch.Tensor, Y: torch.Tensor, M: torch.Tensor,
             active: torch.Tensor | None = None, every: bool | None = None,
             norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One step; ``active`` None: every row (``every``: whether ``active``
        marks every row, when the caller knows); ``norm``: as for
        :meth:`CompiledModel.loss_and_grads`."""
        import torch

        if active is None:
            if self._all is None or self._all.shape[0] != X.shape[0]:
                self._all = torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
            active, every = self._all, True
        opt = self.opt
        if (every and self.fuse and self.grad_hook is None and isinstance(opt, InPlaceSGD)
                and opt.momentum == 0 and opt.wd == 0 and self.model.fusable):
            return self.model.loss_and_grads(self.P, X, Y, M, sgd_lr=opt.lr, norm=norm)[0]
        L, G = self.model.loss_and_grads(self.P, X, Y, M, norm=norm)
        if self.grad_hook is not None:
            self.grad_hook(G)
        opt.step(self.P, G, active, every)
        return L

    def flat(self, minus: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The parameters as (k, D) rows (``FunctionalModel.join``); with
        ``minus`` (tensors shaped like the parameter stacks, broadcast),
        the parameters minus those, in the same pass."""
        import torch

        k = self.P[0].shape[0] if self.P else 0
        sizes = [p[0].numel() for p in self.P]
        out = torch.empty(k, sum(sizes), dtype=self.P[0].dtype if self.P else torch.float32,
                          device=self.P[0].device if self.P else None)
        a = 0
        for j, (p, n) in enumerate(zip(self.P, sizes)):  # one block copy each (no cat)
            if minus is None:
                out[:, a:a + n].view(p.shape).copy_(p)
            else:
                torch.sub(p, minus[j], out=out[:, a:a + n].view(p.shape))
            a += n
        return out
