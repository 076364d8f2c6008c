"""Flower 1.42's simulation engine against fedmedbench on issue 10's FedAvg
workload (``tox -e bench-flower``; Flower lives only in that environment and
is never a dependency of fedmedbench).

The workload is :mod:`workloads`' (sklearn's digits in ``n`` IID shards, MLP
with 64 hidden units, 2 local epochs, batch 32, SGD lr 0.1, 5 rounds of FedAvg
weighted by examples). It runs three ways, at 10 and 100 clients:

- **Flower**: ``flwr.simulation.run_simulation`` (ray backend) with a
  message-API ``ServerApp`` running Flower's own ``FedAvg`` strategy (every
  node trains each round, weighted by ``num-examples``; no client-side
  evaluation) and a server-side ``evaluate_fn`` on the pooled test set after
  every round. Its ``ClientApp`` trains exactly like a fedmedbench client: the
  cell's seeded initial model (``torch.manual_seed(seed)`` then the registered
  ``mlp``'s build, as ``CellRun._factory`` does), the client's
  :class:`~fedmedbench.training.BatchStream` with seed
  ``CellContext.batch_seed(client)``, plain SGD, ``2 · ceil(n_i / 32)`` steps
  a round. Flower builds a fresh ``ClientApp`` call for every message, so the
  client fast-forwards its stream by the steps of the earlier rounds and
  draws the batches a fedmedbench client draws in that round.
- **fedmedbench**, ``loop`` and ``vectorized`` backends, ``eval_every = 1``
  (so each round of the record's history has the pooled-test utility).

Before timing, the script checks that these assumptions hold against the
fedmedbench run itself (clients' training rows, batch seeds, steps, initial
parameters, pooled test set), then that the per-round accuracies agree and
the final global models are close. The two sides compute the same FedAvg
in a different floating-point order: Flower averages the clients' models in
float32 numpy, ``sum_i (n_i / n) w_i``, in the order the replies arrive;
fedmedbench adds the weighted mean of the clients' deltas to the global
model in torch, ``w + sum_i (n_i / n) (w_i - w)``. The global models
therefore differ in the last bits (about 1e-7 relative), and an accuracy may
differ when a test example's two top logits are that close. Accuracies must
agree within ``--acc-tol`` (default: one pooled test example) in every
round and final parameters within ``--param-tol``; the script prints how
many rounds agree exactly. Exit status 1 when they disagree.

Times: fedmedbench's are the best of ``--repeat`` warm calls (after one
untimed call in the process, which also serves the checks); Flower's are the
wall time of each ``run_simulation`` call (ray start, actor pool, rounds and
shutdown, what a Flower user waits for), with the time of the strategy's
rounds alone (``strategy.start``, which starts while ray comes up, so its
round 1 holds most of the start-up) and ``5 ×`` the mean of rounds 2-5
(Flower's steady state, a lower bound on what 5 rounds cost it) alongside. fedmedbench runs one torch thread
in one process; Flower's clients run in ``cpu_count / --cpus-per-client`` ray
actors of one torch thread each.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from workloads import BATCH, DIGITS_PLUGIN, EPOCHS, HIDDEN, LR, ROUNDS, digits_shards

SEED = 0  # the cells' seed (the matrix default; checked against the cell)
INPUT_SHAPE, NUM_CLASSES = (64,), 10


# -- the client's training, as a fedmedbench client does it --------------------

def batch_seed(client: int, seed: int = SEED) -> int:
    """``CellContext.batch_seed(client)`` of a cell with seed ``seed``."""
    from fedmedbench.training import batch_seeds

    return int(batch_seeds(seed, [client])[0])


def local_steps(n: int) -> int:
    """Optimizer steps a round for ``n`` training rows: 2 epochs of ceil(n / 32)."""
    return EPOCHS * math.ceil(n / BATCH)


def initial_model() -> torch.nn.Module:
    """The cell's seeded initial model (``CellRun._factory``)."""
    from fedmedbench.models import build_model

    torch.manual_seed(SEED)
    return build_model("mlp", INPUT_SHAPE, NUM_CLASSES, hidden=[HIDDEN])


@functools.lru_cache(maxsize=4)
def _tensors(n_clients: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from fedmedbench.training import to_tensors

    return [to_tensors(tr) for tr, _ in digits_shards(n_clients)]


_ACTOR: dict[str, torch.nn.Module] = {}  # one model per ray actor process


def client_train(msg: Any, context: Any, template: torch.nn.Module) -> Any:
    """The Flower ``ClientApp``'s train function (runs in a ray actor):
    ``template`` is the cell's initial model, shipped from the driver, so an
    actor needs neither fedmedbench's registry nor its plugins."""
    import copy

    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from torch import nn

    from fedmedbench.training import BatchStream

    torch.set_num_threads(1)
    client = int(context.node_config["partition-id"])
    n_clients = int(context.node_config["num-partitions"])
    rnd = int(msg.content["config"]["server-round"])
    if "model" not in _ACTOR:  # one model per actor; the parameters come with the message
        _ACTOR["model"] = copy.deepcopy(template)
    model = _ACTOR["model"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    X, y = _tensors(n_clients)[client]
    steps = local_steps(len(y))
    stream = BatchStream(len(y), BATCH, batch_seed(client))
    for _ in range((rnd - 1) * steps):  # where fedmedbench's stream stands after round rnd - 1
        stream.next_indices()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        idx = torch.from_numpy(stream.next_indices())
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


def pooled_test(n_clients: int) -> tuple[np.ndarray, np.ndarray]:
    shards = digits_shards(n_clients)
    return (np.concatenate([te.X for _, te in shards]),
            np.concatenate([te.y for _, te in shards]))


def accuracy(model: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    """fedmedbench's pooled-test accuracy (``predict_proba`` + ``metrics.score``)."""
    from fedmedbench.metrics import score
    from fedmedbench.training import predict_proba

    return score("accuracy", y, predict_proba(model, X))


def _flat(state: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([v.detach().numpy().reshape(-1) for v in state.values()])


# -- Flower -----------------------------------------------------------------------

def run_flower(n_clients: int, *, cpus_per_client: float) -> dict[str, Any]:
    """One FedAvg run in Flower's simulation engine: per-round accuracies,
    final flat parameters, wall time, the strategy's time and each round's
    (round 1 includes ray's start and the actors' imports: the ServerApp
    starts while the simulation engine brings ray up)."""
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    X_test, y_test = pooled_test(n_clients)
    eval_model = initial_model()
    init = ArrayRecord(initial_model().state_dict())
    out: dict[str, Any] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        out.setdefault("t_eval", []).append(time.perf_counter())  # round 0 = before round 1
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy(eval_model, X_test, y_test)})

    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_clients,
                          min_available_nodes=n_clients)
        t0 = time.perf_counter()
        result = strategy.start(grid=grid, initial_arrays=init, num_rounds=ROUNDS,
                                evaluate_fn=evaluate)
        out["rounds_s"] = time.perf_counter() - t0
        out["acc"] = [float(result.evaluate_metrics_serverapp[t]["accuracy"])
                      for t in range(1, ROUNDS + 1)]
        out["final"] = _flat(result.arrays.to_torch_state_dict())
        out["round_s"] = np.diff(out["t_eval"]).tolist()

    template = initial_model()

    def train(msg: Any, context: Any) -> Any:  # ray pickles this closure and template by value
        return client_train(msg, context, template)

    client = ClientApp()
    client.train()(train)
    cpus = os.cpu_count() or 1
    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=n_clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client,
                                                        "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus}})
    out["wall_s"] = time.perf_counter() - t0
    if "acc" not in out:
        raise RuntimeError(f"Flower's ServerApp did not finish ({n_clients} clients); "
                           "see the log above")
    return out


# -- fedmedbench ------------------------------------------------------------------

def fedmedbench_cell(n_clients: int, backend: str, reg: Any) -> dict[str, Any]:
    """:func:`workloads.digits_cell` with ``eval_every = 1``."""
    from fedmedbench.matrix import parse_matrix

    m = parse_matrix({"name": "bench-flower", "rounds": ROUNDS, "axes": {
        "dataset": [{"name": "bench-digits", "n_clients": n_clients}], "algorithm": ["fedavg"]},
        "run": {"backend": backend, "clients_per_round": 1.0, "eval_every": 1}}, registry=reg)
    return m.cells[0]


def run_fedmedbench(n_clients: int, backend: str, *, repeat: int) -> dict[str, Any]:
    from fedmedbench.engine import run_cell
    from fedmedbench.registry import get_registry

    reg = get_registry(extra=[DIGITS_PLUGIN])
    cell = fedmedbench_cell(n_clients, backend, reg)
    rec, run = run_cell(cell, registry=reg, keep_run=True)  # warm-up; the checks read it
    if rec["status"] != "ok":
        raise RuntimeError(f"fedmedbench {backend}, {n_clients} clients: {rec['error']}")
    if rec["backend"]["name"] != backend:
        raise RuntimeError(f"fedmedbench ran {rec['backend']} where {backend} was asked for")
    acc = [float(h["utility"]) for h in rec["history"]]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        again = run_cell(cell, registry=reg)
        times.append(time.perf_counter() - t0)
        if [float(h["utility"]) for h in again["history"]] != acc:
            raise RuntimeError(f"fedmedbench {backend} is not deterministic across calls")
    return {"acc": acc, "final": run.protocol.global_params().numpy().copy(), "times": times,
            "run": run}


def check_same_workload(run: Any, n_clients: int) -> list[str]:
    """What the Flower client assumes about a fedmedbench client, checked
    against a fedmedbench run; returns the problems (empty: none)."""
    from fedmedbench.models import get_flat_params

    problems = []
    if run.seed != SEED:
        problems.append(f"cell seed {run.seed}, the Flower client assumes {SEED}")
    shards = digits_shards(n_clients)
    if len(run.ctx.clients) != n_clients:
        problems.append(f"{len(run.ctx.clients)} fedmedbench clients, {n_clients} shards")
    for i, (site, (tr, _)) in enumerate(zip(run.ctx.clients, shards)):
        if not (np.array_equal(site.train.X, tr.X) and np.array_equal(site.train.y, tr.y)):
            problems.append(f"client {i} ({site.name}): training rows differ from shard {i}")
        if run.ctx.batch_seed(i) != batch_seed(i):
            problems.append(f"client {i}: batch seed {run.ctx.batch_seed(i)} != {batch_seed(i)}")
        if run.ctx.steps_for(i) != local_steps(len(tr)):
            problems.append(f"client {i}: {run.ctx.steps_for(i)} steps a round, the Flower "
                            f"client takes {local_steps(len(tr))}")
    if not torch.equal(get_flat_params(run.model_factory()), get_flat_params(initial_model())):
        problems.append("initial parameters differ")
    X, y = pooled_test(n_clients)
    Xr = np.concatenate([s.test.X for s in run.ctx.data.sites])
    yr = np.concatenate([s.test.y for s in run.ctx.data.sites])
    if not (np.array_equal(X, Xr) and np.array_equal(y, yr)):
        problems.append("pooled test sets differ")
    return problems


# -- the comparison ---------------------------------------------------------------

def compare(n_clients: int, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {n_clients} clients ==", flush=True)
    fmb = {b: run_fedmedbench(n_clients, b, repeat=args.repeat) for b in ("loop", "vectorized")}
    problems = check_same_workload(fmb["loop"]["run"], n_clients)
    flower = [run_flower(n_clients, cpus_per_client=args.cpus_per_client)
              for _ in range(args.flower_repeat)]
    fl = flower[0]
    if any(f["acc"] != fl["acc"] for f in flower[1:]):
        problems.append("Flower's accuracies differ between its runs")
    n_test = len(pooled_test(n_clients)[1])
    rows: dict[str, Any] = {"clients": n_clients, "test_examples": n_test,
                            "acc": {"flower": fl["acc"]}}
    exact = {}
    for b, r in fmb.items():
        rows["acc"][f"fedmedbench-{b}"] = r["acc"]
        diff = np.abs(np.array(r["acc"]) - np.array(fl["acc"]))
        pdiff = float(np.abs(r["final"] - fl["final"]).max())
        exact[b] = int((diff == 0).sum())
        rows[f"max_acc_diff_{b}"] = float(diff.max())
        rows[f"max_param_diff_{b}"] = pdiff
        if diff.max() > args.acc_tol * (1.0 / n_test) + 1e-12:
            problems.append(f"{b}: per-round accuracies differ from Flower's by up to "
                            f"{diff.max():.4f} ({diff.max() * n_test:.0f} test examples; "
                            f"tolerance {args.acc_tol})")
        if pdiff > args.param_tol:
            problems.append(f"{b}: final parameters differ from Flower's by {pdiff:.2e} "
                            f"(tolerance {args.param_tol:g})")
    rows["rounds_exactly_equal"] = exact
    rows["flower_wall_s"] = [f["wall_s"] for f in flower]
    rows["flower_rounds_s"] = [f["rounds_s"] for f in flower]
    rows["flower_round_s"] = [f["round_s"] for f in flower]
    rows["flower_steady_s"] = [ROUNDS * float(np.mean(f["round_s"][1:])) for f in flower]
    rows["fedmedbench_loop_s"] = fmb["loop"]["times"]
    rows["fedmedbench_vectorized_s"] = fmb["vectorized"]["times"]
    rows["problems"] = problems
    print(f"per-round accuracy (pooled test, {n_test} examples):")
    for name, acc in rows["acc"].items():
        print(f"  {name:23s} " + " ".join(f"{a:.4f}" for a in acc))
    for b in fmb:
        print(f"  {b}: {exact[b]}/{ROUNDS} rounds equal to Flower's exactly, final parameters "
              f"within {rows[f'max_param_diff_{b}']:.1e}")
    for f in flower:
        print(f"  Flower: run_simulation {f['wall_s']:.2f} s, rounds "
              + " ".join(f"{t:.2f}" for t in f["round_s"]) + " s")
    print(f"  fedmedbench loop {min(rows['fedmedbench_loop_s']):.3f} s, vectorized "
          f"{min(rows['fedmedbench_vectorized_s']):.3f} s (best of {args.repeat})")
    for p in problems:
        print(f"  DISAGREE: {p}")
    return rows


def table(results: list[dict[str, Any]]) -> str:
    head = ("| clients | Flower run_simulation s | Flower strategy s | Flower 5 steady rounds s "
            "| fedmedbench loop s | fedmedbench vectorized s | Flower / loop | Flower / vectorized "
            "| steady Flower / loop | steady Flower / vectorized | final accuracy |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        fw, fr = min(r["flower_wall_s"]), min(r["flower_rounds_s"])
        fs = min(r["flower_steady_s"])
        lo, ve = min(r["fedmedbench_loop_s"]), min(r["fedmedbench_vectorized_s"])
        lines.append(f"| {r['clients']} | {fw:.2f} | {fr:.2f} | {fs:.2f} | {lo:.3f} | {ve:.3f} "
                     f"| {fw / lo:.1f}× | {fw / ve:.1f}× | {fs / lo:.1f}× | {fs / ve:.1f}× "
                     f"| {r['acc']['flower'][-1]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed fedmedbench calls per backend after the warm-up (best is shown)")
    ap.add_argument("--flower-repeat", type=int, default=1,
                    help="run_simulation calls per client count (best is shown)")
    ap.add_argument("--cpus-per-client", type=float, default=1.0,
                    help="ray client_resources num_cpus (actors = cpu_count / this)")
    ap.add_argument("--acc-tol", type=float, default=1.0,
                    help="allowed per-round accuracy difference, in pooled test examples")
    ap.add_argument("--param-tol", type=float, default=1e-4,
                    help="allowed max |difference| of the final global parameters")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import flwr
    import ray

    torch.set_num_threads(1)
    load0 = os.getloadavg()
    print(f"flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    results = [compare(n, args) for n in args.clients]
    load1 = os.getloadavg()
    print(f"\nload average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"flwr": flwr.__version__, "ray": ray.__version__,
                                         "cpus": os.cpu_count(), "load_start": load0,
                                         "load_end": load1, "results": results}, indent=1))
    bad = [p for r in results for p in r["problems"]]
    if bad:
        print(f"\n{len(bad)} disagreement(s) between Flower and fedmedbench", file=sys.stderr)
        return 1
    print("\nFlower and fedmedbench agree on every round.")
    return 0


if __name__ == "__main__":
    # Import this file under its module name so that ray pickles the ClientApp's
    # train function by reference (flower_compare.client_train), not as __main__.
    import flower_compare

    sys.exit(flower_compare.main())
