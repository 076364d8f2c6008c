"""Secure aggregation: the full Bonawitz protocol (``secagg``) and SecAgg+ (``secagg-plus``).

Real crypto throughout (X25519, HKDF, AES-CTR, AES-GCM from ``cryptography``,
Shamir over GF(2^521 − 1)); rounds run through the mechanisms' own transport
methods, and whole cells through the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from fedmedbench import ConfigError
from fedmedbench.plugins.privacy import secagg
from fedmedbench.plugins.privacy.secagg import SecAgg, SecAggAborted, prg_sum
from fedmedbench.plugins.privacy.secagg_plus import SecAggPlus, harary_parameters


@dataclass
class _Ctx:
    """The slice of CellContext a transport mechanism reads."""

    n: int
    round: int = 1
    seed: int = 0
    participants: list[int] = field(default_factory=list)
    num_clients: int = 0

    def __post_init__(self) -> None:
        self.participants = self.participants or list(range(self.n))
        self.num_clients = self.num_clients or self.n

    def rng(self, purpose: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, len(purpose), *extra])


def _updates(n: int, numel: int, seed: int = 0, scale: float = 0.05) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) * scale for _ in range(n)]


def _round(mech, vecs, rnd=1):
    """One round as the engine runs it: setup, begin_round, encode, aggregate."""
    ctx = _Ctx(n=len(vecs), round=rnd)
    mech.setup(ctx)
    mech.begin_round(rnd)
    msgs = [mech.encode(ctx, i, v) for i, v in enumerate(vecs)]
    return msgs, mech.aggregate(ctx, msgs)


def assert_uniform(masked: dict[int, np.ndarray], plain: np.ndarray, alpha: float = 1e-4) -> None:
    """Every masked 32-bit vector passes a chi-square test on its top byte and
    a KS test against U[0, 1) (family-wise level ``alpha``, Bonferroni over the
    vectors), and the same tests reject ``plain``, an unmasked fixed-point
    encoding (so they have power)."""
    level = alpha / len(masked)
    for u, y in masked.items():
        assert y.dtype == np.uint32, u
        counts = np.bincount((y >> np.uint32(24)).astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > level, u
        assert stats.kstest(y / 2.0**32, "uniform").pvalue > level, u
    assert stats.kstest(plain / 2.0**32, "uniform").pvalue < 1e-12


def _encoded(mech, v: torch.Tensor, n: int) -> np.ndarray:
    return np.rint((v.double().numpy() + mech.clip_range) * mech.scale_for(n)).astype(np.uint32)


# --------------------------------------------------------------------------
# shared primitives
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [20, 32, 64])
def test_batched_mask_expansion_equals_one_keystream_per_seed(bits, monkeypatch):
    """prg_sum (keystreams written into one buffer, summed per block) gives
    exactly Σ ±AES-CTR(seed) mod 2^bits, also across several blocks."""
    monkeypatch.setattr(secagg, "PRG_BATCH_BYTES", 3 * 1000 * 8)  # 3 rows per block
    rng = np.random.default_rng(0)
    seeds = [rng.bytes(32) for _ in range(11)]
    signs = [1, -1, -1, 1, 1, 1, -1, 1, -1, -1, 1]
    dtype = np.uint32 if bits <= 32 else np.uint64
    width = np.dtype(dtype).itemsize
    want = np.zeros(1000, dtype=object)
    for s, g in zip(seeds, signs):
        ks = Cipher(algorithms.AES(s), modes.CTR(bytes(16))).encryptor().update(bytes(1000 * width))
        want += g * np.frombuffer(ks, dtype=dtype).astype(object)
    want = (want % 2**bits).astype(dtype)
    got = prg_sum(seeds, signs, 1000, bits)
    assert got.dtype == dtype and np.array_equal(got, want)
    assert np.array_equal(secagg.prg(seeds[0], 1000, bits),
                          prg_sum([seeds[0]], [1], 1000, bits))
    with pytest.raises(ValueError, match="signs must be"):
        prg_sum(seeds[:2], [1, 0], 10, bits)


def test_shamir_threshold_shares_rebuild_the_secret_and_fewer_do_not():
    secret = int.from_bytes(np.random.default_rng(1).bytes(32), "big")
    shares = secagg.shamir_split(secret, 13, 6)
    assert secagg.shamir_combine(shares[:6]) == secret
    assert secagg.shamir_combine(shares[7:]) == secret
    assert secagg.shamir_combine(shares[2:7]) != secret  # 5 < t shares


def test_lagrange_coefficients_match_the_textbook_formula():
    P = secagg.PRIME
    rng = np.random.default_rng(2)
    for t in (1, 2, 3, 8, 41):
        xs = tuple(sorted(rng.choice(np.arange(1, 300), t, replace=False).tolist()))
        want = []
        for j, xj in enumerate(xs):
            num = den = 1
            for m, xm in enumerate(xs):
                if m != j:
                    num, den = num * -xm % P, den * (xj - xm) % P
            want.append(num * pow(den, -1, P) % P)
        assert secagg._lagrange_at_zero(xs) == tuple(want)
        # and f(0) of a random polynomial comes back
        coef = [int(c) for c in rng.integers(0, 2**62, t)]
        ys = [sum(c * x**i for i, c in enumerate(coef)) % P for x in xs]
        assert sum(y * lam for y, lam in zip(ys, secagg._lagrange_at_zero(xs))) % P == coef[0]


def _rebuilt_secrets(mech, vecs, monkeypatch):
    """Run a round; return {(u, kind): secret the server rebuilt} and the
    clients' true secrets {(u, "b"): b_u, (u, "s"): s_u^SK}."""
    rebuilt, truth = {}, {}
    real = secagg.SecAggServer._secret

    def spy(self, u, kind):
        rebuilt[(u, kind)] = real(self, u, kind)
        return rebuilt[(u, kind)]

    monkeypatch.setattr(secagg.SecAggServer, "_secret", spy)
    real_aggregate = type(mech).aggregate

    def keep_truth(self, ctx, msgs):
        for u, c in self._clients.items():
            truth[(u, "b")] = int.from_bytes(c.b, "big")
            truth[(u, "s")] = int.from_bytes(secagg._priv(c.s_sk), "big")
        return real_aggregate(self, ctx, msgs)

    monkeypatch.setattr(type(mech), "aggregate", keep_truth)
    _, agg = _round(mech, vecs)
    return rebuilt, truth, agg


@pytest.mark.parametrize("phase", [None, "masking", "unmasking"])
def test_full_secagg_computes_the_lagrange_coefficients_once_per_round(phase, monkeypatch):
    """Every secret of a round is rebuilt from the same share positions (the
    first t responders'), so one set of coefficients serves them all, and
    the rebuilt secrets are the clients' own: the masks removed are the
    masks added."""
    n, numel, t = 24, 300, 13
    vecs = _updates(n, numel, seed=4)
    mech = SecAgg(threshold=t, dropout_rate=0.25 if phase else 0.0,
                  dropout_phase=phase or "masking")
    secagg._lagrange_at_zero.cache_clear()
    rebuilt, truth, agg = _rebuilt_secrets(mech, vecs, monkeypatch)
    assert len(rebuilt) == n  # b_u of every survivor, s_u^SK of every early dropout
    assert all(truth[key] == s for key, s in rebuilt.items())
    info = secagg._lagrange_at_zero.cache_info()
    assert info.misses == 1 and info.hits == n - 1
    kept = [v for i, v in enumerate(vecs) if phase != "masking" or i not in mech._dropped]
    expected = torch.stack(kept).double().sum(0) * (n / len(kept))
    assert float((agg.double() - expected).abs().max()) < 1e-5


@pytest.mark.parametrize("drop", [0.0, 0.1])
def test_secagg_plus_reuses_lagrange_coefficients(drop, monkeypatch):
    n = 100
    mech = SecAggPlus(dropout_rate=drop, dropout_fraction=0.1, dropout_phase="unmasking")
    secagg._lagrange_at_zero.cache_clear()
    rebuilt, truth, agg = _rebuilt_secrets(mech, _updates(n, 200, seed=5), monkeypatch)
    assert all(truth[key] == s for key, s in rebuilt.items())
    misses = secagg._lagrange_at_zero.cache_info().misses
    assert misses == 1 if drop == 0 else misses < len(rebuilt) / 2


# --------------------------------------------------------------------------
# secagg: the full protocol
# --------------------------------------------------------------------------


def test_secagg_sum_within_quantisation_error_and_masks_look_uniform():
    n, numel = 10, 20_000
    mech = SecAgg(field_bits=32, clip_range=1.0)
    vecs = _updates(n, numel)
    msgs, agg = _round(mech, vecs)
    plain = torch.stack(vecs).double().sum(0)
    bound = n * 0.5 / mech.scale_for(n) + 1e-6  # rounding of n inputs + float32 output
    assert float((agg.double() - plain).abs().max()) <= bound
    server = mech.server
    assert set(server.masked) == set(range(n))
    # every masked vector the server holds is indistinguishable from uniform on Z_2^32
    assert_uniform(server.masked, _encoded(mech, vecs[0], n))
    # the server holds no client secret: only public keys, ciphertexts and masked inputs
    for keys in server.public_keys.values():
        assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    assert not hasattr(server, "_clients") and mech._clients == {}
    assert all(len(nb) == n - 1 for nb in server.graph.values())  # the complete graph
    # bytes come from serialized sizes: masked vector + keys + encrypted shares + unmask shares
    assert all(m.nbytes > 4 * numel for m in msgs)


@pytest.mark.parametrize("phase", ["masking", "unmasking"])
def test_secagg_recovers_up_to_n_minus_t_dropouts(phase):
    n, numel, t = 10, 2_000, 6
    vecs = _updates(n, numel, seed=1)
    mech = SecAgg(threshold=t, dropout_rate=0.4, dropout_phase=phase)  # 4 = n - t drop
    assert mech.drops_clients and not SecAgg().drops_clients
    msgs, agg = _round(mech, vecs)
    dropped = mech._dropped
    assert len(dropped) == n - t
    if phase == "masking":  # their inputs never arrive: the mean of the survivors, rescaled
        kept = [v for i, v in enumerate(vecs) if i not in dropped]
        expected = torch.stack(kept).double().sum(0) * n / len(kept)
        assert all(m.payload is None for m in msgs if m.client in dropped)
    else:  # they sent masked inputs, then vanished: their inputs still count
        expected = torch.stack(vecs).double().sum(0)
    assert float((agg.double() - expected).abs().max()) < 1e-5
    # one more dropout than n - t: a clear error
    mech = SecAgg(threshold=t, dropout_rate=0.5, dropout_phase=phase)
    with pytest.raises(SecAggAborted, match=r"at most n - t = 4 dropouts"):
        _round(mech, vecs)


HEART = """
name = "secagg-test"
rounds = 2
seeds = [0]
[axes]
dataset = ["heart-disease"]
algorithm = ["fedavg"]
aggregator = [{{name = "weighted-mean", by = "uniform"}}]
privacy = {privacy}
"""


def test_secagg_abort_leaves_the_global_model_unchanged():
    import tomllib

    from fedmedbench import run_cell
    from fedmedbench.matrix import parse_matrix
    from fedmedbench.models import get_flat_params

    raw = tomllib.loads(HEART.format(
        rounds=2, privacy='[{name = "secagg", dropout_rate = 0.5, dropout_phase = "unmasking"}]'))
    rec, run = run_cell(parse_matrix(raw).cells[0], keep_run=True)
    assert rec["status"] == "failed" and "n - t = 1 dropouts" in rec["error"]["message"]
    assert rec["error"]["component"] == "secagg" and rec["error"]["hook"] == "aggregate"
    assert len(rec["history"]) == 0  # round 1 (4 clients, t = 3, 2 drop) aborted
    assert torch.equal(run.final_models[0], get_flat_params(run.model_factory()))


def test_round_keys_are_set_up_once_per_round_at_begin_round():
    """The keys of a round are set up by begin_round (the lifecycle hook),
    encode reuses them, and encode without a started round is an error."""
    mech = SecAggPlus()
    vecs = _updates(4, 50)
    ctx = _Ctx(n=4, round=3)
    mech.setup(ctx)
    with pytest.raises(RuntimeError, match="round 3 was not started"):
        mech.encode(ctx, 0, vecs[0])
    mech.begin_round(3)
    server = mech.server
    msgs = [mech.encode(ctx, i, v) for i, v in enumerate(vecs)]
    assert mech.server is server
    agg = mech.aggregate(ctx, msgs)
    assert float((agg.double() - torch.stack(vecs).double().sum(0)).abs().max()) < 1e-6
    assert SecAgg.server_view == SecAggPlus.server_view == "aggregate"


# --------------------------------------------------------------------------
# a field too small is a configuration error
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SecAgg, SecAggPlus])
def test_a_field_too_small_for_the_clients_is_a_config_error(cls):
    mech = cls(field_bits=8, clip_range=4.0)
    # 2·R·n = 400 levels > 2^8 - 1; 9 bits hold them
    with pytest.raises(ConfigError, match=r"field_bits=8 .* clip_range=4 and n=50 clients"
                                          r".*use field_bits >= 9"):
        mech.setup(_Ctx(n=50))
    cls(field_bits=9, clip_range=4.0).setup(_Ctx(n=50))  # the named fix works
    with pytest.raises(ConfigError, match="use a clip_range below"):
        cls(clip_range=1e18).setup(_Ctx(n=50))


def test_a_field_too_small_fails_the_cell_before_training(run_matrix):
    code, recs = run_matrix(HEART.format(
        privacy='[{name = "secagg", field_bits = 8, clip_range = 64.0}]'))
    assert code == 1 and len(recs) == 1
    rec = recs[0]
    assert rec["status"] == "failed" and rec["error"]["type"] == "ConfigError"
    assert "field_bits >= 10" in rec["error"]["message"]  # 2·64·4 = 512 levels
    assert rec["history"] == []  # no round ran


# --------------------------------------------------------------------------
# secagg-plus: the parameter rule
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n, corrupt, dropout, semi_malicious, k, t", [
    # federated-compute's graph_parameter_finder_test.cc (σ = 40, η = 20)
    (100, 0.05, 0.05, False, 12, 6),
    (1000, 0.05, 0.05, False, 30, 17),
    (1000, 0.05, 0.33, False, 72, 24),
    (1000, 0.33, 0.05, False, 78, 60),
    (1000, 0.05, 0.05, True, 52, 37),
    (100, 0.33, 0.33, False, 68, 34),
    (10, 0.33, 0.33, False, 8, 4),
    # the research notes' table (the same derivation)
    (1000, 0.10, 0.10, False, 48, 27),
    (100, 0.10, 0.10, False, 22, 11),
    (1000, 0.0, 0.0, False, 2, 2),
])
def test_harary_parameters_match_federated_compute(n, corrupt, dropout, semi_malicious, k, t):
    assert harary_parameters(n, corrupt, dropout, semi_malicious=semi_malicious) == (k, t)


def test_secagg_plus_round_parameters():
    assert SecAggPlus().parameters_for(100) == ("harary", 12, 6)
    assert SecAggPlus().parameters_for(1000) == ("harary", 30, 17)
    plus10 = SecAggPlus(corrupt_fraction=0.1, dropout_fraction=0.1)
    assert plus10.parameters_for(1000) == ("harary", 48, 27)
    assert plus10.max_dropouts(1000) == 100
    # small rounds: the complete graph with t = n - ⌊δn⌋
    assert SecAggPlus().parameters_for(50) == ("complete", 49, 48)
    assert SecAggPlus().parameters_for(3) == ("complete", 2, 3)
    # given degree: the smallest secure threshold for it
    assert SecAggPlus(neighbours=20).parameters_for(100) == ("harary", 20, 6)
    assert SecAggPlus(neighbours=20, threshold=12).parameters_for(100) == ("harary", 20, 12)
    with pytest.raises(ConfigError, match="exceeds the k \\+ 1 = 5 share holders"):
        SecAggPlus(neighbours=4, threshold=6).parameters_for(100)
    with pytest.raises(ConfigError, match="t=3 is not above the ⌈corrupt_fraction·n⌉ = 3"):
        SecAggPlus(corrupt_fraction=0.45, dropout_fraction=0.45).parameters_for(5)
    for kwargs, msg in [({"neighbours": 5}, "even degree"), ({"threshold": 1}, "threshold=1"),
                        ({"corrupt_fraction": 0.5, "dropout_fraction": 0.5}, "> 0.9"),
                        ({"dropout_fraction": 1.0},
                         r"secagg-plus\.dropout_fraction = 1\.0 is out of range")]:
        with pytest.raises(ValueError, match=msg):
            SecAggPlus(**kwargs)


# --------------------------------------------------------------------------
# secagg-plus: rounds
# --------------------------------------------------------------------------


def test_secagg_plus_sum_exact_on_a_sparse_graph_and_masks_look_uniform():
    n, numel = 100, 4_000
    mech = SecAggPlus()
    vecs = _updates(n, numel, seed=2, scale=0.05)
    msgs, agg = _round(mech, vecs)
    plain = torch.stack(vecs).double().sum(0)
    bound = n * 0.5 / mech.scale_for(n) + 1e-6
    assert float((agg.double() - plain).abs().max()) <= bound
    server = mech.server
    # a 12-regular, symmetric graph over all 100 clients, not the ring 0-1-2-...
    graph = server.graph
    assert set(graph) == set(range(n)) and {len(nb) for nb in graph.values()} == {12}
    assert all(u in graph[v] for u in graph for v in graph[u])
    assert any(set(graph[u]) != {(u + d) % n for d in range(-6, 7) if d} for u in graph)
    # each client received shares only from its neighbours, and keys of its neighbourhood
    assert {v: set(server.routed[v]) for v in graph} == {v: set(graph[v]) for v in graph}
    assert_uniform(server.masked, _encoded(mech, vecs[0], n))
    acc = mech.report()
    assert acc["graph"] == "harary" and acc["neighbours"] == 12 and acc["threshold"] == 6
    assert acc["security_bits"] == 40 and acc["correctness_bits"] == 20
    # a client's upload: its masked vector, 2 keys, 12 encrypted shares, 13 unmasking shares
    assert all(m.nbytes < 4 * numel + 64 + 12 * 200 + 13 * 80 for m in msgs)
    # and the graph is fresh every round
    _round(mech, vecs, rnd=2)
    assert mech.server.graph != graph


@pytest.mark.parametrize("phase", ["masking", "unmasking"])
def test_secagg_plus_recovers_up_to_the_dropout_bound(phase):
    n, numel = 100, 1_000
    vecs = _updates(n, numel, seed=3)
    mech = SecAggPlus(dropout_rate=0.05, dropout_phase=phase)  # 5 = ⌊0.05·100⌋ drop
    msgs, agg = _round(mech, vecs)
    dropped = mech._dropped
    assert len(dropped) == 5 == mech.max_dropouts(n)
    if phase == "masking":
        kept = [v for i, v in enumerate(vecs) if i not in dropped]
        expected = torch.stack(kept).double().sum(0) * n / len(kept)
        # each dropped client's masks were rebuilt with its 12 neighbours only
        assert all(m.payload is None for m in msgs if m.client in dropped)
    else:
        expected = torch.stack(vecs).double().sum(0)
    assert float((agg.double() - expected).abs().max()) < 1e-5
    # one dropout beyond ⌊δn⌋ aborts, with the fix in the message
    mech = SecAggPlus(dropout_rate=0.06, dropout_phase=phase)
    with pytest.raises(SecAggAborted, match=r"6 of 100 clients dropped out .* more than the "
                                            r"⌊dropout_fraction·n⌋ = 5 .*dropout_fraction >= 0.06"):
        _round(mech, vecs)


@pytest.mark.parametrize("phase", ["masking", "unmasking"])
def test_secagg_plus_neighbourhood_below_its_threshold_aborts(phase):
    """On a ring (k = 2) with t = 3 = k + 1, one dropout leaves a neighbourhood
    with 2 of its 3 share holders: the server cannot unmask, and says why."""
    vecs = _updates(10, 200, seed=4)
    mech = SecAggPlus(neighbours=2, threshold=3, dropout_fraction=0.3, dropout_rate=0.1,
                      dropout_phase=phase)
    with pytest.raises(SecAggAborted, match=r"only 2 of the 3 clients holding shares of client "
                                            r"\d's .* below the threshold t=3"):
        _round(mech, vecs)


@pytest.mark.slow
def test_secagg_plus_round_of_1000_clients():
    """1,000 clients with 30 neighbours each (~10 s on 2 cores; the full
    protocol would need 999 each)."""
    n, numel = 1000, 64
    mech = SecAggPlus(dropout_rate=0.05)
    vecs = _updates(n, numel, seed=5, scale=0.01)
    _, agg = _round(mech, vecs)
    kept = [v for i, v in enumerate(vecs) if i not in mech._dropped]
    expected = torch.stack(kept).double().sum(0) * n / len(kept)
    assert float((agg.double() - expected).abs().max()) < n * 0.5 / mech.scale_for(n) * 1.1
    assert {len(nb) for nb in mech.server.graph.values()} == {30}
    assert mech.report()["threshold"] == 17


def test_secagg_plus_cell_matches_plaintext(run_matrix):
    """100 hospitals, all in every round: the sparse graph (k = 12, t = 6)
    through the engine gives the plaintext cell's utility."""
    code, recs = run_matrix("""
        rounds = 2
        seeds = [0]
        [axes]
        dataset = [{ name = "synthetic-ehr", n_hospitals = 100 }]
        algorithm = ["fedavg"]
        privacy = ["none", "secagg-plus"]
        [run]
        clients_per_round = 1.0
        local_steps = 2
        eval_every = 2
    """)
    assert code == 0, [r["error"] for r in recs]
    by = {r["labels"]["privacy"]: r for r in recs}
    plain, plus = by["none"]["metrics"], by["secagg-plus"]["metrics"]
    assert plus["utility"]["global"] == pytest.approx(plain["utility"]["global"], abs=1e-4)
    acc = plus["privacy"]["mechanisms"]["secagg-plus"]
    assert (acc["graph"], acc["neighbours"], acc["threshold"], acc["clients"]) == \
        ("harary", 12, 6, 100)
    assert plus["privacy"]["level"] == "crypto"
    assert plus["cost"]["bytes_up"] > plain["cost"]["bytes_up"]
