"""FedProx: FedAvg whose clients minimise the local loss plus a proximal term
``mu / 2 * ||w - w_global||^2`` that keeps them near the global model on
heterogeneous (non-IID) data.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
Heterogeneous Networks". MLSys 2020.

With ``mu = 0`` the proximal term and its gradient are exactly zero, so
FedProx reproduces FedAvg bit for bit (tests/test_algorithms.py checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fedmedbench import ClientContext, Range, Updates
from fedmedbench.plugins.algorithms.fedavg import FedAvg

if TYPE_CHECKING:  # pragma: no cover
    import torch


class FedProx(FedAvg):
    """FedAvg with a proximal term on the clients (Li et al. 2020).

    Parameters
    ----------
    mu : float, default 0.01
        Weight of the proximal term ``mu / 2 * ||w - w_global||^2``; ``mu >= 0``
        (0 is FedAvg). The paper tunes it in {0.001, 0.01, 0.1, 1}.

    The server step is FedAvg's: ``w + server_lr * aggregate``.
    """

    name = "fedprox"

    def __init__(self, *, mu: Annotated[float, Range(ge=0)] = 0.01) -> None:
        self.mu = float(mu)

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> Updates:
        import torch

        anchor = global_params.detach()
        mu = self.mu

        def proximal(w: torch.Tensor) -> torch.Tensor:  # w: one client's flat parameters
            return 0.5 * mu * torch.sum((w - anchor) ** 2)

        # μ = 0: no proximal term at all, so the steps are FedAvg's exactly (the backends
        # fuse plain SGD into the backward pass only without an extra loss)
        return ctx.update(ctx.train_delta(global_params,
                                          extra_loss=proximal if mu > 0 else None))


COMPONENTS = (FedProx,)
