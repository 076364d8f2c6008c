"""Personalized federated learning (issue 15): FedBN, Ditto, FedRep, FedPer and
fine-tuning on the personalized protocol.

Equivalences (FedBN without normalisation layers and FedPer with an empty head
are FedAvg bit for bit; Ditto with λ = 0 is local training and with λ → ∞ its
personal models are the global one; fine-tuning with k = 0 is the algorithm it
wraps), what is sent (bytes, the server's view and its readable masks hold the
shared part only: the head never reaches the server), BatchNorm running
statistics, the record's fields, the refusals, and the backends' agreement.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmedbench import run_cell
from fedmedbench.engine import CellOutcome
from fedmedbench.matrix import parse_matrix

MLP = {"name": "mlp", "hidden": [8]}


def cells(axes: dict, *, rounds: int = 3, run: dict | None = None, seeds=(0,)) -> list[dict]:
    raw = {"name": "personal", "rounds": rounds, "seeds": list(seeds), "axes": axes,
           "run": run or {}}
    return parse_matrix(raw).cells


def run_ok(cell: dict, **over) -> tuple[dict, CellOutcome]:
    rec, run = run_cell({**cell, **over}, keep_run=True)
    assert rec["status"] == "ok", rec["error"]
    return rec, run


def by_label(cs: list[dict], **over) -> dict[str, tuple[dict, CellOutcome]]:
    return {c["labels"]["algorithm"]: run_ok(c, **over) for c in cs}


def head_of(run: CellOutcome, layers: int = 1) -> np.ndarray:
    from fedmedbench.plugins.algorithms._personal import head_mask

    return head_mask(run.ctx, layers)


def assert_same_run(a: tuple[dict, CellOutcome], b: tuple[dict, CellOutcome], *,
                    personal: bool = True) -> None:
    """``b`` (personalized) computed exactly what ``a`` (federated) computed."""
    (ra, xa), (rb, xb) = a, b
    g = xa.global_params
    assert torch.equal(g, xb.global_params)
    if personal:  # every site's own model is the global one
        for p in xb.final_models.values():
            assert torch.equal(p, g)
    ua, ub = ra["metrics"]["utility"], rb["metrics"]["utility"]
    assert ua["per_site"] == ub["per_site"] and ua["worst_site"] == ub["worst_site"]
    assert ub["global"] == pytest.approx(ua["global"], rel=1e-12)
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    for k in ("bytes_up", "bytes_down"):
        assert ra["metrics"]["cost"][k] == rb["metrics"]["cost"][k]


# --------------------------------------------------------------------------
# equivalences
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["loop", "vectorized"])
def test_fedbn_without_normalisation_layers_is_fedavg_bit_for_bit(backend):
    cs = cells({"dataset": ["heart-disease"], "model": [MLP, {**MLP, "norm": "layer"}],
                "algorithm": ["fedavg", "fedbn"]}, run={"backend": backend})
    out = {(c["labels"]["model"], c["labels"]["algorithm"]): run_ok(c) for c in cs}
    plain, normed = "mlp(hidden=[8])", "mlp(hidden=[8],norm=layer)"
    assert_same_run(out[(plain, "fedavg")], out[(plain, "fedbn")])
    assert out[(plain, "fedbn")][0]["backend"]["name"] == backend
    # with LayerNorm, FedBN keeps it local: the sites' models differ from each other
    rec, run = out[(normed, "fedbn")]
    ps = list(run.final_models.values())
    assert not all(torch.equal(ps[0], p) for p in ps[1:])
    kept = rec["metrics"]["sharing"]["kept_on_clients"]
    assert kept == ["body.1.weight", "body.1.bias"]


def test_fedper_with_an_empty_head_is_fedavg_bit_for_bit_also_under_secagg():
    for privacy in ("none", "secagg"):
        cs = cells({"dataset": ["heart-disease"], "model": [MLP], "privacy": [privacy],
                    "algorithm": ["fedavg", {"name": "fedper", "head_layers": 0}, "fedper"]})
        out = by_label(cs)
        assert_same_run(out["fedavg"], out["fedper(head_layers=0)"])
        # a real head changes the sites' models (the test above could fail)
        assert not torch.equal(out["fedavg"][1].global_params,
                               out["fedper"][1].final_models[0])


def test_finetune_with_zero_steps_is_the_wrapped_algorithm():
    prox = {"name": "fedprox", "mu": 0.1}
    wrap = {"name": "finetune", "algorithm": "fedprox", "algorithm_params": {"mu": 0.1}}
    cs = cells({"dataset": ["heart-disease"],
                "algorithm": [prox, {**wrap, "steps": 0}, {**wrap, "steps": 10}]})
    out = {c["config"]["algorithm"].get("steps", -1): run_ok(c) for c in cs}
    assert_same_run(out[-1], out[0])
    rec0, rec10 = out[0][0], out[10][0]
    # the global model's numbers are the wrapped algorithm's, beside the personal ones
    assert rec0["metrics"]["utility_global"] == out[-1][0]["metrics"]["utility"]
    assert rec10["metrics"]["utility_global"] == out[-1][0]["metrics"]["utility"]
    assert rec10["metrics"]["utility"]["per_site"] != rec0["metrics"]["utility"]["per_site"]
    # ten fine-tuning steps per site, counted as training
    assert rec10["metrics"]["cost"]["bytes_up"] == rec0["metrics"]["cost"]["bytes_up"]


@pytest.mark.parametrize("backend", ["loop", "vectorized"])
def test_ditto_lambda_zero_is_local_training_and_its_global_model_is_fedavg(backend):
    cs = cells({"dataset": ["heart-disease"], "model": [MLP],
                "algorithm": ["local", "fedavg", {"name": "ditto", "lam": 0.0}]},
               rounds=4, run={"backend": backend})
    out = by_label(cs)
    (_, local), (_, avg), (rec, ditto) = out["local"], out["fedavg"], out["ditto(lam=0.0)"]
    for i, p in local.final_models.items():
        assert torch.equal(p, ditto.final_models[i]), i
    assert torch.equal(avg.global_params, ditto.global_params)
    assert rec["metrics"]["utility"]["per_site"] == out["local"][0]["metrics"]["utility"][
        "per_site"]
    assert rec["metrics"]["utility_global"] == out["fedavg"][0]["metrics"]["utility"]


def test_ditto_large_lambda_pins_personal_models_to_the_global_one():
    cs = cells({"dataset": ["heart-disease"], "model": [MLP],
                "algorithm": [{"name": "ditto", "lam": lam} for lam in (0.0, 1.0, 1e9)]},
               rounds=4)
    gap = {}
    for c in cs:
        _, run = run_ok(c)
        w = run.views[4].global_params  # the global model the last round started from
        gap[c["config"]["algorithm"]["lam"]] = max(float((p - w).abs().max())
                                                   for p in run.final_models.values())
    print(f"max |v_i - w| by lambda: {gap}")
    assert gap[1e9] < 1e-6
    assert gap[0.0] > gap[1.0] > gap[1e9]
    assert gap[0.0] > 0.05


# --------------------------------------------------------------------------
# what is sent: bytes, the server's view, privacy of the sent part
# --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["fedper", "fedrep"])
def test_the_server_view_never_holds_the_head(algorithm):
    c = cells({"dataset": ["heart-disease"], "model": [MLP], "algorithm": [algorithm]},
              rounds=3)[0]
    rec, run = run_ok(c)
    head = head_of(run)
    body = ~head
    assert head.sum() == 8 * 2 + 2  # fc: 8 hidden units -> 2 classes
    for rnd, view in run.views.items():
        assert view.kind == "plaintext" and view.clients
        for cl in view.clients:
            u = view.updates[cl]
            assert torch.all(u[torch.as_tensor(head)] == 0), (rnd, cl)
            assert torch.any(u[torch.as_tensor(body)] != 0)
            np.testing.assert_array_equal(view.readable[cl], body)
    # bytes: the body's float32 values up and down, per client and round
    n = len(run.sites)
    assert rec["metrics"]["cost"]["bytes_up"] == 3 * n * 4 * int(body.sum())
    assert rec["metrics"]["cost"]["bytes_down"] == 3 * n * 4 * int(body.sum())
    assert rec["metrics"]["sharing"]["kept_on_clients"] == ["fc.weight", "fc.bias"]
    # each site keeps its own head; the body is the server's
    ps = [run.final_models[i] for i in range(n)]
    g = run.global_params
    for p in ps:
        assert torch.equal(p[torch.as_tensor(body)], g[torch.as_tensor(body)])
    assert not torch.equal(ps[0][torch.as_tensor(head)], ps[1][torch.as_tensor(head)])


def test_secure_aggregation_encodes_only_the_body():
    cs = cells({"dataset": ["heart-disease"], "model": [MLP], "privacy": ["secagg"],
                "algorithm": ["fedavg", "fedper"]}, rounds=2)
    out = by_label(cs)
    (ra, _), (rp, run) = out["fedavg"], out["fedper"]
    body = ~head_of(run)
    view = run.views[1]
    assert view.kind == "aggregate"
    assert torch.all(view.aggregate[torch.as_tensor(~body)] == 0)
    assert not view.updates  # no individual update under secure aggregation
    # fewer bytes up: the masked vectors hold the body only
    assert rp["metrics"]["cost"]["bytes_up"] < ra["metrics"]["cost"]["bytes_up"]


def test_client_level_dp_clips_what_is_sent():
    """dp-fedavg's clip bounds the sent part's norm, and its noise never reaches
    the clients' heads."""
    ehr = {"name": "synthetic-ehr", "n_hospitals": 12, "n_patients": 1500}
    clip = 0.05
    c = cells({"dataset": [ehr], "model": [MLP], "algorithm": ["fedrep"],
               "privacy": [{"name": "dp-fedavg", "noise_multiplier": 1.0, "clip": clip,
                            "noise": "central"}]}, rounds=2, run={"clients_per_round": 6})[0]
    rec, run = run_ok(c)
    head = torch.as_tensor(head_of(run))
    for view in run.views.values():
        for cl in view.clients:
            u = view.updates[cl]
            assert torch.all(u[head] == 0)
            # clipped to C, then scaled by w_k / (q W) <= 1 / (q W)
            denom = rec["metrics"]["privacy"]["mechanisms"]["dp-fedavg"]["weight_denominator"]
            assert float(u.norm()) <= clip / denom * (1 + 1e-5)
    # the central noise lands on the shared parameters only: the heads stay the clients'
    g = run.global_params
    w0 = torch.cat([p.detach().reshape(-1) for p in run.model_factory().parameters()])
    assert torch.equal(g[head], w0[head])
    assert rec["metrics"]["privacy"]["unit"] == "client"


def test_batchnorm_statistics_stay_local_under_fedbn_and_are_sent_under_fedavg():
    img = {"name": "synthetic-imaging", "n_per_site": 48, "acquisition_shift": 2.0}
    bn = {"name": "cnn", "width": 4, "norm": "batch"}
    cs = cells({"dataset": [img], "model": [bn], "algorithm": ["fedavg", "fedbn"]},
               rounds=2, run={"local_steps": 2})
    out = by_label(cs)
    (ra, avg), (rb, fbn) = out["fedavg"], out["fedbn"]
    for rec in (ra, rb):  # BatchNorm updates buffers in place: the loop backend, named
        assert rec["backend"]["name"] == "loop"
        assert "BatchNorm updates its running statistics" in rec["backend"]["reason"]
    stats = 2 * (4 + 8)  # running mean and variance of BatchNorm2d(4) and (8)
    assert rb["metrics"]["sharing"]["buffers"] == "local"
    assert rb["metrics"]["sharing"]["buffer_values"] == stats
    v_avg, v_bn = avg.views[1], fbn.views[1]
    assert set(v_avg.extra) == {"buffers"} and not v_bn.extra
    assert all(len(b) == stats for b in v_avg.extra["buffers"].values())
    norm = torch.as_tensor(~run_mask(fbn))
    for cl in v_bn.clients:
        assert torch.all(v_bn.updates[cl][norm] == 0)
    n = len(avg.sites)
    D = avg.ctx.layout.numel
    sent_bn = D - int(norm.sum())
    assert ra["metrics"]["cost"]["bytes_up"] == 2 * n * 4 * (D + stats)
    assert rb["metrics"]["cost"]["bytes_up"] == 2 * n * 4 * sent_bn
    # every site is scored with its own statistics; FedAvg's global model with the average
    buf = [fbn.site_buffers[i] for i in range(n)]
    assert not torch.equal(buf[0], buf[1])
    assert not torch.equal(avg.global_buffers, avg.initial_buffers)


def run_mask(run: CellOutcome) -> np.ndarray:
    return run.sharing.mask


# --------------------------------------------------------------------------
# refusals, with the reason
# --------------------------------------------------------------------------


def test_combinations_that_do_not_hold_are_refused_with_the_reason():
    img = {"name": "synthetic-imaging", "n_per_site": 32}
    bn = {"name": "cnn", "width": 4, "norm": "batch"}
    tried = [
        ({"dataset": ["heart-disease"], "model": [MLP], "algorithm": ["fedrep"],
          "compressor": ["top-k"]}, "encodes the whole parameter vector"),
        ({"dataset": ["heart-disease"], "model": [MLP], "algorithm": ["fedper"],
          "privacy": ["he-ckks"]}, "sends only part of the model"),
        ({"dataset": ["heart-disease"], "algorithm": [{"name": "ditto", "lam": 1.0}]},
         None),
        ({"dataset": [img], "model": [bn], "algorithm": ["fedbn"], "privacy": ["dp-sgd"]},
         "BatchNorm layers"),
        ({"dataset": [img], "model": [bn], "algorithm": ["fedavg"], "privacy": ["secagg"]},
         "running statistics"),
    ]
    for axes, words in tried:
        c = cells(axes, rounds=1, run={"local_steps": 1})[0]
        rec = run_cell(c)
        if words is None:
            assert rec["status"] == "ok", rec["error"]
        else:
            assert rec["status"] == "skipped", (axes, rec["status"], rec["error"])
            assert words in rec["error"]["message"], rec["error"]["message"]
    rec = run_cell(cells({"dataset": ["heart-disease"],
                          "algorithm": [{"name": "ditto", "lam": 1.0}]}, rounds=1,
                         run={"optimizer": "adam"})[0])
    assert rec["status"] == "skipped" and "plain SGD" in rec["error"]["message"]
    # FedBN with secure aggregation and BatchNorm holds: the statistics stay local
    rec = run_cell(cells({"dataset": [img], "model": [bn], "algorithm": ["fedbn"],
                          "privacy": ["secagg"]}, rounds=1, run={"local_steps": 1})[0])
    assert rec["status"] == "ok", rec["error"]


def test_dp_sgd_counts_the_personal_steps_of_ditto():
    cs = cells({"dataset": ["heart-disease"], "algorithm": ["fedavg", {"name": "ditto",
                                                                       "lam": 0.5}],
                "privacy": [{"name": "dp-sgd", "noise_multiplier": 1.0}]}, rounds=2)
    out = by_label(cs)
    a = out["fedavg"][0]["metrics"]["privacy"]
    d = out["ditto(lam=0.5)"][0]["metrics"]["privacy"]
    assert d["steps"] == 2 * a["steps"]
    assert d["epsilon"] > a["epsilon"]


def test_an_epsilon_target_plans_for_every_trainers_steps():
    """With ``epsilon`` set, dp-sgd solves σ over the steps the algorithm plans
    (Ditto: global and personal steps each round; fine-tuning: its final
    steps too), so the recorded ε meets the target instead of overshooting."""
    cs = cells({"dataset": ["heart-disease"],
                "algorithm": ["fedavg", {"name": "ditto", "lam": 0.5},
                              {"name": "finetune", "steps": 20}],
                "privacy": [{"name": "dp-sgd", "epsilon": 2.0}]}, rounds=2)
    out = {k: v[0]["metrics"]["privacy"] for k, v in by_label(cs).items()}
    a, d = out["fedavg"], out["ditto(lam=0.5)"]
    f = next(v for k, v in out.items() if k.startswith("finetune"))
    assert d["steps"] == 2 * a["steps"] and f["steps"] > a["steps"]
    for p in (a, d, f):
        assert 1.9 < p["epsilon"] <= 2.0 + 1e-9, p  # met, not overshot
    sa, sd = a["mechanisms"]["dp-sgd"]["per_site"], d["mechanisms"]["dp-sgd"]["per_site"]
    for site in sa:  # at every site: twice the planned steps, more noise for the same ε
        assert sd[site]["planned_steps"] == 2 * sa[site]["planned_steps"]
        assert sd[site]["noise_multiplier"] > sa[site]["noise_multiplier"]


# --------------------------------------------------------------------------
# FedRep's phases, the record, the backends
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["loop", "vectorized"])
def test_fedrep_freezes_what_it_does_not_train(backend):
    """All steps on the head: the body never moves (nothing is aggregated); all
    on the body: every site keeps the initial head."""
    cs = cells({"dataset": ["heart-disease"], "model": [MLP],
                "algorithm": [{"name": "fedrep", "head_fraction": f} for f in (1.0, 0.0)]},
               rounds=2, run={"backend": backend})
    for c in cs:
        _, run = run_ok(c)
        head = torch.as_tensor(head_of(run))
        w0 = torch.cat([p.detach().reshape(-1) for p in run.model_factory().parameters()])
        g = run.global_params
        ps = list(run.final_models.values())
        if c["config"]["algorithm"]["head_fraction"] == 1.0:
            assert torch.equal(g, w0)
            assert all(not torch.equal(p[head], w0[head]) for p in ps)
        else:
            assert all(torch.equal(p[head], w0[head]) for p in ps)
            assert not torch.equal(g[~head], w0[~head])


def test_the_record_keeps_utility_in_shape_and_adds_the_global_model():
    cs = cells({"dataset": ["heart-disease"], "model": [{**MLP, "norm": "layer"}],
                "algorithm": ["fedavg", "local", "fedbn", "fedper", "fedrep", "ditto",
                              {"name": "finetune", "steps": 3}]}, rounds=2)
    keys = {"metric", "global", "per_site", "per_site_mean", "worst_site"}
    for c in cs:
        rec = run_cell(c)
        name = c["config"]["algorithm"]["name"]
        assert rec["status"] == "ok", rec["error"]
        u = rec["metrics"]["utility"]
        assert keys <= set(u) and len(u["per_site"]) == 4
        assert u["worst_site"] == min(u["per_site"].values())
        if name in ("ditto", "finetune"):
            assert keys <= set(rec["metrics"]["utility_global"])
        else:
            assert "utility_global" not in rec["metrics"]
        if rec["protocol"] == "personalized":
            assert rec["metrics"]["sharing"]["parameters"] == 15 * 8 + 8 + 8 + 8 + 8 * 2 + 2


def test_backends_agree_on_the_personalized_methods():
    cs = cells({"dataset": ["heart-disease"], "model": [{**MLP, "norm": "layer"}],
                "algorithm": ["fedbn", "fedper", "fedrep", {"name": "ditto", "lam": 0.5},
                              {"name": "finetune", "algorithm": "fedprox", "steps": 4}],
                "privacy": ["none", "secagg"]}, rounds=3)
    worst = 0.0
    for c in cs:
        (ra, a), (rb, b) = (run_ok(c, backend=k) for k in ("loop", "vectorized"))
        assert rb["backend"]["name"] == "vectorized"
        for i, p in a.final_models.items():
            worst = max(worst, float((p - b.final_models[i]).abs().max()))
        assert float((a.global_params - b.global_params).abs().max()) \
            <= 1e-5
        for s, v in ra["metrics"]["utility"]["per_site"].items():
            assert v == pytest.approx(rb["metrics"]["utility"]["per_site"][s], abs=1e-5)
        assert ra["metrics"]["cost"]["bytes_up"] == rb["metrics"]["cost"]["bytes_up"]
    print(f"personalized methods: max |Δw| loop vs vectorized = {worst:.2e}")
    assert worst <= 1e-5


def test_attacks_run_against_the_sent_parts():
    """Membership inference on a client's round view and the outside party's
    attack on a site's own model both run (and see only what was sent)."""
    c = cells({"dataset": ["heart-disease"], "model": [MLP], "algorithm": ["fedper"]},
              rounds=2)[0]
    c = {**c, "config": {**c["config"], "attacks": [
        {"name": "mia-loss"}, {"name": "mia-loss", "target": "client"}]}}
    rec, run = run_ok(c)
    attacks = rec["metrics"]["attacks"]
    for key, res in attacks.items():
        assert "failed" not in res and "not_applicable" not in res, (key, res)
    body = int((~head_of(run)).sum())
    client = [r for r in attacks.values() if r["assumptions"].get("attacker", "").startswith(
        "honest")]
    assert len(client) == 1
    assert client[0]["assumptions"]["view_part"].startswith(f"the {body} of")


@pytest.mark.parametrize("algorithm", ["fedper", "fedrep"])
def test_gradient_inversion_matches_only_the_sent_body(algorithm):
    """The server inverts the body it reads; the head (the output layer) never
    reaches it, so iDLG cannot read the labels and optimises them instead."""
    img = {"name": "synthetic-imaging", "n_per_site": 16, "model_act": "sigmoid",
           "model_pool": "none"}
    c = cells({"dataset": [img], "algorithm": [algorithm]}, rounds=1,
              run={"batch_size": 1, "local_steps": 1, "lr": 0.1})[0]
    c = {**c, "config": {**c["config"], "attacks": [
        {"name": "gradinv-idlg", "iterations": 5, "save_images": False}]}}
    rec, run = run_ok(c)
    res = rec["metrics"]["attacks"]["gradinv-idlg"]
    body = ~head_of(run)
    assert res["parameters_matched"] == int(body.sum()) < run.ctx.layout.numel
    assert "output layer is not in the view" in res["assumptions"]["labels"]
    assert res["assumptions"]["view_part"].startswith(f"the {int(body.sum())} of")
    np.testing.assert_array_equal(run.views[1].sent, body)
    # FedAvg's view is the whole update, and iDLG reads its labels
    c2 = {**c, "config": {**c["config"], "algorithm": {"name": "fedavg"}}}
    full = run_ok(c2)[0]["metrics"]["attacks"]["gradinv-idlg"]
    assert full["parameters_matched"] == run.ctx.layout.numel
    assert full["assumptions"]["labels"].startswith("inferred analytically")


def test_dp_sgd_backends_agree_without_noise_on_the_personalized_methods():
    """Without noise DP-SGD is deterministic: FedRep's frozen phases (one step at a
    time under Opacus), Ditto's two trainers and FedBN agree between backends."""
    cs = cells({"dataset": ["heart-disease"], "model": [{**MLP, "norm": "layer"}],
                "algorithm": ["fedrep", {"name": "ditto", "lam": 0.5}, "fedbn"],
                "privacy": [[{"name": "dp-sgd", "noise_multiplier": 0.0,
                              "max_grad_norm": 0.5}]]}, rounds=2)
    for c in cs:
        (_, a), (rb, b) = (run_ok(c, backend=k) for k in ("loop", "vectorized"))
        assert rb["backend"]["name"] == "vectorized"
        for i, p in a.final_models.items():
            assert float((p - b.final_models[i]).abs().max()) <= 1e-5, c["labels"]
    # with noise, FedRep's frozen head phase never moves the body under Opacus either
    c = cells({"dataset": ["heart-disease"], "model": [MLP],
               "algorithm": [{"name": "fedrep", "head_fraction": 1.0}],
               "privacy": [{"name": "dp-sgd", "noise_multiplier": 1.0}]}, rounds=2)[0]
    _, run = run_ok(c, backend="loop")
    w0 = torch.cat([p.detach().reshape(-1) for p in run.model_factory().parameters()])
    assert torch.equal(run.global_params, w0)


@pytest.mark.parametrize("alg", ["fedavg", "fedbn"])
def test_attacks_score_batchnorm_models_with_their_own_running_statistics(alg):
    """The model an attack rebuilds (``AttackContext.model``) is the one the
    record scored: its running statistics come with it (FedAvg: the global
    model's; FedBN: each site's own), so its predictions are the evaluation's."""
    from fedmedbench.training import predict_proba

    (cell,) = cells({"dataset": [{"name": "synthetic-tabular", "n_samples": 400}],
                     "algorithm": [alg], "model": [{**MLP, "norm": "batch"}]})
    _, run = run_ok(cell)
    actx = run.attack_context()
    X = run.data.sites[1].test.X
    if alg == "fedavg":
        model, want = actx.model(), run.training.round.eval_model
    else:  # site 1's own model: global body, its own normalisation statistics
        model = actx.model(actx.site_params[1])
        want = run.factory_for(1)()
        from fedmedbench.protocols import _load

        _load(want, actx.site_params[1], run.site_buffers[1])
        assert not torch.equal(actx.site_buffers[1], actx.site_buffers[0])
    fresh = actx.model(actx.final_params.clone())  # a vector the server built: initial stats
    got = predict_proba(model, X)
    np.testing.assert_allclose(got, predict_proba(want, X), rtol=1e-6, atol=1e-7)
    assert not np.allclose(got, predict_proba(fresh, X))


def test_finetune_wraps_an_algorithm_of_the_registry_that_builds_it():
    """A wrapper builds what it wraps with the registry building it (through
    the public ``fedmedbench.build_component``), so an algorithm known only
    to that registry (a plugin passed to the kit, a test's plugin) can be
    wrapped; the installed plugins alone do not know it."""
    import fedmedbench as fmb
    from fedmedbench import hookimpl
    from fedmedbench.errors import ConfigError
    from fedmedbench.plugins.algorithms.fedprox import FedProx
    from fedmedbench.registry import get_registry

    class OnlyHere(FedProx):
        name = "fmb-test-only-here"

    class Plug:
        @hookimpl
        def register_algorithms(self, register):
            register(OnlyHere)

    spec = {"name": "finetune", "algorithm": "fmb-test-only-here", "steps": 2}
    with pytest.raises(ConfigError, match="no algorithm 'fmb-test-only-here'"):
        get_registry().build("algorithm", spec)
    wrapped = get_registry(extra=[Plug()]).build("algorithm", spec)
    assert isinstance(wrapped.inner, OnlyHere)
    with pytest.raises(ConfigError, match="did you mean 'fedprox'"):
        fmb.build_component("algorithm", {"name": "fedproxx"}, key="x")
