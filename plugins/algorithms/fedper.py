"""FedPer: federated learning with personalization layers. Clients share a
body (the base layers), averaged by the server as in FedAvg, and each keeps
its own head (the last layers), trained together with the body every round.

Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with
Personalization Layers". arXiv:1912.00818, 2019.

The head is the last ``head_layers`` parameterised layers of the
architecture (the classifier ``fc`` by default). A client sends the delta of
the body only (:class:`fedmedbench.components.Sharing`): bytes, the server's
view (whose ``readable`` masks exclude the head) and every update- and
transport-stage mechanism see exactly the body. With ``head_layers = 0``
everything is shared and FedPer is FedAvg bit for bit
(tests/test_personalization.py).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from fedmedbench import CellContext, Range
from fedmedbench.plugins.algorithms._personal import head_mask
from fedmedbench.plugins.algorithms.fedavg import FedAvg


class FedPer(FedAvg):
    """Shared body, local head, trained together (Arivazhagan et al. 2019).

    Parameters
    ----------
    head_layers : int, default 1
        How many of the last parameterised layers each client keeps (>= 0);
        0 shares the whole model (FedAvg).
    """

    name = "fedper"
    protocol = "personalized"
    shares = "part"

    def __init__(self, *, head_layers: Annotated[int, Range(ge=0)] = 1) -> None:
        self.head_layers = head_layers

    def shared_mask(self, ctx: CellContext) -> np.ndarray:
        return ~head_mask(ctx, self.head_layers)


COMPONENTS = (FedPer,)
