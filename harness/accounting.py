"""Privacy accounting glue over Opacus accountants.

One place where fedmedbench turns "σ, q, steps" into "(ε, δ)", so every
mechanism reports numbers computed the same way, by a real accountant:

- :func:`make_accountant` builds an Opacus accountant by name (``"rdp"``:
  Rényi DP of the sampled Gaussian mechanism, Mironov et al. 2019; ``"prv"``:
  privacy random variables, Gopi et al. 2021, approximate by design with
  ``eps_error``);
- :class:`Ledger` composes rounds that may have different noise multipliers
  or sample rates (a noise schedule, adaptive clipping) and caches ε;
- :func:`noise_for_epsilon` solves σ for a target ε over a whole planned
  training (Opacus's ``get_noise_multiplier``), and :func:`noise_for_schedule`
  does the same for a schedule ``σ_t = σ_0 · f(t)``. Both return the upper end
  of a bisection, so the planned ε never exceeds the target.

Every accountant here assumes **Poisson sampling** with rate ``q`` under
add/remove-one adjacency; mechanisms state in their records whether the run
actually sampled that way.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
MAX_SIGMA = 1e6

__all__ = ["ACCOUNTANTS", "Accounting", "Ledger", "make_accountant", "epsilon_for",
           "noise_for_epsilon", "noise_for_schedule", "check_accountant", "headline",
           "UNITS"]


def check_accountant(name: str) -> str:
    """Return ``name`` if it is a known accountant, else raise ValueError."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant={name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    return name


def make_accountant(name: str) -> Any:
    """A fresh Opacus accountant: ``"rdp"`` or ``"prv"``."""
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=check_accountant(name))


def epsilon_for(history: Sequence[tuple[float, float, int]], delta: float,
                accountant: str = "rdp") -> float:
    """ε at ``delta`` for a composition ``[(noise_multiplier, sample_rate, steps), ...]``.

    ``"rdp"`` computes exactly what Opacus's ``RDPAccountant.get_epsilon`` does
    (its default orders, ``compute_rdp`` and ``get_privacy_spent``), with each
    (σ, q)'s per-step RDP curve cached: RDP composes additively over steps.
    """
    hist = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not hist:
        return 0.0
    if check_accountant(accountant) == "rdp":
        import numpy as np
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(n * np.asarray(_rdp_step(s, q)) for s, q, n in hist)
        eps, _ = get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
        return float(eps)
    acc = make_accountant(accountant)
    acc.history = hist
    return float(acc.get_epsilon(delta=delta))


def _rdp_orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_step(sigma: float, q: float) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_rdp_orders()))


def noise_for_epsilon(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """σ such that ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``.

    Opacus ``get_noise_multiplier`` (which returns the upper end of its
    bisection, so ε never overshoots). For ``"rdp"`` it runs first over the
    integer orders only (fast, and conservative: fewer orders give a larger
    ε), then a short bisection with all of Opacus's orders tightens σ to
    within 1 %. Solutions are memoised per process.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon {target_epsilon} must be > 0")
    return _solve(float(target_epsilon), float(delta), float(sample_rate), int(steps),
                  check_accountant(accountant), float(tolerance))


@functools.lru_cache(maxsize=256)
def _solve(target: float, delta: float, q: float, steps: int, accountant: str,
           tolerance: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if accountant != "rdp":
        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                          sample_rate=q, steps=steps, accountant=accountant,
                                          epsilon_tolerance=tolerance))
    ints = [a for a in _rdp_orders() if float(a).is_integer()]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": expected here
        warnings.simplefilter("ignore", UserWarning)
        hi = float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                        sample_rate=q, steps=steps, accountant="rdp",
                                        epsilon_tolerance=tolerance, alphas=ints))

    def eps(sigma: float) -> float:
        return epsilon_for([(sigma, q, steps)], delta, "rdp")

    lo = hi * 0.95
    while eps(lo) <= target and lo > 1e-3:  # the bracket must straddle the target
        hi, lo = lo, lo * 0.95
    while hi - lo > 0.01 * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def noise_for_schedule(*, target_epsilon: float, delta: float,
                       schedule: Callable[[float], list[tuple[float, float, int]]],
                       accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """σ₀ such that ``epsilon_for(schedule(σ₀))`` is at most ``target_epsilon``.

    ``schedule(sigma0)`` returns the planned composition. Bisection in the
    manner of Opacus's ``get_noise_multiplier``: the upper end is returned, so
    the planned ε never exceeds the target.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon {target_epsilon} must be > 0")
    lo, hi, eps_hi = 0.0, 10.0, float("inf")
    while eps_hi > target_epsilon:
        hi *= 2
        eps_hi = epsilon_for(schedule(hi), delta, accountant)
        if hi > MAX_SIGMA:
            raise ValueError(f"target epsilon {target_epsilon} is too small for this schedule")
    while target_epsilon - eps_hi > tolerance:
        mid = (lo + hi) / 2
        eps = epsilon_for(schedule(mid), delta, accountant)
        if eps < target_epsilon:
            hi, eps_hi = mid, eps
        else:
            lo = mid
    return hi


class Ledger:
    """A running composition of Gaussian-mechanism steps with a cached ε.

    ``record(noise_multiplier, sample_rate, steps=1)`` appends (merging with
    the previous entry when σ and q are equal, as Opacus does);
    ``epsilon(delta)`` evaluates the named accountant on the whole history.
    """

    def __init__(self, accountant: str = "rdp") -> None:
        self.accountant = check_accountant(accountant)
        self.history: list[tuple[float, float, int]] = []
        self._cache: tuple[tuple, float, float] | None = None

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        s, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (s, q):
            self.history[-1] = (s, q, self.history[-1][2] + int(steps))
        else:
            self.history.append((s, q, int(steps)))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        key = tuple(self.history)
        if self._cache is not None and self._cache[0] == key and self._cache[1] == delta:
            return self._cache[2]
        eps = epsilon_for(self.history, delta, self.accountant)
        self._cache = (key, delta, eps)
        return eps


# --------------------------------------------------------------------------
# typed accounting and the cell's headline guarantee
# --------------------------------------------------------------------------

#: units of a DP guarantee, from the weakest to the strongest: a guarantee for a
#: whole client (every record of one hospital) implies the same (ε, δ) for one
#: of its records, never the other way round
UNITS = ("record", "client")


@dataclass
class Accounting:
    """What one DP mechanism spent, as one consistent set of numbers.

    Every field describes the same guarantee: ``epsilon`` at ``delta`` for one
    ``unit`` ("record" or "client"), by ``accountant`` (an Opacus accountant:
    "rdp" or "prv") over ``steps`` compositions of a Gaussian mechanism with
    noise multiplier ``noise_multiplier`` and sample rate ``sample_rate``
    (``sampling`` says, in words, what sampling the accountant assumes and
    what the run did). ``per_site`` holds the same fields per site when the
    guarantee differs by site (DP-SGD: each site's records); the top-level
    fields are then those of the site with the largest ε. ``details`` keeps
    mechanism-specific numbers (a noise schedule, clipping history).
    """

    unit: str
    accountant: str
    epsilon: float
    delta: float
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    sampling: str
    clip: float | None = None
    target_epsilon: float | None = None
    per_site: dict[str, dict[str, Any]] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"Accounting unit {self.unit!r}; use one of {UNITS}")
        if not (isinstance(self.delta, (int, float)) and 0 <= self.delta < 1):
            raise ValueError(f"Accounting delta {self.delta!r}: an ε needs its δ in [0, 1)")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unit": self.unit, "accountant": self.accountant, "epsilon": self.epsilon,
            "delta": self.delta, "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate, "steps": self.steps, "sampling": self.sampling,
            "clip": self.clip, "target_epsilon": self.target_epsilon}
        if self.per_site is not None:
            out["per_site"] = self.per_site
        return {**self.details, **out}


HEADLINE_RULE = (
    "The cell's headline guarantee is the one for the strongest unit any mechanism "
    "protects (client over record). Two mechanisms of that unit compose: their ε and δ "
    "add (basic composition). A client-level guarantee is also a record-level one, so the "
    "record-level guarantee is the smallest ε among all mechanisms (each holds for the "
    "whole run by post-processing).")

_FIELDS = ("epsilon", "delta", "unit", "accountant", "noise_multiplier", "sample_rate", "steps",
           "sampling")


def headline(accountings: Mapping[str, Accounting]) -> dict[str, Any]:
    """The cell's top-level privacy fields from its mechanisms' accountings.

    Returns ``{"epsilon", "delta", "unit", "accountant", "noise_multiplier",
    "sample_rate", "steps", "sampling", "mechanism", "by_unit", "rule"}``
    (``epsilon`` and ``delta`` ``None`` without DP). The result does not
    depend on the order of the stack (see :data:`HEADLINE_RULE`).
    """
    accs = {k: v for k, v in sorted(accountings.items()) if v is not None}
    empty = {k: None for k in _FIELDS}
    if not accs:
        return {**empty, "mechanism": None, "by_unit": {}, "rule": HEADLINE_RULE}
    by_unit: dict[str, dict[str, Any]] = {}
    for unit in UNITS:
        same = {k: a for k, a in accs.items() if a.unit == unit}
        if unit == "record":  # every stronger guarantee also protects one record
            best = min(accs.items(), key=lambda kv: (kv[1].epsilon, kv[1].delta, kv[0]))
            by_unit[unit] = {**_one(best[1]), "unit": unit, "mechanism": best[0]}
            continue
        if not same:
            continue
        by_unit[unit] = _compose(same) if len(same) > 1 else {
            **_one(next(iter(same.values()))), "mechanism": next(iter(same))}
    top = max((u for u in UNITS if any(a.unit == u for a in accs.values())),
              key=UNITS.index)
    return {**by_unit[top], "by_unit": by_unit, "rule": HEADLINE_RULE}


def _one(a: Accounting) -> dict[str, Any]:
    return {k: getattr(a, k) for k in _FIELDS}


def _compose(same: Mapping[str, Accounting]) -> dict[str, Any]:
    eps = sum(a.epsilon for a in same.values())
    delta = sum(a.delta for a in same.values())
    unit = next(iter(same.values())).unit
    return {"epsilon": eps, "delta": delta, "unit": unit,
            "accountant": "basic composition of " + " + ".join(
                f"{k} ({a.accountant})" for k, a in same.items()),
            "noise_multiplier": None, "sample_rate": None,
            "steps": max(a.steps for a in same.values()),
            "sampling": "; ".join(f"{k}: {a.sampling}" for k, a in same.items()),
            "mechanism": "+".join(same)}
