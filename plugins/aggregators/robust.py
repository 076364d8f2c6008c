"""Byzantine-robust aggregation rules. Non-linear (``linear = False``): they
need every client's plaintext update, so the engine skips them under secure
aggregation or HE, with the reason.

- ``median``: coordinate-wise median (Yin, Chen, Ramchandran, Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
  ICML 2018);
- ``trimmed-mean``: coordinate-wise mean after dropping the ``trim`` largest
  and smallest fraction of values (Yin et al. 2018);
- ``krum``: the update closest (sum of squared distances to its ``n - f - 2``
  nearest neighbours) to the others; ``multi`` > 1 averages the ``multi`` best
  (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from fedmedbench import Aggregator, Range, Received

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Median(Aggregator):
    """Coordinate-wise median of the client updates (Yin et al. 2018). No parameters."""

    name = "median"
    linear = False
    weighting = "uniform"

    def __init__(self) -> None:
        pass

    def aggregate(self, received: Received) -> torch.Tensor:
        import torch

        stacked = received.delta
        # torch.median returns the lower middle value for even counts; average both middles
        return torch.quantile(stacked, 0.5, dim=0) if len(received) > 1 else stacked[0]


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Parameters
    ----------
    trim : float, default 0.1
        Fraction in [0, 0.5) of values dropped at *each* end of every
        coordinate (``floor(trim * n)`` values per end).
    """

    name = "trimmed-mean"
    linear = False
    weighting = "uniform"

    def __init__(self, *, trim: Annotated[float, Range(ge=0, lt=0.5)] = 0.1) -> None:
        self.trim = float(trim)

    def aggregate(self, received: Received) -> torch.Tensor:
        import torch

        stacked = received.delta
        n = len(received)
        k = int(math.floor(self.trim * n))
        if k == 0:
            return stacked.mean(0)
        srt, _ = torch.sort(stacked, dim=0)
        return srt[k:n - k].mean(0)


class Krum(Aggregator):
    """(Multi-)Krum (Blanchard et al. 2017).

    Parameters
    ----------
    f : int, default 1
        Number of Byzantine clients tolerated (>= 0); Krum's guarantee needs
        ``n > 2f + 2`` (with fewer clients the score uses all other updates).
    multi : int, default 1
        Number of best-scored updates averaged (1 is Krum, more is Multi-Krum).
    """

    name = "krum"
    linear = False
    weighting = "data-dependent"

    def __init__(self, *, f: Annotated[int, Range(ge=0)] = 1,
                 multi: Annotated[int, Range(ge=1)] = 1) -> None:
        self.f, self.multi = f, multi

    def aggregate(self, received: Received) -> torch.Tensor:
        import torch

        X = received.delta.double()
        n = len(received)
        if n == 1:
            return X[0].float()
        d = torch.cdist(X, X) ** 2
        m = max(1, min(n - 1, n - self.f - 2))
        scores = torch.stack([torch.sort(torch.cat([d[i, :i], d[i, i + 1:]]))[0][:m].sum()
                              for i in range(n)])
        best = torch.argsort(scores)[:min(self.multi, n)]
        return X[best].mean(0).float()


COMPONENTS = (Median, TrimmedMean, Krum)
