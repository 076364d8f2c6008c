"""Adversaries and compressors on the real engine: poisoning hurts the weighted
mean and the robust rules resist it; quantisation is unbiased and top-k with
error feedback keeps FedAvg's accuracy at a fifth of the bytes."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from fedmedbench import Split, Updates, run_cell
from fedmedbench.cell import build_cell
from fedmedbench.engine import CellOutcome
from fedmedbench.matrix import parse_matrix
from fedmedbench.plugins.adversaries.label_flip import LabelFlip
from fedmedbench.plugins.adversaries.model_poisoning import Gaussian, Scaling, SignFlip
from fedmedbench.plugins.compressors.quantize import Quantize
from fedmedbench.plugins.compressors.topk import TopK
from fedmedbench.registry import get_registry

# 10 sites, mildly heterogeneous: 3 of them malicious at fraction 0.3
TEN_SITES = {"name": "synthetic-tabular", "n_sites": 10, "heterogeneity": 0.2}
# 19 features: a logistic model of 2 * 19 + 2 = 40 parameters (top-k 0.1 sends 4)
FORTY_PARAMS = {"name": "synthetic-tabular", "n_features": 19, "n_sites": 4}


@pytest.fixture(scope="module")
def reg():
    return get_registry()


def _cells(reg, axes: dict, *, rounds: int, clients: int) -> list[dict]:
    raw = {"name": "advcomp", "rounds": rounds, "seeds": [0],
           "axes": {"algorithm": ["fedavg"], **axes}, "run": {"clients_per_round": clients}}
    return parse_matrix(raw, registry=reg).cells


class _ctx:  # noqa: N801 - reads like the function it stands in for
    """The slice of CellContext a compressor uses: ``round`` and seeded ``rng``
    streams. A new instance is a new cell."""

    def __init__(self, round_: int, seed: int = 0) -> None:
        self.round, self.seed = round_, seed

    def rng(self, purpose: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(purpose.encode()), *extra])


def _run(cell: dict, reg) -> CellOutcome:
    """Run a cell on the real engine, keeping the CellOutcome (server views, malicious set)."""
    rec, run = run_cell(cell, registry=reg, keep_run=True)
    assert rec["status"] == "ok", rec["error"]
    return run


def _one(client: int, delta: torch.Tensor, n: int = 10, **metrics: float) -> Updates:
    """One client's Updates row."""
    return Updates(clients=[client], delta=delta.reshape(1, -1), num_examples=[n],
                   metrics={k: np.array([v]) for k, v in metrics.items()})


# --------------------------------------------------------------------------
# adversaries
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_poisoning_hurts_the_weighted_mean_and_robust_rules_resist_it(reg):
    attack = {"name": "sign-flip", "fraction": 0.3}
    cells = _cells(reg, {"dataset": [TEN_SITES],
                         "aggregator": ["weighted-mean", "median",
                                        {"name": "trimmed-mean", "trim": 0.3},
                                        {"name": "krum", "f": 3}],
                         "adversary": ["none", attack]}, rounds=15, clients=10)
    util = {}
    for c in cells:
        rec = run_cell(c, registry=reg)
        assert rec["status"] == "ok", rec["error"]
        assert rec["config"]["adversary"] == (
            None if c["labels"]["adversary"] == "none" else {**attack, "scale": 4.0})
        util[c["labels"]["aggregator"].split("(")[0], c["labels"]["adversary"]] = \
            rec["metrics"]["utility"]["global"]
    clean = util["weighted-mean", "none"]
    attacked = util["weighted-mean", "sign-flip(fraction=0.3)"]
    assert clean > 0.75
    assert attacked < clean - 0.2  # 3 of 10 clients sending -4u drag the mean backwards
    for rule in ("median", "trimmed-mean", "krum"):
        robust = util[rule, "sign-flip(fraction=0.3)"]
        assert robust > attacked + 0.2, (rule, robust, attacked)
        assert robust > util[rule, "none"] - 0.03, (rule, robust)


def test_update_attacks_transform_the_sent_update_on_the_engine(reg):
    """Which clients are malicious comes from the cell seed; what they send is
    exactly -scale*u, factor*u, or N(0, sigma^2) noise (seen in the server view)."""
    honest = _cells(reg, {"dataset": [TEN_SITES]}, rounds=1, clients=10)[0]
    base = _run(honest, reg)
    sent = {}
    for adv in ({"name": "sign-flip", "fraction": 0.3, "scale": 2.0},
                {"name": "scaling", "fraction": 0.3, "factor": 5.0},
                {"name": "gaussian", "fraction": 0.3, "sigma": 0.5}):
        cell = _cells(reg, {"dataset": [TEN_SITES], "adversary": [adv]}, rounds=1,
                      clients=10)[0]
        run = _run(cell, reg)
        assert len(run.malicious) == 3  # round(0.3 * 10)
        view, clean = run.views[1].updates, base.views[1].updates
        for i in range(10):
            if i not in run.malicious:  # honest clients are untouched
                torch.testing.assert_close(view[i], clean[i], rtol=0, atol=0)
        sent[adv["name"]] = (run.malicious, view, clean)
    mal, view, clean = sent["sign-flip"]
    for i in mal:
        torch.testing.assert_close(view[i], -2.0 * clean[i])
    mal, view, clean = sent["scaling"]
    for i in mal:
        torch.testing.assert_close(view[i], 5.0 * clean[i])
    mal, view, _ = sent["gaussian"]
    noise = torch.cat([view[i] for i in mal])
    assert abs(float(noise.std()) - 0.5) < 0.15 and abs(float(noise.mean())) < 0.2
    # the same malicious set for every attack of one cell seed
    assert sent["sign-flip"][0] == sent["scaling"][0] == sent["gaussian"][0]


def test_label_flip_changes_only_the_malicious_clients_training_labels(reg):
    split = Split(np.arange(12, dtype=np.float32).reshape(6, 2), np.array([0, 1, 2, 2, 1, 0]))
    out = LabelFlip().corrupt_data(split, num_classes=3, rng=np.random.default_rng(0))
    assert out.y.tolist() == [2, 1, 0, 0, 1, 2] and out.y.dtype == split.y.dtype
    assert np.array_equal(out.X, split.X) and split.y.tolist() == [0, 1, 2, 2, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        LabelFlip().corrupt_data(split, num_classes=2, rng=np.random.default_rng(0))

    cell = _cells(reg, {"dataset": [TEN_SITES],
                        "adversary": [{"name": "label-flip", "fraction": 0.3}]},
                  rounds=1, clients=10)[0]
    built = build_cell(cell, reg)
    raw = reg.build("dataset", cell["config"]["dataset"]).load(seed=0)
    fed = built.federation
    assert len(fed.malicious) == 3
    for i, (site, orig) in enumerate(zip(fed.clients, raw.sites)):
        assert np.array_equal(site.train.X, orig.train.X)  # features untouched
        assert np.array_equal(site.test.y, orig.test.y)  # test labels untouched
        want = 1 - orig.train.y if i in fed.malicious else orig.train.y
        assert np.array_equal(site.train.y, want)
    rec = run_cell(cell, registry=reg)
    assert rec["status"] == "ok" and rec["config"]["adversary"] == {
        "name": "label-flip", "fraction": 0.3}


@pytest.mark.parametrize("cls, kw, word", [
    (SignFlip, {"fraction": 1.0}, "fraction"), (LabelFlip, {"fraction": -0.1}, "fraction"),
    (Gaussian, {"fraction": True}, "fraction"), (SignFlip, {"scale": 0.0}, "scale"),
    (Scaling, {"factor": float("inf")}, "factor"), (Gaussian, {"sigma": -1.0}, "sigma"),
    (Quantize, {"bits": 0}, "bits"), (Quantize, {"bits": 8.0}, "bits"),
    (TopK, {"fraction": 0.0}, "fraction"), (TopK, {"error_feedback": 1}, "error_feedback"),
])
def test_bad_parameters_name_the_parameter(cls, kw, word):
    with pytest.raises(ValueError, match=word):
        cls(**kw)


def test_bad_parameter_in_a_matrix_is_a_config_error(run_matrix, capsys):
    code, records = run_matrix("""
        name = "bad"
        rounds = 1
        [axes]
        dataset = ["synthetic-tabular"]
        algorithm = ["fedavg"]
        adversary = [{ name = "sign-flip", fraction = 1.5 }]
    """)
    assert code == 2 and records == []
    assert "fraction = 1.5" in capsys.readouterr().err


# --------------------------------------------------------------------------
# compressors
# --------------------------------------------------------------------------


def test_quantize_is_unbiased_and_its_error_shrinks_with_bits():
    x = torch.from_numpy(np.random.default_rng(3).normal(scale=0.01, size=64)).float()
    upd = _one(2, x, 10, loss=1.0)
    mse = {}
    for bits in (1, 2, 4, 8):
        q = Quantize(bits=bits)
        dec = []
        for r in range(1, 1001):
            out = q.compress(_ctx(r), upd)
            assert out.delta_bytes == [math.ceil(64 * bits / 8) + 8]
            dec.append(out.delta[0].double())
        dec = torch.stack(dec)
        assert len(torch.unique(dec[0])) <= 2**bits  # values lie on the 2**bits grid
        step = float((x.max() - x.min()) / (2**bits - 1))
        # unbiased: the mean of 1000 decodes is within 5 standard errors (var <= step^2/4)
        assert float((dec.mean(0) - x.double()).abs().max()) < 5 * step / 2 / math.sqrt(1000) + 1e-7
        mse[bits] = float(((dec - x.double()) ** 2).mean())
        assert mse[bits] <= step**2 / 4
    assert mse[1] > 4 * mse[2] > 16 * mse[4] > 256 * mse[8] > 0
    # the input update is not modified, its metadata travels, and a seed fixes the draw
    out1 = Quantize(bits=2).compress(_ctx(5), upd)
    out2 = Quantize(bits=2).compress(_ctx(5), upd)
    assert torch.equal(out1.delta, out2.delta) and out1.metrics == {"loss": np.array([1.0])}
    assert out1.clients == [2] and out1.num_examples == [10] and out1.delta is not upd.delta
    # a constant vector is sent exactly
    const = Quantize(bits=1).compress(_ctx(1), _one(0, torch.full((5,), 0.3), 1))
    torch.testing.assert_close(const.delta[0], torch.full((5,), 0.3))


def test_topk_error_feedback_delays_but_never_loses_mass():
    topk = TopK(fraction=0.25)
    rng = np.random.default_rng(0)
    deltas = [torch.from_numpy(rng.normal(size=12)).float() for _ in range(6)]
    ctx, total_sent = _ctx(1), torch.zeros(12)
    topk.setup(ctx)
    for r, d in enumerate(deltas, start=1):
        ctx.round = r
        out = topk.compress(ctx, _one(7, d, 5))
        assert out.delta_bytes == [3 * 8] and int((out.delta != 0).sum()) == 3  # k = ceil(.25*12)
        total_sent += out.delta[0]
    torch.testing.assert_close(total_sent + topk.residual(7), torch.stack(deltas).sum(0))
    # a new cell (setup) starts from empty residuals
    topk.setup(_ctx(1))
    out = topk.compress(_ctx(1), _one(7, deltas[0], 5))
    kept = torch.topk(deltas[0].abs(), 3).indices
    torch.testing.assert_close(out.delta[0][kept], deltas[0][kept])
    # without error feedback nothing is kept
    plain = TopK(fraction=0.25, error_feedback=False)
    plain.setup(_ctx(1))
    plain.compress(_ctx(1), _one(7, deltas[0], 5))
    assert plain.residual(7) is None


@pytest.mark.slow
def test_compressed_fedavg_keeps_utility_at_the_expected_bytes(reg):
    rounds, clients, n = 20, 4, 40
    cells = _cells(reg, {"dataset": [FORTY_PARAMS],
                         "compressor": ["none", {"name": "quantize", "bits": 8},
                                        {"name": "top-k", "fraction": 0.1}]},
                   rounds=rounds, clients=clients)
    recs = {c["labels"]["compressor"]: run_cell(c, registry=reg) for c in cells}
    assert all(r["status"] == "ok" for r in recs.values())
    util = {k: r["metrics"]["utility"]["global"] for k, r in recs.items()}
    cost = {k: r["metrics"]["cost"]["bytes_up"] for k, r in recs.items()}
    updates = rounds * clients
    assert cost["none"] == updates * n * 4
    assert cost["quantize(bits=8)"] == updates * (n + 8)  # 1 byte a value + min, step
    assert cost["top-k(fraction=0.1)"] == updates * 4 * 8  # k = 4 (value, index) pairs
    assert cost["none"] / cost["top-k(fraction=0.1)"] == 5.0
    assert util["none"] > 0.8
    assert abs(util["quantize(bits=8)"] - util["none"]) <= 0.01
    assert abs(util["top-k(fraction=0.1)"] - util["none"]) <= 0.02
    # compression changed what the server saw, and a rerun is identical (seeded)
    assert recs["top-k(fraction=0.1)"]["history"][1]["loss"] != recs["none"]["history"][1]["loss"]
    again = run_cell(cells[1], registry=reg)
    assert again["history"] == recs["quantize(bits=8)"]["history"]


def test_bytes_count_every_sent_field_under_compression(reg):
    """Bytes are a field of what is sent: SCAFFOLD under top-k sends its
    compressed delta plus its full control-variate delta (0.1 lost the latter)."""
    rounds, clients, n = 2, 4, 40
    cells = _cells(reg, {"dataset": [FORTY_PARAMS], "algorithm": ["fedavg", "scaffold"],
                         "compressor": ["none", {"name": "top-k", "fraction": 0.1}]},
                   rounds=rounds, clients=clients)
    up = {(c["labels"]["algorithm"], c["labels"]["compressor"]):
          run_cell(c, registry=reg)["metrics"]["cost"]["bytes_up"] for c in cells}
    updates = rounds * clients
    assert up["fedavg", "none"] == updates * n * 4
    assert up["scaffold", "none"] == updates * 2 * n * 4
    assert up["fedavg", "top-k(fraction=0.1)"] == updates * 4 * 8
    assert up["scaffold", "top-k(fraction=0.1)"] == updates * (4 * 8 + n * 4)
