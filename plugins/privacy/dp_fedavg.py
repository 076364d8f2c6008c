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
That theorem holds for a count of bits centred at ±½ (sensitivity ½, so the
count noise σ_b is a multiplier 2σ_b): each client's bit is sent as
``b − ½`` and the server unshifts, ``b̃ = (Σ(b_k − ½) + N(0, σ_b²)) / m + ½``
(m the expected clients), as TF Privacy's quantile estimator does. (0.2
summed uncentred bits, of sensitivity 1, and under-counted ε by 1.4–1.5×.)

Adversaries (:data:`fedmedbench.accounting.ADVERSARIES`): with **central**
noise the server adds it, so it reads each clipped update (or, under a
transport, the exact sum): there is no guarantee against the server, only
against other clients and a party that sees the released model, whose ε
uses amplification by client sampling (they do not see who took part). With
**distributed** noise under secure aggregation the server sees only the
noised sum but knows who sent a masked input, so its ε uses no
amplification: each client's rounds compose at q = 1 and the record takes
the client that took part most (other clients of a secure-aggregation round
also learn who took part). A target ``epsilon`` is planned for the headline
adversary: the released model under central noise (q), the server under
distributed noise (q = 1, every round).

The review's adaptive noise: a schedule ``σ_t = max(σ_min, σ_0 · decay^(t−1))``
and a layer-wise split of the clipping budget (per-layer bounds C_l with
Σ C_l² = C², so the whole update still has norm at most C). Rounds of
different σ are composed exactly by the Opacus accountant
(:class:`fedmedbench.accounting.Ledger`).

Weighting (McMahan et al. 2018, their estimator f̃_f): client k's
contribution is ``w_k Δ_k / (q W)`` with bounded weights ``w_k = min(n_k / ŵ, 1)``
(``weight_cap`` ŵ; example-weighted aggregators) or ``w_k = 1`` (uniform
ones), ``W = Σ_k w_k`` over all clients and q the client sampling rate. The
denominator is fixed, so one client changes the sum by at most
``max_k w_k · C ≤ C`` and the noise is ``σ·C / (q W)`` whatever the round's
sample: the server **sums** the contributions (``aggregate_as_sum``) instead of
taking the aggregator's weighted mean. Example counts are public metadata
(named in the record). Poisson client sampling with rate q is what the
accountant assumes; it is the default of dp-fedavg cells. With fixed-size
sampling (k of n, q = k/n) the record says the Poisson bound is used as an
approximation, and the uniform estimator equals the plain mean.

Noise is ``central`` (added once to the aggregate by a trusted server) or
``distributed`` (each of the m clients of the round adds N(0, σ²C²/(qW)²/m), so
the sum carries the whole noise): distributed noise is only accepted with a
secure transport (secure aggregation) in the stack, where no one sees an
un-noised sum; without one, the server would see each update with noise of
multiplier σ/√m, far weaker than what is accounted.

Parties: the clients' instance clips, weights and (distributed) noises each
update; the server's instance adds central noise, keeps the accountant and,
with adaptive clipping, counts the clip bits the clients send in the clear
(``clip_bit``; the server is the trusted party of central DP) and broadcasts
the next clipping norm (``broadcast``: 8 bytes a client and round).

Noise draws come from seeded torch generators (``ctx.torch_generator``) so
that a cell is reproducible: right for a benchmark, wrong for a deployment
(the record says so under ``noise_rng``).
"""

from __future__ import annotations

import math
import typing
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np

from fedmedbench import (
    Accountant,
    Accounting,
    CellContext,
    Guarantee,
    Ledger,
    PrivacyMechanism,
    Range,
    ServerStage,
    Updates,
    UpdateStage,
    epsilon_for,
    noise_for_epsilon,
    noise_for_schedule,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench import CellFacts, Received

#: where the noise is added (``noise``)
Noise = Literal["auto", "central", "distributed"]
NOISE: tuple[str, ...] = typing.get_args(Noise)
#: how the clipping budget is split over parameter tensors (``layerwise``)
Layerwise = Literal["none", "equal", "size"]
LAYERWISE: tuple[str, ...] = typing.get_args(Layerwise)


class DPFedAvg(PrivacyMechanism, UpdateStage, ServerStage):
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
    weight_cap : float, default 0.0
        ŵ of the bounded example weights ``w_k = min(n_k / ŵ, 1)`` under an
        example-weighted aggregator; 0 means the largest client's size (every
        weight proportional to n_k, the largest 1).
    """

    name = "dp-fedavg"
    dp_unit = "client"
    aggregate_as_sum = True
    run_defaults = {"client_sampling": "poisson"}

    def __init__(self, *, noise_multiplier: Annotated[float, Range(gt=0)] = 1.0,
                 epsilon: Annotated[float | None, Range(gt=0)] = None,
                 clip: Annotated[float, Range(gt=0)] = 1.0,
                 delta: Annotated[float, Range(gt=0, lt=1)] = 1e-5,
                 accountant: Accountant = "rdp", noise: Noise = "auto",
                 target_quantile: Annotated[float | None, Range(gt=0, lt=1)] = None,
                 clip_lr: Annotated[float, Range(gt=0)] = 0.2,
                 count_noise: Annotated[float, Range(ge=0)] = 0.0,
                 noise_decay: Annotated[float, Range(gt=0, le=1)] = 1.0,
                 min_noise_multiplier: Annotated[float, Range(ge=0)] = 0.0,
                 layerwise: Layerwise = "none",
                 weight_cap: Annotated[float, Range(ge=0)] = 0.0) -> None:
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
        self.weight_cap = float(weight_cap)
        self._mode = "distributed" if noise == "distributed" else "central"
        self._ledger = Ledger(accountant)

    # -- validation ------------------------------------------------------------

    def validate(self, facts: CellFacts) -> str | None:
        alg, agg = facts.algorithm, facts.aggregator
        if alg.shares == "none":
            return (f"client-level DP protects clients of a federation, and {alg.name} "
                    f"({alg.protocol} protocol) aggregates no updates")
        if not agg.linear or agg.weighting == "data-dependent":
            return (f"the noise is calibrated to one client's bounded contribution w_k/(qW) with "
                    f"uniform or example weights, and the aggregator is "
                    f"{facts.describe_aggregator()}; use weighted-mean by examples or uniform")
        if alg.needs_individual_updates:
            return (f"{alg.name} uses every client's model at the server, and those individual "
                    f"updates are not covered by noise on the aggregate")
        if facts.compressor is not None and not facts.compressor.preserves_norm_bound:
            return (f"compressor {facts.compressor.name} runs after clipping and may send a "
                    f"vector of norm above the clip (top-k error feedback adds earlier "
                    f"residuals), which breaks the sensitivity bound the noise is calibrated to")
        transport = facts.transport
        mode = self.noise if self.noise != "auto" else (
            "distributed" if transport is not None else "central")
        if mode == "distributed" and transport is None:
            return ("distributed noise without a secure transport shows the server every "
                    "client's update with only its noise share (multiplier σ/√m, far below "
                    "the σ accounted); add secure aggregation to the stack "
                    "([\"dp-fedavg\", \"secagg\"]) or use noise = \"central\"")
        if mode == "distributed" and facts.drops_clients:
            return ("distributed noise needs every sampled client's noise share in the sum, and "
                    f"{transport.name if transport else 'the stack'} drops clients: the "
                    f"achieved noise would be below what is accounted")
        if facts.drops_clients:
            return (f"central noise is calibrated to each client's clipped contribution "
                    f"w_k/(qW), and {transport.name if transport else 'the stack'}'s own "
                    f"dropouts leave clients out and rescale the survivors' sum by n/k, which "
                    f"multiplies every contribution past that bound; drop clients with a "
                    f"network (the network axis), whose dropouts dp-fedavg accounts, or set "
                    f"dropout_rate = 0")
        if mode == "distributed" and self.target_quantile is not None:
            return ("adaptive clipping needs each client's clipped-or-not bit, and with "
                    "distributed noise there is no trusted server to count them in private "
                    "(they would travel in plaintext beside the masked update); use a fixed "
                    "clip, or noise = \"central\"")
        self._mode = mode
        self._weighting = agg.weighting
        return None

    # -- the schedule ----------------------------------------------------------

    def _z(self, z0: float, rnd: int) -> float:
        return max(self.min_noise_multiplier, z0 * self.noise_decay ** (rnd - 1))

    def setup(self, ctx: CellContext) -> None:
        self._ctx = ctx
        self._ledger = Ledger(self.accountant)
        self._q = float(ctx.sample_rate)
        self._k = max(1, int(round(ctx.sample_rate * ctx.num_clients)))
        self._client_sampling = ctx.settings.client_sampling
        # bounded weights over the whole population (example counts are public)
        n = np.array(ctx.num_examples, dtype=float)
        if getattr(self, "_weighting", "uniform") == "examples":
            cap = self.weight_cap or float(n.max())
            w = np.minimum(n / cap, 1.0)
        else:
            w = np.ones(len(n))
        self._w = w
        self._W = float(w.sum())
        self._denom = self._q * self._W
        self._transport = ctx.facts.transport is not None
        #: the q a target ε is planned at: the server sees who took part under distributed
        #: noise (no amplification), the released model does not
        self._q_plan = 1.0 if self._mode == "distributed" else self._q
        #: the rounds each client took part in (the server knows it): those whose update
        #: reached the sum (a client that dropped out of a round is not counted in it)
        self._rounds_of: dict[int, list[int]] = {}
        #: the noise multiplier each released round actually carried (by round)
        self._z_of_round: dict[int, float] = {}
        #: rounds whose sum lacked dropped clients' noise shares: round -> (arrived, sampled)
        self._short_rounds: dict[int, tuple[int, int]] = {}
        if self.epsilon is None:
            self._z0 = self.noise_multiplier
        elif self.noise_decay == 1.0:
            self._z0 = noise_for_epsilon(target_epsilon=self.epsilon, delta=self.delta,
                                         sample_rate=self._q_plan, steps=ctx.rounds,
                                         accountant=self.accountant)
        else:  # solve σ_0 for the schedule that is applied: decay and floor included
            rounds, q = ctx.rounds, self._q_plan
            self._z0 = noise_for_schedule(
                target_epsilon=self.epsilon, delta=self.delta, accountant=self.accountant,
                schedule=lambda z0: [(self._z(z0, t), q, 1) for t in range(1, rounds + 1)])
        # σ_b: given, or the paper's k/20 raised to z (then z_Δ = 1.15 z) when that is too small
        self._sigma_b = (self.count_noise or max(self._k / 20.0, self._z(self._z0, 1))
                         ) if self.target_quantile else 0.0
        if self.target_quantile and 2 * self._sigma_b <= self._z(self._z0, 1):
            raise ValueError(
                f"adaptive clipping needs 2 * count_noise > noise_multiplier in every round "
                f"(Andrew et al. 2021, Thm 1); count_noise={self._sigma_b:g}, "
                f"noise_multiplier={self._z(self._z0, 1):g}; raise count_noise")
        self._C = self.clip
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

    @property
    def metric_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        """Sent in the clear with each update: with adaptive clipping, whether
        the update was within the clip (to the trusted server of central DP)."""
        return ("clip_bit",) if self.target_quantile else ()

    def contribution_weights(self, ctx: CellContext, received: Received) -> np.ndarray:
        """Each received client's weight in the sum, ``w_k / (qW)`` (public counts)."""
        return self._w[list(received.clients)] / self._denom

    def broadcast(self, ctx: CellContext) -> dict[str, torch.Tensor]:
        """The server's current clipping norm (adaptive clipping only)."""
        import torch

        if not self.target_quantile:
            return {}
        return {"clip": torch.tensor([self._C], dtype=torch.float64)}

    def receive_broadcast(self, ctx: CellContext, fields: dict[str, torch.Tensor]) -> None:
        if "clip" in fields:
            self._C = float(fields["clip"][0])

    def _z_update(self, rnd: int) -> float:
        """The multiplier of the noise on the sum of updates in round ``rnd``."""
        z = self._z(self._z0, rnd)
        if not self.target_quantile:
            return z
        return (z ** -2 - (2 * self._sigma_b) ** -2) ** -0.5

    # -- stages ----------------------------------------------------------------

    def process_update(self, ctx: CellContext, updates: Updates) -> Updates:
        """Each client clips its delta to C, scales it by its fixed-denominator
        weight w_k/(qW) and, with distributed noise, adds its noise share."""
        import torch

        delta = updates.delta.detach().to(torch.float32).clone()
        C = self._C
        norms = delta.norm(dim=1)
        if self._share is None:
            delta *= (C / (norms + 1e-12)).clamp(max=1.0).unsqueeze(1)
        else:
            for sl, s in zip(self._slices, self._share):
                part = delta[:, sl]
                delta[:, sl] = part * (C * s / (part.norm(dim=1) + 1e-12)).clamp(max=1.0) \
                    .unsqueeze(1)
        bits = np.asarray([0.5 if float(v) <= C else -0.5 for v in norms])  # centred
        weight = torch.as_tensor(self._w[updates.clients] / self._denom, dtype=torch.float32)
        delta *= weight.unsqueeze(1)
        if self._mode == "distributed":
            m = max(1, len(ctx.participants))
            std = self._z_update(ctx.round) * C / self._denom / math.sqrt(m)
            for i, client in enumerate(updates.clients):
                g = ctx.torch_generator("dp-fedavg-noise", ctx.round, client)
                delta[i] += torch.randn(delta.shape[1], generator=g) * std
        metrics = dict(updates.metrics)
        if self.target_quantile:
            metrics["clip_bit"] = bits
        return updates.replace(delta=delta, metrics=metrics)

    def process_aggregate(self, ctx: CellContext, aggregate: torch.Tensor,
                          received: Received) -> torch.Tensor:
        import torch

        rnd, C = ctx.round, self._C
        out = aggregate
        if self._mode == "central":
            g = ctx.torch_generator("dp-fedavg-central-noise", rnd)
            out = aggregate + torch.randn(aggregate.shape, generator=g) * (
                self._z_update(rnd) * C / self._denom)
        z = self._z(self._z0, rnd)
        contributors = getattr(received, "contributors", received.clients)
        m, got = len(ctx.participants), len(contributors)
        if self._mode == "distributed" and 0 < got < m:
            # dropouts (the network twin): only the noise shares of the clients whose update
            # reached the sum are in it, each of variance σ²C²/(qW)²/m, so the sum carries
            # multiplier z·sqrt(got/m): the round is accounted at the noise it has
            z = z * math.sqrt(got / m)
            self._short_rounds[int(rnd)] = (got, m)
        self._ledger.record(z, self._q)
        self._z_of_round[int(rnd)] = z
        self._clip_history.append(C)
        for c in contributors:
            self._rounds_of.setdefault(int(c), []).append(int(rnd))
        if self.target_quantile:  # the clients sent b_k - 1/2 (sensitivity 1/2): unshift
            bits = received.metrics.get("clip_bit")
            count = float(np.sum(bits)) if bits is not None else 0.0
            g = ctx.rng("dp-fedavg-count", rnd)
            m = max(1.0, self._q * ctx.num_clients)
            b = (count + g.normal(0.0, self._sigma_b)) / m + 0.5
            self._C = C * math.exp(-self.clip_lr * (b - self.target_quantile))
        return out

    # -- accounting ------------------------------------------------------------

    def _sampling(self) -> str:
        q = self._q
        if q >= 1.0:
            text = "every client takes part in every round (q = 1, no amplification)"
        elif self._client_sampling == "poisson":
            text = f"Poisson sampling of clients with rate q = {q:g}, as the accountant assumes"
        else:
            text = (f"fixed-size sampling of {self._k} clients per round; composed with the "
                    f"accountant's Poisson-sampling bound at q = {q:g} (the usual "
                    f"approximation, not a proof for sampling without replacement)")
        if self._mode == "distributed":
            text += "; distributed noise assumes every sampled client's noise share reaches the sum"
        return text

    def _guarantees(self) -> dict[str, Guarantee]:
        """ε against each adversary (module docstring)."""
        steps = self._ledger.steps
        released = self._ledger.epsilon(self.delta) if steps else 0.0
        amplified = self._q < 1.0
        rel = Guarantee("released", released, self.delta, self._q, steps, amplified,
                        "sees only released models, not who took part: amplification by "
                        "client sampling applies" if amplified else
                        "every client takes part in every round")
        zs = {t: self._z(self._z0, t) for t in range(1, len(self._clip_history) + 1)}
        zs.update(self._z_of_round)  # the noise each released round carried (dropouts, aborts)
        if self._mode == "central":
            server = Guarantee(
                "server", math.inf, self.delta, None, steps, False,
                "central noise: the server adds the noise, so it reads what it noises (each "
                "client's clipped update, or under a transport the exact sum); central DP "
                "protects against everyone else")
            client = Guarantee("client", released, self.delta, self._q, steps, amplified,
                               "receives the noised global models, not who took part")
            return {"server": server, "client": client, "released": rel}
        worst, eps = 0, 0.0
        for rounds in self._rounds_of.values():
            e = epsilon_for([(zs[t], 1.0, 1) for t in rounds], self.delta, self.accountant)
            if e > eps or (e == eps and len(rounds) > worst):
                eps, worst = e, len(rounds)
        note = (f"sees the noised secure sum and who sent a masked input: no amplification "
                f"by sampling; each client's rounds compose at q = 1, the largest for a "
                f"client in {worst} of {len(self._z_of_round) or len(zs)} rounds")
        if self._short_rounds:
            note += (f"; counting only the rounds whose update reached the sum, each at the "
                     f"noise it carried ({len(self._short_rounds)} round(s) lacked dropped "
                     f"clients' noise shares)")
        server = Guarantee("server", eps, self.delta, 1.0, worst, False, note)
        client = Guarantee("client", eps, self.delta, 1.0, worst, False,
                           "a client of a secure-aggregation round learns who took part: as "
                           "the server")
        return {"server": server, "client": client, "released": rel}

    def accounting(self) -> Accounting | None:
        if not hasattr(self, "_q"):
            return None
        steps = self._ledger.steps
        adversaries = self._guarantees()
        return Accounting(
            unit="client", accountant=self.accountant,
            epsilon=adversaries["server"].epsilon, delta=self.delta,
            noise_multiplier=self._z0, sample_rate=adversaries["server"].sample_rate,
            steps=steps, sampling=self._sampling(), clip=self.clip,
            target_epsilon=self.epsilon, adversaries=adversaries,
            details={
                "planned_against": "server" if self._mode == "distributed" else "released",
                "planned_sample_rate": self._q_plan,
                "update_noise_multipliers": [self._z_update(t) for t in range(
                    1, len(self._clip_history) + 1)],
                "noise_multipliers": [z for z, _, n in self._ledger.history for _ in range(n)],
                "clip_history": list(self._clip_history),
                "adaptive_clipping": self.target_quantile is not None,
                "count_noise": self._sigma_b, "noise": self._mode, "layerwise": self.layerwise,
                "weighting": getattr(self, "_weighting", "uniform"),
                "estimator": "fixed denominator Σ_k w_k Δ_k / (q W) (McMahan et al. 2018)",
                "weight_denominator": self._denom,
                "history": [list(h) for h in self._ledger.history],
                **({"dropout_rounds": {str(t): {"arrived": a, "sampled": b}
                                       for t, (a, b) in sorted(self._short_rounds.items())}}
                   if self._short_rounds else {}),
                "noise_rng": ("seeded torch generators for reproducibility (not a "
                              "cryptographically secure RNG)")})


COMPONENTS = (DPFedAvg,)
