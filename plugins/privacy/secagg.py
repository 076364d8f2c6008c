"""Secure aggregation with pairwise masks, self masks and Shamir-shared seeds.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth.
"Practical Secure Aggregation for Privacy-Preserving Machine Learning".
CCS 2017 (the honest-but-curious protocol, rounds 0-3 of their Figure 4):

0. *AdvertiseKeys*: each client u makes two X25519 key pairs (c_u for
   encrypting shares, s_u for masks) and sends the public keys.
1. *ShareKeys*: u draws a self-mask seed b_u, Shamir-shares b_u and the
   secret key s_u^SK (threshold t, over the prime field GF(2^521 − 1)) and
   sends each share to its owner through the server, AES-GCM encrypted under
   the key agreed from c_u and c_v.
2. *MaskedInputCollection*: u encodes its vector in fixed point in Z_{2^b}
   and sends ``y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)``,
   where ``s_uv`` comes from X25519 agreement (HKDF-SHA256) and the PRG is
   AES-256 in counter mode.
3. *Unmasking*: the surviving clients send shares of b_u for every u that
   sent a masked input, and of s_u^SK for every u that dropped before; with at
   least t of them the server removes all masks and learns **only the sum**.

Dropouts are injected with ``dropout_rate`` at ``dropout_phase`` ("masking":
after sharing keys, before sending the masked input, so the client's input is
left out and its pairwise masks are reconstructed away; "unmasking": after
sending it, so the input counts and its self mask is reconstructed). With more
than n − t dropouts the protocol aborts with :class:`SecAggAborted`: no sum
is released, the global model of that round is never updated, and the cell is
recorded as ``failed`` with the reason.

Under a network twin (:mod:`fedmedbench.clock`) the dropouts are the twin's:
the clients that went offline or missed the deadline, each with its phase,
given by :meth:`PairwiseMasking.drop` after encoding; the same recovery
runs on them, the sum returned is the survivors' (unscaled: the engine
divides by their weights' share), and an abort is a
:class:`~fedmedbench.components.RoundAborted` that the engine records as an
aborted round (the model is not updated) before going on.

The protocol is written once, over a *masking graph*: client u masks with,
and shares its secrets among, its neighbours N(u). This module's ``secagg``
uses the complete graph (every other client of the round); ``secagg-plus``
(:mod:`.secagg_plus`, Bell et al. 2020) uses a sparse random graph with the
same parties, primitives and unmasking.

A client's masks are expanded in one batch (:func:`prg_sum`): the AES-CTR
keystreams of all its seeds are written into one reused buffer and summed
with one numpy reduction per block, instead of one array operation per pair.

The :class:`SecAggServer` object is the only thing the aggregating party
holds: public keys, encrypted shares it routes, masked vectors and the shares
sent to it at unmasking.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmedbench import (
    DROP_PHASES,
    CellContext,
    ConfigError,
    DropPhase,
    Message,
    PrivacyMechanism,
    Range,
    RoundAborted,
    SettingWarning,
    TransportStage,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Shamir's field: the Mersenne prime 2^521 - 1 (holds a 32-byte secret)
PRIME = 2**521 - 1
SHARE_BYTES = 66
KEY_BYTES = 32
#: keystream bytes generated per batch in :func:`prg_sum` (4 MiB was the fastest
#: of 256 KiB-16 MiB for 10k and 100k elements on the 2-core CI machine)
PRG_BATCH_BYTES = 4 << 20
_CTR = modes.CTR(bytes(16))  # one key per stream, so a fixed counter block is safe


class SecAggAborted(RoundAborted):
    """Too many clients dropped out for the server to unmask the sum."""


# --------------------------------------------------------------------------
# primitives
# --------------------------------------------------------------------------


def shamir_split(secret: int, n: int, t: int) -> list[tuple[int, int]]:
    """``n`` shares ``(x, f(x))``, x = 1..n, of ``secret`` with threshold ``t``."""
    if not 1 <= t <= n:
        raise ValueError(f"Shamir threshold t={t} must be in [1, n={n}]")
    coeffs = [secret % PRIME] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    coeffs.reverse()
    out = []
    for x in range(1, n + 1):
        y = 0
        for i, c in enumerate(coeffs, 1):  # Horner, reduced every 16 steps (y grows slowly)
            y = y * x + c
            if i % 16 == 0:
                y %= PRIME
        out.append((x, y % PRIME))
    return out


@functools.lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange coefficients λ_j with f(0) = Σ λ_j f(x_j), cached: the server
    rebuilds a round's secrets from the same share positions
    (:meth:`SecAggServer._secret`). O(t²) small-integer products and one
    modular inversion for all t denominators (Montgomery's trick)."""
    t = len(xs)
    # numerators Π_{m≠j} (-x_m) from prefix and suffix products
    neg = [-x % PRIME for x in xs]
    pre, suf = [1] * (t + 1), [1] * (t + 1)
    for j in range(t):
        pre[j + 1] = pre[j] * neg[j] % PRIME
        suf[t - 1 - j] = suf[t - j] * neg[t - 1 - j] % PRIME
    nums = [pre[j] * suf[j + 1] % PRIME for j in range(t)]
    # denominators Π_{m≠j} (x_j - x_m), inverted together (Montgomery's trick)
    dens = []
    for j, xj in enumerate(xs):
        den = 1
        for m, xm in enumerate(xs):
            if m != j:
                den = den * (xj - xm) % PRIME
        dens.append(den)
    prefix = [1] * (t + 1)
    for j, d in enumerate(dens):
        prefix[j + 1] = prefix[j] * d % PRIME
    inv = pow(prefix[t], -1, PRIME)
    out = [0] * t
    for j in range(t - 1, -1, -1):
        out[j] = nums[j] * (inv * prefix[j] % PRIME) % PRIME
        inv = inv * dens[j] % PRIME
    return tuple(out)


def shamir_combine(shares: list[tuple[int, int]]) -> int:
    """The secret from ``t`` or more shares (Lagrange interpolation at 0)."""
    lam = _lagrange_at_zero(tuple(x for x, _ in shares))
    return sum(y * c for (_, y), c in zip(shares, lam)) % PRIME


def _dtype(bits: int) -> type[np.unsignedinteger]:
    return np.uint32 if bits <= 32 else np.uint64


def _reduce(y: np.ndarray, bits: int) -> np.ndarray:
    if bits in (32, 64):
        return y
    return y & y.dtype.type((1 << bits) - 1)


def prg_sum(seeds: Sequence[bytes], signs: Sequence[int], n: int, bits: int) -> np.ndarray:
    """``Σ_i signs[i]·PRG(seeds[i])`` in Z_{2^bits}, each PRG the AES-256-CTR
    keystream of a 32-byte seed read as ``n`` little-endian words.

    The keystreams are written with ``update_into`` into one buffer of at most
    :data:`PRG_BATCH_BYTES` and each full buffer is added with one numpy
    reduction, so a client's masks cost one AES call per seed and no per-pair
    array work. Arithmetic wraps modulo 2^32 or 2^64, which 2^bits divides.
    """
    if len(seeds) != len(signs):
        raise ValueError(f"{len(seeds)} seeds but {len(signs)} signs")
    if not set(signs) <= {1, -1}:
        raise ValueError(f"signs must be +1 or -1, got {sorted(set(signs))}")
    dtype = _dtype(bits)
    total = np.zeros(n, dtype=dtype)
    nbytes = n * np.dtype(dtype).itemsize
    if not seeds or n == 0:
        return total
    rows = max(1, min(len(seeds), PRG_BATCH_BYTES // nbytes))
    buf = bytearray(rows * nbytes + 15)  # update_into wants block_size - 1 spare bytes
    view = memoryview(buf)
    block = np.frombuffer(buf, dtype=dtype, count=rows * n).reshape(rows, n)
    zeros = bytes(nbytes)
    row_views = [view[i * nbytes:(i + 1) * nbytes + 15] for i in range(rows)]
    for sign in (1, -1):
        group = [s for s, g in zip(seeds, signs) if g == sign]
        for start in range(0, len(group), rows):
            chunk = group[start:start + rows]
            for seed, row in zip(chunk, row_views):
                Cipher(algorithms.AES(seed), _CTR).encryptor().update_into(zeros, row)
            part = block[:len(chunk)].sum(axis=0, dtype=dtype)
            if sign > 0:
                total += part
            else:
                total -= part
    return _reduce(total, bits)


def prg(seed: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` pseudo-random elements of Z_{2^bits} from a 32-byte seed (AES-256-CTR)."""
    return prg_sum([seed], [1], n, bits)


def _kdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _priv(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _mask_seed(sk: X25519PrivateKey, pk: bytes | X25519PublicKey, rnd: int) -> bytes:
    if isinstance(pk, bytes):
        pk = X25519PublicKey.from_public_bytes(pk)
    return _kdf(sk.exchange(pk), b"fedmedbench secagg mask %d" % rnd)


def field_scale(field_bits: int, clip_range: float, n: int) -> int:
    """Fixed-point scale: a sum of n values in [-R, R] fits in Z_{2^b}."""
    return math.floor((2**field_bits - 1) / (2 * clip_range * n))


def min_field_bits(clip_range: float, n: int) -> int | None:
    """The smallest ``field_bits`` in [8, 64] with a scale >= 1 for n clients."""
    return next((b for b in range(8, 65) if field_scale(b, clip_range, n) >= 1), None)


# --------------------------------------------------------------------------
# parties
# --------------------------------------------------------------------------


class _Client:
    """One client's side of a round: its secrets stay here."""

    def __init__(self, uid: int, rnd: int) -> None:
        self.uid, self.rnd = uid, rnd
        self.c_sk = X25519PrivateKey.generate()
        self.s_sk = X25519PrivateKey.generate()
        self.b = secrets.token_bytes(KEY_BYTES)
        self.received: dict[int, bytes] = {}  # encrypted shares addressed to me, by sender
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # my neighbourhood's keys, mine included
        self._peers: dict[int, tuple[X25519PublicKey, X25519PublicKey]] = {}  # parsed once
        self._aeads: dict[int, AESGCM] = {}

    def advertise(self) -> tuple[bytes, bytes]:
        return _pub(self.c_sk), _pub(self.s_sk)

    def _aead(self, other: int) -> AESGCM:
        if other not in self._aeads:  # one key agreement per neighbour and round
            self._aeads[other] = AESGCM(_kdf(self.c_sk.exchange(self._peers[other][0]),
                                             b"fedmedbench secagg shares %d" % self.rnd))
        return self._aeads[other]

    def share_keys(self, keys: dict[int, tuple[bytes, bytes]], t: int) -> dict[int, bytes]:
        """Shamir-share s_u^SK and b_u among the holders in ``keys`` (my
        neighbours and me); return each share encrypted for its owner."""
        self.keys = keys
        self._peers = {v: (X25519PublicKey.from_public_bytes(c), X25519PublicKey.from_public_bytes(s))
                       for v, (c, s) in keys.items() if v != self.uid}
        ids = sorted(keys)
        s_sh = shamir_split(int.from_bytes(_priv(self.s_sk), "big"), len(ids), t)
        b_sh = shamir_split(int.from_bytes(self.b, "big"), len(ids), t)
        out = {}
        for (x, ys), (_, yb), v in zip(s_sh, b_sh, ids):
            pt = (self.uid.to_bytes(4, "big") + v.to_bytes(4, "big") + x.to_bytes(4, "big")
                  + ys.to_bytes(SHARE_BYTES, "big") + yb.to_bytes(SHARE_BYTES, "big"))
            if v == self.uid:
                self.own_share = pt
                continue
            nonce = secrets.token_bytes(12)
            out[v] = nonce + self._aead(v).encrypt(nonce, pt, None)
        return out

    def masked_input(self, x: np.ndarray, bits: int) -> np.ndarray:
        """``x + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)`` over my neighbours."""
        seeds, signs = [self.b], [1]
        for v, (_, s_pk) in self._peers.items():
            seeds.append(_mask_seed(self.s_sk, s_pk, self.rnd))
            signs.append(1 if self.uid < v else -1)
        return _reduce(x + prg_sum(seeds, signs, x.size, bits), bits)

    def unmask(self, survivors: set[int], dropped: set[int]) -> dict[int, tuple[str, int, int]]:
        """Shares for the server, for the clients whose shares I hold: of b_u
        for survivors, of s_u^SK for dropped (never both for one client)."""
        out = {}
        for u in (survivors | dropped) & self.keys.keys():
            pt = self.own_share if u == self.uid else self._open(u)
            x = int.from_bytes(pt[8:12], "big")
            if u in survivors:
                out[u] = ("b", x, int.from_bytes(pt[12 + SHARE_BYTES:], "big"))
            else:
                out[u] = ("s", x, int.from_bytes(pt[12:12 + SHARE_BYTES], "big"))
        return out

    def _open(self, sender: int) -> bytes:
        blob = self.received[sender]
        pt = self._aead(sender).decrypt(blob[:12], blob[12:], None)
        if int.from_bytes(pt[:4], "big") != sender or int.from_bytes(pt[4:8], "big") != self.uid:
            raise ValueError(f"share from client {sender} is not addressed to {self.uid}")
        return pt


@dataclass
class SecAggServer:
    """The aggregating party: it never holds a client secret or an unmasked input.

    ``graph`` maps each client to its neighbours (itself excluded): the
    clients it masks with and shares its secrets among.
    """

    rnd: int
    threshold: int
    bits: int
    graph: dict[int, tuple[int, ...]] = field(default_factory=dict)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # recipient -> sender -> ct
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    unmask_shares: dict[int, dict[int, tuple[str, int, int]]] = field(default_factory=dict)

    def route(self, sender: int, cts: dict[int, bytes]) -> None:
        for v, ct in cts.items():
            self.routed.setdefault(v, {})[sender] = ct

    def neighbourhood_keys(self, u: int) -> dict[int, tuple[bytes, bytes]]:
        """What the server sends client u after AdvertiseKeys: its neighbours'
        public keys and its own."""
        return {v: self.public_keys[v] for v in (u, *self.graph[u])}

    def _secret(self, u: int, kind: str) -> int:
        """Client u's secret from the first t shares by share position.

        A holder's share position is its rank among u's holders (u and its
        neighbours, by id), so taking holders in id order takes the lowest
        positions: with the complete graph every secret of a round is then
        rebuilt from the same positions (those of the first t responders), and
        on a sparse graph most are, so the Lagrange coefficients are computed
        once per round (:func:`_lagrange_at_zero`'s cache) instead of once per
        secret. Any t shares give the same secret, hence the same masks."""
        t = self.threshold
        shares: list[tuple[int, int]] = []
        holders = sorted((u, *self.graph[u]))
        for v in holders:
            share = self.unmask_shares.get(v, {}).get(u)
            if share is not None and share[0] == kind:
                shares.append((share[1], share[2]))
                if len(shares) == t:
                    return shamir_combine(shares)
        what = "self-mask seed b_u" if kind == "b" else "mask key s_u^SK"
        raise SecAggAborted(
            f"round {self.rnd}: only {len(shares)} of the {len(holders)} clients holding "
            f"shares of client {u}'s {what} answered, below the threshold "
            f"t={t}; the server cannot remove client {u}'s masks, so the "
            f"protocol aborts: no sum is released and the cell is recorded as failed "
            f"(the global model of the aborted round is never updated)")

    def unmasked_sum(self, n_numel: int) -> tuple[np.ndarray, list[int]]:
        """Remove every mask from the sum of the masked inputs."""
        survivors = sorted(self.masked)
        alive = set(survivors)
        dropped = sorted(set(self.public_keys) - alive)
        total = np.zeros(n_numel, dtype=_dtype(self.bits))
        for u in survivors:
            total += self.masked[u]
        seeds = [self._secret(u, "b").to_bytes(KEY_BYTES, "big") for u in survivors]
        signs = [-1] * len(seeds)
        for u in dropped:
            s = self._secret(u, "s")
            s_sk = X25519PrivateKey.from_private_bytes(s.to_bytes(KEY_BYTES, "big"))
            for v in self.graph[u]:
                if v in alive:
                    seeds.append(_mask_seed(s_sk, self.public_keys[v][1], self.rnd))
                    signs.append(-1 if v < u else 1)  # v added +m if v < u: take it back
        total += prg_sum(seeds, signs, n_numel, self.bits)
        return _reduce(total, self.bits), survivors


# --------------------------------------------------------------------------
# the mechanisms
# --------------------------------------------------------------------------


class PairwiseMasking(PrivacyMechanism, TransportStage):
    """The masking protocol over a per-round graph, shared by ``secagg`` and
    ``secagg-plus``; subclasses choose the graph and threshold
    (:meth:`round_graph`) and when dropouts abort (:meth:`check_alive`)."""

    server_view: ClassVar[str] = "aggregate"

    def _init_common(self, *, field_bits: int, clip_range: float, dropout_rate: float,
                     dropout_phase: str) -> None:
        self.field_bits = field_bits
        self.clip_range = float(clip_range)
        self.dropout_rate = float(dropout_rate)
        self.dropout_phase = dropout_phase
        self._round = -1
        self.server: SecAggServer | None = None
        self._clients: dict[int, _Client] = {}
        self.stats: dict[str, Any] = {"rounds": 0, "clipped_coordinates": 0, "dropouts": 0}
        self._warned = False
        #: the network twin's dropouts of the round: client -> "masking" | "unmasking"
        self._twin_dropped: dict[int, str] = {}

    @property
    def drops_clients(self) -> bool:
        """Whether some clients' inputs can be left out of a round's sum."""
        return self.dropout_rate > 0

    # -- to override -----------------------------------------------------------

    def round_graph(self, parts: list[int]) -> tuple[dict[int, tuple[int, ...]], int]:
        """The round's masking graph (client -> neighbours, itself excluded)
        and the Shamir threshold t."""
        raise NotImplementedError

    def check_alive(self, rnd: int, stage: str, alive: int) -> None:
        """Raise :class:`SecAggAborted` if ``alive`` of the round's clients
        are too few to go on at ``stage`` ("masking" or "unmasking")."""

    # -- helpers ---------------------------------------------------------------

    def scale_for(self, n: int) -> float:
        """Fixed-point scale: a sum of n values in [-R, R] fits in Z_{2^b}."""
        return field_scale(self.field_bits, self.clip_range, n)

    def check_field(self, n: int) -> None:
        """Raise :class:`ConfigError` if Z_{2^b} cannot hold the sum of n
        clipped inputs (the fixed-point scale would be 0)."""
        if self.scale_for(n) >= 1:
            return
        need = min_field_bits(self.clip_range, n)
        fix = (f"use field_bits >= {need} (or a smaller clip_range)" if need is not None else
               f"use a clip_range below {(2**64 - 1) / (2 * n):.4g}")
        raise ConfigError(
            f"{self.name}: field_bits={self.field_bits} is too small for clip_range="
            f"{self.clip_range:g} and n={n} clients: the sum of n values in [-R, R] needs "
            f"2·R·n = {2 * self.clip_range * n:g} > 2^{self.field_bits} - 1 levels, so the "
            f"fixed-point scale would be 0; {fix}")

    def setup(self, ctx: CellContext) -> None:
        """Refuse, before training, a field too small for the cell's clients
        (``ctx.num_clients`` bounds every round's participants)."""
        self.check_field(max(1, int(ctx.num_clients)))
        self._ctx = ctx

    def begin_round(self, round: int) -> None:
        """Rounds 0-1 of the protocol among the round's participants."""
        if self._ctx.participants:
            self.begin_round_keys(self._ctx)

    def begin_round_keys(self, ctx: CellContext) -> None:
        """Rounds 0-1 of the protocol among ``ctx.participants``: keys,
        encrypted shares, and the clients that will drop out (the engine calls
        it through :meth:`begin_round`; a second call for the same round
        starts a fresh key setup)."""
        parts = sorted(ctx.participants)
        if not parts:
            raise RuntimeError(f"{self.name} needs CellContext.participants (the round's "
                               f"clients)")
        n, rnd = len(parts), ctx.round
        self.check_field(n)
        graph, t = self.round_graph(parts)
        self._round, self._n, self._t = rnd, n, t
        self._scale = self.scale_for(n)
        self.server = server = SecAggServer(rnd, t, self.field_bits, graph)
        self._clients = {u: _Client(u, rnd) for u in parts}
        # round 0: advertise keys
        for u, c in self._clients.items():
            server.public_keys[u] = c.advertise()
        # round 1: share keys among the neighbourhood (encrypted, routed by the server)
        self._up: dict[int, int] = {}
        for u, c in self._clients.items():
            cts = c.share_keys(server.neighbourhood_keys(u), t)
            server.route(u, cts)
            self._up[u] = 2 * KEY_BYTES + sum(len(x) for x in cts.values())
        for v, c in self._clients.items():
            c.received = dict(server.routed.get(v, {}))
        # who drops out this round
        d = int(round(self.dropout_rate * n))
        rng = ctx.rng("secagg-dropout", rnd)
        self._dropped = set(rng.choice(parts, size=d, replace=False).tolist()) if d else set()
        self.stats["dropouts"] += d
        # bytes each client receives: its neighbourhood's public keys + the shares routed to it
        self._down = sum((len(graph[v]) + 1) * (4 + 2 * KEY_BYTES)
                         + sum(len(x) for x in server.routed.get(v, {}).values()) for v in parts)

    # -- transport stage ---------------------------------------------------------

    def drop(self, ctx: CellContext, dropped: dict[int, str]) -> bool:
        """The network twin's dropouts of this round, after every client
        encoded: a ``"masking"`` dropout's masked input never reaches the
        server (its pairwise masks are reconstructed away), an
        ``"unmasking"`` one sends no unmasking shares (its input counts and
        its self mask is reconstructed). :meth:`aggregate` then returns the
        survivors' unscaled sum, or raises :class:`SecAggAborted` past the
        threshold."""
        bad = sorted(c for c in dropped if c not in self._clients)
        if bad:
            raise ValueError(f"clients {bad} are not participants of round {ctx.round}")
        phases = set(dropped.values()) - set(DROP_PHASES)
        if phases:
            raise ValueError(f"dropout phase(s) {sorted(phases)}; one of {', '.join(DROP_PHASES)}")
        self._twin_dropped = {int(c): str(p) for c, p in dropped.items()}
        return True

    def encode(self, ctx: CellContext, client: int, vector: torch.Tensor) -> Message:
        if ctx.round != self._round:
            raise RuntimeError(f"{self.name}: round {ctx.round} was not started (the engine "
                               f"calls setup(ctx) once and begin_round(round) every round)")
        if client not in self._clients:
            raise ValueError(f"client {client} is not a participant of round {ctx.round}")
        if client in self._dropped and self.dropout_phase == "masking":
            return Message(client, None, self._up[client])
        v = vector.detach().cpu().numpy().astype(np.float64)
        R = self.clip_range
        clipped = int(np.count_nonzero(np.abs(v) > R))
        self.stats["clipped_coordinates"] += clipped
        if clipped > 0.5 * v.size and not self._warned:
            self._warn_clipping(ctx, client, clipped, v)
        x = np.rint((np.clip(v, -R, R) + R) * self._scale).astype(_dtype(self.field_bits))
        y = self._clients[client].masked_input(x, self.field_bits)
        return Message(client, y, self._up[client] + y.nbytes)

    def _warn_clipping(self, ctx: CellContext, client: int, clipped: int, v: np.ndarray) -> None:
        """Warn once per cell, as early as it can be known (the first update
        encoded whose coordinates mostly fall outside ``[-R, R]``: values are
        not known before training)."""
        self._warned = True
        warnings.warn(
            f"{self.name}: {clipped} of {v.size} coordinates ({clipped / v.size:.0%}) of client "
            f"{client}'s round-{ctx.round} update (as weighted for aggregation) lie outside "
            f"clip_range = ±{self.clip_range:g} and are clipped before encoding, so the "
            f"securely aggregated sum is not the sum of the updates (largest |value| "
            f"{float(np.abs(v).max()):.3g}); raise clip_range (and field_bits if needed). The "
            f"record's cost.clipped_coordinates counts every clipped coordinate",
            SettingWarning, stacklevel=2)

    def aggregate(self, ctx: CellContext, messages: list[Message]) -> torch.Tensor:
        import torch

        server = self.server
        assert server is not None
        twin = self._twin_dropped
        for m in messages:  # a masking dropout's input never arrived: only its key setup did
            if twin.get(m.client) == "masking":
                m.payload = None
                m.nbytes = self._up[m.client]
        server.masked = {m.client: m.payload for m in messages if m.payload is not None}
        server.unmask_shares = {}
        self.stats["dropouts"] += len(twin)
        numel = next((m.payload.size for m in messages if m.payload is not None), 0)
        self.check_alive(ctx.round, "masking", len(server.masked))
        survivors = set(server.masked)
        dropped_before = set(server.public_keys) - survivors
        responders = [u for u in sorted(survivors)
                      if not (u in self._dropped and self.dropout_phase == "unmasking")
                      and twin.get(u) != "unmasking"]
        self.check_alive(ctx.round, "unmasking", len(responders))
        by_client = {m.client: m for m in messages}
        for u in responders:
            shares = self._clients[u].unmask(survivors, dropped_before)
            server.unmask_shares[u] = shares
            by_client[u].nbytes += len(shares) * (4 + 4 + SHARE_BYTES)
        total, included = server.unmasked_sum(numel)
        k = len(included)
        signed = total.astype(np.float64) / self._scale - k * self.clip_range
        if k < len(messages) and not twin:  # inputs left out by its own dropouts: a mean over
            # the survivors (exact for uniform weights, the only weighting the engine allows
            # with them); the twin's: the survivors' sum, which the engine rescales
            signed *= len(messages) / k
        if twin:
            self.stats["recovered_rounds"] = self.stats.get("recovered_rounds", 0) + 1
        self.stats["rounds"] += 1
        self._clients = {}  # client secrets of this round are discarded
        return torch.as_tensor(signed, dtype=torch.float32)

    def end_round(self, round: int) -> None:
        """The round's parties go: every client's key pairs, self-mask seed and
        shares, and the server's masked inputs and unmasking shares (also
        after an aborted round)."""
        self._clients = {}
        self.server = None
        self._dropped = set()
        self._twin_dropped = {}

    def close(self) -> None:
        self.end_round(self._round)

    def bytes_down(self, ctx: CellContext) -> int:
        n = max(1, getattr(self, "_n", 1))
        return int(math.ceil(getattr(self, "_down", 0) / n))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field_bits": self.field_bits, "clip_range": self.clip_range,
                               **self.stats}
        if getattr(self, "_n", None):
            out.update(threshold=self._t, clients=self._n,
                       quantisation_step=1.0 / self._scale)
        return out


class SecAgg(PairwiseMasking):
    """Secure aggregation (Bonawitz et al. 2017): the server learns only the sum.

    Every client masks with every other client of the round (the complete
    graph): n − 1 key agreements and PRG expansions per client, O(n²) per
    round; ``secagg-plus`` is the sparse-graph form for many clients.

    Parameters
    ----------
    threshold : int, default 0
        t, the number of clients whose shares unmask the sum; 0 means an honest
        majority, ``floor(n/2) + 1`` of the round's n clients.
    field_bits : int, default 32
        b: inputs are encoded in Z_{2^b} (8 to 64). A field too small for
        ``clip_range`` and the cell's clients is a :class:`ConfigError` at setup.
    clip_range : float, default 1.0
        R: each (weight-scaled) coordinate is clipped to [-R, R] before
        fixed-point encoding with step ``2·R·n / (2^b − 1)``.
    dropout_rate : float, default 0.0
        Fraction of each round's clients that drop out (chosen with the seed).
    dropout_phase : {"masking", "unmasking"}, default "masking"
        When they drop: before sending the masked input, or after it.
    """

    name = "secagg"
    server_view = "aggregate"

    def __init__(self, *, threshold: Annotated[int, Range(ge=0)] = 0,
                 field_bits: Annotated[int, Range(ge=8, le=64)] = 32,
                 clip_range: Annotated[float, Range(gt=0)] = 1.0,
                 dropout_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0,
                 dropout_phase: DropPhase = "masking") -> None:
        self.threshold = threshold
        self._init_common(field_bits=field_bits, clip_range=clip_range,
                          dropout_rate=dropout_rate, dropout_phase=dropout_phase)

    def t_for(self, n: int) -> int:
        t = self.threshold or n // 2 + 1
        if t > n:
            raise ValueError(f"secagg threshold t={t} exceeds the {n} clients of the round; "
                             f"use threshold <= {n} (or 0 for an honest majority)")
        return t

    def round_graph(self, parts: list[int]) -> tuple[dict[int, tuple[int, ...]], int]:
        t = self.t_for(len(parts))
        return {u: tuple(v for v in parts if v != u) for u in parts}, t

    def check_alive(self, rnd: int, stage: str, alive: int) -> None:
        if alive >= self._t:
            return
        what = "sent masked inputs" if stage == "masking" else "sent unmasking shares"
        raise SecAggAborted(
            f"round {rnd}: only {alive} of {self._n} clients {what}, below the threshold "
            f"t={self._t}; secagg recovers at most n - t = {self._n - self._t} dropouts, so "
            f"the protocol aborts: no sum is released and the cell is recorded as failed "
            f"(the global model of the aborted round is never updated)")


COMPONENTS = (SecAgg,)
