"""The FedAvg workload of issue 10, shared by the engine benchmarks and the
Flower comparison (``tox -e bench-flower``).

scikit-learn's digits (1,797 8×8 images, 10 classes, shipped with sklearn, no
download), shuffled with a fixed seed, 80 % train / 20 % test, both dealt
into ``n`` IID shards (clients). An MLP with 64 hidden units, 2 local
epochs, batch 32, SGD lr 0.1, 5 rounds of FedAvg weighted by examples,
accuracy on the pooled test set at the end. :class:`Digits` serves it to
fedmedbench as a (test-only) dataset; :func:`bare_fedavg` is the same
computation written directly in torch, one client after another.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Annotated

import numpy as np
import torch

from fedmedbench import Dataset, FederatedData, Range, Site, Split, Task, hookimpl

ROUNDS, EPOCHS, BATCH, LR, HIDDEN = 5, 2, 32, 0.1, 64


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def digits_shards(n: int, seed: int = 0) -> list[tuple[Split, Split]]:
    """``n`` IID (train, test) shards of sklearn's digits."""
    X, y = _digits()
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    X, y = X[perm], y[perm]
    cut = int(0.8 * len(y))

    def bounds(lo: int, hi: int) -> list[int]:  # np.array_split's contiguous shards
        q, r = divmod(hi - lo, n)
        return [lo + i * q + min(i, r) for i in range(n + 1)]

    a, b = bounds(0, cut), bounds(cut, len(y))
    return [(Split(X[a[i]:a[i + 1]], y[a[i]:a[i + 1]]), Split(X[b[i]:b[i + 1]], y[b[i]:b[i + 1]]))
            for i in range(n)]


class Digits(Dataset):
    """Test-only: sklearn's digits in IID shards (the engine benchmark's workload)."""

    name = "bench-digits"
    default_partitioner = {"name": "natural"}
    run_defaults = {"local_steps": 0, "local_epochs": float(EPOCHS), "batch_size": BATCH,
                    "lr": LR, "eval_every": ROUNDS}

    def __init__(self, *, n_clients: Annotated[int, Range(ge=1, le=1000)] = 10) -> None:
        self.n_clients = n_clients

    def load(self, *, seed: int) -> FederatedData:
        shards = digits_shards(self.n_clients)
        task = Task(kind="multiclass", num_classes=10, input_shape=(64,), metric="accuracy",
                    model="mlp", model_kwargs={"hidden": [HIDDEN]})
        return FederatedData(task=task, sites=[Site(f"c{i}", tr, te)
                                               for i, (tr, te) in enumerate(shards)])



class DigitsPlugin:
    __name__ = "bench-workloads"

    @hookimpl
    def register_datasets(self, register):
        register(Digits)


def digits_cell(n_clients: int, *, backend: str = "auto", rounds: int = ROUNDS) -> dict:
    """The workload as a fedmedbench cell."""
    from fedmedbench.matrix import parse_matrix
    from fedmedbench.registry import get_registry

    reg = get_registry(extra=[DIGITS_PLUGIN])
    m = parse_matrix({"name": "bench", "rounds": rounds, "axes": {
        "dataset": [{"name": "bench-digits", "n_clients": n_clients}], "algorithm": ["fedavg"]},
        "run": {"backend": backend, "clients_per_round": 1.0}}, registry=reg)
    return m.cells[0]


def bare_fedavg(n_clients: int, *, seed: int = 0, rounds: int = ROUNDS) -> float:
    """FedAvg on the workload in plain torch, one client after another; the
    floor the engine is measured against. Returns the final test accuracy."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    shards = digits_shards(n_clients)
    data = [(torch.as_tensor(tr.X), torch.as_tensor(tr.y)) for tr, _ in shards]
    model = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, 10))
    w = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    n = torch.tensor([len(y) for _, y in data], dtype=torch.float32)
    weights = n / n.sum()
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n_clients)]
    for _ in range(rounds):
        new = []
        for (X, y), g in zip(data, gens):
            torch.nn.utils.vector_to_parameters(w.clone(), model.parameters())  # not a view of w
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            for _ in range(EPOCHS):
                for idx in torch.randperm(len(y), generator=g).split(BATCH):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                    opt.step()
            new.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
        w = weights @ torch.stack(new)
    torch.nn.utils.vector_to_parameters(w, model.parameters())
    Xt = torch.as_tensor(np.concatenate([te.X for _, te in shards]))
    yt = np.concatenate([te.y for _, te in shards])
    with torch.no_grad():
        return float((model(Xt).argmax(1).numpy() == yt).mean())


def vmap_fedavg(n_clients: int, *, seed: int = 0, rounds: int = ROUNDS) -> float:
    """FedAvg on the workload as a raw ``torch.func`` ensemble (PyTorch's
    model-ensembling recipe): every client's MLP a slice of stacked
    parameters, one ``vmap(grad(loss))`` call per local step for all
    clients, plain SGD on the stacks, the weighted mean between rounds. Each
    epoch's batch order for all clients comes from one ``argsort`` of random
    keys (padding rows last); a client with fewer batches gets masked, empty
    batches (no gradient, no step). Returns the final test accuracy."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    shards = digits_shards(n_clients)
    X = torch.as_tensor(np.concatenate([tr.X for tr, _ in shards]))
    y = torch.as_tensor(np.concatenate([tr.y for tr, _ in shards]))
    sizes = torch.tensor([len(tr.y) for tr, _ in shards])
    offsets = torch.cumsum(sizes, 0) - sizes
    widest = int(sizes.max())
    model = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, 10))
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    weights = sizes.to(torch.float32) / sizes.sum()
    gen = torch.Generator().manual_seed(seed)
    pad = torch.arange(widest)[None, :] >= sizes[:, None]

    def loss(ps, xb, yb, mb):
        out = functional_call(model, dict(zip(names, ps)), (xb,))
        ce = torch.nn.functional.cross_entropy(out, yb, reduction="none")
        return (ce * mb).sum() / mb.sum().clamp(min=1.0)

    step = vmap(grad(loss))
    for _ in range(rounds):
        P = [p.unsqueeze(0).repeat(n_clients, *([1] * p.dim())) for p in w]
        for _ in range(EPOCHS):
            keys = torch.rand(n_clients, widest, generator=gen).masked_fill_(pad, 2.0)
            order = keys.argsort(1)
            for start in range(0, widest, BATCH):
                idx = order[:, start:start + BATCH]
                m = (start + torch.arange(idx.shape[1]))[None, :] < sizes[:, None]
                rows = torch.where(m, idx + offsets[:, None], 0)
                G = step(P, X[rows], y[rows], m.to(torch.float32))
                P = [p - LR * g for p, g in zip(P, G)]
        w = [(weights.view(-1, *([1] * (p.dim() - 1))) * p).sum(0) for p in P]
    Xt = torch.as_tensor(np.concatenate([te.X for _, te in shards]))
    yt = np.concatenate([te.y for _, te in shards])
    with torch.no_grad():
        out = functional_call(model, dict(zip(names, w)), (Xt,))
    return float((out.argmax(1).numpy() == yt).mean())


def workload_flops(n_clients: int, *, rounds: int = ROUNDS) -> float:
    """Floating-point operations of the workload's arithmetic: per training
    example and epoch the forward pass (2·(64·H + H·10)), the weight
    gradients of both layers (the same again) and the second layer's input
    gradient (2·H·10; the first layer's input needs none); one evaluation
    of the test rows at the end (``eval_every = ROUNDS``). Biases, the
    activation, the loss and the optimizer are left out (a lower bound)."""
    shards = digits_shards(n_clients)
    train = sum(len(tr.y) for tr, _ in shards)
    test = sum(len(te.y) for _, te in shards)
    fwd = 2 * (64 * HIDDEN + HIDDEN * 10)
    return float((2 * fwd + 2 * HIDDEN * 10) * train * EPOCHS * rounds + fwd * test)


def sgemm_gflops(size: int = 1024, k: int = 5) -> float:
    """This core's float32 matrix-multiply rate (GFLOP/s, one thread): the
    best of ``k`` timed ``size``-square products."""
    torch.set_num_threads(1)
    a, b = torch.rand(size, size), torch.rand(size, size)
    c = torch.empty(size, size)
    return 2.0 * size ** 3 / best_time(lambda: torch.mm(a, b, out=c), k) / 1e9


DIGITS_PLUGIN = DigitsPlugin()


def best_times(fns: dict[str, Callable[[], object]], k: int = 3) -> dict[str, float]:
    """The fastest of ``k`` calls of each function in seconds, the calls
    interleaved (one of each in turn, after one untimed warm call each), so
    that a change of the machine's load reaches every contender alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(k):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def best_time(fn: Callable[[], object], k: int = 3, *, warm: bool = True) -> float:
    """The fastest of ``k`` calls of ``fn`` in seconds (after one untimed warm
    call: imports, caches, the first allocation)."""
    if warm:
        fn()
    best = float("inf")
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best

