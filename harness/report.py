"""Report data from result records: tables, the leaderboard, the FL-versus-
baselines comparison (pandas underneath, tabulate for text).

:func:`build` turns records into a :class:`ReportData` (one
:class:`pandas.DataFrame` per table); reporter plugins (markdown, csv, json,
figures, html) write it out. Everything here is a pure function of the *set*
of records: the same records give the same report, whatever the order they
were read in or the directories (shards) they came from.

:func:`terminal_summary` is what ``fedmedbench run`` and ``report`` print (the
headline of each dataset; every table with ``--verbose``); :func:`legend`
maps the short labels of tables and figures to full configurations.
"""

from __future__ import annotations

import html
import json
import math
import re
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tabulate import tabulate

AXES = ("dataset", "partitioner", "model", "algorithm", "aggregator", "privacy", "compressor",
        "adversary")
#: privacy tiers of the leaderboard: (name, largest ε admitted); nested, each named
#: for what it holds
TIERS: tuple[tuple[str, float], ...] = (
    ("any guarantee", math.inf), ("ε ≤ 8", 8.0), ("ε ≤ 1", 1.0))
#: decimals of utility at which two entries tie (the precision the tables show)
TIE_DECIMALS = 3
RANKING_RULE = (
    "Entries are (method, privacy setting) pairs of one dataset, over the seeds whose cell "
    "finished ok. Tiers are nested by the guarantee an entry meets: 'ε ≤ 1' lists entries "
    "whose largest ε over seeds is at most 1 (each at its own δ, shown), 'ε ≤ 8' those at "
    "most 8 (so it includes the 'ε ≤ 1' entries), and 'any guarantee' lists every entry, "
    "with or without differential privacy (no privacy, or cryptographic protection only). "
    "Within a tier entries are ranked by mean utility on the pooled test set (higher is "
    "better). Utilities equal to the 3 decimals shown are a tie, broken first by the weaker "
    "guarantee (larger ε; no DP counts as ε = ∞), so that a setting with a stronger "
    "guarantee never outranks a weaker one on the noise of its worst site, then by the mean "
    "worst-site utility, then by fewer bytes communicated, then by name. The centralized "
    "(pooled data) and local-only baselines are ranked like any other entry. Sample-level ε "
    "(dp-sgd: one patient record) and client-level ε (dp-fedavg: a whole hospital) protect "
    "different units; the unit column says which, and entries of both kinds share a tier. "
    "Entries marked † do not beat the majority-class baseline in at least one seed.")
# attack metrics shown first, in this order; other numeric keys follow by name
ATTACK_METRICS = ("auc", "advantage", "balanced_accuracy", "tpr_at_1pct_fpr",
                  "tpr_at_0.1pct_fpr", "audited_epsilon", "mse", "psnr", "ssim",
                  "label_accuracy")
# attack metric plotted against ε (first present wins), with its direction
ATTACK_HEADLINE = ("auc", "advantage", "psnr", "ssim", "label_accuracy", "mse")
TIMING_KEYS = ("wall_s", "train_s", "privacy_s")
TOPOLOGY_ORDER = {"centralized": 0, "local": 1, "federated": 2, "personalized": 3}
#: a record's round protocol, as the report's topology column names it
TOPOLOGY_OF_PROTOCOL = {"pooled": "centralized", "isolated": "local", "federated": "federated",
                        "personalized": "personalized"}
#: per-site tables list every site up to this many sites, and a distribution past it
MAX_SITE_COLUMNS = 12
#: what the headline's columns mean (printed under it in the terminal)
HEADLINE_KEY = ("worst site: the weakest hospital's score",
                "vs local: its gain over each site training alone",
                "bytes/round: sent up + down")
#: the mark of an entry whose utility does not beat the majority-class baseline
CHANCE_MARK = "†"
#: the first characters that make a spreadsheet read a CSV cell as a formula (OWASP)
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: bytes of a PNG file's signature
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: an image file larger than this is not embedded in a report
MAX_IMAGE_BYTES = 16 * 2**20
#: an image declaring more pixels than this (width x height, read from its header) is
#: never decoded: a small PNG can declare 14000 x 14000 and decode to gigabytes
MAX_IMAGE_PIXELS = 4096 * 4096


# --------------------------------------------------------------------------
# flattening
# --------------------------------------------------------------------------


def _d(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")
    return float(v)


def _t(text: Any) -> str:
    """Display text from a record: control characters, bidirectional overrides
    and lone surrogates shown as escapes, one line (every table, figure and
    page is made of these, so nothing in a record reaches a terminal or a
    report raw)."""
    from fedmedbench.errors import printable

    return printable(str(text), keep_newlines=False)


def _label(rec: dict[str, Any], axis: str) -> str:
    lab = _d(rec.get("labels"))
    if axis in lab and lab[axis] is not None:
        return _t(lab[axis])
    v = _d(rec.get("config")).get(axis)
    if axis == "privacy":
        return _t("+".join(str(_d(p).get("name")) for p in v)) if isinstance(v, list) and v \
            else "none"
    return _t(v["name"]) if isinstance(v, dict) and "name" in v else "none"


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


def backend_of(rec: dict[str, Any]) -> str:
    """The backend a record's clients trained on (``loop``, ``vectorized``):
    what ran (``backend.name``), else what was asked (``config.backend``),
    else ``""``."""
    b = rec.get("backend")
    if isinstance(b, dict) and isinstance(b.get("name"), str):
        return b["name"]
    cb = _d(rec.get("config")).get("backend")
    return cb if isinstance(cb, str) else ""


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
    """One row per record (sorted by cell id).

    Columns: ``cell_id``, ``status``; per axis of :data:`AXES` its short
    display label (``privacy`` = ``dp-fedavg[σ=1,C=0.1,dist]``,
    :func:`fedmedbench.matrix.short_label`) and, as ``<axis>_spec``, the
    record's label (``dp-fedavg(clip=0.1,noise=distributed,noise_multiplier=1.0)``);
    ``method`` (the algorithm, plus the partitioner, model, aggregator,
    compressor or adversary where those vary), ``topology``, ``seed``,
    ``rounds``; ``metric``, ``utility`` (pooled test set), ``worst_site``,
    ``per_site_mean`` (the unweighted mean of the per-site values: FLamby's
    metric), ``site:<name>`` per site, ``majority_baseline`` and ``chance_level``
    (where the dataset reports them); ``privacy_level``, ``epsilon``,
    ``delta``, ``unit`` (``record`` or ``client``), ``accountant``;
    ``bytes_up``, ``bytes_down``, ``bytes``, ``bytes_per_round`` and the
    seconds ``wall_s``, ``train_s``, ``privacy_s``; attack metrics as
    ``attack:<name>:<metric>`` (``attack:<name>:not_applicable`` holds the
    reason, ``attack:<name>:failed`` the error); ``warnings`` (how many
    distinct warnings the cell raised), ``error`` and ``provenance``.
    Missing values are NaN; nothing here raises on a record with missing keys."""
    rows = []
    for r in sorted(records, key=lambda r: str(r.get("cell_id"))):
        m = _d(r.get("metrics"))
        u, p, c = _d(m.get("utility")), _d(m.get("privacy")), _d(m.get("cost"))
        cfg = _d(r.get("config"))
        alg = _d(cfg.get("algorithm")).get("name") or _label(r, "algorithm")
        chance = u.get("chance_level")
        row: dict[str, Any] = {
            "cell_id": str(r.get("cell_id")), "status": r.get("status"),
            **{f"{axis}_spec": _label(r, axis) for axis in AXES},
            "algorithm_name": _t(alg), "backend": _t(backend_of(r)),
            "topology": str(TOPOLOGY_OF_PROTOCOL.get(str(r.get("protocol")))
                            or r.get("topology") or topology_of(str(alg))),
            "seed": cfg.get("seed"), "rounds": cfg.get("rounds"),
            "metric": u.get("metric"), "utility": _num(u.get("global")),
            "worst_site": _num(u.get("worst_site")),
            "per_site_mean": _num(u.get("per_site_mean")),
            "majority_baseline": _num(u.get("majority_baseline")),
            "chance_level": chance if isinstance(chance, bool) else None,
            "privacy_level": p.get("level"), "epsilon": _num(p.get("epsilon")),
            "delta": _num(p.get("delta")), "unit": p.get("unit") if p.get("epsilon") is not None
            else None,
            # sample-level and client-level ε protect different units: say which
            "accountant": (f"{p.get('accountant')} ({p.get('unit')}-level)"
                           if p.get("accountant") and p.get("unit") else p.get("accountant")),
            "bytes_up": _num(c.get("bytes_up")), "bytes_down": _num(c.get("bytes_down")),
            "warnings": len(r["warnings"]) if isinstance(r.get("warnings"), list) else 0,
            "error": None if _d(r.get("error")).get("message") is None
            else _t(_d(r.get("error")).get("message")),
            "provenance": _t(_provenance(r)),
        }
        row["bytes"] = row["bytes_up"] + row["bytes_down"]
        row["clipped_coordinates"] = _num(c.get("clipped_coordinates"))
        rounds = _num(cfg.get("rounds"))
        row["bytes_per_round"] = row["bytes"] / rounds if rounds and rounds > 0 else math.nan
        for k in TIMING_KEYS:
            if k in c:
                row[k] = _num(c.get(k))
        for site, v in _d(u.get("per_site")).items():
            row[f"site:{_t(site)}"] = _num(v)
        for name, res in _d(m.get("attacks")).items():
            res, name = _d(res), _t(name).replace(":", "_")
            if "not_applicable" in res:
                row[f"attack:{name}:not_applicable"] = _t(res["not_applicable"])
                continue
            if "failed" in res:
                f = _d(res["failed"])
                row[f"attack:{name}:failed"] = _t(f"{f.get('type')}: {f.get('message')}")
                continue
            for k, v in res.items():
                if k != "seconds" and not isinstance(v, bool) and isinstance(v, (int, float)):
                    row[f"attack:{name}:{_t(k)}"] = float(v)
            # the empirical privacy audit (Clopper-Pearson lower bound on ε) sits beside
            # the claimed ε in every attack table
            low = _d(res.get("audit")).get("epsilon_lower_bound")
            if isinstance(low, (int, float)) and not isinstance(low, bool):
                row[f"attack:{name}:audited_epsilon"] = float(low)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for axis in AXES:
        df.insert(df.columns.get_loc(f"{axis}_spec"), axis, short_labels(df[f"{axis}_spec"]))
    df["method"] = method_label(df)
    return df


def short_labels(labels: pd.Series) -> pd.Series:
    """Each label's :func:`~fedmedbench.matrix.short_label`, except where two
    different labels would share one short label (those keep the full label)."""
    from fedmedbench.matrix import short_label

    longs = list(dict.fromkeys(labels.astype(str)))
    short = {x: short_label(x) for x in longs}
    users: dict[str, set[str]] = {}
    for x, y in short.items():
        users.setdefault(y, set()).add(x)
    return labels.astype(str).map(lambda x: short[x] if len(users[short[x]]) == 1 else x)


def method_label(df: pd.DataFrame) -> pd.Series:
    """algorithm, plus partitioner/model/aggregator/compressor/adversary where
    they vary; ``[loop]``/``[vectorized]`` where one entry's records come from
    several backends (their numbers may differ: never one mean)."""
    out = df["algorithm"].astype(str)
    for axis in ("partitioner", "model", "aggregator", "compressor", "adversary"):
        if axis in df and df[axis].nunique() > 1:
            out = out + " " + axis[:4] + "=" + df[axis].astype(str)
    if "backend" in df and df["backend"].nunique() > 1:
        keys = [df["dataset"].astype(str), out, df["privacy"].astype(str)]
        n = df.groupby(keys)["backend"].transform("nunique")
        out = out.where(n < 2, out + " [" + df["backend"].astype(str) + "]")
    return out


def legend(records: list[dict[str, Any]], df: pd.DataFrame | None = None) -> pd.DataFrame:
    """The short labels the tables and figures use, mapped to the full
    configuration each stands for: one row per axis and label, with the
    record's label (``spec``, what ``--select`` takes) and every resolved
    parameter of the component (``config``), for the dataset, algorithm and
    privacy axes and every other axis whose value varies."""
    cols = ["axis", "label", "spec", "config"]
    df = frame(records) if df is None else df
    if df.empty:
        return pd.DataFrame(columns=cols)
    conf: dict[str, Any] = {str(r.get("cell_id")): _d(r.get("config")) for r in records}
    rows = []
    for axis in AXES:
        if axis not in ("dataset", "algorithm", "privacy") and df[axis].nunique() < 2:
            continue
        seen: dict[str, list[str]] = {}
        for lab, spec, cid in zip(df[axis], df[f"{axis}_spec"], df["cell_id"]):
            if lab in seen:
                continue
            seen[lab] = [axis, lab, spec, _t(_config_text(conf.get(cid, {}).get(axis)))]
        rows += sorted(seen.values(), key=lambda r: (r[1] != "none", r[1]))
    return pd.DataFrame(rows, columns=cols)


def _config_text(v: Any) -> str:
    """A component config (or a privacy stack) written out in full."""
    if v is None or v == []:
        return "none"
    if isinstance(v, list):
        return " + ".join(_config_text(x) for x in v)
    if not isinstance(v, dict):
        return str(v)
    params = ", ".join(f"{k}={json.dumps(x, default=str, ensure_ascii=False)}"
                       for k, x in sorted(v.items()) if k != "name")
    return f"{v.get('name')}({params})" if params else str(v.get("name"))


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


def natural_key(text: Any) -> tuple[Any, ...]:
    """A sort key that orders the numbers inside labels by value:
    ``dp-fedavg[ε=0.5]`` < ``dp-fedavg[ε=3]`` < ``dp-fedavg[ε=20]``."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", str(text))
    return tuple(float(p) if i % 2 else p for i, p in enumerate(parts))


def _sort_entries(df: pd.DataFrame) -> pd.DataFrame:
    """Stable display order: centralized, local, federated, personalized
    methods, each by name; privacy ``none`` first, then by name (numbers in
    names by value, :func:`natural_key`)."""
    if df.empty:
        return df
    keys = [(str(d), TOPOLOGY_ORDER.get(t, len(TOPOLOGY_ORDER)), natural_key(m), p != "none",
             natural_key(p))
            for d, t, m, p in zip(df["dataset"], df["topology"], df["method"], df["privacy"])]
    order = sorted(range(len(df)), key=lambda i: keys[i])
    return df.iloc[order].reset_index(drop=True)


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
    status, utility mean/std/95% interval, worst site and its gain over
    ``local`` (:func:`worst_site_gain`), the mean over seeds of
    ``per_site_mean`` (the unweighted mean over sites), ε (largest over seeds) with δ, unit
    and accountant, the majority-class baseline and in how many seeds the
    utility does not beat it (``chance_seeds``), bytes (per cell and per
    round) and seconds (means over ok seeds)."""
    cols = ["dataset", "method", "privacy", "topology", "metric", "n", "cells", "failed",
            "utility_mean", "utility_std", "utility_ci95", "worst_site_mean",
            "worst_site_gain", "per_site_mean", "majority_baseline", "chance_seeds", "epsilon", "delta", "unit",
            "accountant", "privacy_level", "rounds", "bytes_up", "bytes_down", "bytes",
            "bytes_per_round", "wall_s", "train_s", "privacy_s", "clipped_coordinates", "seeds",
            "provenance"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    allg = (df.assign(_bad=df["status"] != "ok").groupby(KEYS, sort=True)
            .agg(topology=("topology", "first"), cells=("cell_id", "size"),
                 failed=("_bad", "sum")))
    ok = df[df["status"] == "ok"].assign(
        _chance=lambda d: d["chance_level"].map(lambda v: v is True).astype(int))
    spec = {"metric": ("metric", "first"), "n": ("utility", "count"),
            "utility_mean": ("utility", "mean"), "utility_std": ("utility", "std"),
            "worst_site_mean": ("worst_site", "mean"),
            "per_site_mean": ("per_site_mean", "mean"),
            "majority_baseline": ("majority_baseline", "mean"),
            "chance_seeds": ("_chance", "sum"), "epsilon": ("epsilon", "max"),
            "delta": ("delta", "max"), "unit": ("unit", _first),
            "accountant": ("accountant", _first), "privacy_level": ("privacy_level", "first"),
            "rounds": ("rounds", "max")}
    for k in ("bytes_up", "bytes_down", "bytes", "bytes_per_round", *TIMING_KEYS,
              "clipped_coordinates"):
        if k in ok:
            spec[k] = (k, "mean")
    okg = ok.groupby(KEYS, sort=True).agg(**spec)
    okg["seeds"] = ok.groupby(KEYS, sort=True)["seed"].agg(
        lambda v: ",".join(str(int(x)) for x in sorted(v.dropna())))
    okg["provenance"] = ok.groupby(KEYS, sort=True)["provenance"].agg(_join)
    out = allg.join(okg, how="left").reset_index()
    out["n"] = out["n"].fillna(0).astype(int)
    out["chance_seeds"] = out["chance_seeds"].fillna(0).astype(int)
    out["failed"] = out["failed"].astype(int)
    out["utility_ci95"] = _ci95(out["utility_std"], out["n"])
    out.loc[out["n"] < 2, "utility_std"] = math.nan
    out["worst_site_gain"] = worst_site_gain(out)
    out = _sort_entries(out)
    return out[[c for c in cols if c in out]]


def _reference(g: pd.DataFrame, topology: str, col: str = "utility_mean") -> float:
    """``col`` of a dataset's baseline of ``topology`` (``centralized`` or
    ``local``) without privacy; the best one if there are several."""
    v = g[(g["topology"] == topology) & (g["privacy"] == "none")][col].dropna()
    return float(v.max()) if len(v) else math.nan


def worst_site_gain(summ: pd.DataFrame) -> pd.Series:
    """The gain at the worst site over local training: an entry's mean
    worst-site utility minus that of ``local`` (each site alone, no privacy,
    mean over seeds) on the same dataset; NaN where the dataset has no such
    baseline. Personalized methods are compared by the same column."""
    out = pd.Series(math.nan, index=summ.index, dtype=float)
    for _, g in summ.groupby("dataset", sort=False):
        out.loc[g.index] = g["worst_site_mean"] - _reference(g, "local", "worst_site_mean")
    return out


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
    cols = ["dataset", "method", "privacy", "topology", "epsilon", "unit", "attack", "metric",
            "mean", "std", "n", "note"]
    ok = df[df["status"] == "ok"] if not df.empty else df
    acols = [c for c in ok.columns if c.startswith("attack:")]
    if not acols or ok.empty:
        return pd.DataFrame(columns=cols)
    eps = ok.groupby(KEYS, sort=False).agg(epsilon=("epsilon", "max"), unit=("unit", _first))
    text = (":not_applicable", ":failed")
    num = [c for c in acols if not c.endswith(text)]
    na = [c for c in acols if c.endswith(text)]
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
                99 if m not in ("not_applicable", "failed") else 100) for m in g["metric"]]
    g = g.sort_values(["attack", "_o", "metric"], kind="mergesort")
    g = g.join(eps, on=KEYS).rename(columns={"count": "n"})
    return _sort_entries(g[cols].reset_index(drop=True))


def baseline_comparison(summ: pd.DataFrame) -> pd.DataFrame:
    """The review's central comparison: every federated or personalized
    entry against the centralized (pooled data) and local-only baselines of
    the same dataset *without* privacy (the reference a collaboration has to
    beat or approach).

    ``vs_centralized`` = FL − centralized, ``vs_local`` = FL − local,
    ``gap_closed`` = (FL − local) / (centralized − local): 1 means FL matches
    pooling the data, 0 means it is no better than each site alone; and
    ``worst_site_gain`` = worst site − local's worst site."""
    cols = ["dataset", "method", "privacy", "metric", "utility_mean", "n", "centralized",
            "local", "vs_centralized", "vs_local", "gap_closed", "worst_site_mean",
            "local_worst_site", "worst_site_gain", "chance_seeds"]
    rows = []
    if summ.empty:
        return pd.DataFrame(columns=cols)
    for ds, g in summ.groupby("dataset", sort=True):
        cen, loc = _reference(g, "centralized"), _reference(g, "local")
        loc_w = _reference(g, "local", "worst_site_mean")
        for r in g[g["topology"].isin(["federated", "personalized"])].itertuples():
            u = r.utility_mean
            gap = (u - loc) / (cen - loc) if abs(cen - loc) > 1e-12 else math.nan
            rows.append([ds, r.method, r.privacy, r.metric, u, r.n, cen, loc, u - cen,
                         u - loc, gap, r.worst_site_mean, loc_w, r.worst_site_mean - loc_w,
                         r.chance_seeds])
    return pd.DataFrame(rows, columns=cols)


def leaderboard(summ: pd.DataFrame) -> pd.DataFrame:
    """Entries ranked per dataset within each privacy tier (:data:`TIERS`,
    rule in :data:`RANKING_RULE`)."""
    cols = ["dataset", "tier", "rank", "method", "privacy", "metric", "utility_mean",
            "utility_std", "utility_ci95", "n", "worst_site_mean", "worst_site_gain",
            "chance_seeds", "epsilon", "delta", "unit", "accountant", "bytes", "provenance"]
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
            t = t.assign(_u=-t["utility_mean"].round(TIE_DECIMALS).fillna(-math.inf),
                         _e=-t["epsilon"].fillna(math.inf),
                         _w=-t["worst_site_mean"].fillna(-math.inf),
                         _b=t["bytes"].fillna(math.inf))
            t = t.sort_values(["_u", "_e", "_w", "_b", "method", "privacy"], kind="mergesort")
            for i, r in enumerate(t.itertuples(), 1):
                rows.append([ds, tier, i, r.method, r.privacy, r.metric, r.utility_mean,
                             r.utility_std, r.utility_ci95, r.n, r.worst_site_mean,
                             r.worst_site_gain, r.chance_seeds, r.epsilon, r.delta, r.unit,
                             r.accountant, r.bytes, r.provenance])
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
    legend: pd.DataFrame = field(default_factory=pd.DataFrame)
    counts: dict[str, int] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # for reporters (rendered figures)

    @property
    def datasets(self) -> list[str]:
        return sorted(self.cells["dataset"].unique()) if not self.cells.empty else []

    def tables(self) -> dict[str, pd.DataFrame]:
        """The exported tables by file stem (``cells`` has one row per record,
        ``legend`` maps the short labels to full configurations)."""
        return {"leaderboard": self.leaderboard, "summary": self.summary,
                "baselines": self.baselines, "sites": self.sites, "attacks": self.attacks,
                "convergence": self.convergence, "failures": self.failures,
                "cells": self.cells, "legend": self.legend}


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
        legend=legend(records, df), counts=summary_counts(records))


# --------------------------------------------------------------------------
# what reports read and write safely
# --------------------------------------------------------------------------


def record_image(rec: dict[str, Any], name: Any) -> Path | None:
    """The PNG file an attack record names, or ``None``: a report reads only
    files inside the results folders the record came from (``rec["_dirs"]``).

    A relative path is looked up in each such folder and must stay inside it
    (no ``..``, no symbolic link out); any path's file name is also looked up
    in ``<folder>/artifacts/<cell_id>/``, where the executor keeps a cell's
    files (so results moved or merged from shards keep their images). An
    absolute path is never opened. The file must be a real PNG (its signature
    bytes) of at most :data:`MAX_IMAGE_BYTES` whose header declares at most
    :data:`MAX_IMAGE_PIXELS` pixels (checked before anything decodes it)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return None
    path = Path(name)
    cid = str(rec.get("cell_id"))
    for d in rec.get("_dirs") or []:
        try:
            root = Path(d).resolve(strict=True)
        except OSError:
            continue
        cands = [] if path.is_absolute() else [root / path]
        if path.name not in ("", ".", ".."):
            cands.append(root / "artifacts" / cid / path.name)
        for c in cands:
            try:
                real = c.resolve(strict=True)
            except OSError:
                continue
            if real.is_relative_to(root) and _is_png(real):
                return real
    return None


def png_size(p: Path) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG file's header (its IHDR chunk), read
    without decoding, or ``None`` when the file is not a PNG."""
    import os
    import stat
    import struct

    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, 24)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < 24 or head[:8] != PNG_MAGIC or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _is_png(p: Path) -> bool:
    """A regular file of at most :data:`MAX_IMAGE_BYTES`, with a PNG signature
    and a header declaring at most :data:`MAX_IMAGE_PIXELS` pixels."""
    try:
        if not p.is_file() or p.stat().st_size > MAX_IMAGE_BYTES:
            return False
    except OSError:
        return False
    size = png_size(p)
    return size is not None and 0 < size[0] * size[1] <= MAX_IMAGE_PIXELS


#: markdown characters that could open a link, an image or a code span or end a table
#: cell: escaped with a backslash in report text
_MD_SPECIAL = re.compile(r"([\\`\[\]|])")


def md_escape(text: Any) -> str:
    """A string safe in a markdown table cell or heading: control characters
    shown as escapes (:func:`fedmedbench.errors.printable`), HTML escaped
    (``<script>`` shows as text), the markdown characters of links, images,
    code spans and table cells backslash-escaped (``![x](url)`` stays text),
    newlines as spaces."""
    from fedmedbench.errors import printable

    s = printable(str(text).replace("\n", " "), keep_newlines=False)
    s = html.escape(s, quote=False)
    return _MD_SPECIAL.sub(r"\\\1", s)


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells a spreadsheet cannot run: a string
    starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a
    leading ``'`` (OWASP's rule against CSV injection). Numbers are untouched."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object or pd.api.types.is_string_dtype(out[c]):
            out[c] = out[c].map(lambda v: "'" + v if isinstance(v, str)
                                and v.startswith(CSV_FORMULA_START) else v)
    return out


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


def fmt_eps(eps: Any, delta: Any = None, unit: Any = None) -> str:
    """ε with its δ (and unit): ``3 (δ=1e-05)``, ``3 (δ=1e-05, record)``;
    ``∞ (no DP)`` where there is no DP guarantee."""
    if eps is None or (isinstance(eps, float) and math.isnan(eps)):
        return "∞ (no DP)"
    s = f"{eps:.3g}"
    inner = []
    if delta is not None and not (isinstance(delta, float) and math.isnan(delta)):
        inner.append(f"δ={delta:.0e}" if delta else "δ=0")
    if isinstance(unit, str) and unit:
        inner.append(unit)
    return f"{s} ({', '.join(inner)})" if inner else s


def fmt_bytes(b: Any) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "—"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= k:
            return f"{b / k:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_utility(mean: float, sd: float, n: int, *, with_n: bool = True) -> str:
    if not n:
        return "—"
    tail = f" (n={n})" if with_n else ""
    if n == 1 or math.isnan(sd):
        return f"{mean:.3f}{tail}"
    return f"{mean:.3f} ± {sd:.3f}{tail}"


def _chance(text: str, seeds: Any) -> str:
    """``text`` with :data:`CHANCE_MARK` when some seed is at chance level."""
    return f"{text} {CHANCE_MARK}" if isinstance(seeds, (int, np.integer)) and seeds > 0 \
        else text


def short(msg: Any, n: int = 120) -> str:
    s = "" if msg is None else str(msg).replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


Table = tuple[str, list[str], list[list[str]]]


def headline_metric(data: ReportData, ds: str) -> tuple[str, str] | None:
    """The one attack metric a dataset's headline shows: ``(attack, metric)``
    for the first metric of :data:`ATTACK_HEADLINE` that an attack reports."""
    a = data.attacks[(data.attacks["dataset"] == ds)
                     & ~data.attacks["metric"].isin(["not_applicable", "failed"])]
    for metric in ATTACK_HEADLINE:  # membership inference's AUC first, where there is one
        names = sorted(set(a[a["metric"] == metric]["attack"]))
        if names:
            return names[0], metric
    return None


def headline_table(data: ReportData, ds: str, *, width: int | None = None) -> Table:
    """The headline of one dataset: per method × privacy entry, utility (mean
    ± std over seeds), the worst site and its gain over local training, ε
    with δ and unit, bytes per round and one attack metric. Labels are cut to
    ``width`` characters where given (the terminal)."""
    s = data.summary[(data.summary["dataset"] == ds) & (data.summary["n"] > 0)]
    metric = _first(s["metric"]) or "utility"
    if s.empty:  # every cell of the dataset failed (a new plugin's first run)
        return (f"{ds}: no successful cells", [], [])
    ns = sorted(set(s["n"]))
    seeds = (f"n={ns[0]} seed{'s' * (ns[0] != 1)}" if len(ns) == 1
             else f"n={ns[0]}–{ns[-1]} seeds")
    att = headline_metric(data, ds)
    a = data.attacks
    headers = ["method", "privacy", metric, "worst site", "vs local", "ε (δ, unit)",
               "bytes/round"]
    if att:
        headers.append(f"{att[0]} {att[1]}")
    rows = []
    for r in s.itertuples():
        row = [short(r.method, width) if width else r.method,
               short(r.privacy, width) if width else r.privacy,
               _chance(fmt_utility(r.utility_mean, r.utility_std, int(r.n), with_n=False),
                       r.chance_seeds),
               fmt(r.worst_site_mean), _signed(r.worst_site_gain),
               fmt_eps(r.epsilon, r.delta, r.unit), fmt_bytes(r.bytes_per_round)]
        if att:
            v = a[(a["dataset"] == ds) & (a["method"] == r.method) & (a["privacy"] == r.privacy)
                  & (a["attack"] == att[0]) & (a["metric"] == att[1])]["mean"]
            row.append(fmt(float(v.iloc[0])) if len(v) else "—")
        rows.append(row)
    # a column with nothing to say (no local baseline, no attack) is left out
    keep = [j for j in range(len(headers)) if j < 3 or any(r[j] != "—" for r in rows)]
    headers = [headers[j] for j in keep]
    rows = [[r[j] for j in keep] for r in rows]
    return (f"{ds}: {metric} on the pooled test set (mean ± std over seeds, {seeds})",
            headers, rows)


def chance_note(data: ReportData, ds: str) -> str | None:
    """The footnote for :data:`CHANCE_MARK` on a dataset, if some entry has it."""
    s = data.summary[(data.summary["dataset"] == ds) & (data.summary["chance_seeds"] > 0)]
    if s.empty:
        return None
    base = s["majority_baseline"].dropna()
    at = f" ({fmt(float(base.iloc[0]))})" if len(base) else ""
    return (f"{CHANCE_MARK} does not beat the majority-class baseline{at} in at least one "
            f"seed: {', '.join(f'{m} / {p}' for m, p in zip(s['method'], s['privacy']))}")


def _site_table(data: ReportData, ds: str, metric: str) -> Table | None:
    st = data.sites[data.sites["dataset"] == ds]
    if st.empty:
        return None
    names = [x for x in dict.fromkeys(st["site"]) if x != "(worst)"]
    g = data.summary[data.summary["dataset"] == ds]
    # the unweighted mean over sites (``utility.per_site_mean``, FLamby's metric), per entry
    psm = (dict(zip(zip(g["method"], g["privacy"]), g["per_site_mean"]))
           if "per_site_mean" in g else {})
    rows = []
    if len(names) <= MAX_SITE_COLUMNS:
        for (m, p), e in st.groupby(["method", "privacy"], sort=False):
            vals = dict(zip(e["site"], e["utility_mean"]))
            rows.append([m, p, *(fmt(vals.get(n)) for n in names), fmt(vals.get("(worst)")),
                         fmt(psm.get((m, p)))])
        return (f"per-site {metric} (mean over seeds), the worst site and the mean over sites",
                ["method", "privacy", *names, "worst", "site mean"], rows)
    for (m, p), e in st.groupby(["method", "privacy"], sort=False):
        e = e[e["site"] != "(worst)"].dropna(subset=["utility_mean"])
        v = e["utility_mean"].to_numpy(dtype=float)
        if not len(v):
            continue
        worst = e.iloc[int(np.argmin(v))]["site"]
        q = np.percentile(v, [10, 50, 90])
        rows.append([m, p, str(len(v)), fmt(float(v.min())), str(worst), fmt(q[0]), fmt(q[1]),
                     fmt(q[2]), fmt(float(v.max())), fmt(psm.get((m, p)))])
    return (f"per-site {metric} over {len(names)} sites (mean over seeds; every site in "
            f"tables/sites.csv)",
            ["method", "privacy", "sites", "worst", "worst site", "10th pct", "median",
             "90th pct", "best", "site mean"], rows)


def _attack_table(data: ReportData, ds: str) -> Table | None:
    """One row per entry and attack: the headline metrics of
    :data:`ATTACK_METRICS` as columns (every other metric is in
    ``tables/attacks.csv``), or why the attack did not apply or failed."""
    at = data.attacks[data.attacks["dataset"] == ds]
    if at.empty:
        return None
    shown = [m for m in ATTACK_METRICS if m in set(at["metric"])]
    if not shown:  # an attack with metrics of its own only
        shown = sorted(set(at["metric"]) - {"not_applicable", "failed"})[:6]
    rows = []
    for (m, p, name), e in at.groupby(["method", "privacy", "attack"], sort=False):
        vals = {r.metric: r for r in e.itertuples()}
        eps = fmt_eps(e["epsilon"].iloc[0], None, _first(e["unit"]))
        note = next((short(vals[k].note, 100) for k in ("failed", "not_applicable")
                     if k in vals), "")
        if note and "failed" in vals:
            note = "failed: " + note
        rows.append([m, p, eps, name, *(_attack_value(vals[k].mean, vals[k].std, vals[k].n)
                                        if k in vals else "—" for k in shown), note])
    headers = ["method", "privacy", "ε", "attack", *shown, "note"]
    if not any(r[-1] for r in rows):  # every attack applied and ran: no note to show
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    return ("attacks (mean ± std over seeds; every metric in tables/attacks.csv)", headers, rows)


def text_tables(data: ReportData) -> dict[str, list[Table]]:
    """Per dataset, the display tables as (title, headers, rows) of strings;
    the key ``""`` holds tables that span datasets (labels, warnings,
    failures). The markdown, terminal and HTML writers all render these, so
    they show the same cells."""
    out: dict[str, list[Table]] = {}
    s = data.summary
    for ds in data.datasets:
        tabs: list[Table] = []
        g = s[s["dataset"] == ds]
        metric = _first(g["metric"]) or "utility"
        ok = g[g["n"] > 0]
        if ok.empty:
            out[ds] = [(f"{ds}: no successful cells", [], [])]
            continue
        tabs.append(headline_table(data, ds))
        privs = sorted(ok["privacy"].unique(), key=lambda p: (p != "none", p))
        methods = list(dict.fromkeys(ok["method"]))
        cell = {(r.method, r.privacy): _chance(fmt_utility(r.utility_mean, r.utility_std,
                                                           int(r.n)), r.chance_seeds)
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
                          "vs local", "ε (δ)", "unit", "bytes", "provenance"],
                         [[str(r.rank), r.method, r.privacy,
                           _chance(fmt_utility(r.utility_mean, r.utility_std, r.n),
                                   r.chance_seeds),
                           "—" if math.isnan(r.utility_ci95) else f"± {r.utility_ci95:.3f}",
                           fmt(r.worst_site_mean), _signed(r.worst_site_gain),
                           fmt_eps(r.epsilon, r.delta), fmt(r.unit), fmt_bytes(r.bytes),
                           r.provenance] for r in t.itertuples()]))
        b = data.baselines[data.baselines["dataset"] == ds]
        if not b.empty:
            tabs.append(("federated learning against centralized and local training "
                         "(baselines without privacy)",
                         ["method", "privacy", metric, "centralized", "local", "Δ centralized",
                          "Δ local", "gap closed", "worst site", "local worst site",
                          "worst site vs local"],
                         [[r.method, r.privacy, _chance(fmt(r.utility_mean), r.chance_seeds),
                           fmt(r.centralized), fmt(r.local), _signed(r.vs_centralized),
                           _signed(r.vs_local), fmt(r.gap_closed, 2), fmt(r.worst_site_mean),
                           fmt(r.local_worst_site), _signed(r.worst_site_gain)]
                          for r in b.itertuples()]))
        if ok["epsilon"].notna().any() or (ok["privacy"] != "none").any():
            tabs.append(("privacy",
                         ["method", "privacy", "level", "ε (δ)", "unit", "accountant"],
                         [[r.method, r.privacy, fmt(r.privacy_level), fmt_eps(r.epsilon, r.delta),
                           fmt(r.unit), fmt(r.accountant)] for r in ok.itertuples()]))
        cost_cols = [k for k in TIMING_KEYS if k in ok and ok[k].notna().any()]
        # coordinates a secure-aggregation transport clipped (shown when any cell clipped)
        if "clipped_coordinates" in ok and (ok["clipped_coordinates"].fillna(0) > 0).any():
            cost_cols.append("clipped_coordinates")
        tabs.append(("cost (mean per cell over seeds)",
                     ["method", "privacy", "bytes up", "bytes down", "bytes/round",
                      *[{"wall_s": "wall s", "train_s": "train s", "privacy_s": "privacy s",
                         "clipped_coordinates": "clipped coords"}[k] for k in cost_cols]],
                     [[r["method"], r["privacy"], fmt_bytes(r["bytes_up"]),
                       fmt_bytes(r["bytes_down"]), fmt_bytes(r.get("bytes_per_round")),
                       *[fmt(r[k], 0 if k == "clipped_coordinates" else 2) for k in cost_cols]]
                      for _, r in ok.iterrows()]))
        st = _site_table(data, ds, metric)
        if st:
            tabs.append(st)
        at = _attack_table(data, ds)
        if at:
            tabs.append(at)
        out[ds] = _mark_chance(tabs, {(r.method, r.privacy) for r in ok.itertuples()
                                      if r.chance_seeds > 0})
    span: list[Table] = []
    if not data.legend.empty:
        span.append(("labels: each short label and the full configuration it stands for",
                     ["axis", "label", "configuration"],
                     [[r.axis, r.label, r.config] for r in data.legend.itertuples()]))
    warn = warning_summary(data.records)
    if warn:
        span.append(("warnings raised by libraries while cells ran (captured in the records)",
                     ["category", "message", "source", "count", "cells"],
                     [[w["category"], short(w["message"], 200), w["source"], str(w["count"]),
                       str(w["cells"])] for w in warn]))
    if not data.failures.empty:
        span.append(("cells that did not finish ok",
                     ["status", "dataset", "method", "privacy", "seed", "reason"],
                     [[r.status, r.dataset, r.method, r.privacy, fmt(r.seed), short(r.reason)]
                      for r in data.failures.itertuples()]))
    if span:
        out[""] = span
    return out


def _mark_chance(tabs: list[Table], at_chance: set[tuple[str, str]]) -> list[Table]:
    """Every table's rows of an entry at chance level carry :data:`CHANCE_MARK`:
    on the utility where the table shows one, else on the method."""
    if not at_chance:
        return tabs
    out = []
    for title, headers, rows in tabs:
        if "method" in headers and "privacy" in headers:
            mi, pi = headers.index("method"), headers.index("privacy")
            rows = [[f"{c} {CHANCE_MARK}" if j == mi and (r[mi], r[pi]) in at_chance
                     and not any(CHANCE_MARK in x for x in r) else c for j, c in enumerate(r)]
                    for r in rows]
        out.append((title, headers, rows))
    return out


def _attack_value(mean: float, sd: float, n: int) -> str:
    """Counts (members, images) as integers, rates and scores with 3 decimals."""
    if n and float(mean).is_integer() and (math.isnan(sd) or sd == 0) and abs(mean) >= 2:
        return f"{int(mean)} (n={n})"
    return fmt_utility(mean, sd, n, with_n=False)


def _signed(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"


def warning_summary(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct warnings in the records' ``warnings`` lists, each once:
    category, message, source, total count and the number of cells that
    raised it (most frequent first)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        ws = r.get("warnings")
        for w in ws if isinstance(ws, list) else []:
            if not isinstance(w, dict):
                continue
            key = (_t(w.get("category")), _t(w.get("message")))
            e = seen.setdefault(key, {"category": key[0], "message": key[1],
                                      "source": _t(w.get("source") or ""), "count": 0,
                                      "cells": 0})
            c = w.get("count")
            e["count"] += int(c) if isinstance(c, int) and not isinstance(c, bool) else 1
            e["cells"] += 1
    return sorted(seen.values(), key=lambda e: (-e["cells"], -e["count"], e["message"]))


def comparison_tables(records: list[dict[str, Any]], *, fmt: str = "github") -> str:
    """The report's tables as text (markdown by default): per dataset the
    headline, the method × privacy utility grid, the leaderboard tiers, FL
    against the baselines, privacy, cost, per-site utility and attacks; the
    label legend, warnings and the cells that did not finish ok after."""
    if not records:
        return "no result records\n"
    return render_text(build(records), tablefmt=fmt)


def render_text(data: ReportData, *, tablefmt: str = "github", level: int = 2,
                escape: Callable[[Any], str] | None = None) -> str:
    """Every table of :func:`text_tables` as text; ``escape`` (e.g.
    :func:`md_escape`) is applied to every title, header and cell."""
    esc = escape or str
    h = "#" * level
    out: list[str] = []
    for ds, tabs in text_tables(data).items():
        if ds:
            out.append(f"{h} {esc(ds)}\n")
        for title, headers, rows in tabs:
            out.append(f"{h}# {esc(title)}\n" if ds else f"{h} {esc(title)}\n")
            if headers:
                out.append(tabulate([[esc(c) for c in r] for r in rows],
                                    headers=[esc(x) for x in headers], tablefmt=tablefmt,
                                    disable_numparse=True))
            out.append("")
        note = chance_note(data, ds) if ds else None
        if note:
            out += [esc(note), ""]
    return "\n".join(out) + "\n"


def terminal_summary(data: ReportData, *, verbose: bool = False, width: int = 120) -> str:
    """What ``fedmedbench run`` and ``report`` print: per dataset the
    :func:`headline_table` (with ``verbose``, every table of
    :func:`text_tables`), then the library warnings, each once. Lines stay
    within ``width`` columns unless ``verbose``."""
    from fedmedbench.errors import printable

    if not data.records:
        return "no result records\n"
    if verbose:
        return printable(render_text(data))
    out: list[str] = []
    for ds in data.datasets:
        title, headers, rows = headline_table(data, ds)
        if not rows:
            out += [f"{ds}: no successful cells", ""]
            continue
        key = [k for k in HEADLINE_KEY if k.split(":")[0] in headers]
        out += [*textwrap.wrap(title, width), *_columns(headers, rows),
                *textwrap.wrap("; ".join(key), width)]
        note = chance_note(data, ds)
        if note:
            out += textwrap.wrap(note, width)
        out.append("")
    warn = warning_summary(data.records)
    if warn:
        out.append(f"{len(warn)} distinct warning(s) from libraries, captured in the records "
                   f"(all of them: --verbose, or the report):")
        for w in warn[:5]:
            out.append(short(f"  {w['category']} ×{w['count']} in {w['cells']} cell(s): "
                             f"{w['message']}", width))
        if len(warn) > 5:
            out.append(f"  ... and {len(warn) - 5} more")
        out.append("")
    bad = data.failures
    if not bad.empty:
        out.append(f"{len(bad)} cell(s) did not finish ok:")
        for r in bad.head(5).itertuples():
            out.append(short(f"  {r.status} {r.dataset} / {r.method} / {r.privacy} seed "
                             f"{fmt(r.seed)}: {r.reason}", width))
        if len(bad) > 5:
            out.append(f"  ... and {len(bad) - 5} more (the report lists them all)")
        out.append("")
    return printable("\n".join(out))


def _columns(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A plain table: columns two spaces apart, a rule under the headers."""
    w = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(n) for x, n in zip(r, w)).rstrip()  # noqa: E731
    return [line(headers), "  ".join("-" * n for n in w), *(line(r) for r in rows)]


def summary_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    return {s: int(np.sum([r.get("status") == s for r in records]))
            for s in ("ok", "failed", "skipped", "diverged")}
