"""Top-k sparsification with error feedback.

Each client sends only the ``k = ceil(fraction * n)`` entries of largest
magnitude (Aji and Heafield, "Sparse Communication for Distributed Gradient
Descent", EMNLP 2017). With error feedback the entries it did not send are
kept on the client as a residual and added to its next update, so nothing is
lost, only delayed (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory",
NeurIPS 2018; Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes", ICML 2019).

What crosses the network is ``k`` pairs of a float32 value and a uint32
index: ``8 k`` bytes. The residuals live on the compressor instance, one per
client, and are reset when a new cell (a new :class:`fedmedbench.RoundContext`)
starts; a client that is not sampled keeps its residual until it is.
Only ``ClientUpdate.delta`` is compressed (algorithm state in ``extra``,
such as SCAFFOLD's control variates, travels as is).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Annotated

import torch

from fedmedbench import ClientUpdate, Compressor, Range, RoundContext

#: bytes per sent entry: a float32 value and a uint32 index
ENTRY_BYTES = 4 + 4


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
        if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
                or not math.isfinite(fraction) or not 0 < fraction <= 1):
            raise ValueError(f"top-k: fraction = {fraction!r}; fraction (the share of entries "
                             f"sent) must be a number in (0, 1]")
        if not isinstance(error_feedback, bool):
            raise ValueError(f"top-k: error_feedback = {error_feedback!r}; error_feedback must "
                             f"be true or false")
        self.fraction = float(fraction)
        self.error_feedback = error_feedback
        self._residual: dict[int, torch.Tensor] = {}
        self._cell: weakref.ref[RoundContext] | None = None

    def k_for(self, n: int) -> int:
        """Entries sent for an ``n``-value update."""
        return max(1, min(n, math.ceil(self.fraction * n - 1e-9)))

    def residual(self, client: int) -> torch.Tensor | None:
        """What ``client`` has not sent yet (``None`` before its first update)."""
        return self._residual.get(client)

    def compress(self, ctx: RoundContext, update: ClientUpdate) -> tuple[ClientUpdate, int]:
        if self._cell is None or self._cell() is not ctx:  # a new cell: forget old residuals
            self._residual.clear()
            self._cell = weakref.ref(ctx)
        delta = update.delta.detach().reshape(-1).to(torch.float32)
        acc = delta.clone()
        if self.error_feedback and update.client in self._residual:
            acc += self._residual[update.client]
        k = self.k_for(acc.numel())
        idx = torch.topk(acc.abs(), k, sorted=False).indices
        sent = torch.zeros_like(acc)
        sent[idx] = acc[idx]
        if self.error_feedback:
            self._residual[update.client] = acc - sent
        out = dataclasses.replace(update, delta=sent.reshape(update.delta.shape),
                                  metrics=dict(update.metrics))
        return out, k * ENTRY_BYTES


COMPONENTS = (TopK,)
