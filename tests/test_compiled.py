"""The compiled vectorized step (harness/compiled.py): gradients against
autograd, optimizers against the functional ones of harness/vectorized.py,
and the reasons it gives for models it does not compile."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedmedbench.compiled import (
    CompiledTrainer,
    InPlaceAdam,
    InPlaceSGD,
    compile_model,
    inplace_optimizer,
)
from fedmedbench.vectorized import FunctionalModel, functional_optimizer


class _Residual(nn.Module):
    """A small residual CNN: conv, GroupNorm, ReLU, a skip connection (``+``),
    pooling, flatten and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.n1(self.c1(x)))
        h = h + self.c2(h)
        return self.fc(torch.flatten(self.pool(h), 1))


MODELS = {
    "mlp-relu": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
                                       nn.Linear(64, 10)), (64,)),
    "mlp-tanh-gelu-layernorm": (lambda: nn.Sequential(
        nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(), nn.LayerNorm(32),
        nn.Linear(32, 16), nn.GELU(approximate="tanh"), nn.LeakyReLU(0.1),
        nn.Linear(16, 10)), (12,)),
    "cnn-pools": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 10)), (3, 8, 8)),
    "residual-cnn": (_Residual, (3, 8, 8)),
}


def _stacked(module, k, dtype, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(p.detach().to(dtype).unsqueeze(0).repeat(k, *([1] * p.dim()))
             + scale * torch.randn(k, *p.shape, generator=g, dtype=dtype))
            for p in module.parameters()]


def _batch(k, B, shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(k, B, *shape, generator=g, dtype=dtype)
    Y = torch.randint(0, 10, (k, B), generator=g)
    M = (torch.rand(k, B, generator=g) > 0.3).to(dtype)
    M[0] = 1.0  # a full batch
    M[-1] = 0.0  # a client with no rows this step
    return X, Y, M


def _autograd(module, P, X, Y, M):
    """Σ_c masked-mean CE of client c, differentiated by autograd."""
    names = [n for n, _ in module.named_parameters()]
    leaves = [p.clone().requires_grad_(True) for p in P]
    losses = []
    for c in range(X.shape[0]):
        out = functional_call(module, {n: w[c] for n, w in zip(names, leaves)}, (X[c],))
        ce = nn.functional.cross_entropy(out, Y[c], reduction="none")
        losses.append((ce * M[c]).sum() / M[c].sum().clamp(min=1.0))
    L = torch.stack(losses)
    return L.detach(), [g.detach() for g in torch.autograd.grad(L.sum(), leaves)]


def test_dropout_draws_each_clients_masks_from_its_own_stream():
    """Compiled dropout: the gradients are autograd's through the same masks;
    a client's masks depend on its seed, step and the layer alone (the same
    alone as beside others, at any padded width); about p of the values are
    dropped and the rest scaled by 1/(1-p); undrawn it is the identity."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32),
                           nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 10)).double()
    model, why = compile_model(module, torch.randn(4, 12, dtype=torch.float64))
    assert model is not None and len(model.dropouts) == 2, why
    assert module.training  # the compile check's evaluation mode is undone
    k, B = 5, 7
    P = _stacked(module, k, torch.float64)
    X, Y, M = _batch(k, B, (12,), torch.float64)
    seeds, steps = np.arange(100, 100 + k) * 7919, np.array([0, 3, 3, 9, 1])
    model.draw(seeds, steps)
    L, G = model.loss_and_grads(P, X, Y, M)
    masks = [op._mask.clone() for op in model.dropouts]
    # autograd through the same masks: the module with each dropout a fixed multiplication
    twin = nn.Sequential(module[0], module[1], _Times(), module[3], module[4], _Times(),
                         module[6])
    names = [n for n, _ in module.named_parameters()]
    leaves = [p.clone().requires_grad_(True) for p in P]
    losses = []
    for c in range(k):
        twin[2].m, twin[5].m = masks[0][c], masks[1][c]
        out = functional_call(twin, {n: w[c] for n, w in zip(names, leaves)}, (X[c],))
        ce = nn.functional.cross_entropy(out, Y[c], reduction="none")
        losses.append((ce * M[c]).sum() / M[c].sum().clamp(min=1.0))
    want = torch.autograd.grad(torch.stack(losses).sum(), leaves)
    assert torch.allclose(L, torch.stack(losses).detach(), atol=1e-12)
    for g, w in zip(G, want):
        assert torch.allclose(g, w, atol=1e-10)
    # a client's masks: the same alone, and in a narrower batch (its first rows)
    model.draw(seeds[[3]], steps[[3]])
    model.loss_and_grads([p[[3]] for p in P], X[[3], :4], Y[[3], :4], M[[3], :4])
    for op, full in zip(model.dropouts, masks):
        assert torch.equal(op._mask[0], full[3, :4])
    # another step, another layer, another client: other masks
    assert not torch.equal(masks[0][1], masks[0][2])  # same step, two clients
    model.draw(seeds, steps + 1)
    model.loss_and_grads(P, X, Y, M)
    assert not torch.equal(model.dropouts[0]._mask, masks[0])
    # the rate and the scale: p of the values dropped, the others 1/(1-p)
    big = torch.randn(64, 50, 12, dtype=torch.float64)
    model.draw(np.arange(64), np.zeros(64, dtype=np.int64))
    model.forward(_stacked(module, 64, torch.float64), big)
    for op in model.dropouts:
        kept = op._mask != 0
        n = kept.numel()
        assert abs(float((~kept).sum()) / n - op.p) < 4 * (op.p * (1 - op.p) / n) ** 0.5
        assert torch.all(op._mask[kept] == 1 / (1 - op.p))
    model.draw()  # undrawn: the identity, as nn.Dropout in evaluation mode
    got, _ = model.forward(P, X)
    module.eval()
    try:
        for c in range(k):
            ref = functional_call(module, {n: w[c] for n, w in zip(names, P)}, (X[c],))
            assert torch.allclose(got[c], ref, atol=1e-12)
    finally:
        module.train()


class _Times(nn.Module):
    """x · m for a fixed m (a drawn dropout mask, for autograd)."""

    m: torch.Tensor

    def forward(self, x):
        return x * self.m


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_autograd(name, dtype):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    module = make().to(dtype)
    model, why = compile_model(module, torch.randn(4, *shape, dtype=dtype))
    assert model is not None, why
    k, B = 4, 6
    P = _stacked(module, k, dtype)
    X, Y, M = _batch(k, B, shape, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for _ in range(2):  # the second call reuses every buffer
        L, G = model.loss_and_grads(P, X, Y, M)
        L_ref, G_ref = _autograd(module, P, X, Y, M)
        torch.testing.assert_close(L, L_ref, atol=tol, rtol=tol)
        for g, r, n in zip(G, G_ref, model.names):
            torch.testing.assert_close(g, r, atol=tol, rtol=tol, msg=n)
        assert all(float(g[-1].abs().max()) == 0.0 for g in G)  # no rows: no gradient
        assert float(L[-1]) == 0.0


def test_unsupported_layers_are_named():
    cases = {
        "BatchNorm1d (layer '1')": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4),
                                                 nn.Linear(4, 2)),
        "Dropout (layer '1') with p=1.0": nn.Sequential(nn.Linear(4, 4), nn.Dropout(1.0),
                                                        nn.Linear(4, 2)),
        "Conv1d (layer '0')": nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)),
    }
    for reason, module in cases.items():
        model, why = compile_model(module)
        assert model is None and why.startswith(reason), why

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            z = self.fc(x)
            return torch.cat([torch.zeros_like(z), z], dim=1)

    model, why = compile_model(Cat())
    assert model is None and "zeros_like" in why

    class FunctionalDropout(nn.Module):  # drawn outside a layer: no stream of its own
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(nn.functional.dropout(x, 0.5, self.training))

    model, why = compile_model(FunctionalDropout())
    assert model is None and why.startswith("function dropout"), why

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model, why = compile_model(Shared())
    assert model is None and "shared" in why


def test_the_twin_of_a_supported_model_is_checked_on_an_example():
    module, shape = MODELS["residual-cnn"][0](), MODELS["residual-cnn"][1]
    model, why = compile_model(module, torch.randn(3, *shape))
    assert model is not None and why is None
    assert model.names == [n for n, _ in module.named_parameters()]


# --------------------------------------------------------------------------
# optimizers: the functional ones, operation for operation
# --------------------------------------------------------------------------


def _settings(opt, momentum=0.0, wd=0.0):
    return SimpleNamespace(optimizer=opt, lr=0.05, momentum=momentum, weight_decay=wd)


@pytest.mark.parametrize("opt,momentum,wd", [("sgd", 0.0, 0.0), ("sgd", 0.9, 0.0),
                                             ("sgd", 0.0, 1e-2), ("sgd", 0.9, 1e-2),
                                             ("adam", 0.0, 0.0), ("adam", 0.0, 1e-2)])
def test_in_place_optimizers_are_the_functional_ones_bit_for_bit(opt, momentum, wd):
    """The same gradients through vectorized._SGD/_Adam and through the
    in-place twins, over steps where some clients are done: equal to the
    last bit (also with the transposed weight storage CompiledTrainer uses)."""
    g = torch.Generator().manual_seed(0)
    k = 5
    shapes = [(k, 7, 3), (k, 7), (k, 2, 3, 3)]
    P0 = [torch.randn(s, generator=g) for s in shapes]
    ref, mine = functional_optimizer(_settings(opt, momentum, wd)), \
        inplace_optimizer(_settings(opt, momentum, wd))
    assert isinstance(mine, InPlaceAdam if opt == "adam" else InPlaceSGD)
    P_ref = [p.clone() for p in P0]
    P = [torch.empty(k, 3, 7).transpose(1, 2).copy_(P0[0]), P0[1].clone(), P0[2].clone()]
    for step in range(6):
        G = [torch.randn(s, generator=g) for s in shapes]
        active = torch.tensor([True, True, step < 4, step < 2, step != 1])
        P_ref = ref.step(P_ref, [x.clone() for x in G], active)
        mine.step(P, [x.clone() for x in G], active)
        for a, b in zip(P, P_ref):
            assert torch.equal(a, b), step


@pytest.mark.parametrize("opt,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_a_multi_step_run_matches_the_functional_path(opt, momentum):
    """CompiledTrainer against autograd gradients + the functional optimizer
    (VectorBackend's twin path), clients finishing at different steps."""
    torch.manual_seed(0)
    module = MODELS["mlp-relu"][0]()
    fm = FunctionalModel(module)
    k, B = 6, 8
    P0 = _stacked(module, k, torch.float32, scale=0.05)
    trainer = CompiledTrainer(compile_model(module)[0], P0,
                              inplace_optimizer(_settings(opt, momentum, 1e-3)))
    ref_opt = functional_optimizer(_settings(opt, momentum, 1e-3))
    P_ref = [p.clone() for p in P0]
    steps = torch.tensor([10, 10, 7, 4, 9, 1])
    g = torch.Generator().manual_seed(3)
    for s in range(10):
        X = torch.rand(k, B, 64, generator=g)
        Y = torch.randint(0, 10, (k, B), generator=g)
        M = (torch.arange(B)[None, :] < torch.tensor([8, 8, 5, 8, 3, 8])[:, None]).float()
        active = steps > s
        M = M * active[:, None]
        L = trainer.step(X, Y, M, active)
        L_ref, G_ref = _autograd(module, P_ref, X, Y, M)
        P_ref = ref_opt.step(P_ref, G_ref, active)
        torch.testing.assert_close(L, L_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(trainer.P, P_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trainer.flat(), fm.join(P_ref), atol=1e-5, rtol=1e-4)
    # clients done early kept their parameters from then on
    assert not torch.equal(trainer.P[0][5], P0[0][5])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sgd_fused_into_the_backward_pass_equals_gradient_then_step(name):
    """Plain SGD with every client active runs fused into the backward pass
    (linear layers update their weights by one baddbmm_, other ops right
    after their own backward): the same parameters as the gradient-then-step
    path, with the optimizer's step never called."""
    torch.manual_seed(0)
    make, shape = MODELS[name]
    module = make()
    compiled = compile_model(module)[0]
    assert compiled.fusable
    k = 5
    P0 = _stacked(module, k, torch.float32, scale=0.05)
    fused, apart = (CompiledTrainer(compiled, P0, InPlaceSGD(0.05)) for _ in range(2))
    apart.fuse = False
    calls = {"fused": 0, "apart": 0}
    for label, tr in (("fused", fused), ("apart", apart)):
        step = tr.opt.step

        def counted(*a, label=label, step=step, **kw):
            calls[label] += 1
            return step(*a, **kw)

        tr.opt.step = counted
    g = torch.Generator().manual_seed(5)
    for _ in range(6):
        X, Y, M = _batch(k, 7, shape, torch.float32,
                         seed=int(torch.randint(1 << 30, (1,), generator=g)))
        torch.testing.assert_close(fused.step(X, Y, M), apart.step(X, Y, M), atol=1e-5, rtol=1e-5)
    assert calls == {"fused": 0, "apart": 6}
    for a, b in zip(fused.P, apart.P):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.equal(fused.P[0], P0[0])


def test_grad_hook_sees_and_changes_the_gradients():
    module = MODELS["mlp-relu"][0]()
    k = 3
    P0 = _stacked(module, k, torch.float32)
    seen = []

    def freeze_first(G):
        seen.append([g.clone() for g in G])
        G[0].zero_()

    trainer = CompiledTrainer(compile_model(module)[0], P0, InPlaceSGD(0.1),
                              grad_hook=freeze_first)
    X, Y, M = _batch(k, 4, (64,), torch.float32)
    trainer.step(X, Y, M)
    assert torch.equal(trainer.P[0], P0[0]) and not torch.equal(trainer.P[1], P0[1])
    assert len(seen) == 1 and float(seen[0][0][0].abs().sum()) > 0


# --------------------------------------------------------------------------
# the vectorized backend on the compiled step
# --------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fedmedbench-rescnn"


@pytest.fixture(scope="module")
def example_reg():
    """The registry with the residual CNN of examples/ (as FEDMEDBENCH_PLUGINS
    would load it: the module imported by name from its folder)."""
    import importlib

    from fedmedbench.registry import get_registry

    sys.path.insert(0, str(EXAMPLE))
    try:
        module = importlib.import_module("rescnn_plugin")
    finally:
        sys.path.remove(str(EXAMPLE))
    return get_registry(extra=[module])


def _client_data(built):
    """The clients' data of a built cell, as the engine hands it to a backend."""
    from fedmedbench.backends import ClientData

    return ClientData(ctx=built.clients_ctx, sites=list(built.federation.clients),
                      holdout=dict(built.federation.holdout),
                      factories=dict(built.client_factories), factory=built.factory,
                      local=built.clients.local_stage)


def _cells(reg, axes, *, rounds=2, run=None):
    from fedmedbench.matrix import parse_matrix

    return parse_matrix({"name": "compiled", "rounds": rounds, "axes": axes, "run": run or {}},
                        registry=reg).cells


def _both(reg, cell):
    from fedmedbench import run_cell

    return [run_cell({**cell, "backend": b}, registry=reg, keep_run=True)
            for b in ("loop", "vectorized")]


def _same(out, tol=1e-5):
    (a, ra), (b, rb) = out
    assert a["status"] == b["status"] == "ok", (a["error"], b["error"])
    assert b["backend"]["name"] == "vectorized"
    for i, p in ra.final_models.items():
        assert float((p - rb.final_models[i]).abs().max()) <= tol, i
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["loss"] == pytest.approx(hb["loss"], abs=tol)


def test_the_record_names_the_compiled_step_or_why_not(example_reg):
    """The MLP, FedProx's extra_loss and SCAFFOLD's offset all run on the
    compiled step; DP-SGD keeps its per-example path; a model with a layer
    the compiler lacks (SiLU) runs on vmap, and the record names the layer;
    an MLP whose dropout draws runs compiled, and under DP-SGD on the loop
    backend, the layer named."""
    cells = _cells(example_reg, {
        "dataset": ["heart-disease"],
        "algorithm": ["fedavg", {"name": "fedprox", "mu": 0.1}, "scaffold"],
        "privacy": ["none", [{"name": "dp-sgd", "noise_multiplier": 0.0,
                              "max_grad_norm": 0.5}]]}, rounds=1)
    from fedmedbench import run_cell

    kernels = {(c["labels"]["algorithm"], c["labels"]["privacy"]):
               run_cell({**c, "backend": "vectorized"}, registry=example_reg)["backend"]["kernel"]
               for c in cells}
    for (alg, priv), kernel in kernels.items():
        if priv == "none":
            assert kernel == "compiled", (alg, kernel)
        else:
            assert kernel.startswith("vmap per example (privacy dp-sgd"), (alg, kernel)
    img = {"name": "synthetic-imaging", "n_sites": 2, "n_per_site": 16}
    drop = _cells(example_reg, {"dataset": [img], "algorithm": ["fedavg"],
                                "model": [{"name": "rescnn", "width": 4, "blocks": 1,
                                           "act": "silu"}]}, rounds=1,
                  run={"local_steps": 1})[0]
    rec = run_cell({**drop, "backend": "vectorized"}, registry=example_reg)
    assert rec["status"] == "ok", rec["error"]
    assert rec["backend"]["kernel"] == (  # the batched twin has no residual add: vmap
        "vmap (not compiled: SiLU (layer 'blocks.0.act1'))"), rec["backend"]
    # dropout that draws runs compiled (the same record twice: counter-based masks); its
    # per-example DP path is not compiled: the loop backend, the layer named
    mlp = _cells(example_reg, {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
                               "model": [{"name": "mlp", "dropout": 0.25}],
                               "privacy": ["none", [{"name": "dp-sgd", "noise_multiplier": 1.0,
                                                     "max_grad_norm": 1.0}]]}, rounds=2)
    plain, dp = sorted(mlp, key=lambda c: c["labels"]["privacy"] != "none")
    a, b = (run_cell({**plain, "backend": "vectorized"}, registry=example_reg) for _ in "ab")
    assert a["status"] == "ok" and a["backend"]["kernel"] == "compiled", a["backend"]
    assert a["metrics"]["utility"] == b["metrics"]["utility"]
    assert a["metrics"]["utility"]["global"] > a["metrics"]["utility"]["majority_baseline"]
    rec = run_cell({**dp, "backend": "vectorized"}, registry=example_reg)
    assert rec["status"] == "ok" and rec["backend"]["name"] == "loop", rec["backend"]
    assert "Dropout (layer 'body.2') with p=0.25" in rec["backend"]["reason"]
    assert "dp-sgd" in rec["backend"]["reason"]


def test_the_example_residual_cnn_runs_compiled_and_agrees_with_the_loop(example_reg):
    """examples/fedmedbench-rescnn: a `+` skip, GroupNorm, max- and adaptive
    pooling on the compiled step; FedAvg and FedProx equal to the loop
    backend (lr 0.01: see test_engine's CNN note on ReLU/max-pool rounding)."""
    img = {"name": "synthetic-imaging", "n_sites": 3, "n_per_site": 24}
    for c in _cells(example_reg, {"dataset": [img],
                                  "algorithm": ["fedavg", {"name": "fedprox", "mu": 0.1}],
                                  "model": [{"name": "rescnn", "width": 8, "blocks": 2}]},
                    rounds=2, run={"local_steps": 2, "lr": 0.01, "batch_size": 8}):
        out = _both(example_reg, c)
        assert out[1][0]["backend"]["kernel"] == "compiled"
        _same(out, tol=1e-5)


def test_frozen_tensors_and_weight_decay_on_the_compiled_step(example_reg):
    """FedRep's frozen phases (``trainable``) with momentum and weight decay:
    the frozen tensors do not move on the compiled step, and it equals the
    loop backend."""
    mlp = {"name": "mlp", "hidden": [8], "norm": "layer"}
    for c in _cells(example_reg, {"dataset": ["heart-disease"], "model": [mlp],
                                  "algorithm": ["fedrep"]}, rounds=2,
                    run={"momentum": 0.9, "weight_decay": 0.01}):
        out = _both(example_reg, c)
        assert out[1][0]["backend"]["kernel"] == "compiled"
        _same(out)


def test_a_rounds_loss_weights_give_the_steps_own_floats(example_reg):
    """``VectorBackend._batches(norm=True)`` computes every step's row weights
    ``M / d`` and ``-d`` for the round at once; the compiled step given them
    returns the same loss and parameters, bit for bit, as the step that
    computes them itself -- over steps narrower than the round's widest
    batch and clients with no rows left (unequal step counts)."""
    import dataclasses

    from fedmedbench.cell import build_cell
    from fedmedbench.models import get_flat_params
    from fedmedbench.vectorized import VectorBackend

    cell = _cells(example_reg, {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
                                "model": [{"name": "mlp", "hidden": [8]}]},
                  run={"batch_size": 24})[0]
    built = build_cell(cell, example_reg)
    backend = VectorBackend(dataclasses.replace(_client_data(built)))
    assert backend.kernel == "compiled"
    k = 4
    w = get_flat_params(built.factory())
    start = backend.fmodel.split(w.unsqueeze(0).expand(k, -1))
    # one client trains an epoch whose last batch is short; the others stop earlier
    c = next(i for i, n in enumerate(backend._n[:k]) if n % 24)
    steps = [2] * k
    steps[c] = -(-int(backend._n[c]) // 24)
    rows, valid, lens = backend.plan(list(range(k)), steps)
    given, computed = (CompiledTrainer(backend.compiled, start, InPlaceSGD(0.1))
                       for _ in range(2))
    narrower = empty = 0
    for t, (X, Y, M, norm) in enumerate(backend._batches(rows, valid, lens, norm=True)):
        narrower += M.shape[1] < rows.shape[2]
        empty += int((M.sum(1) == 0).sum())
        assert torch.equal(norm[0].squeeze(1), M / M.sum(1).clamp(min=1.0).unsqueeze(1))
        assert torch.equal(given.step(X, Y, M, norm=norm), computed.step(X, Y, M)), t
    assert narrower and empty  # the cases the weights must survive were there
    for a, b in zip(given.P, computed.P):
        assert torch.equal(a, b)
    assert not torch.equal(given.P[0], start[0])
    # the compiled backend reads the cell's template instead of copying it, and leaves it
    # as it was; moving the backend moves a copy of its own
    template = built.factory.peek()
    before = [p.detach().clone() for p in template.parameters()]
    backend.train(list(range(k)), w.unsqueeze(0).expand(k, -1), steps, extra_loss=None,
                  grad_offset=None)
    assert backend.fmodel.module is template
    backend.to(torch.device("meta"))
    assert backend.fmodel.module is not template
    assert all(p.device.type == "cpu" and torch.equal(p, b)
               for p, b in zip(template.parameters(), before))


def test_the_compiled_path_keeps_every_tensor_on_the_backends_device(example_reg):
    """No CUDA here: the ``meta`` device stands in for one. A tensor made on the
    CPU inside the compiled path (a buffer, an index, a mask) would meet the
    meta tensors and raise, so one round on ``meta`` -- unequal step counts,
    SCAFFOLD's offset, FedProx's extra_loss, frozen tensors -- shows the
    path keeps to its device; the CPU twin of each call gives finite rows."""
    import dataclasses

    from fedmedbench.cell import build_cell
    from fedmedbench.models import get_flat_params
    from fedmedbench.vectorized import VectorBackend, resolve_device

    assert resolve_device(None).type == resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    cell = _cells(example_reg, {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
                                "model": [{"name": "mlp", "hidden": [8], "norm": "layer"}]},
                  run={"momentum": 0.9, "weight_decay": 0.01})[0]
    built = build_cell(cell, example_reg)
    parts = _client_data(built)
    w = get_flat_params(built.factory())
    k, D = 4, w.numel()
    frozen = torch.ones(D, dtype=torch.bool)
    frozen[:15 * 8] = False  # the first layer's weight
    calls = [{}, {"grad_offset": torch.full((k, D), 0.01)},
             {"extra_loss": lambda v: 0.05 * (v ** 2).sum()}, {"trainable": frozen}]
    for device in ("cpu", torch.device("meta")):
        backend = (VectorBackend(dataclasses.replace(parts), device=device) if device == "cpu"
                   else VectorBackend(dataclasses.replace(parts)).to(device))
        assert backend.kernel == "compiled" and backend.device.type == str(device)
        if str(device) == "meta":  # no values to read back on meta
            backend._finish = lambda clients, W, s, c: (W, None)
        for kw in calls:
            W, _ = backend.train(list(range(k)), w.unsqueeze(0).expand(k, -1), [3, 1, 2, 3],
                                 **{"extra_loss": None, "grad_offset": None, **kw})
            assert W.shape == (k, D) and W.device.type == str(device)
            if str(device) == "cpu":
                assert bool(torch.isfinite(W).all())
                if "trainable" in kw:  # frozen under momentum and weight decay
                    assert torch.equal(W[:, ~frozen], w.expand(k, -1)[:, ~frozen])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_compiled_path_on_cuda_equals_the_cpu(example_reg):
    """Issue 22.6: the same local steps on CUDA and on the CPU (the reference)
    agree within 1e-4 -- the MLP and the residual CNN of examples/, with
    SCAFFOLD's offset and FedProx's extra_loss."""
    import dataclasses

    from fedmedbench.cell import build_cell
    from fedmedbench.models import get_flat_params
    from fedmedbench.vectorized import VectorBackend

    img = {"name": "synthetic-imaging", "n_sites": 3, "n_per_site": 24}
    for axes in ({"dataset": ["heart-disease"], "algorithm": ["fedavg"]},
                 {"dataset": [img], "algorithm": ["fedavg"],
                  "model": [{"name": "rescnn", "width": 8, "blocks": 2}]}):
        built = build_cell(_cells(example_reg, axes, run={"batch_size": 8})[0], example_reg)
        parts = _client_data(built)
        w = get_flat_params(built.factory())
        k = len(parts.sites)
        for kw in ({}, {"grad_offset": torch.full((k, w.numel()), 0.01),
                        "extra_loss": lambda v: 0.05 * (v ** 2).sum()}):
            out = {}
            for device in ("cpu", "cuda"):
                backend = VectorBackend(dataclasses.replace(parts), device=device)
                assert backend.kernel == "compiled"
                out[device] = backend.train(list(range(k)), w.unsqueeze(0).expand(k, -1),
                                            [3] * k, **{"extra_loss": None,
                                                        "grad_offset": None, **kw})
            assert out["cuda"][0].device.type == "cpu"  # train returns CPU rows
            assert float((out["cuda"][0] - out["cpu"][0]).abs().max()) <= 1e-4
            np.testing.assert_allclose(out["cuda"][1], out["cpu"][1], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vectorized_dp_sgd_on_cuda_equals_the_cpu(example_reg):
    """Issue 22.6: DP-SGD's vectorized steps (per-example clipping, the noise
    drawn from the cell's CPU stream) on CUDA agree with the CPU within
    1e-4, and a whole cell run with ``device = "cuda"`` records its device
    and the same ε."""
    from fedmedbench.cell import build_cell
    from fedmedbench.engine import run_cell
    from fedmedbench.models import get_flat_params
    from fedmedbench.vectorized import VectorBackend

    axes = {"dataset": ["heart-disease"], "algorithm": ["fedavg"],
            "privacy": [{"name": "dp-sgd", "epsilon": 3.0}]}
    out = {}
    for device in ("cpu", "cuda"):  # a cell each: the mechanism's step counter is its own
        built = build_cell(_cells(example_reg, axes, run={"batch_size": 8})[0], example_reg)
        parts = _client_data(built)
        w = get_flat_params(built.factory())
        k = len(parts.sites)
        backend = VectorBackend(parts, device=device)
        out[device] = backend.train(list(range(k)), w.unsqueeze(0).expand(k, -1), [3] * k,
                                    extra_loss=None, grad_offset=None)
    assert float((out["cuda"][0] - out["cpu"][0]).abs().max()) <= 1e-4
    recs = {d: run_cell(_cells(example_reg, axes, rounds=1,
                               run={"backend": "vectorized", "device": d})[0],
                        registry=example_reg) for d in ("cpu", "cuda")}
    assert recs["cuda"]["status"] == "ok" and recs["cuda"]["backend"]["device"].startswith("cuda")
    assert recs["cuda"]["metrics"]["privacy"]["epsilon"] == \
        recs["cpu"]["metrics"]["privacy"]["epsilon"]
