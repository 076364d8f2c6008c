"""Which parameters personalized algorithms keep on the clients, derived from
the cell's parameter layout and its architecture's modules (shared by FedBN,
FedRep and FedPer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedmedbench import CellContext

if TYPE_CHECKING:
    from torch import nn


def norm_types() -> tuple[type[nn.Module], ...]:
    """The module types whose parameters are normalisation parameters (FedBN)."""
    from torch import nn

    return (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm_mask(ctx: CellContext) -> np.ndarray:
    """True on the parameters of every normalisation layer (BatchNorm,
    InstanceNorm, GroupNorm, LayerNorm) of the cell's architecture."""
    model = ctx.model()
    names = [f"{m_name}.{p_name}" if m_name else p_name
             for m_name, m in model.named_modules() if isinstance(m, norm_types())
             for p_name, _ in m.named_parameters(recurse=False)]
    return ctx.layout.select(names) if names else np.zeros(ctx.layout.numel, dtype=bool)


def layers_of(ctx: CellContext) -> list[str]:
    """The architecture's parameterised layers (module names), in the order
    their parameters appear in the flat vector."""
    out: list[str] = []
    for name in ctx.layout.names:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if module not in out:
            out.append(module)
    return out


def head_mask(ctx: CellContext, layers: int) -> np.ndarray:
    """True on the parameters of the last ``layers`` parameterised layers (the
    head); ``layers = 0`` is an empty head."""
    mods = layers_of(ctx)
    if layers > len(mods):
        raise ValueError(f"head_layers = {layers}, and the model has {len(mods)} "
                         f"parameterised layers ({', '.join(m or '(root)' for m in mods)})")
    head = set(mods[len(mods) - layers:]) if layers else set()
    mask = np.zeros(ctx.layout.numel, dtype=bool)
    for name, sl in ctx.layout.slices().items():
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if module in head:
            mask[sl] = True
    return mask
