"""Adaptive federated optimisation: the server treats the aggregated client
update as a pseudo-gradient and applies Adagrad, Adam or Yogi to it.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive
Federated Optimization". ICLR 2021 (Algorithm 2).

With ``Δ_t`` the aggregated delta (weighted mean of ``w_i - w_t``)::

    m_t = beta1 * m_{t-1} + (1 - beta1) * Δ_t
    v_t = v_{t-1} + Δ_t²                                          (FedAdagrad)
    v_t = beta2 * v_{t-1} + (1 - beta2) * Δ_t²                    (FedAdam)
    v_t = v_{t-1} - (1 - beta2) * Δ_t² * sign(v_{t-1} - Δ_t²)     (FedYogi)
    w_{t+1} = w_t + eta * m_t / (sqrt(v_t) + tau)

as in the paper: no bias correction, ``m_0 = 0`` and ``v_0 = tau²``.
``v0 = 0`` starts the second moment at 0 instead, as FLamby's FedOpt
strategies do (owkin/FLamby ``flamby/strategies/fed_opt.py``; the
Fed-Heart-Disease preset ``matrices/flamby-heart.toml``).
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Literal

from fedmedbench import Algorithm, CellContext, Range, Received

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the server optimisers (``optimizer``)
Optimizer = Literal["adagrad", "adam", "yogi"]
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)


class FedOpt(Algorithm):
    """Server-side adaptive optimiser on the aggregated update (Reddi et al. 2021).

    Parameters
    ----------
    optimizer : {"adagrad", "adam", "yogi"}, default "adam"
        The server optimiser applied to the aggregated update.
    eta : float, default 0.03
        Server learning rate η (> 0). Replaces the run setting ``server_lr``.
    beta1 : float, default 0.9
        Momentum of the first moment, in [0, 1).
    beta2 : float, default 0.99
        Decay of the second moment, in [0, 1) (unused by adagrad).
    tau : float, default 1e-3
        Adaptivity ε (> 0); the paper's best values lie in 1e-3..1e-1.
    v0 : float or None, default None
        The second moment's starting value (>= 0): ``None`` is the paper's
        ``tau²``; FLamby starts it at ``0``.
    """

    name = "fedopt"
    vectorized = True

    def __init__(self, *, optimizer: Optimizer = "adam", eta: Annotated[float, Range(gt=0)] = 0.03,
                 beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9,
                 beta2: Annotated[float, Range(ge=0, lt=1)] = 0.99,
                 tau: Annotated[float, Range(gt=0)] = 1e-3,
                 v0: Annotated[float | None, Range(ge=0)] = None) -> None:
        self.optimizer, self.eta, self.beta1, self.beta2, self.tau = (
            optimizer, float(eta), float(beta1), float(beta2), float(tau))
        self.v0 = None if v0 is None else float(v0)

    def setup(self, ctx: CellContext) -> None:
        import torch

        n = ctx.layout.numel
        ctx.state["fedopt_m"] = torch.zeros(n, dtype=torch.float64)
        v0 = self.tau ** 2 if self.v0 is None else self.v0
        ctx.state["fedopt_v"] = torch.full((n,), v0, dtype=torch.float64)

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        import torch

        d = aggregate.to(torch.float64)
        m = self.beta1 * ctx.state["fedopt_m"] + (1 - self.beta1) * d
        v, d2 = ctx.state["fedopt_v"], d * d
        if self.optimizer == "adagrad":
            v = v + d2
        elif self.optimizer == "adam":
            v = self.beta2 * v + (1 - self.beta2) * d2
        else:  # yogi
            v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
        ctx.state["fedopt_m"], ctx.state["fedopt_v"] = m, v
        step = self.eta * m / (torch.sqrt(v) + self.tau)
        return (global_params.to(torch.float64) + step).to(global_params.dtype)


class FedAdam(FedOpt):
    """FedAdam: :class:`FedOpt` with ``optimizer="adam"`` (parameters as FedOpt's)."""

    name = "fedadam"

    def __init__(self, *, eta: Annotated[float, Range(gt=0)] = 0.03,
                 beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9,
                 beta2: Annotated[float, Range(ge=0, lt=1)] = 0.99,
                 tau: Annotated[float, Range(gt=0)] = 1e-3,
                 v0: Annotated[float | None, Range(ge=0)] = None) -> None:
        super().__init__(optimizer="adam", eta=eta, beta1=beta1, beta2=beta2, tau=tau, v0=v0)


class FedYogi(FedOpt):
    """FedYogi: :class:`FedOpt` with ``optimizer="yogi"`` (parameters as FedOpt's)."""

    name = "fedyogi"

    def __init__(self, *, eta: Annotated[float, Range(gt=0)] = 0.03,
                 beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9,
                 beta2: Annotated[float, Range(ge=0, lt=1)] = 0.99,
                 tau: Annotated[float, Range(gt=0)] = 1e-3,
                 v0: Annotated[float | None, Range(ge=0)] = None) -> None:
        super().__init__(optimizer="yogi", eta=eta, beta1=beta1, beta2=beta2, tau=tau, v0=v0)


class FedAdagrad(FedOpt):
    """FedAdagrad: :class:`FedOpt` with ``optimizer="adagrad"`` (``beta2`` unused)."""

    name = "fedadagrad"

    def __init__(self, *, eta: Annotated[float, Range(gt=0)] = 0.03,
                 beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9,
                 tau: Annotated[float, Range(gt=0)] = 1e-3,
                 v0: Annotated[float | None, Range(ge=0)] = None) -> None:
        super().__init__(optimizer="adagrad", eta=eta, beta1=beta1, tau=tau, v0=v0)


COMPONENTS = (FedOpt, FedAdam, FedYogi, FedAdagrad)
