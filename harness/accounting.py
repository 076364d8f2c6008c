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
from collections.abc import Callable, Sequence
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
MAX_SIGMA = 1e6

__all__ = ["ACCOUNTANTS", "Ledger", "make_accountant", "epsilon_for", "noise_for_epsilon",
           "noise_for_schedule", "check_accountant"]


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
