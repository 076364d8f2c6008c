"""DP-FedAvg: client-level differential privacy for federated averaging.

McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
Language Models". ICLR 2018: each client's update is clipped to L2 norm C and
Gaussian noise of std σ·C is added to the sum of the clipped updates, so one
client's whole contribution is protected.

Adaptive clipping after Andrew, Thakkar, McMahan, Ramaswamy. "Differentially
Private Learning with Adaptive Clipping". NeurIPS 2021: C follows a target
quantile γ of the update norms, updated geometrically from a noisy count of
unclipped updates, ``C ← C · exp(−η_C (b̃ − γ))``; the update noise is raised
to ``z_Δ = (z⁻² − (2σ_b)⁻²)^{-1/2}`` so that the pair (sum, count) composes to
the Gaussian mechanism with the requested multiplier z (their Theorem 1).

The review's adaptive noise: a schedule ``σ_t = max(σ_min, σ_0 · decay^(t−1))``
and a layer-wise split of the clipping budget (per-layer bounds C_l with
Σ C_l² = C², so the whole update still has norm at most C). Rounds of
different σ are composed exactly by the Opacus accountant
(:class:`fedmedbench.accounting.Ledger`).

Noise is ``central`` (added once to the aggregate by a trusted server) or
``distributed`` (each of the k clients adds N(0, σ²C²/k), so the sum carries
σ·C: the pairing with secure aggregation, where no one sees an un-noised sum).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
import torch

from fedmedbench import ClientUpdate, PrivacyMechanism, Range, RoundContext
from fedmedbench.accounting import Ledger, check_accountant, noise_for_epsilon, noise_for_schedule

NOISE = ("auto", "central", "distributed")
LAYERWISE = ("none", "equal", "size")


class DPFedAvg(PrivacyMechanism):
    """Client-level DP (McMahan et al. 2018) with adaptive clipping and noise schedules.

    Parameters
    ----------
    noise_multiplier : float, default 1.0
        z (σ at round 1 with a schedule); ignored when ``epsilon`` is set.
    epsilon : float or None, default None
        Target client-level ε over all planned rounds; z is solved for it.
    clip : float, default 1.0
        L2 clipping norm C (the starting value with adaptive clipping).
    delta : float, default 1e-5
        δ of the (ε, δ) guarantee.
    accountant : {"rdp", "prv"}, default "rdp"
    noise : {"auto", "central", "distributed"}, default "auto"
        ``auto`` is distributed when the stack has a transport mechanism
        (secure aggregation), else central.
    target_quantile : float or None, default None
        γ in (0, 1) turns on adaptive clipping (Andrew et al. 2021).
    clip_lr : float, default 0.2
        η_C, the geometric learning rate of the clipping norm.
    count_noise : float, default 0.0
        σ_b, std of the noise on the unclipped count; 0 means expected clients / 20.
    noise_decay : float, default 1.0
        Per-round multiplicative decay of σ, in (0, 1].
    min_noise_multiplier : float, default 0.0
        Floor of the decayed σ.
    layerwise : {"none", "equal", "size"}, default "none"
        Split of the clipping budget across parameter tensors: equal shares or
        shares proportional to each tensor's size.
    """

    name = "dp-fedavg"
    stages = frozenset({"update", "server"})

    def __init__(self, *, noise_multiplier: Annotated[float, Range(gt=0)] = 1.0,
                 epsilon: Annotated[float | None, Range(gt=0)] = None,
                 clip: Annotated[float, Range(gt=0)] = 1.0,
                 delta: Annotated[float, Range(gt=0, lt=1)] = 1e-5, accountant: str = "rdp",
                 noise: str = "auto",
                 target_quantile: Annotated[float | None, Range(gt=0, lt=1)] = None,
                 clip_lr: Annotated[float, Range(gt=0)] = 0.2,
                 count_noise: Annotated[float, Range(ge=0)] = 0.0,
                 noise_decay: Annotated[float, Range(gt=0, le=1)] = 1.0,
                 min_noise_multiplier: Annotated[float, Range(ge=0)] = 0.0,
                 layerwise: str = "none") -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier={noise_multiplier!r}; it must be > 0")
        if epsilon is not None and (isinstance(epsilon, bool)
                                    or not isinstance(epsilon, (int, float)) or epsilon <= 0):
            raise ValueError(f"epsilon={epsilon!r}; it must be a number > 0 (or left out)")
        if not clip > 0:
            raise ValueError(f"clip={clip!r}; it must be > 0")
        if not 0 < delta < 1:
            raise ValueError(f"delta={delta!r}; it must be in (0, 1)")
        check_accountant(accountant)
        if noise not in NOISE:
            raise ValueError(f"noise={noise!r}; choose one of {', '.join(NOISE)}")
        if target_quantile is not None and (isinstance(target_quantile, bool) or not isinstance(
                target_quantile, (int, float)) or not 0 < target_quantile < 1):
            raise ValueError(f"target_quantile={target_quantile!r}; it must be in (0, 1) "
                             f"(or left out for a fixed clip)")
        if not clip_lr > 0:
            raise ValueError(f"clip_lr={clip_lr!r}; it must be > 0")
        if count_noise < 0:
            raise ValueError(f"count_noise={count_noise!r}; it must be >= 0 (0: clients/20)")
        if not 0 < noise_decay <= 1:
            raise ValueError(f"noise_decay={noise_decay!r}; it must be in (0, 1]")
        if min_noise_multiplier < 0:
            raise ValueError(f"min_noise_multiplier={min_noise_multiplier!r}; it must be >= 0")
        if layerwise not in LAYERWISE:
            raise ValueError(f"layerwise={layerwise!r}; choose one of {', '.join(LAYERWISE)}")
        self.noise_multiplier = float(noise_multiplier)
        self.epsilon = None if epsilon is None else float(epsilon)
        self.clip = float(clip)
        self.delta = float(delta)
        self.accountant = accountant
        self.noise = noise
        self.target_quantile = None if target_quantile is None else float(target_quantile)
        self.clip_lr = float(clip_lr)
        self.count_noise = float(count_noise)
        self.noise_decay = float(noise_decay)
        self.min_noise_multiplier = float(min_noise_multiplier)
        self.layerwise = layerwise
        self._mode = "distributed" if noise == "distributed" else "central"
        self._ledger = Ledger(accountant)

    # -- validation ------------------------------------------------------------

    def validate(self, cell: Mapping[str, Any]) -> str | None:
        if cell.get("topology") != "federated":
            return (f"client-level DP protects clients of a federation, and "
                    f"{cell['algorithm']['name']} ({cell.get('topology')}) has no aggregation")
        agg = cell.get("aggregator") or {}
        if not cell.get("aggregator_linear", True) or agg.get("by") != "uniform":
            return (f"noise is calibrated to one client's share 1/m of an unweighted mean, but "
                    f"the aggregator is {agg.get('name')}({_kv(agg)}); use "
                    f"{{name = \"weighted-mean\", by = \"uniform\"}}")
        if cell.get("needs_individual_updates"):
            return (f"{cell['algorithm']['name']} uses every client's model at the server, and "
                    f"those individual updates are not covered by noise on the aggregate")
        if cell.get("compressor"):
            return ("a compressor runs after clipping and may send a vector of norm above the "
                    "clip (top-k error feedback adds earlier residuals), which breaks the "
                    "sensitivity bound the noise is calibrated to")
        if (cell.get("run") or {}).get("client_sampling") == "poisson":
            return ("the unweighted mean divides by the number of sampled clients, which Poisson "
                    "sampling makes data-dependent (and can leave a round empty, which skipping "
                    "would reveal); use client_sampling = \"fixed\" (the record states the "
                    "accounting approximation for fixed-size sampling)")
        has_transport = any("transport" in st for st in cell.get("privacy_stages", []))
        mode = self.noise if self.noise != "auto" else (
            "distributed" if has_transport else "central")
        if mode == "distributed" and any(
                float(p.get("dropout_rate", 0) or 0) > 0 for p in cell.get("privacy", [])):
            return ("distributed noise needs every sampled client's noise share in the sum, and "
                    "the stack drops clients (dropout_rate > 0): the achieved noise would be "
                    "below what is accounted")
        if self.noise == "auto":
            self._mode = "distributed" if has_transport else "central"
        return None

    # -- the schedule ----------------------------------------------------------

    def _z(self, z0: float, rnd: int) -> float:
        return max(self.min_noise_multiplier, z0 * self.noise_decay ** (rnd - 1))

    def setup(self, ctx: RoundContext) -> None:
        self._ledger = Ledger(self.accountant)
        self._q = float(ctx.sample_rate)
        self._k = max(1, int(round(ctx.sample_rate * ctx.num_clients)))
        self._client_sampling = ctx.settings.client_sampling
        if self.epsilon is None:
            self._z0 = self.noise_multiplier
        elif self.noise_decay == 1.0 or self.min_noise_multiplier >= self.noise_multiplier:
            self._z0 = noise_for_epsilon(target_epsilon=self.epsilon, delta=self.delta,
                                         sample_rate=self._q, steps=ctx.rounds,
                                         accountant=self.accountant)
        else:
            rounds = ctx.rounds
            self._z0 = noise_for_schedule(
                target_epsilon=self.epsilon, delta=self.delta, accountant=self.accountant,
                schedule=lambda z0: [(self._z(z0, t), self._q, 1) for t in range(1, rounds + 1)])
        # σ_b: given, or the paper's k/20 raised to z (then z_Δ = 1.15 z) when that is too small
        self._sigma_b = (self.count_noise or max(self._k / 20.0, self._z(self._z0, 1))
                         ) if self.target_quantile else 0.0
        if self.target_quantile and 2 * self._sigma_b <= self._z(self._z0, 1):
            raise ValueError(
                f"adaptive clipping needs 2 * count_noise > noise_multiplier in every round "
                f"(Andrew et al. 2021, Thm 1); count_noise={self._sigma_b:g}, "
                f"noise_multiplier={self._z(self._z0, 1):g}; raise count_noise")
        self._C = self.clip
        self._bits: list[float] = []
        self._norms: list[float] = []
        self._clip_history: list[float] = []
        # per-tensor shares of the clipping budget (sum of squares = 1)
        sizes = np.asarray(ctx.layout.sizes, dtype=float)
        if self.layerwise == "equal":
            share = np.full(len(sizes), 1.0 / math.sqrt(len(sizes)))
        elif self.layerwise == "size":
            share = np.sqrt(sizes / sizes.sum())
        else:
            share = None
        self._slices = list(ctx.layout.slices().values())
        self._share = share

    def _z_update(self, rnd: int) -> float:
        """The multiplier of the noise on the sum of updates in round ``rnd``."""
        z = self._z(self._z0, rnd)
        if not self.target_quantile:
            return z
        return (z ** -2 - (2 * self._sigma_b) ** -2) ** -0.5

    # -- stages ----------------------------------------------------------------

    def process_update(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        delta = update.delta.detach().to(torch.float32).clone()
        norm = float(delta.norm())
        C = self._C
        if self._share is None:
            delta *= min(1.0, C / (norm + 1e-12))
        else:
            for sl, s in zip(self._slices, self._share):
                part = delta[sl]
                delta[sl] = part * min(1.0, C * s / (float(part.norm()) + 1e-12))
        self._norms.append(norm)
        self._bits.append(1.0 if norm <= C else 0.0)
        if self._mode == "distributed":
            g = ctx.torch_generator("dp-fedavg-noise", ctx.round, update.client)
            std = self._z_update(ctx.round) * C / math.sqrt(self._k)
            delta += torch.randn(delta.shape, generator=g) * std
        return ClientUpdate(update.client, delta, update.num_examples,
                            update.metrics, update.extra)

    def process_aggregate(self, ctx: RoundContext, aggregate: torch.Tensor,
                          n_clients: int) -> torch.Tensor:
        rnd, C = ctx.round, self._C
        out = aggregate
        if self._mode == "central" and n_clients > 0:
            g = ctx.torch_generator("dp-fedavg-central-noise", rnd)
            out = aggregate + torch.randn(aggregate.shape, generator=g) * (
                self._z_update(rnd) * C / n_clients)
        self._ledger.record(self._z(self._z0, rnd), self._q)
        self._clip_history.append(C)
        if self.target_quantile and self._bits:
            g = ctx.rng("dp-fedavg-count", rnd)
            b = (sum(self._bits) + g.normal(0.0, self._sigma_b)) / max(1, len(self._bits))
            self._C = C * math.exp(-self.clip_lr * (b - self.target_quantile))
        self._bits, self._norms = [], []
        return out

    # -- accounting ------------------------------------------------------------

    def accounting(self) -> dict[str, Any]:
        q = getattr(self, "_q", None)
        ctx_sampling = None
        if q is not None:
            if q >= 1.0:
                ctx_sampling = "every client takes part in every round (q = 1, no amplification)"
            elif self._client_sampling == "poisson":
                ctx_sampling = (f"Poisson sampling of clients with rate q = {q:g}, as the "
                                f"accountant assumes")
            else:
                ctx_sampling = (f"fixed-size sampling of {self._k} clients per round; composed "
                                f"with the accountant's Poisson-sampling bound at q = {q:g} "
                                f"(the usual approximation, not a proof for sampling without "
                                f"replacement)")
            if self._mode == "distributed":
                ctx_sampling += (f"; distributed noise assumes all {self._k} clients' noise "
                                 f"shares reach the sum")
        steps = self._ledger.steps
        return {
            "epsilon": self._ledger.epsilon(self.delta) if steps else 0.0,
            "delta": self.delta, "accountant": self.accountant, "unit": "client",
            "noise_multiplier": getattr(self, "_z0", self.noise_multiplier),
            "noise_multipliers": [z for z, _, _ in self._ledger.history],
            "clip": self.clip, "clip_history": list(getattr(self, "_clip_history", [])),
            "adaptive_clipping": self.target_quantile is not None,
            "count_noise": getattr(self, "_sigma_b", 0.0),
            "noise": self._mode, "layerwise": self.layerwise,
            "sample_rate": q, "steps": steps, "target_epsilon": self.epsilon,
            "history": [list(h) for h in self._ledger.history],
            "sampling": ctx_sampling,
        }


def _kv(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items() if k != "name")


COMPONENTS = (DPFedAvg,)
