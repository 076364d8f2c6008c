"""Site profiles of hospital networks: the presets of the twin's ``network`` axis.

Each preset gives every site one profile (compute speed relative to this
machine, uplink and downlink, latency, an on/off availability process); its
``card`` says where each number comes from, and which are assumptions.
``hospital-mix`` deals the three hospital presets out over the sites;
``uniform`` (the default) is this machine's speed, links of no transfer time
and always online: it changes no result.

Sources (stated per preset on its card):

- FCC, *Health Care Broadband in America*, OBI Technical Paper No. 5 (August
  2010), and the ONC's minimum broadband recommendations that follow it
  (HealthIT.gov): 1,000 Mbit/s for an academic or large medical center,
  100 Mbit/s for a hospital, 10 Mbit/s for a small practice or rural health
  clinic. These are recommended connection sizes; the presets use them as
  the link.
- OpenSignal, *The State of LTE* (November 2016): a global average LTE
  download of 17.4 Mbit/s; 4G availability ("time on LTE") mostly 60-90 %.
- The breast-MRI federation of issue 21 (MediSwarm on NVFlare): a 15-hour
  run aborted by a VPN drop of about 6 minutes: the community hospital's
  mean outage.

Compute speeds, latencies and outage frequencies are assumptions (stated as
such on the cards): no public survey measures them for hospitals' FL nodes.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np

from fedmedbench import Availability, Network, Range, SiteProfile

FCC = ("FCC, Health Care Broadband in America, OBI Technical Paper No. 5 (Aug. 2010), and the "
       "ONC's minimum broadband recommendations for health care (HealthIT.gov)")
OPENSIGNAL = "OpenSignal, The State of LTE (Nov. 2016): global average LTE download 17.4 Mbit/s"
MEDISWARM = ("issue 21: a breast-MRI federation of 8 sites (MediSwarm on NVFlare) aborted a "
             "15-hour run on a ~6-minute VPN drop")

#: the presets' numbers and their sources
PRESETS: dict[str, dict[str, Any]] = {
    "academic-hospital": {
        "speed": 4.0, "up_mbps": 1000.0, "down_mbps": 1000.0, "latency_ms": 10.0,
        "mean_up_h": 720.0, "mean_down_min": 30.0,
        "sources": {
            "up_mbps, down_mbps": f"{FCC}: 1,000 Mbit/s for an academic or large medical center",
            "speed": "assumption: a multi-core research server, 4x one core of this machine",
            "latency_ms": "assumption: 10 ms one way on a research network",
            "mean_up_h, mean_down_min": "assumption: a maintenance window of 30 min a month",
        }},
    "community-hospital": {
        "speed": 1.0, "up_mbps": 100.0, "down_mbps": 100.0, "latency_ms": 30.0,
        "mean_up_h": 12.0, "mean_down_min": 6.0,
        "sources": {
            "up_mbps, down_mbps": f"{FCC}: 100 Mbit/s for a hospital",
            "speed": "assumption: one server core like this machine's",
            "latency_ms": "assumption: 30 ms one way over a site-to-site VPN",
            "mean_down_min": f"{MEDISWARM}: a mean outage of 6 minutes",
            "mean_up_h": "assumption: two VPN drops a day",
        }},
    "clinic-mobile": {
        "speed": 0.25, "up_mbps": 5.0, "down_mbps": 17.4, "latency_ms": 50.0,
        "mean_up_h": 2.0, "mean_down_min": 20.0,
        "sources": {
            "down_mbps": OPENSIGNAL,
            "up_mbps": "assumption: LTE upload about a third of download",
            "speed": "assumption: an office desktop, a quarter of this machine's core",
            "latency_ms": "assumption: 50 ms one way on LTE",
            "mean_up_h, mean_down_min": f"{OPENSIGNAL}; 4G available 60-90 % of the time: "
                                        f"2 h online and 20 min off (86 %) is an assumption "
                                        f"in that range",
        }},
}


def _card(preset: str) -> dict[str, Any]:
    p = PRESETS[preset]
    return {"preset": preset, "values": {k: v for k, v in p.items() if k != "sources"},
            "sources": dict(p["sources"])}


def read_trace(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Online intervals by site from a CSV file with a header ``site,start_s,end_s``
    (one row per online period, seconds from the start of training; ``site``
    a site name or a 0-based site index)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"availability trace {p}: cannot read it ({exc.strerror or exc}); give "
                         f"a CSV file with the header site,start_s,end_s") from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"site", "start_s", "end_s"} <= set(rows[0]):
        raise ValueError(f"availability trace {p}: expected a CSV header site,start_s,end_s "
                         f"and one row per online period")
    out: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(rows, 2):
        try:
            a, b = float(r["start_s"]), float(r["end_s"])
        except (TypeError, ValueError):
            raise ValueError(f"availability trace {p} line {i}: start_s and end_s must be "
                             f"numbers, got {r['start_s']!r}, {r['end_s']!r}") from None
        if not (math.isfinite(a) and math.isfinite(b) and b > a >= 0):
            raise ValueError(f"availability trace {p} line {i}: an online period needs "
                             f"0 <= start_s < end_s, got {a}, {b}")
        out.setdefault(str(r["site"]).strip(), []).append((a, b))
    return {k: sorted(v) for k, v in out.items()}


def _merged(intervals: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


class Uniform(Network):
    """Every site at this machine's speed, with links of no transfer time,
    always online, no deadline: the default network, which changes no result.

    Parameters
    ----------
    reference_step_s : float or None, default None
        Pin the reference step time (seconds); ``None`` measures it here.
    """

    name = "uniform"
    card: ClassVar[dict[str, Any]] = {
        "preset": "uniform", "sources": {"all": "no network: results as without a clock; "
                                                "the clock counts compute and cryptography"}}

    def __init__(self, *, reference_step_s: Annotated[float | None, Range(gt=0)] = None
                 ) -> None:
        self.reference_step_s = reference_step_s


class _Preset(Network):
    """One hospital preset on every site (the subclasses' docstrings)."""

    preset: ClassVar[str] = ""

    def _set(self, *, speed: float, up_mbps: float, down_mbps: float, latency_ms: float,
             mean_up_h: float, mean_down_min: float, trace: str | None,
             deadline_s: float | None, reference_step_s: float | None) -> None:
        self.speed = float(speed)
        self.up_mbps = float(up_mbps)
        self.down_mbps = float(down_mbps)
        self.latency_ms = float(latency_ms)
        self.mean_up_h = float(mean_up_h)
        self.mean_down_min = float(mean_down_min)
        self.trace = trace
        self.deadline_s = None if deadline_s is None else float(deadline_s)
        self.reference_step_s = None if reference_step_s is None else float(reference_step_s)
        self._trace: dict[str, list[tuple[float, float]]] | None = (
            read_trace(trace) if trace else None)

    @property
    def card(self) -> dict[str, Any]:  # type: ignore[override]
        out = _card(self.preset)
        given = {k: getattr(self, k) for k in out["values"] if getattr(self, k) !=
                 PRESETS[self.preset][k]}
        if given:
            out["overridden"] = given
        if self.trace:
            out["trace"] = str(self.trace)
        return out

    def profile(self, availability: Availability | None = None) -> SiteProfile:
        if availability is None:
            availability = (Availability() if self.mean_down_min == 0 else Availability(
                "onoff", mean_up_s=self.mean_up_h * 3600.0,
                mean_down_s=self.mean_down_min * 60.0))
        return SiteProfile(speed=self.speed, up_mbps=self.up_mbps, down_mbps=self.down_mbps,
                           latency_ms=self.latency_ms, availability=availability,
                           preset=self.preset)

    def profiles(self, names: Sequence[str], num_examples: Sequence[int],
                 rng: np.random.Generator) -> list[SiteProfile]:
        if self._trace is None:
            p = self.profile()
            return [p for _ in names]
        return [self.profile(_trace_for(self._trace, name, i)) for i, name in enumerate(names)]


def _trace_for(trace: dict[str, list[tuple[float, float]]], name: str, i: int) -> Availability:
    """A site's intervals: by its name, else by its index, else the traced
    sites' in turn (site i takes the (i mod m)-th); repeated every period
    (the end of the last online period in the file)."""
    keys = sorted(trace)
    iv = trace.get(name) or trace.get(str(i)) or trace[keys[i % len(keys)]]
    period = max(b for v in trace.values() for _, b in v)
    return Availability("trace", intervals=_merged(iv), period_s=period)


class AcademicHospital(_Preset):
    """An academic medical center: a fast compute node, a 1 Gbit/s link,
    rarely offline (its ``card`` gives the sources).

    Parameters
    ----------
    speed : float, default 4.0
        Compute speed relative to this machine.
    up_mbps, down_mbps : float, default 1000.0
        Link in Mbit/s (``inf``: no transfer time).
    latency_ms : float, default 10.0
        One-way latency.
    mean_up_h : float, default 720.0
        Mean online period in hours (``inf``: always online).
    mean_down_min : float, default 30.0
        Mean outage in minutes (0: always online).
    trace : str or None, default None
        A CSV file of online periods (``site,start_s,end_s``) instead of the
        on/off process.
    deadline_s : float or None, default None
        Synchronous rounds end after this many virtual seconds; later clients drop out.
    reference_step_s : float or None, default None
        Pin the reference step time instead of measuring it here.
    """

    name = "academic-hospital"
    preset = "academic-hospital"

    def __init__(self, *, speed: Annotated[float, Range(gt=0)] = 4.0,
                 up_mbps: Annotated[float, Range(gt=0, allow_inf=True)] = 1000.0,
                 down_mbps: Annotated[float, Range(gt=0, allow_inf=True)] = 1000.0,
                 latency_ms: Annotated[float, Range(ge=0)] = 10.0,
                 mean_up_h: Annotated[float, Range(gt=0, allow_inf=True)] = 720.0,
                 mean_down_min: Annotated[float, Range(ge=0)] = 30.0,
                 trace: str | None = None,
                 deadline_s: Annotated[float | None, Range(gt=0)] = None,
                 reference_step_s: Annotated[float | None, Range(gt=0)] = None) -> None:
        self._set(speed=speed, up_mbps=up_mbps, down_mbps=down_mbps, latency_ms=latency_ms,
                  mean_up_h=mean_up_h, mean_down_min=mean_down_min, trace=trace,
                  deadline_s=deadline_s, reference_step_s=reference_step_s)


class CommunityHospital(_Preset):
    """A community hospital: one server core, a 100 Mbit/s link over a VPN
    that drops twice a day for about 6 minutes (its ``card`` gives the sources).

    Parameters
    ----------
    speed : float, default 1.0
    up_mbps, down_mbps : float, default 100.0
    latency_ms : float, default 30.0
    mean_up_h : float, default 12.0
    mean_down_min : float, default 6.0
    trace : str or None, default None
    deadline_s : float or None, default None
    reference_step_s : float or None, default None
        As for ``academic-hospital``.
    """

    name = "community-hospital"
    preset = "community-hospital"

    def __init__(self, *, speed: Annotated[float, Range(gt=0)] = 1.0,
                 up_mbps: Annotated[float, Range(gt=0, allow_inf=True)] = 100.0,
                 down_mbps: Annotated[float, Range(gt=0, allow_inf=True)] = 100.0,
                 latency_ms: Annotated[float, Range(ge=0)] = 30.0,
                 mean_up_h: Annotated[float, Range(gt=0, allow_inf=True)] = 12.0,
                 mean_down_min: Annotated[float, Range(ge=0)] = 6.0,
                 trace: str | None = None,
                 deadline_s: Annotated[float | None, Range(gt=0)] = None,
                 reference_step_s: Annotated[float | None, Range(gt=0)] = None) -> None:
        self._set(speed=speed, up_mbps=up_mbps, down_mbps=down_mbps, latency_ms=latency_ms,
                  mean_up_h=mean_up_h, mean_down_min=mean_down_min, trace=trace,
                  deadline_s=deadline_s, reference_step_s=reference_step_s)


class ClinicMobile(_Preset):
    """A clinic on a mobile (LTE) link: a desktop computer, 17.4 Mbit/s down
    and 5 Mbit/s up, offline about 14 % of the time (its ``card`` gives the
    sources).

    Parameters
    ----------
    speed : float, default 0.25
    up_mbps : float, default 5.0
    down_mbps : float, default 17.4
    latency_ms : float, default 50.0
    mean_up_h : float, default 2.0
    mean_down_min : float, default 20.0
    trace : str or None, default None
    deadline_s : float or None, default None
    reference_step_s : float or None, default None
        As for ``academic-hospital``.
    """

    name = "clinic-mobile"
    preset = "clinic-mobile"

    def __init__(self, *, speed: Annotated[float, Range(gt=0)] = 0.25,
                 up_mbps: Annotated[float, Range(gt=0, allow_inf=True)] = 5.0,
                 down_mbps: Annotated[float, Range(gt=0, allow_inf=True)] = 17.4,
                 latency_ms: Annotated[float, Range(ge=0)] = 50.0,
                 mean_up_h: Annotated[float, Range(gt=0, allow_inf=True)] = 2.0,
                 mean_down_min: Annotated[float, Range(ge=0)] = 20.0,
                 trace: str | None = None,
                 deadline_s: Annotated[float | None, Range(gt=0)] = None,
                 reference_step_s: Annotated[float | None, Range(gt=0)] = None) -> None:
        self._set(speed=speed, up_mbps=up_mbps, down_mbps=down_mbps, latency_ms=latency_ms,
                  mean_up_h=mean_up_h, mean_down_min=mean_down_min, trace=trace,
                  deadline_s=deadline_s, reference_step_s=reference_step_s)


class HospitalMix(Network):
    """The three hospital presets dealt out over the sites.

    Each site is an academic hospital, a community hospital or a clinic on a
    mobile link, drawn with the cell seed in the given proportions
    (``assign = "random"``), or by size (``"size"``: the largest sites are
    the academic hospitals, the smallest the clinics, in the proportions).

    Parameters
    ----------
    academic, community, clinic : float, default 0.2, 0.5, 0.3
        Proportions (normalised to sum to 1).
    assign : {"random", "size"}, default "random"
    time_scale : float, default 1.0
        Multiplies every preset's mean online and offline periods (below 1:
        outages more often, for short runs).
    outages : bool, default True
        ``False``: every site always online (stragglers, no outages).
    deadline_s : float or None, default None
        Synchronous rounds end after this many virtual seconds; later clients drop out.
    reference_step_s : float or None, default None
        Pin the reference step time instead of measuring it here.
    """

    name = "hospital-mix"

    def __init__(self, *, academic: Annotated[float, Range(ge=0)] = 0.2,
                 community: Annotated[float, Range(ge=0)] = 0.5,
                 clinic: Annotated[float, Range(ge=0)] = 0.3,
                 assign: Literal["random", "size"] = "random",
                 time_scale: Annotated[float, Range(gt=0)] = 1.0, outages: bool = True,
                 deadline_s: Annotated[float | None, Range(gt=0)] = None,
                 reference_step_s: Annotated[float | None, Range(gt=0)] = None) -> None:
        if not academic + community + clinic > 0:
            raise ValueError("academic + community + clinic must be > 0 (proportions of sites)")
        self.academic, self.community, self.clinic = float(academic), float(community), \
            float(clinic)
        self.assign = assign
        self.time_scale = float(time_scale)
        self.outages = bool(outages)
        self.deadline_s = None if deadline_s is None else float(deadline_s)
        self.reference_step_s = None if reference_step_s is None else float(reference_step_s)

    @property
    def card(self) -> dict[str, Any]:  # type: ignore[override]
        return {"mix": {"academic-hospital": self.academic,
                        "community-hospital": self.community, "clinic-mobile": self.clinic},
                "assign": self.assign, "time_scale": self.time_scale, "outages": self.outages,
                "presets": {k: _card(k) for k in PRESETS}}

    def _profile(self, preset: str) -> SiteProfile:
        p = PRESETS[preset]
        scale = self.time_scale
        avail = Availability("onoff", mean_up_s=p["mean_up_h"] * 3600.0 * scale,
                             mean_down_s=p["mean_down_min"] * 60.0 * scale) \
            if self.outages else Availability()
        return SiteProfile(speed=p["speed"], up_mbps=p["up_mbps"], down_mbps=p["down_mbps"],
                           latency_ms=p["latency_ms"], preset=preset, availability=avail)

    def profiles(self, names: Sequence[str], num_examples: Sequence[int],
                 rng: np.random.Generator) -> list[SiteProfile]:
        kinds = list(PRESETS)
        w = np.array([self.academic, self.community, self.clinic], dtype=float)
        w = w / w.sum()
        n = len(names)
        if self.assign == "random":
            pick = rng.choice(len(kinds), size=n, p=w)
        else:  # by size: largest first get the first kind, in the proportions
            order = np.argsort(-np.asarray(num_examples, dtype=float), kind="stable")
            cuts = np.round(np.cumsum(w) * n).astype(int)
            pick = np.empty(n, dtype=int)
            for rank, site in enumerate(order):
                pick[site] = int(np.searchsorted(cuts, rank, side="right"))
            pick = np.minimum(pick, len(kinds) - 1)
        profiles = {k: self._profile(k) for k in kinds}
        return [profiles[kinds[int(j)]] for j in pick]


COMPONENTS = (Uniform, AcademicHospital, CommunityHospital, ClinicMobile, HospitalMix)
