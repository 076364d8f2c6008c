"""Models are a plugin family (``register_models``); this module builds them
and moves parameters between modules and flat vectors.

A dataset's :class:`~fedmedbench.Task` names a default model; a matrix may
choose another with its ``model`` axis. :func:`build_model` looks the name up
in the registry, so a third-party architecture registered through an entry
point is built exactly like the built-ins (``logistic``, ``mlp``, ``cnn``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from fedmedbench.registry import Registry


def model_spec(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"name": name, **kwargs}`` with list-valued parameters kept as lists."""
    return {"name": name, **dict(kwargs or {})}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *,
                registry: Registry | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``name`` with parameters ``kwargs``
    (from ``registry``, else the registry building the calling component, else
    the installed plugins)."""
    from fedmedbench.registry import current_registry

    reg = registry or current_registry()
    comp = reg.build("model", model_spec(name, kwargs), key="model")
    return comp.build(tuple(int(s) for s in input_shape), int(num_classes))  # type: ignore[attr-defined]


def get_flat_params(model: nn.Module, *, grad: bool = False) -> torch.Tensor:
    """The model's parameters as one flat vector: a detached copy, or with
    ``grad=True`` a differentiable view of the live parameters (for a loss
    term on the flat vector, FedProx's proximal term)."""
    import torch

    if grad:
        return torch.cat([p.reshape(-1) for p in model.parameters()])
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy ``flat`` into the model's parameters in place."""
    import torch

    off = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[off:off + n].view_as(p))
            off += n
    if off != flat.numel():
        raise ValueError(f"parameter vector has {flat.numel()} values, model has {off}")


def add_flat_grad(model: nn.Module, flat: torch.Tensor) -> None:
    """Add the flat vector ``flat`` to the parameters' ``.grad`` in place
    (SCAFFOLD's correction; parameters without a gradient are skipped)."""
    off = 0
    for p in model.parameters():
        k = p.numel()
        if p.grad is not None:
            p.grad.add_(flat[off:off + k].view_as(p))
        off += k


def get_flat_buffers(model: nn.Module) -> torch.Tensor:
    """The model's floating-point buffers (BatchNorm running mean and
    variance) as one float32 vector (a copy; empty without any)."""
    import torch

    bufs = [b.detach().reshape(-1).to(torch.float32) for _, b in model.named_buffers()
            if b.is_floating_point()]
    return torch.cat(bufs).clone() if bufs else torch.zeros(0)


def set_flat_buffers(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy ``flat`` (from :func:`get_flat_buffers`) into the model's buffers."""
    import torch

    off = 0
    with torch.no_grad():
        for _, b in model.named_buffers():
            if b.is_floating_point():
                n = b.numel()
                b.copy_(flat[off:off + n].view_as(b))
                off += n
    if off != flat.numel():
        raise ValueError(f"buffer vector has {flat.numel()} values, the module has {off}")
