"""DP-SGD: sample-level differential privacy inside each client's local training.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. "Deep Learning with
Differential Privacy". CCS 2016. Implemented with Opacus (Yousefpour et al.,
"Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021):
per-example gradients clipped to ``max_grad_norm``, Gaussian noise
``noise_multiplier · max_grad_norm`` per step, Poisson sampling of records.

Each client is made private **once per cell** (the engine calls
:meth:`DPSGD.make_private` once per client) and keeps its Opacus accountant
across rounds. With ``epsilon`` set, σ is solved per site over the whole
planned training (``rounds × local steps`` at that site's sample rate) with
Opacus's ``get_noise_multiplier``, so the planned ε never exceeds the target.

Noise and Poisson sampling draw from seeded torch generators so that a cell is
reproducible; that is Opacus's ``secure_mode=False`` (not a cryptographically
secure RNG), which is right for a benchmark and wrong for a deployment: the
record says so under ``noise_rng``.
"""

from __future__ import annotations

import types
import warnings
from typing import Annotated, Any

import torch

from fedmedbench import ClientContext, PrivacyMechanism, Range, RoundContext
from fedmedbench.accounting import check_accountant, epsilon_for, noise_for_epsilon

# stated in every record instead (noise_rng); and Opacus's backward hooks warn on
# every step that the input needs no gradient, which is expected here
warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")


class DPSGD(PrivacyMechanism):
    """Sample-level DP-SGD with Opacus; ε per site (the max is the cell's ε).

    Parameters
    ----------
    noise_multiplier : float, default 1.0
        σ, noise std relative to ``max_grad_norm``; ignored when ``epsilon`` is set.
    epsilon : float or None, default None
        Target ε per site over the planned training; σ is solved for it.
    max_grad_norm : float, default 1.0
        Per-example clipping norm C.
    delta : float, default 1e-5
        δ of the (ε, δ) guarantee.
    accountant : {"rdp", "prv"}, default "rdp"
        The Opacus accountant (PRV is tighter and approximate by design).
    """

    name = "dp-sgd"
    stages = frozenset({"local"})

    def __init__(self, *, noise_multiplier: Annotated[float, Range(gt=0)] = 1.0,
                 epsilon: Annotated[float | None, Range(gt=0)] = None,
                 max_grad_norm: Annotated[float, Range(gt=0)] = 1.0,
                 delta: Annotated[float, Range(gt=0, lt=1)] = 1e-5,
                 accountant: str = "rdp") -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier={noise_multiplier!r}; it must be > 0")
        if epsilon is not None and (isinstance(epsilon, bool)
                                    or not isinstance(epsilon, (int, float)) or epsilon <= 0):
            raise ValueError(f"epsilon={epsilon!r}; it must be a number > 0 (or left out)")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}; it must be > 0")
        if not 0 < delta < 1:
            raise ValueError(f"delta={delta!r}; it must be in (0, 1)")
        check_accountant(accountant)
        self.noise_multiplier = float(noise_multiplier)
        self.epsilon = None if epsilon is None else float(epsilon)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.accountant = accountant
        self._sites: dict[int, dict[str, Any]] = {}

    def validate(self, cell: Any) -> str | None:
        agg = cell.get("aggregator") or {}
        if agg.get("by") == "performance":
            return ("weighting by performance sends each client's accuracy on its own held-out "
                    "records to the server every round without noise, outside the DP-SGD "
                    "guarantee; weight by examples or uniformly")
        return None

    def setup(self, ctx: RoundContext) -> None:
        self._sites = {}

    def make_private(self, ctx: ClientContext, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, loader: Any) -> tuple[Any, Any, Any]:
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"dp-sgd cannot wrap this model: {errors[0]} (use a model without "
                             f"BatchNorm, e.g. GroupNorm)")
        rctx = ctx.round_ctx
        q = 1.0 / len(loader)  # Opacus's Poisson rate for this loader
        planned = rctx.rounds * rctx.steps_for(ctx.client)
        if self.epsilon is not None:
            sigma = noise_for_epsilon(target_epsilon=self.epsilon, delta=self.delta,
                                      sample_rate=q, steps=planned, accountant=self.accountant)
        else:
            sigma = self.noise_multiplier
        engine = PrivacyEngine(accountant=self.accountant)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=self.max_grad_norm, poisson_sampling=True,
            noise_generator=rctx.torch_generator("dp-sgd-noise", ctx.client))
        _noise_on_empty_batches(optimizer)
        self._sites[ctx.client] = {"site": ctx.site.name, "engine": engine,
                                   "noise_multiplier": sigma, "sample_rate": q,
                                   "planned_steps": planned, "n": ctx.num_examples}
        return model, optimizer, loader

    def accounting(self) -> dict[str, Any]:
        per_site: dict[str, Any] = {}
        for info in self._sites.values():
            hist = list(info["engine"].accountant.history)
            key = tuple(hist)
            if info.get("_key") != key:
                info["_key"], info["_eps"] = key, epsilon_for(hist, self.delta, self.accountant)
            per_site[info["site"]] = {
                "epsilon": info["_eps"], "noise_multiplier": info["noise_multiplier"],
                "sample_rate": info["sample_rate"], "steps": sum(n for _, _, n in hist),
                "planned_steps": info["planned_steps"], "records": info["n"]}
        eps = max((s["epsilon"] for s in per_site.values()), default=0.0)
        sigmas = sorted({s["noise_multiplier"] for s in per_site.values()})
        return {
            "epsilon": eps, "delta": self.delta, "accountant": self.accountant,
            "unit": "sample",
            "noise_multiplier": sigmas[0] if len(sigmas) == 1 else (
                min(sigmas) if sigmas else self.noise_multiplier),
            "max_grad_norm": self.max_grad_norm,
            "target_epsilon": self.epsilon,
            "sample_rate": max((s["sample_rate"] for s in per_site.values()), default=None),
            "steps": max((s["steps"] for s in per_site.values()), default=0),
            "per_site": per_site,
            "noise_rng": ("seeded torch generator for reproducibility (Opacus secure_mode off: "
                          "not a cryptographically secure RNG)"),
            "sampling": ("record-level Poisson sampling inside each site (Opacus DPDataLoader, "
                         "q_i = 1/ceil(n_i/batch_size)); epsilon is per site over that site's "
                         "records and counts only the steps the site took; no amplification "
                         "by client sampling is claimed; the cell's epsilon is the maximum"),
        }


def _noise_on_empty_batches(optimizer: Any) -> None:
    """Make an Opacus optimizer add noise and count the step when a Poisson
    batch is empty (the engine then calls ``step`` without a forward pass).

    Stock Opacus skips such a step silently (no noise, no accountant step),
    which makes "the batch was empty" observable. Here it becomes a
    noise-only step, exactly as DP-SGD's analysis assumes.
    """
    original = optimizer.pre_step

    def pre_step(self: Any, closure: Any = None) -> Any:
        if self.params and all(getattr(p, "grad_sample", None) is None for p in self.params):
            # one all-zero per-sample gradient: clipping and summing give zero,
            # then Opacus adds the noise, scales and counts the step as usual
            for p in self.params:
                p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
        return original(closure)

    optimizer.pre_step = types.MethodType(pre_step, optimizer)


COMPONENTS = (DPSGD,)
