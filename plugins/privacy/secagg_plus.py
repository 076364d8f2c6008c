"""SecAgg+: secure aggregation on a sparse random graph of logarithmic degree.

Bell, Bonawitz, Gascón, Lepoint, Raykova. "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead". CCS 2020 (ePrint 2020/704).

The protocol of :mod:`.secagg` (Bonawitz et al. 2017) with the complete
graph replaced by a k-regular one: client u masks pairwise only with its k
neighbours N(u), and Shamir-shares its self-mask seed b_u and its mask key
s_u^SK only among N(u) ∪ {u} (k + 1 shares, threshold t). At unmasking each
surviving holder sends, per client of its neighbourhood, either a share of
b_u (u sent its masked input) or of s_u^SK (u dropped before), never both;
the server rebuilds a dropped client's pairwise masks only with its
neighbours. A client's cost is O(k) key agreements and PRG expansions
instead of O(n).

The graph is a Harary graph H(k, n) (each client linked to the k/2 clients
before and after it on a ring) over a uniformly random order of the round's
clients, the construction of Google's production SecAgg (federated-compute,
``fcp/secagg/server/secret_sharing_harary_graph.h``). k and t follow its
parameter finder (``graph_parameter_finder.cc``), ported in
:func:`harary_parameters`: statistical security σ = 40 and correctness
η = 20 for n clients of which at most ⌊γn⌋ collude with the server and at
most ⌊δn⌋ drop out.
"""

from __future__ import annotations

import functools
import math
import secrets
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np

from fedmedbench import CellContext, ConfigError, DropPhase, Range

from .secagg import PairwiseMasking, SecAggAborted

if TYPE_CHECKING:  # pragma: no cover
    pass

#: statistical security: the server learns more than the sum with probability < 2^-40
SECURITY_BITS = 40
#: correctness: a round within the dropout bound fails with probability < 2^-20
CORRECTNESS_BITS = 20
#: below this many clients the complete graph is used (federated-compute's
#: server: "cohort sizes where subgraph-secagg does not give much advantage")
COMPLETE_BELOW = 65
#: federated-compute's guard against rounding ⌊γn⌋ and ⌈(1−δ)n⌉ the insecure way
_SMALL = 1e-14


def _counts(n: int, corrupt_fraction: float, dropout_fraction: float) -> tuple[int, int]:
    """A = ⌊γn⌋ corrupt clients and D = ⌊δn⌋ dropouts the parameters are chosen for."""
    return (int(math.floor((corrupt_fraction + _SMALL) * n)),
            int(math.floor((dropout_fraction + _SMALL) * n)))


def _threshold_range(n: int, k: int, corrupt_fraction: float, dropout_fraction: float, *,
                     semi_malicious: bool = False) -> tuple[int, int]:
    """(t1, t2): any threshold t in (t1, t2] is secure and correct for degree k.

    - t1 = min{a : P[N_A > a] < 2^-(σ+1)/n}, N_A ~ Hypergeometric(n, ⌊γn⌋, k)
      the corrupt neighbours of a client, so that no client has t corrupt
      neighbours except with probability 2^-(σ+1) (a union bound over n);
    - t2 = min{x : P[N_S <= x] >= 2^-η/n}, N_S ~ Hypergeometric(n, ⌈(1−δ)n⌉, k)
      the surviving neighbours, so that P[N_S < t] < 2^-η/n for t <= t2.

    In the semi-malicious model t1 becomes ⌈(t1 + k − 1.25)/2⌉ (t must exceed
    half of k plus the corrupt neighbours).
    """
    from scipy.stats import hypergeom

    xs = np.arange(k + 1)
    corrupt = _counts(n, corrupt_fraction, dropout_fraction)[0]
    survive = int(math.ceil((1 - dropout_fraction - _SMALL) * n))
    # P[N_A > k] = 0 and P[N_S <= k] = 1, so both searches end by x = k
    t1 = int(np.argmax(hypergeom.sf(xs, n, corrupt, k) < 2.0 ** -(SECURITY_BITS + 1) / n))
    t2 = int(np.argmax(hypergeom.cdf(xs, n, survive, k) >= 2.0 ** -CORRECTNESS_BITS / n))
    if semi_malicious:
        t1 = int(math.ceil((t1 + k - 1.25) / 2))
    return t1, t2


def _log_p_disconnected(n: int, k: int, bad: int) -> float:
    """Union bound on ln P[the Harary graph H(k, n) on a random order loses
    connectivity when ``bad`` clients (corrupt or dropped) are removed]: that
    takes k/2 consecutive bad clients in two disjoint places of the ring."""
    if k > bad:
        return -math.inf
    log_pairs = math.log(n) + math.log(n - k - 1) - math.log(2)
    return (log_pairs + math.lgamma(bad + 1) + math.lgamma(n - k + 1) - math.lgamma(n + 1)
            - math.lgamma(bad - k + 1))


@functools.lru_cache(maxsize=256)
def harary_parameters(n: int, corrupt_fraction: float, dropout_fraction: float, *,
                      semi_malicious: bool = False) -> tuple[int, int] | None:
    """The smallest even degree k < n − 1 and its threshold t for SecAgg+.

    A port of federated-compute's ``HararyGraphParameterFinder`` (σ = 40,
    η = 20): the first k = 2, 4, ... for which the graph of honest surviving
    clients stays connected (``ln P < −(σ+1)·ln 2``) and the threshold range
    ``(t1, t2]`` of :func:`_threshold_range` is not empty; t = max(t1 + 1, 2).
    ``None`` when no such k exists (then the complete graph is used).

    Examples (FCP's test vectors, semi-honest): n = 100 at 5%/5% gives (12, 6),
    n = 1000 at 5%/5% (30, 17), at 10%/10% (48, 27).
    """
    if not 0 <= corrupt_fraction < 1 or not 0 <= dropout_fraction < 1:
        raise ValueError(f"corrupt_fraction={corrupt_fraction!r} and dropout_fraction="
                         f"{dropout_fraction!r} must be in [0, 1)")
    corrupt, dropouts = _counts(n, corrupt_fraction, dropout_fraction)
    for k in range(2, n - 1, 2):
        if _log_p_disconnected(n, k, corrupt + dropouts) >= -(SECURITY_BITS + 1) * math.log(2):
            continue
        t1, t2 = _threshold_range(n, k, corrupt_fraction, dropout_fraction,
                                  semi_malicious=semi_malicious)
        if t2 > t1:
            return k, max(t1 + 1, 2)
    return None


def harary_graph(ids: list[int], k: int, rng: Any) -> dict[int, tuple[int, ...]]:
    """H(k, n) over a random order of ``ids``: each client's k/2 predecessors
    and k/2 successors on the shuffled ring (``rng.shuffle`` draws the order)."""
    order = list(ids)
    rng.shuffle(order)
    n, half = len(order), k // 2
    return {u: tuple(order[(i + d) % n] for d in range(-half, half + 1) if d)
            for i, u in enumerate(order)}


class SecAggPlus(PairwiseMasking):
    """SecAgg+ (Bell et al. 2020): secure aggregation with O(log n) neighbours per client.

    Each client masks with, and shares its secrets among, only its k
    neighbours on a random Harary graph (see the module docstring), so a
    1,000-client round costs each client about 30 key agreements instead of
    999.

    Guarantees (semi-honest server that follows the protocol, colluding with
    at most ⌊γn⌋ of the round's n clients, γ = ``corrupt_fraction``):

    - **What the server learns:** only the sum of the inputs of the clients
      that sent a masked input (at least n − ⌊δn⌋ of them, of which at least
      n − ⌊δn⌋ − ⌊γn⌋ are honest), plus which clients dropped out, except
      with probability < 2^-40 over the random graph (σ = 40: no client has t
      corrupt neighbours, and the honest survivors' graph stays connected so
      no partial sum can be unmasked). Every masked vector it holds is
      indistinguishable from uniform on Z_{2^b} (AES-CTR is a PRG).
    - **Dropouts tolerated:** up to D = ⌊δn⌋ clients (δ =
      ``dropout_fraction``) dropping at any point after sharing keys; the
      round then completes except with probability < 2^-20 (η = 20) over the
      graph, for dropouts that do not depend on it. More than D dropouts, or
      a neighbourhood left with fewer than t share holders, aborts the round
      with :class:`~.secagg.SecAggAborted`: no sum is released, the global
      model is not updated and the cell is recorded ``failed`` with the reason.
    - **Parameters:** k and t from :func:`harary_parameters` for the round's
      n, γ and δ (e.g. 12/6 at n = 100 and 30/17 at n = 1000 for 5%/5%;
      48/27 at n = 1000 for 10%/10%). Below 65 clients, or when no k < n − 1
      passes, the complete graph is used with t = n − D, which must exceed
      ⌈γn⌉ (federated-compute's rule).
    - **Graph seed:** the ring order is drawn by the server from the
      operating system's CSPRNG (:mod:`secrets`) at each round's key setup,
      after the round's clients are sampled; it is not derived from the cell
      seed, so no client can predict or choose its neighbours. The graph
      therefore differs between runs, while the sum (and so every metric) does
      not depend on it.

    The semi-malicious variant of the paper (a server that may lie about the
    graph or the dropouts) is not provided: there are no signatures or
    consistency checks here.

    Parameters
    ----------
    neighbours : int, default 0
        k, an even degree; 0 takes it from the rule above. A given k is used
        at any n (no small-round fallback); k >= n − 1 is the complete graph.
    threshold : int, default 0
        t, the shares (of k + 1) that rebuild a secret; 0 takes it from the
        rule (the smallest secure t for k).
    corrupt_fraction : float, default 0.05
        γ: the fraction of a round's clients that may collude with the server.
    dropout_fraction : float, default 0.05
        δ: the fraction of a round's clients that may drop out (the bound above).
    field_bits, clip_range, dropout_rate, dropout_phase
        As for ``secagg``: the field Z_{2^b}, the clipping range R of the
        fixed-point encoding, and the injected dropouts.
    """

    name = "secagg-plus"
    server_view = "aggregate"

    def __init__(self, *, neighbours: Annotated[int, Range(ge=0)] = 0,
                 threshold: Annotated[int, Range(ge=0)] = 0,
                 corrupt_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.05,
                 dropout_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.05,
                 field_bits: Annotated[int, Range(ge=8, le=64)] = 32,
                 clip_range: Annotated[float, Range(gt=0)] = 1.0,
                 dropout_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0,
                 dropout_phase: DropPhase = "masking") -> None:
        if neighbours % 2:
            raise ValueError(f"neighbours={neighbours}; the Harary graph needs an even degree "
                             f"(k/2 on each side of the ring): use {neighbours + 1}")
        if threshold == 1:
            raise ValueError("threshold=1 would make every share the secret itself; use "
                             "threshold >= 2, or 0 for the SecAgg+ parameter rule")
        if corrupt_fraction + dropout_fraction > 0.9:
            raise ValueError(f"corrupt_fraction + dropout_fraction = "
                             f"{corrupt_fraction + dropout_fraction:g} > 0.9: no graph is "
                             f"secure and correct for that (federated-compute's feasibility "
                             f"bound); lower one of them")
        self.neighbours = neighbours
        self.threshold = threshold
        self.corrupt_fraction = float(corrupt_fraction)
        self.dropout_fraction = float(dropout_fraction)
        self._init_common(field_bits=field_bits, clip_range=clip_range,
                          dropout_rate=dropout_rate, dropout_phase=dropout_phase)
        self._graph_kind = ""
        self._k = 0

    # -- parameters -------------------------------------------------------------

    def max_dropouts(self, n: int) -> int:
        """D = ⌊δn⌋, the dropouts a round of n clients is chosen to survive."""
        return _counts(n, self.corrupt_fraction, self.dropout_fraction)[1]

    def parameters_for(self, n: int) -> tuple[str, int, int]:
        """``(graph, k, t)`` for a round of n clients: ``graph`` is ``"harary"``
        or ``"complete"`` (then k = n − 1). Raises :class:`ConfigError` when the
        given or derived parameters cannot be secure and correct."""
        k, t = self.neighbours, 0
        if k == 0 and n >= COMPLETE_BELOW:
            k, t = harary_parameters(n, self.corrupt_fraction, self.dropout_fraction) or (0, 0)
        elif 0 < k < n - 1:
            t = max(_threshold_range(n, k, self.corrupt_fraction, self.dropout_fraction)[0]
                    + 1, 2)
        if 0 < k < n - 1:
            if t > k + 1:
                raise ConfigError(
                    f"secagg-plus: neighbours={k} of n={n} clients cannot keep the "
                    f"corrupt_fraction={self.corrupt_fraction:g} of them below a threshold: "
                    f"the smallest secure t={t} exceeds the k + 1 = {k + 1} share holders; "
                    f"use more neighbours (or 0 for the SecAgg+ parameter rule)")
            t = self.threshold or t
            if t > k + 1:
                raise ConfigError(
                    f"secagg-plus: threshold={t} exceeds the k + 1 = {k + 1} share holders "
                    f"of a client (neighbours={k}); use threshold <= {k + 1}, or 0 for the "
                    f"parameter rule")
            return "harary", k, t
        # the complete graph: t = n - D of n shares, above the ⌈γn⌉ colluders
        t = self.threshold or n - self.max_dropouts(n)
        if t > n:
            raise ConfigError(f"secagg-plus: threshold={t} exceeds the {n} clients of the "
                              f"round (complete graph); use threshold <= {n}, or 0 for the "
                              f"parameter rule")
        colluders = math.ceil(self.corrupt_fraction * n - _SMALL)
        if n > 1 and t <= colluders:
            raise ConfigError(
                f"secagg-plus: with n={n} clients (complete graph) the threshold t={t} is not "
                f"above the ⌈corrupt_fraction·n⌉ = {colluders} clients that may collude with "
                f"the server; lower dropout_fraction={self.dropout_fraction:g} or "
                f"corrupt_fraction={self.corrupt_fraction:g}, or raise threshold")
        return "complete", n - 1, t

    def setup(self, ctx: CellContext) -> None:
        """Refuse, before training, a field too small for the cell's clients
        or parameters that cannot hold for them."""
        super().setup(ctx)
        self.parameters_for(max(1, int(ctx.num_clients)))

    def round_graph(self, parts: list[int]) -> tuple[dict[int, tuple[int, ...]], int]:
        n = len(parts)
        kind, k, t = self.parameters_for(n)
        self._graph_kind, self._k = kind, k
        if kind == "complete":
            return {u: tuple(v for v in parts if v != u) for u in parts}, t
        return harary_graph(parts, k, secrets.SystemRandom()), t

    def check_alive(self, rnd: int, stage: str, alive: int) -> None:
        dropped, bound = self._n - alive, self.max_dropouts(self._n)
        if dropped <= bound:
            return
        raise SecAggAborted(
            f"round {rnd}: {dropped} of {self._n} clients dropped out "
            f"({'before sending masked inputs' if stage == 'masking' else 'by unmasking'}), "
            f"more than the ⌊dropout_fraction·n⌋ = {bound} that secagg-plus chose its graph "
            f"(k={self._k}, t={self._t}) for; beyond that the honest survivors may lose connectivity and the "
            f"server could unmask partial sums, so the protocol aborts: no sum is released and "
            f"the cell is recorded as failed (the global model of the aborted round is never "
            f"updated); declare dropout_fraction >= {dropped / self._n:g} to tolerate them")

    def report(self) -> dict[str, Any]:
        out = super().report()
        out.update(corrupt_fraction=self.corrupt_fraction,
                   dropout_fraction=self.dropout_fraction,
                   security_bits=SECURITY_BITS, correctness_bits=CORRECTNESS_BITS)
        if self._graph_kind:
            out.update(graph=self._graph_kind, neighbours=self._k,
                       max_dropouts=self.max_dropouts(self._n),
                       parameters="rule" if not (self.neighbours or self.threshold)
                       else "given")
        return out


COMPONENTS = (SecAggPlus,)
