"""Privacy mechanisms: exact accounting, secure aggregation, CKKS, stacks.

Real paths only: Opacus accountants, X25519/AES from ``cryptography``, a
TenSEAL context, and matrix runs through the engine.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from fedmedbench import ParamLayout
from fedmedbench.accounting import Ledger, epsilon_for, noise_for_epsilon, noise_for_schedule

# --------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------


def test_accounting_matches_opacus_reference_values():
    from opacus.accountants import RDPAccountant

    hist = [(1.5, 0.04, 2250)]
    rdp = epsilon_for(hist, 1e-5, "rdp")
    assert rdp == pytest.approx(7.3291, abs=5e-4)
    ref = RDPAccountant()
    ref.history = list(hist)
    assert rdp == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    prv = epsilon_for(hist, 1e-5, "prv")
    assert prv == pytest.approx(6.78, abs=0.02)  # PRV is approximate by design
    # a Ledger fed step by step composes to the same number
    led = Ledger("rdp")
    for _ in range(2250):
        led.record(1.5, 0.04)
    assert led.history == [(1.5, 0.04, 2250)] and led.epsilon(1e-5) == pytest.approx(rdp)


def test_rounds_of_different_sigma_compose_like_opacus():
    from opacus.accountants import RDPAccountant

    led = Ledger("rdp")
    sigmas = [2.0 * 0.9 ** t for t in range(10)]
    for s in sigmas:
        led.record(s, 1.0)
    ref = RDPAccountant()
    for s in sigmas:
        ref.step(noise_multiplier=s, sample_rate=1.0)
    assert led.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    # decaying noise spends more than holding the first sigma
    assert led.epsilon(1e-5) > epsilon_for([(2.0, 1.0, 10)], 1e-5)


@pytest.mark.parametrize("target,q,steps", [(1.0, 0.08, 200), (3.0, 1 / 13, 30), (8.0, 0.25, 20)])
def test_target_epsilon_never_overshoots(target, q, steps):
    from opacus.accountants import RDPAccountant

    sigma = noise_for_epsilon(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    ref = RDPAccountant()
    ref.history = [(sigma, q, steps)]
    eps = ref.get_epsilon(1e-5)
    assert eps <= target
    assert eps >= 0.95 * target  # and it is not wastefully loose


def test_schedule_solver_never_overshoots():
    sched = lambda z0: [(z0 * 0.8 ** t, 1.0, 1) for t in range(8)]  # noqa: E731
    z0 = noise_for_schedule(target_epsilon=4.0, delta=1e-5, schedule=sched)
    eps = epsilon_for(sched(z0), 1e-5)
    assert 3.9 <= eps <= 4.0


# --------------------------------------------------------------------------
# matrix runs through the engine
# --------------------------------------------------------------------------

HEART = """
name = "privacy-test"
rounds = {rounds}
seeds = [0]
[axes]
dataset = ["heart-disease"]
algorithm = ["fedavg"]
aggregator = [{{name = "weighted-mean", by = "uniform"}}]
privacy = {privacy}
"""


def _by_privacy(records):
    return {r["labels"]["privacy"]: r for r in records}


def test_dp_sgd_per_site_accounting_in_a_real_run(run_matrix):
    code, recs = run_matrix(HEART.format(
        rounds=2, privacy='[{name = "dp-sgd", epsilon = 3.0}, '
                          '{name = "dp-sgd", noise_multiplier = 1.5}]'))
    assert code == 0, [r["error"] for r in recs]
    by = _by_privacy(recs)
    tgt = by["dp-sgd(epsilon=3.0)"]["metrics"]["privacy"]
    acc = tgt["mechanisms"]["dp-sgd"]
    assert tgt["epsilon"] == acc["epsilon"] and tgt["delta"] == 1e-5
    assert tgt["accountant"] == "rdp" and acc["unit"] == "record" and "Poisson" in acc["sampling"]
    # the top-level block is one consistent guarantee: the worst site's ε with its own σ
    worst = max(acc["per_site"].values(), key=lambda s: s["epsilon"])
    assert (tgt["noise_multiplier"], tgt["sample_rate"], tgt["steps"]) == (
        worst["noise_multiplier"], worst["sample_rate"], worst["steps"])
    assert set(acc["per_site"]) == {"Cleveland", "Hungary", "Switzerland", "VA Long Beach"}
    for site in acc["per_site"].values():
        # each site trained every planned step (2 rounds x 10 local steps) and stayed in budget
        assert site["steps"] == site["planned_steps"] == 20
        assert 2.85 <= site["epsilon"] <= 3.0
        assert site["epsilon"] == pytest.approx(
            epsilon_for([(site["noise_multiplier"], site["sample_rate"], 20)], 1e-5))
    assert acc["epsilon"] == max(s["epsilon"] for s in acc["per_site"].values())
    fixed = by["dp-sgd(noise_multiplier=1.5)"]["metrics"]["privacy"]["mechanisms"]["dp-sgd"]
    assert {s["noise_multiplier"] for s in fixed["per_site"].values()} == {1.5}
    # epsilon grows over rounds in the history
    hist = by["dp-sgd(noise_multiplier=1.5)"]["history"]
    assert 0 < hist[0]["epsilon"] < hist[1]["epsilon"]


def test_dp_sgd_empty_poisson_batches_are_noise_only_steps(run_matrix):
    """batch_size=1 makes Poisson sampling draw many empty batches: each one is
    still a noised, accounted step (stock Opacus would skip it silently)."""
    code, recs = run_matrix("""
        rounds = 2
        [axes]
        dataset = [{ name = "synthetic-tabular", n_samples = 120 }]
        algorithm = ["fedavg"]
        privacy = [{ name = "dp-sgd", noise_multiplier = 1.0 }]
        [run]
        batch_size = 1
        local_steps = 30
    """)
    assert code == 0, [r["error"] for r in recs]
    acc = recs[0]["metrics"]["privacy"]["mechanisms"]["dp-sgd"]
    for site in acc["per_site"].values():
        assert site["steps"] == site["planned_steps"] == 60


def test_dp_fedavg_stacks_and_rejections(run_matrix):
    code, recs = run_matrix(HEART.format(rounds=3, privacy="""[
        {name = "dp-fedavg", noise_multiplier = 1.2, noise_decay = 0.8, layerwise = "equal"},
        {name = "dp-fedavg", epsilon = 6.0, target_quantile = 0.5},
        ["dp-fedavg", "secagg"],
        ["he-ckks", "secagg"],
        ["dp-fedavg", "he-ckks"],
        ["dp-sgd", "secagg"]]"""))
    assert code == 0, [r["error"] for r in recs if r["status"] == "failed"]
    by = _by_privacy(recs)
    sched = by["dp-fedavg(layerwise=equal,noise_decay=0.8,noise_multiplier=1.2)"]
    acc = sched["metrics"]["privacy"]["mechanisms"]["dp-fedavg"]
    assert acc["noise_multipliers"] == pytest.approx([1.2, 0.96, 0.768])
    released = acc["adversaries"]["released"]  # central noise: nothing against the server
    assert acc["unit"] == "client" and acc["noise"] == "central"
    assert released["sample_rate"] == 1.0 and acc["adversaries"]["server"]["protected"] is False
    assert released["epsilon"] == pytest.approx(epsilon_for([(z, 1.0, 1) for z in
                                                             acc["noise_multipliers"]], 1e-5))
    adapt = by["dp-fedavg(epsilon=6.0,target_quantile=0.5)"]["metrics"]["privacy"]
    assert 5.8 <= adapt["by_adversary"]["released"] <= 6.0
    clips = adapt["mechanisms"]["dp-fedavg"]["clip_history"]
    assert len(clips) == 3 and clips[0] == 1.0 and clips[1] != clips[0]  # C moves
    dist = by["dp-fedavg+secagg"]["metrics"]["privacy"]
    assert dist["mechanisms"]["dp-fedavg"]["noise"] == "distributed"
    assert dist["level"] == "dp+crypto" and dist["epsilon"] > 0
    assert by["dp-sgd+secagg"]["status"] == "ok"
    # impossible stacks are skipped with the reason
    assert by["he-ckks+secagg"]["status"] == "skipped"
    assert "two transport mechanisms" in by["he-ckks+secagg"]["error"]["message"]
    # under HE the server applies the decrypted sum, as under secure aggregation
    he = by["dp-fedavg+he-ckks"]
    assert he["status"] == "ok" and he["metrics"]["privacy"]["mechanisms"]["dp-fedavg"][
        "noise"] == "distributed"


def test_dp_fedavg_with_the_default_aggregator_runs_and_its_epsilon_recomputes(run_matrix,
                                                                              tmp_path):
    """Example weights with McMahan et al.'s bounded weights and fixed denominator
    run under client-level DP; the recorded ε is the RDP accountant's for the
    recorded σ, q and rounds (recomputed here with Opacus directly)."""
    from opacus.accountants import RDPAccountant

    text = HEART.format(rounds=4, privacy='[{name = "dp-fedavg", noise_multiplier = 1.1}]')
    text = text.replace('aggregator = [{name = "weighted-mean", by = "uniform"}]\n', "")
    text += '[run]\nclients_per_round = 0.5\n'
    code, recs = run_matrix(text)
    assert code == 0 and recs[0]["status"] == "ok", recs[0]["error"]
    rec = recs[0]
    assert rec["config"]["aggregator"]["by"] == "examples"
    assert rec["config"]["run"]["client_sampling"] == "poisson"  # dp-fedavg's default
    p = rec["metrics"]["privacy"]
    acc = p["mechanisms"]["dp-fedavg"]
    released = acc["adversaries"]["released"]
    assert acc["weighting"] == "examples" and released["sample_rate"] == 0.5
    assert "Poisson sampling of clients with rate q = 0.5" in p["sampling"]
    assert released["steps"] == 4 == rec["config"]["rounds"]  # one accounted step per round
    ref = RDPAccountant()
    for _ in range(released["steps"]):
        ref.step(noise_multiplier=p["noise_multiplier"], sample_rate=released["sample_rate"])
    assert released["epsilon"] == pytest.approx(ref.get_epsilon(p["delta"]), rel=1e-9)
    assert p["by_adversary"]["released"] == released["epsilon"] and p["epsilon"] is None
    assert p["unit"] == "client" and p["mechanism"] == "dp-fedavg"
    # the rounds' weights are the fixed-denominator ones: w_k / (q W), w_k = n_k / max n
    sizes = {"Cleveland": 199, "Hungary": 172, "Switzerland": 30, "VA Long Beach": 85}
    W = sum(n / 199 for n in sizes.values())
    for h in rec["history"]:
        for site, w in h.get("weights", {}).items():
            assert w == pytest.approx(sizes[site] / 199 / (0.5 * W), rel=1e-5)
    assert rec["history"][0]["loss"] is None  # client losses are not sent under DP
    assert p["sent_in_clear"] == ["num_examples"] and "client_losses" in p
    assert p["public"].startswith("num_examples:") and "public metadata" in p["public"]
    # a data-dependent weighting has no bounded sensitivity: refused with the reason
    code, recs = run_matrix(text.replace('privacy = [{name = "dp-fedavg", noise_multiplier = 1.1}]',
                                         'privacy = ["dp-fedavg"]\naggregator = [{name = '
                                         '"weighted-mean", by = "quality"}]'),
                              out=tmp_path / "quality")
    assert recs[0]["status"] == "skipped"
    assert "uniform or example weights" in recs[0]["error"]["message"]


def test_stacks_whose_claim_would_not_hold_are_skipped_with_the_reason(run_matrix):
    """Client-level DP refuses what would leak around its noise or break its
    sensitivity bound; nothing of these cells trains."""
    code, recs = run_matrix("""
        rounds = 1
        [axes]
        dataset = ["heart-disease"]
        partitioner = [{ name = "natural", public_fraction = 0.1 }]
        algorithm = ["fedavg", "scaffold", "feddf"]
        aggregator = [{ name = "weighted-mean", by = "uniform" }]
        privacy = ["dp-fedavg", { name = "secagg", dropout_rate = 0.25 },
                   ["dp-fedavg", { name = "secagg", dropout_rate = 0.25 }]]
        compressor = ["none", "top-k"]
        [run.secagg]
        client_sampling = "poisson"
    """)
    assert code == 0
    by = {(r["labels"]["algorithm"], r["labels"]["privacy"], r["labels"]["compressor"]): r
          for r in recs}

    def reason(alg, priv, comp="none"):
        r = by[(alg, priv, comp)]
        return r["error"]["message"] if r["status"] == "skipped" else r["status"]

    assert "sensitivity bound" in reason("fedavg", "dp-fedavg", "top-k")
    assert "also sends ['control_delta']" in reason("scaffold", "dp-fedavg")
    assert "every client's model" in reason("feddf", "dp-fedavg")
    both = "dp-fedavg+secagg(dropout_rate=0.25)"
    assert "drops clients" in reason("fedavg", both)
    assert by[("fedavg", "dp-fedavg", "none")]["status"] == "ok"
    assert by[("fedavg", "secagg(dropout_rate=0.25)", "none")]["status"] == "ok"


def test_dp_sgd_refuses_performance_weights(run_matrix):
    text = HEART.format(rounds=1, privacy='["dp-sgd"]').replace(
        'by = "uniform"', 'by = "performance"')
    code, recs = run_matrix(text)
    assert code == 0 and recs[0]["status"] == "skipped"
    assert "outside the guarantee of dp-sgd" in recs[0]["error"]["message"]


def test_dropouts_need_uniform_weights_and_cannot_carry_distributed_noise(run_matrix, tmp_path):
    text = HEART.format(rounds=1, privacy='[{name = "secagg", dropout_rate = 0.25}]').replace(
        'by = "uniform"', 'by = "examples"')
    code, recs = run_matrix(text)
    assert code == 0 and recs[0]["status"] == "skipped"
    assert "uniform weights" in recs[0]["error"]["message"]
    code, recs = run_matrix(HEART.format(
        rounds=1, privacy='[["dp-fedavg", {name = "secagg", dropout_rate = 0.25}]]'),
        out=tmp_path / "distributed")
    assert code == 0 and len(recs) == 1 and recs[0]["status"] == "skipped"
    assert "drops clients" in recs[0]["error"]["message"]
    # central noise too: secagg's own dropouts rescale the survivors' sum by n/k, which
    # multiplies each clipped contribution past the bound the noise is calibrated to
    code, recs = run_matrix(HEART.format(
        rounds=1, privacy='[[{name = "dp-fedavg", noise = "central"}, '
                          '{name = "secagg", dropout_rate = 0.25}]]'), out=tmp_path / "central")
    assert code == 0 and len(recs) == 1 and recs[0]["status"] == "skipped"
    msg = recs[0]["error"]["message"]
    assert "rescale the survivors' sum" in msg and "network" in msg


# --------------------------------------------------------------------------
# transport mechanisms (secure aggregation has its own tests/test_secagg.py)
# --------------------------------------------------------------------------


@dataclass
class _Ctx:
    """The slice of CellContext a transport mechanism reads."""

    numel: int
    n: int
    round: int = 1
    seed: int = 0
    participants: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.participants = self.participants or list(range(self.n))
        self.num_clients = self.n
        self.layout = ParamLayout(("fc.weight", "fc.bias"), ((self.numel - 10,), (10,)))

    def rng(self, purpose: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, len(purpose), *extra])


def _vectors(n: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) * 0.05 for _ in range(n)]


# --------------------------------------------------------------------------
# CKKS
# --------------------------------------------------------------------------


def _he_ctx(numel: int, n: int):
    return _Ctx(numel=numel, n=n)


def test_he_ckks_sum_is_accurate_and_the_server_holds_no_secret_key():
    from fedmedbench.plugins.privacy.he_ckks import HECKKS, HEServer

    n, numel = 5, 9_000  # three chunks of 4096 slots
    mech = HECKKS()
    ctx = _he_ctx(numel, n)
    mech.setup(ctx)
    mech.begin_round(1)
    vecs = _vectors(n, numel, seed=2)
    msgs = [mech.encode(ctx, i, v) for i, v in enumerate(vecs)]
    assert all(len(m.payload["ciphertexts"]) == 3 for m in msgs)
    agg = mech.aggregate(ctx, msgs).double()
    plain = torch.stack(vecs).double().sum(0)
    assert float((agg - plain).norm() / plain.norm()) < 1e-4
    assert float((agg - plain).abs().max() / plain.abs().max()) < 1e-4
    # the server: a public context and ciphertexts, never a secret key
    server = mech.server
    assert isinstance(server, HEServer)
    assert not server.context.is_private() and not server.context.has_secret_key()
    seen, stack = set(), [server]
    while stack:  # walk everything the server object references
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if type(obj).__module__.startswith("tenseal") and hasattr(obj, "is_private"):
            assert not obj.is_private()
        stack.extend(vars(obj).values() if hasattr(obj, "__dict__") else
                     obj if isinstance(obj, (list, tuple)) else
                     obj.values() if isinstance(obj, dict) else [])
    import tenseal as ts

    ct = ts.ckks_vector_from(server.context, msgs[0].payload["ciphertexts"][0])
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        ct.decrypt()
    assert mech.key_holder._context.is_private()  # the key holder is the one that can decrypt
    acc = mech.report()
    assert acc["expansion"] > 5 and acc["encrypted_values"] == n * numel


def test_he_ckks_partial_layers_with_secagg_rest():
    from fedmedbench.plugins.privacy.he_ckks import HECKKS

    n, numel = 4, 3_000
    mech = HECKKS(layers=["fc.bias"], rest="secagg")
    ctx = _he_ctx(numel, n)
    mech.setup(ctx)
    mech.begin_round(1)
    vecs = _vectors(n, numel, seed=3)
    msgs = [mech.encode(ctx, i, v) for i, v in enumerate(vecs)]
    assert all(len(m.payload["ciphertexts"]) == 1 for m in msgs)  # 10 bias values
    assert all(m.readable is None for m in msgs)  # the rest is masked, not readable
    assert mech.report()["encrypted_values"] == n * 10
    agg = mech.aggregate(ctx, msgs).double()
    plain = torch.stack(vecs).double().sum(0)
    assert float((agg - plain).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="select no parameter"):
        HECKKS(layers=["conv"]).setup(ctx)


def test_parameter_errors_name_the_parameter():
    from fedmedbench.plugins.privacy.dp_fedavg import DPFedAvg
    from fedmedbench.plugins.privacy.dp_sgd import DPSGD
    from fedmedbench.plugins.privacy.he_ckks import HECKKS
    from fedmedbench.plugins.privacy.secagg import SecAgg

    for make, msg in [(lambda: DPSGD(accountant="gdp"),
                       r"dp-sgd\.accountant = 'gdp' is not one of the choices; allowed: "
                       r"accountant is one of 'rdp', 'prv'"),
                      (lambda: DPSGD(epsilon=-1.0), r"dp-sgd\.epsilon = -1\.0 is out of range"),
                      (lambda: DPFedAvg(target_quantile=1.5),
                       r"dp-fedavg\.target_quantile = 1\.5 is out of range"),
                      (lambda: DPFedAvg(noise="local"), r"noise ?= ?'local'"),
                      (lambda: SecAgg(field_bits=100), r"secagg\.field_bits = 100 is out of range"),
                      (lambda: HECKKS(poly_modulus_degree=4000),
                       r"he-ckks\.poly_modulus_degree = 4000 is not one of the choices"),
                      (lambda: HECKKS(poly_modulus_degree=4096,
                                      coeff_mod_bit_sizes=[60, 60, 60]), "128-bit")]:
        with pytest.raises(ValueError, match=msg):
            make()
    assert math.isclose(copy.deepcopy(DPSGD(epsilon=3)).params()["epsilon"], 3.0)


# --------------------------------------------------------------------------
# dp-fedavg: each refusal and each fix, with its message
# --------------------------------------------------------------------------


def test_distributed_noise_needs_a_secure_transport(run_matrix):
    """Without a transport the server would read each update with its noise
    share only (multiplier σ/√m): refused, naming the two fixes; with
    secagg in the stack the same setting runs, distributed."""
    code, recs = run_matrix(HEART.format(rounds=1, privacy="""[
        {name = "dp-fedavg", noise = "distributed"},
        [{name = "dp-fedavg", noise = "distributed"}, "secagg"]]"""))
    assert code == 0
    by = _by_privacy(recs)
    alone = by["dp-fedavg(noise=distributed)"]
    assert alone["status"] == "skipped"
    msg = alone["error"]["message"]
    assert "distributed noise without a secure transport" in msg
    assert "σ/√m" in msg and "add secure aggregation" in msg and 'noise = "central"' in msg
    fixed = by["dp-fedavg(noise=distributed)+secagg"]
    assert fixed["status"] == "ok", fixed["error"]
    assert fixed["metrics"]["privacy"]["mechanisms"]["dp-fedavg"]["noise"] == "distributed"
    assert "noise share reaches the sum" in fixed["metrics"]["privacy"]["sampling"]


def test_adaptive_clipping_with_distributed_noise_is_refused(run_matrix):
    """Adaptive clipping needs each client's clipped-or-not bit; with distributed
    noise no trusted server counts them in private: refused; a fixed clip, or
    central noise, runs."""
    code, recs = run_matrix(HEART.format(rounds=1, privacy="""[
        [{name = "dp-fedavg", target_quantile = 0.5}, "secagg"],
        [{name = "dp-fedavg", clip = 0.5}, "secagg"],
        {name = "dp-fedavg", target_quantile = 0.5, noise = "central"}]"""))
    assert code == 0
    by = _by_privacy(recs)
    bad = by["dp-fedavg(target_quantile=0.5)+secagg"]
    assert bad["status"] == "skipped"
    assert "adaptive clipping needs each client's clipped-or-not bit" in bad["error"]["message"]
    assert "use a fixed clip" in bad["error"]["message"]
    assert by["dp-fedavg(clip=0.5)+secagg"]["status"] == "ok"
    central = by["dp-fedavg(noise=central,target_quantile=0.5)"]
    assert central["status"] == "ok"
    assert central["metrics"]["privacy"]["mechanisms"]["dp-fedavg"]["adaptive_clipping"]


def test_epsilon_target_is_met_for_the_schedule_applied(run_matrix):
    """Target ε = 1 with σ decaying by 0.9 over 20 rounds (and a floor): σ_0 is
    solved for the decayed schedule, so the recorded ε is at most 1 (0.1 had
    σ solved for a constant schedule and recorded 5.36), and it is the
    accountant's ε for the recorded schedule."""
    code, recs = run_matrix(HEART.format(rounds=20, privacy="""[
        {name = "dp-fedavg", epsilon = 1.0, noise_decay = 0.9},
        {name = "dp-fedavg", epsilon = 1.0, noise_decay = 0.8, min_noise_multiplier = 10.0}]"""))
    assert code == 0, [r["error"] for r in recs]
    for r in recs:
        assert r["status"] == "ok", r["error"]
        p = r["metrics"]["privacy"]
        acc = p["mechanisms"]["dp-fedavg"]
        z = acc["noise_multipliers"]
        assert len(z) == 20 and acc["target_epsilon"] == 1.0
        eps = p["by_adversary"]["released"]  # central noise: planned for the released model
        assert 0.9 <= eps <= 1.0, eps
        assert eps == pytest.approx(epsilon_for([(s, 1.0, 1) for s in z], 1e-5))
        decay = r["config"]["privacy"][0]["noise_decay"]
        floor = r["config"]["privacy"][0]["min_noise_multiplier"]
        assert z == pytest.approx([max(floor, z[0] * decay ** t) for t in range(20)])
        assert r["history"][-1]["epsilon"] == p["epsilon"] is None  # the server's
    floored = [r for r in recs if r["config"]["privacy"][0]["min_noise_multiplier"] == 10.0][0]
    z = floored["metrics"]["privacy"]["mechanisms"]["dp-fedavg"]["noise_multipliers"]
    assert z[0] > 10.0 and z[-1] == 10.0  # the floor is part of the schedule solved for


def test_the_record_states_the_sampling_its_accountant_assumes(run_matrix, tmp_path):
    """dp-fedavg cells sample clients by Poisson by default (what the accountant
    assumes); fixed-size sampling set by the matrix is accounted with the
    Poisson bound and the record says it is an approximation."""
    text = HEART.format(rounds=2, privacy='["dp-fedavg"]') + "[run]\nclients_per_round = 2\n"
    code, recs = run_matrix(text)
    assert code == 0 and recs[0]["status"] == "ok", recs[0]["error"]
    p = recs[0]["metrics"]["privacy"]
    assert recs[0]["config"]["run"]["client_sampling"] == "poisson"
    assert p["sampling"] == ("Poisson sampling of clients with rate q = 0.5, as the accountant "
                             "assumes")
    assert p["mechanisms"]["dp-fedavg"]["adversaries"]["released"]["sample_rate"] == 0.5
    code, recs = run_matrix(text + 'client_sampling = "fixed"\n', out=tmp_path / "fixed")
    assert code == 0 and recs[0]["status"] == "ok", recs[0]["error"]
    p = recs[0]["metrics"]["privacy"]
    assert p["sampling"].startswith("fixed-size sampling of 2 clients per round")
    assert "Poisson-sampling bound at q = 0.5" in p["sampling"] and "approximation" in p["sampling"]
    assert [h["clients"] for h in recs[0]["history"]] == [2, 2]
    # q = 1: nothing to amplify, and the record says so
    code, recs = run_matrix(HEART.format(rounds=1, privacy='["dp-fedavg"]'), out=tmp_path / "all")
    assert "q = 1, no amplification" in recs[0]["metrics"]["privacy"]["sampling"]


# --------------------------------------------------------------------------
# secure aggregation's clip range: counted in the cost, warned about
# --------------------------------------------------------------------------


def test_secagg_clipping_is_counted_and_a_range_that_clips_most_warns(run_matrix, tmp_path,
                                                                      capsys):
    """Coordinates outside clip_range are clipped before encoding: the record's
    cost counts them; a range that clips most of an update warns in round 1,
    when the first such update is encoded (values are unknown before
    training), into record["warnings"] and on stderr."""
    code, recs = run_matrix(HEART.format(rounds=2, privacy='[{name = "secagg", '
                                                           'clip_range = 1e-4}]'))
    assert code == 0 and recs[0]["status"] == "ok", recs[0]["error"]
    rec = recs[0]
    cost = rec["metrics"]["cost"]
    assert cost["clipped_coordinates"] == rec["metrics"]["privacy"]["mechanisms"]["secagg"][
        "clipped_coordinates"]
    assert cost["clipped_coordinates"] > 0.5 * 2 * 4 * 32  # 2 rounds x 4 clients x 32 params
    warns = [w for w in rec["warnings"] if w["category"] == "SettingWarning"]
    assert len(warns) == 1 and warns[0]["count"] == 1
    assert "round-1 update" in warns[0]["message"] and "raise clip_range" in warns[0]["message"]
    assert "outside clip_range = ±0.0001" in warns[0]["message"]
    assert "warning: secagg:" in capsys.readouterr().err
    code, recs = run_matrix(HEART.format(rounds=2, privacy='["secagg"]'), out=tmp_path / "ok")
    rec = recs[0]
    assert rec["metrics"]["cost"]["clipped_coordinates"] == 0
    assert not [w for w in rec["warnings"] if w["category"] == "SettingWarning"]


# --------------------------------------------------------------------------
# every ε against the adversary it names (issue 19)
# --------------------------------------------------------------------------

EHR50 = """
    rounds = 10
    seeds = [0]
    [axes]
    dataset = [{{ name = "synthetic-ehr", n_hospitals = 50, n_patients = 3000 }}]
    algorithm = ["fedavg"]
    aggregator = [{{ name = "weighted-mean", by = "uniform" }}]
    privacy = {privacy}
    [run]
    clients_per_round = 0.5
    local_steps = 2
"""


def _opacus_rdp(zs: list[float], q: float, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for z in zs:
        acc.step(noise_multiplier=z, sample_rate=q)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("target", [3.0, 8.0])
def test_adaptive_clipping_epsilon_equals_an_independent_computation(run_matrix, target):
    """The count of clip bits is centred (sensitivity 1/2), so the sum noise
    z_Δ and the count noise σ_b compose to z: the recorded ε equals Opacus's
    RDP accountant at z_eff = (z_Δ⁻² + (2σ_b)⁻²)^-1/2, recomputed here from the
    recorded z_Δ and σ_b (0.2 summed uncentred bits of sensitivity 1: its
    claim held only for (z_Δ⁻² + σ_b⁻²)^-1/2, a far larger ε)."""
    code, recs = run_matrix(EHR50.format(privacy=(
        f'[{{name = "dp-fedavg", epsilon = {target}, target_quantile = 0.5}}]')))
    assert code == 0, recs[0]["error"]
    p = recs[0]["metrics"]["privacy"]
    mech = p["mechanisms"]["dp-fedavg"]
    released = mech["adversaries"]["released"]
    q, delta, sb = released["sample_rate"], mech["delta"], mech["count_noise"]
    assert q == 0.5 and mech["adaptive_clipping"] and mech["noise"] == "central"
    zu = mech["update_noise_multipliers"]
    assert len(zu) == 10
    z_eff = [(z ** -2 + (2 * sb) ** -2) ** -0.5 for z in zu]
    assert released["epsilon"] == pytest.approx(_opacus_rdp(z_eff, q, delta), abs=1e-6)
    assert 0.97 * target <= released["epsilon"] <= target
    uncentred = _opacus_rdp([(z ** -2 + sb ** -2) ** -0.5 for z in zu], q, delta)
    assert uncentred > 1.3 * released["epsilon"]  # what summing 0/1 bits would have cost
    # central noise: the server adds it and reads what it noises, so no ε against it
    assert mech["adversaries"]["server"]["protected"] is False
    assert p["epsilon"] is None and p["adversary"] == "server" and p["protected"] is False
    assert p["by_adversary"]["released"] == pytest.approx(released["epsilon"])
    assert "clip_bit" in p["sent_in_clear"]


def test_distributed_noise_is_planned_and_recorded_against_the_server(run_matrix):
    """Under secure aggregation the server knows who took part: its ε uses no
    amplification by client sampling (each client's rounds compose at q = 1,
    the client that took part most counts), and the target is planned for
    it; the released model's ε (amplified at q) is recorded beside it."""
    code, recs = run_matrix(EHR50.format(privacy='[["dp-fedavg", "secagg"]]').replace(
        '"dp-fedavg"', '{name = "dp-fedavg", epsilon = 8.0}'))
    assert code == 0, recs[0]["error"]
    rec = recs[0]
    p = rec["metrics"]["privacy"]
    mech = p["mechanisms"]["dp-fedavg"]
    server, released = mech["adversaries"]["server"], mech["adversaries"]["released"]
    assert mech["noise"] == "distributed" and mech["planned_sample_rate"] == 1.0
    # who took part, from the record's own history (the server saw it)
    rounds_of: dict[str, int] = {}
    for h in rec["history"]:
        for site in h.get("weights", {}):
            rounds_of[site] = rounds_of.get(site, 0) + 1
    most = max(rounds_of.values())
    assert server["steps"] == most and server["sample_rate"] == 1.0 and not server["amplified"]
    zs = mech["noise_multipliers"]
    assert server["epsilon"] == pytest.approx(_opacus_rdp(zs[:most], 1.0, mech["delta"]),
                                              rel=1e-9)
    assert server["epsilon"] <= 8.0
    assert released["amplified"] and released["sample_rate"] == 0.5
    assert released["epsilon"] < server["epsilon"]
    assert p["epsilon"] == pytest.approx(server["epsilon"]) and p["adversary"] == "server"
    assert mech["adversaries"]["client"]["epsilon"] == pytest.approx(server["epsilon"])


def test_a_canary_more_or_fewer_changes_no_dp_sgd_parameter(run_matrix, tmp_path):
    """q, σ and the batch divisor come from each site's public count (before
    canaries), so the audit's canaries cannot change the mechanism."""
    text = """
        rounds = 2
        [axes]
        dataset = [{ name = "synthetic-tabular", n_samples = 300 }]
        algorithm = ["fedavg"]
        privacy = [{ name = "dp-sgd", epsilon = 3.0 }]
        [run]
        batch_size = 16
        local_steps = 3
        [evaluate]
        attacks = [{ name = "audit-canary", m = M }]
    """
    out = {}
    for m in (40, 41):
        code, recs = run_matrix(text.replace("M", str(m)), out=tmp_path / f"m{m}")
        assert code == 0, recs[0]["error"]
        rec = recs[0]
        assert rec["metrics"]["canaries"]["m"] == m
        out[m] = rec["metrics"]["privacy"]["mechanisms"]["dp-sgd"]["per_site"]
    assert out[40] == out[41]
    for site in out[40].values():
        assert site["records"] * site["sample_rate"] >= site["expected_batch"] >= 1
