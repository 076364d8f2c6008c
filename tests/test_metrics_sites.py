"""score_sites: every site's score in one pass, against score() site by site
and against scikit-learn's roc_auc_score (to 1e-12)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedmedbench.metrics import METRICS, score, score_sites


def _pooled(n_sites=40, classes=2, seed=0, ties=False, empty=(), single=()):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 30, n_sites)
    for s in empty:
        sizes[s] = 0
    site = np.repeat(np.arange(n_sites), sizes)
    n = len(site)
    y = rng.integers(0, classes, n)
    for s in single:
        y[site == s] = 1
    logits = rng.normal(size=(n, classes)) + 0.8 * np.eye(classes)[y]
    if ties:  # few distinct values: many ties within a site
        logits = np.round(logits * 2) / 2
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    perm = rng.permutation(n)  # rows in any order
    return y[perm], proba[perm], site[perm], n_sites


def _loop(metric, y, proba, site, n_sites):
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(n_sites):
            m = site == s
            out.append(score(metric, y[m], proba[m]))
    return np.array(out)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("ties", [False, True])
def test_score_sites_equals_score_per_site(metric, classes, ties):
    y, proba, site, S = _pooled(classes=classes, ties=ties, empty=(3,), single=(5, 7))
    got = score_sites(metric, y, proba, site, n_sites=S)
    ref = _loop(metric, y, proba, site, S)
    assert got.shape == (S,) and got.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-12, atol=0)
    assert np.isnan(got[3])  # no rows
    if metric == "auroc":
        assert np.isnan(got[5]) and np.isnan(got[7])  # one class


def test_binary_auroc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    S = 200
    site = rng.integers(0, S, 6000)
    y = rng.integers(0, 2, 6000)
    p1 = np.round(rng.random(6000) * 8) / 8  # heavy ties
    p1[::7] = 0.5
    proba = np.stack([1 - p1, p1], axis=1)
    got = score_sites("auroc", y, proba, site, n_sites=S)
    for s in range(S):
        m = site == s
        if len(np.unique(y[m])) == 2:
            assert abs(got[s] - roc_auc_score(y[m], p1[m])) <= 1e-12
        else:
            assert np.isnan(got[s])


def test_offsets_give_the_same_scores_as_site_indices():
    y, proba, site, S = _pooled(classes=3)
    order = np.argsort(site, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(site, minlength=S))])
    for metric in METRICS:
        a = score_sites(metric, y, proba, site, n_sites=S)
        b = score_sites(metric, y[order], proba[order], offsets=offsets)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


def test_trailing_sites_without_rows_are_nan():
    y, proba, site, S = _pooled(n_sites=5)
    got = score_sites("accuracy", y, proba, site, n_sites=S + 2)
    assert got.shape == (S + 2,) and np.isnan(got[-2:]).all() and not np.isnan(got[:S]).any()


def test_multiclass_auroc_refuses_scores_that_are_not_probabilities():
    y, proba, site, S = _pooled(classes=3)
    with pytest.raises(ValueError, match="sum up to 1.0"):
        score_sites("auroc", y, proba * 2, site)
    with pytest.raises(ValueError, match="sum up to 1.0"):
        score("auroc", y, proba * 2)


def test_bad_arguments_are_refused():
    y, proba, site, S = _pooled(n_sites=3)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        score_sites("f1", y, proba, site)
    with pytest.raises(ValueError, match="either as site="):
        score_sites("accuracy", y, proba)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        score_sites("accuracy", y, proba, site, n_sites=2)
    with pytest.raises(ValueError, match="offsets must rise"):
        score_sites("accuracy", y, proba, offsets=[0, 5, 3, len(y)])
    with pytest.raises(ValueError, match="shape"):
        score_sites("accuracy", y, proba[:-1], site)


def test_no_rows_at_all():
    got = score_sites("auroc", np.zeros(0, int), np.zeros((0, 2)), np.zeros(0, int), n_sites=3)
    assert got.shape == (3,) and np.isnan(got).all()


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "auroc"])
def test_chance_tests_of_many_sites_equal_one_site_at_a_time(metric):
    """beats_chance_many (every site's tail probability in one SciPy call)
    gives each site exactly what beats_chance gives it alone, and the
    accuracy test is scipy's exact binomial tail."""
    from scipy.stats import binom

    from fedmedbench.metrics import beats_chance, beats_chance_many, score

    rng = np.random.default_rng(7)
    items = []
    for i in range(40):
        n = int(rng.integers(1, 50)) if i % 13 else 0  # and sites without test rows
        y = rng.integers(0, 2, n) if i % 7 else np.zeros(n, dtype=int)  # single-class sites
        p = rng.random((n, 2))
        items.append((y, p / p.sum(1, keepdims=True),
                      float(rng.random()) if i % 11 else float("nan")))
    many = beats_chance_many(metric, items)
    assert many == [beats_chance(metric, *it) for it in items]
    for (y, p, _), r in zip(items, many):  # the interval is around the site's own score
        if r["ci95"] is not None:
            assert sum(r["ci95"]) / 2 == pytest.approx(score(metric, y, p), abs=1e-12)
    assert any(r["p_value"] is None for r in many) and any(r["at_chance"] for r in many)
    assert any(r["at_chance"] is False for r in many)
    if metric == "accuracy":
        for (y, p, b), r in zip(items, many):
            if r["p_value"] is not None:
                k = int(np.sum(p.argmax(1) == y))
                assert r["p_value"] == float(binom.sf(k - 1, len(y), min(max(b, 0.0), 1.0)))


def test_the_majority_baseline_is_the_best_constant_scored_as_any_prediction():
    """chance()'s best constant prediction (for accuracy: the share of each
    label from one bincount) is exactly what score() gives each constant."""
    from fedmedbench import FederatedData, Site, Split, Task
    from fedmedbench.engine import chance
    from fedmedbench.metrics import score

    rng = np.random.default_rng(3)
    for metric, C in (("accuracy", 4), ("accuracy", 7), ("balanced_accuracy", 3)):
        sites = []
        for i in range(5):
            y_te = rng.choice([0, 2, 3], size=int(rng.integers(1, 30)))  # class 1 never tested
            y_tr = rng.integers(0, C, 20)
            sites.append(Site(f"s{i}", Split(np.zeros((20, 2), np.float32), y_tr),
                              Split(np.zeros((len(y_te), 2), np.float32), y_te)))
        data = FederatedData(task=Task(kind="multiclass", num_classes=C, input_shape=(2,),
                                       metric=metric), sites=sites)
        y = np.concatenate([s.test.y for s in sites])
        want = max(score(metric, y, np.eye(C)[np.full(len(y), c)]) for c in range(C))
        got = chance(data, {"global": 0.5})["majority_baseline"]
        assert got == want and isinstance(got, float), (metric, got, want)
