"""Figures of a report (matplotlib, Agg canvas; PNG and SVG).

One encoding for the whole report (:class:`Encoding`): each **method** has
one colour in every figure, each **privacy configuration** one marker (full
and partial CKKS, or DP at two ε, are different configurations), so every
entry (method × privacy) has a (colour, marker) pair of its own. Per
dataset:

- ``<dataset>-tradeoff``: the privacy–utility–cost view. Utility against ε
  (log scale) with one panel per unit of protection — sample-level ε (one
  patient record, ``dp-sgd``) and client-level ε (a whole hospital,
  ``dp-fedavg``) never share an axis — utility against bytes per round and
  against wall seconds per cell (log scales). Entries without a DP
  guarantee sit at "no DP"; the dashed line is the majority-class baseline.
- ``<dataset>-attacks``: attack success against ε, one panel per attack,
  metric and unit, each metric on a **fixed scale anchored at chance** (AUC
  and balanced accuracy 0.5–1, advantage and SSIM 0–1, PSNR 0–40 dB,
  TPR at a fixed FPR on a log axis 10⁻⁴–1; :data:`METRIC_RANGE`), so that
  no panel zooms into noise.
- ``<dataset>-roc``: membership inference's ROC curve on log–log axes
  (10⁻⁴–1) with the diagonal (chance): TPR at the low FPRs that matter.
- ``<dataset>-convergence``: utility and training loss per round.
- ``<dataset>-sites``: per-site utility (the site's own majority class as a
  grey bar), up to :data:`fedmedbench.report.MAX_SITE_COLUMNS` sites;
  past that a distribution per entry with the worst site named.
- ``<dataset>-clock``: utility against virtual hours per protection, when
  records carry a virtual clock (``history[t]["clock_s"]``) from a simulated
  network (a ``network`` in their config; the default ``uniform`` network's
  clock is only this machine's compute, so it is left out).
- ``<dataset>-reconstructions``: gradient-inversion reconstructions under the
  originals, where attack records name PNG files inside the results folder
  (see :func:`fedmedbench.report.record_image` for what is read).

Every figure is laid out by matplotlib's constrained layout within at most
:data:`MAX_WIDTH_IN` inches, so no text falls outside it (a figure-lint
test checks this, the fixed scales and the encoding on every figure). Each
artist drawn for an entry carries ``_fmb_entry = (method, privacy)`` and
each attack panel ``_fmb_metric``, for that test. Output is deterministic
for the same records.
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
    natural_key,
    record_image,
    simulated_network,
)

RC: dict[str, Any] = {"svg.hashsalt": "fedmedbench", "svg.fonttype": "path", "font.size": 9,
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
             "balanced_accuracy": (0.5, "chance"), "psnr": (20.0, "recognisable above")}
#: the fixed y range of each attack metric's panel: (low, high, log scale)
METRIC_RANGE: dict[str, tuple[float, float, bool]] = {
    "auc": (0.5, 1.0, False), "balanced_accuracy": (0.5, 1.0, False),
    "advantage": (0.0, 1.0, False), "ssim": (0.0, 1.0, False),
    "label_accuracy": (0.0, 1.0, False), "psnr": (0.0, 40.0, False),
    "mse": (0.0, 1.0, False), "tpr_at_1pct_fpr": (1e-4, 1.0, True),
    "tpr_at_0.1pct_fpr": (1e-4, 1.0, True)}
#: the ROC figure's axes (log–log, both)
ROC_RANGE = (1e-4, 1.0)
CHANCE_STYLE = {"color": "0.45", "lw": 0.9, "ls": "--"}


def slug(s: str) -> str:
    """A file-name-safe stem for a dataset name (a hash keeps odd names apart)."""
    base = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "dataset"
    if base != s:
        base += "-" + hashlib.sha256(s.encode()).hexdigest()[:6]
    return base


# -- one encoding for the whole report ---------------------------------------------


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
    ``dp-fedavg+secagg`` (the series a line joins across ε)."""
    out, depth = [], 0
    for ch in str(privacy):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out) or str(privacy)


def tag(artist: Any, method: str, privacy: str) -> Any:
    """Mark ``artist`` as drawn for the entry (read by the figure-lint test)."""
    artist._fmb_entry = (str(method), str(privacy))
    return artist


class Encoding:
    """The report-wide encoding: colour by method (the same in every figure
    and dataset), marker by privacy configuration (filled for the first 12,
    open after), a fixed horizontal offset per series so equal points stay
    apart."""

    def __init__(self, data: ReportData) -> None:
        s = data.summary
        self.methods = list(dict.fromkeys(s["method"])) if not s.empty else []
        privs = sorted(dict.fromkeys(s["privacy"]) if not s.empty else [],
                       key=lambda p: (p != "none", natural_key(p)))
        self.privacies = privs
        self.color = dict(zip(self.methods, palette(len(self.methods))))
        self.marker = {p: (MARKERS[i % len(MARKERS)], i >= len(MARKERS))
                       for i, p in enumerate(privs)}

    def style(self, method: str, privacy: str, *, ms: float = 6) -> dict[str, Any]:
        c = self.color.get(method, "0.3")
        m, hollow = self.marker.get(privacy, ("o", False))
        return {"color": c, "marker": m, "ms": ms, "mec": c if hollow else "white",
                "mfc": "white" if hollow else c, "mew": 1.1 if hollow else 0.6}

    def legend(self, fig: Figure, entries: list[tuple[str, str]], *,
               heading: str = "colour: method · marker: privacy configuration") -> None:
        """One legend under the panels, for the entries drawn."""
        methods = [m for m in self.methods if m in {x for x, _ in entries}]
        privs = [p for p in self.privacies if p in {x for _, x in entries}]
        handles = [Line2D([], [], color=self.color[m], marker="", ls="-", lw=2, label=m)
                   for m in methods]
        for p in privs:
            st = self.style("", p)
            st.update(color="0.35", mec="0.35" if st["mfc"] == "white" else "white",
                      mfc="white" if st["mfc"] == "white" else "0.35")
            handles.append(Line2D([], [], ls="", label=f"privacy: {p}", **st))
        ncol = legend_columns([str(h.get_label()) for h in handles], fig.get_figwidth())
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False,
                   title=wrap(heading, fig.get_figwidth() - 0.3, 8), title_fontsize=8)


def _encoding(data: ReportData) -> Encoding:
    if "encoding" not in data.cache:
        data.cache["encoding"] = Encoding(data)
    return data.cache["encoding"]


def _entry(method: str, privacy: str) -> str:
    return method if privacy == "none" else f"{method} · {privacy}"


def _metric(data: ReportData, ds: str) -> str:
    m = data.summary[data.summary["dataset"] == ds]["metric"].dropna()
    return str(m.iloc[0]) if len(m) else "utility"


def _chance_level(data: ReportData, ds: str) -> float:
    v = data.summary[data.summary["dataset"] == ds]["majority_baseline"].dropna()
    return float(v.mean()) if len(v) else math.nan


def _chance_line(ax: Any, level: float) -> None:
    if not math.isnan(level):
        ax.axhline(level, **CHANCE_STYLE)
        ax.annotate(f"majority class ({level:.2f})", (0.01, level),
                    xycoords=("axes fraction", "data"), fontsize=7, color="0.35",
                    va="bottom")


def _top_entries(data: ReportData, ds: str) -> list[tuple[str, str]]:
    """The entries drawn where a figure has room for :data:`MAX_ENTRIES`:
    the best by the leaderboard's rank in its first tier (which holds every
    entry)."""
    lb = data.leaderboard
    if lb.empty:
        return []
    lb = lb[(lb["dataset"] == ds) & (lb["tier"] == lb["tier"].iloc[0])]
    return [(r.method, r.privacy) for r in lb.head(MAX_ENTRIES).itertuples()]


def _series_offsets(entries: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    series = list(dict.fromkeys((m, mechanism(p)) for m, p in entries))
    return {s: i for i, s in enumerate(series)}


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
    ax.set_xlabel(UNIT_TEXT.get(unit or "", "ε") + ("\neach at its own δ" if unit else ""))


def _draw(ax: Any, g: pd.DataFrame, enc: Encoding, *, x: str, y: str, err: str | None,
          join: bool, step: float, clamp: tuple[float, float] | None = None) -> None:
    """``g`` (columns method, privacy, ``x``, ``y``, ``err``) as one marker
    per entry (its colour and marker), error bars, and a line per series
    (method × mechanism) where ``join`` and its x values are distinct."""
    offsets = _series_offsets(list(zip(g["method"], g["privacy"])))
    n = len(offsets)
    g = g.assign(_mech=[mechanism(p) for p in g["privacy"]])
    for (method, mech), h in g.groupby(["method", "_mech"], sort=False):
        h = h.sort_values(x)
        k = offsets.get((method, mech), 0)
        xs = h[x].to_numpy(dtype=float) * _dodge(k, n, step)
        ys = h[y].to_numpy(dtype=float)
        if clamp is not None:
            ys = np.clip(ys, clamp[0], clamp[1])
        distinct = len(set(np.round(h[x].to_numpy(dtype=float), 9))) == len(h)
        color = enc.color.get(method, "0.3")
        if join and distinct and len(h) > 1:
            tag(ax.plot(xs, ys, ls="-", lw=1.1, color=color, marker="")[0], method,
                h["privacy"].iloc[0])
        es = h[err].fillna(0).to_numpy(dtype=float) if err else None
        for xi, yi, ei, priv in zip(xs, ys, es if es is not None else [None] * len(xs),
                                    h["privacy"]):
            st = enc.style(method, priv)
            if ei:
                ax.errorbar([xi], [yi], yerr=[ei], ls="", color=st["color"], capsize=2,
                            elinewidth=0.8, marker="")
            tag(ax.plot([xi], [yi], ls="", clip_on=clamp is None, **st)[0], method, priv)


def _eps_panel(ax: Any, g: pd.DataFrame, enc: Encoding, unit: str | None, *, y: str,
               err: str | None, clamp: tuple[float, float] | None = None
               ) -> list[tuple[str, str]]:
    """One ε panel: the DP entries of ``unit`` on a log ε axis, the entries
    without DP in the "no DP" slot; returns the entries drawn."""
    dp = g[(g["unit"] == unit) & g["epsilon"].notna()] if unit else g.iloc[0:0]
    nodp_rows = g[g["epsilon"].isna()]
    eps = dp["epsilon"].to_numpy(dtype=float)
    nodp = _no_dp_x(eps) if len(nodp_rows) else None
    _draw(ax, dp.assign(_x=eps), enc, x="_x", y=y, err=err, join=True, step=0.05, clamp=clamp)
    if nodp:
        _draw(ax, nodp_rows.assign(_x=nodp), enc, x="_x", y=y, err=err, join=False,
              step=0.16, clamp=clamp)
    _eps_axis(ax, eps, nodp, unit)
    ax.grid(True, axis="y", color="0.92", lw=0.6)
    return list(dict.fromkeys([*zip(dp["method"], dp["privacy"]),
                               *zip(nodp_rows["method"], nodp_rows["privacy"])]))


def _units(g: pd.DataFrame) -> list[str]:
    """The units of ε present, sample-level first."""
    present = set(g["unit"].dropna())
    return [u for u in ("record", "client") if u in present] + sorted(present - {"record",
                                                                                 "client"})


def _log_panel(ax: Any, s: pd.DataFrame, enc: Encoding, col: str, *, zero_label: str,
               fmt_tick: Any, xlabel: str, title_text: str) -> list[tuple[str, str]]:
    """Utility against a positive quantity on a log axis; zeros in a slot on the left."""
    b = s[col].fillna(0).to_numpy(dtype=float)
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
    labels = [fmt_tick(t) for t in ticks]
    if (b == 0).any():
        ax.axvline(zero_x * 3.2, color="0.8", lw=0.8, ls=":")
        ticks, labels = [zero_x, *ticks], [zero_label, *labels]
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_title(title_text)
    ax.grid(True, axis="y", color="0.92", lw=0.6)
    return list(zip(s["method"], s["privacy"]))


def _tradeoff(data: ReportData, ds: str) -> Figure | None:
    s = data.summary[(data.summary["dataset"] == ds) & (data.summary["n"] > 0)]
    if s.empty:
        return None
    enc = _encoding(data)
    units = _units(s)
    b = s["bytes_per_round"].fillna(0).to_numpy(dtype=float)
    t = (s["wall_s"].fillna(0).to_numpy(dtype=float) if "wall_s" in s
         else np.zeros(len(s)))
    extra = [k for k, v in (("bytes", b), ("time", t)) if (v > 0).any()]
    panels: list[str | None] = [*units] or [None]
    n = len(panels) + len(extra)
    fig = Figure(figsize=(min(MAX_WIDTH_IN, 1.2 + 3.1 * n), 4.9), layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    drawn: list[tuple[str, str]] = []
    chance = _chance_level(data, ds)
    for ax, unit in zip(axes, panels):
        drawn += _eps_panel(ax, s, enc, unit, y="utility_mean", err="utility_std")
        ax.set_title("against " + (UNIT_TEXT[unit].split(" (")[0] if unit in UNIT_TEXT
                                   else "ε (no entry has a DP guarantee)"))
    rest = list(axes[len(panels):])
    if "bytes" in extra:
        drawn += _log_panel(rest.pop(0), s, enc, "bytes_per_round", zero_label="nothing\nsent",
                            fmt_tick=fmt_bytes, xlabel="bytes per round (up + down, log)",
                            title_text="against communication")
    if "time" in extra:
        drawn += _log_panel(rest.pop(0), s, enc, "wall_s", zero_label="0",
                            fmt_tick=lambda v: f"{v:g} s", xlabel="wall seconds per cell (log)",
                            title_text="against time")
    for ax in axes:
        _chance_line(ax, chance)
    axes[0].set_ylabel(f"{_metric(data, ds)} (mean ± std over seeds)")
    title(fig, f"{ds}: privacy, utility and cost")
    enc.legend(fig, list(dict.fromkeys(drawn)))
    return fig


def _attacks(data: ReportData, ds: str) -> Figure | None:
    a = data.attacks[(data.attacks["dataset"] == ds)
                     & ~data.attacks["metric"].isin(["not_applicable", "failed"])]
    if a.empty:
        return None
    enc = _encoding(data)
    panels = []
    for name in sorted(set(a["attack"])):
        g = a[a["attack"] == name]
        metric = next((m for m in ATTACK_HEADLINE if m in set(g["metric"])),
                      sorted(g["metric"])[0])
        g = g[g["metric"] == metric]
        units: list[str | None] = list(_units(g)) or [None]
        for u in units:
            panels.append((name, metric, u, g))
        if "tpr_at_0.1pct_fpr" in set(a[a["attack"] == name]["metric"]):
            gt = a[(a["attack"] == name) & (a["metric"] == "tpr_at_0.1pct_fpr")]
            tunits: list[str | None] = list(_units(gt)) or [None]
            for u in tunits:
                panels.append((name, "tpr_at_0.1pct_fpr", u, gt))
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(min(MAX_WIDTH_IN, 6.0 if ncol == 1 else 1.2 + 3.2 * ncol),
                          3.3 * nrow + 1.6), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    drawn: list[tuple[str, str]] = []
    for ax, (name, metric, unit, g) in zip(axes, panels):
        lo, hi, log = METRIC_RANGE.get(metric, (math.nan, math.nan, False))
        fixed = not math.isnan(lo)
        drawn += _eps_panel(ax, g, enc, unit, y="mean", err=None if log else "std",
                            clamp=(lo, hi) if fixed else None)
        if log:
            ax.set_yscale("log")
        if fixed:
            ax.set_ylim(lo, hi)
            ax._fmb_metric = metric
        ref = REFERENCE.get(metric)
        if metric.startswith("tpr_at_"):  # chance: TPR equals the FPR it is read at
            fpr = 0.001 if "0.1pct" in metric else 0.01
            ref = (fpr, "chance (TPR = FPR)")
        if ref:
            ax.axhline(ref[0], **CHANCE_STYLE)
            ax.annotate(f"{ref[1]} ({ref[0]:g})", (0.01, ref[0]),
                        xycoords=("axes fraction", "data"), fontsize=7, color="0.35",
                        va="bottom")
        ax.set_ylabel(metric.replace("tpr_at_0.1pct_fpr", "TPR at 0.1% FPR")
                      .replace("tpr_at_1pct_fpr", "TPR at 1% FPR"))
        ax.set_title(f"{name}" + (f", {unit}-level ε" if unit else ""))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    title(fig, f"{ds}: attack success against ε, each metric on a fixed scale from chance "
               f"(values below chance drawn at chance)")
    enc.legend(fig, list(dict.fromkeys(drawn)))
    return fig


def _roc_curves(data: ReportData, ds: str) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    """Per attack, per entry: the mean ROC (TPR on a log FPR grid) over seeds,
    from the records' ``roc`` ({fpr, tpr})."""
    grid = np.logspace(math.log10(ROC_RANGE[0]), 0, 41)
    meta = data.cells.drop_duplicates("cell_id").set_index("cell_id")[
        ["dataset", "method", "privacy", "status"]] \
        if not data.cells.empty else None
    acc: dict[str, dict[tuple[str, str], list[np.ndarray]]] = {}
    for r in data.records:
        cid = str(r.get("cell_id"))
        if meta is None or cid not in meta.index:
            continue
        m = meta.loc[cid]
        if m["dataset"] != ds or m["status"] != "ok":
            continue
        for name, res in sorted((((r.get("metrics") or {}).get("attacks")) or {}).items()):
            roc = res.get("roc") if isinstance(res, dict) else None
            if not isinstance(roc, dict):
                continue
            f, t = roc.get("fpr"), roc.get("tpr")
            if not (isinstance(f, list) and isinstance(t, list) and len(f) == len(t) >= 2):
                continue
            try:
                fa, ta = np.asarray(f, dtype=float), np.asarray(t, dtype=float)
            except (TypeError, ValueError):
                continue
            if not (np.isfinite(fa).all() and np.isfinite(ta).all()):
                continue
            order = np.argsort(fa, kind="mergesort")
            acc.setdefault(name, {}).setdefault((m["method"], m["privacy"]), []).append(
                np.interp(grid, fa[order], ta[order]))
    return {a: {e: np.mean(v, axis=0) for e, v in d.items()} for a, d in acc.items()}


def _roc(data: ReportData, ds: str) -> Figure | None:
    curves = _roc_curves(data, ds)
    if not curves:
        return None
    enc = _encoding(data)
    top = set(_top_entries(data, ds))
    names = sorted(curves)
    ncol = min(3, len(names))
    fig = Figure(figsize=(min(MAX_WIDTH_IN, 1.4 + 3.4 * ncol), 4.6), layout="constrained")
    axes = fig.subplots(1, ncol, squeeze=False)[0]
    grid = np.logspace(math.log10(ROC_RANGE[0]), 0, 41)
    drawn: list[tuple[str, str]] = []
    for ax, name in zip(axes, names):
        for (m, p), tpr in curves[name].items():
            if top and (m, p) not in top:
                continue
            st = enc.style(m, p, ms=4.5)
            tag(ax.plot(grid, np.clip(tpr, ROC_RANGE[0], 1), lw=1.2, markevery=8, **st)[0],
                m, p)
            drawn.append((m, p))
        ax.plot(ROC_RANGE, ROC_RANGE, **CHANCE_STYLE)
        ax.annotate("chance (TPR = FPR)", (2e-4, 2.6e-4), fontsize=7, color="0.35",
                    rotation=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*ROC_RANGE)
        ax.set_ylim(*ROC_RANGE)
        ax._fmb_metric = "roc"
        ax.set_xlabel("false positive rate (log)")
        ax.set_ylabel("true positive rate (log)")
        ax.set_title(f"{name}: ROC, mean over seeds")
        ax.grid(True, color="0.93", lw=0.6)
    title(fig, f"{ds}: membership inference at low false-positive rates")
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
    enc = _encoding(data)
    total = len(set(zip(c["method"], c["privacy"])))
    fig = Figure(figsize=(9.0, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for method, priv in entries:
        g = c[(c["method"] == method) & (c["privacy"] == priv)]
        st = enc.style(method, priv, ms=4.5)
        k = enc.privacies.index(priv) if priv in enc.privacies else 0
        style = {**st, "lw": 1.3, "ls": LINE_STYLES[k % len(LINE_STYLES)],
                 "markevery": max(1, len(g) // 5)}
        u = g.dropna(subset=["utility"])
        tag(ax1.plot(u["round"], u["utility"], **style)[0], method, priv)
        tag(ax2.plot(g["round"], g["loss"], **style)[0], method, priv)
    _chance_line(ax1, _chance_level(data, ds))
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
    enc.legend(fig, entries)
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
    if len(names) <= MAX_SITE_COLUMNS:
        return _site_dots(data, ds, metric, per, entries)
    return _site_distribution(data, ds, metric, per, names, entries)


def _site_dots(data: ReportData, ds: str, metric: str, per: pd.DataFrame,
               entries: list[tuple[str, str]]) -> Figure:
    """A dot per site and entry; sites sorted by their mean utility (the
    weakest at the bottom); each site's own majority class as a grey bar."""
    enc = _encoding(data)
    order = per.groupby("site")["utility_mean"].mean().sort_values().index.tolist()
    fig = Figure(figsize=(8.0, 2.1 + 0.34 * len(order) + 0.2 * math.ceil(len(entries) / 3)),
                 layout="constrained")
    ax = fig.add_subplot()
    y = {s: i for i, s in enumerate(order)}
    n = len(entries)
    for k, (m, p) in enumerate(entries):
        e = per[(per["method"] == m) & (per["privacy"] == p)]
        off = (k - (n - 1) / 2) * min(0.12, 0.7 / max(n, 1))
        ys = np.array([y[s] for s in e["site"]], dtype=float) + off
        tag(ax.plot(e["utility_mean"], ys, ls="", **enc.style(m, p, ms=5.5))[0], m, p)
    if "majority_baseline" in per:
        base = per.groupby("site")["majority_baseline"].mean()
        bx = [base.get(s, math.nan) for s in order]
        if any(not math.isnan(v) for v in bx):
            ax.plot(bx, range(len(order)), ls="", marker="|", ms=14, mew=2, color="0.55")
    ax.set_yticks(range(len(order)), [str(s) for s in order])
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel(f"{metric} on the site's own test split (mean over seeds)")
    ax.grid(True, axis="x", color="0.92", lw=0.6)
    ax.set_title("sites sorted by mean utility, the weakest at the bottom; grey bar: the "
                 "site's own majority class", fontsize=8, color="0.3")
    title(fig, f"{ds}: utility per site")
    enc.legend(fig, entries)
    return fig


def _site_distribution(data: ReportData, ds: str, metric: str, per: pd.DataFrame,
                       names: list[str], entries: list[tuple[str, str]]) -> Figure:
    """Per entry, the distribution of its sites' utility (box: quartiles,
    whiskers: 5th–95th percentile, points: every site), the median marked
    with the entry's marker, the worst site marked and named."""
    enc = _encoding(data)
    fig = Figure(figsize=(8.5, 1.8 + 0.55 * len(entries)), layout="constrained")
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    labels = []
    for k, (m, p) in enumerate(entries):
        color = enc.color.get(m, "0.3")
        e = per[(per["method"] == m) & (per["privacy"] == p)]
        v = e["utility_mean"].to_numpy(dtype=float)
        yk = len(entries) - 1 - k
        ax.boxplot([v], positions=[yk], **HORIZONTAL, widths=0.5, whis=(5, 95),
                   showfliers=False, patch_artist=True,
                   boxprops={"facecolor": (*matplotlib.colors.to_rgb(color), 0.25),
                             "edgecolor": color},
                   medianprops={"color": color, "lw": 1.5},
                   whiskerprops={"color": color}, capprops={"color": color})
        ax.plot(v, yk + rng.uniform(-0.17, 0.17, len(v)), ls="", marker=".", ms=2.5,
                color=color, alpha=0.55)
        tag(ax.plot([float(np.median(v))], [yk], ls="", **enc.style(m, p, ms=6))[0], m, p)
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
               f"percentile, marker: median, ×: the site with the lowest mean over seeds)")
    enc.legend(fig, entries)
    return fig


def _clock(data: ReportData, ds: str) -> Figure | None:
    """Utility against virtual hours, per entry (records with a virtual clock only)."""
    meta = data.cells.drop_duplicates("cell_id").set_index("cell_id")[
        ["dataset", "method", "privacy", "status"]] \
        if not data.cells.empty else None
    rows = []
    for r in data.records:
        cid = str(r.get("cell_id"))
        if meta is None or cid not in meta.index:
            continue
        m = meta.loc[cid]
        if m["dataset"] != ds or m["status"] != "ok" or not simulated_network(r):
            continue
        for h in r.get("history") or []:
            if not isinstance(h, dict):
                continue
            cs, u = h.get("clock_s"), h.get("utility")
            if isinstance(cs, (int, float)) and isinstance(u, (int, float)) \
                    and not isinstance(cs, bool) and not isinstance(u, bool) \
                    and math.isfinite(cs) and math.isfinite(u):
                rows.append((m["method"], m["privacy"], h.get("round"), cs / 3600.0, u))
    if not rows:
        return None
    c = pd.DataFrame(rows, columns=["method", "privacy", "round", "hours", "utility"])
    c = c.groupby(["method", "privacy", "round"], sort=False).mean().reset_index()
    enc = _encoding(data)
    top = _top_entries(data, ds)
    entries = [e for e in top if ((c["method"] == e[0]) & (c["privacy"] == e[1])).any()]
    if not entries:
        return None
    fig = Figure(figsize=(8.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for m, p in entries:
        g = c[(c["method"] == m) & (c["privacy"] == p)].sort_values("round")
        st = enc.style(m, p, ms=4.5)
        tag(ax.plot(g["hours"], g["utility"], lw=1.3, markevery=max(1, len(g) // 5),
                    **st)[0], m, p)
    _chance_line(ax, _chance_level(data, ds))
    ax.set_xlabel("virtual hours (the simulated network's clock, end of each round)")
    ax.set_ylabel(f"{_metric(data, ds)} (pooled test set, mean over seeds)")
    ax.grid(True, color="0.93", lw=0.6)
    title(fig, f"{ds}: utility against virtual time, per protection")
    enc.legend(fig, entries)
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
    tops: list[np.ndarray] = []
    bottoms: list[np.ndarray] = []
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
            image = _image_grid(res, r)
            if image is None:
                continue
            psnr = res.get("psnr")
            lab = "\n".join([*textwrap.wrap(_entry(meta[1], meta[2]), 36),
                             f"{name}, seed {meta[3]}",
                             *([f"PSNR {psnr:.1f} dB"] if isinstance(psnr, (int, float))
                               and not isinstance(psnr, bool) else [])])
            rows.append((lab, image))
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


KINDS = {"tradeoff": _tradeoff, "attacks": _attacks, "roc": _roc, "clock": _clock,
         "convergence": _convergence, "sites": _sites, "reconstructions": _reconstructions}


def figures(data: ReportData) -> dict[str, tuple[str, str, Figure]]:
    """``{stem: (dataset, kind, figure)}`` for every figure the data supports
    (made once per :class:`ReportData`)."""
    if "figures" in data.cache:
        return data.cache["figures"]
    out = {}
    with matplotlib.rc_context(RC):  # type: ignore[arg-type]
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
        with matplotlib.rc_context(RC):  # type: ignore[arg-type]
            meta = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(buf, format=fmt, dpi=110, metadata=meta)
        data.cache[key] = buf.getvalue()
    return data.cache[key]


def write_figures(records: list[dict], out_dir: Path, formats: tuple[str, ...]) -> list[Path]:
    """Every figure of the report as ``figures/<stem>.<format>``."""
    from fedmedbench import output_dir, write_output

    output_dir(Path(out_dir), "figures")  # refused if a link, before anything is drawn
    paths = []
    data = build(records)
    for stem in figures(data):
        for f in formats:
            paths.append(write_output(Path(out_dir), f"figures/{stem}.{f}",
                                      render(data, stem, f)))
    return paths
