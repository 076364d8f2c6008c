"""Algorithms on the real round engine: equivalences (FedProx mu=0 = FedAvg,
FedAvg on one client = centralized, SCAFFOLD on identical clients tracks
FedAvg, a FedAdam step = a hand-computed Adam step), distillation with two
architectures, transfer learning, and parameter errors at matrix validation.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from fedmedbench import Dataset, FederatedData, Site, Split, Task, hookimpl, run_cell
from fedmedbench.engine import CellOutcome
from fedmedbench.matrix import parse_matrix
from fedmedbench.registry import get_registry

# --------------------------------------------------------------------------
# a test-only dataset with a public split, and (optionally) identical sites
# --------------------------------------------------------------------------


class PublicToy(Dataset):
    """Three sites of a noisy linear 3-class task, plus a public split."""

    name = "test-public-toy"

    def __init__(self, *, identical: bool = False, shift: float = 1.5) -> None:
        self.identical, self.shift = identical, shift

    def load(self, *, seed: int) -> FederatedData:
        rng = np.random.default_rng(0)
        W = rng.normal(size=(6, 3))

        def draw(n: int, mu: np.ndarray) -> Split:
            X = (rng.normal(size=(n, 6)) + mu).astype(np.float32)
            y = np.argmax(X @ W + 0.3 * rng.normal(size=(n, 3)), axis=1).astype(np.int64)
            return Split(X, y)

        sites = []
        base = (draw(120, np.zeros(6)), draw(60, np.zeros(6)))
        for s in range(3):
            if self.identical:
                tr, te = base
            else:
                mu = np.zeros(6)
                mu[s] = self.shift
                tr, te = draw(120, mu), draw(60, mu)
            sites.append(Site(f"s{s}", tr, te, quality=[0.2, 0.5, 1.0][s]))
        task = Task(kind="multiclass", num_classes=3, input_shape=(6,), metric="accuracy",
                    model="logistic")
        return FederatedData(task=task, sites=sites, public=draw(200, np.zeros(6)))


def _train_minus():
    """FedAvg as 0.2 wrote it: ``ctx.train`` then the delta in place (what
    ``ctx.train_delta`` must equal, bit for bit)."""
    from fedmedbench.plugins.algorithms.fedavg import FedAvg

    class TrainMinus(FedAvg):
        name = "test-train-minus"

        def client_update(self, ctx, global_params):
            return ctx.update(ctx.train(global_params).sub_(global_params))

    return TrainMinus


class _Plugins:
    @hookimpl
    def register_datasets(self, register):
        register(PublicToy)

    @hookimpl
    def register_algorithms(self, register):
        register(_train_minus())


_PLUGINS = _Plugins()


@pytest.fixture(scope="module")
def reg():
    return get_registry(extra=[_PLUGINS])


def cells(reg, axes: dict, *, rounds: int = 3, run: dict | None = None) -> list[dict]:
    raw = {"name": "t", "rounds": rounds, "seeds": [0], "axes": axes,
           "run": {"clients_per_round": 8, **(run or {})}}
    return parse_matrix(raw, registry=reg).cells


def run_one(reg, cell: dict) -> CellOutcome:
    """Run a cell on the real engine and keep the CellOutcome (final parameters)."""
    rec, run = run_cell(cell, registry=reg, keep_run=True)
    assert rec["status"] == "ok", rec["error"]
    return run


# --------------------------------------------------------------------------
# equivalences
# --------------------------------------------------------------------------


def test_fedprox_mu0_equals_fedavg_exactly_and_mu_pulls_towards_global(reg):
    cs = cells(reg, {"dataset": ["heart-disease"],
                     "algorithm": ["fedavg", {"name": "fedprox", "mu": 0.0},
                                   {"name": "fedprox", "mu": 1.0}]})
    avg, prox0, prox1 = (run_one(reg, c) for c in cs)
    assert torch.equal(avg.final_models[0], prox0.final_models[0])
    assert [h["loss"] for h in avg.history] == [h["loss"] for h in prox0.history]
    # the proximal term changes training (the test above could fail)
    assert not torch.allclose(avg.final_models[0], prox1.final_models[0])


@pytest.mark.parametrize("privacy", ["none", "dp-sgd"])
def test_train_delta_equals_train_minus_params_on_every_kernel(reg, privacy):
    """``ctx.train_delta(g)`` (FedAvg's) against ``ctx.train(g).sub_(g)``: the
    same models and losses on the loop backend and the vectorized one, on
    its compiled step (no privacy) and its per-example vmap path (DP-SGD)."""
    axes = {"dataset": ["heart-disease"], "algorithm": ["fedavg", "test-train-minus"],
            "privacy": [[{"name": "dp-sgd", "noise_multiplier": 0.8}] if privacy == "dp-sgd"
                        else "none"]}
    kernels = set()
    for backend in ("loop", "vectorized"):
        runs = []
        for c in cells(reg, axes):
            rec, run = run_cell({**c, "backend": backend}, registry=reg, keep_run=True)
            assert rec["status"] == "ok", rec["error"]
            assert rec["backend"]["name"] == backend
            kernels.add(rec["backend"].get("kernel", "loop").split(" (")[0])
            runs.append(run)
        delta, minus = runs
        assert torch.equal(delta.final_models[0], minus.final_models[0]), backend
        assert [h["loss"] for h in delta.history] == [h["loss"] for h in minus.history]
    assert kernels == {"loop", "compiled" if privacy == "none" else "vmap per example"}


def test_fedavg_with_one_client_equals_centralized(reg):
    cs = cells(reg, {"dataset": [{"name": "synthetic-tabular", "n_sites": 1}],
                     "algorithm": ["fedavg", "centralized"]}, rounds=4)
    fed, cen = (run_one(reg, c) for c in cs)
    steps = fed.ctx.steps_for(0) * 4
    assert steps == cen.ctx.steps_for(0) * 4 == 40
    torch.testing.assert_close(fed.final_models[0], cen.final_models[0], rtol=0, atol=1e-6)
    assert fed.history[-1]["utility"] == pytest.approx(cen.history[-1]["utility"])


def test_scaffold_on_identical_clients_tracks_fedavg(reg):
    def pair(identical: bool):
        cs = cells(reg, {"dataset": [{"name": "test-public-toy", "identical": identical}],
                         "algorithm": ["fedavg", "scaffold"]}, rounds=6,
                   run={"local_steps": 10, "lr": 0.1, "batch_size": 16})
        a, s = (run_one(reg, c) for c in cs)
        moved = torch.linalg.norm(a.final_models[0] - _flat0(a))  # how far FedAvg travelled
        gap = torch.linalg.norm(a.final_models[0] - s.final_models[0])
        return float(gap / moved), a, s

    rel_same, a, s = pair(True)
    print(f"identical clients: ||scaffold - fedavg|| / ||fedavg - w0|| = {rel_same:.4f}")
    assert rel_same < 0.05, rel_same
    assert abs(a.history[-1]["utility"] - s.history[-1]["utility"]) <= 0.02
    assert float(s.server_state["scaffold_c"].abs().sum()) > 0  # control variates are live
    # on heterogeneous clients the corrections matter: SCAFFOLD departs from FedAvg
    rel_diff, _, _ = pair(False)
    print(f"heterogeneous clients: the same ratio = {rel_diff:.4f}")
    assert rel_diff > 2 * rel_same


def _flat0(run: CellOutcome) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in run.model_factory().parameters()])


def test_fedadam_server_step_equals_hand_computed_adam(reg):
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    cs = cells(reg, {"dataset": ["heart-disease"],
                     "algorithm": ["fedavg", {"name": "fedadam", "eta": eta, "beta1": b1,
                                              "beta2": b2, "tau": tau}]}, rounds=1)
    avg, adam = (run_one(reg, c) for c in cs)
    w0 = _flat0(avg).double()
    delta = avg.final_models[0].double() - w0  # the round-1 aggregate (server_lr = 1)
    m = (1 - b1) * delta
    v = b2 * tau ** 2 + (1 - b2) * delta ** 2
    expect = w0 + eta * m / (torch.sqrt(v) + tau)
    torch.testing.assert_close(adam.final_models[0].double(), expect, rtol=0, atol=1e-6)

    # two server steps in isolation, Adam, Yogi and Adagrad against numpy
    from fedmedbench.plugins.algorithms.fedopt import FedOpt

    d1, d2 = np.array([0.3, -0.2, 0.0]), np.array([0.1, 0.4, -0.5])
    for opt in ("adam", "yogi", "adagrad"):
        alg = FedOpt(optimizer=opt, eta=eta, beta1=b1, beta2=b2, tau=tau)
        ctx = types.SimpleNamespace(state={}, layout=types.SimpleNamespace(numel=3))
        alg.setup(ctx)
        w = torch.zeros(3)
        mm, vv, ww = np.zeros(3), np.full(3, tau ** 2), np.zeros(3)
        for d in (d1, d2):
            w = alg.server_update(ctx, w, torch.tensor(d, dtype=torch.float32), [])
            mm = b1 * mm + (1 - b1) * d
            if opt == "adam":
                vv = b2 * vv + (1 - b2) * d * d
            elif opt == "yogi":
                vv = vv - (1 - b2) * d * d * np.sign(vv - d * d)
            else:
                vv = vv + d * d
            ww = ww + eta * mm / (np.sqrt(vv) + tau)
        np.testing.assert_allclose(w.numpy(), ww, atol=1e-6, err_msg=opt)


# --------------------------------------------------------------------------
# distillation and transfer learning
# --------------------------------------------------------------------------


def test_fedmd_two_architectures_and_feddf_run_end_to_end(reg):
    from fedmedbench import run_cell

    cs = cells(reg, {"dataset": ["test-public-toy"],
                     "algorithm": [{"name": "fedmd", "architectures": ["logistic", "mlp"],
                                    "public_samples": 50},
                                   "feddf", "local"]}, rounds=4)
    md = run_one(reg, cs[0])
    sizes = [p.numel() for p in md.final_models.values()]
    assert sizes[0] == sizes[2] == 6 * 3 + 3  # logistic clients
    assert sizes[1] > 100  # the MLP client
    rec = {c["config"]["algorithm"]["name"]: run_cell(c, registry=reg) for c in cs}
    for name, r in rec.items():
        assert r["status"] == "ok", (name, r["error"])
    # FedMD sends soft labels: 3 clients x 50 rows x 3 classes x 4 bytes per round
    assert rec["fedmd"]["metrics"]["cost"]["bytes_up"] == 4 * 3 * 50 * 3 * 4
    # and receives the consensus from round 2 on, with the round it was formed in (4 bytes)
    assert rec["fedmd"]["metrics"]["cost"]["bytes_down"] == 3 * 3 * (50 * 3 * 4 + 4)
    assert rec["fedmd"]["metrics"]["utility"]["global"] > 0.6
    assert rec["feddf"]["metrics"]["utility"]["global"] > 0.6
    # the consensus moves FedMD's clients off pure local training
    assert rec["fedmd"]["metrics"]["utility"]["global"] != rec["local"]["metrics"]["utility"]["global"]


def test_pretraining_on_public_split(reg):
    cs = cells(reg, {"dataset": ["test-public-toy", "heart-disease"], "algorithm": ["fedavg"]},
               rounds=1, run={"pretrain_steps": 50})
    base = cells(reg, {"dataset": ["test-public-toy"], "algorithm": ["fedavg"]}, rounds=1)
    pre, plain = run_one(reg, cs[0]), run_one(reg, base[0])
    assert pre.history[0]["loss"] < plain.history[0]["loss"] - 0.1
    from fedmedbench import run_cell

    rec = run_cell(cs[1], registry=reg)  # heart-disease has no public split: skipped, with why
    assert rec["status"] == "skipped"
    assert "public" in rec["error"]["message"] and "pretrain_steps" in rec["error"]["message"]


# --------------------------------------------------------------------------
# bad parameters
# --------------------------------------------------------------------------


@pytest.mark.parametrize("entry, words", [
    ('{ name = "fedprox", mu = -0.1 }', ["fedprox", "mu", "-0.1", ">= 0"]),
    ('{ name = "fedopt", optimizer = "rmsprop" }', ["optimizer", "rmsprop", "'adam', 'yogi'"]),
    ('{ name = "fedadam", beta1 = 1.5 }', ["beta1", "1.5"]),
    ('{ name = "fedmd", architectures = ["transformer"] }', ["architectures[0]", "transformer"]),
    ('{ name = "feddf", steps = 0 }', ["steps", ">= 1"]),
])
def test_bad_parameters_fail_matrix_validation(run_matrix, capsys, entry, words):
    code, records = run_matrix(f"""
        rounds = 1
        [axes]
        dataset = ["heart-disease"]
        algorithm = ["fedavg", {entry}]
    """)
    err = capsys.readouterr().err
    assert code == 2 and records == []
    for w in words:
        assert w in err, (w, err)


def test_distillation_without_public_split_is_a_skipped_cell(run_matrix):
    code, records = run_matrix("""
        rounds = 1
        [axes]
        dataset = ["heart-disease"]
        algorithm = ["feddf", "fedmd", "fedavg"]
    """)
    assert code == 0
    st = {r["config"]["algorithm"]["name"]: r for r in records}
    assert st["fedavg"]["status"] == "ok"
    for name in ("feddf", "fedmd"):
        assert st[name]["status"] == "skipped"
        assert "needs a public split" in st[name]["error"]["message"]


@pytest.mark.parametrize("backend", ["loop", "vectorized"])
def test_fedprox_proximal_term_survives_dp_sgd(backend):
    """DP-SGD builds each step's gradient from clipped per-sample gradients; the
    proximal term (data-independent) must still act, and with mu=0 nothing
    changes, on both backends."""
    m = parse_matrix({"rounds": 2, "axes": {
        "dataset": ["heart-disease"],
        "algorithm": ["fedavg", {"name": "fedprox", "mu": 0.0}, {"name": "fedprox", "mu": 1.0}],
        "privacy": [[{"name": "dp-sgd", "noise_multiplier": 0.5}]]},
        "run": {"backend": backend}})
    out = {c["labels"]["algorithm"]: run_cell(c, keep_run=True) for c in m.cells}
    assert all(rec["status"] == "ok" and rec["backend"]["name"] == backend
               for rec, _ in out.values())
    w = {k: run.final_models[0] for k, (_, run) in out.items()}
    u = {k: rec["metrics"]["utility"]["global"] for k, (rec, _) in out.items()}
    assert torch.equal(w["fedprox(mu=0.0)"], w["fedavg"]) and u["fedprox(mu=0.0)"] == u["fedavg"]
    assert not torch.allclose(w["fedprox(mu=1.0)"], w["fedavg"])
    # mu pulls the clients towards the round's global model: a smaller step away from it
    w0 = out["fedavg"][1].model_factory()
    w0 = torch.cat([p.detach().reshape(-1) for p in w0.parameters()])
    assert (w["fedprox(mu=1.0)"] - w0).norm() < (w["fedavg"] - w0).norm()
