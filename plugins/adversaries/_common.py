"""Helpers shared by the built-in adversaries (private to this family)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedmedbench import Updates

if TYPE_CHECKING:  # pragma: no cover
    import torch


def check_fraction(name: str, fraction: object) -> float:
    """Validate the share of malicious clients: a number in [0, 1)."""
    if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
            or not math.isfinite(fraction) or not 0 <= fraction < 1):
        raise ValueError(f"{name}: fraction = {fraction!r}; fraction (the share of malicious "
                         f"clients) must be a number in [0, 1)")
    return float(fraction)


def check_positive(name: str, param: str, value: object) -> float:
    """Validate a finite number > 0."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name}: {param} = {value!r}; {param} must be a finite number > 0")
    return float(value)


def with_delta(updates: Updates, delta: torch.Tensor) -> Updates:
    """A copy of ``updates`` carrying ``delta`` (metadata copied, not shared)."""
    import torch

    return updates.replace(delta=delta.to(torch.float32).reshape(updates.delta.shape)
                           .contiguous())
