"""FedAvg: local SGD on each sampled client, then the server adds the
(weighted) mean of the client deltas, scaled by the server learning rate.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient
Learning of Deep Networks from Decentralized Data". AISTATS 2017.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmedbench import Algorithm, CellContext, Received

if TYPE_CHECKING:  # pragma: no cover
    import torch


class FedAvg(Algorithm):
    """Federated averaging (McMahan et al. 2017)."""

    name = "fedavg"
    vectorized = True

    def __init__(self) -> None:
        pass

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        return global_params + ctx.settings.server_lr * aggregate


COMPONENTS = (FedAvg,)
