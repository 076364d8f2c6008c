"""Label-flipping data poisoning: malicious clients train on flipped labels.

Every training label of a malicious client becomes ``num_classes - 1 - y``
once, before training (the label-flipping attack of Fang, Cao, Jia, Gong,
"Local Model Poisoning Attacks to Byzantine-Robust Federated Learning",
USENIX Security 2020, which maps label ``l`` to ``L - l - 1``; Tolpegin,
Truex, Gursoy, Liu, "Data Poisoning Attacks Against Federated Learning
Systems", ESORICS 2020, study flipping in federated learning). Features,
test data and the updates themselves are untouched: the client then trains
and sends honestly on its poisoned data. For binary tasks this swaps the two
classes.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from fedmedbench import Adversary, Range, Split
from fedmedbench.plugins.adversaries._common import check_fraction


class LabelFlip(Adversary):
    """Malicious clients flip their training labels once: ``y -> num_classes - 1 - y``.

    Parameters
    ----------
    fraction : float, default 0.2
        Share of clients that are malicious, in [0, 1); the engine makes
        ``round(fraction * n_clients)`` of them malicious, chosen with the
        cell seed.
    """

    name = "label-flip"

    def __init__(self, *, fraction: Annotated[float, Range(ge=0, lt=1)] = 0.2) -> None:
        super().__init__(fraction=check_fraction(self.name, fraction))

    def corrupt_data(self, split: Split, *, num_classes: int, rng: np.random.Generator) -> Split:
        if num_classes < 2:
            raise ValueError(f"label-flip needs at least 2 classes; the task has {num_classes}")
        y = np.asarray(split.y)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"label-flip: labels span [{y.min()}, {y.max()}], outside "
                             f"[0, {num_classes - 1}] for {num_classes} classes")
        return Split(split.X, (num_classes - 1 - y).astype(y.dtype, copy=False))


COMPONENTS = (LabelFlip,)
