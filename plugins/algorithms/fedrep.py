"""FedRep: federated representation learning. Clients share a body (the
representation), averaged by the server, and keep their own head; each round
a client first trains its head with the body frozen, then the body with the
new head frozen, and sends the body's delta.

Collins, Hassani, Mokhtari, Shakkottai. "Exploiting Shared Representations
for Personalized Federated Learning". ICML 2021 (Algorithm 1).

The round's local steps (run settings) are split: ``head_fraction`` of them
on the head, the rest on the body (the paper trains the head for many more
steps than the body); the split keeps FedRep's local work, and so the steps
a DP-SGD accountant plans for, equal to FedAvg's. The head is the last
``head_layers`` parameterised layers. Frozen parameters get no gradient and
do not move, on both backends (``ctx.train(trainable=...)``). A client sends
the body's delta only (:class:`fedmedbench.components.Sharing`), so bytes,
the server's view and update/transport privacy see exactly the body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fedmedbench import CellContext, ClientContext, Range, Updates
from fedmedbench.plugins.algorithms._personal import head_mask
from fedmedbench.plugins.algorithms.fedper import FedPer

if TYPE_CHECKING:  # pragma: no cover
    import torch


class FedRep(FedPer):
    """Shared body, local head; head steps then body steps (Collins et al. 2021).

    Parameters
    ----------
    head_layers : int, default 1
        How many of the last parameterised layers form the local head (>= 0);
        0 shares the whole model.
    head_fraction : float, default 0.5
        Fraction of each round's local steps spent on the head, in [0, 1]
        (rounded; the rest train the body).
    """

    name = "fedrep"
    vectorized = True

    def __init__(self, *, head_layers: Annotated[int, Range(ge=0)] = 1,
                 head_fraction: Annotated[float, Range(ge=0, le=1)] = 0.5) -> None:
        super().__init__(head_layers=head_layers)
        self.head_fraction = float(head_fraction)

    def setup(self, ctx: CellContext) -> None:
        import torch

        self._head = torch.as_tensor(head_mask(ctx, self.head_layers))

    def split(self, steps: list[int]) -> tuple[list[int], list[int]]:
        """(head steps, body steps) of each client's round."""
        head = [int(round(self.head_fraction * s)) for s in steps]
        return head, [s - h for s, h in zip(steps, head)]

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> Updates:
        head, body = self.split(ctx.steps)
        w = global_params
        if self._head.any() and any(head):
            w = ctx.train(w, steps=head, trainable=self._head)
        if (~self._head).any() and any(body):
            w = ctx.train(w, steps=body, trainable=~self._head)
        if w.dim() == 1:
            w = w.unsqueeze(0)
        return ctx.update(w - global_params)


COMPONENTS = (FedRep,)
