"""Local-only training: every site trains alone on its own data, the lower
baseline that federated learning should beat.

Per-site utility is each site's own model on its own test split; the global
figure is the mean, over sites, of each site's model on the pooled test set
(how well a single hospital's model serves everyone).
"""

from __future__ import annotations

from fedmedbench import Algorithm


class Local(Algorithm):
    """Each site alone (the lower baseline)."""

    name = "local"
    protocol = "isolated"
    vectorized = True

    def __init__(self) -> None:
        pass


COMPONENTS = (Local,)
