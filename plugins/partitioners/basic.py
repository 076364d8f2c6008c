"""Partitioners: ``natural`` (the dataset's own sites), ``iid`` and
``dirichlet`` label skew (Hsu, Qi & Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification").

Train and test rows are partitioned separately (a test row never reaches a
training split); under ``dirichlet`` each client's test split follows the
same class proportions as its training split.

Every partitioner takes ``public_fraction`` (default 0): that fraction of the
pooled *training* rows, drawn with the cell seed, is moved into
:attr:`FederatedData.public` -- data no client holds, for distillation (FedDF,
FedMD) or pretraining. Public rows come only from training rows, never from
test rows, and are removed from every client. For ``natural`` the fraction is
taken from each site's training rows, so the sites stay the real sites.
"""

from __future__ import annotations

import abc
from typing import Annotated

import numpy as np

from fedmedbench import FederatedData, Partitioner, Range, Site, Split

_PUBLIC_STREAM = 7  # rng stream of the public carve-out, independent of the split streams


def _merge_public(existing: Split | None, carved: Split | None) -> Split | None:
    parts = [s for s in (existing, carved) if s is not None and len(s)]
    return Split.concat(parts) if parts else existing


def carve_public(train: Split, fraction: float, rng: np.random.Generator
                 ) -> tuple[Split, Split | None]:
    """Move ``round(fraction * len(train))`` random training rows out.

    Returns ``(remaining training rows, public rows or None)``; the remaining
    rows keep their original order.
    """
    k = int(round(fraction * len(train)))
    if k <= 0:
        return train, None
    if k >= len(train):
        raise ValueError(f"public_fraction={fraction} would leave no training rows "
                         f"(of {len(train)})")
    pick = np.zeros(len(train), dtype=bool)
    pick[rng.choice(len(train), size=k, replace=False)] = True
    return train.subset(np.flatnonzero(~pick)), train.subset(np.flatnonzero(pick))


class Natural(Partitioner):
    """Keep the dataset's own sites (hospitals, batches).

    Parameters
    ----------
    public_fraction : float, default 0.0
        Fraction of each site's training rows moved into the public split.
    """

    name = "natural"

    def __init__(self, *, public_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> None:
        self.public_fraction = float(public_fraction)

    def partition(self, data: FederatedData, *, seed: int) -> FederatedData:
        if self.public_fraction == 0.0:
            return data
        rng = np.random.default_rng([seed, _PUBLIC_STREAM])
        sites, carved = [], []
        for s in data.sites:
            tr, pub = carve_public(s.train, self.public_fraction, rng)
            sites.append(Site(s.name, tr, s.test, s.quality))
            if pub is not None:
                carved.append(pub)
        public = _merge_public(data.public, Split.concat(carved) if carved else None)
        return FederatedData(task=data.task, sites=sites, public=public, natural=data.natural)


class PooledPartitioner(Partitioner, abc.ABC):
    """Base of the partitioners that pool every site, carve out the public
    split, then deal rows to clients (:meth:`split`)."""

    prefix = "client"

    @abc.abstractmethod
    def split(self, train: Split, test: Split, rng: np.random.Generator
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Row indices of each client's train and test split."""

    def partition(self, data: FederatedData, *, seed: int) -> FederatedData:
        train, test = data.pooled_train(), data.pooled_test()
        train, pub = carve_public(train, self.public_fraction,
                                  np.random.default_rng([seed, _PUBLIC_STREAM]))
        tr, te = self.split(train, test, np.random.default_rng([seed, self.stream]))
        sites = [Site(f"{self.prefix}{i}", train.subset(np.sort(a)), test.subset(np.sort(b)))
                 for i, (a, b) in enumerate(zip(tr, te))]
        out = FederatedData(task=data.task, sites=sites, public=_merge_public(data.public, pub),
                            natural=False)
        return self.transform(out, seed=seed)

    def transform(self, data: FederatedData, *, seed: int) -> FederatedData:
        """Hook for partitioners that also change features (``feature-shift``)."""
        return data

    stream = 0


class IID(PooledPartitioner):
    """Shuffle the pooled data and deal it into ``n_clients`` equal parts.

    Parameters
    ----------
    n_clients : int, default 4
    public_fraction : float, default 0.0
        Fraction of the pooled training rows moved into the public split.
    """

    name = "iid"
    prefix = "iid"
    stream = 1

    def __init__(self, *, n_clients: Annotated[int, Range(ge=1)] = 4,
                 public_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> None:
        self.n_clients = n_clients
        self.public_fraction = float(public_fraction)

    def split(self, train: Split, test: Split, rng: np.random.Generator
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if len(train) < self.n_clients:
            raise ValueError(f"{len(train)} training rows cannot fill n_clients={self.n_clients}")
        return (np.array_split(rng.permutation(len(train)), self.n_clients),
                np.array_split(rng.permutation(len(test)), self.n_clients))


class Dirichlet(PooledPartitioner):
    """Label skew: each class is spread over ``n_clients`` with proportions
    drawn from Dirichlet(``alpha``); small alpha, few classes per client.

    Parameters
    ----------
    n_clients : int, default 4
    alpha : float, default 0.5
        Concentration; large values approach IID.
    min_size : int, default 2
        Redraw until every client has at least this many training rows.
    public_fraction : float, default 0.0
        Fraction of the pooled training rows moved into the public split.
    """

    name = "dirichlet"
    prefix = "dir"
    stream = 2

    def __init__(self, *, n_clients: Annotated[int, Range(ge=1)] = 4,
                 alpha: Annotated[float, Range(gt=0)] = 0.5,
                 min_size: Annotated[int, Range(ge=0)] = 2,
                 public_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> None:
        self.n_clients = n_clients
        self.alpha, self.min_size = alpha, min_size
        self.public_fraction = float(public_fraction)

    def split(self, train: Split, test: Split, rng: np.random.Generator
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        classes = np.unique(np.concatenate([train.y, test.y]))
        for _attempt in range(1000):
            props = {c: rng.dirichlet(np.full(self.n_clients, self.alpha)) for c in classes}
            tr = _split_by(train.y, props, rng, self.n_clients)
            if min(len(a) for a in tr) >= self.min_size:
                break
        else:
            raise ValueError(f"could not give every client {self.min_size} rows with "
                             f"alpha={self.alpha}; lower min_size or n_clients")
        return tr, _split_by(test.y, props, rng, self.n_clients)


def _split_by(y: np.ndarray, props: dict, rng: np.random.Generator, k: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c, p in props.items():
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    return [np.concatenate(p) if p else np.zeros(0, dtype=int) for p in parts]


COMPONENTS = (Natural, IID, Dirichlet,)
