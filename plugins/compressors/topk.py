"""Top-k sparsification with error feedback.

Each client sends only the ``k = ceil(fraction * n)`` entries of largest
magnitude (Aji and Heafield, "Sparse Communication for Distributed Gradient
Descent", EMNLP 2017). With error feedback the entries it did not send are
kept on the client as a residual and added to its next update, so nothing is
lost, only delayed (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory",
NeurIPS 2018; Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes", ICML 2019).

Magnitudes are ranked on a grid of ``2^-12`` of the largest one, ties
broken by the lower index: entries equal up to float rounding (a two-class
logistic model's rows are exact negatives of each other) are then chosen
the same way whatever the rounding noise of the arithmetic that produced
them, so a cell does not depend on the backend or BLAS (``torch.topk``
breaks ties arbitrarily).

What crosses the network is ``k`` pairs of a float32 value and a uint32
index: ``8 k`` bytes. The residuals live on the compressor instance, one per
client, and are reset by :meth:`TopK.setup` when a cell starts; a client that
is not sampled keeps its residual until it is. Only ``Updates.delta`` is
compressed (algorithm state in ``extra``, such as SCAFFOLD's control
variates, travels as is and is counted at its own size).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from fedmedbench import CellContext, Compressor, Range, Updates

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: bytes per sent entry: a float32 value and a uint32 index
ENTRY_BYTES = 4 + 4
#: magnitudes are compared on a grid of this fraction of the largest one
GRID = 2.0 ** -12


def largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` entries of largest magnitude (on the :data:`GRID`,
    lower index first among equals)."""
    import torch

    mag = values.detach().abs().double()
    top = float(mag.max()) if mag.numel() else 0.0
    level = torch.floor(mag / top / GRID) if top > 0 else torch.zeros_like(mag)
    key = level * (mag.numel() + 1) - torch.arange(mag.numel(), dtype=torch.float64)
    return torch.topk(key, k, sorted=False).indices


class TopK(Compressor):
    """Top-k sparsification (largest magnitudes) with per-client error feedback (Stich et al. 2018).

    Parameters
    ----------
    fraction : float, default 0.1
        Share of the update's entries sent, in (0, 1];
        ``k = ceil(fraction * n)``. Bytes sent per update: ``8 k``.
    error_feedback : bool, default True
        Keep what was not sent on the client and add it to its next update
        (Stich et al. 2018, Karimireddy et al. 2019); ``False`` drops it.
    """

    name = "top-k"

    def __init__(self, *, fraction: Annotated[float, Range(gt=0, le=1)] = 0.1,
                 error_feedback: bool = True) -> None:
        self.fraction = float(fraction)
        self.error_feedback = error_feedback
        self._residual: dict[int, torch.Tensor] = {}

    def k_for(self, n: int) -> int:
        """Entries sent for an ``n``-value update."""
        return max(1, min(n, math.ceil(self.fraction * n - 1e-9)))

    def residual(self, client: int) -> torch.Tensor | None:
        """What ``client`` has not sent yet (``None`` before its first update)."""
        return self._residual.get(client)

    def setup(self, ctx: CellContext) -> None:
        self._residual = {}  # a new cell: forget every client's residual

    def compress(self, ctx: CellContext, updates: Updates) -> Updates:
        import torch

        rows, sizes = [], []
        for client, delta in zip(updates.clients, updates.delta):
            acc = delta.detach().to(torch.float32).clone()
            if self.error_feedback and client in self._residual:
                acc += self._residual[client]
            k = self.k_for(acc.numel())
            idx = largest(acc, k)
            sent = torch.zeros_like(acc)
            sent[idx] = acc[idx]
            if self.error_feedback:
                self._residual[client] = acc - sent
            rows.append(sent)
            sizes.append(k * ENTRY_BYTES)
        return updates.replace(delta=torch.stack(rows), delta_bytes=sizes)


COMPONENTS = (TopK,)
