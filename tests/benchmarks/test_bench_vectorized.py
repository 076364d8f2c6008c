"""The vectorized backend against the loop and a bare torch loop (issue 10).

Every ratio is measured in the same run against its baseline (best of
``REPEATS`` warm calls, single thread) and asserted only with
``--benchmark-enable``; the default test run still checks that the backends
compute the same thing.

Targets:

- digits FedAvg workload (tests/benchmarks/workloads.py), whole warm cells
  (issue 22): the vectorized engine at least 3×, 10× and 15× faster than a
  bare torch loop over the clients at 10, 100 and 1,000 clients, faster than
  a raw ``torch.func`` vmap ensemble of the same clients at all three, and at
  most 10× the FLOP bound (the workload's FLOPs at the rate of an sgemm timed
  in the same run) at 10 and 100 clients; the loop backend at most 1.1× the
  bare loop at 100 clients (1,000 clients only with ``--benchmark-enable``);
- synthetic-ehr FedAvg, 3 rounds: a vectorized round at 1,000 hospitals at
  most 12× a round at 100 (linear growth), peak memory reported;
- DP-SGD vectorized against DP-SGD through Opacus's hooks (the loop backend)
  at the same ε: at least 3× faster on synthetic-ehr with 50 hospitals, and no
  slower on heart-disease's 4 hospitals.

Run: ``python -m pytest tests/benchmarks/test_bench_vectorized.py --benchmark-enable -s``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmedbench import run_cell
from fedmedbench.matrix import parse_matrix
from fedmedbench.registry import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from workloads import (  # noqa: E402
    DIGITS_PLUGIN,
    bare_fedavg,
    best_time,
    best_times,
    digits_cell,
    sgemm_gflops,
    vmap_fedavg,
    workload_flops,
)

REPEATS = 3  # timed calls per measurement (best_time)
#: the digits workload's interleaved calls, by clients: on this shared machine a warm
#: cell's time swings by up to 20 % between runs, and a burst of load can slow every call
#: of a best of 5 (the 100-client cell measured 24.3 and 28.1 ms a minute apart); every
#: contender gets the same calls (at 1,000 clients the bare loop's 2.5 s a call bounds it)
DIGITS_REPEATS = {10: 9, 100: 9, 1000: 5}


@pytest.fixture(scope="module")
def reg():
    torch.set_num_threads(1)
    return get_registry(extra=[DIGITS_PLUGIN])


#: vectorized over the bare torch loop, at least (issue 22)
OVER_BARE = {10: 3.0, 100: 10.0, 1000: 15.0}
#: vectorized over the FLOP bound (the workload's FLOPs at this core's sgemm rate), at most
OVER_FLOP_BOUND = {10: 10.0, 100: 10.0}


@pytest.mark.parametrize("clients", [10, 100, 1000])
def test_bench_digits_fedavg(benchmark, reg, clients):
    """fedmedbench's vectorized cell against a bare torch loop over the clients,
    a raw torch.func vmap ensemble of the same clients, the loop backend,
    and the FLOP bound (``workloads.workload_flops`` at the rate of a timed
    sgemm), all timed in the same run, interleaved (``best_times``)."""
    if clients == 1000 and not benchmark.enabled:
        pytest.skip("1,000 clients: runs with --benchmark-enable")
    loop, vec = digits_cell(clients, backend="loop"), digits_cell(clients, backend="vectorized")
    rec_vec = run_cell(vec, registry=reg)
    assert rec_vec["backend"]["name"] == "vectorized" and rec_vec["backend"]["kernel"] == \
        "compiled", rec_vec["backend"]
    acc = {"vectorized": rec_vec["metrics"]["utility"]["global"], "bare": bare_fedavg(clients),
           "vmap": vmap_fedavg(clients)}
    if clients < 1000:
        acc["loop"] = run_cell(loop, registry=reg)["metrics"]["utility"]["global"]
        # the same computation on both backends: the same accuracy
        assert abs(acc["loop"] - acc["vectorized"]) < 1e-6
    # the same workload: the same accuracy (batch orders differ from the bare loop's and
    # the ensemble's)
    assert abs(acc["vectorized"] - acc["bare"]) < 0.02, acc
    assert abs(acc["vectorized"] - acc["vmap"]) < 0.02, acc
    if not benchmark.enabled:  # the same computation checked above; timings when enabled
        benchmark.pedantic(run_cell, args=(vec,), kwargs={"registry": reg}, rounds=1,
                           iterations=1)
        return
    fns = {"bare": lambda: bare_fedavg(clients), "vmap": lambda: vmap_fedavg(clients),
           "vectorized": lambda: run_cell(vec, registry=reg)}
    if clients < 1000:  # the loop backend's ratio is a target at 100 clients
        fns["loop"] = lambda: run_cell(loop, registry=reg)
    t = best_times(fns, DIGITS_REPEATS[clients])
    gflops = sgemm_gflops(512, 20)
    flops = workload_flops(clients)
    bound = flops / (gflops * 1e9)
    ratios = {"over_bare": t["bare"] / t["vectorized"], "over_vmap": t["vmap"] / t["vectorized"],
              "flop_bound_multiple": t["vectorized"] / bound}
    if "loop" in t:
        ratios["loop_over_bare"] = t["loop"] / t["bare"]
    benchmark.extra_info.update(seconds=t, accuracy=acc, sgemm_gflops=gflops,
                                workload_gflop=flops / 1e9, flop_bound_s=bound, **ratios)
    benchmark.pedantic(run_cell, args=(vec,), kwargs={"registry": reg}, rounds=1, iterations=1)
    print(f"\ndigits FedAvg, {clients} clients, 5 rounds: " + ", ".join(
        f"{k} {v:.4f}s" for k, v in t.items()) + f"; vectorized {ratios['over_bare']:.1f}x the "
        f"bare loop (target {OVER_BARE[clients]:g}x), {ratios['over_vmap']:.2f}x the vmap "
        f"ensemble; {flops / 1e9:.3f} GFLOP at {gflops:.0f} GFLOP/s = {bound * 1e3:.2f} ms, "
        f"the cell {ratios['flop_bound_multiple']:.1f}x that"
        + (f" (target {OVER_FLOP_BOUND[clients]:g}x)" if clients in OVER_FLOP_BOUND else "")
        + (f"; loop backend {ratios['loop_over_bare']:.2f}x the bare loop" if "loop" in t
           else "") + f"; accuracy {acc}")
    missed = []
    if ratios["over_bare"] < OVER_BARE[clients]:
        missed.append(f"{ratios['over_bare']:.1f}x the bare loop < {OVER_BARE[clients]:g}x")
    if ratios["over_vmap"] <= 1.0:
        missed.append(f"not faster than the vmap ensemble ({ratios['over_vmap']:.2f}x)")
    if clients in OVER_FLOP_BOUND and ratios["flop_bound_multiple"] > OVER_FLOP_BOUND[clients]:
        missed.append(f"{ratios['flop_bound_multiple']:.1f}x the FLOP bound > "
                      f"{OVER_FLOP_BOUND[clients]:g}x")
    if clients == 100 and ratios["loop_over_bare"] > 1.1:
        missed.append(f"loop backend {ratios['loop_over_bare']:.2f}x the bare loop > 1.1x")
    assert not missed, (missed, t)


_CHILD = """
import json, resource, sys, time, torch
from fedmedbench import run_cell
from fedmedbench.matrix import parse_matrix
torch.set_num_threads(1)
n = int(sys.argv[1])
ds = {"name": "synthetic-ehr", "n_hospitals": n, "n_patients": 60 * n}
cell = parse_matrix({"rounds": 3, "axes": {"dataset": [ds], "algorithm": ["fedavg"]},
                     "run": {"backend": "vectorized", "eval_every": 3}}).cells[0]
run_cell(cell)  # warm
best = None
for _ in range(3):  # the best of 3 warm cells (a burst of load slows a single one)
    t0 = time.perf_counter()
    rec = run_cell(cell)
    wall = time.perf_counter() - t0
    if best is None or rec["metrics"]["cost"]["train_s"] < best[0]["metrics"]["cost"]["train_s"]:
        best = (rec, wall)
rec, wall = best
try:  # this process's own peak: ru_maxrss keeps the parent's across fork and exec
    with open("/proc/self/status") as f:
        peak = int(next(ln for ln in f if ln.startswith("VmHWM")).split()[1]) / 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"round_s": rec["metrics"]["cost"]["train_s"] / 3, "wall_s": wall,
                  "backend": rec["backend"]["name"], "status": rec["status"],
                  "peak_rss_mb": peak}))
"""


def _child(n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_thousand_hospitals(benchmark):
    """Each size in its own process, so the peak memory is that run's."""
    if not benchmark.enabled:
        pytest.skip("1,000 hospitals against 100: runs with --benchmark-enable")
    small, big = _child(100), _child(1000)
    assert small["status"] == big["status"] == "ok" and big["backend"] == "vectorized"
    ratio = big["round_s"] / small["round_s"]
    benchmark.extra_info.update(hundred=small, thousand=big, ratio=ratio)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nsynthetic-ehr FedAvg, vectorized: a round (training) at 100 hospitals "
          f"{small['round_s']:.3f}s, at 1,000 {big['round_s']:.3f}s ({ratio:.1f}x); peak RSS "
          f"{small['peak_rss_mb']:.0f} MB / {big['peak_rss_mb']:.0f} MB")
    if benchmark.enabled:
        assert ratio <= 12.0, (small, big)


def _dp_cell(dataset: dict, backend: str) -> dict:
    return parse_matrix({"rounds": 3, "axes": {
        "dataset": [dataset], "algorithm": ["fedavg"],
        "privacy": [[{"name": "dp-sgd", "epsilon": 3.0}]]},
        "run": {"backend": backend, "eval_every": 3}}).cells[0]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, target", [
    ({"name": "synthetic-ehr", "n_hospitals": 50, "n_patients": 4000}, 3.0),
    ({"name": "heart-disease"}, 1.0)], ids=["ehr-50", "heart-4"])
def test_bench_dp_sgd_vectorized_vs_opacus(benchmark, dataset, target):
    loop, vec = _dp_cell(dataset, "loop"), _dp_cell(dataset, "vectorized")
    a, b = run_cell(loop), run_cell(vec)
    assert a["status"] == b["status"] == "ok" and b["backend"]["name"] == "vectorized"
    # the same guarantee: the same accountant, σ, q and steps
    pa, pb = a["metrics"]["privacy"], b["metrics"]["privacy"]
    assert (pa["epsilon"], pa["noise_multiplier"], pa["steps"]) == (
        pb["epsilon"], pb["noise_multiplier"], pb["steps"])
    if not benchmark.enabled:  # the same guarantee checked above; timings when enabled
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    t_loop, t_vec = best_time(lambda: run_cell(loop), 2), best_time(lambda: run_cell(vec), 2)
    speedup = t_loop / t_vec
    benchmark.extra_info.update(opacus_s=t_loop, vectorized_s=t_vec, speedup=speedup,
                                epsilon=pa["epsilon"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nDP-SGD on {dataset['name']}: Opacus hooks (loop) {t_loop:.3f}s, vectorized "
          f"{t_vec:.3f}s ({speedup:.1f}x) at ε = {pa['epsilon']:.3f} (δ = {pa['delta']})")
    if benchmark.enabled:
        assert speedup >= target, (t_loop, t_vec)
