"""Utility metrics.

- ``accuracy``: fraction correct; the default for balanced labels.
- ``balanced_accuracy``: mean per-class recall over the classes present in
  ``y_true``; for skewed labels.
- ``auroc``: area under the ROC curve of the positive-class score (binary) or
  one-vs-rest macro average (multiclass); for rare outcomes such as mortality,
  where accuracy rewards predicting "survives" for everyone.

AUROC is scikit-learn's. Accuracy and balanced accuracy are computed with
numpy, exactly as scikit-learn's ``accuracy_score`` and
``balanced_accuracy_score`` define them (tests/test_engine.py checks the two
agree): a cell scores every site every round, and scikit-learn's input
validation costs about 4 ms a call, which at 100 sites is most of a round.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "auroc")


def score(metric: str, y_true: np.ndarray, proba: np.ndarray) -> float:
    """Score class probabilities ``proba`` (n × classes) against labels."""
    from sklearn import metrics as skm

    pred = proba.argmax(1)
    y_true = np.asarray(y_true)
    if metric == "accuracy":
        return float(np.mean(pred == y_true)) if len(y_true) else float("nan")
    if metric == "balanced_accuracy":
        # the recall of each class present in y_true, averaged (a single-class split is
        # scored as the recall of that class, as scikit-learn does after its warning)
        classes, inv = np.unique(y_true, return_inverse=True)
        if not len(classes):
            return float("nan")
        hits = np.bincount(inv, weights=(pred == y_true), minlength=len(classes))
        return float(np.mean(hits / np.bincount(inv, minlength=len(classes))))
    if metric == "auroc":
        if len(np.unique(y_true)) < 2:
            return float("nan")  # undefined on a single-class split
        if proba.shape[1] == 2:
            return float(skm.roc_auc_score(y_true, proba[:, 1]))
        return float(skm.roc_auc_score(y_true, proba, multi_class="ovr",
                                       labels=list(range(proba.shape[1]))))
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def score_sites(metric: str, y_true: np.ndarray, proba: np.ndarray,
                site: np.ndarray | None = None, *, offsets: np.ndarray | None = None,
                n_sites: int | None = None) -> np.ndarray:
    """Every site's :func:`score` in one pass over the pooled rows.

    Parameters
    ----------
    metric : {"accuracy", "balanced_accuracy", "auroc"}
    y_true : (n,) labels; proba : (n, classes) class probabilities.
    site : (n,) int, optional
        The site (0 .. n_sites - 1) of each row, in any order.
    offsets : (n_sites + 1,) int, optional
        Instead of ``site``: rows ``offsets[s]:offsets[s + 1]`` belong to
        site ``s`` (rows grouped by site).
    n_sites : int, optional
        Number of sites (default: ``max(site) + 1``, or ``len(offsets) - 1``).

    Returns
    -------
    (n_sites,) float64: ``score(metric, y_true[rows], proba[rows])`` of each
    site, NaN where :func:`score` gives NaN (no rows; AUROC of a site with a
    single class, or, for several classes, a class missing from the site).
    AUROC is the Mann-Whitney statistic from one sort per class column and
    rank sums, ties given their average rank (the area scikit-learn's
    ``roc_auc_score`` computes by trapezoids), one-vs-rest macro average for
    more than two classes.
    """
    y_true, proba = np.asarray(y_true), np.asarray(proba)
    n = len(y_true)
    if proba.ndim != 2 or len(proba) != n:
        raise ValueError(f"proba has shape {proba.shape}; expected ({n}, classes)")
    site, S = _site_index(n, site, offsets, n_sites)
    rows = np.bincount(site, minlength=S).astype(float)
    if metric == "accuracy":
        hits = np.bincount(site, weights=proba.argmax(1) == y_true, minlength=S)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(rows > 0, hits / rows, np.nan)
    if metric == "balanced_accuracy":
        classes, code = np.unique(y_true, return_inverse=True)
        K = max(len(classes), 1)
        cell = site * K + code
        counts = np.bincount(cell, minlength=S * K).reshape(S, K)
        hits = np.bincount(cell, weights=proba.argmax(1) == y_true,
                           minlength=S * K).reshape(S, K)
        present = counts > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(present, hits / np.maximum(counts, 1), 0.0)
            return np.where(present.any(1), recall.sum(1) / present.sum(1), np.nan)
    if metric == "auroc":
        if proba.shape[1] == 2:
            # scikit-learn's binary case: the larger of a site's two labels is positive
            return _auroc_sites(_larger_label(y_true, site, S), proba[:, 1], site, S)
        if not np.allclose(1, proba.sum(axis=1)):
            raise ValueError("Target scores need to be probabilities for multiclass roc_auc, "
                             "i.e. they should sum up to 1.0 over classes")
        per = np.stack([_auroc_sites(y_true == c, proba[:, c], site, S)
                        for c in range(proba.shape[1])], axis=1)
        out = per.mean(axis=1)
        # score(): NaN for a site with a single class, the macro mean otherwise
        return np.where(_n_classes(y_true, site, S) >= 2, out, np.nan)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def _site_index(n: int, site: np.ndarray | None, offsets: np.ndarray | None,
                n_sites: int | None) -> tuple[np.ndarray, int]:
    """The site of each row as an int array, and the number of sites."""
    if (site is None) == (offsets is None):
        raise ValueError("give the rows' sites either as site= (one per row) or as offsets=")
    if offsets is not None:
        off = np.asarray(offsets, dtype=np.int64)
        if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != n or (np.diff(off) < 0).any():
            raise ValueError(f"offsets must rise from 0 to the number of rows ({n})")
        S = len(off) - 1 if n_sites is None else int(n_sites)
        if S != len(off) - 1:
            raise ValueError(f"n_sites={n_sites} but offsets describe {len(off) - 1} sites")
        return np.repeat(np.arange(S), np.diff(off)), S
    idx = np.asarray(site)
    if idx.shape != (n,) or (n and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"site must be ({n},) integers, got {idx.shape} {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    S = (int(idx.max()) + 1 if n else 0) if n_sites is None else int(n_sites)
    if n and (idx.min() < 0 or idx.max() >= S):
        raise ValueError(f"site indices must lie in [0, {S})")
    return idx, S


def _n_classes(y: np.ndarray, site: np.ndarray, S: int) -> np.ndarray:
    """Distinct labels per site."""
    _, code = np.unique(y, return_inverse=True)
    K = int(code.max()) + 1 if len(code) else 1
    return (np.bincount(site * K + code, minlength=S * K).reshape(S, K) > 0).sum(1)


def _auroc_sites(pos: np.ndarray, score_: np.ndarray, site: np.ndarray, S: int) -> np.ndarray:
    """Per-site AUROC of scores ``score_`` for the positives ``pos``: one
    sort by (site, score), average ranks of ties, U / (n_pos · n_neg)."""
    if np.isnan(score_).any():
        raise ValueError("Input contains NaN.")
    order = np.lexsort((score_, site))
    s, v, p = site[order], score_[order], pos[order].astype(float)
    n = len(s)
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = (s[1:] != s[:-1]) | (v[1:] != v[:-1])
    start = np.flatnonzero(new)  # first position of each tie group
    end = np.append(start[1:], n)  # one past its last
    gid = np.cumsum(new) - 1
    site_start = np.searchsorted(s, np.arange(S))
    # average 1-based rank within the site: mean of the group's positions
    rank = (start + end - 1)[gid] / 2.0 - site_start[s] + 1.0
    r_pos = np.bincount(s, weights=rank * p, minlength=S)
    n_pos = np.bincount(s, weights=p, minlength=S)
    n_all = np.bincount(s, minlength=S).astype(float)
    n_neg = n_all - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _larger_label(y: np.ndarray, site: np.ndarray, S: int) -> np.ndarray:
    """Rows carrying their site's largest label (scikit-learn's positive class
    of a binary ``y_true``)."""
    top = np.full(S, -np.inf)
    np.maximum.at(top, site, y.astype(float))
    return y.astype(float) == top[site]


# --------------------------------------------------------------------------
# how sure a score is: standard errors, intervals, the test against chance
# --------------------------------------------------------------------------


def _auroc_se(y: np.ndarray, s: np.ndarray) -> float:
    """DeLong's standard error of the binary AUROC of scores ``s`` (mid-ranks
    for ties; DeLong, DeLong, Clarke-Pearson 1988, the Sun & Xu 2014 form)."""
    from scipy.stats import rankdata

    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        return float("nan")
    r_all = rankdata(np.concatenate([pos, neg]))
    r_pos, r_neg = rankdata(pos), rankdata(neg)
    v10 = (r_all[:m] - r_pos) / n           # each positive's share of negatives below it
    v01 = 1.0 - (r_all[m:] - r_neg) / m     # each negative's share of positives above it
    return float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))


def standard_error(metric: str, y_true: np.ndarray, proba: np.ndarray) -> float:
    """The standard error of ``score(metric, y_true, proba)`` over test rows:
    binomial for accuracy, the per-class binomials for balanced accuracy
    (their mean's variance, classes independent), DeLong for AUROC (the
    one-vs-rest classes' variances averaged for several classes)."""
    y, p = np.asarray(y_true), np.asarray(proba)
    n = len(y)
    if n == 0:
        return float("nan")
    pred = p.argmax(1)
    if metric == "accuracy":
        a = float(np.mean(pred == y))
        return float(np.sqrt(a * (1 - a) / n))
    if metric == "balanced_accuracy":
        classes = np.unique(y)
        var = 0.0
        for c in classes:
            r = float(np.mean(pred[y == c] == c))
            var += r * (1 - r) / max(1, int((y == c).sum()))
        return float(np.sqrt(var) / len(classes))
    if metric == "auroc":
        if p.shape[1] == 2:
            return _auroc_se((y == 1).astype(int), p[:, 1])
        ses = [_auroc_se((y == c).astype(int), p[:, c]) for c in range(p.shape[1])]
        return float(np.sqrt(np.nanmean(np.square(ses))) / np.sqrt(p.shape[1]))
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def beats_chance(metric: str, y_true: np.ndarray, proba: np.ndarray, baseline: float
                 ) -> dict[str, Any]:
    """Is the score above ``baseline`` beyond the test rows' sampling noise?

    One-sided: an exact binomial test for accuracy (k correct of n against
    the baseline rate), a normal test with :func:`standard_error` otherwise.
    Returns ``{"p_value", "ci95": [lo, hi], "se", "at_chance"}`` where
    ``at_chance`` is ``p_value >= 0.05`` (``None`` when undefined)."""
    return beats_chance_many(metric, [(y_true, proba, baseline)])[0]


def beats_chance_many(metric: str, items: list[tuple[np.ndarray, np.ndarray, float]]
                      ) -> list[dict[str, Any]]:
    """:func:`beats_chance` of each ``(y_true, proba, baseline)`` (one per
    site), the tail probabilities in one SciPy call: the same numbers as a
    call per site, without SciPy's ~40 µs per call per site."""
    from scipy.stats import binom, norm

    n_rows = np.asarray([len(y) for y, _, _ in items], dtype=np.int64)
    if metric == "accuracy":
        # every site's score in one score_sites pass: est = k / n, the same division as
        # score(), and its binomial standard error, the same operations as standard_error()
        rows = [(np.asarray(y), np.asarray(p)) for y, p, _ in items if len(y)]
        if rows:
            est = score_sites(metric, np.concatenate([y for y, _ in rows]),
                              np.concatenate([p for _, p in rows]),
                              offsets=np.concatenate([[0], np.cumsum(n_rows)]))
        else:
            est = np.full(len(items), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            se = np.sqrt(est * (1 - est) / n_rows)
        hits = np.rint(np.nan_to_num(est) * n_rows).astype(np.int64)
    else:
        pairs = [(score(metric, np.asarray(y), np.asarray(p)),
                  standard_error(metric, np.asarray(y), np.asarray(p))) for y, p, _ in items]
        est = np.asarray([e for e, _ in pairs], dtype=float).reshape(-1)
        se = np.asarray([v for _, v in pairs], dtype=float).reshape(-1)
    # every site at once, element by element the double-precision operations of a
    # site-by-site loop (the same numbers), the tail probabilities in one SciPy call
    base = np.asarray([b for _, _, b in items], dtype=float).reshape(-1)
    valid = np.isfinite(est) & np.isfinite(base)
    se_ok = np.isfinite(se)
    pval = np.full(len(items), np.nan)
    if metric == "accuracy":
        ix = np.flatnonzero(valid)
        if len(ix):  # k correct of n against the baseline rate: P(K >= k) = sf(k - 1)
            pval[ix] = np.atleast_1d(binom.sf(hits[ix] - 1, n_rows[ix],
                                              np.minimum(np.maximum(base[ix], 0.0), 1.0)))
    else:
        with np.errstate(invalid="ignore"):
            z_ok = valid & se_ok & (se > 0)
        ix = np.flatnonzero(z_ok)
        if len(ix):
            pval[ix] = np.atleast_1d(norm.sf((est[ix] - base[ix]) / se[ix]))
        rest = valid & ~z_ok
        pval[rest] = np.where(est[rest] > base[rest], 0.0, 1.0)
    half = 1.959964 * se
    lo, hi = (est - half).tolist(), (est + half).tolist()
    out: list[dict[str, Any]] = []
    for ok, p, s_ok, s_, lo_, hi_ in zip(valid.tolist(), pval.tolist(), se_ok.tolist(),
                                         se.tolist(), lo, hi):
        if not ok:
            out.append({"p_value": None, "ci95": None, "se": None, "at_chance": None})
            continue
        out.append({"p_value": p, "ci95": [lo_, hi_] if s_ok else None,
                    "se": s_ if s_ok else None, "at_chance": bool(p >= 0.05)})
    return out
