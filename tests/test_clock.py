"""The hospital-network twin (issue 21): site profiles, the virtual clock,
dropouts through the transport's recovery, the buffered protocol, time to target."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedmedbench import run_cell
from fedmedbench.clock import (
    AsyncTwin,
    Twin,
    _cache_path,
    _cache_write,
    availability_process,
    completion_probability,
    reference_step,
    resolve_time_to_target,
    time_to_target,
)
from fedmedbench.components import Availability, SiteProfile
from fedmedbench.errors import ConfigError
from fedmedbench.matrix import load_matrix, parse_matrix
from fedmedbench.registry import get_registry

CLOCK_KEYS = ("clock_s", "bytes", "dropouts", "aborted", "staleness", "trained")


@pytest.fixture(scope="module")
def reg():
    return get_registry()


def _cells(reg, axes, *, rounds=3, run=None, seeds=(0,), evaluate=None):
    raw = {"rounds": rounds, "seeds": list(seeds),
           "axes": {"dataset": ["heart-disease"], "algorithm": ["fedavg"], **axes},
           "run": dict(run or {})}
    if evaluate:
        raw["evaluate"] = evaluate
    return parse_matrix(raw, registry=reg).cells


def _one(reg, axes, **kw):
    cells = _cells(reg, axes, **kw)
    assert len(cells) == 1
    return cells[0]


def _without_clock(rec):
    """A record's results without the clock's fields and wall-clock seconds."""
    r = json.loads(json.dumps(rec))
    m = r["metrics"]
    m.pop("clock", None)
    m["cost"] = {k: v for k, v in m["cost"].items() if not k.endswith("_s")}
    for a in m.get("attacks", {}).values():
        a.pop("seconds", None)
    for h in r["history"]:
        for k in CLOCK_KEYS:
            h.pop(k, None)
    return {k: r[k] for k in ("status", "error", "metrics", "history")}


# --------------------------------------------------------------------------
# uniform changes nothing
# --------------------------------------------------------------------------


def test_uniform_reproduces_the_quickstart_bit_for_bit(reg):
    """Every quickstart cell (seed 0) on the default network equals the same
    cell with the twin off: utility, every history entry, ε, bytes, attacks."""
    m = load_matrix(registry=reg, select=["seed=0"])
    cells = m.cells
    assert len(cells) >= 6 and all("network" not in c["config"] for c in cells)
    for c in cells:
        off = {**c, "config": {**c["config"], "network": None}}
        a, b = run_cell(c, registry=reg), run_cell(off, registry=reg)
        assert a["status"] == b["status"] == "ok", (a["error"], b["error"])
        assert "clock" in a["metrics"] and "clock" not in b["metrics"]
        assert all("clock_s" in h for h in a["history"])
        assert not any("clock_s" in h for h in b["history"])
        assert _without_clock(a) == _without_clock(b), c["labels"]
        clock = a["metrics"]["clock"]
        assert clock["profile"] == "uniform" and clock["dropouts"] == 0
        assert clock["total_s"] == a["history"][-1]["clock_s"] > 0


def test_the_default_network_keeps_cell_ids_and_labels_it(reg):
    plain = _one(reg, {})
    named = _one(reg, {"network": ["uniform"]})
    off = _one(reg, {"network": ["none"]})
    assert plain["cell_id"] == named["cell_id"] != off["cell_id"]
    assert "network" not in plain["config"] and off["config"]["network"] is None
    assert plain["labels"]["network"] == "uniform" and off["labels"]["network"] == "none"
    mix = _one(reg, {"network": [{"name": "hospital-mix", "deadline_s": 5}]})
    assert mix["config"]["network"]["deadline_s"] == 5.0 and mix["cell_id"] != plain["cell_id"]


def test_evaluate_clock_settings_are_checked(reg):
    with pytest.raises(ConfigError, match="target_fraction"):
        _cells(reg, {}, evaluate={"target_fraction": 1.5})
    with pytest.raises(ConfigError, match="targets"):
        _cells(reg, {}, evaluate={"targets": "high"})
    with pytest.raises(ConfigError, match="no network 'campus'"):
        _cells(reg, {"network": ["campus"]})
    c = _one(reg, {}, evaluate={"targets": [0.7], "time_budget_h": 1})
    plain = _one(reg, {})
    assert c["clock"] == {"targets": [0.7], "budget_s": 3600.0}
    assert c["cell_id"] == plain["cell_id"]  # evaluation settings do not change the cell


# --------------------------------------------------------------------------
# the clock's pieces
# --------------------------------------------------------------------------


def test_on_off_availability_is_stationary_and_consistent():
    a = Availability("onoff", mean_up_s=300.0, mean_down_s=100.0)
    p = availability_process(a, np.random.default_rng(0))
    ts = np.arange(0.0, 2e5, 7.0)
    up = np.array([p.online(t) for t in ts])
    assert abs(up.mean() - 0.75) < 0.03
    for t in ts[:500]:
        off, on = p.next_off(t), p.next_on(t)
        if p.online(t):
            assert on == t and off > t and not p.online(off) and p.online((t + off) / 2)
        else:
            assert off == t and on > t and p.online(on)


def test_trace_availability_repeats_and_joins_adjacent_periods():
    a = Availability("trace", intervals=((0.0, 10.0), (10.0, 20.0), (30.0, 40.0)),
                     period_s=50.0)
    p = availability_process(a, np.random.default_rng(0))
    assert p.online(5) and p.online(15) and not p.online(25) and p.online(35)
    assert p.next_off(5) == 20.0  # the two adjacent periods are one
    assert p.next_on(25) == 30.0 and p.next_on(45) == 50.0  # the next period
    assert p.online(55) and not p.online(75)
    with pytest.raises(ValueError, match="period_s"):
        Availability("trace", intervals=((0.0, 10.0),), period_s=5.0)


def _twin(profiles, *, steps=10.0, deadline=None, ref=0.01):
    return Twin(label="t", names=[f"s{i}" for i in range(len(profiles))], profiles=profiles,
                steps=[steps] * len(profiles), reference_step_s=ref, reference_source="pinned",
                deadline_s=deadline, seed=0)


def test_a_round_lasts_the_slowest_clients_download_training_and_upload():
    fast = SiteProfile(speed=2.0, up_mbps=8.0, down_mbps=80.0, latency_ms=10.0, preset="a")
    slow = SiteProfile(speed=0.5, up_mbps=0.8, down_mbps=8.0, latency_ms=50.0, preset="b")
    tw = _twin([fast, slow])
    tl = tw.timeline([0, 1], down_bytes=1_000_000, up_bytes=[100_000, 100_000])
    # fast: 0.01 + 1e6/1e7 + 10·0.01/2 + 0.01 + 1e5/1e6 = 0.27; slow: 0.05 + 1 + 0.2 + 0.05 + 1
    assert tl.done[0] == pytest.approx(0.27) and tl.done[1] == pytest.approx(2.3)
    out = tw.close_round(tl, contributors=[0, 1], round=1, bytes_up=200_000,
                         bytes_down=2_000_000)
    assert out["clock_s"] == pytest.approx(2.3) and "dropouts" not in out
    # a deadline cuts the slow client: it drops out, and the round ends at the deadline
    tw2 = _twin([fast, slow], deadline=1.0)
    tl2 = tw2.timeline([0, 1], down_bytes=1_000_000, up_bytes=[100_000, 100_000])
    assert tl2.dropped == {1: ("deadline", "masking", 1.0)} and tl2.lost == {1}
    out2 = tw2.close_round(tl2, contributors=[0], round=1)
    assert out2["clock_s"] == pytest.approx(1.0) and out2["dropouts"] == {"deadline": ["s1"]}
    assert tw2.summary()["participation"] == {"s0": 1, "s1": 0}


def test_a_round_of_many_clients_is_timed_at_once_as_one_by_one():
    """Where nobody can drop out, the timeline of all clients at once (array
    operations) is the client-by-client one bit for bit: every time, the
    round's end, the unmasking trip, with and without cryptographic seconds."""
    rng = np.random.default_rng(5)
    profiles = [SiteProfile(speed=float(rng.uniform(0.2, 3)), up_mbps=float(rng.uniform(0.5, 90)),
                            down_mbps=float(rng.choice([rng.uniform(1, 900), np.inf])),
                            latency_ms=float(rng.uniform(1, 80)), preset="x") for _ in range(40)]
    tw = _twin(profiles, steps=7.0, ref=0.0137)
    assert not tw.drops
    tw.now = 12.345
    clients = [int(c) for c in rng.permutation(40)[:31]]
    up = [int(b) for b in rng.integers(1, 10**7, len(clients))]
    for crypto in ({}, {c: float(rng.random()) for c in clients[::3]}):
        for unmasking in (False, True):
            fast = tw.timeline(clients, down_bytes=987_654, up_bytes=up, crypto_s=crypto,
                               unmasking=unmasking)
            one = tw.timeline(clients, down_bytes=987_654, up_bytes=up, crypto_s=crypto,
                              unmasking=unmasking, steps={})  # the loop: no step given
            assert fast.done == one.done and list(fast.done) == clients
            assert (fast.end, fast.upload_end, fast.dropped) == (one.end, one.upload_end, {})
            assert fast.end > tw.now


def test_a_client_offline_before_its_upload_ends_drops_out():
    trace = Availability("trace", intervals=((0.0, 0.5), (3.0, 100.0)), period_s=100.0)
    p = SiteProfile(up_mbps=math.inf, down_mbps=math.inf, latency_ms=0.0, availability=trace)
    tw = _twin([SiteProfile(), p], steps=100.0)  # 1 s of training each
    on, off = tw.available([0, 1])
    assert (on, off) == ([0, 1], [])
    tl = tw.timeline([0, 1], down_bytes=0, up_bytes=[0, 0])
    assert tl.dropped[1] == ("offline", "masking", 0.5)
    tw.close_round(tl, contributors=[0], round=1)
    assert tw.available([0, 1]) == ([0], [1])  # still offline at 1 s, the next round's start


def test_the_reference_step_is_measured_once_and_leaves_the_generators(tmp_path, monkeypatch):
    from fedmedbench.training import RunSettings

    monkeypatch.setenv("FEDMEDBENCH_CACHE_DIR", str(tmp_path))
    spec = {"name": "mlp", "hidden": [4]}
    factory = lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5),  # noqa: E731
                                          torch.nn.Linear(4, 2))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    s1, how1 = reference_step(factory, input_shape=(3,), num_classes=2,
                              settings=RunSettings(batch_size=8), spec=spec)
    assert torch.equal(torch.get_rng_state(), before)
    s2, how2 = reference_step(factory, input_shape=(3,), num_classes=2,
                              settings=RunSettings(batch_size=8), spec=spec)
    assert (how1, how2) == ("measured", "cached") and s1 == s2 > 0
    # two processes measuring at once: the first written wins, the second reads it
    key = {"k": 1}
    assert _cache_write(_cache_path(key), key, 0.5) == 0.5
    assert _cache_write(_cache_path(key), key, 0.7) == 0.5


def test_buffered_events_order_arrivals_and_count_staleness():
    fast = SiteProfile(speed=4.0, preset="fast")
    slow = SiteProfile(speed=0.25, preset="slow")
    tw = AsyncTwin(buffer_size=1, concurrency=2, max_staleness=0, up_bytes=0, down_bytes=0,
                   label="t", names=["f", "s"], profiles=[fast, slow], steps=[10.0, 10.0],
                   reference_step_s=0.01, reference_source="pinned", deadline_s=None, seed=0)
    taus = []
    for t in range(1, 25):  # the slow site takes 16 of the fast one's updates
        entries, at = tw.next_buffer()
        assert len(entries) == 1
        taus.append(tw.version - entries[0].version)
        tw.applied(entries, at, round=t, contributors=[entries[0].client])
    part = tw.summary()["participation"]
    assert part["f"] > part["s"] >= 1  # the fast site reaches the server more often
    assert max(taus) >= 1 and 0 in taus  # the slow site's update arrives stale


# --------------------------------------------------------------------------
# time to target
# --------------------------------------------------------------------------


def _hist(us, dt=10.0, b=100):
    return [{"round": i + 1, "utility": u, "clock_s": dt * (i + 1),
             "bytes": {"up": b * (i + 1), "down": b * (i + 1)}} for i, u in enumerate(us)]


def test_time_to_target_reads_the_first_round_at_or_above_it():
    h = _hist([0.5, 0.7, 0.69, 0.8])
    assert time_to_target(h, 0.7) == {"target": 0.7, "reached": True, "round": 2,
                                      "clock_s": 20.0, "bytes": 400}
    assert time_to_target(h, 0.9)["reached"] is False


def test_the_pooled_baseline_is_read_from_the_centralized_record():
    cfg = {"dataset": {"name": "d"}, "partitioner": {"name": "p"}, "model": None,
           "run": {"lr": 0.1, "clients_per_round": 0.5}, "seed": 0}
    pooled = {"status": "ok", "protocol": "pooled", "config": {**cfg, "run": {"lr": 0.1}},
              "metrics": {"utility": {"global": 0.8}}, "history": []}
    fed = [{"status": "ok", "protocol": "federated", "labels": {"algorithm": "fedavg",
                                                                "seed": str(s)},
            "config": {**cfg, "seed": 0}, "history": _hist(us),
            "metrics": {"clock": {"time_to_target": {"fraction": 0.95}}}}
           for s, us in ((0, [0.5, 0.77]), (1, [0.5, 0.6]))]
    resolve_time_to_target([pooled, *fed])
    t0 = fed[0]["metrics"]["clock"]["time_to_target"]
    assert t0["pooled_baseline"] == 0.8 and t0["pooled"]["round"] == 2
    assert fed[1]["metrics"]["clock"]["time_to_target"]["pooled"]["reached"] is False
    for r in fed:
        r["labels"] = {"algorithm": "fedavg"}  # two seeds of one cell
    p = completion_probability(fed, budget_s=25.0, fraction=0.95)
    assert list(p.values())[0]["p"] == 0.5
    assert list(completion_probability(fed, budget_s=15.0, target=0.7).values())[0]["p"] == 0.0


# --------------------------------------------------------------------------
# the twin in a cell
# --------------------------------------------------------------------------


def test_a_deadline_drops_the_clinics_and_the_server_reads_the_others(reg):
    net = {"name": "hospital-mix", "academic": 0.5, "community": 0.0, "clinic": 0.5,
           "assign": "size", "deadline_s": 0.05, "outages": False}
    c = _one(reg, {"network": [net]}, rounds=4, run={"eval_every": 1})
    rec = run_cell(c, registry=reg)
    assert rec["status"] == "ok", rec["error"]
    clock = rec["metrics"]["clock"]
    assert clock["presets"] == {"academic-hospital": 2, "clinic-mobile": 2}
    assert clock["dropouts_by_reason"] == {"deadline": 8}
    assert clock["per_round_s"] == [0.05] * 4  # every round ends at the deadline
    for h in rec["history"]:  # the clinics' updates never reached the mean
        assert len(h["dropouts"]["deadline"]) == 2
        assert set(h["weights"]).isdisjoint(h["dropouts"]["deadline"])
        assert sum(h["weights"].values()) == pytest.approx(1.0)
    assert rec["history"][-1]["bytes"] == {"up": rec["metrics"]["cost"]["bytes_up"],
                                           "down": rec["metrics"]["cost"]["bytes_down"]}
    assert sorted(v for v in clock["participation"].values()) == [0, 0, 4, 4]


def test_secagg_under_community_hospital_outages_recovers_aborts_and_counts(reg):
    """Dropouts happen, secagg's recovery runs, a round past the threshold
    aborts and is recorded (the model unchanged), and dp-fedavg's ε against
    the server composes only the rounds whose update reached the sum, at the
    noise those rounds carried."""
    from fedmedbench.accounting import epsilon_for

    net = {"name": "community-hospital", "mean_up_h": 0.0002, "mean_down_min": 0.004}
    c = _one(reg, {"network": [net], "privacy": [["dp-fedavg", "secagg"]]}, rounds=16,
             run={"eval_every": 1})
    rec, out = run_cell(c, registry=reg, keep_run=True)
    assert rec["status"] == "ok", rec["error"]
    clock = rec["metrics"]["clock"]
    hist = rec["history"]
    assert clock["dropouts"] > 0 and clock["aborted_rounds"]
    aborted = [h for h in hist if "aborted" in h]
    assert [h["round"] for h in aborted] == clock["aborted_rounds"]
    assert all("SecAggAborted" in h["aborted"] and "threshold" in h["aborted"] for h in aborted)
    mech = rec["metrics"]["privacy"]["mechanisms"]
    assert mech["secagg"]["recovered_rounds"] >= 1  # dropouts unmasked away, sum released
    for h in aborted:  # nothing released: the model is the previous round's
        prev = next(p for p in hist if p["round"] == h["round"] - 1) if h["round"] > 1 else None
        if prev is not None:
            assert h["utility"] == prev["utility"]
    # the server's ε: each client's released rounds (its update in the sum), at their noise
    dp = mech["dp-fedavg"]
    z0 = dp["noise_multiplier"]
    short = {int(t): v for t, v in dp.get("dropout_rounds", {}).items()}
    assert short, "some released round lacked a dropped client's noise share"
    names = out.ctx.client_names
    rounds_of: dict[str, list[int]] = {n: [] for n in names}
    for h in hist:
        if "aborted" in h or not h.get("clients"):
            continue
        gone = set(h.get("dropouts", {}).get("offline", [])) | set(
            h.get("dropouts", {}).get("deadline", [])) | set(
            h.get("dropouts", {}).get("unavailable", []))
        for n in names:
            if n not in gone:
                rounds_of[n].append(h["round"])
    assert {n: len(r) for n, r in rounds_of.items()} == clock["participation"]

    def z(t):
        if t in short:
            return z0 * math.sqrt(short[t]["arrived"] / short[t]["sampled"])
        return z0

    want = max(epsilon_for([(z(t), 1.0, 1) for t in r], dp["delta"], "rdp")
               for r in rounds_of.values() if r)
    server = dp["adversaries"]["server"]
    assert server["epsilon"] == pytest.approx(want, rel=1e-9)
    assert server["steps"] == max(clock["participation"].values())
    assert rec["metrics"]["privacy"]["epsilon"] == pytest.approx(want, rel=1e-9)
    # counting every sampled round at the planned noise would claim less
    naive = epsilon_for([(z0, 1.0, 1)] * len(hist), dp["delta"], "rdp")
    assert want != pytest.approx(naive)


@pytest.mark.parametrize("privacy,why", [
    (["test-secagg-no-drop"], "no dropout path"),
    ([{"name": "secagg", "dropout_rate": 0.25}], "dropout rate to 0")])
def test_transports_that_cannot_take_the_twins_dropouts_are_skipped(monkeypatch, privacy, why):
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_test_plugins")  # test-secagg-no-drop
    reg = get_registry()
    net = {"name": "community-hospital", "mean_up_h": 0.001}
    aggregator = [{"name": "weighted-mean", "by": "uniform"}]
    c = _one(reg, {"network": [net], "privacy": [privacy], "aggregator": aggregator},
             rounds=1)
    rec = run_cell(c, registry=reg)
    assert rec["status"] == "skipped" and why in rec["error"]["message"], rec["error"]


# --------------------------------------------------------------------------
# the buffered protocol
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["loop", "vectorized"])
def test_fedbuff_with_every_client_in_the_buffer_is_fedavg(reg, backend):
    run = {"clients_per_round": 1.0, "eval_every": 1}
    a = {**_one(reg, {}, rounds=4, run=run), "backend": backend}
    b = {**_one(reg, {"algorithm": [{"name": "fedbuff", "buffer_size": 4, "concurrency": 4}]},
                rounds=4, run=run), "backend": backend}
    ra, oa = run_cell(a, registry=reg, keep_run=True)
    rb, ob = run_cell(b, registry=reg, keep_run=True)
    assert ra["status"] == rb["status"] == "ok", (ra["error"], rb["error"])
    assert rb["backend"]["name"] == backend
    assert torch.equal(oa.global_params, ob.global_params)
    assert ra["metrics"]["utility"] == rb["metrics"]["utility"]
    for ha, hb in zip(ra["history"], rb["history"]):
        assert (ha["loss"], ha["weights"], ha["utility"]) == (hb["loss"], hb["weights"],
                                                              hb["utility"])
        assert hb["staleness"] == {"mean": 0.0, "max": 0} and hb["trained"] == 4
    assert rb["metrics"]["clock"]["staleness"]["max"] == 0


def test_fedbuff_on_heterogeneous_sites_is_stale_and_faster_per_update(reg):
    net = {"name": "hospital-mix", "academic": 0.5, "community": 0.0, "clinic": 0.5,
           "assign": "size", "outages": False}
    run = {"clients_per_round": 1.0, "eval_every": 1}
    sync = run_cell(_one(reg, {"network": [net]}, rounds=6, run=run), registry=reg)
    buff = run_cell(_one(reg, {"network": [net], "algorithm": [
        {"name": "fedbuff", "buffer_size": 2, "concurrency": 4}]}, rounds=6, run=run),
        registry=reg)
    assert sync["status"] == buff["status"] == "ok", buff["error"]
    c = buff["metrics"]["clock"]
    assert c["async"] == {"buffer_size": 2, "concurrency": 4, "max_staleness": None}
    assert c["staleness"]["max"] >= 1 and all("staleness" in h for h in buff["history"])
    # the fast pair fills a buffer before the clinics arrive: a server update takes less
    # virtual time than a synchronous round, which waits for the slowest clinic
    assert c["total_s"] / 6 < sync["metrics"]["clock"]["total_s"] / 6
    clock_s = [h["clock_s"] for h in buff["history"]]
    assert clock_s == sorted(clock_s)


def test_fedasync_mixes_each_arrival_and_refuses_a_transport(reg):
    net = {"name": "hospital-mix", "outages": False}
    alg = [{"name": "fedasync", "concurrency": 3}]
    rec = run_cell(_one(reg, {"network": [net], "algorithm": alg}, rounds=8,
                        run={"clients_per_round": 1.0}), registry=reg)
    assert rec["status"] == "ok", rec["error"]
    assert all(h["clients"] == 1 for h in rec["history"])
    assert rec["metrics"]["clock"]["async"]["buffer_size"] == 1
    skipped = run_cell(_one(reg, {"network": [net], "algorithm": alg, "privacy": ["secagg"]},
                            rounds=1), registry=reg)
    assert skipped["status"] == "skipped" and "hides nothing" in skipped["error"]["message"]
    off = run_cell(_one(reg, {"network": ["none"], "algorithm": alg}, rounds=1), registry=reg)
    assert off["status"] == "skipped" and "virtual clock" in off["error"]["message"]


def test_fedbuff_under_secagg_and_dp_notes_what_amplification_does_not_cover(reg):
    alg = [{"name": "fedbuff", "buffer_size": 2, "concurrency": 4}]
    net = {"name": "hospital-mix", "outages": False}
    rec = run_cell(_one(reg, {"network": [net], "algorithm": alg,
                              "privacy": [["dp-fedavg", "secagg"]]}, rounds=4,
                        run={"clients_per_round": 1.0}), registry=reg)
    assert rec["status"] == "ok", rec["error"]
    dp = rec["metrics"]["privacy"]["mechanisms"]["dp-fedavg"]
    assert dp["noise"] == "distributed" and dp["sample_rate"] == 1.0
    assert sum(rec["metrics"]["clock"]["participation"].values()) == 2 * 4
    assert "Poisson" in rec["metrics"]["clock"]["privacy_note"]


def _trace_network(tmp_path, offline_site: str, names: list[str]) -> dict:
    """Every site online for good, except ``offline_site``: online for the
    first microsecond only (it drops out of round 1, then is unavailable)."""
    rows = ["site,start_s,end_s"] + [f"{n},0,1000000000" for n in names if n != offline_site]
    rows.append(f"{offline_site},0,0.000001")
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(rows) + "\n")
    return {"name": "community-hospital", "trace": str(path), "up_mbps": math.inf,
            "down_mbps": math.inf, "latency_ms": 0.0}


@pytest.mark.parametrize("transport", [
    "secagg", {"name": "secagg-plus", "dropout_fraction": 0.3}, "he-ckks"])
def test_secure_aggregation_recovers_the_twins_dropout_to_the_plaintext_mean(
        reg, tmp_path, transport):
    """One hospital drops out of round 1 (an availability trace file) and is
    offline afterwards: the secure sum, recovered and divided by the
    survivors' weights, gives the model the plaintext round gives (CKKS:
    the encrypted sum of the ciphertexts that arrived)."""
    names = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    net = _trace_network(tmp_path, "Hungary", names)
    plain, pout = run_cell(_one(reg, {"network": [net]}, rounds=3), registry=reg,
                           keep_run=True)
    masked, mout = run_cell(_one(reg, {"network": [net], "privacy": [[transport]]},
                                 rounds=3), registry=reg, keep_run=True)
    assert plain["status"] == masked["status"] == "ok", (plain["error"], masked["error"])
    for rec in (plain, masked):
        clock = rec["metrics"]["clock"]
        assert clock["card"]["trace"] == net["trace"]
        assert rec["history"][0]["dropouts"] == {"offline": ["Hungary"]}
        assert rec["history"][1]["dropouts"] == {"unavailable": ["Hungary"]}
        assert clock["participation"] == {"Cleveland": 3, "Hungary": 0, "Switzerland": 3,
                                          "VA Long Beach": 3}
    mech = masked["metrics"]["privacy"]["mechanisms"]
    name = transport if isinstance(transport, str) else transport["name"]
    assert mech[name]["recovered_rounds"] == 1 and mech[name]["dropouts"] == 1
    assert masked["history"][0]["clients"] == 4 and "aborted" not in masked["history"][0]
    diff = float((pout.global_params - mout.global_params).abs().max())
    assert diff < 1e-4, diff
