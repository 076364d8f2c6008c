"""Weighted mean of client updates (FedAvg's aggregation rule) with a choice of
weights. Linear, so it also runs over secure aggregation and homomorphic
encryption (the engine pre-scales each update by its weight).

Weightings (``by``):

- ``examples``: proportional to each client's number of training examples
  (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
  from Decentralized Data", AISTATS);
- ``uniform``: equal weights;
- ``quality``: proportional to a per-site data-quality score in [0, 1]: the
  ``scores`` parameter (site name → score) if given, else the dataset's
  ``Site.quality``, else computed on the client as 1 − the fraction of
  missing (NaN) feature values in its training split;
- ``performance``: proportional to each client's *trained* model's metric on
  a held-out part of its own training data (``holdout``, carved out with the
  cell seed and not trained on). The client computes the score and sends it
  with the update's metadata: the server never sees the held-out rows.

Quality and performance weights are raised to ``power`` (sharpening) before
normalising; a round where every score is 0 falls back to uniform. The
weights of every round are recorded in the result's history
(``history[r].weights``, by site).
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np

from fedmedbench import Aggregator, ClientContext, Range, Received, Updates, score
from fedmedbench import predict_proba as _predict

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: how the updates are weighted (``by``)
Weighting = Literal["examples", "uniform", "quality", "performance"]
WEIGHTINGS: tuple[str, ...] = typing.get_args(Weighting)


class WeightedMean(Aggregator):
    """Weighted mean of updates, by examples, uniform, data quality or client performance.

    Parameters
    ----------
    by : {"examples", "uniform", "quality", "performance"}, default "examples"
        Number of training examples, equal weights, data-quality scores or
        each client's held-out performance.
    scores : dict, default {}
        ``by="quality"`` only: site name → quality score in [0, 1], overriding
        the dataset's ``Site.quality`` for the sites named.
    holdout : float, default 0.2
        ``by="performance"`` only: fraction of each client's training rows
        held out to score its model, in (0, 1).
    power : float, default 1.0
        Exponent (>= 0) applied to quality or performance scores; 0 gives
        uniform weights, larger values favour the best clients more.
    """

    name = "weighted-mean"
    linear = True

    def __init__(self, *, by: Weighting = "examples", scores: dict = {},  # noqa: B006
                 holdout: Annotated[float, Range(gt=0, lt=1)] = 0.2,
                 power: Annotated[float, Range(ge=0)] = 1.0) -> None:
        for site, s in scores.items():
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s <= 1:
                raise ValueError(f"weighted-mean: scores[{site!r}] = {s!r}; quality scores "
                                 f"must be numbers in [0, 1]")
        self.by, self.scores = by, dict(scores)
        self.holdout, self.power = float(holdout), float(power)

    @property
    def weighting(self) -> str:  # type: ignore[override]
        """Declared weighting: ``examples``, ``uniform`` or ``data-dependent``."""
        return {"examples": "examples", "uniform": "uniform"}.get(self.by, "data-dependent")

    @property
    def sends_private_scores(self) -> bool:  # type: ignore[override]
        """Performance weights are accuracies on each client's private rows."""
        return self.by == "performance"

    @property
    def client_metric_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return {"quality": ("quality",), "performance": ("holdout_score",)}.get(self.by, ())

    def holdout_fraction(self) -> float:
        return self.holdout if self.by == "performance" else 0.0

    def client_metrics(self, ctx: ClientContext, global_params: torch.Tensor,
                       updates: Updates) -> dict[str, np.ndarray]:
        """One client's number (``ctx`` holds one client, ``updates`` its row)."""
        if self.by == "quality":
            return {"quality": np.array([self._quality(ctx.sites[0])])}
        if self.by == "performance":
            hold = ctx.holdout(0)
            if hold is None or len(hold) == 0:
                return {"holdout_score": np.array([float("nan")])}
            model = ctx.model(global_params + updates.delta[0])
            metric = ctx.cell.task.metric
            return {"holdout_score": np.array([score(metric, hold.y, _predict(model, hold.X))])}
        return {}

    def _quality(self, site: Any) -> float:
        if site.name in self.scores:
            return float(self.scores[site.name])
        if site.quality is not None:
            return float(site.quality)
        X = np.asarray(site.train.X, dtype=float)
        return float(1.0 - np.isnan(X).mean()) if X.size else 0.0

    def weights(self, received: Received) -> np.ndarray:
        if self.by == "uniform":
            raw = np.ones(len(received))
        elif self.by == "examples":
            raw = np.array(received.num_examples, dtype=float)
        else:
            key = "quality" if self.by == "quality" else "holdout_score"
            s = np.asarray(received.metrics.get(key, np.full(len(received), np.nan)), dtype=float)
            s = np.nan_to_num(np.clip(s, 0.0, None), nan=0.0)  # a missing score counts 0
            raw = s ** self.power if self.power else np.ones(len(received))
        if raw.sum() <= 0:
            raw = np.ones(len(received))
        return raw / raw.sum()


COMPONENTS = (WeightedMean,)
