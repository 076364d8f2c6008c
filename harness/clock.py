"""The hospital-network twin: a virtual clock beside every round.

A consortium asks "how long until the model is good enough, over our links,
with our hospitals dropping out", not "how many rounds". The twin answers in
virtual seconds, from three inputs:

- **site profiles** (:class:`~fedmedbench.components.SiteProfile`, from the
  cell's :class:`~fedmedbench.components.Network`, the matrix's ``network``
  axis): each site's compute speed relative to this machine, its uplink and
  downlink, its latency and when it is online;
- the **reference step time** of the cell's model: one local optimizer step
  on a batch of the cell's batch size, measured on this machine once and
  cached (:func:`reference_step`), or pinned by the network
  (``reference_step_s``) for numbers comparable across machines;
- what the round did: each client's local steps, the bytes each message
  carried (:attr:`Broadcast.per_client_bytes <fedmedbench.messages.Broadcast>`
  down, :attr:`Sent.row_bytes <fedmedbench.messages.Sent>` up) and the
  transport's cryptographic seconds, measured per client.

A synchronous round (:class:`Twin`, ``federated`` and ``personalized``
protocols) starts when the last one ended. A sampled client that is offline
then does not take part (``unavailable``). Every other client ``i`` is done
at::

    t0 + latency_i + down_bytes / downlink_i          (the broadcast)
       + steps_i · reference_step_s / speed_i         (local training)
       + crypto_i / speed_i                           (its key setup share and encoding)
       + latency_i + up_bytes_i / uplink_i            (its message)

A client that goes offline before it is done (``offline``), or is done after
the network's deadline (``deadline``), is a **dropout**: under a transport
with dropout recovery (secure aggregation) it goes through the protocol's
own recovery (:meth:`~fedmedbench.components.TransportStage.drop`), which
aborts the round past its threshold; without a transport its message never
reaches the server. A client online at its upload but offline before the
protocol's unmasking step (one more round trip) is an ``unmasking`` dropout.
The server waits for the slowest client still coming, the deadline at most;
unmasking and the server's cryptographic seconds follow. Pooled and
isolated rounds take the longest party's compute time; nothing crosses.

Asynchronous protocols (``buffered``: FedBuff, FedAsync) run on
:class:`AsyncTwin`, an event simulation of dispatches and arrivals: the
server keeps ``concurrency`` clients training, each arrival joins a buffer,
and a full buffer is one server update.

Determinism: availability and assignments are drawn from the cell seed; the
reference step time is measured once per machine and cached (the first
measurement written wins), so a cell's clock is the same on every run on
one machine, except the cryptographic seconds of a transport, which are
measured each run. ``uniform`` (the default network: this machine's speed,
links of no transfer time, always online, no deadline) changes no result:
no client is ever dropped, and the round runs exactly as without a clock.

Record fields (the report's figures read them; names are kept):

- ``history[t]["clock_s"]``: virtual seconds at the end of round ``t`` (a
  server update under the buffered protocol);
- ``history[t]["bytes"]``: ``{"up", "down"}``, bytes crossed so far;
- ``history[t]["dropouts"]`` (rounds with any): ``{reason: [site, ...]}``,
  reasons ``unavailable`` (offline at the round's start: took no part),
  ``offline`` (went offline before its upload ended), ``deadline``,
  ``unmasking`` (offline before secure aggregation's last step: its input
  counted) and, asynchronous, ``stale`` (discarded past ``max_staleness``);
- ``history[t]["aborted"]`` (a transport aborted the round: nothing
  released, the model unchanged); ``history[t]["staleness"]``
  (``{"mean", "max"}``) and ``history[t]["trained"]`` (buffered protocol);
- ``metrics["clock"]``: ``profile`` (the network's label), ``presets``
  (sites per preset), ``preset_profiles``, ``card``, ``reference_step_s``
  and ``reference_step`` (``measured``, ``cached`` or ``pinned``),
  ``deadline_s``, ``total_s``, ``total_h``, ``per_round_s``,
  ``time_to_target`` (:func:`cell_targets`), ``participation`` (per site,
  the rounds whose update reached the aggregate), ``dropouts`` (a count),
  ``dropouts_by_reason``, ``dropouts_by_site``, ``aborted_rounds``,
  ``crypto_s`` (the measured cryptographic seconds, before scaling),
  ``bytes_up``, ``bytes_down``; asynchronous: ``async`` (buffer size,
  concurrency, maximum staleness) and ``staleness`` (mean, max,
  histogram); ``privacy_note`` where an ε's amplification does not carry
  over to asynchronous arrivals.

Time to target (:func:`time_to_target`) reads a record's history:
``history[t]["clock_s"]``, ``history[t]["bytes"]`` (cumulative bytes up and
down) and ``history[t]["utility"]``. The default target, a fraction of the
pooled baseline, needs the pooled (``centralized``) record of the same
dataset, partitioner, model, run settings and seed: a cell does not train
it, so :func:`resolve_time_to_target` pairs records read together (a cell
given ``[evaluate] pooled_baseline`` resolves it itself).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.components import Availability, Network, SiteProfile

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = ["Twin", "AsyncTwin", "reference_step", "time_to_target", "resolve_time_to_target",
           "completion_probability", "CLOCK_SCHEMA", "DEFAULT_TARGET_FRACTION",
           "availability_process"]

#: the version of the cached reference-step measurement
CLOCK_SCHEMA = 1
#: the default time-to-target: this fraction of the pooled baseline's utility
DEFAULT_TARGET_FRACTION = 0.95
#: local steps timed for the reference step (after warm-up), at least
_MIN_STEPS, _MAX_STEPS, _MIN_SECONDS = 5, 200, 0.05


# --------------------------------------------------------------------------
# the reference step
# --------------------------------------------------------------------------


def reference_step(factory: Any, *, input_shape: Sequence[int], num_classes: int,
                   settings: Any, spec: Mapping[str, Any]) -> tuple[float, str]:
    """Seconds of one local optimizer step of the cell's model on this machine.

    One step is a forward pass, the cross-entropy loss, a backward pass and
    the optimizer's update on a batch of ``settings.batch_size`` random
    inputs of ``input_shape``, on one thread (as cells run). The median of
    at least 5 timed steps (after 3 of warm-up) is cached on disk under
    ``FEDMEDBENCH_CACHE_DIR/clock``, keyed by the model's configuration, the
    input shape, the batch size, the optimizer, torch's version and the
    machine; the first measurement written wins, so every cell on one
    machine reads the same number (and a process reads each file once).
    The global random generators are left as they were (a measurement never
    changes a cell's numbers).

    Returns
    -------
    (float, str)
        The seconds, and ``"measured"`` or ``"cached"``.
    """
    import platform

    import torch

    key = {"schema": CLOCK_SCHEMA, "model": dict(spec), "input_shape": list(input_shape),
           "num_classes": int(num_classes), "batch_size": int(settings.batch_size),
           "optimizer": str(settings.optimizer), "torch": torch.__version__,
           "machine": platform.machine(), "processor": platform.processor(),
           "node": platform.node(), "cpus": os.cpu_count(),
           "threads": torch.get_num_threads()}
    path = _cache_path(key)
    got = _READ.get(str(path))  # the first measurement written wins: a read never changes
    if got is None:
        got = _cache_read(path, key)
    if got is not None:
        _READ[str(path)] = got
        return got, "cached"
    seconds = _measure(factory, tuple(input_shape), int(num_classes), settings)
    return _cache_write(path, key, seconds), "measured"


#: reference steps this process read from the cache, by file (a cell reads its model's
#: once, not a file per cell)
_READ: dict[str, float] = {}


def _measure(factory: Any, shape: tuple[int, ...], classes: int, settings: Any) -> float:
    import torch

    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(0)
        model = factory()
        model.train()
        X = torch.randn((int(settings.batch_size), *shape), generator=g)
        y = torch.randint(0, max(1, classes), (int(settings.batch_size),), generator=g)
        opt = settings.make_optimizer(model.parameters())
        loss_fn = torch.nn.CrossEntropyLoss()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X), y).backward()
            opt.step()

        for _ in range(3):
            step()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < _MAX_STEPS and (len(times) < _MIN_STEPS
                                           or time.perf_counter() - start < _MIN_SECONDS):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _cache_path(key: Mapping[str, Any]) -> Any:
    from fedmedbench.datafiles import cache_dir

    text = json.dumps(key, sort_keys=True, default=str)
    return cache_dir() / "clock" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def _cache_read(path: Any, key: Mapping[str, Any]) -> float | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    want = json.loads(json.dumps(key, sort_keys=True, default=str))
    v = data.get("reference_step_s") if isinstance(data, dict) else None
    if data.get("key") != want or isinstance(v, bool) or not isinstance(v, (int, float)) \
            or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def _cache_write(path: Any, key: Mapping[str, Any], seconds: float) -> float:
    """Write ``seconds`` unless another process wrote first (then read and
    return that one): a hard link of a complete temporary file is atomic and
    fails when the target exists. A cache that cannot be written only costs
    a measurement next time."""
    import tempfile

    data = json.dumps({"key": json.loads(json.dumps(key, sort_keys=True, default=str)),
                       "reference_step_s": seconds}, sort_keys=True, indent=1)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            other = _cache_read(path, key)
            if other is not None:
                return other
            os.replace(tmp, path)  # an unreadable or stale entry: replace it
            tmp = None
        except OSError:  # a file system without hard links
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
    return seconds


# --------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------


class _Always:
    def online(self, t: float) -> bool:
        return True

    def next_off(self, t: float) -> float:
        return math.inf

    def next_on(self, t: float) -> float:
        return t


class _OnOff:
    """An alternating renewal process with exponential periods, started in
    its stationary state, its toggles drawn as far as they are asked for."""

    def __init__(self, a: Availability, rng: np.random.Generator) -> None:
        self.up, self.down = float(a.mean_up_s), float(a.mean_down_s)
        self.rng = rng
        p_up = self.up / (self.up + self.down) if math.isfinite(self.up) else 1.0
        self.state0 = bool(rng.random() < p_up)
        self.times: list[float] = []
        self._extend_from(0.0, self.state0)

    def _extend_from(self, t: float, state: bool) -> None:
        mean = self.up if state else self.down
        self.times.append(t + float(self.rng.exponential(mean)) if math.isfinite(mean)
                          else math.inf)

    def _ensure(self, t: float) -> None:
        while self.times[-1] <= t and math.isfinite(self.times[-1]):
            state = self.state0 ^ (len(self.times) % 2 == 1)  # the state after the last toggle
            self._extend_from(self.times[-1], state)

    def _state(self, t: float) -> tuple[bool, int]:
        self._ensure(t)
        i = bisect.bisect_right(self.times, t)
        return self.state0 ^ (i % 2 == 1), i

    def online(self, t: float) -> bool:
        return self._state(t)[0]

    def next_off(self, t: float) -> float:
        on, i = self._state(t)
        return self.times[i] if on else t

    def next_on(self, t: float) -> float:
        on, i = self._state(t)
        return t if on else self.times[i]


class _Trace:
    """Online in the trace's intervals, repeated every ``period_s``."""

    def __init__(self, a: Availability) -> None:
        self.starts = [float(s) for s, _ in a.intervals]
        self.ends = [float(e) for _, e in a.intervals]
        self.period = float(a.period_s)

    def _where(self, t: float) -> tuple[float, float]:
        if self.period <= 0:
            return 0.0, t
        k = math.floor(t / self.period)
        return k * self.period, t - k * self.period

    def online(self, t: float) -> bool:
        _, r = self._where(t)
        i = bisect.bisect_right(self.starts, r) - 1
        return i >= 0 and r < self.ends[i]

    def next_off(self, t: float) -> float:
        if not self.online(t):
            return t
        cur = t
        for _ in range(len(self.starts) + 2):  # adjacent intervals, or one that wraps on
            base, r = self._where(cur)
            i = bisect.bisect_right(self.starts, r) - 1
            end = base + self.ends[i]
            if not self.online(end):
                return end
            if end <= cur:
                break
            cur = end
        return math.inf  # online all the time

    def next_on(self, t: float) -> float:
        base, r = self._where(t)
        if self.online(t):
            return t
        i = bisect.bisect_right(self.starts, r)
        if i < len(self.starts):
            return base + self.starts[i]
        if self.period <= 0:
            return math.inf
        return base + self.period + self.starts[0]


def availability_process(a: Availability, rng: np.random.Generator) -> Any:
    """An object with ``online(t)``, ``next_off(t)`` (the first time at or
    after ``t`` the site is offline; ``inf``: never) and ``next_on(t)``."""
    if a.always:
        return _Always()
    if a.kind == "onoff":
        return _OnOff(a, rng)
    return _Trace(a)


# --------------------------------------------------------------------------
# the synchronous twin
# --------------------------------------------------------------------------


@dataclass
class Timeline:
    """One synchronous round's times (virtual seconds) and dropouts."""

    t0: float
    done: dict[int, float] = field(default_factory=dict)
    #: dropped client -> (reason, phase, when the server learns it)
    dropped: dict[int, tuple[str, str, float]] = field(default_factory=dict)
    upload_end: float = 0.0
    end: float = 0.0

    @property
    def phases(self) -> dict[int, str]:
        return {c: phase for c, (_, phase, _) in self.dropped.items()}

    @property
    def lost(self) -> set[int]:
        """Clients whose input never reached the server."""
        return {c for c, (_, phase, _) in self.dropped.items() if phase == "masking"}


class Twin:
    """The virtual clock of one cell (module docstring).

    Parameters
    ----------
    label : str
        The network as the record names it (``"uniform"``, ``"hospital-mix(...)"``).
    names : sequence of str
        The training parties.
    profiles : sequence of SiteProfile
    steps : sequence of float
        Each party's local steps per round.
    reference_step_s : float
    reference_source : str
        ``"measured"``, ``"cached"`` or ``"pinned"``.
    deadline_s : float or None
    seed : int
    card : dict
        The network's card (sources of its numbers).
    """

    def __init__(self, *, label: str, names: Sequence[str], profiles: Sequence[SiteProfile],
                 steps: Sequence[float], reference_step_s: float, reference_source: str,
                 deadline_s: float | None, seed: int, card: Mapping[str, Any] | None = None
                 ) -> None:
        from fedmedbench.federation import cell_rng

        if len(profiles) != len(names):
            raise ValueError(f"the network gave {len(profiles)} site profiles for "
                             f"{len(names)} training parties; give one per party")
        self.label = label
        self.names = list(names)
        self.profiles = list(profiles)
        self.ref = float(reference_step_s)
        self.reference_source = reference_source
        self.deadline = None if deadline_s is None else float(deadline_s)
        self.card = dict(card or {})
        n = len(names)
        self.speed = np.array([p.speed for p in profiles], dtype=float)
        self.up = np.array([p.up_mbps * 1e6 / 8 for p in profiles], dtype=float)  # bytes/s
        self.down = np.array([p.down_mbps * 1e6 / 8 for p in profiles], dtype=float)
        self.latency = np.array([p.latency_ms / 1e3 for p in profiles], dtype=float)
        self.steps = np.asarray(steps, dtype=float)
        #: seconds of one round's local training per party
        self.compute = self.steps * self.ref / self.speed
        always = _Always()
        self.avail = [always if p.availability.always else
                      availability_process(p.availability, cell_rng(seed, "availability", i))
                      for i, p in enumerate(profiles)]
        #: some site can be offline, or a deadline cuts rounds: clients can drop out
        self.drops = self.deadline is not None or not all(p.availability.always
                                                         for p in profiles)
        self.now = 0.0
        self.per_round: list[float] = []
        self.participation = np.zeros(n, dtype=np.int64)
        self.dropouts: dict[str, int] = {}
        self.dropouts_by_site = np.zeros(n, dtype=np.int64)
        self.aborted: list[int] = []
        self.crypto_s = 0.0
        self.bytes_up = 0
        self.bytes_down = 0

    # -- a synchronous round ------------------------------------------------------

    def available(self, clients: Sequence[int]) -> tuple[list[int], list[int]]:
        """(online, offline) of the round's sampled clients at its start."""
        if not self.drops:
            return list(clients), []
        on: list[int] = []
        off: list[int] = []
        for c in clients:
            (on if c < len(self.avail) and self.avail[c].online(self.now) else off).append(c)
        return on, off

    def _wire(self, c: int, nbytes: float, bw: np.ndarray) -> float:
        rate = bw[c]
        return float(self.latency[c]) + (0.0 if math.isinf(rate) else float(nbytes) / rate)

    def _wires(self, cl: np.ndarray, nbytes: float | np.ndarray, bw: np.ndarray
               ) -> np.ndarray:
        """:meth:`_wire` of clients ``cl`` sending ``nbytes`` (floats) each (an
        unlimited link's ``nbytes / inf`` is the loop's 0.0)."""
        return self.latency[cl] + nbytes / bw[cl]

    def timeline(self, clients: Sequence[int], *, down_bytes: int, up_bytes: Sequence[int],
                 crypto_s: Mapping[int, float] | None = None, unmasking: bool = False,
                 steps: Mapping[int, float] | None = None, dropping: bool = True) -> Timeline:
        """When each of the round's (online) ``clients`` is done, and who drops
        out (``dropping=False``: nobody; the round is only timed)."""
        t0 = self.now
        drops = self.drops and dropping
        tl = Timeline(t0=t0)
        crypto_s = crypto_s or {}
        end = t0
        timed = zip(clients, up_bytes)
        if not drops and steps is None and len(clients) and len(up_bytes) == len(clients):
            # nobody can drop: every client's time at once, the same double operations in
            # the same order as the loop below (elementwise), one pass instead of k
            cl = np.asarray(clients, dtype=np.int64)
            at = t0 + self._wires(cl, float(down_bytes), self.down)
            at += self.compute[cl]
            if crypto_s:  # (none: the loop adds 0.0, which leaves these positive times alone)
                at += np.fromiter((float(crypto_s.get(c, 0.0)) for c in clients),
                                  dtype=float, count=len(cl)) / self.speed[cl]
            at += self._wires(cl, np.asarray(up_bytes, dtype=float), self.up)
            tl.done = dict(zip(clients, at.tolist()))
            end = max(end, float(at.max()))
            timed = zip((), ())
        for c, up in timed:
            comp = (float(self.compute[c]) if steps is None or c not in steps
                    else float(steps[c]) * self.ref / float(self.speed[c]))
            done = (t0 + self._wire(c, down_bytes, self.down) + comp
                    + float(crypto_s.get(c, 0.0)) / float(self.speed[c])
                    + self._wire(c, up, self.up))
            tl.done[c] = done
            if drops:
                off = self.avail[c].next_off(t0)
                if off < done:
                    tl.dropped[c] = ("offline", "masking", off)
                    end = max(end, off)
                    continue
                if self.deadline is not None and done > t0 + self.deadline:
                    tl.dropped[c] = ("deadline", "masking", t0 + self.deadline)
                    continue
            end = max(end, done)
        if self.deadline is not None and any(r == "deadline" for r, _, _ in tl.dropped.values()):
            end = t0 + self.deadline
        if self.deadline is not None:
            end = min(end, t0 + self.deadline)
        if not clients:  # nobody answered: the server tried the sampled clients once
            end = t0
        tl.upload_end = end
        if unmasking:  # one more round trip: the survivors send their unmasking shares
            rtt = 0.0
            for c in clients:
                if c in tl.dropped:
                    continue
                trip = 2 * float(self.latency[c])
                if drops and self.avail[c].next_off(tl.done[c]) < end + trip:
                    when = max(end, self.avail[c].next_off(tl.done[c]))
                    tl.dropped[c] = ("offline", "unmasking", when)
                rtt = max(rtt, trip)
            end += rtt
        tl.end = end
        return tl

    def close_round(self, tl: Timeline | None, *, unavailable: Sequence[int] = (),
                    contributors: Iterable[int] = (), server_s: float = 0.0,
                    client_crypto_s: float = 0.0, aborted: str | None = None,
                    round: int = 0, bytes_up: int = 0, bytes_down: int = 0,
                    compute_only: Sequence[int] | None = None) -> dict[str, Any]:
        """Advance the clock past the round; what its history entry gets."""
        start = self.now
        if compute_only is not None:  # pooled and isolated rounds: the longest party's training
            end = start + (max(float(self.compute[c]) for c in compute_only)
                           if len(compute_only) else 0.0)
        else:
            assert tl is not None
            end = tl.end
        end += float(server_s)
        self.crypto_s += float(server_s) + float(client_crypto_s)
        self.now = end
        self.per_round.append(end - start)
        self.bytes_up += int(bytes_up)
        self.bytes_down += int(bytes_down)
        for c in contributors:
            if c < len(self.participation):
                self.participation[c] += 1
        out: dict[str, Any] = {"clock_s": round_s(end),
                               "bytes": {"up": self.bytes_up, "down": self.bytes_down}}
        drops: dict[str, list[str]] = {}
        for c in unavailable:
            drops.setdefault("unavailable", []).append(self._name(c))
            self._count("unavailable", c)
        if tl is not None:
            for c, (reason, phase, _) in sorted(tl.dropped.items()):
                key = reason if phase == "masking" else "unmasking"
                drops.setdefault(key, []).append(self._name(c))
                self._count(key, c)
        if drops:
            out["dropouts"] = drops
        if aborted:
            self.aborted.append(int(round))
            out["aborted"] = aborted
        return out

    def _name(self, c: int) -> str:
        return self.names[c] if 0 <= c < len(self.names) else f"client-{c}"

    def _count(self, reason: str, c: int) -> None:
        self.dropouts[reason] = self.dropouts.get(reason, 0) + 1
        if 0 <= c < len(self.dropouts_by_site):
            self.dropouts_by_site[c] += 1

    # -- the record -------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """``metrics.clock`` (without ``time_to_target``, which the engine adds)."""
        presets: dict[str, int] = {}
        for p in self.profiles:
            presets[p.preset] = presets.get(p.preset, 0) + 1
        kinds: dict[str, Any] = {}
        for p in self.profiles:
            kinds.setdefault(p.preset, p.describe())
        return {
            "profile": self.label, "presets": presets, "preset_profiles": kinds,
            "card": self.card,
            "reference_step_s": self.ref, "reference_step": self.reference_source,
            "deadline_s": self.deadline, "total_s": round_s(self.now),
            "total_h": round(self.now / 3600.0, 6),
            "per_round_s": [round_s(x) for x in self.per_round],
            "participation": {self._name(i): int(v) for i, v in enumerate(self.participation)},
            "dropouts": int(sum(self.dropouts.values())),
            "dropouts_by_reason": dict(sorted(self.dropouts.items())),
            "dropouts_by_site": {self._name(i): int(v)
                                 for i, v in enumerate(self.dropouts_by_site) if v},
            "aborted_rounds": list(self.aborted),
            "crypto_s": round(self.crypto_s, 6),
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
        }


def round_s(x: float) -> float:
    """Virtual seconds as recorded: microsecond resolution."""
    return float(round(float(x), 6))


# --------------------------------------------------------------------------
# the asynchronous twin
# --------------------------------------------------------------------------


@dataclass
class Job:
    client: int
    version: int
    start: float
    arrival: float
    lost_at: float = math.inf
    trained: bool = False


@dataclass
class Buffered:
    client: int
    version: int
    arrival: float


class AsyncTwin(Twin):
    """The event simulation of an asynchronous protocol (FedBuff's buffer;
    FedAsync is a buffer of one).

    The server keeps ``concurrency`` clients training: it dispatches the
    current model to idle clients that are online (uniformly at random, from
    the cell seed), one for each that arrives or is lost; a client whose
    update waits in the buffer is not dispatched again before that update
    is applied. An arrival joins the buffer with its staleness (server
    updates since its model was sent); one staler than ``max_staleness``
    (when > 0) is discarded. ``buffer_size`` arrivals make one server
    update. A client that goes offline while training is lost. Upload and
    download times use the last message sizes the round saw (the model's
    size before the first).
    """

    def __init__(self, *, buffer_size: int, concurrency: int, max_staleness: int,
                 up_bytes: int, down_bytes: int, **kw: Any) -> None:
        super().__init__(**kw)
        from fedmedbench.federation import cell_rng

        self.K = int(buffer_size)
        self.M = int(concurrency)
        self.max_staleness = int(max_staleness)
        self.up_bytes = float(up_bytes)
        self.down_bytes = float(down_bytes)
        self.version = 0
        self.in_flight: dict[int, Job] = {}
        self.buffer: list[Buffered] = []
        self.waiting: set[int] = set()
        self._rng = cell_rng(kw["seed"], "async-dispatch")
        self._seq = 0
        self._events: list[tuple[float, int, str, int]] = []
        self.staleness: list[int] = []
        self.lost: list[int] = []
        self.discarded: list[int] = []
        self._started = False

    def _push(self, t: float, kind: str, c: int) -> None:
        import heapq

        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, c))

    def _dispatch(self, t: float) -> None:
        n = len(self.names)
        free = self.M - len(self.in_flight)
        if free <= 0:
            return
        idle = [c for c in range(n) if c not in self.in_flight and c not in self.waiting]
        if not idle:
            return
        online = [c for c in idle if self.avail[c].online(t)] if self.drops else idle
        if not online:  # try again when the first idle client comes online
            wake = min(self.avail[c].next_on(t) for c in idle)
            if math.isfinite(wake) and not any(k == "wake" for _, _, k, _ in self._events):
                self._push(wake, "wake", -1)
            return
        pick = (online if len(online) <= free
                else sorted(self._rng.choice(online, size=free, replace=False).tolist()))
        for c in pick:
            arrival = (t + self._wire(c, self.down_bytes, self.down) + float(self.compute[c])
                       + self._wire(c, self.up_bytes, self.up))
            job = Job(c, self.version, t, arrival)
            if self.drops:
                off = self.avail[c].next_off(t)
                if off < arrival:
                    job.lost_at = off
            self.in_flight[c] = job
            self._push(min(job.arrival, job.lost_at), "end", c)

    def next_buffer(self) -> tuple[list[Buffered], float]:
        """Run the events until the buffer holds ``buffer_size`` updates:
        (the buffered updates, the time the last one arrived)."""
        import heapq

        if not self._started:
            self._started = True
            self._dispatch(self.now)
        t = self.now
        while len(self.buffer) < self.K:
            if not self._events:
                raise RuntimeError(
                    f"the asynchronous protocol has no client left to wait for (concurrency "
                    f"{self.M}, buffer {self.K}, {len(self.names)} clients, every idle "
                    f"client offline for good); lower buffer_size or use a network whose "
                    f"sites come back online")
            t, _, kind, c = heapq.heappop(self._events)
            if kind == "wake":
                self._dispatch(t)
                continue
            job = self.in_flight.pop(c)
            if job.lost_at <= job.arrival:
                self.lost.append(c)
                self._count("offline", c)
            else:
                tau = self.version - job.version
                if self.max_staleness and tau > self.max_staleness:
                    self.discarded.append(c)
                    self._count("stale", c)
                else:
                    self.buffer.append(Buffered(c, job.version, t))
                    self.waiting.add(c)
            self._dispatch(t)
        return list(self.buffer), t

    def to_train(self, version: int) -> list[int]:
        """The clients training from the model of ``version`` (still on their
        way, or waiting in the buffer), in client order: final once the next
        buffer is full, when they train together (one window)."""
        live = {c for c, j in self.in_flight.items() if j.version == version}
        live |= {e.client for e in self.buffer if e.version == version}
        return sorted(live)

    def in_flight_since(self, c: int) -> int | None:
        """The version the training client ``c`` was sent, or ``None``."""
        job = self.in_flight.get(c)
        return None if job is None else job.version

    def observe_down(self, per_client_bytes: int) -> None:
        """The bytes a dispatch carried: the next dispatches' download size."""
        self.down_bytes = float(per_client_bytes)

    def observe_up(self, row_bytes: Sequence[int]) -> None:
        """The bytes the last buffer's clients sent: the next arrivals' upload size."""
        if len(row_bytes):
            self.up_bytes = float(np.mean(row_bytes))

    def applied(self, entries: Sequence[Buffered], t: float, *, server_s: float = 0.0,
                bytes_up: int = 0, bytes_down: int = 0, aborted: str | None = None,
                round: int = 0, contributors: Iterable[int] = ()) -> dict[str, Any]:
        """The server update of ``entries`` at ``t``: advance the version,
        free the buffered clients, dispatch to fill the free slots."""
        start = self.now
        end = t + float(server_s)
        self.crypto_s += float(server_s)
        self.now = end
        self.per_round.append(end - start)
        self.bytes_up += int(bytes_up)
        self.bytes_down += int(bytes_down)
        for c in contributors:
            self.participation[c] += 1
        taus = [self.version - e.version for e in entries]
        self.staleness += taus
        self.version += 1
        self.buffer = []
        self.waiting = set()
        out: dict[str, Any] = {"clock_s": round_s(end),
                               "bytes": {"up": self.bytes_up, "down": self.bytes_down},
                               "staleness": {"mean": float(np.mean(taus)) if taus else 0.0,
                                             "max": int(max(taus)) if taus else 0}}
        drops: dict[str, list[str]] = {}
        for c in self.lost:
            drops.setdefault("offline", []).append(self._name(c))
        for c in self.discarded:
            drops.setdefault("stale", []).append(self._name(c))
        self.lost, self.discarded = [], []
        if drops:
            out["dropouts"] = drops
        if aborted:
            self.aborted.append(int(round))
            out["aborted"] = aborted
        self._dispatch(end)
        return out

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        taus = np.asarray(self.staleness, dtype=float)
        hist: dict[str, int] = {}
        for v in self.staleness:
            hist[str(v)] = hist.get(str(v), 0) + 1
        out["async"] = {"buffer_size": self.K, "concurrency": self.M,
                        "max_staleness": self.max_staleness or None}
        out["staleness"] = {"mean": float(taus.mean()) if taus.size else 0.0,
                            "max": int(taus.max()) if taus.size else 0,
                            "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0])))}
        return out


# --------------------------------------------------------------------------
# building the twin of a cell
# --------------------------------------------------------------------------


def profiles_of(network: Network, names: Sequence[str], num_examples: Sequence[int],
                seed: int) -> list[SiteProfile]:
    """The network's profiles, checked (one :class:`SiteProfile` per party)."""
    from fedmedbench.errors import PluginError
    from fedmedbench.federation import cell_rng
    from fedmedbench.meters import calling

    with calling(network, "profiles"):
        got = list(network.profiles(list(names), list(num_examples),
                                    cell_rng(seed, "network-profiles")))
    if len(got) != len(names) or not all(isinstance(p, SiteProfile) for p in got):
        raise PluginError(f"profiles() returned {len(got)} value(s) for {len(names)} training "
                          f"parties; return one fedmedbench.components.SiteProfile per party",
                          plugin=network.plugin or type(network).__module__,
                          component=network.name or "network", hook="profiles",
                          exc_type="TypeError")
    return got


def network_label(cfg: Mapping[str, Any] | None) -> str:
    """The network as the record names it: ``uniform`` when the config has none."""
    if not cfg:
        return "uniform"
    extra = {k: v for k, v in cfg.items() if k != "name"}
    if not extra:
        return str(cfg["name"])
    return f"{cfg['name']}({','.join(f'{k}={v}' for k, v in sorted(extra.items()))})"


# --------------------------------------------------------------------------
# time to target
# --------------------------------------------------------------------------


def time_to_target(record_or_history: Any, target: float) -> dict[str, Any]:
    """When a run first reached ``target`` utility (``>=``): ``{"target",
    "reached", "round", "clock_s", "bytes"}`` from its history (rounds with
    a utility only; ``eval_every`` > 1 reads the evaluated rounds)."""
    hist = (record_or_history.get("history", []) if isinstance(record_or_history, Mapping)
            else record_or_history)
    for h in hist or []:
        u = h.get("utility")
        if u is None or (isinstance(u, float) and math.isnan(u)):
            continue
        if u >= target:
            b = h.get("bytes") or {}
            return {"target": float(target), "reached": True, "round": int(h["round"]),
                    "clock_s": h.get("clock_s"),
                    "bytes": int(b.get("up", 0)) + int(b.get("down", 0)) if b else None}
    return {"target": float(target), "reached": False, "round": None, "clock_s": None,
            "bytes": None}


def cell_targets(history: Sequence[Mapping[str, Any]], *, targets: Sequence[float] = (),
                 fraction: float = DEFAULT_TARGET_FRACTION,
                 pooled_baseline: float | None = None, budget_s: float | None = None
                 ) -> dict[str, Any]:
    """A record's ``metrics.clock.time_to_target`` block."""
    out: dict[str, Any] = {"fraction": float(fraction), "pooled_baseline": pooled_baseline}
    if pooled_baseline is not None:
        out["pooled"] = time_to_target(history, float(fraction) * float(pooled_baseline))
    else:
        out["pooled"] = None
        out["resolved_by"] = (
            "fedmedbench.clock.resolve_time_to_target(records): the pooled baseline is the "
            "final utility of the centralized record of the same dataset, partitioner, "
            "model, run settings and seed (a cell does not train it); or give [evaluate] "
            "pooled_baseline")
    if targets:
        out["targets"] = {f"{float(t):g}": time_to_target(history, float(t)) for t in targets}
    if budget_s is not None:
        out["budget_s"] = float(budget_s)
        for v in [out.get("pooled"), *(out.get("targets") or {}).values()]:
            if isinstance(v, dict):
                v["within_budget"] = bool(v["reached"] and v["clock_s"] is not None
                                          and v["clock_s"] <= budget_s)
    return out


def _pool_key(rec: Mapping[str, Any]) -> str:
    cfg = rec.get("config") or {}
    keep = {k: cfg.get(k) for k in ("dataset", "partitioner", "model", "run", "seed")}
    run = dict(keep.get("run") or {})
    run.pop("clients_per_round", None)  # the pooled party trains at the cell's rate anyway
    run.pop("client_sampling", None)
    keep["run"] = run
    return json.dumps(keep, sort_keys=True, default=str)


def resolve_time_to_target(records: Sequence[dict[str, Any]], *,
                           fraction: float | None = None) -> list[dict[str, Any]]:
    """Fill ``metrics.clock.time_to_target.pooled`` of each record (in place)
    from the final utility of the pooled baseline read with it: the ``ok``
    record of protocol ``pooled`` with the same dataset, partitioner, model,
    run settings (clients per round and client sampling aside) and seed.
    Records without such a partner keep ``pooled = None``. Returns the
    records."""
    pooled: dict[str, float] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("protocol") == "pooled":
            u = ((r.get("metrics") or {}).get("utility") or {}).get("global")
            if isinstance(u, (int, float)):
                pooled[_pool_key(r)] = float(u)
    for r in records:
        clock = (r.get("metrics") or {}).get("clock")
        if not isinstance(clock, dict):
            continue
        ttt = clock.setdefault("time_to_target", {})
        base = pooled.get(_pool_key(r))
        if base is None:
            continue
        f = float(fraction if fraction is not None else ttt.get("fraction",
                                                                DEFAULT_TARGET_FRACTION))
        ttt.update(fraction=f, pooled_baseline=base,
                   pooled=time_to_target(r.get("history", []), f * base))
        ttt.pop("resolved_by", None)
    return list(records)


def completion_probability(records: Sequence[Mapping[str, Any]], *, budget_s: float,
                           target: float | None = None,
                           fraction: float | None = None) -> dict[str, dict[str, Any]]:
    """Per cell over seeds (records grouped by config without the seed): the
    fraction of seeds that reached the target within ``budget_s`` virtual
    seconds. The target is ``target`` (a utility) or, with ``fraction``, that
    fraction of each record's resolved pooled baseline
    (:func:`resolve_time_to_target`). Returns ``{group label: {"p", "seeds",
    "reached", "times_s"}}``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        cfg = {k: v for k, v in (r.get("config") or {}).items() if k != "seed"}
        lab = r.get("labels") or {}
        order = ("dataset", "partitioner", "model", "algorithm", "aggregator", "privacy",
                 "compressor", "adversary", "network")
        shown = [str(lab[a]) for a in order if a in lab
                 and lab[a] not in ("none", "default", "weighted-mean", "uniform")]
        shown += [str(v) for k, v in sorted(lab.items()) if k not in order]
        key = " / ".join(shown) if lab else json.dumps(cfg, sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for key, recs in groups.items():
        times: list[float | None] = []
        for r in recs:
            if target is not None:
                t = time_to_target(r, target)
            else:
                ttt = ((r.get("metrics") or {}).get("clock") or {}).get("time_to_target") or {}
                base = ttt.get("pooled_baseline")
                if base is None:
                    times.append(None)
                    continue
                f = fraction if fraction is not None else ttt.get("fraction",
                                                                   DEFAULT_TARGET_FRACTION)
                t = time_to_target(r, float(f) * float(base))
            times.append(t["clock_s"] if t["reached"] else None)
        ok = [x for x in times if x is not None and x <= budget_s]
        out[key] = {"p": len(ok) / len(times) if times else float("nan"), "seeds": len(times),
                    "reached": sum(x is not None for x in times), "times_s": times,
                    "budget_s": float(budget_s)}
    return out


# --------------------------------------------------------------------------
# the twin of a built cell
# --------------------------------------------------------------------------


def twin_of(cell: Any) -> Twin | None:
    """The virtual clock of a built cell (:class:`fedmedbench.cell.Cell`), or
    ``None`` when its twin is off (``network = "none"``)."""
    net = cell.network
    if net is None:
        return None
    ctx = cell.clients_ctx
    names = list(ctx.client_names)
    profiles = list(cell.site_profiles)
    n_real = len(profiles)
    # an audit's canary clients: synthesized updates, no compute, no link, always there
    profiles += [SiteProfile(preset="canary") for _ in range(len(names) - n_real)]
    rounds = max(1, int(ctx.rounds))
    steps = [s / rounds for s in ctx.steps_of(range(n_real), planned=True)] + [0.0] * (
        len(names) - n_real)
    if net.reference_step_s is not None:
        ref, source = float(net.reference_step_s), "pinned"
    else:
        task = cell.data.task
        ref, source = reference_step(cell.factory, input_shape=task.input_shape,
                                     num_classes=task.num_classes, settings=cell.settings,
                                     spec=cell.model_spec)
    card = net.card if isinstance(net.card, dict) else {}
    common: dict[str, Any] = dict(label=cell.network_label, names=names, profiles=profiles,
                                  steps=steps, reference_step_s=ref, reference_source=source,
                                  deadline_s=net.deadline_s, seed=cell.seed, card=card)
    if cell.buffer_plan is not None:
        K, M, S = cell.buffer_plan
        model_bytes = 4 * cell.sharing.numel + (
            4 * cell.sharing.buffer_numel if cell.sharing.buffers == "sent" else 0)
        return AsyncTwin(buffer_size=K, concurrency=M, max_staleness=S, up_bytes=model_bytes,
                         down_bytes=model_bytes, **common)
    return Twin(**common)


def clock_record(twin: Twin, history: Sequence[Mapping[str, Any]], *,
                 settings: Mapping[str, Any] | None = None,
                 accounting: Mapping[str, Any] | None = None,
                 asynchronous: bool = False) -> dict[str, Any]:
    """The record's ``metrics.clock``: the twin's summary with the time to
    target (``settings``: the cell's ``[evaluate]`` clock settings) and, for
    an asynchronous protocol under DP, which ε claims do not carry over."""
    s = dict(settings or {})
    out = twin.summary()
    out["time_to_target"] = cell_targets(
        history, targets=s.get("targets", ()),
        fraction=float(s.get("target_fraction", DEFAULT_TARGET_FRACTION)),
        pooled_baseline=s.get("pooled_baseline"), budget_s=s.get("budget_s"))
    if asynchronous and accounting:
        amplified = sorted({adv for m in (accounting.get("mechanisms") or {}).values()
                            if isinstance(m, dict)
                            for adv, g in (m.get("adversaries") or {}).items()
                            if isinstance(g, dict) and g.get("amplified")})
        if amplified:
            out["privacy_note"] = (
                f"the ε against {', '.join(amplified)} assumes amplification by Poisson "
                f"sampling of clients; under an asynchronous protocol who reaches a buffer "
                f"follows the clock (speed, links, availability), not a Poisson sample, so "
                f"that amplification is not established here; the ε of an adversary "
                f"without amplification (the server under secure aggregation) composes each "
                f"client's actual buffers and holds")
    return out
