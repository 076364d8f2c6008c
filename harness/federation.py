"""The federation of one cell: its training parties, the rows they hold out
(a validation split, the aggregator's scoring rows), the canaries an audit
inserts, which clients are malicious, and who takes part in each round."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.components import Adversary, FederatedData, Site, Split

if TYPE_CHECKING:  # pragma: no cover
    from fedmedbench.context import Canaries

__all__ = ["Federation", "cell_rng", "clients_per_round", "validation_rows"]


def cell_rng(seed: int, purpose: str, *extra: int) -> np.random.Generator:
    """The seeded stream of :meth:`fedmedbench.CellContext.rng`."""
    from fedmedbench.context import stable_int

    return np.random.default_rng([seed, stable_int(purpose), *extra])


def validation_rows(seed: int, site: int, n: int, fraction: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows) of a site with ``n`` training rows:
    ``round(fraction * n)`` drawn with the cell seed (at least 1 when the site
    has 2 rows or more, never all of them), both in row order."""
    if n < 2 or fraction <= 0:
        return np.zeros(0, dtype=np.int64), np.arange(n)
    k = min(n - 1, max(1, int(round(fraction * n))))
    perm = cell_rng(seed, "validation", site).permutation(n)
    return np.sort(perm[:k]), np.sort(perm[k:])


def tuning_rows(data: FederatedData, tuning: dict[str, Any]) -> FederatedData:
    """``data`` with each site's training rows cut to the tuning rows
    (``role = "tune"``) or to the others (``role = "rest"``): ``round(fraction
    · n)`` of each site's training rows (at least 1 where the site has 2),
    drawn with the tuning seed, never the cell seed, so the two sets are the
    same for every cell (:mod:`fedmedbench.tuning`)."""
    role, frac, tseed = tuning["role"], float(tuning["fraction"]), int(tuning["seed"])
    if role not in ("tune", "rest"):
        raise ValueError(f"tuning role {role!r}; 'tune' or 'rest'")

    def cut(sites: list[Site]) -> list[Site]:
        out = []
        for i, s in enumerate(sites):
            n = len(s.train)
            k = min(n - 1, max(1, int(round(frac * n)))) if n >= 2 else 0
            perm = cell_rng(tseed, "tuning-rows", i).permutation(n)
            rows = np.sort(perm[:k] if role == "tune" else perm[k:])
            out.append(Site(s.name, s.train.subset(rows), s.test, s.quality))
        return out

    return FederatedData(task=data.task, sites=cut(data.sites), public=data.public,
                         natural=data.natural,
                         pooled_sites=None if data.pooled_sites is None
                         else cut(data.pooled_sites))


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
        aggregator's client-side scores; they are not trained on. With a
        validation split (``settings.validation``) the aggregator scores on
        it instead, and nothing more is held out.
    adversary : Adversary or None
        Malicious clients (``round(fraction * n)``, chosen with the seed) get
        their training data corrupted once, here.

    The pooled party trains on :attr:`FederatedData.pooled_sites` when the
    dataset gives them (rows preprocessed as one pooled dataset), else on
    the sites' own rows. ``validation`` (a fraction of each site's training
    rows, seeded, never trained on by any protocol) is kept per site in
    :attr:`validation`, as the site holds it, for tuning and performance
    weighting; the test splits are only for reporting.
    """

    def __init__(self, data: FederatedData, *, pooled: bool, settings: Any, seed: int,
                 holdout_fraction: float = 0.0, adversary: Adversary | None = None,
                 call: Any = None, tuning: dict[str, Any] | None = None) -> None:
        self.seed = seed
        self.settings = settings
        if tuning:  # hyperparameter selection's rows, apart from the published cells' rows
            data = tuning_rows(data, tuning)
        #: the data the parties hold (each site's training rows cut by a tuning role)
        self.source = data
        sites = list(data.sites)
        own = sites
        if pooled and data.pooled_sites is not None:
            own = list(data.pooled_sites)
            if [len(s.train) for s in own] != [len(s.train) for s in sites]:
                raise ValueError("FederatedData.pooled_sites must hold the same training rows "
                                 "as sites (same sites, sizes and order)")
        #: each site's validation rows, as the site holds them (scored for tuning)
        self.validation: dict[int, Split] = {}
        #: per site, the rows of its training split that are trained on (after the
        #: validation and holdout carve; canaries and an adversary's changes aside)
        self.trained_rows: dict[int, np.ndarray] = {i: np.arange(len(s.train))
                                                    for i, s in enumerate(sites)}
        frac = float(getattr(settings, "validation", 0.0) or 0.0)
        if frac > 0:
            kept = []
            for i, (site, mine) in enumerate(zip(sites, own)):
                val, rest = validation_rows(seed, i, len(site.train), frac)
                self.validation[i] = site.train.subset(val)
                self.trained_rows[i] = rest
                kept.append(Site(mine.name, mine.train.subset(rest), mine.test, mine.quality))
            own = kept
        if pooled:
            clients = [Site("pooled", Split.concat([s.train for s in own]),
                            Split.concat([s.test for s in own]))]
        else:
            clients = list(own)
        self.holdout: dict[int, Split] = {}
        if holdout_fraction > 0 and not pooled and self.validation:
            self.holdout = {i: v for i, v in self.validation.items() if len(v)}
        elif holdout_fraction > 0 and not pooled:
            for i, site in enumerate(clients):
                perm = cell_rng(seed, "holdout", i).permutation(len(site.train))
                kh = min(len(perm) - 1, int(round(holdout_fraction * len(perm))))
                if kh >= 1:
                    self.holdout[i] = site.train.subset(np.sort(perm[:kh]))
                    self.trained_rows[i] = self.trained_rows[i][np.sort(perm[kh:])]
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

    def insert_canaries(self, canaries: Canaries | None, *, pooled: bool) -> None:
        """Append the included canaries to their sites' training rows (all of
        them to the pooled party), before round 1: after the validation and
        holdout carve and the adversary's corruption, so every included
        canary is trained on as given."""
        if canaries is None or canaries.included is None:
            return
        inc = np.asarray(canaries.included, dtype=bool)
        for i, site in enumerate(self.clients):
            sel = inc if pooled else inc & (np.asarray(canaries.site) == i)
            if not sel.any():
                continue
            add = Split(np.asarray(canaries.X[sel], dtype=np.float32),
                        np.asarray(canaries.y[sel], dtype=np.int64))
            self.clients[i] = Site(site.name, Split.concat([site.train, add]), site.test,
                                   site.quality)

    def trained_data(self, data: FederatedData) -> FederatedData:
        """``data`` with each site's training split (and its pooled copy)
        restricted to the rows trained on: the members an attack scores."""
        data = self.source
        if all(len(r) == len(s.train) for r, s in zip(self.trained_rows.values(), data.sites)):
            return data

        def cut(sites: list[Site]) -> list[Site]:
            return [Site(s.name, s.train.subset(self.trained_rows[i]), s.test, s.quality)
                    for i, s in enumerate(sites)]

        return FederatedData(task=data.task, sites=cut(data.sites), public=data.public,
                             natural=data.natural,
                             pooled_sites=None if data.pooled_sites is None
                             else cut(data.pooled_sites))

    def validation_data(self, data: FederatedData) -> FederatedData | None:
        """``data`` with each site's validation rows in place of its test split
        (what the protocol's evaluation scores for ``utility.validation``), or
        ``None`` without a validation split."""
        if not self.validation:
            return None
        data = self.source
        sites = [Site(s.name, s.train, self.validation[i], s.quality)
                 for i, s in enumerate(data.sites)]
        return FederatedData(task=data.task, sites=sites, public=data.public,
                             natural=data.natural)

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
