"""Report data from result records: tables, the leaderboard, the FL-versus-
baselines comparison (pandas underneath, tabulate for text).

:func:`build` turns records into a :class:`ReportData` (one
:class:`pandas.DataFrame` per table); reporter plugins (markdown, csv, json,
figures, html) write it out. Everything here is a pure function of the *set*
of records: the same records give the same report, whatever the order they
were read in or the directories (shards) they came from.

:func:`comparison_tables` is the terminal summary ``fedmedbench run`` prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tabulate import tabulate

AXES = ("dataset", "partitioner", "algorithm", "aggregator", "privacy", "compressor",
        "adversary")
# privacy tiers of the leaderboard: (name, largest ε admitted); nested
TIERS: tuple[tuple[str, float], ...] = (
    ("no formal guarantee", math.inf), ("ε ≤ 8", 8.0), ("ε ≤ 1", 1.0))
RANKING_RULE = (
    "Entries are (method, privacy setting) pairs of one dataset, over the seeds whose cell "
    "finished ok. Tiers are nested by the guarantee an entry meets: 'ε ≤ 1' lists entries "
    "whose largest ε over seeds is at most 1 (each at its own δ, shown), 'ε ≤ 8' those at "
    "most 8 (so it includes the 'ε ≤ 1' entries), and 'no formal guarantee' lists every "
    "entry, including those without differential privacy (no privacy, or cryptographic "
    "protection only). Within a tier entries are ranked by mean utility on the pooled test "
    "set (higher is better); ties are broken by the mean worst-site utility, then by fewer "
    "bytes communicated, then by name. The centralized (pooled data) and local-only "
    "baselines are ranked like any other entry. Sample-level ε (dp-sgd: one patient record) "
    "and client-level ε (dp-fedavg: a whole hospital) protect different units; the "
    "accountant column says which, and entries of both kinds share a tier.")
# attack metrics shown first, in this order; other numeric keys follow by name
ATTACK_METRICS = ("auc", "advantage", "balanced_accuracy", "tpr_at_1pct_fpr",
                  "tpr_at_0.1pct_fpr", "audited_epsilon", "mse", "psnr", "ssim",
                  "label_accuracy")
# attack metric plotted against ε (first present wins), with its direction
ATTACK_HEADLINE = ("auc", "advantage", "psnr", "ssim", "label_accuracy", "mse")
TIMING_KEYS = ("wall_s", "train_s", "privacy_s")
TOPOLOGY_ORDER = {"centralized": 0, "local": 1, "federated": 2}
#: a record's round protocol, as the report's topology column names it
TOPOLOGY_OF_PROTOCOL = {"pooled": "centralized", "isolated": "local", "federated": "federated",
                        "personalized": "personalized"}


# --------------------------------------------------------------------------
# flattening
# --------------------------------------------------------------------------


def _d(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")
    return float(v)


def _label(rec: dict[str, Any], axis: str) -> str:
    lab = _d(rec.get("labels"))
    if axis in lab and lab[axis] is not None:
        return str(lab[axis])
    v = _d(rec.get("config")).get(axis)
    if axis == "privacy":
        return "+".join(str(_d(p).get("name")) for p in v) if isinstance(v, list) and v \
            else "none"
    return str(v["name"]) if isinstance(v, dict) and "name" in v else "none"


_TOPOLOGY_CACHE: dict[str, str] = {}


def topology_of(algorithm: str) -> str:
    """An algorithm's topology (``centralized``, ``local``, ``federated`` or
    ``personalized``, from its round protocol) from the installed plugin;
    ``federated`` when the plugin is not installed (reports from CI artifacts
    read on another machine)."""
    if algorithm not in _TOPOLOGY_CACHE:
        topo = "federated"
        from fedmedbench.errors import ConfigError
        from fedmedbench.registry import get_registry

        try:
            proto = str(get_registry().get("algorithm", algorithm).cls.protocol)
            topo = TOPOLOGY_OF_PROTOCOL.get(proto, "federated")
        except ConfigError:  # not installed here: records older than the protocol field
            pass
        _TOPOLOGY_CACHE[algorithm] = topo
    return _TOPOLOGY_CACHE[algorithm]


def _provenance(rec: dict[str, Any]) -> str:
    p = _d(rec.get("provenance"))
    parts = [f"fedmedbench {p.get('fedmedbench', '?')}"]
    commit = p.get("git_commit")
    if commit:
        parts.append(f"commit {str(commit)[:10]}")
    dists = sorted({f"{_d(v).get('distribution')} {_d(v).get('version')}"
                    for v in _d(p.get("plugins")).values()
                    if _d(v).get("distribution") not in (None, "fedmedbench")})
    parts += dists
    if p.get("torch"):
        parts.append(f"torch {p['torch']}")
    return ", ".join(parts)


def strip_timings(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``records`` without wall-clock measurements (cost ``wall_s``,
    ``train_s``, ``privacy_s`` and attack ``seconds``), so that reports of
    the same cells from different runs compare byte for byte."""
    out = []
    for r in records:
        r = dict(r)
        m = dict(_d(r.get("metrics")))
        if "cost" in m:
            m["cost"] = {k: v for k, v in _d(m["cost"]).items() if k not in TIMING_KEYS}
        if "attacks" in m:
            m["attacks"] = {k: ({x: y for x, y in v.items() if x != "seconds"}
                                if isinstance(v, dict) else v)
                            for k, v in _d(m["attacks"]).items()}
        r["metrics"] = m
        out.append(r)
    return out


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record: axis labels, seed, status, utility, per-site
    utility (``site:<name>``), privacy, cost, attack metrics
    (``attack:<name>:<metric>``, ``attack:<name>:not_applicable``) and a
    provenance summary. Missing values are NaN; nothing here raises on a
    record with missing keys."""
    rows = []
    for r in sorted(records, key=lambda r: str(r.get("cell_id"))):
        m = _d(r.get("metrics"))
        u, p, c = _d(m.get("utility")), _d(m.get("privacy")), _d(m.get("cost"))
        cfg = _d(r.get("config"))
        alg = _d(cfg.get("algorithm")).get("name") or _label(r, "algorithm")
        row: dict[str, Any] = {
            "cell_id": str(r.get("cell_id")), "status": r.get("status"),
            **{axis: _label(r, axis) for axis in AXES},
            "algorithm_name": str(alg),
            "topology": str(TOPOLOGY_OF_PROTOCOL.get(str(r.get("protocol")))
                            or r.get("topology") or topology_of(str(alg))),
            "seed": cfg.get("seed"), "rounds": cfg.get("rounds"),
            "metric": u.get("metric"), "utility": _num(u.get("global")),
            "worst_site": _num(u.get("worst_site")),
            "privacy_level": p.get("level"), "epsilon": _num(p.get("epsilon")),
            "delta": _num(p.get("delta")),
            # sample-level and client-level ε protect different units: say which
            "accountant": (f"{p.get('accountant')} ({p.get('unit')}-level)"
                           if p.get("accountant") and p.get("unit") else p.get("accountant")),
            "bytes_up": _num(c.get("bytes_up")), "bytes_down": _num(c.get("bytes_down")),
            "error": _d(r.get("error")).get("message"),
            "provenance": _provenance(r),
        }
        row["bytes"] = row["bytes_up"] + row["bytes_down"]
        row["clipped_coordinates"] = _num(c.get("clipped_coordinates"))
        for k in TIMING_KEYS:
            if k in c:
                row[k] = _num(c.get(k))
        for site, v in _d(u.get("per_site")).items():
            row[f"site:{site}"] = _num(v)
        for name, res in _d(m.get("attacks")).items():
            res = _d(res)
            if "not_applicable" in res:
                row[f"attack:{name}:not_applicable"] = str(res["not_applicable"])
                continue
            for k, v in res.items():
                if k != "seconds" and not isinstance(v, bool) and isinstance(v, (int, float)):
                    row[f"attack:{name}:{k}"] = float(v)
            # the empirical privacy audit (Clopper-Pearson lower bound on ε) sits beside
            # the claimed ε in every attack table
            low = _d(res.get("audit")).get("epsilon_lower_bound")
            if isinstance(low, (int, float)) and not isinstance(low, bool):
                row[f"attack:{name}:audited_epsilon"] = float(low)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["method"] = method_label(df)
    return df


def method_label(df: pd.DataFrame) -> pd.Series:
    """algorithm, plus partitioner/aggregator/compressor/adversary where they vary."""
    out = df["algorithm"].astype(str)
    for axis in ("partitioner", "aggregator", "compressor", "adversary"):
        if df[axis].nunique() > 1:
            out = out + " " + axis[:4] + "=" + df[axis].astype(str)
    return out


# --------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------


def _stats(v: pd.Series) -> tuple[float, float, float, int]:
    """mean, sample std, half-width of the 95% t-interval, count."""
    x = v.dropna().to_numpy(dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, math.nan, 1
    sd = float(x.std(ddof=1))
    return float(x.mean()), sd, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)), n


def _sort_entries(df: pd.DataFrame) -> pd.DataFrame:
    """Stable display order: centralized, local, then federated methods by
    name; privacy ``none`` first, then by name."""
    if df.empty:
        return df
    key = pd.DataFrame({
        "d": df["dataset"],
        "t": df["topology"].map(lambda t: TOPOLOGY_ORDER.get(t, 3)),
        "m": df["method"], "p0": df["privacy"] != "none", "p": df["privacy"]})
    order = key.sort_values(["d", "t", "m", "p0", "p"], kind="mergesort").index
    return df.loc[order].reset_index(drop=True)


def _first(v: pd.Series) -> Any:
    v = v.dropna()
    return v.iloc[0] if len(v) else None


def _join(v: pd.Series) -> str:
    return "; ".join(sorted({str(x) for x in v.dropna()}))


KEYS = ["dataset", "method", "privacy"]


def _ci95(sd: pd.Series, n: pd.Series) -> pd.Series:
    """Half-width of the 95% t-interval of a mean (NaN for fewer than 2)."""
    n = n.astype(float)
    t = stats.t.ppf(0.975, np.maximum(n - 1, 1))
    return pd.Series(np.where(n >= 2, t * sd / np.sqrt(n), np.nan), index=sd.index)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset × method × privacy over its seeds: cell counts by
    status, utility mean/std/95% interval, worst site, ε (largest over seeds)
    with δ and accountant, bytes and seconds (means over ok seeds)."""
    cols = ["dataset", "method", "privacy", "topology", "metric", "n", "cells", "failed",
            "utility_mean", "utility_std", "utility_ci95", "worst_site_mean", "epsilon",
            "delta", "accountant", "privacy_level", "bytes_up", "bytes_down", "bytes",
            "wall_s", "train_s", "privacy_s", "clipped_coordinates", "seeds", "provenance"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    allg = (df.assign(_bad=df["status"] != "ok").groupby(KEYS, sort=True)
            .agg(topology=("topology", "first"), cells=("cell_id", "size"),
                 failed=("_bad", "sum")))
    ok = df[df["status"] == "ok"]
    spec = {"metric": ("metric", "first"), "n": ("utility", "count"),
            "utility_mean": ("utility", "mean"), "utility_std": ("utility", "std"),
            "worst_site_mean": ("worst_site", "mean"), "epsilon": ("epsilon", "max"),
            "delta": ("delta", "max"), "accountant": ("accountant", "first"),
            "privacy_level": ("privacy_level", "first")}
    for k in ("bytes_up", "bytes_down", "bytes", *TIMING_KEYS, "clipped_coordinates"):
        if k in ok:
            spec[k] = (k, "mean")
    okg = ok.groupby(KEYS, sort=True).agg(**spec)
    okg["seeds"] = ok.groupby(KEYS, sort=True)["seed"].agg(
        lambda v: ",".join(str(int(x)) for x in sorted(v.dropna())))
    okg["provenance"] = ok.groupby(KEYS, sort=True)["provenance"].agg(_join)
    out = allg.join(okg, how="left").reset_index()
    out["n"] = out["n"].fillna(0).astype(int)
    out["failed"] = out["failed"].astype(int)
    out["utility_ci95"] = _ci95(out["utility_std"], out["n"])
    out.loc[out["n"] < 2, "utility_std"] = math.nan
    out = _sort_entries(out)
    return out[[c for c in cols if c in out]]


def sites(df: pd.DataFrame) -> pd.DataFrame:
    """Long format: dataset, method, privacy, site, mean utility over ok seeds;
    the row ``site == "(worst)"`` holds the mean worst-site utility."""
    cols = ["dataset", "method", "privacy", "topology", "site", "utility_mean", "n"]
    ok = df[df["status"] == "ok"] if not df.empty else df
    site_cols = [c for c in ok.columns if c.startswith("site:")]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    long = ok.melt(id_vars=[*KEYS, "topology"], value_vars=[*site_cols, "worst_site"],
                   var_name="site", value_name="u").dropna(subset=["u"])
    order = {c: i for i, c in enumerate([*site_cols, "worst_site"])}
    g = (long.groupby([*KEYS, "topology", "site"], sort=False)["u"]
         .agg(["mean", "count"]).reset_index())
    g = g.assign(_o=g["site"].map(order)).sort_values("_o", kind="mergesort")
    g["site"] = [s[5:] if s.startswith("site:") else "(worst)" for s in g["site"]]
    out = g.rename(columns={"mean": "utility_mean", "count": "n"})[cols]
    return _sort_entries(out.reset_index(drop=True))


def attacks(df: pd.DataFrame) -> pd.DataFrame:
    """Long format: dataset, method, privacy, ε, attack, metric, mean, std, n;
    an attack that did not apply has metric ``not_applicable`` and the
    reason in ``note``."""
    cols = ["dataset", "method", "privacy", "topology", "epsilon", "attack", "metric",
            "mean", "std", "n", "note"]
    ok = df[df["status"] == "ok"] if not df.empty else df
    acols = [c for c in ok.columns if c.startswith("attack:")]
    if not acols or ok.empty:
        return pd.DataFrame(columns=cols)
    eps = ok.groupby(KEYS, sort=False)["epsilon"].max().rename("epsilon")
    num = [c for c in acols if not c.endswith(":not_applicable")]
    na = [c for c in acols if c.endswith(":not_applicable")]
    parts = []
    if num:
        long = ok.melt(id_vars=[*KEYS, "topology"], value_vars=num, var_name="col",
                       value_name="v").dropna(subset=["v"])
        g = long.groupby([*KEYS, "topology", "col"], sort=False)["v"].agg(
            ["mean", "std", "count"]).reset_index()
        g["note"] = ""
        parts.append(g)
    if na:
        long = ok.melt(id_vars=[*KEYS, "topology"], value_vars=na, var_name="col",
                       value_name="v").dropna(subset=["v"])
        g = long.groupby([*KEYS, "topology", "col"], sort=False)["v"].agg(
            note=_join, count="count").reset_index()
        g["mean"] = g["std"] = math.nan
        parts.append(g)
    g = pd.concat(parts, ignore_index=True)
    if g.empty:
        return pd.DataFrame(columns=cols)
    split = g["col"].str.split(":", n=2, expand=True)
    g["attack"], g["metric"] = split[1], split[2]
    g["_o"] = [(ATTACK_METRICS.index(m) if m in ATTACK_METRICS else
                99 if m != "not_applicable" else 100) for m in g["metric"]]
    g = g.sort_values(["attack", "_o", "metric"], kind="mergesort")
    g = g.join(eps, on=KEYS).rename(columns={"count": "n"})
    return _sort_entries(g[cols].reset_index(drop=True))


def baseline_comparison(summ: pd.DataFrame) -> pd.DataFrame:
    """The review's central comparison: every federated entry against the
    centralized (pooled data) and local-only baselines of the same dataset
    *without* privacy (the reference a collaboration has to beat or approach).

    ``vs_centralized`` = FL − centralized, ``vs_local`` = FL − local, and
    ``gap_closed`` = (FL − local) / (centralized − local): 1 means FL matches
    pooling the data, 0 means it is no better than each site alone."""
    cols = ["dataset", "method", "privacy", "metric", "utility_mean", "n", "centralized",
            "local", "vs_centralized", "vs_local", "gap_closed", "worst_site_mean",
            "local_worst_site"]
    rows = []
    if summ.empty:
        return pd.DataFrame(columns=cols)
    def ref(g: pd.DataFrame, topo: str, col: str = "utility_mean") -> float:
        v = g[(g["topology"] == topo) & (g["privacy"] == "none")][col].dropna()
        return float(v.max()) if len(v) else math.nan

    for ds, g in summ.groupby("dataset", sort=True):
        cen, loc = ref(g, "centralized"), ref(g, "local")
        loc_w = ref(g, "local", "worst_site_mean")
        for r in g[g["topology"] == "federated"].itertuples():
            u = r.utility_mean
            gap = (u - loc) / (cen - loc) if abs(cen - loc) > 1e-12 else math.nan
            rows.append([ds, r.method, r.privacy, r.metric, u, r.n, cen, loc, u - cen,
                         u - loc, gap, r.worst_site_mean, loc_w])
    return pd.DataFrame(rows, columns=cols)


def leaderboard(summ: pd.DataFrame) -> pd.DataFrame:
    """Entries ranked per dataset within each privacy tier (:data:`TIERS`,
    rule in :data:`RANKING_RULE`)."""
    cols = ["dataset", "tier", "rank", "method", "privacy", "metric", "utility_mean",
            "utility_std", "utility_ci95", "n", "worst_site_mean", "epsilon", "delta",
            "accountant", "bytes", "provenance"]
    ok = summ[summ["n"] > 0] if not summ.empty else summ
    rows = []
    for ds, g in ok.groupby("dataset", sort=True):
        for tier, bound in TIERS:
            if math.isinf(bound):
                t = g
            else:
                t = g[g["epsilon"].notna() & (g["epsilon"] <= bound)]
            if t.empty:
                continue
            t = t.assign(_u=-t["utility_mean"].fillna(-math.inf),
                         _w=-t["worst_site_mean"].fillna(-math.inf),
                         _b=t["bytes"].fillna(math.inf))
            t = t.sort_values(["_u", "_w", "_b", "method", "privacy"], kind="mergesort")
            for i, r in enumerate(t.itertuples(), 1):
                rows.append([ds, tier, i, r.method, r.privacy, r.metric, r.utility_mean,
                             r.utility_std, r.utility_ci95, r.n, r.worst_site_mean,
                             r.epsilon, r.delta, r.accountant, r.bytes, r.provenance])
    return pd.DataFrame(rows, columns=cols)


def convergence(records: list[dict[str, Any]], df: pd.DataFrame) -> pd.DataFrame:
    """Long format: dataset, method, privacy, round, mean utility and loss over
    ok seeds (rounds where utility was evaluated)."""
    cols = ["dataset", "method", "privacy", "topology", "round", "utility", "loss",
            "epsilon", "n"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    meta = df.set_index("cell_id")[["dataset", "method", "privacy", "topology", "status"]]
    rows = []
    for r in records:
        cid = str(r.get("cell_id"))
        if cid not in meta.index or meta.at[cid, "status"] != "ok":
            continue
        h = r.get("history")
        if not isinstance(h, list):
            continue
        m = meta.loc[cid]
        for e in h:
            e = _d(e)
            if "round" in e:
                rows.append([m["dataset"], m["method"], m["privacy"], m["topology"],
                             int(e["round"]), _num(e.get("utility")), _num(e.get("loss")),
                             _num(e.get("epsilon"))])
    if not rows:
        return pd.DataFrame(columns=cols)
    long = pd.DataFrame(rows, columns=cols[:-1])
    out = (long.groupby(["dataset", "method", "privacy", "topology", "round"], sort=True)
           .agg(utility=("utility", "mean"), loss=("loss", "mean"),
                epsilon=("epsilon", "max"), n=("utility", "count")).reset_index())
    return out[cols]


def failures(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["status", "dataset", "method", "privacy", "seed", "cell_id", "reason"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    bad = df[df["status"] != "ok"]
    out = pd.DataFrame({"status": bad["status"], "dataset": bad["dataset"],
                        "method": bad["method"], "privacy": bad["privacy"],
                        "seed": bad["seed"], "cell_id": bad["cell_id"],
                        "reason": bad["error"].map(lambda s: "" if s is None else str(s))})
    return out.sort_values(["dataset", "status", "method", "privacy", "seed", "cell_id"],
                           kind="mergesort").reset_index(drop=True)


@dataclass
class ReportData:
    """Every table of a report, computed once from a set of records."""

    records: list[dict[str, Any]]
    cells: pd.DataFrame
    summary: pd.DataFrame
    sites: pd.DataFrame
    attacks: pd.DataFrame
    baselines: pd.DataFrame
    leaderboard: pd.DataFrame
    convergence: pd.DataFrame
    failures: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # for reporters (rendered figures)

    @property
    def datasets(self) -> list[str]:
        return sorted(self.cells["dataset"].unique()) if not self.cells.empty else []

    def tables(self) -> dict[str, pd.DataFrame]:
        """The exported tables by file stem (``cells`` has one row per record)."""
        return {"leaderboard": self.leaderboard, "summary": self.summary,
                "baselines": self.baselines, "sites": self.sites, "attacks": self.attacks,
                "convergence": self.convergence, "failures": self.failures,
                "cells": self.cells}


_LAST: list[Any] = [None, None]


def build(records: list[dict[str, Any]]) -> ReportData:
    """All report tables from ``records`` (merged, one per cell id).

    Reporters run one after another on the same list: the last result is
    reused while the very same list object comes again."""
    key = (len(records), tuple(id(r) for r in records))
    if _LAST[0] is not None and _LAST[0][0] is records and _LAST[0][1] == key:
        return _LAST[1]
    data = _build(records)
    _LAST[:] = [(records, key), data]
    return data


def _build(records: list[dict[str, Any]]) -> ReportData:
    records = sorted(records, key=lambda r: str(r.get("cell_id")))
    df = frame(records)
    summ = summary(df)
    return ReportData(
        records=records, cells=df, summary=summ, sites=sites(df), attacks=attacks(df),
        baselines=baseline_comparison(summ), leaderboard=leaderboard(summ),
        convergence=convergence(records, df), failures=failures(df),
        counts=summary_counts(records))


# --------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: ``—`` for missing, fixed digits for floats."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_eps(eps: Any, delta: Any = None) -> str:
    """ε with its δ: ``3 (δ=1e-05)``; ``∞`` where there is no DP guarantee."""
    if eps is None or (isinstance(eps, float) and math.isnan(eps)):
        return "∞ (no DP)"
    s = f"{eps:.3g}"
    if delta is not None and not (isinstance(delta, float) and math.isnan(delta)):
        s += f" (δ={delta:.0e})" if delta else " (δ=0)"
    return s


def fmt_bytes(b: Any) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "—"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= k:
            return f"{b / k:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_utility(mean: float, sd: float, n: int) -> str:
    if not n:
        return "—"
    if n == 1 or math.isnan(sd):
        return f"{mean:.3f} (n={n})"
    return f"{mean:.3f} ± {sd:.3f} (n={n})"


def short(msg: Any, n: int = 120) -> str:
    s = "" if msg is None else str(msg).replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def text_tables(data: ReportData) -> dict[str, list[tuple[str, list[str], list[list[str]]]]]:
    """Per dataset, the display tables as (title, headers, rows) of strings;
    the key ``""`` holds tables that span datasets (failures). The markdown,
    terminal and HTML writers all render these, so they show the same cells."""
    out: dict[str, list[tuple[str, list[str], list[list[str]]]]] = {}
    s = data.summary
    for ds in data.datasets:
        tabs: list[tuple[str, list[str], list[list[str]]]] = []
        g = s[s["dataset"] == ds]
        metric = _first(g["metric"]) or "utility"
        ok = g[g["n"] > 0]
        if ok.empty:
            out[ds] = [(f"{ds}: no successful cells", [], [])]
            continue
        privs = sorted(ok["privacy"].unique(), key=lambda p: (p != "none", p))
        methods = list(dict.fromkeys(ok["method"]))
        cell = {(r.method, r.privacy): fmt_utility(r.utility_mean, r.utility_std, int(r.n))
                for r in ok.itertuples()}
        grid = [[m, *(cell.get((m, p), "—") for p in privs)] for m in methods]
        tabs.append((f"{metric} on the pooled test set (mean ± std over seeds, n seeds)",
                     ["method \\ privacy", *privs], grid))
        lb = data.leaderboard[data.leaderboard["dataset"] == ds]
        for tier, _ in TIERS:
            t = lb[lb["tier"] == tier]
            if t.empty:
                continue
            tabs.append((f"leaderboard, {tier}",
                         ["rank", "method", "privacy", metric, "95% CI", "worst site",
                          "ε (δ)", "bytes", "provenance"],
                         [[str(r.rank), r.method, r.privacy,
                           fmt_utility(r.utility_mean, r.utility_std, r.n),
                           "—" if math.isnan(r.utility_ci95) else f"± {r.utility_ci95:.3f}",
                           fmt(r.worst_site_mean), fmt_eps(r.epsilon, r.delta),
                           fmt_bytes(r.bytes), r.provenance] for r in t.itertuples()]))
        b = data.baselines[data.baselines["dataset"] == ds]
        if not b.empty:
            tabs.append(("federated learning against centralized and local training "
                         "(baselines without privacy)",
                         ["method", "privacy", metric, "centralized", "local", "Δ centralized",
                          "Δ local", "gap closed", "worst site", "local worst site"],
                         [[r.method, r.privacy, fmt(r.utility_mean), fmt(r.centralized),
                           fmt(r.local), _signed(r.vs_centralized), _signed(r.vs_local),
                           fmt(r.gap_closed, 2), fmt(r.worst_site_mean),
                           fmt(r.local_worst_site)] for r in b.itertuples()]))
        if ok["epsilon"].notna().any() or (ok["privacy"] != "none").any():
            tabs.append(("privacy",
                         ["method", "privacy", "level", "ε (δ)", "accountant"],
                         [[r.method, r.privacy, fmt(r.privacy_level), fmt_eps(r.epsilon, r.delta),
                           fmt(r.accountant)] for r in ok.itertuples()]))
        cost_cols = [k for k in TIMING_KEYS if k in ok and ok[k].notna().any()]
        # coordinates a secure-aggregation transport clipped (shown when any cell clipped)
        if "clipped_coordinates" in ok and (ok["clipped_coordinates"].fillna(0) > 0).any():
            cost_cols.append("clipped_coordinates")
        tabs.append(("cost (mean per cell over seeds)",
                     ["method", "privacy", "bytes up", "bytes down",
                      *[{"wall_s": "wall s", "train_s": "train s", "privacy_s": "privacy s",
                         "clipped_coordinates": "clipped coords"}[k] for k in cost_cols]],
                     [[r["method"], r["privacy"], fmt_bytes(r["bytes_up"]),
                       fmt_bytes(r["bytes_down"]),
                       *[fmt(r[k], 0 if k == "clipped_coordinates" else 2) for k in cost_cols]]
                      for _, r in ok.iterrows()]))
        st = data.sites[data.sites["dataset"] == ds]
        if not st.empty:
            names = [x for x in dict.fromkeys(st["site"]) if x != "(worst)"]
            rows = []
            for (m, p), e in st.groupby(["method", "privacy"], sort=False):
                vals = dict(zip(e["site"], e["utility_mean"]))
                rows.append([m, p, *(fmt(vals.get(n)) for n in names),
                             fmt(vals.get("(worst)"))])
            tabs.append((f"per-site {metric} (mean over seeds) and the worst site",
                         ["method", "privacy", *names, "worst"], rows))
        at = data.attacks[data.attacks["dataset"] == ds]
        if not at.empty:
            tabs.append(("attacks (mean ± std over seeds; not applicable with the reason)",
                         ["method", "privacy", "ε (δ)", "attack", "metric", "value"],
                         [[r.method, r.privacy, fmt_eps(r.epsilon),
                           r.attack, r.metric,
                           short(r.note, 100) if r.metric == "not_applicable"
                           else _attack_value(r.mean, r.std, r.n)] for r in at.itertuples()]))
        out[ds] = tabs
    if not data.failures.empty:
        out[""] = [("cells that did not finish ok",
                    ["status", "dataset", "method", "privacy", "seed", "reason"],
                    [[r.status, r.dataset, r.method, r.privacy, fmt(r.seed), short(r.reason)]
                     for r in data.failures.itertuples()])]
    return out


def _attack_value(mean: float, sd: float, n: int) -> str:
    """Counts (members, images) as integers, rates and scores with 3 decimals."""
    if n and float(mean).is_integer() and (math.isnan(sd) or sd == 0) and abs(mean) >= 2:
        return f"{int(mean)} (n={n})"
    return fmt_utility(mean, sd, n)


def _signed(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:+.3f}"


def comparison_tables(records: list[dict[str, Any]], *, fmt: str = "github") -> str:
    """The report's tables as text (markdown by default): per dataset the
    method × privacy utility grid, the leaderboard tiers, FL against the
    baselines, privacy, cost, per-site utility and attacks; failed, diverged
    and skipped cells after."""
    if not records:
        return "no result records\n"
    return render_text(build(records), tablefmt=fmt)


def render_text(data: ReportData, *, tablefmt: str = "github", level: int = 2) -> str:
    h = "#" * level
    out: list[str] = []
    for ds, tabs in text_tables(data).items():
        if ds:
            out.append(f"{h} {ds}\n")
        for title, headers, rows in tabs:
            out.append(f"{h}# {title}\n" if ds else f"{h} {title}\n")
            if headers:
                out.append(tabulate(rows, headers=headers, tablefmt=tablefmt,
                                    disable_numparse=True))
            out.append("")
    return "\n".join(out) + "\n"


def summary_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    return {s: int(np.sum([r.get("status") == s for r in records]))
            for s in ("ok", "failed", "skipped", "diverged")}
