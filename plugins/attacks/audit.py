"""Privacy auditing in one training run (Steinke, Nasr, Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

``audit-canary`` picks m canary records before training
(:meth:`CanaryAudit.canaries`); the engine includes each one in its site's
training data independently with probability 1/2 (the non-canary data is
always included) and trains the cell once. After training the attack scores
every canary, guesses "in" for the k₊ highest scores and "out" for the k₋
lowest, abstains on the rest, and counts the r = k₊ + k₋ guesses and the v
correct ones. Their Theorem 5.2 (the (ε, δ) form they use in all their
experiments, with ``q = e^ε / (1 + e^ε)`` and ``f(v) = P[Binomial(r, q) ≥ v]``)
bounds the chance of v or more correct guesses under an (ε, δ)-DP algorithm::

    P[W ≥ v] ≤ f(v) + 2 m δ · max_{i=1..v} (f(v − i) − f(v)) / i

so ε_LB = sup{ε : that bound < β} is a lower bound on the algorithm's ε at
confidence 1 − β (their Appendix D, ``p_value_DP_audit`` and
``get_eps_audit``: start at [0, 1], widen by 1 while rejected, 30 bisection
steps, return the rejected end). This is the only number fedmedbench calls
``audited ε (lower bound, 95%)``; the membership attacks' Clopper–Pearson
number (:func:`~fedmedbench.plugins.attacks._metrics.audit_epsilon`) is an
estimate.

Choosing k: the guess counts are fixed before the run as a small declared
grid (``guesses``: fractions of m, half guessed in and half out) and the
bound is taken at β / |grid| for each (Bonferroni), so reporting the best
grid point keeps confidence 1 − β.

Canaries and scores: each canary's features are drawn column by column from
its site's training rows (every value realistic, the combination new) with a
uniformly random label, so a model that memorises fits the included ones.
The score is the loss decrease from the initial model to the final one
(``loss_init − loss_final``; black-box: the outside attacker's view of the
final global model, or under the isolated protocol each site's own model).

Validity: each canary is one record, so under a record-level claim (DP-SGD,
add/remove one record) the bound audits that claim. Under a client-level
claim a canary changes one client's data (replace-one adjacency), which the
add/remove guarantee covers only with group privacy: the record then
compares the bound with the claim but does not call it a violation.

``audit-dirac`` is the white-box form with power (Nasr, Hayes, Steinke,
Balle, Tramèr, Jagielski, Carlini, Terzis, "Tight Auditing of Differentially
Private Machine Learning", USENIX Security 2023, Dirac canaries, in the
one-run framework): each canary is a coordinate of the parameter vector
whose per-example gradient, when the canary is in a step, is the clipping
norm at that coordinate (:class:`~fedmedbench.GradientCanaries`, inserted by
DP-SGD). The score is how far the coordinate moved down the canary's
gradient from the initial model to the final one. A record-level claim then
faces an audit that a wrong accountant fails: with σ too small for the
claimed ε the included canaries' coordinates separate from the rest.

``audit-clients`` audits a client-level claim (dp-fedavg) with canary
clients (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot
Empirical Privacy Estimation for Federated Learning", ICLR 2024): each is a
client of its own whose update is a fixed random direction
(:class:`~fedmedbench.ClientCanaries`), included with probability 1/2 and
then sampled like any client; the score is the cosine of the final model's
change with the direction. The one-run bound is a valid lower bound on the
client-level ε; beside it the record gives Andrew et al.'s estimate (the
Gaussian fitted to the included canaries' cosines against the excluded
ones', converted from μ-GDP), labelled an estimate.

Every result states the audit's **power**: ``ceiling``, the largest ε it
could certify with its canaries (every guess right), and ``contradicts_claim``
is true only when the bound exceeds the claim; ``no_power`` says when the
ceiling is below the claim (the audit could not have caught a violation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np

from fedmedbench import (
    Attack,
    AttackContext,
    Canaries,
    ClientCanaries,
    FederatedData,
    GradientCanaries,
    ParamLayout,
    Range,
)

__all__ = ["p_value", "epsilon_lower_bound", "guess_counts", "score_guesses", "CanaryAudit",
           "DiracAudit", "ClientAudit", "gdp_epsilon"]

LABEL = "audited ε (lower bound, 95%)"


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ v of r guesses correct] for an (ε, δ)-DP algorithm
    with m randomised canaries (Steinke et al. 2023, Thm 5.2 / App. D)."""
    if r <= 0 or v <= 0:
        return 1.0
    from scipy.stats import binom  # lazily: listing plugins does not load scipy

    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0:
        return min(beta, 1.0)
    alpha, s = 0.0, 0.0
    for i in range(1, v + 1):
        s += float(binom.pmf(v - i, r, q))  # P[v > Binomial >= v - i]
        alpha = max(alpha, s / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """The largest ε the guesses reject at level ``beta`` (0 when even ε = 0
    is not rejected): Steinke et al.'s ``get_eps_audit``."""
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi + 1.0
        if hi > 100:
            return lo
    for _ in range(30):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(m: int, fractions: list[float]) -> list[tuple[int, int]]:
    """(k₊, k₋) for each declared fraction of m guessed (half in, half out)."""
    out = []
    for f in fractions:
        r = max(2, int(round(f * m)))
        k_plus = r // 2
        out.append((k_plus, r - k_plus))
    return list(dict.fromkeys(out))


def score_guesses(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
                  ) -> tuple[int, int]:
    """(r, v): guess in for the k₊ highest scores and out for the k₋ lowest
    (ties broken by a stable sort of the scores), and count the correct ones."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    k_plus = min(k_plus, len(order))
    k_minus = min(k_minus, len(order) - k_plus)
    pos, neg = order[:k_plus], order[len(order) - k_minus:] if k_minus else order[:0]
    v = int(np.asarray(included)[pos].sum()) + int((~np.asarray(included)[neg]).sum())
    return k_plus + k_minus, v


class CanaryAudit(Attack):
    """One-run privacy audit with canary records (Steinke, Nasr, Jagielski 2023).

    Parameters
    ----------
    m : int, default 200
        Canary records (>= 2), each included in training with probability 1/2.
    guesses : list of float, default [0.1, 0.2, 0.5, 1.0]
        The declared grid of guess counts, as fractions of m in (0, 1] (half
        guessed in, half out); the bound is Bonferroni-corrected over it.
    confidence : float, default 0.95
        1 − β of the lower bound.
    audit_delta : float, default 1e-5
        δ of the audit when the cell has no DP claim (else the claim's δ).
    """

    name = "audit-canary"
    #: the unit of DP claim the canaries audit directly
    audits_unit = "record"
    score_text = ("loss decrease of each canary from the initial to the final model "
                  "(black-box, the final global model; isolated: each site's own model)")

    @staticmethod
    def canary_type() -> type[Canaries | GradientCanaries | ClientCanaries]:
        return Canaries

    def extra_results(self, scores: np.ndarray, included: np.ndarray, delta: float
                      ) -> dict[str, Any]:
        """Numbers an audit adds beside its bound (none here)."""
        return {}

    def __init__(self, *, m: Annotated[int, Range(ge=2)] = 200,
                 guesses: Sequence[float] = (0.1, 0.2, 0.5, 1.0),
                 confidence: Annotated[float, Range(gt=0, lt=1)] = 0.95,
                 audit_delta: Annotated[float, Range(ge=0, lt=1)] = 1e-5) -> None:
        fractions = [float(g) for g in guesses]
        if not fractions or not all(0 < g <= 1 for g in fractions):
            raise ValueError(f"audit-canary: guesses = {fractions!r}; give fractions of m in "
                             f"(0, 1], e.g. [0.1, 0.5, 1.0]")
        self.m, self.guesses = m, fractions
        self.confidence, self.audit_delta = float(confidence), float(audit_delta)

    # -- before training -------------------------------------------------------

    def canaries(self, data: FederatedData, rng: np.random.Generator) -> Canaries:
        """m records: features resampled column by column from a site's training
        rows, uniformly random labels; sites drawn in proportion to their
        training sizes."""
        sizes = np.array([len(s.train) for s in data.sites], dtype=float)
        site = rng.choice(len(data.sites), size=self.m, p=sizes / sizes.sum())
        shape = tuple(data.task.input_shape)
        X = np.zeros((self.m, int(np.prod(shape))), dtype=np.float32)
        for i, s in enumerate(data.sites):
            rows = np.flatnonzero(site == i)
            if not len(rows):
                continue
            F = np.asarray(s.train.X, dtype=np.float32).reshape(len(s.train), -1)
            pick = rng.integers(0, len(F), size=(len(rows), F.shape[1]))
            X[rows] = F[pick, np.arange(F.shape[1])[None, :]]
        y = rng.integers(0, int(data.task.num_classes), size=self.m)
        return Canaries(X.reshape(self.m, *shape), y.astype(np.int64), site.astype(np.int64))

    # -- after training --------------------------------------------------------

    def scores(self, ctx: AttackContext, can: Canaries) -> np.ndarray:
        """Loss decrease of each canary from the initial to the final model."""
        from .mia import logits_of, loss_scores  # lazily: mia loads torch

        init = ctx.initial_params
        out = np.zeros(len(can))
        sites = np.unique(can.site) if ctx.site_params else np.array([-1])
        for s in sites:
            rows = np.arange(len(can)) if s < 0 else np.flatnonzero(can.site == s)
            final = ctx.final_params if s < 0 else ctx.site_params.get(int(s), ctx.final_params)
            after = loss_scores(logits_of(ctx.model(final), can.X[rows]), can.y[rows])
            if init is not None:
                before = loss_scores(logits_of(ctx.model(init), can.X[rows]), can.y[rows])
            else:
                before = np.zeros(len(rows))
            out[rows] = after - before  # log-likelihood gained = loss decrease
        return out

    def evaluate(self, ctx: AttackContext) -> dict[str, Any]:
        can = ctx.canaries
        if can is None or can.included is None or not isinstance(can, self.canary_type()):
            why = ctx.canary_problem or ("the engine inserts the canaries of one auditing "
                                         "attack per cell")
            return {"not_applicable": f"no canaries were inserted into training: {why}"}
        m = len(can)
        inc: np.ndarray = np.asarray(can.included, dtype=bool)
        # the audit sees the final model only: it audits the released model's guarantee
        # (the weakest view; every other adversary's ε is at least as large)
        claim = (ctx.privacy.get("by_adversary") or {}).get("released",
                                                              ctx.privacy.get("epsilon"))
        delta = ctx.privacy.get("delta")
        delta = float(delta) if delta is not None else self.audit_delta
        unit = ctx.privacy.get("unit")
        beta = 1.0 - self.confidence
        grid = guess_counts(m, self.guesses)
        s = self.scores(ctx, can)
        best: dict[str, Any] | None = None
        per = []
        for kp, km in grid:
            r, v = score_guesses(s, inc, kp, km)
            eps = epsilon_lower_bound(m, r, v, delta, beta / len(grid))
            per.append({"k_plus": kp, "k_minus": km, "guesses": r, "correct": v,
                        "epsilon_lower_bound": eps})
            if best is None or eps > best["epsilon_lower_bound"]:
                best = per[-1]
        assert best is not None
        from ._metrics import roc_summary

        roc = roc_summary(s[inc], s[~inc]) if inc.any() and (~inc).any() else {}
        out: dict[str, Any] = {
            "audited_epsilon": best["epsilon_lower_bound"],
            "label": LABEL if abs(self.confidence - 0.95) < 1e-12 else
            f"audited ε (lower bound, {self.confidence:.0%})",
            "confidence": self.confidence, "delta": delta, "canaries": m,
            "canaries_included": int(inc.sum()),
            "k_plus": best["k_plus"], "k_minus": best["k_minus"],
            "guesses": best["guesses"], "correct": best["correct"],
            "grid": per,
            "correction": f"Bonferroni over {len(grid)} declared guess counts "
                          f"(β = {beta:g} / {len(grid)} each)",
            "ceiling": epsilon_lower_bound(m, m, m, delta, beta / len(grid)),
            "canary_auc": roc.get("auc"),
            "claimed_epsilon": claim, "claimed_unit": unit,
            "method": "Steinke, Nasr, Jagielski 2023 (NeurIPS), one training run: canaries "
                      "included independently with probability 1/2, Theorem 5.2 with δ",
            "score": self.score_text,
        }
        ceiling = out["ceiling"]
        out["power"] = (f"with {m} canaries this audit certifies at most ε = {ceiling:.3g} "
                        f"(every guess right); it can reveal a claim below that")
        if claim is not None:
            out["no_power"] = bool(ceiling <= float(claim))
        out.update(self.extra_results(s, inc, delta))
        if claim is not None and unit == self.audits_unit:
            out["within_claim"] = bool(best["epsilon_lower_bound"] <= float(claim) + 1e-9)
            out["contradicts_claim"] = not out["within_claim"]
        elif claim is not None:
            out["within_claim"] = None
            out["claim_note"] = (f"the claim is {unit}-level (add/remove one client) and a "
                                 f"canary changes one record of a client (replace-one "
                                 f"adjacency): the bound audits the canary's guarantee, which "
                                 f"the claim covers only through group privacy")
        return out


class DiracAudit(CanaryAudit):
    """One-run white-box audit of DP-SGD with gradient-space (Dirac) canaries.

    Parameters
    ----------
    m : int, default 1000
        Canary coordinates (at most the model's parameter count), each
        included with probability 1/2.
    guesses, confidence, audit_delta
        As for ``audit-canary``.
    """

    name = "audit-dirac"
    score_text = ("how far each canary's coordinate moved against its gradient, initial "
                  "minus final model (white-box; isolated: each site's own model)")

    def __init__(self, *, m: Annotated[int, Range(ge=2)] = 1000,
                 guesses: Sequence[float] = (0.1, 0.2, 0.5, 1.0),
                 confidence: Annotated[float, Range(gt=0, lt=1)] = 0.95,
                 audit_delta: Annotated[float, Range(ge=0, lt=1)] = 1e-5) -> None:
        super().__init__(m=m, guesses=guesses, confidence=confidence, audit_delta=audit_delta)

    @staticmethod
    def canary_type() -> type[Canaries | GradientCanaries | ClientCanaries]:
        return GradientCanaries

    def canaries(self, data: FederatedData, rng: np.random.Generator) -> None:
        return None

    def gradient_canaries(self, layout: ParamLayout, data: FederatedData,
                          rng: np.random.Generator) -> GradientCanaries:
        """``min(m, D)`` distinct coordinates; sites drawn in proportion to
        their training sizes."""
        m = min(self.m, int(layout.numel))
        sizes = np.array([len(s.train) for s in data.sites], dtype=float)
        coords = np.sort(rng.choice(int(layout.numel), size=m, replace=False))
        site = rng.choice(len(data.sites), size=m, p=sizes / sizes.sum())
        return GradientCanaries(coords.astype(np.int64), site.astype(np.int64))

    def scores(self, ctx: AttackContext, can: Any) -> np.ndarray:
        init = ctx.initial_params
        if init is None:
            raise ValueError("audit-dirac needs the initial model (AttackContext.initial_params)")
        out = np.zeros(len(can))
        w0 = init.detach().double().numpy()
        for s in np.unique(can.site):
            rows = np.flatnonzero(can.site == s)
            final = ctx.site_params.get(int(s), ctx.final_params) if ctx.site_params else \
                ctx.final_params
            w = final.detach().double().numpy()
            c = np.asarray(can.coords)[rows]
            out[rows] = w0[c] - w[c]  # a canary's gradient is +C: descent moves it down
        return out


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε at ``delta`` of μ-Gaussian DP (Dong, Roth, Su 2022, Cor. 2.13):
    the ε with ``Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) = δ`` (0 when μ ≤ 0)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    if not mu > 0:
        return 0.0

    def gap(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
                     - delta)

    if gap(0.0) <= 0:
        return 0.0
    hi = 1.0
    while gap(hi) > 0 and hi < 1e4:
        hi *= 2
    return float(brentq(gap, 0.0, hi)) if gap(hi) <= 0 else float("inf")


class ClientAudit(CanaryAudit):
    """One-run audit of a client-level claim with canary clients (Andrew et al. 2024).

    Parameters
    ----------
    m : int, default 200
        Canary clients, each included with probability 1/2 (then sampled
        like any client).
    guesses, confidence, audit_delta
        As for ``audit-canary``.
    """

    name = "audit-clients"
    audits_unit = "client"
    score_text = ("cosine of the final model's change from the initial one with each canary "
                  "client's direction (white-box, the final global model)")

    @staticmethod
    def canary_type() -> type[Canaries | GradientCanaries | ClientCanaries]:
        return ClientCanaries

    def canaries(self, data: FederatedData, rng: np.random.Generator) -> None:
        return None

    def canary_clients(self, layout: ParamLayout, data: FederatedData,
                       rng: np.random.Generator) -> ClientCanaries:
        """m isotropic random directions over the flat parameter vector."""
        d = rng.standard_normal((self.m, int(layout.numel))).astype(np.float32)
        return ClientCanaries(d / np.linalg.norm(d, axis=1, keepdims=True))

    def scores(self, ctx: AttackContext, can: Any) -> np.ndarray:
        if ctx.initial_params is None:
            raise ValueError("audit-clients needs the initial model "
                             "(AttackContext.initial_params)")
        change = (ctx.final_params.double() - ctx.initial_params.double()).numpy()
        n = float(np.linalg.norm(change))
        d = np.asarray(can.directions, dtype=np.float64)
        return d @ change / max(n, 1e-30)

    def extra_results(self, scores: np.ndarray, included: np.ndarray, delta: float
                      ) -> dict[str, Any]:
        """Andrew et al.'s estimate: μ = (mean in − mean out) / sd out."""
        inn, out = scores[included], scores[~included]
        if len(inn) < 2 or len(out) < 2:
            return {}
        mu = float((inn.mean() - out.mean()) / max(out.std(ddof=1), 1e-30))
        return {"epsilon_estimate": gdp_epsilon(mu, delta), "gdp_mu": mu,
                "estimate_note": "one-shot empirical estimate (Andrew et al. 2024): a "
                                 "Gaussian fit to the canary cosines, not a bound"}


COMPONENTS = (CanaryAudit, DiracAudit, ClientAudit)
