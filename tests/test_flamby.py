"""FLamby's Fed-Heart-Disease preset: preprocessing, model, FedOpt variant,
budgets per method, the metric FLamby reports, and (slow) the published
numbers for pooled training and FedAvg.

Reference: owkin/FLamby at edacf54 (results CSVs from PR #223, a422b61),
``flamby/results/results_benchmark_fed_heart_disease/heart_seed{42..46}.csv``;
the published bar is the unweighted mean over the 4 hospitals' test sets and
the 5 seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmedbench import build_model, shipped_file
from fedmedbench.matrix import load_matrix
from fedmedbench.plugins.datasets import heart_disease as hd

ROOT = Path(__file__).resolve().parent.parent
FLAMBY = {"centralized": 0.7353, "fedavg": 0.6850}


@pytest.fixture(scope="module")
def flamby():
    return hd.HeartDisease(preprocessing="flamby").load(seed=0)


def test_flamby_preprocessing_is_flambys(flamby):
    data = flamby
    assert data.task.feature_names == hd.FLAMBY_FEATURES and data.task.input_shape == (13,)
    assert data.task.model == "logistic-ref"
    assert [(len(s.train), len(s.test)) for s in data.sites] == [(199, 104), (172, 89),
                                                                 (30, 16), (85, 45)]
    raw = pd.read_csv(shipped_file("heart-disease", "heart_disease_uci.csv"))
    parts = hd.flamby_sites(raw)
    pooled_tr = np.concatenate([hd.flamby_features(g)[tr] for g, tr, _ in parts]).astype(float)
    for site, own, (g, tr, te) in zip(data.sites, data.pooled_sites, parts):
        F = hd.flamby_features(g).astype(float)
        mu, sd = F[tr].mean(0), F[tr].std(0, ddof=1)  # that hospital's training rows, unbiased
        # train and test rows both with the hospital's own training statistics
        np.testing.assert_allclose(site.train.X, (F[tr] - mu) / (sd + 1e-9), atol=2e-5)
        np.testing.assert_allclose(site.test.X, (F[te] - mu) / (sd + 1e-9), atol=2e-5)
        # the pooled party's copy of the same rows: statistics of all 486 training rows
        pm, ps = pooled_tr.mean(0), pooled_tr.std(0, ddof=1)
        np.testing.assert_allclose(own.train.X, (F[tr] - pm) / (ps + 1e-9), atol=2e-5)
        np.testing.assert_array_equal(own.train.y, site.train.y)
    # FLamby's per-center means (notes, float32): Cleveland's age 54.176, VA's chol 175.09,
    # Switzerland's chol all 0 (std 0 -> (0 - 0) / 1e-9 = 0)
    F0 = hd.flamby_features(parts[0][0])[parts[0][1]]
    assert F0[:, 0].mean() == pytest.approx(54.176, abs=1e-3)
    F3 = hd.flamby_features(parts[3][0])[parts[3][1]]
    assert F3[:, 3].mean() == pytest.approx(175.09, abs=1e-2)
    assert np.all(data.sites[2].train.X[:, 3] == 0) and np.all(data.sites[2].test.X[:, 3] == 0)
    assert pooled_tr.mean(0)[0] == pytest.approx(52.953, abs=1e-3)
    # the other preprocessing is unchanged: 15 features, pooled statistics, no pooled copy
    other = hd.HeartDisease().load(seed=0)
    assert other.task.input_shape == (15,) and other.pooled_sites is None
    assert other.task.model == "logistic"


def test_bad_preprocessing_names_the_choices():
    from fedmedbench.errors import ConfigError
    from fedmedbench.registry import get_registry

    with pytest.raises(ConfigError, match="preprocessing.*flamby"):
        get_registry().build("dataset", {"name": "heart-disease", "preprocessing": "FLAMBY"})


def test_one_logit_model_is_flambys_baseline():
    """Cross-entropy on [0, z] is BCE on sigmoid(z), argmax is sigmoid(z) > 0.5,
    and the initialisation after torch.manual_seed(s) is FLamby's Linear(13, 1)."""
    torch.manual_seed(42)
    m = build_model("logistic-ref", (13,), 2)
    torch.manual_seed(42)
    ref = torch.nn.Linear(13, 1)
    assert torch.equal(m.fc.weight, ref.weight) and torch.equal(m.fc.bias, ref.bias)
    x = torch.randn(64, 13)
    y = torch.randint(0, 2, (64,))
    with torch.no_grad():
        logits = m(x)
        z = ref(x)
    ce = torch.nn.functional.cross_entropy(logits, y)
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(z), y.float().unsqueeze(1))
    assert float(ce) == pytest.approx(float(bce), rel=1e-6)
    assert torch.equal(logits.argmax(1), (torch.sigmoid(z) > 0.5).long().squeeze(1))
    # more classes: class 0 is the reference, its logit fixed at 0
    m3 = build_model("logistic-ref", (13,), 3)
    assert m3.fc.out_features == 2 and torch.all(m3(x)[:, 0] == 0)


def test_fedopt_v0_zero_is_flambys_fedopt():
    """One server step with v0 = 0, no bias correction (FLamby's fed_opt.py)."""
    from types import SimpleNamespace

    from fedmedbench.plugins.algorithms.fedopt import FedAdagrad, FedAdam, FedYogi

    d = torch.tensor([0.2, -0.1, 0.0, 1e-3])
    w = torch.zeros(4)
    for cls, v1 in [(FedAdam, 0.001 * d.double() ** 2), (FedAdagrad, d.double() ** 2),
                    (FedYogi, 0.001 * d.double() ** 2)]:
        kw = {} if cls is FedAdagrad else {"beta2": 0.999}
        alg = cls(eta=0.01, beta1=0.9, tau=1e-8, v0=0.0, **kw)
        ctx = SimpleNamespace(layout=SimpleNamespace(numel=4), state={})
        alg.setup(ctx)
        assert float(ctx.state["fedopt_v"].sum()) == 0.0
        out = alg.server_update(ctx, w, d, None)
        want = 0.01 * (0.1 * d.double()) / (torch.sqrt(v1) + 1e-8)
        torch.testing.assert_close(out.double(), want.to(torch.float32).double(),
                                   rtol=1e-5, atol=1e-9)
    assert FedAdam().params()["v0"] is None  # the default stays Reddi et al.'s tau^2
    alg = FedAdam(tau=1e-3)
    ctx = SimpleNamespace(layout=SimpleNamespace(numel=2), state={})
    alg.setup(ctx)
    assert float(ctx.state["fedopt_v"][0]) == pytest.approx(1e-6)


def test_matrix_gives_each_method_flambys_recipe():
    m = load_matrix("matrices/flamby-heart.toml")
    assert m.seeds == [42, 43, 44, 45, 46]
    cells = {c["labels"]["algorithm"].split("(")[0]: c["config"]
             for c in m.cells if c["config"]["seed"] == 42}
    assert set(cells) == {"centralized", "local", "fedavg", "fedprox", "scaffold", "fedadam",
                          "fedyogi", "fedadagrad"}
    for name in ("centralized", "local"):  # one Adam run of 50 epochs
        cfg = cells[name]
        assert cfg["rounds"] == 1 and cfg["run"]["optimizer"] == "adam"
        assert cfg["run"]["lr"] == 1e-3 and cfg["run"]["batch_size"] == 4
    assert cells["centralized"]["run"]["local_steps"] * 4 == 50 * math.ceil(486 / 4)
    assert cells["local"]["run"]["local_epochs"] == 50
    lrs = {"fedavg": 1e-3, "fedprox": 1e-3, "scaffold": 1e-3, "fedadam": 0.01,
           "fedyogi": 0.003162, "fedadagrad": 0.003162}
    etas = {"fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.316228}
    for name, lr in lrs.items():
        cfg = cells[name]
        assert cfg["rounds"] == 15 and cfg["run"]["local_steps"] == 100
        assert cfg["run"]["optimizer"] == "sgd" and cfg["run"]["lr"] == lr
        assert cfg["run"]["clients_per_round"] == 4 and cfg["aggregator"]["by"] == "examples"
        if name in etas:
            alg = cfg["algorithm"]
            assert (alg["eta"], alg["tau"], alg["beta1"], alg["v0"]) == (etas[name], 1e-8,
                                                                         0.9, 0.0)
            assert name == "fedadagrad" or alg["beta2"] == 0.999
    assert cells["fedprox"]["algorithm"]["mu"] == 0.01
    assert cells["scaffold"]["algorithm"]["control"] == "examples"
    assert cells["fedavg"]["dataset"] == {"name": "heart-disease", "preprocessing": "flamby",
                                          "scaling": "site"}


def test_pooled_party_trains_on_pooled_statistics_and_local_scores_across_sites(run_matrix):
    """The pooled protocol trains on FederatedData.pooled_sites; every model is
    scored on the hospitals' own-normalised test sets; `local` reports each
    hospital's model on all four (FLamby's "Local i")."""
    from fedmedbench.engine import run_cell

    m = load_matrix("matrices/flamby-heart.toml")
    cells = [c for c in m.cells if c["config"]["seed"] == 42
             and c["labels"]["algorithm"] in ("centralized", "local")]
    for c in cells:
        c["config"]["run"].update(local_steps=5, local_epochs=1.0)
        rec, run = run_cell(c, keep_run=True)
        assert rec["status"] == "ok", rec["error"]
        u = rec["metrics"]["utility"]
        assert u["per_site_mean"] == pytest.approx(np.mean(list(u["per_site"].values())))
        if c["labels"]["algorithm"] == "centralized":
            pooled = run.federation.clients[0].train
            assert len(pooled) == 486
            np.testing.assert_array_equal(
                pooled.X, np.concatenate([s.train.X for s in run.data.pooled_sites]))
            assert not np.allclose(pooled.X,
                                   np.concatenate([s.train.X for s in run.data.sites]))
        else:
            cross = u["cross_site"]
            for site, row in u["cross_site_matrix"].items():
                assert cross[site] == pytest.approx(np.mean(list(row.values())))
                assert row[site] == u["per_site"][site]  # its own test set: per_site


def _flamby_job(tmp: Path, spawn) -> dict:
    """``fedmedbench run matrices/flamby-heart.toml`` of the pooled and FedAvg
    cells, in a process of its own (a background job, tests/conftest.py)."""
    import subprocess
    import sys

    p = spawn([sys.executable, "-m", "fedmedbench.cli", "run",
               str(ROOT / "matrices" / "flamby-heart.toml"), "--select",
               "algorithm=" + ",".join(FLAMBY), "--out", str(tmp / "results"), "--no-progress",
               "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=900)
    return {"code": p.returncode, "err": err.decode()[-3000:], "out": tmp / "results"}


@pytest.mark.slow
@pytest.mark.background(job=_flamby_job)
def test_flamby_published_pooled_and_fedavg_are_reproduced(background):
    """``fedmedbench run matrices/flamby-heart.toml``'s pooled and FedAvg cells
    (5 seeds) against FLamby's published 0.7353 and 0.6850, within ±0.01."""
    from fedmedbench.results import load_records

    assert background["code"] == 0, background["err"]
    records, _ = load_records([background["out"]])
    got: dict[str, list[float]] = {k: [] for k in FLAMBY}
    for rec in records:
        assert rec["status"] == "ok", rec["error"]
        got[rec["labels"]["algorithm"]].append(rec["metrics"]["utility"]["per_site_mean"])
    for name, want in FLAMBY.items():
        assert len(got[name]) == 5
        assert abs(float(np.mean(got[name])) - want) <= 0.01, (name, got[name])
