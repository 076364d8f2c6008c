"""The compiled vectorized step (harness/compiled.py) against the two steps
the vectorized backend has today, measured in the same run (issue 22, item 1).

One local step of k clients on the digits workload's model (an MLP
64 → 64 → 10, ReLU; tests/benchmarks/workloads.py), batch 32, SGD lr 0.1:
forward, backward and the optimizer update.

- ``twin``: ``VectorBackend._twin_step`` as it is -- the torch.fx twin
  (``batched.batched_twin``) interpreted node by node, autograd's backward,
  then the functional optimizer (``vectorized.functional_optimizer``);
- ``vmap``: a raw ``torch.func`` ensemble step, ``vmap(grad(loss))`` over
  ``functional_call``, then the same optimizer;
- ``compiled``: :class:`fedmedbench.compiled.CompiledTrainer` (ops read from
  the fx graph once, analytic backward into preallocated buffers, SGD in
  place).

Target: the compiled step faster than both at k = 10, 100 and 1,000 (ratios
asserted only with ``--benchmark-enable``; k = 1,000 runs only then). All three
compute the same update (checked to 1e-5 whether or not timings run).

Run: ``python -m pytest tests/benchmarks/test_bench_compiled.py --benchmark-enable -s``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from workloads import BATCH, HIDDEN, LR  # noqa: E402

REPEATS = 7  # timed rounds of steps; the best is kept


def _setup(k: int):
    from fedmedbench.batched import batched_twin
    from fedmedbench.compiled import CompiledTrainer, InPlaceSGD, compile_model
    from fedmedbench.vectorized import FunctionalModel

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, HIDDEN),
                                 torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    fm = FunctionalModel(module)
    W = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    W = W.unsqueeze(0).repeat(k, 1) + 0.01 * torch.randn(k, fm.numel)
    X = torch.rand(k, BATCH, 64)
    Y = torch.randint(0, 10, (k, BATCH))
    M = torch.ones(k, BATCH)
    twin = batched_twin(module, X[0])
    assert twin is not None
    model, why = compile_model(module, X[0])
    assert model is not None, why
    trainer = CompiledTrainer(model, fm.split(W), InPlaceSGD(LR))
    return SimpleNamespace(module=module, fm=fm, W=W, X=X, Y=Y, M=M, twin=twin,
                           trainer=trainer, act=torch.ones(k, dtype=torch.bool))


def _steps(s):
    """The three step functions, each advancing its own copy of the parameters."""
    from torch.func import grad, vmap

    from fedmedbench.vectorized import VectorBackend, functional_optimizer

    settings = SimpleNamespace(optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0)
    state = {"twin": [p.clone() for p in s.fm.split(s.W)],
             "vmap": [p.clone() for p in s.fm.split(s.W)]}
    opt_twin, opt_vmap = functional_optimizer(settings), functional_optimizer(settings)
    backend = SimpleNamespace(twin=s.twin, fmodel=s.fm)
    ce = torch.nn.functional.cross_entropy

    def batch_loss(ps, x, y, m):
        loss = (ce(s.fm(ps, x), y, reduction="none") * m).sum() / m.sum().clamp(min=1.0)
        return loss, loss

    vgrad = vmap(grad(batch_loss, has_aux=True))

    def twin_step():
        G, L = VectorBackend._twin_step(backend, state["twin"], s.X, s.Y, s.M, None)
        state["twin"] = opt_twin.step(state["twin"], [g.detach() for g in G], s.act)

    def vmap_step():
        G, L = vgrad(state["vmap"], s.X, s.Y, s.M)
        state["vmap"] = opt_vmap.step(state["vmap"], [g.detach() for g in G], s.act)

    def compiled_step():
        s.trainer.step(s.X, s.Y, s.M, s.act)

    return {"twin": twin_step, "vmap": vmap_step, "compiled": compiled_step}, state


def _time(fn, n: int) -> float:
    """Seconds per step: the best of REPEATS runs of ``n`` steps."""
    fn()
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_bench_compiled_step(benchmark, k):
    if k == 1000 and not benchmark.enabled:
        pytest.skip("1,000 clients: runs with --benchmark-enable")
    torch.set_num_threads(1)
    s = _setup(k)
    steps, state = _steps(s)
    for _ in range(3):  # the same update from all three
        for fn in steps.values():
            fn()
    got = s.trainer.P
    for name in ("twin", "vmap"):
        err = max(float((a - b).abs().max()) for a, b in zip(got, state[name]))
        assert err < 1e-5, (name, err)
    if not benchmark.enabled:
        benchmark.pedantic(steps["compiled"], rounds=1, iterations=1)
        return
    n = max(5, 2000 // k)
    t = {name: _time(fn, n) for name, fn in steps.items()}
    ratios = {"twin_over_compiled": t["twin"] / t["compiled"],
              "vmap_over_compiled": t["vmap"] / t["compiled"]}
    benchmark.extra_info.update(seconds_per_step=t, **ratios, clients=k, batch=BATCH)
    benchmark.pedantic(steps["compiled"], rounds=1, iterations=1)
    print(f"\nMLP 64-{HIDDEN}-10, k={k}, batch {BATCH}: twin {t['twin'] * 1e3:.3f} ms, vmap "
          f"{t['vmap'] * 1e3:.3f} ms, compiled {t['compiled'] * 1e3:.3f} ms per step "
          f"(twin {ratios['twin_over_compiled']:.2f}x, vmap {ratios['vmap_over_compiled']:.2f}x "
          f"the compiled step)")
    assert ratios["twin_over_compiled"] > 1 and ratios["vmap_over_compiled"] > 1, t
