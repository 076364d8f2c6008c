"""Centralized training on the pooled data of every site: the upper baseline
that federated learning tries to approach without moving patient records.

One "round" is as many steps on the pooled training set as all sites take
together in a FedAvg round (local_steps × sites), so curves align with FL rounds.
"""

from __future__ import annotations

from fedmedbench import Algorithm


class Centralized(Algorithm):
    """Pooled-data training (the upper baseline)."""

    name = "centralized"
    topology = "centralized"

    def __init__(self) -> None:
        pass


COMPONENTS = (Centralized,)
