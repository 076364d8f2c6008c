"""SCAFFOLD: stochastic controlled averaging. Each client corrects its local
gradients by the difference between the server's control variate ``c`` and its
own ``c_i`` (estimates of the global and the local update direction), which
removes the client drift that non-IID data causes in FedAvg.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning". ICML 2020 (Algorithm 1, control
variates by option II).

One round, for a sampled client ``i`` with ``K`` local steps of size ``lr``::

    y  <- x;  K times: y <- y - lr * (g_i(y) - c_i + c)
    c_i+ = c_i - c + (x - y) / (K * lr)                 # option II
    send dy = y - x  and  dc = c_i+ - c_i
    server: x <- x + server_lr * mean(dy);  c <- c + (1 / N) * sum(dc)

Client control variates live in the algorithm's state for the whole cell
(the simulation of what each hospital keeps between rounds). Each round a
client also uploads ``dc`` and downloads ``c``, so SCAFFOLD's traffic is
twice FedAvg's (recorded in the cost).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedmedbench import ClientContext, ClientUpdate, RoundContext
from fedmedbench.plugins.algorithms.fedavg import FedAvg


class Scaffold(FedAvg):
    """SCAFFOLD with option-II control variates (Karimireddy et al. 2020).

    No parameters: the local step size is the run setting ``lr``, the server
    step ``server_lr`` (the paper's ``eta_g``, default 1), the number of local
    steps the run's ``local_steps``/``local_epochs``.

    Skipped (with the reason) where option II's arithmetic does not hold:
    an optimizer other than plain SGD (``adam``, momentum), a ``local``-stage
    privacy mechanism (DP-SGD recomputes the gradient after the correction),
    or a transport mechanism (the control-variate deltas would travel in
    plaintext beside a masked or encrypted update).
    """

    name = "scaffold"

    def __init__(self) -> None:
        pass

    def validate(self, cell: Mapping[str, Any]) -> str | None:
        run = cell.get("run", {})
        if run.get("optimizer", "sgd") != "sgd" or float(run.get("momentum", 0.0)) != 0.0:
            return (f"option-II control variates assume plain SGD local steps; the run uses "
                    f"optimizer={run.get('optimizer')!r}, momentum={run.get('momentum')}")
        if any("local" in st for st in cell.get("privacy_stages", [])):
            return ("a local-stage mechanism (DP-SGD) recomputes each gradient from "
                    "per-sample gradients and would drop SCAFFOLD's correction")
        if any(("update" in st or "server" in st) for st in cell.get("privacy_stages", [])):
            return ("the control-variate deltas travel to the server in plaintext beside the "
                    "privatised update and reveal the raw update, so a client-level DP claim "
                    "would not hold")
        if cell.get("transport_view") is not None:
            return ("the control-variate deltas would reach the server in plaintext beside "
                    "the protected update")
        return None

    def setup(self, ctx: RoundContext) -> None:
        n = ctx.layout.numel
        ctx.state["scaffold_c"] = torch.zeros(n)
        ctx.state["scaffold_ci"] = {}

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> ClientUpdate:
        state = ctx.round_ctx.state
        c: torch.Tensor = state["scaffold_c"]
        ci: torch.Tensor = state["scaffold_ci"].get(ctx.client, torch.zeros_like(c))
        correction = c - ci
        steps = ctx.round_ctx.steps_for(ctx.client)
        lr = float(ctx.round_ctx.settings.lr)

        def correct(model: torch.nn.Module) -> None:
            off = 0
            for p in model.parameters():
                k = p.numel()
                if p.grad is not None:
                    p.grad.add_(correction[off:off + k].view_as(p))
                off += k

        new = ctx.train(global_params, steps=steps, grad_hook=correct)
        delta = new - global_params
        ci_new = ci - c + (global_params - new) / (steps * lr)
        state["scaffold_ci"][ctx.client] = ci_new
        upd = ctx.update(delta, control_delta=ci_new - ci)
        upd.metrics["bytes"] = 2 * delta.numel() * 4  # dy and dc
        return upd

    def server_update(self, ctx: RoundContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        dc = [u.extra["control_delta"] for u in updates if "control_delta" in u.extra]
        if dc:
            ctx.state["scaffold_c"] = ctx.state["scaffold_c"] + torch.stack(dc).sum(0) / \
                ctx.num_clients
        return global_params + ctx.settings.server_lr * aggregate

    def bytes_down(self, ctx: RoundContext, model_bytes: int) -> int:
        return 2 * model_bytes  # x and c


COMPONENTS = (Scaffold,)
