"""The one-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

- the p-value and ε search reproduce the paper's Appendix D numbers;
- the engine inserts exactly the included canaries (each with probability
  1/2, from the cell seed) into their sites' training data before round 1,
  and hands them, with the bits, to the attack;
- without DP, on a model that memorises, the bound is clearly above 0;
- under DP-SGD it never exceeds the claimed ε over repeated runs (slow).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmedbench import Dataset, FederatedData, Site, Split, Task, hookimpl, run_cell
from fedmedbench.matrix import parse_matrix
from fedmedbench.plugins.attacks.audit import (
    epsilon_lower_bound,
    guess_counts,
    p_value,
    score_guesses,
)
from fedmedbench.registry import get_registry


class Memorise(Dataset):
    """Test-only: 2 sites of 250 noisy rows in 40 dimensions, an MLP that memorises."""

    name = "test-memorise"
    run_defaults = {"batch_size": 50, "lr": 0.2, "local_steps": 50}

    def __init__(self) -> None:
        pass

    def load(self, *, seed: int) -> FederatedData:
        rng = np.random.default_rng(5)
        X = rng.normal(size=(1000, 40)).astype(np.float32)
        w = rng.normal(size=40)
        y = (X @ w / np.sqrt(40) + rng.normal(size=1000) > 0).astype(np.int64)
        task = Task(kind="binary", num_classes=2, input_shape=(40,), model="mlp",
                    model_kwargs={"hidden": [128]})
        return FederatedData(task=task, sites=[
            Site("a", Split(X[:250], y[:250]), Split(X[500:750], y[500:750])),
            Site("b", Split(X[250:500], y[250:500]), Split(X[750:], y[750:]))])


class _Plugin:
    @hookimpl
    def register_datasets(self, register):
        register(Memorise)


@pytest.fixture(scope="module")
def reg():
    return get_registry(extra=[_Plugin()])


def cells(reg, privacy: list, *, seeds: list[int], rounds: int = 8, m: int = 200) -> list[dict]:
    raw = {"name": "audit", "rounds": rounds, "seeds": seeds,
           "axes": {"dataset": ["test-memorise"], "algorithm": ["fedavg"], "privacy": privacy},
           "evaluate": {"attacks": [{"name": "audit-canary", "m": m}]}}
    return parse_matrix(raw, registry=reg).cells


# --------------------------------------------------------------------------
# the statistics (values from the paper's Appendix D code)
# --------------------------------------------------------------------------


def test_p_value_and_bound_reproduce_the_papers_numbers():
    assert p_value(100, 100, 75, math.log(3), 0.0) == pytest.approx(0.55347, abs=1e-5)
    for (m, r, v, delta), want in [((100, 100, 75, 0.0), 0.70221), ((100, 100, 75, 1e-4), 0.69947),
                                   ((1000, 100, 75, 1e-4), 0.67298),
                                   ((100000, 1510, 1439, 1e-5), 2.67585)]:
        assert epsilon_lower_bound(m, r, v, delta, 0.05) == pytest.approx(want, abs=2e-5)
    # all r guesses right, δ = 0: the closed form logit(β^(1/r))
    for r in (16, 50, 100):
        assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(
            -math.log(0.05 ** (-1 / r) - 1), abs=1e-7)
    # the ceilings with m canaries: no audit here can say more than this
    assert epsilon_lower_bound(100, 100, 100, 1e-5) == pytest.approx(3.49, abs=0.01)
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-5) == pytest.approx(5.78, abs=0.01)
    # chance-level guessing proves nothing, and more δ never raises the bound
    assert epsilon_lower_bound(200, 200, 100, 1e-5) == 0.0
    assert epsilon_lower_bound(200, 100, 90, 1e-3) < epsilon_lower_bound(200, 100, 90, 0.0)


def test_guesses_are_the_top_and_bottom_scores():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, True, False, True, False, False])
    assert score_guesses(scores, included, 2, 2) == (4, 4)  # top 2 in, bottom 2 out
    assert score_guesses(scores, included, 3, 0) == (3, 2)
    assert score_guesses(scores, included, 3, 3) == (6, 4)
    assert guess_counts(200, [0.1, 0.5, 1.0]) == [(10, 10), (50, 50), (100, 100)]


# --------------------------------------------------------------------------
# through the engine
# --------------------------------------------------------------------------


def test_engine_inserts_exactly_the_included_canaries(reg):
    (cell,) = cells(reg, ["none"], seeds=[0], rounds=1, m=100)
    rec, run = run_cell(cell, registry=reg, keep_run=True)
    assert rec["status"] == "ok", rec["error"]
    can = run.canaries
    assert len(can) == 100 and can.included.dtype == bool
    summary = rec["metrics"]["canaries"]
    assert summary["m"] == 100 and summary["included"] == int(can.included.sum())
    assert 30 <= summary["included"] <= 70  # Binomial(100, 1/2)
    for i, site in enumerate(run.data.sites):
        trained = run.federation.clients[i].train
        mine = can.included & (can.site == i)
        assert len(trained) == len(site.train) + int(mine.sum())
        np.testing.assert_array_equal(trained.X[len(site.train):], can.X[mine])
        np.testing.assert_array_equal(trained.y[len(site.train):], can.y[mine])
        assert summary["per_site"][site.name] == int(mine.sum())
    # the bits come from the cell seed: the same cell draws the same canaries and bits
    rec2, run2 = run_cell(cell, registry=reg, keep_run=True)
    np.testing.assert_array_equal(run2.canaries.included, can.included)
    np.testing.assert_array_equal(run2.canaries.X, can.X)
    res = rec["metrics"]["attacks"]["audit-canary"]
    assert res["label"] == "audited ε (lower bound, 95%)" and res["canaries"] == 100
    assert res["correction"].startswith("Bonferroni over 4 declared guess counts")
    # a cell without an auditing attack trains on its own data only
    plain = parse_matrix({"name": "p", "rounds": 1, "seeds": [0],
                          "axes": {"dataset": ["test-memorise"], "algorithm": ["fedavg"]}},
                         registry=reg).cells[0]
    rec3, run3 = run_cell(plain, registry=reg, keep_run=True)
    assert "canaries" not in rec3["metrics"] and run3.canaries is None
    assert [len(c.train) for c in run3.federation.clients] == [250, 250]


def test_without_dp_a_memorising_model_has_a_bound_clearly_above_zero(reg):
    (cell,) = cells(reg, ["none"], seeds=[0])
    rec = run_cell(cell, registry=reg)
    assert rec["status"] == "ok", rec["error"]
    res = rec["metrics"]["attacks"]["audit-canary"]
    assert res["claimed_epsilon"] is None and "within_claim" not in res
    assert res["canary_auc"] > 0.7
    assert res["audited_epsilon"] > 1.0, res
    assert res["audited_epsilon"] <= res["ceiling"]
    best = max(res["grid"], key=lambda g: g["epsilon_lower_bound"])
    assert best["epsilon_lower_bound"] == res["audited_epsilon"]
    assert epsilon_lower_bound(res["canaries"], best["guesses"], best["correct"], res["delta"],
                               0.05 / len(res["grid"])) == res["audited_epsilon"]


@pytest.mark.slow
def test_under_dp_sgd_the_bound_never_exceeds_the_claim(reg):
    """Five seeds of a DP-SGD cell (ε = 1 per site, Opacus RDP): every audited
    ε stays at or below the claimed ε (a violation would be a bug in the
    accountant or in the audit); the same cells without DP exceed it."""
    dp = cells(reg, [{"name": "dp-sgd", "epsilon": 1.0}], seeds=[0, 1, 2, 3, 4])
    for cell in dp:
        rec = run_cell(cell, registry=reg)
        assert rec["status"] == "ok", rec["error"]
        res = rec["metrics"]["attacks"]["audit-canary"]
        claim = rec["metrics"]["privacy"]
        assert claim["unit"] == "record" and 0 < claim["epsilon"] <= 1.0 + 1e-6
        assert res["claimed_epsilon"] == claim["epsilon"] and res["delta"] == claim["delta"]
        assert res["audited_epsilon"] <= claim["epsilon"], (cell["config"]["seed"], res)
        assert res["within_claim"] is True


# --------------------------------------------------------------------------
# an audit that can fail (issue 19): white-box Dirac canaries in DP-SGD
# --------------------------------------------------------------------------


@pytest.fixture
def wrong_accountant(monkeypatch: pytest.MonkeyPatch):
    """The registry with tests/fmb_test_plugins.py's broken accountant."""
    from pathlib import Path

    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_test_plugins")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    reg = get_registry(refresh=True)
    yield reg
    monkeypatch.delenv("FEDMEDBENCH_PLUGINS")
    get_registry(refresh=True)


def _dirac_cell(reg, privacy: dict, seed: int, backend: str) -> dict:
    raw = {"name": "audit", "rounds": 10, "seeds": [seed],
           "axes": {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
                    "privacy": [privacy], "model": [{"name": "mlp", "hidden": [128]}]},
           "run": {"local_steps": 20, "batch_size": 64, "lr": 0.1},
           "evaluate": {"attacks": [{"name": "audit-dirac", "m": 1000}]}}
    return {**parse_matrix(raw, registry=reg).cells[0], "backend": backend}


@pytest.mark.parametrize("seed,backend", [(0, "loop"), (1, "vectorized"), (2, "loop")])
def test_the_dirac_audit_flags_a_wrong_accountant_and_not_a_right_one(wrong_accountant, seed,
                                                                      backend):
    """A broken accountant records ε = 1 while its σ gives ε = 50: the one-run
    audit with gradient-space canaries certifies more than 1 and flags the
    claim; the right accountant at ε = 1 is not flagged. Both cells run the
    same model, data and steps; the audit's power (its ceiling) is above the
    claim, so it could have caught it."""
    reg = wrong_accountant
    recs = {}
    for name, priv in (("right", {"name": "dp-sgd", "epsilon": 1.0}),
                       ("wrong", {"name": "test-dp-sgd-wrong-accountant"})):
        rec = run_cell(_dirac_cell(reg, priv, seed, backend), registry=reg)
        assert rec["status"] == "ok", rec["error"]
        recs[name] = rec
    for name, rec in recs.items():
        a = rec["metrics"]["attacks"]["audit-dirac"]
        claim = rec["metrics"]["privacy"]["epsilon"]
        assert claim == pytest.approx(1.0, abs=0.01)
        assert a["ceiling"] > 3 and a["no_power"] is False and "certifies at most" in a["power"]
        assert rec["metrics"]["canaries"]["kind"] == "gradients"
        assert rec["metrics"]["canaries"]["m"] == 1000
        if name == "wrong":
            assert a["audited_epsilon"] > claim and a["contradicts_claim"] is True, a
        else:
            assert a["audited_epsilon"] <= claim and a["within_claim"] is True, a


def test_the_dirac_audit_is_not_applicable_without_dp_sgd():
    reg = get_registry()
    rec = run_cell(_dirac_cell(reg, {"name": "dp-fedavg", "noise_multiplier": 1.0}, 0, "loop")
                   | {}, registry=reg)
    assert rec["status"] == "ok", rec["error"]
    a = rec["metrics"]["attacks"]["audit-dirac"]
    assert "not_applicable" in a and "local-stage" in a["not_applicable"]
    assert "not_inserted" in rec["metrics"]["canaries"]


def _client_audit_cell(reg, privacy: dict, seed: int) -> dict:
    raw = {"name": "audit", "rounds": 10, "seeds": [seed],
           "axes": {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
                    "privacy": [privacy], "model": [{"name": "mlp", "hidden": [128]}],
                    "aggregator": [{"name": "weighted-mean", "by": "uniform"}]},
           "run": {"local_steps": 10, "clients_per_round": 1.0},
           "evaluate": {"attacks": [{"name": "audit-clients", "m": 200}]}}
    return {**parse_matrix(raw, registry=reg).cells[0], "backend": "vectorized"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_canary_clients_flag_a_wrong_client_level_accountant_and_not_a_right_one(
        wrong_accountant, seed):
    """Client level: canary clients whose updates are random directions
    (Andrew et al. 2024) in the one-run framework. dp-fedavg with the noise of
    ε = 50 recorded as ε = 1 is flagged; the right accountant at ε = 1 is not.
    The audit sees the final model, so it audits the released model's ε."""
    reg = wrong_accountant
    for name, priv in (("right", {"name": "dp-fedavg", "epsilon": 1.0, "noise": "central"}),
                       ("wrong", {"name": "test-dp-fedavg-wrong-accountant"})):
        rec = run_cell(_client_audit_cell(reg, priv, seed), registry=reg)
        assert rec["status"] == "ok", rec["error"]
        a = rec["metrics"]["attacks"]["audit-clients"]
        claim = rec["metrics"]["privacy"]["by_adversary"]["released"]
        assert claim == pytest.approx(1.0, abs=0.01) and a["claimed_epsilon"] == claim
        assert rec["metrics"]["canaries"]["kind"] == "clients"
        assert a["ceiling"] > 3 and a["no_power"] is False
        assert "estimate" in a["estimate_note"] and a["epsilon_estimate"] >= 0
        if name == "wrong":
            assert a["audited_epsilon"] > claim and a["contradicts_claim"] is True, a
        else:
            assert a["audited_epsilon"] <= claim and a["within_claim"] is True, a
        # canary clients take part like clients: they appear in the rounds' weights
        assert any(k.startswith("canary-") for k in rec["history"][0]["weights"])
