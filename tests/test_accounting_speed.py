"""The vectorized RDP accountant and the σ solver against Opacus itself.

ε must be what ``opacus.accountants.RDPAccountant.get_epsilon`` gives (to
1e-12 relative; in fact to the last bit), σ what the solver gave before it
was vectorized (Opacus's ``get_noise_multiplier`` over the integer orders,
then a bisection with all orders, written out below with Opacus's own
calls), and solved σ are cached on disk as JSON keyed by the arguments and
the Opacus version. Timings live in tests/benchmarks/test_bench_accounting.py.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from fedmedbench import accounting
from fedmedbench.accounting import epsilon_for, noise_for_epsilon, noise_for_schedule


def _opacus_eps(history, delta=1e-5):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return acc.get_epsilon(delta)


def _reference_sigma(target, delta, q, steps, tolerance=0.01):
    """The solver before vectorization, with Opacus's own calls."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    ints = [a for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hi = float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                        sample_rate=q, steps=steps, accountant="rdp",
                                        epsilon_tolerance=tolerance, alphas=ints))

    def eps(s):
        return _opacus_eps([(s, q, steps)], delta)

    lo = hi * 0.95
    while eps(lo) <= target and lo > 1e-3:
        hi, lo = lo, lo * 0.95
    while hi - lo > 0.01 * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """Empty in-process caches and an empty on-disk cache."""
    monkeypatch.setenv("FEDMEDBENCH_CACHE_DIR", str(tmp_path))
    accounting._solve.cache_clear()
    accounting._CURVES.clear()
    accounting._EXACT.clear()
    yield tmp_path
    accounting._solve.cache_clear()


# --------------------------------------------------------------------------
# ε against Opacus
# --------------------------------------------------------------------------

GRID_Q = [1e-6, 1e-4, 0.01, 1 / 13, 0.25, 0.5, 0.9, 0.999, 1.0]
GRID_SIGMA = [0.3, 0.7, 1.0, 2.5, 10.0, 60.0]
GRID_STEPS = [1, 30, 1000, 100_000]


@pytest.mark.parametrize("q", GRID_Q)
def test_epsilon_equals_opacus_over_a_grid(q, fresh):
    worst = 0.0
    for sigma in GRID_SIGMA:
        for steps in GRID_STEPS:
            ref = _opacus_eps([(sigma, q, steps)])
            got = epsilon_for([(sigma, q, steps)], 1e-5)
            worst = max(worst, abs(got - ref) / ref)
            assert got == pytest.approx(ref, rel=1e-12, abs=0), (sigma, q, steps)
    assert worst <= 1e-12


def test_epsilon_of_mixed_compositions_equals_opacus(fresh):
    rng = np.random.default_rng(0)
    for _ in range(6):
        hist = [(float(rng.uniform(0.5, 5)), float(rng.choice([1e-3, 0.05, 1 / 3, 1.0])),
                 int(rng.integers(1, 500))) for _ in range(int(rng.integers(1, 5)))]
        for delta in (1e-5, 1e-8):
            assert epsilon_for(hist, delta) == pytest.approx(_opacus_eps(hist, delta),
                                                             rel=1e-12, abs=0), hist


def test_epsilon_edge_cases_equal_opacus(fresh):
    for hist in ([(0.0, 0.1, 5)], [(1.0, 0.0, 5)], [(1.0, 0.1, 5), (0.0, 1.0, 1)],
                 [(1e4, 0.5, 10)], [(0.5, 1.0, 1)]):
        assert epsilon_for(hist, 1e-5) == _opacus_eps(hist), hist
    assert epsilon_for([], 1e-5) == 0.0


def test_the_vectorized_series_is_opacus_series_to_rounding(fresh):
    """Before any refinement: every order's RDP within a few ulps of the
    largest series term of Opacus's ``compute_rdp``."""
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = accounting._rdp_orders()
    for q in (1e-3, 0.1, 0.5, 1.0):
        for sigma in (0.6, 1.5, 8.0):
            ref = np.array(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))
            got = accounting._rdp_rows(np.array([sigma]), np.array([q]))[0]
            # absolute error in log A_α relative to (α - 1): ~1e-15 is Opacus's own rounding
            err = np.abs(got - ref) * (np.asarray(orders) - 1)
            assert err.max() < 1e-13, (q, sigma, err.max())


def test_orders_left_out_cannot_hold_the_minimum(fresh):
    """Orders whose ε at RDP = 0 exceeds the bound are never needed."""
    floor = accounting._eps_floor(1e-5)
    need = accounting._needed_orders(1e-5, 3.0)
    assert not need[np.asarray(accounting._rdp_orders()) == 1.1][0]  # floor ≈ 112
    assert (floor[~need] > 3.0).all()
    # "ε <= 3" over all orders is "ε <= 3" over the needed ones, and where
    # ε <= 3 the two ε are equal
    orders, _ = accounting._orders_np()
    for sigma in np.linspace(0.6, 4.0, 18):
        full = accounting._rdp_rows(np.array([sigma]), np.array([0.2]))[0] * 100
        e_all = accounting._eps_rows(full[None], orders, 1e-5)[0]
        e_need = accounting._eps_rows(np.where(need, full, np.inf)[None], orders, 1e-5)[0]
        assert (e_all <= 3.0) == (e_need <= 3.0)
        assert e_need >= e_all and (e_all > 3.0 or e_need == e_all)


# --------------------------------------------------------------------------
# σ against the solver as it was
# --------------------------------------------------------------------------


@pytest.mark.parametrize("target,q,steps", [
    (3.0, 0.5, 30), (3.0, 1 / 3, 30), (1.0, 0.01, 200), (8.0, 1 / 13, 200), (3.0, 1.0, 30),
    (0.5, 1e-3, 10)])
def test_sigma_equals_the_solver_before_vectorization(target, q, steps, fresh):
    ref = _reference_sigma(target, 1e-5, q, steps)
    got = noise_for_epsilon(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    assert got == pytest.approx(ref, rel=1e-9, abs=0)
    assert _opacus_eps([(got, q, steps)]) <= target


def test_schedule_solver_equals_opacus_bisection(fresh):
    """noise_for_schedule against the same bisection over Opacus's get_epsilon."""
    rounds, q, target, delta = 4, 0.2, 4.0, 1e-5

    def sched(z0):
        return [(z0 * 0.9 ** t, q, 1) for t in range(rounds)]

    got = noise_for_schedule(target_epsilon=target, delta=delta, schedule=sched)
    lo, hi, eps_hi = 0.0, 10.0, float("inf")
    while eps_hi > target:
        hi *= 2
        eps_hi = _opacus_eps(sched(hi), delta)
    while target - eps_hi > 0.01:
        mid = (lo + hi) / 2
        eps = _opacus_eps(sched(mid), delta)
        if eps < target:
            hi, eps_hi = mid, eps
        else:
            lo = mid
    assert got == pytest.approx(hi, rel=1e-9, abs=0)


def test_speculative_bisection_follows_the_sequential_path():
    """_bisect evaluating several levels per call visits the same σ."""
    seen_seq, seen_spec = [], []

    def eps(s):
        return 50.0 / (s * s + 0.1)

    def fin(st):
        return not 3.0 - st[2] > 0.001

    def upd(st, s, e):
        return (st[0], s, e) if e < 3.0 else (s, st[1], st[2])

    def mid(st):
        return (st[0] + st[1]) / 2

    st = (0.0, 20.0, eps(20.0))
    while not fin(st):
        s = mid(st)
        seen_seq.append(s)
        st = upd(st, s, eps(s))

    def batch(sigmas):
        seen_spec.extend(sigmas)
        return [eps(s) for s in sigmas]

    out = accounting._bisect((0.0, 20.0, eps(20.0)), fin, mid, upd, batch, depth=3)
    assert out == st
    assert set(seen_seq) <= set(seen_spec)


# --------------------------------------------------------------------------
# the on-disk cache
# --------------------------------------------------------------------------


def _solve_args():
    return dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.25, steps=40)


def test_sigma_is_cached_on_disk_as_json(fresh, monkeypatch):
    sigma = noise_for_epsilon(**_solve_args())
    files = list((fresh / "sigma").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["sigma"] == sigma
    assert data["key"]["sample_rate"] == 0.25 and data["key"]["steps"] == 40
    assert data["key"]["opacus"] == accounting._opacus_version()
    # a new process (no in-process memo) reads it instead of solving
    accounting._solve.cache_clear()

    def boom(*a):
        raise AssertionError("solved again despite the cache")

    monkeypatch.setattr(accounting, "_solve_uncached", boom)
    assert noise_for_epsilon(**_solve_args()) == sigma
    # other arguments are another key
    accounting._solve.cache_clear()
    with pytest.raises(AssertionError, match="solved again"):
        noise_for_epsilon(**{**_solve_args(), "steps": 41})


def test_another_opacus_version_is_another_key(fresh, monkeypatch):
    noise_for_epsilon(**_solve_args())
    accounting._solve.cache_clear()
    monkeypatch.setattr(accounting, "_opacus_version", lambda: "0.0-other")  # a new install
    calls = []
    real = accounting._solve_uncached
    monkeypatch.setattr(accounting, "_solve_uncached", lambda *a: calls.append(a) or real(*a))
    noise_for_epsilon(**_solve_args())
    assert len(calls) == 1
    assert len(list((fresh / "sigma").glob("*.json"))) == 2


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"key": {}, "sigma": 1.0}',
                                     b"[1, 2]", None])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(fresh, content):
    sigma = noise_for_epsilon(**_solve_args())
    (path,) = list((fresh / "sigma").glob("*.json"))
    if content is None:  # the right key with an impossible σ
        data = json.loads(path.read_text())
        data["sigma"] = -1.0
        content = json.dumps(data).encode()
    path.write_bytes(content)
    accounting._solve.cache_clear()
    assert noise_for_epsilon(**_solve_args()) == sigma
    assert json.loads(path.read_text())["sigma"] == sigma  # rewritten


def test_an_unwritable_cache_only_costs_speed(fresh, monkeypatch):
    blocker = fresh / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FEDMEDBENCH_CACHE_DIR", str(blocker))  # a file: no folder there
    assert noise_for_epsilon(**_solve_args()) > 0
