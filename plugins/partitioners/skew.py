"""Quantity skew and feature shift, the two non-label skews of Li, Diao, Chen &
He 2022, "Federated Learning on Non-IID Data Silos: An Experimental Study"
(ICDE): client sizes drawn from Dirichlet(``alpha``) (``quantity``), and
per-client transformations of the inputs (``feature-shift``, the "feature
distribution skew" that FedBN targets: Li et al. 2021, ICLR).

Both pool the dataset's sites, carve out ``public_fraction`` of the training
rows (see :mod:`fedmedbench.plugins.partitioners.basic`) and deal train and test rows
separately, so no test row reaches training.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from fedmedbench import FederatedData, Range, Site, Split
from fedmedbench.plugins.partitioners.basic import PooledPartitioner


def _dirichlet_sizes(n: int, k: int, alpha: float, min_size: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Client sizes summing to ``n``, each >= ``min_size``, the rest split by Dirichlet(alpha)."""
    if n < k * min_size:
        raise ValueError(f"{n} training rows cannot give n_clients={k} clients "
                         f"min_size={min_size} rows each")
    return rng.multinomial(n - k * min_size, rng.dirichlet(np.full(k, alpha))) + min_size


class Quantity(PooledPartitioner):
    """Size skew: client ``i`` gets a share ``p_i`` of the rows, ``p ~ Dirichlet(alpha)``.

    Labels stay IID within each client. Each client's test split is drawn
    with the same share as its training split.

    Parameters
    ----------
    n_clients : int, default 4
    alpha : float, default 0.5
        Concentration; small values give a few large and many tiny clients.
    min_size : int, default 8
        Every client keeps at least this many training rows.
    public_fraction : float, default 0.0
        Fraction of the pooled training rows moved into the public split.
    """

    name = "quantity"
    prefix = "qty"
    stream = 3

    def __init__(self, *, n_clients: Annotated[int, Range(ge=1)] = 4,
                 alpha: Annotated[float, Range(gt=0)] = 0.5,
                 min_size: Annotated[int, Range(ge=1)] = 8,
                 public_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> None:
        self.n_clients = n_clients
        self.alpha, self.min_size = alpha, min_size
        self.public_fraction = float(public_fraction)

    def split(self, train: Split, test: Split, rng: np.random.Generator
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        sizes = _dirichlet_sizes(len(train), self.n_clients, self.alpha, self.min_size, rng)
        tr = np.split(rng.permutation(len(train)), np.cumsum(sizes)[:-1])
        share = sizes / sizes.sum()
        te_cuts = np.round(np.cumsum(share)[:-1] * len(test)).astype(int)
        te = np.split(rng.permutation(len(test)), te_cuts)
        return tr, te


class FeatureShift(PooledPartitioner):
    """IID rows, then a per-client transformation of the inputs (the same for
    the client's train and test rows, like one hospital's scanner or lab).

    - tabular inputs (rows × features): ``x * a_i + b_i`` per feature with
      ``log a_i ~ N(0, (strength/2)^2)`` and ``b_i ~ N(0, strength^2)``, in
      units of the (standardised) features;
    - images (rows × channels × H × W, values in [0, 1]): contrast
      ``exp(N(0, (0.3 strength)^2))`` about 0.5, brightness
      ``N(0, (0.1 strength)^2)`` and pixel noise of s.d. ``0.05 strength |N(0,1)|``,
      clipped to [0, 1].

    The public split is left untransformed. Meant for generators and pooled
    data; on a dataset with real sites it pools them first.

    Parameters
    ----------
    n_clients : int, default 4
    strength : float, default 1.0
        Scale of the shift; 0 is plain IID.
    public_fraction : float, default 0.0
        Fraction of the pooled training rows moved into the public split.
    """

    name = "feature-shift"
    prefix = "fs"
    stream = 4

    def __init__(self, *, n_clients: Annotated[int, Range(ge=1)] = 4,
                 strength: Annotated[float, Range(ge=0)] = 1.0,
                 public_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> None:
        self.n_clients = n_clients
        self.strength = float(strength)
        self.public_fraction = float(public_fraction)

    def split(self, train: Split, test: Split, rng: np.random.Generator
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if len(train) < self.n_clients:
            raise ValueError(f"{len(train)} training rows cannot fill n_clients={self.n_clients}")
        return (np.array_split(rng.permutation(len(train)), self.n_clients),
                np.array_split(rng.permutation(len(test)), self.n_clients))

    def transform(self, data: FederatedData, *, seed: int) -> FederatedData:
        if self.strength == 0:
            return data
        sites = []
        for i, s in enumerate(data.sites):
            rng = np.random.default_rng([seed, self.stream, 1, i])
            shift = self._shift(s.train.X.shape[1:], rng)
            sites.append(Site(s.name, Split(shift(s.train.X, rng), s.train.y),
                              Split(shift(s.test.X, rng), s.test.y), s.quality))
        return FederatedData(task=data.task, sites=sites, public=data.public, natural=False)

    def _shift(self, shape: tuple[int, ...], rng: np.random.Generator):
        st = self.strength
        if len(shape) >= 3:  # images: channels × H × W
            contrast = float(np.exp(rng.normal(0, 0.3 * st)))
            bright = float(rng.normal(0, 0.1 * st))
            noise = float(0.05 * st * abs(rng.normal()))

            def image(X: np.ndarray, r: np.random.Generator) -> np.ndarray:
                out = (X - 0.5) * contrast + 0.5 + bright
                out += r.normal(0, noise, size=X.shape).astype(np.float32) if noise else 0
                return np.clip(out, 0, 1).astype(np.float32)

            return image
        a = np.exp(rng.normal(0, st / 2, size=shape)).astype(np.float32)
        b = rng.normal(0, st, size=shape).astype(np.float32)
        return lambda X, r: (X * a + b).astype(np.float32)


COMPONENTS = (Quantity, FeatureShift,)
