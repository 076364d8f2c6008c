"""The federation of one cell: its training parties, the rows they hold out,
which clients are malicious, and who takes part in each round."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedmedbench.components import Adversary, FederatedData, Site, Split

__all__ = ["Federation", "cell_rng", "clients_per_round"]


def cell_rng(seed: int, purpose: str, *extra: int) -> np.random.Generator:
    """The seeded stream of :meth:`fedmedbench.CellContext.rng`."""
    from fedmedbench.context import stable_int

    return np.random.default_rng([seed, stable_int(purpose), *extra])


def clients_per_round(n: int, settings: Any) -> int:
    """k of n clients per round from ``clients_per_round``: an integer is a
    count, a float a fraction of n (rounded up), at least 1."""
    cpr = settings.clients_per_round
    if isinstance(cpr, int) and not isinstance(cpr, bool):
        return max(1, min(n, cpr))
    return max(1, int(math.ceil(float(cpr) * n)))


class Federation:
    """Clients and sampling of one cell.

    Parameters
    ----------
    data : FederatedData
        The partitioned data.
    pooled : bool
        One training party holding every site's training rows (the pooled protocol).
    settings : RunSettings
    seed : int
    holdout_fraction : float
        Rows of each client's training split held out (seeded) for the
        aggregator's client-side scores; they are not trained on.
    adversary : Adversary or None
        Malicious clients (``round(fraction * n)``, chosen with the seed) get
        their training data corrupted once, here.
    """

    def __init__(self, data: FederatedData, *, pooled: bool, settings: Any, seed: int,
                 holdout_fraction: float = 0.0, adversary: Adversary | None = None,
                 call: Any = None) -> None:
        self.seed = seed
        self.settings = settings
        if pooled:
            clients = [Site("pooled", data.pooled_train(), data.pooled_test())]
        else:
            clients = list(data.sites)
        self.holdout: dict[int, Split] = {}
        if holdout_fraction > 0 and not pooled:
            for i, site in enumerate(clients):
                perm = cell_rng(seed, "holdout", i).permutation(len(site.train))
                kh = min(len(perm) - 1, int(round(holdout_fraction * len(perm))))
                if kh >= 1:
                    self.holdout[i] = site.train.subset(np.sort(perm[:kh]))
                    clients[i] = Site(site.name, site.train.subset(np.sort(perm[kh:])),
                                      site.test, site.quality)
        self.malicious: set[int] = set()
        if adversary is not None and not pooled:
            n = len(clients)
            m = int(round(float(getattr(adversary, "fraction", 0.0)) * n))
            rng = cell_rng(seed, "adversary")
            self.malicious = set(rng.choice(n, size=m, replace=False).tolist()) if m else set()
            for i in sorted(self.malicious):
                site = clients[i]
                poisoned = call(adversary, "corrupt_data", adversary.corrupt_data, site.train,
                                data.task.num_classes, rng)
                clients[i] = Site(site.name, poisoned, site.test, site.quality)
        self.clients = clients

    @property
    def n(self) -> int:
        return len(self.clients)

    def per_round(self, *, everyone: bool) -> int:
        """k, the expected number of clients per round."""
        return self.n if everyone else clients_per_round(self.n, self.settings)

    def sample(self, rnd: int, k: int) -> list[int]:
        """The clients of round ``rnd``: ``k`` fixed without replacement, or each
        independently with rate k/n (``client_sampling = "poisson"``)."""
        n = self.n
        if k >= n and self.settings.client_sampling != "poisson":
            return list(range(n))
        if k >= n:
            return list(range(n))
        rng = cell_rng(self.seed, "sampling", rnd)
        if self.settings.client_sampling == "poisson":
            return [i for i in range(n) if rng.random() < k / n]
        return sorted(rng.choice(n, size=k, replace=False).tolist())
