"""Figures of a report (matplotlib, Agg canvas; PNG and SVG).

Per dataset:

- ``<dataset>-tradeoff``: the privacy–utility–cost view. Utility against ε
  (log scale) with one panel per unit of protection — sample-level ε (one
  patient record, ``dp-sgd``) and client-level ε (a whole hospital,
  ``dp-fedavg``) never share an axis — and utility against bytes per round
  (log scale). Colour is the method, the marker is the privacy mechanism
  (each mechanism its own series, joined across its ε values); entries
  without a DP guarantee sit at "no DP", entries that send nothing at
  "nothing sent".
- ``<dataset>-attacks``: attack success (the first metric of
  :data:`fedmedbench.report.ATTACK_HEADLINE` an attack reports: AUC for
  membership inference, PSNR for gradient inversion) against ε, one panel
  per attack and unit, the same colours and markers, with the chance or
  recognisability line.
- ``<dataset>-convergence``: utility and training loss per round, one
  colour per entry.
- ``<dataset>-sites``: per-site utility: a dot per site and entry, sites
  sorted by utility, up to :data:`fedmedbench.report.MAX_SITE_COLUMNS`
  sites; past that a distribution per entry (box and points) with the worst
  site named, so 50 or 500 hospitals stay legible at one size.
- ``<dataset>-reconstructions``: gradient-inversion reconstructions under the
  originals, where attack records name PNG files inside the results folder
  (keys containing ``orig`` and ``recon``, as lists of paths or a list of
  ``{original, reconstruction}`` objects, or one ready grid under ``images``
  with the originals on top, as the built-in gradient-inversion attacks save;
  see :func:`fedmedbench.report.record_image` for what is read).

Labels are the tables' short labels (the report's legend maps each to its
full configuration). Every figure is laid out by matplotlib's constrained
layout within at most :data:`MAX_WIDTH_IN` inches, so no text falls outside
it and the HTML page shows it at full size. Output is deterministic for the
same records (SVG ids are salted with a constant and no dates are written),
so reports of shards and of a whole run compare byte for byte.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.axes
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from fedmedbench.report import (
    ATTACK_HEADLINE,
    MAX_SITE_COLUMNS,
    ReportData,
    build,
    fmt_bytes,
    record_image,
)

RC = {"svg.hashsalt": "fedmedbench", "svg.fonttype": "path", "font.size": 9,
      "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": 8,
      "axes.titlesize": 9, "figure.titlesize": 10}
#: entries (method × privacy) drawn per figure before it keeps the top ones by utility
MAX_ENTRIES = 10
#: the widest figure, in inches (the HTML page shows figures at full size up to ~12 in)
MAX_WIDTH_IN = 10.5
LINE_STYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
#: what a unit of ε protects, for axis labels
UNIT_TEXT = {"record": "sample-level ε (per patient record)",
             "client": "client-level ε (per hospital)"}
#: a horizontal box plot (``orientation`` replaced ``vert`` in matplotlib 3.10)
HORIZONTAL = ({"orientation": "horizontal"} if "orientation" in
              inspect.signature(matplotlib.axes.Axes.boxplot).parameters else {"vert": False})
#: reference lines of attack metrics: (value, what it means)
REFERENCE = {"auc": (0.5, "chance"), "advantage": (0.0, "chance"),
             "balanced_accuracy": (0.5, "chance"), "psnr": (25.0, "recognisable above")}


def slug(s: str) -> str:
    """A file-name-safe stem for a dataset name (a hash keeps odd names apart)."""
    base = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "dataset"
    if base != s:
        base += "-" + hashlib.sha256(s.encode()).hexdigest()[:6]
    return base


# -- encodings shared by the figures of a dataset ------------------------------------


def palette(n: int) -> list[Any]:
    """``n`` distinct colours: tab10 up to 10, tab20 (pairs reordered so that
    neighbours differ) up to 20, then tab20 again."""
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    cmap = matplotlib.colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [cmap(order[i % 20]) for i in range(n)]


def mechanism(privacy: str) -> str:
    """A privacy label without parameters: ``dp-fedavg[ε=8,C=1]+secagg`` →
    ``dp-fedavg+secagg`` (a series of the trade-off figures)."""
    out, depth = [], 0
    for ch in str(privacy):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out) or str(privacy)


class Encoding:
    """How the trade-off figures of a dataset draw an entry: the marker is
    its privacy mechanism; the colour its method or, when the dataset has a
    single method, its mechanism too (so that every series has a colour of
    its own). A series is a (method, mechanism) pair; each has a fixed
    horizontal offset so that equal points stay apart."""

    def __init__(self, data: ReportData, ds: str) -> None:
        s = data.summary[data.summary["dataset"] == ds]
        self.methods = list(dict.fromkeys(s["method"]))
        self.mechs = sorted({mechanism(p) for p in s["privacy"]},
                            key=lambda m: (m != "none", m))
        self.marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(self.mechs)}
        self.by_mechanism = len(self.methods) == 1
        keys = self.mechs if self.by_mechanism else self.methods
        self.color = dict(zip(keys, palette(len(keys))))
        self.series = list(dict.fromkeys(zip(s["method"], map(mechanism, s["privacy"]))))

    def color_of(self, method: str, mech: str) -> Any:
        return self.color.get(mech if self.by_mechanism else method, "0.3")

    def style(self, method: str, mech: str) -> dict[str, Any]:
        return {"color": self.color_of(method, mech), "marker": self.marker.get(mech, "o"),
                "ms": 6, "mec": "white", "mew": 0.6}

    def dodge(self, method: str, mech: str, step: float) -> float:
        k = self.series.index((method, mech)) if (method, mech) in self.series else 0
        return _dodge(k, len(self.series), step)

    def legend(self, fig: Figure, series: list[tuple[str, str]]) -> None:
        """One legend under the panels, for the series drawn."""
        methods = [m for m in self.methods if m in {x for x, _ in series}]
        mechs = [m for m in self.mechs if m in {x for _, x in series}]
        if self.by_mechanism:
            handles = [Line2D([], [], ls="-", lw=1.2, label=f"privacy: {m}",
                              **self.style(self.methods[0], m)) for m in mechs]
            heading = f"{self.methods[0]}; colour and marker: privacy mechanism"
        else:
            handles = [Line2D([], [], color=self.color[m], marker="o", ls="-", lw=1.5, ms=5,
                              label=m) for m in methods]
            handles += [Line2D([], [], color="0.35", marker=self.marker[m], ls="", ms=6,
                               label=f"privacy: {m}") for m in mechs]
            heading = "colour: method · marker: privacy mechanism"
        ncol = legend_columns([h.get_label() for h in handles], fig.get_figwidth())
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False,
                   title=wrap(heading, fig.get_figwidth() - 0.3, 8), title_fontsize=8)


def _entry(method: str, privacy: str) -> str:
    return method if privacy == "none" else f"{method} · {privacy}"


def _metric(data: ReportData, ds: str) -> str:
    m = data.summary[data.summary["dataset"] == ds]["metric"].dropna()
    return str(m.iloc[0]) if len(m) else "utility"


def _top_entries(data: ReportData, ds: str) -> list[tuple[str, str]]:
    """The entries drawn where a figure has room for :data:`MAX_ENTRIES`:
    the best by the leaderboard's rank in its first tier (which holds every
    entry)."""
    lb = data.leaderboard
    if lb.empty:
        return []
    lb = lb[(lb["dataset"] == ds) & (lb["tier"] == lb["tier"].iloc[0])]
    return [(r.method, r.privacy) for r in lb.head(MAX_ENTRIES).itertuples()]


def _dodge(k: int, n: int, step: float) -> float:
    """A multiplicative offset for the ``k``-th of ``n`` series on a log axis."""
    return float(np.exp(step * (k - (n - 1) / 2)))


def _no_dp_x(eps: np.ndarray) -> float:
    fin = eps[np.isfinite(eps)]
    hi = float(fin.max()) if len(fin) else 1.0
    return 10 ** (math.ceil(math.log10(max(hi, 1e-3))) + 1)


def _eps_axis(ax: Any, eps: np.ndarray, nodp: float | None, unit: str | None) -> None:
    """Log ε with a tick at every ε present (up to 8; two digits, so the
    realised 2.99 of a target of 3 reads 3) and a "no DP" slot on the right."""
    ax.set_xscale("log")
    fin = sorted({float(f"{e:.2g}") for e in eps[np.isfinite(eps)]})
    lo = min(fin) / 2.5 if fin else (nodp or 10) / 30
    hi = (nodp * 2.5) if nodp else max(fin) * 2.5
    ax.set_xlim(lo, hi)
    ticks = fin if len(fin) <= 8 else [t for t in ax.get_xticks() if lo <= t < (nodp or hi) / 3]
    labels = [f"{t:g}" for t in ticks]
    if nodp:
        ax.axvline(nodp / 3.5, color="0.8", lw=0.8, ls=":")
        ticks, labels = [*ticks, nodp], [*labels, "no DP"]
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel(UNIT_TEXT.get(unit or "", "ε") + (", each at its own δ" if unit else ""))


def _draw(ax: Any, g: pd.DataFrame, enc: Encoding, *, x: str, y: str, err: str,
          join: bool, step: float) -> None:
    """``g`` (columns method, _mech, ``x``, ``y``, ``err``) as series per
    (method, mechanism): markers, error bars (std over seeds), and a line
    where ``join`` and the series' x values are distinct."""
    for (method, mech), h in g.groupby(["method", "_mech"], sort=False):
        h = h.sort_values(x)
        xs = h[x].to_numpy(dtype=float) * enc.dodge(method, mech, step)
        distinct = len(set(np.round(h[x].to_numpy(dtype=float), 9))) == len(h)
        ls = "-" if join and distinct and len(h) > 1 else ""
        st = enc.style(method, mech)
        ax.errorbar(xs, h[y].to_numpy(dtype=float), yerr=h[err].fillna(0).to_numpy(dtype=float),
                    ls=ls, lw=1.2, capsize=2, elinewidth=0.8, ecolor=st["color"], **st)


def _eps_panel(ax: Any, g: pd.DataFrame, enc: Encoding, unit: str | None, *, y: str,
               err: str) -> list[tuple[str, str]]:
    """One ε panel: the DP entries of ``unit`` on a log ε axis, the entries
    without DP in the "no DP" slot; returns the series drawn."""
    dp = g[(g["unit"] == unit) & g["epsilon"].notna()] if unit else g.iloc[0:0]
    nodp_rows = g[g["epsilon"].isna()]
    eps = dp["epsilon"].to_numpy(dtype=float)
    nodp = _no_dp_x(eps) if len(nodp_rows) else None
    _draw(ax, dp.assign(_x=eps), enc, x="_x", y=y, err=err, join=True, step=0.05)
    if nodp:
        _draw(ax, nodp_rows.assign(_x=nodp), enc, x="_x", y=y, err=err, join=False, step=0.16)
    _eps_axis(ax, eps, nodp, unit)
    ax.grid(True, axis="y", color="0.92", lw=0.6)
    return list(dict.fromkeys([*zip(dp["method"], dp["_mech"]),
                               *zip(nodp_rows["method"], nodp_rows["_mech"])]))


def _units(g: pd.DataFrame) -> list[str]:
    """The units of ε present, sample-level first."""
    present = set(g["unit"].dropna())
    return [u for u in ("record", "client") if u in present] + sorted(present - {"record",
                                                                                 "client"})


def _tradeoff(data: ReportData, ds: str) -> Figure | None:
    s = data.summary[(data.summary["dataset"] == ds) & (data.summary["n"] > 0)]
    if s.empty:
        return None
    s = s.assign(_mech=[mechanism(p) for p in s["privacy"]])
    enc = Encoding(data, ds)
    units = _units(s)
    b = s["bytes_per_round"].fillna(0).to_numpy(dtype=float)
    panels: list[str | None] = [*units] or [None]
    w = min(MAX_WIDTH_IN, 1.2 + 3.3 * (len(panels) + bool((b > 0).any())))
    fig = Figure(figsize=(w, 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels) + bool((b > 0).any()), sharey=True, squeeze=False)[0]
    drawn: list[tuple[str, str]] = []
    for ax, unit in zip(axes, panels):
        drawn += _eps_panel(ax, s, enc, unit, y="utility_mean", err="utility_std")
        for m in dict.fromkeys(s[s["unit"] == unit]["method"]):  # the same method without privacy
            ref = s[(s["method"] == m) & (s["privacy"] == "none")]["utility_mean"]
            if len(ref):
                ax.axhline(float(ref.iloc[0]), color=enc.color_of(m, "none"), lw=0.8, ls=":")
        ax.set_title("utility against " + (UNIT_TEXT[unit].split(" (")[0] if unit in UNIT_TEXT
                                           else "ε (no entry has a DP guarantee)"))
    if (b > 0).any():
        ax = axes[-1]
        pos = b[b > 0]
        zero_x = float(pos.min()) / 10
        g = s.assign(_x=np.where(b > 0, b, zero_x))
        _draw(ax, g, enc, x="_x", y="utility_mean", err="utility_std", join=False, step=0.06)
        ax.set_xscale("log")
        hi = float(pos.max()) * 3
        ax.set_xlim(zero_x / 2.5 if (b == 0).any() else float(pos.min()) / 3, hi)
        dec = range(math.floor(math.log10(float(pos.min()) / 3)) + 1, math.ceil(math.log10(hi)))
        ticks = [10.0 ** d for d in dec]
        if len(ticks) > 5:
            ticks = ticks[::math.ceil(len(ticks) / 5)]
        labels = [fmt_bytes(t) for t in ticks]
        if (b == 0).any():
            ax.axvline(zero_x * 3.2, color="0.8", lw=0.8, ls=":")
            ticks, labels = [zero_x, *ticks], ["nothing\nsent", *labels]
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        ax.set_xlabel("bytes per round (up + down, log scale)")
        ax.set_title("utility against communication")
        ax.grid(True, axis="y", color="0.92", lw=0.6)
        drawn += list(zip(s["method"], s["_mech"]))
    axes[0].set_ylabel(f"{_metric(data, ds)} (mean ± std over seeds)")
    title(fig, f"{ds}: privacy, utility and cost")
    enc.legend(fig, list(dict.fromkeys(drawn)))
    return fig


def _attacks(data: ReportData, ds: str) -> Figure | None:
    a = data.attacks[(data.attacks["dataset"] == ds)
                     & ~data.attacks["metric"].isin(["not_applicable", "failed"])]
    if a.empty:
        return None
    a = a.assign(_mech=[mechanism(p) for p in a["privacy"]])
    enc = Encoding(data, ds)
    panels = []
    for name in sorted(set(a["attack"])):
        g = a[a["attack"] == name]
        metric = next((m for m in ATTACK_HEADLINE if m in set(g["metric"])),
                      sorted(g["metric"])[0])
        g = g[g["metric"] == metric]
        for u in _units(g) or [None]:
            panels.append((name, metric, u, g))
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(min(MAX_WIDTH_IN, 6.0 if ncol == 1 else 1.2 + 3.3 * ncol),
                          3.3 * nrow + 1.4),
                 layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    drawn: list[tuple[str, str]] = []
    for ax, (name, metric, unit, g) in zip(axes, panels):
        drawn += _eps_panel(ax, g, enc, unit, y="mean", err="std")
        ref = REFERENCE.get(metric)
        if ref:
            ax.axhline(ref[0], color="0.55", lw=0.8, ls="--")
            ax.annotate(f"{ref[1]} ({ref[0]:g})", (0.01, ref[0]),
                        xycoords=("axes fraction", "data"), fontsize=7, color="0.4",
                        va="bottom")
        ax.set_ylabel(metric)
        ax.set_title(f"{name}: {metric}" + (f", {unit}-level ε" if unit else ""))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    title(fig, f"{ds}: attack success against ε")
    enc.legend(fig, list(dict.fromkeys(drawn)))
    return fig


def _convergence(data: ReportData, ds: str) -> Figure | None:
    c = data.convergence[data.convergence["dataset"] == ds]
    if c.empty:
        return None
    top = _top_entries(data, ds)
    entries = [e for e in top if ((c["method"] == e[0]) & (c["privacy"] == e[1])).any()]
    if not entries:
        return None
    total = len(set(zip(c["method"], c["privacy"])))
    fig = Figure(figsize=(9.0, 4.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    colors = palette(len(entries))
    handles = []
    for k, ((method, priv), color) in enumerate(zip(entries, colors)):
        g = c[(c["method"] == method) & (c["privacy"] == priv)]
        # a dash pattern as well as a colour, so that equal curves stay visible
        style = {"color": color, "lw": 1.4, "ls": LINE_STYLES[k % len(LINE_STYLES)]}
        u = g.dropna(subset=["utility"])
        ax1.plot(u["round"], u["utility"], **style)
        ax2.plot(g["round"], g["loss"], **style)
        handles.append(Line2D([], [], label=_entry(str(method), str(priv)), **style))
    ax1.set_ylabel(_metric(data, ds) + " (pooled test set)")
    ax2.set_ylabel("training loss (mean over clients)")
    if c["loss"].isna().all():
        ax2.text(0.5, 0.5, "no losses reported\n(under DP, clients do not send them)",
                 ha="center", va="center", transform=ax2.transAxes, color="0.4")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(True, color="0.93", lw=0.6)
    more = f", the top {len(entries)} of {total} entries" if total > len(entries) else ""
    title(fig, f"{ds}: convergence (mean over seeds{more})")
    fig.legend(handles=handles, loc="outside lower center", frameon=False,
               ncol=legend_columns([h.get_label() for h in handles], fig.get_figwidth()))
    return fig


def _sites(data: ReportData, ds: str) -> Figure | None:
    st = data.sites[data.sites["dataset"] == ds]
    if st.empty:
        return None
    keep = _top_entries(data, ds)
    st = st[[(m, p) in set(keep) for m, p in zip(st["method"], st["privacy"])]]
    per = st[st["site"] != "(worst)"].dropna(subset=["utility_mean"])
    names = list(dict.fromkeys(per["site"]))
    entries = [e for e in keep if ((per["method"] == e[0]) & (per["privacy"] == e[1])).any()]
    if not names or not entries:
        return None
    metric = _metric(data, ds)
    colors = palette(len(entries))
    if len(names) <= MAX_SITE_COLUMNS:
        return _site_dots(ds, metric, per, names, entries, colors)
    return _site_distribution(ds, metric, per, names, entries, colors)


def _site_dots(ds: str, metric: str, per: pd.DataFrame, names: list[str],
               entries: list[tuple[str, str]], colors: list[Any]) -> Figure:
    """A dot per site and entry; sites sorted by their mean utility (the
    weakest at the bottom)."""
    order = per.groupby("site")["utility_mean"].mean().sort_values().index.tolist()
    fig = Figure(figsize=(8.0, 1.9 + 0.32 * len(order) + 0.2 * math.ceil(len(entries) / 3)),
                 layout="constrained")
    ax = fig.add_subplot()
    y = {s: i for i, s in enumerate(order)}
    n = len(entries)
    handles = []
    for k, ((m, p), color) in enumerate(zip(entries, colors)):
        e = per[(per["method"] == m) & (per["privacy"] == p)]
        off = (k - (n - 1) / 2) * min(0.12, 0.7 / max(n, 1))
        ys = np.array([y[s] for s in e["site"]], dtype=float) + off
        ax.plot(e["utility_mean"], ys, ls="", marker=MARKERS[k % len(MARKERS)], color=color,
                ms=5.5)
        handles.append(Line2D([], [], ls="", marker=MARKERS[k % len(MARKERS)], color=color,
                              ms=5.5, label=_entry(str(m), str(p))))
    ax.set_yticks(range(len(order)), [str(s) for s in order])
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel(f"{metric} on the site's own test split (mean over seeds)")
    ax.grid(True, axis="x", color="0.92", lw=0.6)
    ax.set_title("sites sorted by mean utility, the weakest at the bottom", fontsize=8,
                 color="0.3")
    title(fig, f"{ds}: utility per site")
    fig.legend(handles=handles, loc="outside lower center", frameon=False,
               ncol=legend_columns([h.get_label() for h in handles], fig.get_figwidth()))
    return fig


def _site_distribution(ds: str, metric: str, per: pd.DataFrame, names: list[str],
                       entries: list[tuple[str, str]], colors: list[Any]) -> Figure:
    """Per entry, the distribution of its sites' utility (box: quartiles,
    whiskers: 5th–95th percentile, points: every site), the worst site
    marked and named."""
    fig = Figure(figsize=(8.5, 1.6 + 0.55 * len(entries)), layout="constrained")
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    labels = []
    for k, ((m, p), color) in enumerate(zip(entries, colors)):
        e = per[(per["method"] == m) & (per["privacy"] == p)]
        v = e["utility_mean"].to_numpy(dtype=float)
        yk = len(entries) - 1 - k
        ax.boxplot([v], positions=[yk], **HORIZONTAL, widths=0.5, whis=(5, 95),
                   showfliers=False, patch_artist=True,
                   boxprops={"facecolor": (*color[:3], 0.25), "edgecolor": color},
                   medianprops={"color": color, "lw": 1.5},
                   whiskerprops={"color": color}, capprops={"color": color})
        ax.plot(v, yk + rng.uniform(-0.17, 0.17, len(v)), ls="", marker=".", ms=2.5,
                color=color, alpha=0.55)
        j = int(np.argmin(v))
        ax.plot([v[j]], [yk], ls="", marker="x", color="#b2182b", ms=7, mew=1.6)
        ax.annotate(f"worst: {str(e['site'].iloc[j])[:18]} ({v[j]:.3f})", (v[j], yk + 0.3),
                    fontsize=7, color="#b2182b", ha="left", va="bottom",
                    annotation_clip=False)
        labels.append(_entry(str(m), str(p)))
    ax.set_yticks(range(len(entries)), labels[::-1])
    ax.set_ylim(-0.7, len(entries) - 0.2)
    lo, hi = float(per["utility_mean"].min()), float(per["utility_mean"].max())
    ax.set_xlim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.25 * (hi - lo + 1e-9))
    ax.set_xlabel(f"{metric} on each site's own test split (mean over seeds)")
    ax.grid(True, axis="x", color="0.92", lw=0.6)
    title(fig, f"{ds}: utility over {len(names)} sites (box: quartiles, whiskers: 5th–95th "
               f"percentile, ×: the site with the lowest mean over seeds)")
    return fig


# -- gradient-inversion reconstructions --------------------------------------


def _png_pairs(res: dict[str, Any]) -> list[tuple[str, str]]:
    """(original, reconstruction) PNG paths named by an attack result: lists
    under keys containing ``orig`` and ``recon``, or a list of objects with
    such keys."""
    orig: list[str] = []
    recon: list[str] = []
    for k, v in res.items():
        kl = k.lower()
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for x in v:
                o = next((x[j] for j in x if "orig" in j.lower()), None)
                r = next((x[j] for j in x if "recon" in j.lower()), None)
                if isinstance(o, str) and isinstance(r, str):
                    orig.append(o)
                    recon.append(r)
        elif isinstance(v, list) and v and all(isinstance(p, str) and p.lower().endswith(".png")
                                               for p in v):
            if "orig" in kl:
                orig += v
            elif "recon" in kl:
                recon += v
    return list(zip(orig, recon))


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    if a.max() > 1.0:
        a = a / 255.0
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return a[..., :3]


def _read_png(path: Path | None) -> np.ndarray | None:
    """An image :func:`fedmedbench.report.record_image` admitted, or ``None``
    when it does not decode (a damaged file)."""
    if path is None:
        return None
    from matplotlib.image import imread

    try:
        return _rgb(imread(str(path), format="png"))
    except Exception:  # a PNG signature on a damaged file: left out, not fatal
        return None


def _image_grid(res: dict[str, Any], rec: dict[str, Any]) -> np.ndarray | None:
    """Originals over reconstructions as one RGB array: the attack's own grid
    (key ``images``: one PNG, ground truth on top) or composed from pairs."""
    ready = res.get("images")
    if isinstance(ready, str):
        return _read_png(record_image(rec, ready))
    tops, bottoms = [], []
    for o, r in _png_pairs(res)[:6]:
        a, b = _read_png(record_image(rec, o)), _read_png(record_image(rec, r))
        if a is None or b is None:
            continue
        if a.shape != b.shape or (tops and a.shape != tops[0].shape):
            continue
        tops.append(a)
        bottoms.append(b)
    if not tops:
        return None
    h, w, _ = tops[0].shape
    pad = max(1, h // 16)
    grid = np.ones((2 * h + 3 * pad, len(tops) * (w + pad) + pad, 3))
    for i, (a, b) in enumerate(zip(tops, bottoms)):
        x = pad + i * (w + pad)
        grid[pad:pad + h, x:x + w] = a
        grid[2 * pad + h:2 * pad + 2 * h, x:x + w] = b
    return grid


def _reconstructions(data: ReportData, ds: str) -> Figure | None:
    if "meta" not in data.cache:
        c = data.cells
        data.cache["meta"] = {k: (a, m, p, sd) for k, a, m, p, sd in zip(
            c["cell_id"], c["dataset"], c["method"], c["privacy"], c["seed"])}
    rows = []
    for r in data.records:
        meta = data.cache["meta"].get(str(r.get("cell_id")))
        if r.get("status") != "ok" or meta is None or meta[0] != ds:
            continue
        for name, res in sorted(((r.get("metrics") or {}).get("attacks") or {}).items()):
            if not isinstance(res, dict) or "not_applicable" in res or "failed" in res:
                continue
            grid = _image_grid(res, r)
            if grid is None:
                continue
            psnr = res.get("psnr")
            lab = "\n".join([*textwrap.wrap(_entry(meta[1], meta[2]), 36), f"{name}, seed {meta[3]}",
                             *([f"PSNR {psnr:.1f} dB"] if isinstance(psnr, (int, float))
                               and not isinstance(psnr, bool) else [])])
            rows.append((lab, grid))
            if len(rows) == 8:
                break
    if not rows:
        return None
    aspect = max(g.shape[1] / g.shape[0] for _, g in rows)
    img_w = float(np.clip(1.45 * aspect, 1.5, MAX_WIDTH_IN - 3.4))
    w = img_w + 3.4
    fig = Figure(figsize=(w, 1.6 * len(rows) + 0.8), layout="constrained")
    grid = fig.add_gridspec(len(rows), 2, width_ratios=[3.0, img_w])
    for i, (lab, im) in enumerate(rows):
        ta = fig.add_subplot(grid[i, 0])
        ta.axis("off")
        ta.text(1.0, 0.5, lab, ha="right", va="center", fontsize=8, transform=ta.transAxes)
        ax = fig.add_subplot(grid[i, 1])
        ax.imshow(im, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_visible(True)
            sp.set_color("0.8")
    title(fig, f"{ds}: gradient inversion, the originals (top) over their reconstructions "
               f"(bottom)")
    return fig


def title(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width (so it is never cut off)."""
    fig.suptitle(wrap(text, fig.get_figwidth() - 0.3, 10))


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to lines that fit ``width_in`` inches at ``fontsize``
    points (DejaVu Sans averages about 0.6 em a character)."""
    chars = max(10, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)) or text


def legend_columns(labels: list[str], width_in: float, fontsize: float = 8) -> int:
    """How many legend columns of ``labels`` fit in ``width_in`` inches."""
    widths = sorted((len(x) * 0.6 * fontsize / 72 + 0.55 for x in labels), reverse=True)
    for n in range(len(widths), 0, -1):
        if max(widths[:n]) * n <= width_in - 0.3:
            return n
    return 1


KINDS = {"tradeoff": _tradeoff, "attacks": _attacks, "convergence": _convergence,
         "sites": _sites, "reconstructions": _reconstructions}


def figures(data: ReportData) -> dict[str, tuple[str, str, Figure]]:
    """``{stem: (dataset, kind, figure)}`` for every figure the data supports
    (made once per :class:`ReportData`)."""
    if "figures" in data.cache:
        return data.cache["figures"]
    out = {}
    with matplotlib.rc_context(RC):
        for ds in data.datasets:
            for kind, fn in KINDS.items():
                fig = fn(data, ds)
                if fig is not None:
                    FigureCanvasAgg(fig)
                    # lay the figure out once and keep it: each save would do it again
                    fig.draw_without_rendering()
                    fig.set_layout_engine("none")
                    out[f"{slug(ds)}-{kind}"] = (ds, kind, fig)
    data.cache["figures"] = out
    return out


def render(data: ReportData, stem: str, fmt: str) -> bytes:
    """Figure ``stem`` of ``data`` as PNG or SVG bytes, without dates
    (deterministic); rendered once per :class:`ReportData`."""
    key = ("render", stem, fmt)
    if key not in data.cache:
        fig = figures(data)[stem][2]
        buf = io.BytesIO()
        with matplotlib.rc_context(RC):
            meta = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(buf, format=fmt, dpi=110, metadata=meta)
        data.cache[key] = buf.getvalue()
    return data.cache[key]


def write_figures(records: list[dict], out_dir: Path, formats: tuple[str, ...]) -> list[Path]:
    """Every figure of the report as ``figures/<stem>.<format>``."""
    from fedmedbench.fileio import output_dir, write_output

    output_dir(Path(out_dir), "figures")  # refused if a link, before anything is drawn
    paths = []
    data = build(records)
    for stem in figures(data):
        for f in formats:
            paths.append(write_output(Path(out_dir), f"figures/{stem}.{f}",
                                      render(data, stem, f)))
    return paths
