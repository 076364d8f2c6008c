"""Engine overhead: FedAvg through ``run_cell`` against a bare torch loop.

Same data (heart-disease, FLamby split), model (logistic regression), split,
seeds, rounds, local steps and batch size; evaluation once at the end in both.
Run with ``pytest tests/benchmarks --benchmark-enable``; the ratio is printed
and stored in the benchmark's ``extra_info`` (target: <= 1.2x).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmedbench.engine import run_cell
from fedmedbench.matrix import parse_matrix
from fedmedbench.models import build_model
from fedmedbench.registry import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from workloads import best_time  # noqa: E402

ROUNDS, STEPS, BATCH, LR = 30, 10, 16, 0.05


@pytest.fixture(scope="module")
def cell():
    m = parse_matrix({"rounds": ROUNDS, "axes": {"dataset": ["heart-disease"],
                                                 "algorithm": ["fedavg"]},
                      "run": {"local_steps": STEPS, "batch_size": BATCH, "lr": LR,
                              "eval_every": ROUNDS}})
    return m.cells[0]


def bare_fedavg(data, seed: int = 0) -> float:
    """FedAvg written directly in torch: the floor the engine is compared to."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    task = data.task
    model = build_model(task.model, task.input_shape, task.num_classes)
    w = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    sites = [(torch.as_tensor(s.train.X), torch.as_tensor(s.train.y)) for s in data.sites]
    n = np.array([len(y) for _, y in sites], dtype=np.float32)
    weights = torch.as_tensor(n / n.sum())
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(sites))]
    perms = [iter(()) for _ in sites]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(ROUNDS):
        deltas = []
        for i, (X, y) in enumerate(sites):
            torch.nn.utils.vector_to_parameters(w.clone(), model.parameters())  # not a view of w
            for _ in range(STEPS):
                idx = next(perms[i], None)
                if idx is None:
                    p = torch.randperm(len(y), generator=gens[i])
                    perms[i] = iter(p.split(BATCH))
                    idx = next(perms[i])
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                opt.step()
            deltas.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach() - w)
        w = w + torch.stack(deltas).T @ weights
    torch.nn.utils.vector_to_parameters(w, model.parameters())
    Xt = torch.as_tensor(data.pooled_test().X)
    with torch.no_grad():
        pred = model(Xt).argmax(1).numpy()
    return float((pred == data.pooled_test().y).mean())


@pytest.mark.benchmark(group="engine-overhead")
def test_engine_fedavg(benchmark, cell):
    reg = get_registry()
    rec = benchmark(run_cell, cell, registry=reg)
    assert rec["status"] == "ok"
    data = reg.build("dataset", {"name": "heart-disease"}).load(seed=0)
    bare_acc = bare_fedavg(data)
    # same workload: both reach the same accuracy band on the pooled test set
    assert abs(rec["metrics"]["utility"]["global"] - bare_acc) < 0.05
    t_engine = best_time(lambda: run_cell(cell, registry=reg), warm=False)
    t_bare = best_time(lambda: bare_fedavg(data), warm=False)
    ratio = t_engine / t_bare
    benchmark.extra_info.update({"engine_s": t_engine, "bare_s": t_bare, "ratio": ratio})
    print(f"\nengine {t_engine:.3f}s  bare loop {t_bare:.3f}s  ratio {ratio:.2f}x")


@pytest.mark.benchmark(group="engine-overhead")
def test_bare_loop_fedavg(benchmark):
    data = get_registry().build("dataset", {"name": "heart-disease"}).load(seed=0)
    acc = benchmark(bare_fedavg, data)
    assert acc > 0.6
