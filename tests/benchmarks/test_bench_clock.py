"""The network twin's overhead (issue 21): a 1,000-hospital synthetic-ehr cell
with the twin off (``network = "none"``) against the same cell on the default
``uniform`` network (the twin on: a virtual clock per round, profiles,
the reference step, the record's ``metrics.clock``), in the same run.

Target: the twin adds at most 10 % to the cell's time. FedAvg, 5 rounds, 500
clients a round (the dataset's default rate), vectorized backend; the
fastest of 3 interleaved runs each (after one warm run each, which also
measures and caches the reference step).

Run with ``pytest tests/benchmarks/test_bench_clock.py --benchmark-enable -s``;
the ratio is printed, stored in ``extra_info`` and asserted only when
benchmarks are enabled. Times are CPU seconds of the test process
(``time.process_time``; cells run on one thread), which other jobs on a
shared machine disturb far less than wall time. Without ``--benchmark-enable`` a 100-hospital cell
checks that both runs give the same model (the twin changes no number).
"""

from __future__ import annotations

import json
import time

import pytest

from fedmedbench.engine import run_cell
from fedmedbench.matrix import parse_matrix
from fedmedbench.registry import get_registry

ROUNDS = 5


def best_cpu_times(fns: dict, k: int = 3) -> dict[str, float]:
    """The least CPU seconds of ``k`` calls of each function, interleaved,
    after one untimed warm call each."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(k):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    return best


def _cell(n: int, network: str) -> dict:
    return parse_matrix({
        "rounds": ROUNDS,
        "axes": {"dataset": [{"name": "synthetic-ehr", "n_hospitals": n,
                              "n_patients": 60 * n}],
                 "algorithm": ["fedavg"], "network": [network]},
        "run": {"eval_every": ROUNDS}}, registry=get_registry()).cells[0]


@pytest.mark.slow
@pytest.mark.benchmark(group="clock")
def test_bench_twin_overhead_thousand_hospitals(benchmark):
    reg = get_registry()
    n = 1000 if benchmark.enabled else 100
    off, on = _cell(n, "none"), _cell(n, "uniform")
    a, b = run_cell(off, registry=reg), run_cell(on, registry=reg)
    assert a["status"] == b["status"] == "ok", (a["error"], b["error"])
    assert "clock" not in a["metrics"] and b["metrics"]["clock"]["dropouts"] == 0
    assert json.dumps(a["metrics"]["utility"]) == json.dumps(b["metrics"]["utility"])  # NaN sites
    if not benchmark.enabled:
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    t = best_cpu_times({"off": lambda: run_cell(off, registry=reg),
                    "uniform": lambda: run_cell(on, registry=reg)}, k=3)
    ratio = t["uniform"] / t["off"]
    benchmark.extra_info.update(off_s=t["off"], uniform_s=t["uniform"], ratio=ratio,
                                backend=b["backend"]["name"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nsynthetic-ehr, 1,000 hospitals, FedAvg {ROUNDS} rounds ({b['backend']['name']}): "
          f"twin off {t['off']:.3f}s, uniform twin {t['uniform']:.3f}s "
          f"(overhead {100 * (ratio - 1):+.1f}%)")
    assert ratio <= 1.10, t
