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

The :class:`SecAggServer` object is the only thing the aggregating party
holds: public keys, encrypted shares it routes, masked vectors and the shares
sent to it at unmasking.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmedbench import CellContext, Message, PrivacyMechanism, Range, TransportStage

PHASES = ("masking", "unmasking")
#: Shamir's field: the Mersenne prime 2^521 - 1 (holds a 32-byte secret)
PRIME = 2**521 - 1
SHARE_BYTES = 66
KEY_BYTES = 32


class SecAggAborted(RuntimeError):
    """Too many clients dropped out for the server to unmask the sum."""


# --------------------------------------------------------------------------
# primitives
# --------------------------------------------------------------------------


def shamir_split(secret: int, n: int, t: int) -> list[tuple[int, int]]:
    """``n`` shares ``(x, f(x))``, x = 1..n, of ``secret`` with threshold ``t``."""
    if not 1 <= t <= n:
        raise ValueError(f"Shamir threshold t={t} must be in [1, n={n}]")
    coeffs = [secret % PRIME] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out.append((x, y))
    return out


def shamir_combine(shares: list[tuple[int, int]]) -> int:
    """The secret from ``t`` or more shares (Lagrange interpolation at 0)."""
    secret = 0
    for j, (xj, yj) in enumerate(shares):
        num, den = 1, 1
        for m, (xm, _) in enumerate(shares):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    return secret


def prg(seed: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` pseudo-random elements of Z_{2^bits} from a 32-byte seed (AES-256-CTR)."""
    dtype = np.uint32 if bits <= 32 else np.uint64
    width = np.dtype(dtype).itemsize
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    out = np.frombuffer(enc.update(bytes(n * width)), dtype=dtype)
    if bits not in (32, 64):
        out = out & dtype((1 << bits) - 1)
    return out


def _kdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _priv(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _mask_seed(sk: X25519PrivateKey, pk: bytes, rnd: int) -> bytes:
    return _kdf(sk.exchange(X25519PublicKey.from_public_bytes(pk)),
                b"fedmedbench secagg mask %d" % rnd)


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
        self.keys: dict[int, tuple[bytes, bytes]] = {}

    def advertise(self) -> tuple[bytes, bytes]:
        return _pub(self.c_sk), _pub(self.s_sk)

    def _aead(self, other: int) -> AESGCM:
        c_pk = self.keys[other][0]
        return AESGCM(_kdf(self.c_sk.exchange(X25519PublicKey.from_public_bytes(c_pk)),
                           b"fedmedbench secagg shares %d" % self.rnd))

    def share_keys(self, keys: dict[int, tuple[bytes, bytes]], t: int) -> dict[int, bytes]:
        """Shamir-share s_u^SK and b_u; return each share encrypted for its owner."""
        self.keys = keys
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
        n = x.size
        y = x + prg(self.b, n, bits)
        for v, (_, s_pk) in self.keys.items():
            if v == self.uid:
                continue
            m = prg(_mask_seed(self.s_sk, s_pk, self.rnd), n, bits)
            y = y + m if self.uid < v else y - m
        return _reduce(y, bits)

    def unmask(self, survivors: set[int], dropped: set[int]) -> dict[int, tuple[str, int, int]]:
        """Shares for the server: of b_u for survivors, of s_u^SK for dropped."""
        out = {}
        for u in survivors | dropped:
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
    """The aggregating party: it never holds a client secret or an unmasked input."""

    rnd: int
    threshold: int
    bits: int
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # recipient -> sender -> ct
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    unmask_shares: dict[int, dict[int, tuple[str, int, int]]] = field(default_factory=dict)

    def route(self, sender: int, cts: dict[int, bytes]) -> None:
        for v, ct in cts.items():
            self.routed.setdefault(v, {})[sender] = ct

    def unmasked_sum(self, n_numel: int) -> tuple[np.ndarray, list[int]]:
        """Remove every mask from the sum of the masked inputs."""
        survivors = sorted(self.masked)
        u1 = set(self.public_keys)
        dropped = u1 - set(survivors)
        if len(self.unmask_shares) < self.threshold:
            raise SecAggAborted(
                f"round {self.rnd}: only {len(self.unmask_shares)} of {len(u1)} clients sent "
                f"unmasking shares, below the threshold t={self.threshold}; secagg recovers at "
                f"most n - t = {len(u1) - self.threshold} dropouts, so the protocol aborts: "
                f"no sum is released and the cell is recorded as failed (the global model "
                f"of the aborted round is never updated)")
        total = np.zeros(n_numel, dtype=np.uint32 if self.bits <= 32 else np.uint64)
        for u in survivors:
            total = total + self.masked[u]
        for u in survivors:
            b = shamir_combine([(x, y) for sh in self.unmask_shares.values()
                                for kind, x, y in [sh[u]] if kind == "b"][:self.threshold])
            total = total - prg(b.to_bytes(KEY_BYTES, "big"), n_numel, self.bits)
        for u in dropped:
            s = shamir_combine([(x, y) for sh in self.unmask_shares.values()
                                for kind, x, y in [sh[u]] if kind == "s"][:self.threshold])
            s_sk = X25519PrivateKey.from_private_bytes(s.to_bytes(KEY_BYTES, "big"))
            for v in survivors:
                m = prg(_mask_seed(s_sk, self.public_keys[v][1], self.rnd), n_numel, self.bits)
                # v added +m if v < u, -m if v > u: take it back
                total = total - m if v < u else total + m
        return _reduce(total, self.bits), survivors


def _reduce(y: np.ndarray, bits: int) -> np.ndarray:
    if bits in (32, 64):
        return y
    return y & y.dtype.type((1 << bits) - 1)


# --------------------------------------------------------------------------
# the mechanism
# --------------------------------------------------------------------------


class SecAgg(PrivacyMechanism, TransportStage):
    """Secure aggregation (Bonawitz et al. 2017): the server learns only the sum.

    Parameters
    ----------
    threshold : int, default 0
        t, the number of clients whose shares unmask the sum; 0 means an honest
        majority, ``floor(n/2) + 1`` of the round's n clients.
    field_bits : int, default 32
        b: inputs are encoded in Z_{2^b} (8 to 64).
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
                 dropout_phase: str = "masking") -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"threshold={threshold!r}; use an integer t >= 1, or 0 for an "
                             f"honest majority")
        if isinstance(field_bits, bool) or not isinstance(field_bits, int) \
                or not 8 <= field_bits <= 64:
            raise ValueError(f"field_bits={field_bits!r}; it must be an integer in [8, 64]")
        if not clip_range > 0:
            raise ValueError(f"clip_range={clip_range!r}; it must be > 0")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate={dropout_rate!r}; it must be in [0, 1)")
        if dropout_phase not in PHASES:
            raise ValueError(f"dropout_phase={dropout_phase!r}; choose one of "
                             f"{', '.join(PHASES)}")
        self.threshold = threshold
        self.field_bits = field_bits
        self.clip_range = float(clip_range)
        self.dropout_rate = float(dropout_rate)
        self.dropout_phase = dropout_phase
        self._round = -1
        self.server: SecAggServer | None = None
        self.stats: dict[str, Any] = {"rounds": 0, "clipped_coordinates": 0, "dropouts": 0}

    # -- helpers ---------------------------------------------------------------

    @property
    def drops_clients(self) -> bool:  # type: ignore[override]
        return self.dropout_rate > 0

    def setup(self, ctx: CellContext) -> None:
        self._ctx = ctx
        self._round = -1

    def begin_round(self, round: int) -> None:
        """AdvertiseKeys and ShareKeys among the round's participants."""
        if self._ctx.participants:
            self._start(self._ctx)

    def t_for(self, n: int) -> int:
        t = self.threshold or n // 2 + 1
        if t > n:
            raise ValueError(f"secagg threshold t={t} exceeds the {n} clients of the round; "
                             f"use threshold <= {n} (or 0 for an honest majority)")
        return t

    def scale_for(self, n: int) -> float:
        """Fixed-point scale: a sum of n values in [-R, R] fits in Z_{2^b}."""
        return math.floor((2**self.field_bits - 1) / (2 * self.clip_range * n))

    def _start(self, ctx: CellContext) -> None:
        parts = sorted(ctx.participants)
        if not parts:
            raise RuntimeError("secagg needs CellContext.participants (the round's clients)")
        n, rnd = len(parts), ctx.round
        t = self.t_for(n)
        self._round, self._n, self._t = rnd, n, t
        self._scale = self.scale_for(n)
        self.server = SecAggServer(rnd, t, self.field_bits)
        self._clients = {u: _Client(u, rnd) for u in parts}
        # round 0: advertise keys
        for u, c in self._clients.items():
            self.server.public_keys[u] = c.advertise()
        keys = dict(self.server.public_keys)
        # round 1: share keys (encrypted, routed by the server)
        self._up: dict[int, int] = {}
        for u, c in self._clients.items():
            cts = c.share_keys(keys, t)
            self.server.route(u, cts)
            self._up[u] = 2 * KEY_BYTES + sum(len(x) for x in cts.values())
        for v, c in self._clients.items():
            c.received = dict(self.server.routed.get(v, {}))
        # who drops out this round
        d = int(round(self.dropout_rate * n))
        rng = ctx.rng("secagg-dropout", rnd)
        self._dropped = set(rng.choice(parts, size=d, replace=False).tolist()) if d else set()
        self.stats["dropouts"] += d
        # bytes each client receives: every public key + the shares routed to it
        self._down = sum(n * (4 + 2 * KEY_BYTES) + sum(len(x) for x in
                         self.server.routed.get(v, {}).values()) for v in parts)

    # -- transport stage ---------------------------------------------------------

    def encode(self, ctx: CellContext, client: int, vector: torch.Tensor) -> Message:
        if ctx.round != self._round:
            raise RuntimeError(f"secagg: round {ctx.round} was not started (the engine calls "
                               f"setup(ctx) once and begin_round(round) every round)")
        if client not in self._clients:
            raise ValueError(f"client {client} is not a participant of round {ctx.round}")
        if client in self._dropped and self.dropout_phase == "masking":
            return Message(client, None, self._up[client])
        v = vector.detach().to(torch.float64).numpy()
        R = self.clip_range
        self.stats["clipped_coordinates"] += int(np.count_nonzero(np.abs(v) > R))
        dtype = np.uint32 if self.field_bits <= 32 else np.uint64
        x = np.rint((np.clip(v, -R, R) + R) * self._scale).astype(dtype)
        y = self._clients[client].masked_input(x, self.field_bits)
        return Message(client, y, self._up[client] + len(y.tobytes()))

    def aggregate(self, ctx: CellContext, messages: list[Message]) -> torch.Tensor:
        server = self.server
        assert server is not None
        server.masked = {m.client: m.payload for m in messages if m.payload is not None}
        server.unmask_shares = {}
        numel = next((m.payload.size for m in messages if m.payload is not None), 0)
        if len(server.masked) < self._t:
            raise SecAggAborted(
                f"round {ctx.round}: only {len(server.masked)} of {self._n} clients sent masked "
                f"inputs, below the threshold t={self._t}; secagg recovers at most n - t = "
                f"{self._n - self._t} dropouts, so the protocol aborts: no sum is released and "
                f"the cell is recorded as failed (the global model of the aborted round is "
                f"never updated)")
        survivors = set(server.masked)
        dropped_before = set(server.public_keys) - survivors
        responders = [u for u in sorted(survivors)
                      if not (u in self._dropped and self.dropout_phase == "unmasking")]
        by_client = {m.client: m for m in messages}
        for u in responders:
            shares = self._clients[u].unmask(survivors, dropped_before)
            server.unmask_shares[u] = shares
            by_client[u].nbytes += len(shares) * (4 + 4 + SHARE_BYTES)
        total, included = server.unmasked_sum(numel)
        k = len(included)
        signed = total.astype(np.float64) / self._scale - k * self.clip_range
        if k < len(messages):  # inputs left out by dropouts: a mean over the survivors
            # (exact for uniform weights, the only weighting validate() allows with dropouts)
            signed *= len(messages) / k
        self.stats["rounds"] += 1
        self._clients = {}  # client secrets of this round are discarded
        return torch.as_tensor(signed, dtype=torch.float32)

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


COMPONENTS = (SecAgg,)
