"""Partitioners: ``natural`` (the dataset's own sites), ``iid`` and
``dirichlet`` label skew (Hsu, Qi & Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification").

Train and test rows are partitioned separately (a test row never reaches a
training split); under ``dirichlet`` each client's test split follows the
same class proportions as its training split.
"""

from __future__ import annotations

import numpy as np

from harness import FederatedData, Partitioner, Site, Split


class Natural(Partitioner):
    """Keep the dataset's own sites (hospitals, batches)."""

    name = "natural"

    def __init__(self) -> None:
        pass

    def partition(self, data: FederatedData, *, seed: int) -> FederatedData:
        return data


def _pooled(data: FederatedData) -> tuple[Split, Split]:
    return data.pooled_train(), data.pooled_test()


def _build(data: FederatedData, train: Split, test: Split, tr_idx: list[np.ndarray],
           te_idx: list[np.ndarray], prefix: str) -> FederatedData:
    sites = [Site(f"{prefix}{i}", train.subset(np.sort(a)), test.subset(np.sort(b)))
             for i, (a, b) in enumerate(zip(tr_idx, te_idx))]
    return FederatedData(task=data.task, sites=sites, public=data.public, natural=False)


class IID(Partitioner):
    """Shuffle the pooled data and deal it into ``n_clients`` equal parts."""

    name = "iid"

    def __init__(self, *, n_clients: int = 4) -> None:
        if n_clients < 1:
            raise ValueError(f"n_clients must be >= 1, got {n_clients}")
        self.n_clients = n_clients

    def partition(self, data: FederatedData, *, seed: int) -> FederatedData:
        train, test = _pooled(data)
        rng = np.random.default_rng([seed, 1])
        if len(train) < self.n_clients:
            raise ValueError(f"{len(train)} training rows cannot fill {self.n_clients} clients")
        tr = np.array_split(rng.permutation(len(train)), self.n_clients)
        te = np.array_split(rng.permutation(len(test)), self.n_clients)
        return _build(data, train, test, tr, te, "iid")


class Dirichlet(Partitioner):
    """Label skew: each class is spread over ``n_clients`` with proportions
    drawn from Dirichlet(``alpha``); small alpha, few classes per client."""

    name = "dirichlet"

    def __init__(self, *, n_clients: int = 4, alpha: float = 0.5, min_size: int = 2) -> None:
        if n_clients < 1 or alpha <= 0 or min_size < 0:
            raise ValueError("need n_clients >= 1, alpha > 0 and min_size >= 0")
        self.n_clients, self.alpha, self.min_size = n_clients, alpha, min_size

    def partition(self, data: FederatedData, *, seed: int) -> FederatedData:
        train, test = _pooled(data)
        rng = np.random.default_rng([seed, 2])
        classes = np.unique(np.concatenate([train.y, test.y]))
        for _attempt in range(1000):
            props = {c: rng.dirichlet(np.full(self.n_clients, self.alpha)) for c in classes}
            tr = _split_by(train.y, props, rng, self.n_clients)
            if min(len(a) for a in tr) >= self.min_size:
                break
        else:
            raise ValueError(f"could not give every client {self.min_size} rows with "
                             f"alpha={self.alpha}; lower min_size or n_clients")
        te = _split_by(test.y, props, rng, self.n_clients)
        return _build(data, train, test, tr, te, "dir")


def _split_by(y: np.ndarray, props: dict, rng: np.random.Generator, k: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c, p in props.items():
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    return [np.concatenate(p) if p else np.zeros(0, dtype=int) for p in parts]


COMPONENTS = (Natural, IID, Dirichlet,)
