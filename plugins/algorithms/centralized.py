"""Centralized training on the pooled data of every site: the upper baseline
that federated learning tries to approach without moving patient records.

Runs on the pooled protocol: one "round" is as many steps on the pooled
training set as the clients of a federated round take together
(:func:`fedmedbench.protocols.pooled_steps`), so curves align with FL rounds
and the baseline is not given more work than FedAvg.
"""

from __future__ import annotations

from fedmedbench import Algorithm


class Centralized(Algorithm):
    """Pooled-data training (the upper baseline)."""

    name = "centralized"
    protocol = "pooled"
    vectorized = True

    def __init__(self) -> None:
        pass


COMPONENTS = (Centralized,)
