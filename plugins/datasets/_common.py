"""Private helpers shared by the dataset modules: seeded per-site splits,
scalers fitted on training rows only (each site's own by default), and site
assembly."""

from __future__ import annotations

import typing
from typing import Literal

import numpy as np

from fedmedbench import Site, Split


def split_indices(y: np.ndarray, test_fraction: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices of one site (per class, at least one test
    row for a class with two or more rows, at least one training row)."""
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        te.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def fit_scaler(X_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation of the training rows (NaN-aware;
    constant or all-missing columns get mean 0, s.d. 1)."""
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(X_train, axis=0)
            std = np.nanstd(X_train, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return mean.astype(np.float64), std.astype(np.float64)


def apply_scaler(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardise with training statistics; a missing value becomes 0 (the
    training mean)."""
    Z = (X - mean) / std
    return np.nan_to_num(Z, nan=0.0).astype(np.float32)


#: how a loader standardises: each site with its own training rows' statistics (what a
#: hospital can compute alone), or every site with the pooled training rows' (statistics
#: of all sites' private rows, computed outside the federation)
Scaling = Literal["site", "pooled"]
SCALINGS: tuple[str, ...] = typing.get_args(Scaling)

POOLED_NOTE = ("preprocessing: the numeric columns are standardised with the per-column mean "
               "and standard deviation of every site's pooled training rows, computed outside "
               "the federation (scaling = \"pooled\"); no privacy mechanism of the cell covers "
               "them, and they reveal each column's mean and spread over all hospitals")


def check_scaling(scaling: str) -> str:
    """``scaling`` if it is one of :data:`SCALINGS`, else ValueError (for
    :func:`scaled_arrays`; a loader's ``scaling`` parameter is checked by its
    :data:`Scaling` annotation)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling = {scaling!r}; choose 'site' (each site's own training "
                         f"statistics, the default) or 'pooled' (all sites' training rows: "
                         f"outside the federated threat model, and the record says so)")
    return scaling


def scaled_arrays(X_all: np.ndarray, y_all: np.ndarray, tr: np.ndarray, te: np.ndarray,
                  site: np.ndarray, site_test: np.ndarray, *, scaling: str = "site",
                  **extra: np.ndarray) -> dict[str, np.ndarray]:
    """The cached arrays of a loader: rows ``tr``/``te`` of ``X_all``
    standardised with training rows' statistics only — each site's own
    (``scaling = "site"``) or all sites' pooled (``"pooled"``) — their labels
    and sites, the source row numbers, and ``extra`` (features, site names)."""
    site, site_test = np.asarray(site), np.asarray(site_test)
    X, X_test = X_all[tr], X_all[te]
    if check_scaling(scaling) == "pooled":
        mean, std = fit_scaler(X)  # training rows only
        Z, Z_test = apply_scaler(X, mean, std), apply_scaler(X_test, mean, std)
    else:
        Z = np.zeros(X.shape, dtype=np.float32)
        Z_test = np.zeros(X_test.shape, dtype=np.float32)
        for s in np.unique(np.concatenate([site, site_test])):
            a, b = site == s, site_test == s
            mean, std = fit_scaler(X[a])  # this site's training rows only
            Z[a] = apply_scaler(X[a], mean, std)
            Z_test[b] = apply_scaler(X_test[b], mean, std)
    return {"X": Z, "y": y_all[tr], "site": site, "X_test": Z_test, "y_test": y_all[te],
            "site_test": site_test, "row": tr, "row_test": te, **extra}


def sites_from_arrays(arrays: dict[str, np.ndarray], names: list[str]) -> list[Site]:
    """Rebuild sites from the cached arrays ``X, y, site, X_test, y_test, site_test``."""
    sites = []
    for i, name in enumerate(names):
        tr, te = arrays["site"] == i, arrays["site_test"] == i
        sites.append(Site(name, Split(arrays["X"][tr], arrays["y"][tr]),
                          Split(arrays["X_test"][te], arrays["y_test"][te])))
    return sites


def sizes(sites: list[Site]) -> dict[str, str]:
    """``{site: "n (train a / test b)"}`` for ``fedmedbench datasets``."""
    return {s.name: f"{len(s.train) + len(s.test)} (train {len(s.train)} / test {len(s.test)})"
            for s in sites}


def read_csv(path: object, **kwargs: object) -> object:
    """``pandas.read_csv``, importing pandas only when a file is parsed (a
    cached load of a shipped dataset never needs it)."""
    import pandas as pd

    return pd.read_csv(path, **kwargs)
