"""The threat model is the round's data flow (issue 18): red-team tests.

Adversarial plugins (tests/fmb_redteam_plugins.py), registered through a
real entry point, walk everything reachable from what the engine hands them
(attributes, closures, ``__self__``, containers, ``gc.get_referrers`` of the
tensors they hold) and the test checks what they reached against what each
client computed (recorded by the client half of the same algorithm):

- the algorithm's **server half** (every round), an **attack** (after the
  last round) and an **observer** (every round) must not reach any client's
  individual update or local model beyond what the transport shows the
  server, nor any party's secret (X25519 keys, AES-GCM keys, secure
  aggregation's client state, a CKKS secret key);
- what the threat model grants is explicit: under plaintext the server reads
  each client's update of the round it is in, and the attack the rounds
  whose server views are kept; under secure aggregation and HE nothing
  individual; under partial HE with plaintext ``rest`` the unencrypted
  layers (so only the encrypted coordinates are checked).

A leak is a reachable vector whose protected coordinates are a non-zero
multiple of a client's delta (cosine above 0.999: weighting and clipping are
multiples), or one that minus the client's starting model is (a local model).
The test first checks the detector can discriminate: no round's aggregate is
that close to any single client's delta.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmedbench import run_cell
from fedmedbench.matrix import parse_matrix
from fedmedbench.registry import get_registry

ROOT = Path(__file__).resolve().parent.parent

HERE = Path(__file__).parent
COS = 0.999

SCENARIOS = {
    "none": ["none"],
    "secagg": ["secagg"],
    "secagg-plus": [{"name": "secagg-plus", "neighbours": 2}],
    "he-ckks": ["he-ckks"],
    "he-ckks-partial": [{"name": "he-ckks", "layers": ["fc"]}],
    "dp-fedavg+secagg": [["dp-fedavg", "secagg"]],
}


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory):
    """The red-team plugins installed as a distribution with an entry point."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "fmb_redteam-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fmb-redteam\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedmedbench]\nredteam = fmb_redteam_plugins\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(HERE))
        mp.syspath_prepend(str(site))
        import fmb_redteam_plugins as mod

        reg = get_registry(refresh=True)
        assert reg.get("algorithm", "redteam-fedavg").plugin == "redteam"  # via the entry point
        yield mod, reg
    get_registry(refresh=True)
    sys.modules.pop("fmb_redteam_plugins", None)


def _cell(reg, privacy, *, backend: str, algorithm="redteam-fedavg", rounds: int = 3,
          attacks=("redteam-walk",), extra: dict | None = None) -> dict:
    # seed 1: under seed 0, round 3 of dp-fedavg samples one dominant client (the mean 0.990
    # cos its delta), which leaves _check_discriminates no room to tell a leak from the mean
    raw = {"name": "threat", "rounds": rounds, "seeds": [1],
           "axes": {"dataset": ["heart-disease"], "algorithm": [algorithm], "privacy": privacy,
                    "model": [{"name": "mlp", "hidden": [8]}]},
           "evaluate": {"attacks": list(attacks)}, **(extra or {})}
    cells = parse_matrix(raw, registry=reg).cells
    assert len(cells) == 1
    return {**cells[0], "backend": backend}


def _protected(scenario: str, d: int) -> np.ndarray:
    """Coordinates whose individual values the server must not read."""
    if scenario == "he-ckks-partial":  # fc.weight (2x8) and fc.bias (2) are encrypted
        mask = np.zeros(d, dtype=bool)
        mask[d - 18:] = True
        return mask
    return np.ones(d, dtype=bool)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na < 1e-9 or nb < 1e-9:
        return 0.0
    return abs(float(a @ b)) / (na * nb)


def _leaks(found: dict, truth: dict, mask: np.ndarray, granted) -> list[str]:
    """What ``found`` reached beyond what is ``granted`` (a predicate on the
    round). A vector is explained by a granted entry when it matches it at
    least as well as any entry it is not granted (a client's updates of
    consecutive rounds can be nearly collinear)."""
    out = []
    d = mask.size
    for a in found["arrays"]:
        if a.size != d:
            continue
        score: dict[tuple, tuple[float, str]] = {}
        for key, t in truth.items():
            delta, start = t["delta"][mask], t["start"][mask]
            cu, cm = _cos(a[mask], delta), _cos(a[mask] - start, delta)
            score[key] = max((cu, "its update"), (cm, "its local model"))
        best_granted = max((c for k, (c, _) in score.items() if granted(k[0])), default=0.0)
        for (rnd, client), (c, what) in score.items():
            if not granted(rnd) and c > COS and c > best_granted + 1e-9:
                out.append(f"round {rnd} client {client}: {what}")
    return sorted(set(out))


def _check_discriminates(truth: dict) -> None:
    rounds = sorted({r for r, _ in truth})
    for r in rounds:
        deltas = [t["delta"] for (rr, _), t in truth.items() if rr == r]
        agg = np.mean(deltas, axis=0)
        worst = max(_cos(agg, x) for x in deltas)
        assert worst < 0.99, f"round {r}: the mean is too close to one client's delta ({worst})"


@pytest.mark.parametrize("backend", ["loop", "vectorized"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_party_reaches_what_the_threat_model_hides(rt, scenario, backend):
    mod, reg = rt
    mod.reset()
    rec = run_cell(_cell(reg, SCENARIOS[scenario], backend=backend), registry=reg)
    assert rec["status"] == "ok", rec["error"]
    truth = dict(mod.TRUTH)
    assert len({c for _, c in truth}) == 4 and len({r for r, _ in truth}) == 3
    _check_discriminates(truth)
    d = next(iter(truth.values()))["delta"].size
    mask = _protected(scenario, d)
    plaintext = scenario == "none"
    problems = []
    for found in mod.FOUND["server_update"]:
        assert found["visited"] > 10
        def granted(r: int, cur: int = found["round"]) -> bool:
            return plaintext and r == cur

        problems += [f"server_update (round {found['round']}) reached {x}"
                     for x in _leaks(found, truth, mask, granted)]
        problems += [f"server_update reached a secret: {s}" for s in found["secrets"]]
    assert len(mod.FOUND["server_update"]) == 3
    views = {1, 3}  # the rounds whose server views an attack receives
    for found in mod.FOUND["attack"]:
        problems += [f"attack reached {x}" for x in _leaks(
            found, truth, mask, lambda r: plaintext and r in views)]
        problems += [f"attack reached a secret: {s}" for s in found["secrets"]]
    assert len(mod.FOUND["attack"]) == 1
    for found in mod.FOUND["observer"]:
        problems += [f"observer reached {x}" for x in _leaks(found, truth, mask,
                                                            lambda r: False)]
        problems += [f"observer reached a secret: {s}" for s in found["secrets"]]
    assert not problems, "\n".join(problems)


#: the buffered protocol (FedBuff) over a network whose sites differ, so that updates
#: arrive stale: secure aggregation runs over each buffer's clients
BUFFERED = {"secagg": ["secagg"], "dp-fedavg+secagg": [["dp-fedavg", "secagg"]]}


@pytest.mark.parametrize("backend", ["loop", "vectorized"])
@pytest.mark.parametrize("scenario", list(BUFFERED))
def test_the_buffered_protocol_passes_the_same_walk(rt, scenario, backend):
    """FedBuff's clients keep their trained updates on their side until they
    arrive; the server half (every buffer), the attack and the observer reach
    nothing individual: the transport runs over each buffer's clients."""
    mod, reg = rt
    mod.reset()
    alg = {"name": "redteam-fedbuff", "buffer_size": 2, "concurrency": 4}
    net = {"name": "hospital-mix", "academic": 0.5, "community": 0.0, "clinic": 0.5,
           "assign": "size", "outages": False}
    extra = {"axes": {"dataset": ["heart-disease"], "algorithm": [alg],
                      "privacy": BUFFERED[scenario], "network": [net],
                      "model": [{"name": "mlp", "hidden": [8]}]},
             "run": {"clients_per_round": 1.0}}
    rec = run_cell(_cell(reg, BUFFERED[scenario], backend=backend, rounds=8, extra=extra),
                   registry=reg)
    assert rec["status"] == "ok", rec["error"]
    assert rec["metrics"]["clock"]["staleness"]["max"] >= 1  # updates arrived stale
    truth = dict(mod.TRUTH)
    assert len({c for _, c in truth}) == 4
    d = next(iter(truth.values()))["delta"].size
    mask = np.ones(d, dtype=bool)
    problems = []
    assert len(mod.FOUND["server_update"]) == 8
    for who in ("server_update", "attack", "observer"):
        for found in mod.FOUND[who]:
            problems += [f"{who} reached {x}" for x in _leaks(found, truth, mask,
                                                              lambda r: False)]
            problems += [f"{who} reached a secret: {s}" for s in found["secrets"]]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("privacy", [["none"], ["secagg"], ["he-ckks"]])
def test_an_undeclared_field_is_refused_naming_plugin_and_field(rt, privacy):
    _, reg = rt
    rec = run_cell(_cell(reg, privacy, backend="loop", algorithm="redteam-undeclared",
                         rounds=1, attacks=()), registry=reg)
    assert rec["status"] == "failed"
    err = rec["error"]
    assert (err["plugin"], err["component"], err["hook"]) == (
        "redteam", "redteam-undeclared", "client_update")
    assert "smuggled" in err["message"] and "sends" in err["message"]


def _run_keep(reg, alg, privacy, **kw):
    return run_cell(_cell(reg, privacy, backend="loop", algorithm=alg, attacks=(), **kw),
                    registry=reg, keep_run=True)


@pytest.mark.parametrize("alg,field,values", [("scaffold", "control_delta", "model"),
                                              ("fednova", "tau", 1)])
def test_declared_summed_fields_run_under_secagg_and_are_billed(rt, alg, field, values):
    _, reg = rt
    secagg = [{"name": "secagg", "clip_range": 16.0}]  # FedNova's tau_i p_i can exceed 1
    plain, prun = _run_keep(reg, alg, ["none"])
    masked, mrun = _run_keep(reg, alg, secagg)
    fed, _ = _run_keep(reg, "fedavg", secagg)
    for r in (plain, masked, fed):
        assert r["status"] == "ok", r["error"]
    d = prun.final_models[0].numel()
    per_value = 4  # secagg's default field_bits = 32: one uint32 per value
    extra_values = d if values == "model" else values
    rounds, clients = 3, 4
    assert masked["metrics"]["cost"]["bytes_up"] - fed["metrics"]["cost"]["bytes_up"] == \
        rounds * clients * extra_values * per_value
    assert masked["metrics"]["cost"]["clipped_coordinates"] == 0
    # the secure sum is the plaintext sum up to secagg's fixed-point step
    diff = float((prun.final_models[0] - mrun.final_models[0]).abs().max())
    assert diff < 1e-3, diff
    assert masked["metrics"]["privacy"]["sent_in_clear"] == plain["metrics"]["privacy"][
        "sent_in_clear"]
    assert field in mrun.sent_fields


def test_isolated_attacks_equal_in_process_attacks(rt, tmp_path):
    _, reg = rt
    attacks = ("mia-loss", {"name": "gradinv-idlg", "max_images": 1, "iterations": 20})
    cells = [_cell(reg, p, backend="loop", algorithm="fedavg", rounds=2, attacks=attacks,
                   extra={"evaluate": {"attacks": list(attacks), "isolate": iso}})
             for p in (["none"], ["secagg"]) for iso in (False, True)]
    recs = [run_cell(c, registry=reg) for c in cells]
    for r in recs:
        assert r["status"] == "ok", r["error"]
    for inproc, isolated in (recs[0:2], recs[2:4]):
        a, b = inproc["metrics"]["attacks"], isolated["metrics"]["attacks"]
        assert set(a) == set(b) == {"mia-loss", "gradinv-idlg"}
        for k in a:
            strip = ("seconds",)
            assert {x: v for x, v in a[k].items() if x not in strip} == \
                {x: v for x, v in b[k].items() if x not in strip}, k
        assert isolated["metrics"]["attacks_isolated"] is True


def test_an_isolated_attack_process_that_dies_or_hangs_fails_its_attacks_only(rt, monkeypatch):
    """Isolated attacks run in children of a fork server: one that ends its
    process is recorded failed with the exit status and its last output,
    one that hangs is killed at the deadline (every attack that process held
    fails; the cell's utility stays), and the server goes on serving the
    next cell."""
    import fedmedbench.isolate as iso

    _, reg = rt
    monkeypatch.setattr(iso, "DEFAULT_TIMEOUT", 5.0)
    for bad, why in (("redteam-exit", r"exited with status 3: .*redteam-exit: leaving now"),
                     ("redteam-hang", r"ran past 5 s and was stopped")):
        attacks = (bad, "mia-loss")
        rec = run_cell(_cell(reg, ["none"], backend="loop", algorithm="fedavg", rounds=1,
                             attacks=attacks,
                             extra={"evaluate": {"attacks": list(attacks), "isolate": True}}),
                       registry=reg)
        assert rec["status"] == "ok" and rec["metrics"]["utility"]["global"] is not None
        for key in attacks:
            assert re.search(why, rec["metrics"]["attacks"][key]["failed"]["message"]), key
    rec = run_cell(_cell(reg, ["none"], backend="loop", algorithm="fedavg", rounds=1,
                         attacks=("mia-loss",),
                         extra={"evaluate": {"attacks": ["mia-loss"], "isolate": True}}),
                   registry=reg)
    assert "failed" not in rec["metrics"]["attacks"]["mia-loss"]
    assert rec["metrics"]["attacks_isolated"] is True


@pytest.mark.parametrize("privacy,status", [
    (["secagg"], "ok"),
    ([{"name": "secagg", "dropout_rate": 0.75}], "failed"),  # past the threshold: aborted
    ([{"name": "secagg-plus", "neighbours": 2}], "ok"),
    (["he-ckks"], "ok"),
    ([{"name": "he-ckks", "layers": ["fc"], "rest": "secagg"}], "ok")])
def test_a_transport_keeps_no_secret_after_training(rt, privacy, status):
    """Client key pairs, self-mask seeds, shares, masked inputs, ciphertexts and
    the CKKS secret key are dropped when the round ends (aborted or not) and
    when training ends; only the transport ever held them."""
    mod, reg = rt
    extra = {"axes": {"dataset": ["heart-disease"], "algorithm": ["redteam-fedavg"],
                      "privacy": privacy, "model": [{"name": "mlp", "hidden": [8]}],
                      "aggregator": [{"name": "weighted-mean", "by": "uniform"}]}}
    rec, out = run_cell(_cell(reg, privacy, backend="loop", attacks=(), extra=extra),
                        registry=reg, keep_run=True)
    assert rec["status"] == status, rec["error"]
    if status == "failed":
        assert "aborts" in rec["error"]["message"]
    transport = out.training.cell.transport
    found = mod.walk(transport)
    assert found["visited"] > 5 and found["secrets"] == []
    assert getattr(transport, "server", None) is None


def _attacks_by_cell(out) -> dict:
    import hashlib

    from fedmedbench.results import load_records

    def value(k: str, v):  # an image file: its bytes, wherever the folder is
        return hashlib.sha256(Path(v).read_bytes()).hexdigest() if k == "images" else v

    records, _ = load_records([out])
    return {json.dumps({k: v for k, v in r["config"].items() if k != "isolate_attacks"},
                       sort_keys=True, default=str):
            {n: {k: value(k, v) for k, v in a.items() if k != "seconds"}
             for n, a in r["metrics"]["attacks"].items()}
            for r in records if r["status"] == "ok"}


_RUN = ("import json, sys; import fedmedbench as fmb; "
        "fmb.run(json.loads(sys.argv[1]), out=sys.argv[2], isolate_attacks=sys.argv[3] == '1', "
        "progress=False, quiet=True)")


def _isolated_attacks_job(tmp: Path, spawn) -> dict:
    """The runs of the test below, each ``fedmedbench.run`` in a process of its
    own (a background job, tests/conftest.py): the quickstart with isolated
    attacks, and matrices/attacks.toml at 2 rounds in process and isolated."""
    import subprocess

    import tomllib

    raw = tomllib.loads((ROOT / "matrices" / "attacks.toml").read_text())
    raw["rounds"] = 2
    raw["evaluate"]["attacks"] = ["mia-loss", {"name": "mia-lira", "n_shadows": 2},
                                  {"name": "audit-canary", "m": 40}]
    runs = {"qs-isolated": (None, True), "in-process": (raw, False), "isolated": (raw, True)}
    errors = {}
    for name, (matrix, iso) in runs.items():
        p = spawn([sys.executable, "-c", _RUN, json.dumps(matrix), str(tmp / name),
                   "1" if iso else "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = p.communicate(timeout=900)
        if p.returncode:
            errors[name] = err.decode()[-3000:]
    return {"out": tmp, "errors": errors}


@pytest.mark.slow
@pytest.mark.background(job=_isolated_attacks_job)
def test_isolated_attacks_of_the_quickstart_and_attacks_toml_equal_in_process(
        quickstart_results, background):
    """Issue 18: with ``--isolate-attacks`` every attack of the quickstart and
    of matrices/attacks.toml (at 2 rounds, so that it fits a test) gives the
    numbers it gives in process, to the last digit (wall seconds aside)."""
    assert background["errors"] == {}
    tmp_path = background["out"]
    a, b = _attacks_by_cell(quickstart_results), _attacks_by_cell(tmp_path / "qs-isolated")
    assert a == b and sum(len(v) for v in a.values()) > 0
    a, b = _attacks_by_cell(tmp_path / "in-process"), _attacks_by_cell(tmp_path / "isolated")
    assert len(a) == len(b) == 12
    # CKKS encryption draws its noise from SEAL's own randomness, so two trainings
    # of a he-ckks cell differ in the 7th digit whatever runs the attacks: those
    # cells agree to 1e-4, every other cell exactly
    he = {k for k in a if '"he-ckks"' in k}
    assert len(he) == 2
    assert {k: v for k, v in a.items() if k not in he} == \
        {k: v for k, v in b.items() if k not in he}
    for k in he:
        for n, res in a[k].items():
            for key, v in res.items():
                if isinstance(v, float):
                    assert v == pytest.approx(b[k][n][key], rel=1e-4, abs=1e-6), (n, key)
