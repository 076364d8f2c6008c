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

Speed (issue 22): Opacus evaluates the RDP of the sampled Gaussian mechanism
term by term in pure Python, which made σ calibration most of a DP-SGD
cell. Here the same series are evaluated as arrays (:func:`_rdp_rows`), only
at the orders that can hold the minimum ε, the bisections evaluate several
of their next midpoints per call where that is cheaper, and solved σ are
cached on disk (JSON, one file per key, under ``FEDMEDBENCH_CACHE_DIR``).
σ is the one the previous solver gave, and :func:`epsilon_for` is Opacus's
``RDPAccountant.get_epsilon`` to the last bit (tests/test_accounting_speed.py).

Every accountant here assumes **Poisson sampling** with rate ``q`` under
add/remove-one adjacency; mechanisms state in their records whether the run
actually sampled that way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

#: an Opacus accountant: annotate a mechanism's ``accountant`` parameter with it
Accountant = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = typing.get_args(Accountant)
MAX_SIGMA = 1e6

__all__ = ["ACCOUNTANTS", "Accountant", "Accounting", "Guarantee", "ADVERSARIES", "Ledger", "make_accountant", "epsilon_for",
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

    ``"rdp"`` gives what Opacus's ``RDPAccountant.get_epsilon`` gives (its
    default orders, ``compute_rdp`` and ``get_privacy_spent``), to the last
    bit: the RDP of each (σ, q) comes from the vectorized series
    (:func:`_rdp_rows`, cached per pair; RDP composes additively over
    steps), only at the orders that can hold the minimum (see
    :func:`_needed_orders`), and the orders whose ε is within 1e-8 of the
    minimum are evaluated again with Opacus's own ``compute_rdp``.
    """
    hist = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not hist:
        return 0.0
    if check_accountant(accountant) == "rdp":
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = _refine(hist, _composed_rdp(hist, delta), delta)
        eps, _ = get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
        return float(eps)
    acc = make_accountant(accountant)
    acc.history = hist
    return float(acc.get_epsilon(delta=delta))


def _rdp_orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=1)
def _orders_np() -> tuple[Any, Any]:
    """Opacus's default orders as an array, and the mask of the integer ones."""
    import numpy as np

    orders = np.asarray(_rdp_orders(), dtype=float)
    return orders, np.array([float(a).is_integer() for a in orders])


def _eps_rows(rdp: Any, orders: Any, delta: float) -> Any:
    """Opacus's ``get_privacy_spent`` (ε only) for each row of ``rdp``
    (rows: compositions; columns: ``orders``)."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        eps = (rdp - (np.log(delta) + np.log(orders)) / (orders - 1)
               + np.log((orders - 1) / orders))
    nan = np.isnan(eps).all(axis=1)
    out = np.full(len(rdp), np.inf)
    if (~nan).any():
        out[~nan] = np.nanmin(eps[~nan], axis=1)
    return out


@functools.lru_cache(maxsize=64)
def _eps_floor(delta: float) -> Any:
    """ε at each default order for an RDP of zero: Opacus's conversion
    ``rdp - (log δ + log α)/(α - 1) + log((α - 1)/α)`` at ``rdp = 0``. RDP is
    never negative, and the conversion rounds monotonically in ``rdp``, so
    an order's ε is never below its floor."""
    import numpy as np

    orders, _ = _orders_np()
    with np.errstate(invalid="ignore"):
        out = 0.0 - (np.log(delta) + np.log(orders)) / (orders - 1) \
            + np.log((orders - 1) / orders)
    out.setflags(write=False)
    return out


def _needed_orders(delta: float, bound: float) -> Any:
    """The orders that can give an ε of at most ``bound``: every integer
    order (cheap), and the fractional ones whose floor (:func:`_eps_floor`)
    is at most ``bound`` (plus a margin for rounding in the series). The
    slow, long series of the small fractional orders are needed only for
    large ε (α = 1.1 cannot give ε < 111 at δ = 1e-5)."""
    _, is_int = _orders_np()
    margin = 1e-6 * (1.0 + abs(bound))
    return is_int | (_eps_floor(delta) <= bound + margin)


#: per-step RDP by (σ, q) over the default orders, NaN where not computed
#: yet (bounded: the oldest pair goes first)
_CURVES: dict[tuple[float, float], Any] = {}
_CURVES_MAX = 4096


def _curves(pairs: Sequence[tuple[float, float]], need: Any = None) -> list[Any]:
    """Per-step RDP arrays of ``pairs`` with at least the orders ``need``
    (a mask; default all) computed, the missing ones in one vectorized call."""
    import numpy as np

    orders, _ = _orders_np()
    need = np.ones(len(orders), dtype=bool) if need is None else need
    todo = [p for p in dict.fromkeys(pairs)
            if p not in _CURVES or np.isnan(_CURVES[p][need]).any()]
    if todo:
        cols = need.copy()
        rows = _rdp_rows(np.array([s for s, _ in todo]), np.array([q for _, q in todo]),
                         mask=cols)
        for p, r in zip(todo, rows):
            old = _CURVES.pop(p, None)
            if old is not None:
                r = np.where(np.isnan(r), old, r)
            while len(_CURVES) >= _CURVES_MAX:
                del _CURVES[next(iter(_CURVES))]
            r.setflags(write=False)
            _CURVES[p] = r
    return [_CURVES[p] for p in pairs]


def _rdp_step(sigma: float, q: float) -> tuple[float, ...]:
    """The per-step RDP of (σ, q) at every default order."""
    return tuple(_curves([(float(sigma), float(q))])[0])


def _composed_rdp(hist: Sequence[tuple[float, float, int]], delta: float) -> Any:
    """Σ steps · RDP(σ, q) at the default orders (Opacus's
    ``sum(compute_rdp(...) for ...)``, term for term), computed at the orders
    that can hold the minimum ε and +inf at the others (which cannot)."""
    import numpy as np

    orders, is_int = _orders_np()
    pairs = [(s, q) for s, q, _ in hist]
    ints = sum(c * n for c, (_, _, n) in zip(_curves(pairs, is_int), hist))
    bound = float(_eps_rows(np.where(is_int, ints, np.inf)[None, :], orders, delta)[0])
    need = _needed_orders(delta, bound) if math.isfinite(bound) else np.ones_like(is_int)
    rdp = sum(c * n for c, (_, _, n) in zip(_curves(pairs, need), hist))
    return np.where(need, rdp, np.inf)


#: Opacus's own per-step RDP at single orders, by (σ, q, order) (bounded)
_EXACT: dict[tuple[float, float, float], float] = {}
#: orders whose ε is within this (relative) of the minimum are re-evaluated
_REFINE_REL = 1e-8


def _refine(hist: Sequence[tuple[float, float, int]], rdp: Any, delta: float) -> Any:
    """``rdp`` with the near-optimal orders replaced by Opacus's own values.

    The vectorized series and Opacus's term-by-term log-space sums differ by
    rounding (Opacus's ``_log_sub`` loses a few ulps of the largest term at
    each subtraction); at the orders that decide ε, Opacus's values are used,
    so ``epsilon_for`` returns exactly what ``RDPAccountant.get_epsilon`` does.
    """
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    orders, _ = _orders_np()
    eps = float(_eps_rows(rdp[None, :], orders, delta)[0])
    if not math.isfinite(eps):
        return rdp
    with np.errstate(invalid="ignore"):
        per = (rdp - (np.log(delta) + np.log(orders)) / (orders - 1)
               + np.log((orders - 1) / orders))
    near = np.flatnonzero(per <= eps + _REFINE_REL * abs(eps))
    alist = [_rdp_orders()[k] for k in near]
    total: Any = 0
    for s, q, n in hist:  # Opacus's sum(compute_rdp(...) * steps), term for term
        keys = [(s, q, float(a)) for a in alist]
        todo = [a for a, k in zip(alist, keys) if k not in _EXACT]
        if todo:
            for a, v in zip(todo, compute_rdp(q=q, noise_multiplier=s, steps=1, orders=todo)):
                while len(_EXACT) >= 8 * _CURVES_MAX:
                    del _EXACT[next(iter(_EXACT))]
                _EXACT[(s, q, float(a))] = float(v)
        total = total + np.array([_EXACT[k] for k in keys]) * n
    out = np.array(rdp, dtype=float)
    out[near] = total
    return out


def _fast_epsilons(hists: Sequence[Sequence[tuple[float, float, int]]],
                   delta: float) -> list[float]:
    """ε of each composition from the vectorized series alone (no
    refinement): what the solvers compare with their targets. The curves of
    every composition's pairs are computed together."""
    import numpy as np

    orders, is_int = _orders_np()
    pairs = list(dict.fromkeys((s, q) for h in hists for s, q, _ in h))
    _curves(pairs, is_int)
    need = np.zeros_like(is_int)
    for h in hists:
        ints = sum(c * n for c, (_, _, n) in zip(_curves([(s, q) for s, q, _ in h], is_int), h))
        bound = float(_eps_rows(np.where(is_int, ints, np.inf)[None, :], orders, delta)[0])
        need |= _needed_orders(delta, bound) if math.isfinite(bound) else True
    _curves(pairs, need)
    return [float(_eps_rows(_composed_rdp(h, delta)[None, :], orders, delta)[0])
            if h else 0.0 for h in hists]


# --------------------------------------------------------------------------
# the RDP of the sampled Gaussian mechanism, vectorized
# --------------------------------------------------------------------------
#
# Opacus's ``compute_rdp`` evaluates log A_α (Mironov et al. 2019, "Rényi
# differential privacy of the sampled Gaussian mechanism", Section 3.3) term
# by term in pure Python. The fractional orders are the slow part: their
# series decays polynomially when q is large (thousands of terms at q = 1/2,
# α = 1.1). Here the same terms -- the same expressions in the same order of
# operations -- are computed as arrays over every (σ, q) pair, order and term
# index at once, with Opacus's stopping rule (the first term whose two
# log-terms are both below -30, that term included). Only the summation
# differs: Opacus adds in log space one term at a time (``_log_add`` /
# ``_log_sub``), here each series is summed relative to its largest term,
# ``m + log1p(Σ_{others} ± exp(s - m))``, which keeps the error at a few ulps
# of the largest term (Opacus's subtractions lose more; ``_refine`` puts
# Opacus's own values back where they decide ε).

_STOP = -30.0
_LOG_HALF, _LOG_2, _SQRT2, _SQRT2_ND = math.log(0.5), math.log(2), math.sqrt(2), 2 ** 0.5
_MAX_TERMS = 1 << 24  # a series longer than this is refused (Opacus would loop on)


def _rdp_rows(sigma: Any, q: Any, *, mask: Any = None) -> Any:
    """Per-step RDP of the sampled Gaussian mechanism, one row per (σ, q) pair,
    one column per default order: Opacus's ``compute_rdp(q=q,
    noise_multiplier=σ, steps=1, orders=DEFAULT_ALPHAS)`` row by row, at the
    orders of ``mask`` (default all; NaN at the others)."""
    import numpy as np

    orders, is_int = _orders_np()
    mask = np.ones(len(orders), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    sigma, q = np.asarray(sigma, dtype=float), np.asarray(q, dtype=float)
    out = np.full((len(sigma), len(orders)), np.nan)
    zero_q, no_noise, full = q == 0, sigma == 0, q == 1.0
    with np.errstate(divide="ignore"):
        out[full] = orders[None, :] / (2 * sigma[full, None] ** 2)
    out[no_noise] = np.inf
    out[zero_q] = 0.0
    gen = ~(zero_q | no_noise | full)
    if gen.any():
        s, qq = sigma[gen], q[gen]
        block = np.full((len(s), len(orders)), np.nan)
        ci, cf = mask & is_int, mask & ~is_int
        if ci.any():
            block[:, ci] = _log_a_int(s, qq, orders[ci]) / (orders[ci] - 1)
        if cf.any():
            block[:, cf] = _log_a_frac(s, qq, orders[cf]) / (orders[cf] - 1)
        out[gen] = block
    return out


@functools.lru_cache(maxsize=8)
def _binom_block(alphas: tuple[float, ...], size: int) -> tuple[Any, Any]:
    """``log|C(α, i)|`` and the sign of C(α, i) for i < ``size`` (scipy's
    ``binom``, as Opacus evaluates it): arrays (orders, size), read-only."""
    import numpy as np
    from scipy import special

    with np.errstate(divide="ignore"):
        coef = special.binom(np.asarray(alphas)[:, None], np.arange(size, dtype=float)[None, :])
        out = np.log(np.abs(coef)), np.where(coef > 0, 1.0, -1.0)
    for x in out:
        x.setflags(write=False)
    return out


def _log_a_int(sigma: Any, q: Any, alphas: Any) -> Any:
    """log A_α at integer orders (Opacus's ``_compute_log_a_for_int_alpha``):
    an array (pairs, orders). The σ-free part of each term is cached per q."""
    import numpy as np

    qs, inv = np.unique(q, return_inverse=True)
    base = np.stack([_int_terms(float(v), tuple(alphas.tolist())) for v in qs])[inv]
    i = np.arange(base.shape[-1], dtype=float)
    with np.errstate(invalid="ignore"):
        s = base + (i * i - i) / (2 * (sigma ** 2))[:, None, None]
    m = s.max(axis=-1, keepdims=True)
    rel = np.exp(s - m)
    np.put_along_axis(rel, np.argmax(s, axis=-1)[..., None], 0.0, axis=-1)
    return m[..., 0] + np.log1p(rel.sum(axis=-1))  # all terms positive: m + log1p(rest)


@functools.lru_cache(maxsize=64)
def _int_terms(q: float, alphas: tuple[float, ...]) -> Any:
    """``log C(α, i) + i log q + (α - i) log(1 - q)`` for i <= α, -inf beyond."""
    import numpy as np

    a = np.asarray(alphas)[:, None]
    i = np.arange(int(max(alphas)) + 1, dtype=float)[None, :]
    log_binom = _binom_block(alphas, i.shape[-1])[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(i <= a, log_binom + i * np.log(q) + (a - i) * np.log(1 - q), -np.inf)
    out.setflags(write=False)
    return out


def _lead_plus(m: Any, lead: Any, rest: Any) -> Any:
    """``m + log(lead + rest)`` (lead = ±1), with log1p when the lead is +1."""
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        return m + np.where(lead > 0, np.log1p(rest), np.log(rest - 1.0))


def _log_a_frac(sigma: Any, q: Any, alphas: Any) -> Any:
    """log A_α at fractional orders (Opacus's ``_compute_log_a_for_frac_alpha``):
    an array (pairs, orders). Terms are computed in blocks of growing length
    for the series that have not met the stopping rule yet; the binomial
    coefficients of the first block are scipy's (as Opacus's), later ones
    continue them by the recurrence C(α, i+1) = C(α, i)(α - i)/(i + 1) in
    log space (the far tail, where terms are below e^-20 of the sum)."""
    import numpy as np
    from scipy import special

    P, F = len(sigma), len(alphas)
    R = P * F
    al = np.tile(alphas, P)
    sig = np.repeat(sigma, F)
    qq = np.repeat(q, F)
    z0 = sig ** 2 * np.log(1 / qq - 1) + 0.5
    lq, l1q = np.log(qq), np.log(1 - qq)
    two_s2, den = 2 * (sig ** 2), _SQRT2 * sig
    active = np.arange(R)
    rows_l, s0_l, s1_l, sg_l = [], [], [], []
    lo, size = 0, 64
    last_lc = last_sg = np.empty(0)  # log|C(α, lo - 1)|, its sign, per active row
    while active.size:
        if lo > _MAX_TERMS:
            raise ValueError("the RDP series of the sampled Gaussian mechanism does not "
                             "converge for these (noise multiplier, sample rate)")
        i = np.arange(lo, lo + size, dtype=float)[None, :]
        a = al[active, None]
        if lo == 0:
            lc0, sg0 = _binom_block(tuple(alphas.tolist()), size)
            log_coef, sign = np.tile(lc0, (P, 1)), np.tile(sg0, (P, 1))
        else:  # C(α, k) = C(α, k-1) (α - k + 1) / k for k = lo, ..., lo + size - 1
            ratio = (a - i + 1) / i
            log_coef = last_lc[:, None] + np.cumsum(np.log(np.abs(ratio)), axis=1)
            sign = last_sg[:, None] * np.cumprod(np.sign(ratio), axis=1)
        j = a - i
        lq_, l1q_, z0_ = lq[active, None], l1q[active, None], z0[active, None]
        den_, t2 = den[active, None], two_s2[active, None]
        log_t0 = log_coef + i * lq_ + j * l1q_
        log_t1 = log_coef + j * lq_ + i * l1q_
        log_e0 = _LOG_HALF + (_LOG_2 + special.log_ndtr(-((i - z0_) / den_) * _SQRT2_ND))
        log_e1 = _LOG_HALF + (_LOG_2 + special.log_ndtr(-((z0_ - j) / den_) * _SQRT2_ND))
        s0 = log_t0 + (i * i - i) / t2 + log_e0
        s1 = log_t1 + (j * j - j) / t2 + log_e1
        stop = np.maximum(s0, s1) < _STOP
        done = stop.any(axis=1)
        last = np.where(done, stop.argmax(axis=1), size - 1)  # the stopping term is summed
        keep = np.arange(size)[None, :] <= last[:, None]
        rows_l.append(np.broadcast_to(active[:, None], keep.shape)[keep])
        s0_l.append(s0[keep])
        s1_l.append(s1[keep])
        sg_l.append(sign[keep])
        last_lc, last_sg = log_coef[~done, -1], sign[~done, -1]
        active = active[~done]
        lo += size
        size = min(size * 2, 1 << 14)
    rows, sg = np.concatenate(rows_l), np.concatenate(sg_l)
    order = np.argsort(rows, kind="stable")  # each series in term order
    rows, sg = rows[order], sg[order]
    starts = np.searchsorted(rows, np.arange(R))
    la0 = _logsum_flat(np.concatenate(s0_l)[order], sg, starts)
    la1 = _logsum_flat(np.concatenate(s1_l)[order], sg, starts)
    # Opacus's _log_add(log_a0, log_a1)
    lo_, hi_ = np.minimum(la0, la1), np.maximum(la0, la1)
    with np.errstate(invalid="ignore"):
        out = np.where(lo_ == -np.inf, hi_, np.log1p(np.exp(lo_ - hi_)) + hi_)
    return out.reshape(P, F)


def _logsum_flat(s: Any, sign: Any, starts: Any) -> Any:
    """``log |Σ sign·exp(s)|`` of each series of the flat, row-sorted terms
    (series r is ``s[starts[r]:starts[r + 1]]``), relative to its largest term."""
    import numpy as np

    n = len(starts)
    m = np.maximum.reduceat(s, starts)
    lens = np.diff(np.append(starts, len(s)))
    mrow = np.repeat(m, lens)
    # the first occurrence of each series' largest term is the "1" of log1p
    pos = np.flatnonzero(s == mrow)
    owner = np.repeat(np.arange(n), lens)[pos]
    firsts = pos[np.unique(owner, return_index=True)[1]]
    with np.errstate(invalid="ignore", over="ignore"):
        rel = sign * np.exp(s - mrow)
    rel[firsts] = 0.0
    rest = np.add.reduceat(rel, starts)
    return _lead_plus(m, sign[firsts], rest)


# --------------------------------------------------------------------------
# σ for a target ε: speculative bisection, cached on disk
# --------------------------------------------------------------------------


def _tree(state: tuple, finished: Callable[[tuple], bool], mid: Callable[[tuple], float],
          update: Callable[[tuple, float, Any], tuple], depth: int,
          outcomes: tuple = (-math.inf, math.inf)) -> list[float]:
    """The midpoints a bisection from ``state`` can visit in its next ``depth``
    steps (``outcomes``: an evaluation that goes each way)."""
    level, out = [state], []
    for _ in range(depth):
        nxt = []
        for st in level:
            if finished(st):
                continue
            s = mid(st)
            out.append(s)
            nxt += [update(st, s, o) for o in outcomes]
        level = nxt
    return out


def _bisect(state: tuple, finished: Callable[[tuple], bool], mid: Callable[[tuple], float],
            update: Callable[[tuple, float, Any], tuple],
            evaluate: Callable[[list[float]], list[Any]], depth: int,
            known: dict[float, Any] | None = None,
            outcomes: tuple = (-math.inf, math.inf)) -> tuple:
    """Run the bisection ``while not finished(state): σ = mid(state); state =
    update(state, σ, ε(σ))`` exactly as written, evaluating ε at every
    midpoint of the next ``depth`` levels of its tree in one call of
    ``evaluate`` (ε already in ``known`` is not evaluated again)."""
    known = {} if known is None else known
    while not finished(state):
        todo = [s for s in dict.fromkeys(_tree(state, finished, mid, update, depth, outcomes))
                if s not in known]
        known.update(zip(todo, evaluate(todo)))
        for _ in range(depth):
            if finished(state):
                break
            s = mid(state)
            state = update(state, s, known[s])
    return state


def noise_for_epsilon(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """σ such that ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``.

    Opacus ``get_noise_multiplier`` (which returns the upper end of its
    bisection, so ε never overshoots). For ``"rdp"`` it runs first over the
    integer orders only (fast, and conservative: fewer orders give a larger
    ε), then a short bisection with all of Opacus's orders tightens σ to
    within 1 %. Solutions are memoised per process and cached on disk
    (JSON, under ``FEDMEDBENCH_CACHE_DIR``, default ``~/.cache/fedmedbench``,
    keyed by these arguments and the Opacus version).
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon {target_epsilon} must be > 0")
    return _solve(float(target_epsilon), float(delta), float(sample_rate), int(steps),
                  check_accountant(accountant), float(tolerance))


@functools.lru_cache(maxsize=256)
def _solve(target: float, delta: float, q: float, steps: int, accountant: str,
           tolerance: float) -> float:
    key = {"target_epsilon": target, "delta": delta, "sample_rate": q, "steps": steps,
           "accountant": accountant, "tolerance": tolerance}
    sigma = _sigma_cache_get(key)
    if sigma is None:
        sigma = _solve_uncached(target, delta, q, steps, accountant, tolerance)
        _sigma_cache_put(key, sigma)
    return sigma


def _solve_uncached(target: float, delta: float, q: float, steps: int, accountant: str,
                    tolerance: float) -> float:
    if accountant != "rdp":
        from opacus.accountants.utils import get_noise_multiplier

        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                          sample_rate=q, steps=steps, accountant=accountant,
                                          epsilon_tolerance=tolerance))
    import numpy as np

    orders, is_int = _orders_np()

    def ints(sigmas: list[float]) -> list[float]:  # ε over the integer orders only
        rdp = _rdp_rows(np.array(sigmas), np.full(len(sigmas), q), mask=is_int)[:, is_int]
        return [float(e) for e in _eps_rows(rdp * steps, orders[is_int], delta)]

    # 1. Opacus's get_noise_multiplier over the integer orders; the next
    # doublings, and three levels of the bisection, go in one call
    hi, eps_hi = 10.0, math.inf
    while eps_hi > target:
        cand = [hi * 2 ** (k + 1) for k in range(4)]
        for s, e in zip(cand, ints(cand)):
            hi, eps_hi = s, e
            if s > MAX_SIGMA:
                raise ValueError("The privacy budget is too low.")
            if not eps_hi > target:
                break

    def upd1(st: tuple, s: float, e: float) -> tuple:
        return (st[0], s, e) if e < target else (s, st[1], st[2])

    _, hi, _ = _bisect((0.0, hi, eps_hi), lambda st: not target - st[2] > tolerance,
                       lambda st: (st[0] + st[1]) / 2, upd1, ints, depth=3)

    # 2. all orders: widen the bracket below hi until it straddles the target,
    # then bisect to 1 % (ε(mid) <= target keeps the upper end). Only
    # "ε <= target" is asked, so only the orders that can reach the target
    # are computed (_needed_orders: short series); one σ per call (evaluating
    # the likeliest path's ten σ at once measured slower).
    need = _needed_orders(delta, target)

    def within(sigma: float) -> bool:
        rdp = np.where(need, _curves([(sigma, q)], need)[0] * steps, np.inf)
        return bool(_eps_rows(rdp[None, :], orders, delta)[0] <= target)

    lo = hi * 0.95
    while within(lo) and lo > 1e-3:  # the bracket must straddle the target
        hi, lo = lo, lo * 0.95
    while hi - lo > 0.01 * hi:
        mid = (lo + hi) / 2
        if within(mid):
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
    the planned ε never exceeds the target. Candidate σ₀ of the next steps
    are evaluated together (their RDP curves in one vectorized call).
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon {target_epsilon} must be > 0")
    check_accountant(accountant)
    target = target_epsilon

    def eps_many(z0s: list[float]) -> list[float]:
        hists = [[(float(s), float(q), int(n)) for s, q, n in schedule(z) if n > 0]
                 for z in z0s]
        if accountant == "rdp":  # every candidate's curves in one call
            return _fast_epsilons(hists, delta)
        return [epsilon_for(h, delta, accountant) for h in hists]

    # how many candidates one call evaluates: about 64 (σ, q) curves per call
    per = max(1, len({(float(s), float(q)) for s, q, _ in schedule(10.0)}))
    depth = 1 if accountant != "rdp" else max(1, min(4, (64 // per + 1).bit_length() - 1))
    hi, eps_hi = 10.0, math.inf
    while eps_hi > target:
        cand = [hi * 2 ** (k + 1) for k in range(depth)]
        for s, e in zip(cand, eps_many(cand)):
            hi, eps_hi = s, e
            if hi > MAX_SIGMA:
                raise ValueError(f"target epsilon {target_epsilon} is too small for this schedule")
            if not eps_hi > target:
                break

    def upd(st: tuple, s: float, e: float) -> tuple:
        return (st[0], s, e) if e < target else (s, st[1], st[2])

    _, hi, _ = _bisect((0.0, hi, eps_hi), lambda st: not target - st[2] > tolerance,
                       lambda st: (st[0] + st[1]) / 2, upd, eps_many, depth=depth)
    return hi


# --------------------------------------------------------------------------
# the on-disk cache of solved σ (JSON, one small file per key)
# --------------------------------------------------------------------------

#: bump when the solver's arithmetic changes: older entries are then not read
SIGMA_CACHE_SCHEMA = "fedmedbench.sigma/1"


@functools.lru_cache(maxsize=1)
def _opacus_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("opacus")
    except PackageNotFoundError:  # pragma: no cover - opacus is a dependency
        return "unknown"


def sigma_cache_dir() -> Any:
    """Where solved noise multipliers are cached: ``<cache>/sigma``, with
    ``<cache>`` = ``FEDMEDBENCH_CACHE_DIR`` (default ``~/.cache/fedmedbench``)."""
    from fedmedbench.datafiles import cache_dir

    return cache_dir() / "sigma"


def _sigma_cache_path(key: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    full = {"schema": SIGMA_CACHE_SCHEMA, "opacus": _opacus_version(), **key}
    text = json.dumps(full, sort_keys=True)
    return sigma_cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json", full


def _sigma_cache_get(key: dict[str, Any]) -> float | None:
    """The cached σ of ``key``, or None when the file is missing, unreadable,
    corrupt or written for other arguments (it is then rewritten)."""
    path, full = _sigma_cache_path(key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != full:
        return None
    sigma = data.get("sigma")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) \
            or not math.isfinite(sigma) or sigma < 0:
        return None
    return float(sigma)


def _sigma_cache_put(key: dict[str, Any], sigma: float) -> None:
    """Write the solved σ atomically (a temporary file renamed over the
    target: a reader sees the old file or the new one, never a part; no
    fsync, a lost entry is only solved again); a read-only or full cache
    only costs speed."""
    import os
    import tempfile

    path, full = _sigma_cache_path(key)
    data = json.dumps({"key": full, "sigma": float(sigma)}, sort_keys=True, indent=1)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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

#: who the guarantee holds against (DESIGN, "Adversaries are named"): the
#: aggregating **server** (what the transport shows it, and who took part), another
#: **client** of the federation (the global models it receives, and under secure
#: aggregation who took part in its rounds), and a party that sees only the
#: **released** model. The record's headline is the server's.
ADVERSARIES = ("server", "client", "released")


@dataclass(frozen=True)
class Guarantee:
    """ε against one adversary (:data:`ADVERSARIES`).

    ``epsilon`` is ``math.inf`` when the mechanism does not protect against
    that adversary at all (central noise: the server adds it, so it reads
    what it noises); ``sample_rate`` is the q the accountant used (1.0: no
    amplification by sampling, because the adversary sees who took part);
    ``steps`` the compositions counted; ``note`` says why, in words.
    """

    adversary: str
    epsilon: float
    delta: float
    sample_rate: float | None
    steps: int
    amplified: bool
    note: str

    def __post_init__(self) -> None:
        if self.adversary not in ADVERSARIES:
            raise ValueError(f"Guarantee adversary {self.adversary!r}; use one of "
                             f"{ADVERSARIES}")

    @property
    def protected(self) -> bool:
        return math.isfinite(self.epsilon)

    def as_dict(self) -> dict[str, Any]:
        return {"adversary": self.adversary,
                "epsilon": self.epsilon if self.protected else None,
                "delta": self.delta, "protected": self.protected,
                "sample_rate": self.sample_rate, "steps": self.steps,
                "amplified": self.amplified, "note": self.note}


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

    ``adversaries`` gives the guarantee against each adversary the mechanism
    and the transport make different (:class:`Guarantee`); the top-level
    ``epsilon`` is the server's when it is given there.
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
    adversaries: dict[str, Guarantee] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"Accounting unit {self.unit!r}; use one of {UNITS}")
        if not (isinstance(self.delta, (int, float)) and 0 <= self.delta < 1):
            raise ValueError(f"Accounting delta {self.delta!r}: an ε needs its δ in [0, 1)")

    def against(self, adversary: str) -> Accounting:
        """These numbers as they hold against ``adversary`` (the top-level ones
        where the mechanism states no guarantee for it)."""
        import dataclasses

        g = self.adversaries.get(adversary)
        if g is None:
            return self
        return dataclasses.replace(self, epsilon=g.epsilon, delta=g.delta,
                                   sample_rate=g.sample_rate, steps=g.steps)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unit": self.unit, "accountant": self.accountant, "epsilon": self.epsilon,
            "delta": self.delta, "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate, "steps": self.steps, "sampling": self.sampling,
            "clip": self.clip, "target_epsilon": self.target_epsilon}
        if self.per_site is not None:
            out["per_site"] = self.per_site
        if self.adversaries:
            out["adversaries"] = {k: g.as_dict() for k, g in self.adversaries.items()}
            out["epsilon"] = self.epsilon if math.isfinite(self.epsilon) else None
        return {**self.details, **out}


HEADLINE_RULE = (
    "The cell's headline guarantee, against the named adversary, is the one for the "
    "strongest unit a mechanism protects against that adversary (client over record; "
    "none: unprotected). Two mechanisms of that unit compose: their ε and δ "
    "add (basic composition). A client-level guarantee is also a record-level one, so the "
    "record-level guarantee is the smallest ε among all mechanisms (each holds for the "
    "whole run by post-processing).")

_FIELDS = ("epsilon", "delta", "unit", "accountant", "noise_multiplier", "sample_rate", "steps",
           "sampling")


def headline(accountings: Mapping[str, Accounting], adversary: str = "server"
             ) -> dict[str, Any]:
    """The cell's top-level privacy fields from its mechanisms' accountings,
    against ``adversary`` (the server unless the matrix names another).

    Returns ``{"epsilon", "delta", "unit", "accountant", "noise_multiplier",
    "sample_rate", "steps", "sampling", "mechanism", "by_unit", "rule",
    "adversary", "protected", "by_adversary"}`` (``epsilon`` and ``delta``
    ``None`` without DP; ``epsilon`` ``None`` and ``protected`` false when no
    mechanism protects against that adversary). The result does not depend on
    the order of the stack (see :data:`HEADLINE_RULE`).
    """
    if adversary not in ADVERSARIES:
        raise ValueError(f"adversary {adversary!r}; use one of {ADVERSARIES}")
    accs = {k: v for k, v in sorted(accountings.items()) if v is not None}
    empty = {k: None for k in _FIELDS}
    if not accs:
        return {**empty, "mechanism": None, "by_unit": {}, "rule": HEADLINE_RULE,
                "adversary": adversary, "protected": None, "by_adversary": {}}
    out = _headline({k: a.against(adversary) for k, a in accs.items()})
    eps = out["epsilon"]
    by_adv = {}
    for adv in ADVERSARIES:
        e = _headline({k: a.against(adv) for k, a in accs.items()})["epsilon"]
        by_adv[adv] = e if math.isfinite(e) else None
    by_unit = {u: {**g, "epsilon": g["epsilon"] if math.isfinite(g["epsilon"]) else None}
               for u, g in out["by_unit"].items()}  # no guarantee is None, never infinity
    return {**out, "epsilon": eps if math.isfinite(eps) else None, "adversary": adversary,
            "protected": bool(math.isfinite(eps)), "by_adversary": by_adv, "by_unit": by_unit}


def _headline(accs: Mapping[str, Accounting]) -> dict[str, Any]:
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
    # the strongest unit with a guarantee against this adversary; none at all: the
    # strongest unit, unprotected (ε = ∞)
    units = [u for u in UNITS if u in by_unit]
    finite = [u for u in units if math.isfinite(by_unit[u]["epsilon"])]
    top = max(finite or units, key=UNITS.index)
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
