"""Figures of a report (matplotlib, Agg canvas; PNG and SVG).

Per dataset:

- ``<dataset>-frontier``: the privacy–utility frontier, ε (log scale) against
  utility per method, entries without a DP guarantee at "no DP";
- ``<dataset>-attacks``: attack success (AUC for membership inference, PSNR
  for gradient inversion, the first of :data:`fedmedbench.report.ATTACK_HEADLINE`
  an attack reports) against ε;
- ``<dataset>-convergence``: utility and training loss per round;
- ``<dataset>-sites``: per-site utility bars with the worst site marked;
- ``<dataset>-reconstructions``: gradient-inversion reconstructions next to
  the originals, where attack records name PNG files (keys containing
  ``orig`` and ``recon``, as lists of paths or a list of
  ``{original, reconstruction}`` objects, or one ready grid under ``images``
  with the originals on top, as the built-in gradient-inversion attacks save).

Output is deterministic for the same records (SVG ids are salted with a
constant and no dates are written), so reports of shards and of a whole run
compare byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmedbench import Reporter
from fedmedbench.report import ATTACK_HEADLINE, ReportData, build

RC = {"svg.hashsalt": "fedmedbench", "svg.fonttype": "path", "font.size": 9,
      "axes.spines.top": False, "axes.spines.right": False}
MAX_ENTRIES = 10  # bars per site / lines per plot before the figure keeps the top ones


def slug(s: str) -> str:
    """A file-name-safe stem for a dataset name (a hash keeps odd names apart)."""
    base = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "dataset"
    if base != s:
        base += "-" + hashlib.sha256(s.encode()).hexdigest()[:6]
    return base


def _colors(data: ReportData, ds: str) -> dict[str, str]:
    """One colour per method of a dataset, the same in every figure."""
    s = data.summary[data.summary["dataset"] == ds]
    return {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(s["method"]))}


def _styles(data: ReportData, ds: str) -> dict[str, str]:
    """One line style per privacy setting of a dataset."""
    s = data.summary[data.summary["dataset"] == ds]
    privs = sorted(set(s["privacy"]), key=lambda p: (p != "none", p))
    return {p: ("-", "--", ":", "-.")[i % 4] for i, p in enumerate(privs)}


def _entry(method: str, privacy: str) -> str:
    return method if privacy == "none" else f"{method} [{privacy}]"


def _eps_x(eps: np.ndarray) -> tuple[np.ndarray, float]:
    """Map ε to x; NaN (no DP) goes to a position right of every finite ε."""
    fin = eps[np.isfinite(eps)]
    hi = float(fin.max()) if len(fin) else 1.0
    nodp = 10 ** (math.ceil(math.log10(max(hi, 1e-3))) + 1)
    return np.where(np.isfinite(eps), eps, nodp), nodp


def _eps_axis(ax: Any, nodp: float, xs: np.ndarray) -> None:
    ax.set_xscale("log")
    ax.axvline(nodp / 3.2, color="0.8", lw=0.8, ls=":")
    lo = float(np.nanmin(xs)) if len(xs) else 1.0
    ax.set_xlim(min(lo, nodp / 10) / 2, nodp * 2)
    ticks = [t for t in ax.get_xticks() if t < nodp / 3.2 and t >= min(lo, nodp / 10) / 2]
    ax.set_xticks([*ticks, nodp], [*(f"{t:g}" for t in ticks), "no DP"])
    ax.set_xlabel("ε (each at its own δ)")


def _frontier(data: ReportData, ds: str) -> Figure | None:
    s = data.summary[(data.summary["dataset"] == ds) & (data.summary["n"] > 0)]
    if s.empty:
        return None
    keep = _top_entries(data, ds)
    s = s[[m in {k[0] for k in keep} for m in s["method"]]]
    fig = Figure(figsize=(8.0, 4.0))
    fig.subplots_adjust(left=0.09, right=0.72, bottom=0.13, top=0.9)
    ax = fig.add_subplot()
    xs, nodp = _eps_x(s["epsilon"].to_numpy(dtype=float))
    s = s.assign(_x=xs)
    col = _colors(data, ds)
    for method, g in s.groupby("method", sort=False):
        g = g.sort_values("_x")
        ax.errorbar(g["_x"], g["utility_mean"], yerr=g["utility_std"].fillna(0),
                    marker="o", ms=4, capsize=2, lw=1, label=str(method), color=col[method])
    _eps_axis(ax, nodp, xs)
    ax.set_ylabel(f"{s['metric'].dropna().iloc[0] if s['metric'].notna().any() else 'utility'}"
                  " (mean ± std over seeds)")
    ax.set_title(f"{ds}: privacy–utility frontier")
    _legend(ax)
    return fig


def _attacks(data: ReportData, ds: str) -> Figure | None:
    a = data.attacks[(data.attacks["dataset"] == ds) & (data.attacks["metric"]
                                                        != "not_applicable")]
    if a.empty:
        return None
    panels = []
    for name, g in a.groupby("attack", sort=True):
        metric = next((m for m in ATTACK_HEADLINE if m in set(g["metric"])),
                      sorted(g["metric"])[0])
        panels.append((name, metric, g[g["metric"] == metric]))
    fig = Figure(figsize=(3.6 * len(panels) + 2.2, 3.8))
    fig.subplots_adjust(left=0.3 / len(panels), right=1 - 2.0 / (3.6 * len(panels) + 2.2),
                        bottom=0.14, top=0.84, wspace=0.3)
    keep = {k[0] for k in _top_entries(data, ds)}
    for i, (name, metric, g) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        xs, nodp = _eps_x(data.attacks[data.attacks["dataset"] == ds]["epsilon"]
                          .to_numpy(dtype=float))
        gx, _ = _eps_x(g["epsilon"].to_numpy(dtype=float))
        gx = np.where(np.isfinite(g["epsilon"].to_numpy(dtype=float)), gx, nodp)
        g = g.assign(_x=gx)
        col = _colors(data, ds)
        for method, h in g.groupby("method", sort=False):
            if method not in keep:
                continue
            h = h.sort_values("_x")
            ax.errorbar(h["_x"], h["mean"], yerr=h["std"].fillna(0), marker="o", ms=4,
                        capsize=2, lw=1, label=str(method), color=col.get(method))
        if metric == "auc":
            ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
        _eps_axis(ax, nodp, xs)
        ax.set_ylabel(metric)
        ax.set_title(f"{name}", fontsize=9)
        if i == len(panels) - 1:
            _legend(ax)
    fig.suptitle(f"{ds}: attack success against ε")
    return fig


def _convergence(data: ReportData, ds: str) -> Figure | None:
    c = data.convergence[data.convergence["dataset"] == ds]
    if c.empty:
        return None
    fig = Figure(figsize=(10, 3.6))
    fig.subplots_adjust(left=0.07, right=0.76, bottom=0.14, top=0.86, wspace=0.28)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    keep = _top_entries(data, ds)
    col, ls = _colors(data, ds), _styles(data, ds)
    for (method, priv), g in c.groupby(["method", "privacy"], sort=False):
        if (method, priv) not in keep:
            continue
        lab = _entry(str(method), str(priv))
        style = {"color": col.get(method), "ls": ls.get(priv, "-"), "lw": 1.2, "label": lab}
        u = g.dropna(subset=["utility"])
        ax1.plot(u["round"], u["utility"], **style)
        ax2.plot(g["round"], g["loss"], **style)
    metric = data.summary[data.summary["dataset"] == ds]["metric"].dropna()
    ax1.set_ylabel(metric.iloc[0] if len(metric) else "utility")
    ax2.set_ylabel("training loss (mean over clients)")
    for ax in (ax1, ax2):
        ax.set_xlabel("round")
    _legend(ax2)
    fig.suptitle(f"{ds}: convergence (mean over seeds)")
    return fig


def _top_entries(data: ReportData, ds: str) -> set[tuple[str, str]]:
    lb = data.leaderboard[(data.leaderboard["dataset"] == ds)
                          & (data.leaderboard["tier"] == "no formal guarantee")]
    return {(r.method, r.privacy) for r in lb.head(MAX_ENTRIES).itertuples()}


def _sites(data: ReportData, ds: str) -> Figure | None:
    st = data.sites[data.sites["dataset"] == ds]
    if st.empty:
        return None
    keep = _top_entries(data, ds)
    st = st[[(m, p) in keep for m, p in zip(st["method"], st["privacy"])]]
    names = [x for x in dict.fromkeys(st["site"]) if x != "(worst)"]
    entries = list(dict.fromkeys(zip(st["method"], st["privacy"])))
    if not names or not entries:
        return None
    w = max(6.4, 1.2 * len(names) * max(1, len(entries)) / 3) + 2.2
    fig = Figure(figsize=(w, 4.0))
    fig.subplots_adjust(left=0.6 / w, right=1 - 2.2 / w, bottom=0.16, top=0.9)
    ax = fig.add_subplot()
    width = 0.8 / len(entries)
    x = np.arange(len(names))
    for i, (m, p) in enumerate(entries):
        e = st[(st["method"] == m) & (st["privacy"] == p)]
        vals = dict(zip(e["site"], e["utility_mean"]))
        y = np.array([vals.get(n, np.nan) for n in names], dtype=float)
        bars = ax.bar(x + (i - (len(entries) - 1) / 2) * width, y, width,
                      label=_entry(str(m), str(p)))
        if np.isfinite(y).any():
            j = int(np.nanargmin(y))
            bars[j].set_hatch("//")
            bars[j].set_edgecolor("black")
    ax.set_xticks(x, [str(n) for n in names], rotation=20 if len(names) > 4 else 0)
    metric = data.summary[data.summary["dataset"] == ds]["metric"].dropna()
    ax.set_ylabel(metric.iloc[0] if len(metric) else "utility")
    ax.set_title(f"{ds}: utility per site (hatched: each entry's worst site)")
    _legend(ax)
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


def _resolve(p: str, rec: dict[str, Any]) -> Path | None:
    """An image path of a record: absolute, relative to a results directory
    the record was read from, in that directory's ``artifacts/<cell_id>/``
    (results moved or merged from shards), or relative to the working
    directory."""
    path = Path(p)
    cands = [path] if path.is_absolute() else []
    for d in rec.get("_dirs", []):
        cands += [Path(d) / path, Path(d) / "artifacts" / str(rec.get("cell_id")) / path.name]
    cands.append(path)
    return next((c for c in cands if c.is_file()), None)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    if a.max() > 1.0:
        a = a / 255.0
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return a[..., :3]


def _image_grid(res: dict[str, Any], rec: dict[str, Any]) -> np.ndarray | None:
    """Originals over reconstructions as one RGB array: the attack's own grid
    (key ``images``: one PNG, ground truth on top) or composed from pairs."""
    from matplotlib.image import imread

    ready = res.get("images")
    if isinstance(ready, str) and ready.lower().endswith(".png"):
        p = _resolve(ready, rec)
        return _rgb(imread(str(p))) if p is not None else None
    tops, bottoms = [], []
    for o, r in _png_pairs(res)[:6]:
        po, pr = _resolve(o, rec), _resolve(r, rec)
        if po is None or pr is None:
            continue
        a, b = _rgb(imread(str(po))), _rgb(imread(str(pr)))
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
            if not isinstance(res, dict) or "not_applicable" in res:
                continue
            grid = _image_grid(res, r)
            if grid is None:
                continue
            psnr = res.get("psnr")
            lab = (f"{_entry(meta[1], meta[2])}\n{name}, seed {meta[3]}"
                   + (f"\nPSNR {psnr:.1f} dB" if isinstance(psnr, (int, float)) else ""))
            rows.append((lab, grid))
            if len(rows) == 8:
                break
    if not rows:
        return None
    aspect = max(g.shape[1] / g.shape[0] for _, g in rows)
    fig = Figure(figsize=(min(12.0, 2.2 + 1.6 * aspect), 1.7 * len(rows) + 0.6))
    for i, (lab, grid) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(grid, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(lab, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"{ds}: gradient inversion, originals (top) over reconstructions (bottom)",
                 fontsize=9)
    fig.subplots_adjust(left=0.3, right=0.98, bottom=0.02, top=1 - 0.5 / fig.get_figheight(),
                        hspace=0.25)
    return fig


KINDS = {"frontier": _frontier, "attacks": _attacks, "convergence": _convergence,
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


def _legend(ax: Any) -> None:
    """Legend right of the axes (a fixed place is far cheaper than "best")."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


class Figures(Reporter):
    """Privacy–utility frontier, attacks against ε, convergence, per-site
    bars and reconstruction grids as PNG and SVG under ``figures/``."""

    name = "figures"

    def __init__(self, *, formats: tuple[str, ...] | list[str] = ("png", "svg")) -> None:
        bad = [f for f in formats if f not in ("png", "svg")]
        if bad:
            raise ValueError(f"formats={list(formats)!r}: allowed are 'png' and 'svg'")
        self.formats = tuple(formats)

    def write(self, records: list[dict], out_dir: Path) -> list[Path]:
        d = Path(out_dir) / "figures"
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        data = build(records)
        for stem in figures(data):
            for f in self.formats:
                p = d / f"{stem}.{f}"
                p.write_bytes(render(data, stem, f))
                paths.append(p)
        return paths


COMPONENTS = (Figures,)
