"""The 0.2 engine: declared facts drive the refusals, typed accounting gives one
headline guarantee whatever the stack order, models are a plugin family, and
the vectorized backend computes what the loop computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedmedbench import Aggregator, Model, Updates, hookimpl, run_cell
from fedmedbench.matrix import parse_matrix
from fedmedbench.registry import get_registry


class RowsWeighted(Aggregator):
    """Test-only: a weighted mean by training rows under other parameter names."""

    name = "test-rows-weighted"
    weighting = "examples"

    def __init__(self, *, basis: str = "rows") -> None:
        self.basis = basis

    def weights(self, updates: Updates) -> np.ndarray:
        n = np.asarray(updates.num_examples, dtype=float)
        return n / n.sum()


class TinyNet(Model):
    """Test-only architecture from a third party: one hidden layer of tanh units."""

    name = "test-tiny-net"

    def __init__(self, *, width: int = 3) -> None:
        self.width = width

    def build(self, input_shape, num_classes):
        d = int(np.prod(input_shape))
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, self.width),
                                   torch.nn.Tanh(), torch.nn.Linear(self.width, num_classes))


class _Plugin:
    @hookimpl
    def register_aggregators(self, register):
        register(RowsWeighted)

    @hookimpl
    def register_models(self, register):
        register(TinyNet)


@pytest.fixture(scope="module")
def reg():
    return get_registry(extra=[_Plugin()])


def _cells(reg, axes: dict, *, rounds: int = 2, run: dict | None = None, seeds=(0,)):
    raw = {"name": "engine", "rounds": rounds, "seeds": list(seeds), "axes": axes,
           "run": run or {}}
    return parse_matrix(raw, registry=reg).cells


# --------------------------------------------------------------------------
# declared capabilities
# --------------------------------------------------------------------------


def test_refusals_read_declared_facts_not_parameter_names(reg):
    """An aggregator with other parameter names but the same declared weighting
    gets exactly the refusals weighted-mean(by="examples") gets."""
    stacks = [["dp-fedavg"], [{"name": "dp-fedavg", "noise": "distributed"}],
              [{"name": "secagg", "dropout_rate": 0.25}],
              ["dp-fedavg", {"name": "secagg", "dropout_rate": 0.25}],
              ["dp-sgd"], ["secagg"], ["he-ckks", "secagg"]]
    outcome = {}
    for agg in ({"name": "weighted-mean", "by": "examples"}, {"name": "test-rows-weighted"}):
        for c in _cells(reg, {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
                              "aggregator": [agg], "privacy": stacks}, rounds=1):
            rec = run_cell(c, registry=reg)
            msg = (rec["error"] or {}).get("message", "")
            outcome.setdefault(agg["name"], []).append(
                (rec["status"], msg.replace(c["config"]["aggregator"]["name"] + " (", "AGG (")))
    mine, theirs = outcome["test-rows-weighted"], outcome["weighted-mean"]
    assert mine == theirs
    statuses = [s for s, _ in mine]
    assert statuses.count("skipped") >= 3 and statuses.count("ok") >= 3  # both kinds occur
    reasons = " ".join(m for _, m in mine)
    assert "secure transport" in reasons and "uniform weights" in reasons


def test_headline_epsilon_does_not_depend_on_the_stack_order(reg):
    stacks = [["dp-sgd", "dp-fedavg"], ["dp-fedavg", "dp-sgd"]]
    recs = [run_cell(c, registry=reg) for c in _cells(
        reg, {"dataset": ["heart-disease"], "algorithm": ["fedavg"], "privacy": stacks})]
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    a, b = (r["metrics"]["privacy"] for r in recs)
    top = ("epsilon", "delta", "unit", "accountant", "noise_multiplier", "sample_rate", "steps",
           "mechanism")
    assert {k: a[k] for k in top} == {k: b[k] for k in top}
    fed, sgd = a["mechanisms"]["dp-fedavg"], a["mechanisms"]["dp-sgd"]
    # against the server, dp-fedavg's central noise protects nothing (the server adds
    # it): the headline is the strongest unit that holds, dp-sgd's record-level ε
    assert fed["adversaries"]["server"]["epsilon"] is None
    assert a["adversary"] == "server" and a["protected"] is True
    assert a["unit"] == "record" and a["mechanism"] == "dp-sgd"
    assert (a["epsilon"], a["noise_multiplier"]) == (sgd["epsilon"], sgd["noise_multiplier"])
    assert a["by_unit"]["client"]["epsilon"] is None
    # against a party that sees only the released model, client level holds: the
    # stronger unit, dp-fedavg's ε; a record-level guarantee by either: the smaller ε
    released = fed["adversaries"]["released"]["epsilon"]
    assert a["by_adversary"]["released"] == released == b["by_adversary"]["released"]
    from fedmedbench.accounting import Accounting, Guarantee, headline

    def acc(m: dict) -> Accounting:
        gs = {k: Guarantee(k, v["epsilon"] if v["epsilon"] is not None else math.inf,
                           v["delta"], v["sample_rate"], v["steps"], v["amplified"], v["note"])
              for k, v in m["adversaries"].items()}
        return Accounting(unit=m["unit"], accountant=m["accountant"], epsilon=math.inf,
                          delta=m["delta"], noise_multiplier=m["noise_multiplier"],
                          sample_rate=m["sample_rate"], steps=m["steps"],
                          sampling=m["sampling"], adversaries=gs)

    rel = headline({"dp-fedavg": acc(fed), "dp-sgd": acc(sgd)}, "released")
    assert rel["unit"] == "client" and rel["epsilon"] == released
    assert rel["by_unit"]["record"]["epsilon"] == min(
        released, sgd["adversaries"]["released"]["epsilon"])
    assert a["level"] == "dp" and "rule" in a


# --------------------------------------------------------------------------
# models as a family
# --------------------------------------------------------------------------


def test_a_third_party_model_is_chosen_on_the_model_axis(reg):
    import fedmedbench.testing as kit

    cells = _cells(reg, {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
                         "model": ["default", {"name": "test-tiny-net", "width": 5}]})
    default, tiny = (run_cell(c, registry=reg, keep_run=True) for c in cells)
    assert default[0]["config"]["model"] is None and tiny[0]["status"] == "ok"
    assert tiny[0]["config"]["model"] == {"name": "test-tiny-net", "width": 5}
    assert tiny[0]["labels"]["model"] == "test-tiny-net(width=5)"
    n_features = 15
    assert tiny[1].final_models[0].numel() == n_features * 5 + 5 + 5 * 2 + 2
    assert default[1].final_models[0].numel() == n_features * 2 + 2  # the dataset's logistic
    kit.check_model(TinyNet, reg)  # and it passes the conformance kit's model check


# --------------------------------------------------------------------------
# the vectorized backend computes what the loop computes
# --------------------------------------------------------------------------

EHR_50 = {"name": "synthetic-ehr", "n_hospitals": 50, "n_patients": 4000}
ALGORITHMS = ["fedavg", {"name": "fedprox", "mu": 0.1}, "scaffold",
              {"name": "fedadam", "eta": 0.01}, "local"]
STACKS = ["none", [{"name": "dp-fedavg", "noise_multiplier": 0.5, "clip": 0.5}], ["secagg"]]


def _both(reg, cell):
    out = {}
    for backend in ("loop", "vectorized"):
        rec, run = run_cell({**cell, "backend": backend}, registry=reg, keep_run=True)
        out[backend] = (rec, run)
    return out


def _assert_equivalent(out, tol=1e-5, param_tol=None):
    (a, ra), (b, rb) = out["loop"], out["vectorized"]
    assert a["status"] == b["status"], (a["error"], b["error"])
    if a["status"] != "ok":
        assert a["error"]["message"] == b["error"]["message"]
        return None
    assert a["backend"]["name"] == "loop" and b["backend"]["name"] == "vectorized", b["backend"]
    for i, p in ra.final_models.items():
        diff = float((p - rb.final_models[i]).abs().max())
        assert diff <= (param_tol or tol), (i, diff)
    ua, ub = a["metrics"]["utility"], b["metrics"]["utility"]
    assert ua["global"] == pytest.approx(ub["global"], abs=tol)
    for site, v in ua["per_site"].items():
        assert v == pytest.approx(ub["per_site"][site], abs=tol, nan_ok=True)
    for ha, hb in zip(a["history"], b["history"]):
        if ha.get("loss") is not None:
            assert ha["loss"] == pytest.approx(hb["loss"], abs=tol)
    assert a["metrics"]["cost"]["bytes_up"] == b["metrics"]["cost"]["bytes_up"]
    return float(max((p - rb.final_models[i]).abs().max() for i, p in ra.final_models.items()))


def test_backends_agree_on_heart_disease(reg):
    """FedAvg, FedProx, SCAFFOLD, FedAdam, local: with and without dp-fedavg,
    secagg and top-k, the loop and the vectorized backend agree to 1e-5."""
    cells = _cells(reg, {"dataset": ["heart-disease"], "algorithm": ALGORITHMS,
                         "privacy": STACKS, "compressor": ["none", "top-k"]},
                   rounds=3, run={"optimizer": "sgd"})
    worst, ok = 0.0, 0
    for c in cells:
        d = _assert_equivalent(_both(reg, c))
        if d is not None:
            worst, ok = max(worst, d), ok + 1
    assert ok >= 12
    print(f"heart-disease: {ok} cells ok on both backends; max |Δw| = {worst:.2e}")


@pytest.mark.slow
def test_backends_agree_on_50_unequal_hospitals_and_the_cnn(reg):
    """synthetic-ehr with 50 hospitals of unequal sizes (one local epoch: every
    hospital takes its own number of steps, batches padded and masked) and
    synthetic-imaging's CNN. The CNN runs at lr 0.01: at the dataset's 0.05
    its first steps overshoot (loss 1.3 -> 5.2) and ReLU/max-pool training is
    chaotic, so rounding differences of 1e-8 grow to 1e-4 in 12 steps on
    either backend alone (measured: 1e-7 at lr 0.01, 1e-4 at 0.05; smooth
    sigmoid CNN 6e-8 at 0.05)."""
    ehr = _cells(reg, {"dataset": [EHR_50], "algorithm": ALGORITHMS, "privacy": STACKS,
                       "compressor": ["none", "top-k"]},
                 rounds=2, run={"local_steps": 0, "local_epochs": 1.0, "batch_size": 16})
    img = _cells(reg, {"dataset": [{"name": "synthetic-imaging", "n_sites": 4,
                                    "n_per_site": 60}],
                       "algorithm": ["fedavg", {"name": "fedprox", "mu": 0.1}, "local"],
                       "privacy": STACKS[:2]},
                 rounds=2, run={"local_steps": 3, "clients_per_round": 4, "lr": 0.01})
    sizes = None
    for c in ehr + img:
        out = _both(reg, c)
        # metrics to 1e-5 everywhere; the CNN's parameters to 2e-4 (measured: 1.5e-4 for
        # FedProx under dp-fedavg, where one max-pool winner decided by a rounding difference
        # moves 246 of 2,866 weights by > 1e-5; the other CNN cells at most 1e-7)
        _assert_equivalent(out, param_tol=2e-4 if c in img else None)
        if sizes is None and out["loop"][0]["status"] == "ok":
            run = out["loop"][1]
            sizes = sorted(len(s.train) for s in run.sites)
    assert sizes is not None and sizes[0] < sizes[-1] / 3  # really unequal hospitals


def test_dp_sgd_backends_agree_exactly_without_noise(reg):
    """Without noise (σ = 0: clipping only) both backends draw the same Poisson
    batches (Opacus's DPDataLoader draws, replayed) and clip the same
    per-example gradients: the same models to float tolerance, the same steps."""
    cells = _cells(reg, {"dataset": ["heart-disease"],
                         "algorithm": ["fedavg", {"name": "fedprox", "mu": 0.5}],
                         "privacy": [[{"name": "dp-sgd", "noise_multiplier": 0.0,
                                       "max_grad_norm": 0.5}]]}, rounds=3)
    for c in cells:
        out = _both(reg, c)
        _assert_equivalent(out, tol=1e-5)
        assert out["loop"][0]["metrics"]["privacy"]["epsilon"] is None  # no noise: no claim


@pytest.mark.slow
def test_dp_sgd_backends_agree_in_distribution_over_seeds(reg):
    """With noise the draws differ by construction; over 24 seeds the final
    models' distance from the noise-free model has the same distribution on
    both backends (two-sample Kolmogorov-Smirnov), and ε is identical."""
    dp = {"name": "dp-sgd", "noise_multiplier": 1.0, "max_grad_norm": 0.5}
    seeds = range(24)
    stat: dict[str, list[float]] = {"loop": [], "vectorized": []}
    eps = set()
    for s in seeds:
        for backend in stat:
            c = _cells(reg, {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
                             "privacy": [[dp]]}, rounds=2, seeds=(s,))[0]
            rec, run = run_cell({**c, "backend": backend}, registry=reg, keep_run=True)
            assert rec["status"] == "ok"
            w0 = torch.cat([p.detach().reshape(-1) for p in run.model_factory().parameters()])
            stat[backend].append(float((run.final_models[0] - w0).norm()))
            eps.add(round(rec["metrics"]["privacy"]["epsilon"], 12))
    res = stats.ks_2samp(stat["loop"], stat["vectorized"])
    print(f"KS p = {res.pvalue:.3f}; mean |w - w0| loop {np.mean(stat['loop']):.4f}, "
          f"vectorized {np.mean(stat['vectorized']):.4f}")
    assert res.pvalue > 0.01
    assert len(eps) == 1  # the same accountant, q and steps on both backends


def test_fast_metrics_equal_scikit_learn():
    """Accuracy and balanced accuracy are computed with numpy (scikit-learn's
    validation costs ~4 ms a call, times every site every round): they equal
    scikit-learn's on random inputs, including single-class splits."""
    import warnings

    from sklearn import metrics as skm

    from fedmedbench.metrics import score

    rng = np.random.default_rng(0)
    for trial in range(200):
        n, c = int(rng.integers(1, 60)), int(rng.integers(2, 6))
        y = rng.integers(0, c if trial % 5 else 1, size=n)  # every 5th split: one class
        proba = rng.random((n, c))
        pred = proba.argmax(1)
        assert score("accuracy", y, proba) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            want = skm.balanced_accuracy_score(y, pred)
        assert score("balanced_accuracy", y, proba) == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------
# the vectorized backend draws the loop backend's batches
# --------------------------------------------------------------------------


def test_batch_orders_are_uniform_permutations_from_splitmix64():
    """The minibatch orders: SplitMix64 gives its published outputs; every
    epoch order is a permutation; one global sort over many short segments
    and the one-by-one sort of long ones give the same orders; a stream's
    batches are its epochs' orders cut into batches; and the orders are
    uniform (all 24 orders of 4 rows equally often, chi-square)."""
    from scipy.stats import chisquare

    from fedmedbench import training
    from fedmedbench.training import BatchStream, epoch_orders, splitmix64

    # SplitMix64 seeded 0: its first outputs (the reference implementation's)
    assert splitmix64(0, np.arange(3)).tolist() == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    rng = np.random.default_rng(0)
    paths = set()  # which way epoch_orders sorted: all segments at once, or one by one
    for trial in range(40):
        k = int(rng.integers(2, 30))
        sizes = rng.integers(0, 40 if trial % 2 else 1200, size=k)
        sizes[0] = 1 << int(rng.integers(0, 7))  # a power of two: the bit-length edge
        seeds, epochs = rng.integers(0, 2**62, size=k), rng.integers(0, 50, size=k)
        together = epoch_orders(seeds, epochs, sizes)
        paths.add(bool(sizes.sum() <= training._SMALL_SEGMENTS * k))
        one_by_one = [epoch_orders([s], [e], [n]) for s, e, n in zip(seeds, epochs, sizes)]
        np.testing.assert_array_equal(together, np.concatenate(one_by_one))
        for n, order in zip(sizes, one_by_one):
            assert sorted(order.tolist()) == list(range(n))
    assert paths == {True, False}
    for n, bs in [(0, 3), (1, 4), (7, 3), (16, 4), (5, 8)]:
        stream = BatchStream(n, bs, seed=11)
        per_epoch = max(1, -(-n // bs))
        for t in range(3 * per_epoch + 1):
            e, q = divmod(t, per_epoch)
            np.testing.assert_array_equal(stream.next_indices(),
                                          stream.order(e)[q * bs:(q + 1) * bs])
    codes = {}
    for e in range(4800):
        codes.setdefault(tuple(epoch_orders([12345], [e], [4]).tolist()), []).append(e)
    assert len(codes) == 24
    assert chisquare([len(v) for v in codes.values()]).pvalue > 1e-3


def test_the_vectorized_plan_is_every_clients_loop_stream():
    """VectorBackend.plan (one epoch_orders call for all clients, array
    operations) against each client's BatchStream called step by step: the
    same rows, padding masked, over rounds where clients have unequal sizes
    and step counts, for two trainers drawing apart."""
    from types import SimpleNamespace

    from fedmedbench.training import BatchStream
    from fedmedbench.vectorized import VectorBackend

    rng = np.random.default_rng(1)
    sizes = np.array([0, 1, 2, 5, 16, 17, 40, 3, 1, 33, 300, 64])
    bs = 8
    row0 = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    seeds = 100 + np.arange(len(sizes))
    fake = SimpleNamespace(_n=sizes, _row0=row0, _seeds=seeds, drawn={},
                           ctx=SimpleNamespace(settings=SimpleNamespace(batch_size=bs)))
    ref = {(c, t): BatchStream(int(sizes[c]), bs, seed=int(seeds[c]))
           for c in range(len(sizes)) for t in ("main", "other")}
    for r in range(12):
        trainer = "other" if r % 3 == 2 else "main"
        clients = sorted(rng.choice(len(sizes), size=6, replace=False).tolist())
        steps = rng.integers(0, 9 if r % 2 else 60, size=6).tolist()
        rows, valid, lens = VectorBackend.plan(fake, clients, steps, trainer)
        assert rows.shape[:2] == (max(steps), 6)
        for j, c in enumerate(clients):
            for s in range(max(steps)):
                want = (ref[c, trainer].next_indices() + row0[c] if s < steps[j]
                        else np.zeros(0, int))
                assert lens[s, j] == len(want)
                np.testing.assert_array_equal(rows[s, j][valid[s, j]], want)
                assert not rows[s, j][~valid[s, j]].any()
