"""Numbers a reader can trust: a validation split carved from each site's
training rows (never trained on, scored for tuning, used by performance
weighting), the per-component rounds of a matrix, and chance-level cells
flagged with the majority-class baseline."""

from __future__ import annotations

import numpy as np
import pytest

from fedmedbench import run_cell
from fedmedbench.errors import ConfigError
from fedmedbench.federation import validation_rows
from fedmedbench.matrix import parse_matrix


def _cells(axes: dict, run: dict, *, rounds: int = 2, attacks: list | None = None,
           extra: dict | None = None) -> list[dict]:
    raw = {"name": "v", "rounds": rounds, "seeds": [0], "axes": axes, "run": run,
           **({"evaluate": {"attacks": attacks}} if attacks else {}), **(extra or {})}
    return parse_matrix(raw).cells


def test_validation_rows_are_carved_from_training_and_never_trained_on():
    axes = {"dataset": ["heart-disease"],
            "algorithm": ["fedavg", "centralized", "local"]}
    for cell in _cells(axes, {"validation": 0.1}):
        rec, run = run_cell(cell, keep_run=True)
        assert rec["status"] == "ok", rec["error"]
        u = rec["metrics"]["utility"]
        val = u["validation"]
        assert set(val["per_site"]) == set(u["per_site"]) and val["metric"] == "accuracy"
        sites = run.data.sites
        held = run.federation.validation
        for i, s in enumerate(sites):
            k = int(round(0.1 * len(s.train)))
            assert len(held[i]) == k
            v_idx, t_idx = validation_rows(0, i, len(s.train), 0.1)
            np.testing.assert_array_equal(held[i].X, s.train.X[v_idx])
        trained = np.concatenate([c.train.X for c in run.federation.clients])
        assert len(trained) == sum(len(s.train) for s in sites) - sum(map(len, held.values()))
        seen = {r.tobytes() for r in trained}
        assert not any(r.tobytes() in seen for v in held.values() for r in v.X)
        # the test split is untouched: reported as before
        assert set(u["per_site"]) == {s.name for s in sites}
        # attacks score as members only the rows trained on
        members = run.attack_context().data
        assert [len(s.train) for s in members.sites] == [
            len(s.train) - len(held[i]) for i, s in enumerate(sites)]
    # without the setting nothing is carved and no validation number is reported
    rec = run_cell(_cells({"dataset": ["heart-disease"], "algorithm": ["fedavg"]}, {})[0])
    assert "validation" not in rec["metrics"]["utility"]


def test_performance_weighting_scores_on_the_validation_split():
    axes = {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
            "aggregator": [{"name": "weighted-mean", "by": "performance"}]}
    rec, run = run_cell(_cells(axes, {"validation": 0.2})[0], keep_run=True)
    assert rec["status"] == "ok", rec["error"]
    assert run.federation.holdout == run.federation.validation  # no second carve
    sizes = [len(s.train) for s in run.data.sites]
    assert [len(c.train) for c in run.federation.clients] == [
        n - int(round(0.2 * n)) for n in sizes]
    assert rec["history"][0]["weights"]  # the round's performance weights


def test_validation_is_a_range_checked_run_setting():
    with pytest.raises(ConfigError, match="validation"):
        _cells({"dataset": ["heart-disease"], "algorithm": ["fedavg"]}, {"validation": 1.0})


def test_a_component_may_run_its_own_number_of_rounds():
    axes = {"dataset": ["heart-disease"], "algorithm": ["centralized", "fedavg"]}
    cells = _cells(axes, {"centralized": {"rounds": 1, "local_steps": 40}}, rounds=3)
    rounds = {c["labels"]["algorithm"]: c["config"]["rounds"] for c in cells}
    assert rounds == {"centralized": 1, "fedavg": 3}
    rec = run_cell([c for c in cells if c["labels"]["algorithm"] == "centralized"][0])
    assert [h["round"] for h in rec["history"]] == [1] and rec["history"][0]["steps"] == 160
    with pytest.raises(ConfigError, match="rounds = 0"):
        _cells(axes, {"centralized": {"rounds": 0}})


def test_chance_level_cells_are_flagged_and_their_attacks_say_so():
    """A model that cannot learn (lr tiny, one step) stays at the majority-class
    rate of the pooled test split: the record says so, and so does each attack."""
    axes = {"dataset": ["heart-disease"], "algorithm": ["fedavg"]}
    ok, bad = [run_cell(c) for c in (
        _cells(axes, {}, rounds=5)[0],
        _cells(axes, {"lr": 1e-9, "local_steps": 1}, rounds=1, attacks=["mia-loss"])[0])]
    y = np.concatenate([s.test.y for s in __import__(
        "fedmedbench.plugins.datasets.heart_disease", fromlist=["x"]).HeartDisease()
        .load(seed=0).sites])
    majority = max(np.mean(y == 0), np.mean(y == 1))
    for rec in (ok, bad):
        assert rec["metrics"]["utility"]["majority_baseline"] == pytest.approx(majority)
    assert ok["metrics"]["utility"]["chance_level"] is False
    u = bad["metrics"]["utility"]
    assert u["global"] <= u["majority_baseline"] and u["chance_level"] is True
    res = bad["metrics"]["attacks"]["mia-loss"]
    assert res["model_learned"] is False and "did not learn" in res["chance_note"]
    # a balanced metric's baseline is 0.5 whatever the labels
    axes = {"dataset": [{"name": "synthetic-imaging", "n_per_site": 16}], "algorithm": ["fedavg"]}
    rec = run_cell(_cells(axes, {"local_steps": 1}, rounds=1)[0])
    assert rec["metrics"]["utility"]["majority_baseline"] == pytest.approx(0.5)
