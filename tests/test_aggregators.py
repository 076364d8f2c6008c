"""Weighted-mean aggregation on the real engine: weights by examples, quality
and client performance, recorded per round in the result's history."""

from __future__ import annotations

import numpy as np
import pytest

from fedmedbench import run_cell
from fedmedbench.matrix import parse_matrix
from fedmedbench.plugins.aggregators.weighted_mean import WeightedMean
from fedmedbench.registry import get_registry
from tests.test_algorithms import _PLUGINS, run_one


@pytest.fixture(scope="module")
def reg():
    return get_registry(extra=[_PLUGINS])


def _cells(reg, aggregators, rounds=2):
    raw = {"name": "agg", "rounds": rounds, "seeds": [0],
           "axes": {"dataset": ["test-public-toy"], "algorithm": ["fedavg"],
                    "aggregator": aggregators},
           "run": {"clients_per_round": 3}}
    return parse_matrix(raw, registry=reg).cells


def test_weights_by_examples_quality_and_supplied_scores_are_recorded(reg):
    cs = _cells(reg, ["weighted-mean", {"name": "weighted-mean", "by": "quality"},
                      {"name": "weighted-mean", "by": "quality", "power": 2.0,
                       "scores": {"s0": 1.0}}])
    recs = [run_cell(c, registry=reg) for c in cs]
    assert all(r["status"] == "ok" for r in recs)
    w = [r["history"][-1]["weights"] for r in recs]
    assert w[0] == pytest.approx({"s0": 1 / 3, "s1": 1 / 3, "s2": 1 / 3})  # equal sizes
    q = np.array([0.2, 0.5, 1.0])  # PublicToy's Site.quality
    assert list(w[1].values()) == pytest.approx(list(q / q.sum()), abs=1e-6)
    q2 = np.array([1.0, 0.5, 1.0]) ** 2  # s0 overridden by `scores`, then sharpened
    assert list(w[2].values()) == pytest.approx(list(q2 / q2.sum()), abs=1e-6)
    # different weights, different models
    assert recs[0]["history"][1]["loss"] != recs[1]["history"][1]["loss"]


def test_performance_weights_come_from_client_holdout_scores(reg):
    cell = _cells(reg, [{"name": "weighted-mean", "by": "performance", "holdout": 0.25}],
                  rounds=3)[0]
    run = run_one(reg, cell)
    # each client trained on 75% of its rows; the other 25% stayed on the client
    for i, site in enumerate(run.sites):
        assert len(run.holdout[i]) == 30 and len(site.train) == 90
    ws = [h["weights"] for h in run.history]
    for w in ws:
        assert sum(w.values()) == pytest.approx(1.0, abs=3e-6)  # three weights rounded to 1e-6
    # the weights are the clients' reported holdout accuracies, normalised
    assert any(abs(v - 1 / 3) > 1e-3 for w in ws for v in w.values())


def test_quality_fallback_computes_missing_value_rate():
    from fedmedbench import Site, Split

    X = np.ones((10, 4), dtype=np.float32)
    X[:5, 0] = np.nan  # 5 of 40 values missing
    site = Site("a", Split(X, np.zeros(10, dtype=np.int64)), Split(X[:1], np.zeros(1, np.int64)))
    agg = WeightedMean(by="quality")
    assert agg._quality(site) == pytest.approx(1 - 5 / 40)


@pytest.mark.parametrize("kw, word", [({"by": "accuracy"}, "by"), ({"holdout": 1.0}, "holdout"),
                                      ({"power": -1.0}, "power"),
                                      ({"scores": {"s0": 2.0}}, "scores")])
def test_bad_weighting_parameters(kw, word):
    with pytest.raises(ValueError, match=word):
        WeightedMean(**kw)



# --------------------------------------------------------------------------
# robust (non-linear) rules
# --------------------------------------------------------------------------


def test_robust_rules_resist_an_outlier_and_need_plaintext(reg):
    import torch

    from fedmedbench import Updates
    from fedmedbench.plugins.aggregators.robust import Krum, Median, TrimmedMean

    honest = [torch.tensor([1.0, 2.0, 3.0]) + 0.01 * k for k in range(4)]
    rows = torch.stack([*honest, torch.full((3,), 1e3)])
    ups = Updates(clients=list(range(5)), delta=rows, num_examples=[10] * 5)
    mean = WeightedMean().aggregate(ups)
    assert float(mean.max()) > 100  # the mean is dragged off by one attacker
    for agg in (Median(), TrimmedMean(trim=0.2), Krum(f=1), Krum(f=1, multi=3)):
        out = agg.aggregate(ups)
        torch.testing.assert_close(out, torch.tensor([1.015, 2.015, 3.015]), atol=0.02, rtol=0)
    first4 = ups.rows(range(4))
    torch.testing.assert_close(Median().aggregate(first4), torch.tensor([1.015, 2.015, 3.015]))
    assert TrimmedMean(trim=0.0).aggregate(first4).tolist() == pytest.approx([1.015, 2.015, 3.015])

    # on the engine: runs in plaintext, records no weights (the rule has none)
    raw = {"name": "rob", "rounds": 2, "seeds": [0],
           "axes": {"dataset": ["test-public-toy"], "algorithm": ["fedavg"],
                    "aggregator": ["median", {"name": "krum", "f": 0}]},
           "run": {"clients_per_round": 3}}
    for c in parse_matrix(raw, registry=reg).cells:
        rec = run_cell(c, registry=reg)
        assert rec["status"] == "ok" and "weights" not in rec["history"][-1]
    if "secagg" in reg.names("privacy"):
        raw["axes"]["privacy"] = [["secagg"]]
        for c in parse_matrix(raw, registry=reg).cells:
            rec = run_cell(c, registry=reg)
            assert rec["status"] == "skipped" and "non-linear" in rec["error"]["message"]
