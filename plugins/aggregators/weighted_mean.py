"""Weighted mean of client updates (FedAvg's aggregation rule).

Weights are proportional to each client's number of training examples
(``by="examples"``, McMahan et al. 2017) or equal (``by="uniform"``). Linear,
so it also runs over secure aggregation and homomorphic encryption.
"""

from __future__ import annotations

import numpy as np

from harness import Aggregator, ClientUpdate

WEIGHTINGS = ("examples", "uniform")


class WeightedMean(Aggregator):
    """Weighted mean of updates (by examples or uniform)."""

    name = "weighted-mean"
    linear = True

    def __init__(self, *, by: str = "examples") -> None:
        if by not in WEIGHTINGS:
            raise ValueError(f"by={by!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.by = by

    def weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        if self.by == "uniform":
            raw = np.ones(len(updates))
        else:
            raw = np.array([u.num_examples for u in updates], dtype=float)
        return raw / raw.sum()


COMPONENTS = (WeightedMean,)
