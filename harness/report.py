"""Comparison tables from result records (pandas underneath, tabulate out).

:func:`frame` flattens records into one row per cell; the table functions
aggregate over seeds. Reporter plugins build on these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate


def _label(rec: dict[str, Any], axis: str) -> str:
    lab = rec.get("labels") or {}
    if axis in lab:
        return str(lab[axis])
    cfg = rec["config"]
    v = cfg.get(axis)
    if axis == "privacy":
        return "+".join(p["name"] for p in v) if v else "none"
    return v["name"] if isinstance(v, dict) else "none"


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record: labels, seed, status, utility, privacy and cost."""
    rows = []
    for r in records:
        m = r.get("metrics") or {}
        u = m.get("utility") or {}
        p = m.get("privacy") or {}
        c = m.get("cost") or {}
        row: dict[str, Any] = {
            "cell_id": r["cell_id"], "status": r["status"],
            "dataset": _label(r, "dataset"), "partitioner": _label(r, "partitioner"),
            "algorithm": _label(r, "algorithm"), "aggregator": _label(r, "aggregator"),
            "privacy": _label(r, "privacy"), "compressor": _label(r, "compressor"),
            "adversary": _label(r, "adversary"), "seed": r["config"].get("seed"),
            "metric": u.get("metric"), "utility": _num(u.get("global")),
            "worst_site": _num(u.get("worst_site")),
            "epsilon": _num(p.get("epsilon")), "delta": _num(p.get("delta")),
            "accountant": p.get("accountant"),
            "bytes_up": _num(c.get("bytes_up")), "bytes_down": _num(c.get("bytes_down")),
            "wall_s": _num(c.get("wall_s")),
            "error": (r.get("error") or {}).get("message"),
        }
        for site, v in (u.get("per_site") or {}).items():
            row[f"site:{site}"] = _num(v)
        rows.append(row)
    return pd.DataFrame(rows)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else float("nan")


def mean_std(values: pd.Series) -> str:
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.3f} (n=1)"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} (n={len(v)})"


def method_label(df: pd.DataFrame) -> pd.Series:
    """algorithm, plus partitioner/aggregator/compressor/adversary where they vary."""
    parts = [df["algorithm"]]
    for axis in ("partitioner", "aggregator", "compressor", "adversary"):
        if df[axis].nunique() > 1:
            parts.append(axis[:4] + "=" + df[axis])
    out = parts[0]
    for p in parts[1:]:
        out = out + " " + p
    return out


def comparison_tables(records: list[dict[str, Any]], *, fmt: str = "github") -> str:
    """Per dataset: method × privacy utility (mean ± std over seeds), then
    per-site utility; failed, diverged and skipped cells are listed after."""
    if not records:
        return "no result records\n"
    df = frame(records)
    out: list[str] = []
    ok = df[df["status"] == "ok"].copy()
    if not ok.empty:
        ok["method"] = method_label(ok)
    for ds in sorted(df["dataset"].unique()):
        sub = ok[ok["dataset"] == ds] if not ok.empty else ok
        metric = sub["metric"].dropna().iloc[0] if not sub.empty else "utility"
        out.append(f"## {ds} — {metric} on the pooled test set (mean ± std over seeds)\n")
        if sub.empty:
            out.append("no successful cells\n")
            continue
        privs = list(dict.fromkeys(sub["privacy"]))
        table = []
        for method, g in sub.groupby("method", sort=False):
            table.append([method] + [mean_std(g[g["privacy"] == p]["utility"]) for p in privs])
        out.append(tabulate(table, headers=["method \\ privacy", *privs], tablefmt=fmt))
        eps = sub.dropna(subset=["epsilon"])
        if not eps.empty:
            out.append("")
            rows = []
            for (method, priv), g in eps.groupby(["method", "privacy"], sort=False):
                rows.append([method, priv, f"{g['epsilon'].mean():.3g}", f"{g['delta'].iloc[0]:g}",
                             g["accountant"].iloc[0]])
            out.append(tabulate(rows, headers=["method", "privacy", "ε", "δ", "accountant"],
                                tablefmt=fmt))
        site_cols = [c for c in sub.columns if c.startswith("site:") and sub[c].notna().any()]
        if site_cols:
            out.append(f"\n### {ds} — per-site {metric} (mean over seeds) and the worst site\n")
            rows = []
            for (method, priv), g in sub.groupby(["method", "privacy"], sort=False):
                rows.append([method, priv, *(_fmt(g[c].mean()) for c in site_cols),
                             _fmt(g["worst_site"].mean())])
            out.append(tabulate(rows, headers=["method", "privacy",
                                               *(c[5:] for c in site_cols), "worst"],
                                tablefmt=fmt))
        out.append("")
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        out.append("## Cells that did not finish ok\n")
        rows = [[r.status, r.dataset, r.algorithm, r.privacy, r.seed, _short(r.error)]
                for r in bad.itertuples()]
        out.append(tabulate(rows, headers=["status", "dataset", "algorithm", "privacy", "seed",
                                           "reason"], tablefmt=fmt))
        out.append("")
    return "\n".join(out) + "\n"


def _fmt(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _short(msg: Any, n: int = 120) -> str:
    s = "" if msg is None else str(msg).replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def summary_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    return {s: int(np.sum([r["status"] == s for r in records]))
            for s in ("ok", "failed", "skipped", "diverged")}
