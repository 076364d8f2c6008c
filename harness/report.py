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

This module is public API for reporter plugins (``from fedmedbench.report
import build``): the names in ``__all__`` -- the report data, the rules the
tables state, the formatters and the escaping helpers -- are kept stable
like the rest of ``fedmedbench``'s exports.
"""

from __future__ import annotations

import functools
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

__all__ = [
    "AXES", "TIERS", "CHANCE_MARK", "RANKING_RULE", "CI_RULE", "WORST_SITE_RULE",
    "ATTACK_HEADLINE", "MAX_SITE_COLUMNS", "ReportData", "RecordList", "build", "frame",
    "legend", "chance_note", "chance_text", "text_tables", "render_text", "terminal_summary",
    "strip_timings", "record_image", "simulated_network", "natural_key", "md_escape",
    "csv_safe", "fmt", "fmt_bytes", "fmt_ci", "fmt_eps", "fmt_eps_short", "fmt_p",
    "fmt_seconds", "fmt_utility"]

AXES = ("dataset", "partitioner", "model", "algorithm", "aggregator", "privacy", "compressor",
        "adversary", "network")
#: privacy tiers of the leaderboard: (name, largest ε admitted); nested, each named
#: for what it holds
TIERS: tuple[tuple[str, float], ...] = (
    ("every entry", math.inf), ("ε ≤ 8 against the server", 8.0),
    ("ε ≤ 1 against the server", 1.0))
#: decimals of utility at which two entries tie (the precision the tables show)
TIE_DECIMALS = 3
RANKING_RULE = (
    "Entries are (method, privacy setting) pairs of one dataset, over the seeds whose cell "
    "finished ok. Tiers are nested and named for what they hold: 'every entry' lists all, "
    "with or without differential privacy (no privacy, or cryptographic protection only); "
    "'ε ≤ 8 against the server' those whose ε against an honest-but-curious server "
    "(largest over seeds, each at its own δ) is at most 8, so it includes the 'ε ≤ 1' "
    "entries; an entry whose mechanism does not protect against the server (central noise "
    "added by a trusted server) is in no ε tier. Within a tier entries are ranked by mean "
    "utility on the pooled test set (higher is better). Utilities equal at the 3 decimals "
    "shown are a tie and share a rank (shown as '2='); their order is by the stronger "
    "guarantee (smaller ε; no DP counts as ε = ∞), then fewer bytes communicated, then "
    "less wall time per cell, then name. 'vs above' is a paired t-test over the seeds two "
    "neighbours share: ≈ marks an entry not distinguishable from the one above it at the "
    "5% level (with 3 seeds most are not). The centralized (pooled data) and local-only "
    "baselines are ranked like any other entry. Sample-level ε (dp-sgd: one patient "
    "record) and client-level ε (dp-fedavg: a whole hospital) protect different units; "
    "the unit column says which. Entries marked † do not beat the majority-class baseline "
    "in at least one seed (a one-sided test on the test rows).")
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
    ``train_s``, ``privacy_s``, attack ``seconds``, and the virtual clock,
    which scales a step time measured on the machine: ``history[t]
    ["clock_s"]``, ``metrics.clock``), so that reports of the same cells
    from different runs compare byte for byte."""
    out = []
    for r in records:
        r = dict(r)
        m = dict(_d(r.get("metrics")))
        m.pop("clock", None)
        if isinstance(r.get("history"), list):
            r["history"] = [{k: v for k, v in e.items() if k != "clock_s"}
                            if isinstance(e, dict) else e for e in r["history"]]
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
        row.update(run_settings(r))
        row.update(privacy_used(r))
        ci = u.get("ci95")
        row["utility_se"] = _num(u.get("se"))
        row["ci_low"], row["ci_high"] = ((_num(ci[0]), _num(ci[1])) if isinstance(ci, list)
                                         and len(ci) == 2 else (math.nan, math.nan))
        row["chance_p_value"] = _num(u.get("chance_p_value"))
        row["audit_cell"] = is_audit_cell(r)
        row["clock_s"] = final_clock_s(r)
        for site, v in _d(u.get("per_site_at_chance")).items():
            if isinstance(v, bool):
                row[f"site_chance:{_t(site)}"] = v
        for site, v in _d(u.get("majority_baseline_per_site")).items():
            row[f"site_baseline:{_t(site)}"] = _num(v)
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
                elif k in AUDIT_FLAGS and isinstance(v, bool):
                    row[f"auditflag:{name}:{k}"] = v
            if isinstance(res.get("claimed_unit"), str):
                row[f"auditflag:{name}:claimed_unit"] = _t(res["claimed_unit"])
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


#: run settings every table and frame carries (``config.run``, the dataset's defaults
#: resolved), in this order
SETTING_KEYS = ("lr", "local_steps", "local_epochs", "batch_size", "clients_per_round",
                "optimizer", "momentum", "weight_decay", "server_lr")


def run_settings(rec: dict[str, Any]) -> dict[str, Any]:
    """The resolved training settings of a record (``config.run``, dataset
    defaults included), and its tuning: ``tuned`` (the values tuning chose,
    as text), ``tuning`` (the protocol sentence), ``tuning_trials``."""
    run = _d(_d(rec.get("config")).get("run"))
    out: dict[str, Any] = {}
    for k in SETTING_KEYS:
        v = run.get(k)
        out[k] = v if isinstance(v, str) else _num(v)
    tun = _d(_d(rec.get("config")).get("tuning"))
    chosen = _d(tun.get("chosen"))
    out["tuned"] = (_t(", ".join(f"{k}={v}" for k, v in sorted(chosen.items())))
                    if chosen else None)
    out["tuning"] = _t(tun["protocol"]) if isinstance(tun.get("protocol"), str) else None
    out["tuning_trials"] = _num(tun.get("trials")) if tun else math.nan
    out["epsilon_selection"] = _num(tun.get("epsilon_selection")) if tun else math.nan
    return out


def _range(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)
         and math.isfinite(x)]
    return (float(min(v)), float(max(v))) if v else (math.nan, math.nan)


def privacy_used(rec: dict[str, Any]) -> dict[str, Any]:
    """What the DP mechanisms of a record actually used and spent, read from
    ``metrics.privacy`` (never from the config, whose defaults a target ε
    overrides): σ (``sigma_min``/``sigma_max`` over sites and rounds), the
    clipping norm, the sampling rate, steps taken and planned, the target ε,
    and ε against each adversary (``eps_server``, ``eps_client``,
    ``eps_released``; NaN where a mechanism does not protect against it)."""
    p = _d(_d(rec.get("metrics")).get("privacy"))
    sig, clip, q, steps, planned, target = [], [], [], [], [], []
    for m in _d(p.get("mechanisms")).values():
        m = _d(m)
        if "noise_multiplier" not in m and "epsilon" not in m:
            continue  # a transport (secagg, HE): no σ
        sites = _d(m.get("per_site"))
        for e in (sites.values() if sites else [m]):
            e = _d(e)
            sig.append(_num(e.get("noise_multiplier")))
            q.append(_num(e.get("sample_rate")))
            steps.append(_num(e.get("steps")))
            planned.append(_num(e.get("planned_steps", m.get("planned_steps"))))
        for x in m.get("noise_multipliers") or []:
            sig.append(_num(x))
        clip.append(_num(m.get("clip", m.get("max_grad_norm"))))
        target.append(_num(m.get("target_epsilon")))
    by = _d(p.get("by_adversary"))
    out = {"sigma_min": _range(sig)[0], "sigma_max": _range(sig)[1],
           "clip": _range(clip)[1], "sample_rate_min": _range(q)[0],
           "sample_rate_max": _range(q)[1], "steps": _range(steps)[1],
           "planned_steps": _range(planned)[1], "target_epsilon": _range(target)[1],
           "eps_adversary": p.get("adversary") if isinstance(p.get("adversary"), str) else None,
           "protected": p.get("protected") if isinstance(p.get("protected"), bool) else None}
    for a in ("server", "client", "released"):
        out[f"eps_{a}"] = _num(by.get(a))
    return out


def is_audit_cell(rec: dict[str, Any]) -> bool:
    """Whether an audit inserted canaries into this cell's training (then its
    utility and attacks are of that model, not of the entry's)."""
    c = _d(_d(rec.get("metrics")).get("canaries"))
    return bool(c) and "not_inserted" not in c and bool(c.get("m"))


def simulated_network(rec: dict[str, Any]) -> bool:
    """Whether the record's cell ran on a simulated network (a ``network`` in
    its config). The default network (``uniform``: this machine's speed, no
    transfer time) leaves no key, and its virtual clock is only this
    machine's compute: reports show virtual time for simulated networks."""
    return isinstance(_d(rec.get("config")).get("network"), dict)


def final_clock_s(rec: dict[str, Any]) -> float:
    """Virtual seconds at the end of the run on a simulated network (the last
    ``history[t]["clock_s"]``, else ``metrics.clock.total_s``); NaN without
    a virtual clock or on the default network (:func:`simulated_network`)."""
    if not simulated_network(rec):
        return math.nan
    h = rec.get("history")
    for e in reversed(h if isinstance(h, list) else []):
        v = _d(e).get("clock_s")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return _num(_d(_d(rec.get("metrics")).get("clock")).get("total_s"))


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
    byid = {str(r.get("cell_id")): r for r in records}
    rows = []
    for axis in AXES:
        if axis not in ("dataset", "algorithm", "privacy") and df[axis].nunique() < 2:
            continue
        seen: dict[str, list[str]] = {}
        ids: dict[str, list[str]] = {}
        for lab, spec, cid in zip(df[axis], df[f"{axis}_spec"], df["cell_id"]):
            ids.setdefault(lab, []).append(cid)
            if lab in seen:
                continue
            seen[lab] = [axis, lab, spec, _t(_config_text(conf.get(cid, {}).get(axis)))]
        if axis == "privacy":  # what the run used, never a default it overrode
            for lab, row in seen.items():
                row[3] = _t(privacy_text([byid[c] for c in ids[lab] if c in byid]))
        rows += sorted(seen.values(), key=lambda r: (r[1] != "none", r[1]))
    return pd.DataFrame(rows, columns=cols)


def _fmt_range(lo: float, hi: float, digits: int = 3) -> str:
    if math.isnan(lo) and math.isnan(hi):
        return ""
    a, b = f"{lo:.{digits}g}", f"{hi:.{digits}g}"
    return a if a == b else f"{a}–{b}"


#: mechanism parameters that a target ε (or the data) replaces: shown as used, not as set
SOLVED_PARAMS = ("noise_multiplier", "sample_rate")


def privacy_text(records: list[dict[str, Any]]) -> str:
    """A privacy stack as it ran, over ``records`` (the seeds of one label):
    each mechanism's parameters, without those a target ε or the data set
    instead (σ, the sampling rate), then what the mechanisms used (σ, clip,
    sampling rate, steps taken of planned, over sites, rounds and seeds)
    and the ε spent against each adversary."""
    if not records:
        return "none"
    cfg = _d(records[0].get("config")).get("privacy")
    if not cfg:
        return "none"
    mechs = _d(_d(_d(records[0].get("metrics")).get("privacy")).get("mechanisms"))
    parts = []
    for spec in cfg if isinstance(cfg, list) else [cfg]:
        spec = _d(spec)
        m = _d(mechs.get(str(spec.get("name"))))
        solved = m.get("target_epsilon") is not None or "per_site" in m
        params = ", ".join(
            f"{k}={json.dumps(x, default=str, ensure_ascii=False)}"
            for k, x in sorted(spec.items())
            if k != "name" and not (k in SOLVED_PARAMS and (solved or x is None)))
        parts.append(f"{spec.get('name')}({params})" if params else str(spec.get("name")))
    text = " + ".join(parts)
    used = [privacy_used(r) for r in records]

    def rng(lo: str, hi: str) -> str:
        return _fmt_range(min((u[lo] for u in used), default=math.nan),
                          max((u[hi] for u in used), default=math.nan))

    got = []
    if rng("sigma_min", "sigma_max"):
        got.append(f"σ={rng('sigma_min', 'sigma_max')}")
    if rng("clip", "clip"):
        got.append(f"C={rng('clip', 'clip')}")
    if rng("sample_rate_min", "sample_rate_max"):
        got.append(f"q={rng('sample_rate_min', 'sample_rate_max')}")
    if rng("steps", "steps"):
        got.append(f"{rng('steps', 'steps')} steps of {rng('planned_steps', 'planned_steps')} "
                   f"planned")
    eps = [f"{a} {rng(f'eps_{a}', f'eps_{a}')}" for a in ("server", "client", "released")
           if rng(f"eps_{a}", f"eps_{a}")]
    if got:
        text += "; used: " + ", ".join(got)
    if eps:
        text += "; ε spent against " + ", ".join(eps)
    return text


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


def _ci95(sd: pd.Series, n: pd.Series, se2: pd.Series | None = None) -> pd.Series:
    """Half-width of the 95% interval of a mean over seeds (:data:`CI_RULE`):
    the t-interval of the seeds' spread (0 for one seed) combined with the
    test set's sampling error ``se2`` (mean squared standard error); NaN
    when neither is known."""
    n = n.astype(float)
    t = stats.t.ppf(0.975, np.maximum(n - 1, 1))
    seeds = np.where(n >= 2, t * sd.fillna(0) / np.sqrt(np.maximum(n, 1)), 0.0)
    test = (1.96 ** 2 * se2.astype(float)) if se2 is not None else pd.Series(math.nan,
                                                                              index=sd.index)
    both = np.sqrt(seeds ** 2 + test.fillna(0).to_numpy())
    known = (n >= 2) | test.notna().to_numpy()
    return pd.Series(np.where(known, both, np.nan), index=sd.index)


#: the confidence interval of utility (every table's "95% CI")
CI_RULE = ("95% interval of the mean over seeds: the seeds' spread (Student t over n seeds) "
           "combined with the test set's own sampling error (each record's standard error, "
           "shared by the seeds, so it does not shrink with more of them): half-width "
           "sqrt((t·sd/√n)² + (1.96·se)²)")
#: one definition of the worst site, used by every table and figure
WORST_SITE_RULE = ("worst site: the site with the lowest mean over seeds of its own test "
                   "score, each site scored with the model that site would use (the global "
                   "model; its own under local training; its personal model under a "
                   "personalized method)")


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset × method × privacy over its seeds: cell counts by
    status, utility mean/std and its 95% interval (:data:`CI_RULE`), the
    worst site (:data:`WORST_SITE_RULE`) and its gain over ``local``
    (:func:`worst_site_gain`), the mean over seeds of ``per_site_mean``
    (the unweighted mean over sites), ε (largest over seeds) with δ, unit,
    accountant and ε against each adversary, the majority-class baseline
    and in how many seeds the utility does not beat it (``chance_seeds``),
    the resolved training settings and what the DP mechanisms used (σ, clip,
    sampling rate, steps), the tuning protocol, bytes (per cell and per
    round) and seconds (means over ok seeds)."""
    cols = ["dataset", "method", "privacy", "topology", "metric", "n", "cells", "failed",
            "utility_mean", "utility_std", "utility_ci95", "worst_site_mean", "worst_site",
            "worst_site_gain", "per_site_mean", "majority_baseline", "chance_seeds", "epsilon",
            "delta", "unit", "accountant", "privacy_level", "eps_server", "eps_client",
            "eps_released", "protected", "target_epsilon", "sigma_min", "sigma_max", "clip",
            "sample_rate_min", "sample_rate_max", "steps", "planned_steps", "rounds",
            *SETTING_KEYS, "tuned", "tuning", "tuning_trials", "epsilon_selection",
            "bytes_up", "bytes_down", "bytes", "bytes_per_round", "wall_s", "train_s",
            "privacy_s", "clock_s", "clipped_coordinates", "seeds", "provenance"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    allg = (df.assign(_bad=df["status"] != "ok").groupby(KEYS, sort=True)
            .agg(topology=("topology", "first"), cells=("cell_id", "size"),
                 failed=("_bad", "sum")))
    ok = df[df["status"] == "ok"].assign(
        _chance=lambda d: d["chance_level"].map(lambda v: v is True).astype(int),
        _se2=lambda d: d["utility_se"] ** 2 if "utility_se" in d else math.nan)
    spec = {"metric": ("metric", "first"), "n": ("utility", "count"),
            "utility_mean": ("utility", "mean"), "utility_std": ("utility", "std"),
            "_se2": ("_se2", "mean"),
            "per_site_mean": ("per_site_mean", "mean"),
            "majority_baseline": ("majority_baseline", "mean"),
            "chance_seeds": ("_chance", "sum"), "epsilon": ("epsilon", "max"),
            "delta": ("delta", "max"), "unit": ("unit", _first),
            "accountant": ("accountant", _first), "privacy_level": ("privacy_level", "first"),
            "rounds": ("rounds", "max")}
    for k in ("eps_server", "eps_client", "eps_released", "target_epsilon", "sigma_max",
              "clip", "sample_rate_max", "steps", "planned_steps", "clock_s"):
        if k in ok:
            spec[k] = (k, "max")
    for k in ("sigma_min", "sample_rate_min"):
        if k in ok:
            spec[k] = (k, "min")
    for k in ("protected", "tuned", "tuning", "tuning_trials", "epsilon_selection",
              *SETTING_KEYS):
        if k in ok:
            spec[k] = (k, _first)
    for k in ("bytes_up", "bytes_down", "bytes", "bytes_per_round", *TIMING_KEYS,
              "clipped_coordinates"):
        if k in ok:
            spec[k] = (k, "mean")
    okg = ok.groupby(KEYS, sort=True).agg(**spec)
    okg["seeds"] = ok.groupby(KEYS, sort=True)["seed"].agg(
        lambda v: ",".join(str(int(x)) for x in sorted(v.dropna())))
    okg["provenance"] = ok.groupby(KEYS, sort=True)["provenance"].agg(_join)
    # one definition of the worst site: the lowest mean over seeds of a site's own score
    site_cols = [c for c in ok.columns if c.startswith("site:")]
    if site_cols:
        means = ok.groupby(KEYS, sort=True)[site_cols].mean()
        okg["worst_site_mean"] = means.min(axis=1, skipna=True)
        okg["worst_site"] = means.apply(
            lambda r: r.idxmin()[5:] if r.notna().any() else None, axis=1)
    else:
        okg["worst_site_mean"] = ok.groupby(KEYS, sort=True)["worst_site"].mean()
        okg["worst_site"] = None
    out = allg.join(okg, how="left").reset_index()
    out["n"] = out["n"].fillna(0).astype(int)
    out["chance_seeds"] = out["chance_seeds"].fillna(0).astype(int)
    out["failed"] = out["failed"].astype(int)
    out["utility_ci95"] = _ci95(out["utility_std"], out["n"], out.get("_se2"))
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
    """Long format: dataset, method, privacy, site, mean utility over ok
    seeds, the site's own majority-class baseline and in how many seeds the
    site's score does not beat it (``chance_seeds``, from the records'
    ``per_site_at_chance``: judged on the numbers this table shows); the row
    ``site == "(worst)"`` holds the worst site (:data:`WORST_SITE_RULE`)."""
    cols = ["dataset", "method", "privacy", "topology", "site", "utility_mean", "n",
            "majority_baseline", "chance_seeds"]
    ok = df[df["status"] == "ok"] if not df.empty else df
    site_cols = [c for c in ok.columns if c.startswith("site:")]
    if ok.empty or not site_cols:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in ok.groupby([*KEYS, "topology"], sort=False):
        best: tuple[float, str] | None = None
        for c in site_cols:
            v = g[c].dropna()
            if v.empty:
                continue
            name = c[5:]
            ch = g.get(f"site_chance:{name}")
            base = g.get(f"site_baseline:{name}")
            m = float(v.mean())
            rows.append([*key, name, m, int(v.count()),
                         float(base.mean()) if base is not None and base.notna().any()
                         else math.nan,
                         int(sum(x is True for x in ch)) if ch is not None else 0])
            if best is None or m < best[0]:
                best = (m, name)
        if best is not None:
            rows.append([*key, "(worst)", best[0], int(g["utility"].count()), math.nan, 0])
    out = pd.DataFrame(rows, columns=cols)
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


def _reference_key(g: pd.DataFrame, topology: str) -> tuple[str, str] | None:
    """(method, privacy) of the baseline :func:`_reference` reads."""
    v = g[(g["topology"] == topology) & (g["privacy"] == "none")].dropna(
        subset=["utility_mean"])
    if v.empty:
        return None
    r = v.loc[v["utility_mean"].idxmax()]
    return str(r["method"]), str(r["privacy"])


def baseline_comparison(summ: pd.DataFrame, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """The review's central comparison: every federated or personalized
    entry against the centralized (pooled data) and local-only baselines of
    the same dataset *without* privacy (the reference a collaboration has to
    beat or approach).

    ``vs_centralized`` = FL − centralized, ``vs_local`` = FL − local,
    ``gap_closed`` = (FL − local) / (centralized − local): 1 means FL matches
    pooling the data, 0 means it is no better than each site alone; and
    ``worst_site_gain`` = worst site − local's worst site. ``p_centralized``
    and ``p_local`` are paired t-tests over shared seeds (:func:`paired_test`)."""
    cols = ["dataset", "method", "privacy", "metric", "utility_mean", "n", "centralized",
            "local", "vs_centralized", "vs_local", "gap_closed", "worst_site_mean",
            "local_worst_site", "worst_site_gain", "chance_seeds", "p_centralized", "p_local"]
    rows = []
    if summ.empty:
        return pd.DataFrame(columns=cols)
    seeds = seed_utilities(df) if df is not None else {}
    for ds, g in summ.groupby("dataset", sort=True):
        cen, loc = _reference(g, "centralized"), _reference(g, "local")
        kc, kl = _reference_key(g, "centralized"), _reference_key(g, "local")
        loc_w = _reference(g, "local", "worst_site_mean")
        for r in g[g["topology"].isin(["federated", "personalized"])].itertuples():
            u = r.utility_mean
            gap = (u - loc) / (cen - loc) if abs(cen - loc) > 1e-12 else math.nan
            mine = seeds.get((ds, r.method, r.privacy), {})
            pc = paired_test(mine, seeds.get((ds, *kc), {}))[2] if kc else math.nan
            pl = paired_test(mine, seeds.get((ds, *kl), {}))[2] if kl else math.nan
            rows.append([ds, r.method, r.privacy, r.metric, u, r.n, cen, loc, u - cen,
                         u - loc, gap, r.worst_site_mean, loc_w, r.worst_site_mean - loc_w,
                         r.chance_seeds, pc, pl])
    return pd.DataFrame(rows, columns=cols)


def seed_utilities(df: pd.DataFrame) -> dict[tuple[str, str, str], dict[Any, float]]:
    """``{(dataset, method, privacy): {seed: utility}}`` over ok cells."""
    out: dict[tuple[str, str, str], dict[Any, float]] = {}
    if df.empty:
        return out
    ok = df[df["status"] == "ok"]
    for d, m, p, sd, u in zip(ok["dataset"], ok["method"], ok["privacy"], ok["seed"],
                              ok["utility"]):
        if isinstance(u, float) and math.isnan(u):
            continue
        out.setdefault((d, m, p), {})[sd] = float(u)
    return out


#: the level of the paired test that says two entries are distinguishable
ALPHA = 0.05


def paired_test(a: dict[Any, float], b: dict[Any, float]) -> tuple[int, float, float]:
    """A paired t-test over the seeds two entries share (same seeds: same
    splits, same initial models): ``(n, mean of a − b, two-sided p)``. With
    fewer than 2 shared seeds p is NaN; when every difference is the same,
    p is 1 if it is 0 and 0 otherwise (no spread to test against)."""
    common = sorted(set(a) & set(b), key=str)
    d = np.array([a[k] - b[k] for k in common], dtype=float)
    n = len(d)
    if n == 0:
        return 0, math.nan, math.nan
    mean = float(d.mean())
    if n < 2:
        return n, mean, math.nan
    if np.allclose(d, d[0], rtol=0, atol=1e-12):
        return n, mean, 1.0 if abs(d[0]) <= 1e-12 else 0.0
    return n, mean, float(stats.ttest_rel([a[k] for k in common], [b[k] for k in common])
                          .pvalue)


def paired_ci(a: dict[Any, float], b: dict[Any, float]) -> tuple[int, float, float]:
    """``(n, mean of a − b, half-width of its 95% t-interval)`` over shared seeds."""
    common = sorted(set(a) & set(b), key=str)
    d = np.array([a[k] - b[k] for k in common], dtype=float)
    if len(d) == 0:
        return 0, math.nan, math.nan
    if len(d) < 2:
        return len(d), float(d.mean()), math.nan
    return len(d), float(d.mean()), float(stats.t.ppf(0.975, len(d) - 1)
                                           * d.std(ddof=1) / math.sqrt(len(d)))


def tier_epsilon(summ: pd.DataFrame, adversary: str = "server") -> pd.Series:
    """The ε a tier counts: against ``adversary`` where records say it
    (``by_adversary``); the headline ε for records without that block; NaN
    where a mechanism does not protect against the adversary."""
    col = f"eps_{adversary}"
    eps = summ[col] if col in summ else pd.Series(math.nan, index=summ.index)
    if "protected" in summ:
        old = summ["protected"].isna() & eps.isna()
    else:
        old = pd.Series(True, index=summ.index)
    return eps.where(~old, summ["epsilon"])


def leaderboard(summ: pd.DataFrame, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Entries ranked per dataset within each privacy tier (:data:`TIERS`,
    rule in :data:`RANKING_RULE`): ties at the displayed precision share a
    rank (``rank_text`` ``2=``); ``vs_above_p`` is the paired test over
    seeds against the entry ranked just above, ``distinguishable`` whether
    it is below :data:`ALPHA` (``None`` with fewer than 2 shared seeds)."""
    cols = ["dataset", "tier", "rank", "rank_text", "method", "privacy", "metric",
            "utility_mean", "utility_std", "utility_ci95", "n", "worst_site_mean",
            "worst_site", "worst_site_gain", "chance_seeds", "epsilon", "delta", "unit",
            "accountant", "bytes", "bytes_per_round", "wall_s", "vs_above_p",
            "distinguishable", "provenance"]
    ok = summ[summ["n"] > 0] if not summ.empty else summ
    seeds = seed_utilities(df) if df is not None else {}
    rows = []
    for ds, g in ok.groupby("dataset", sort=True):
        g = g.assign(k_eps=tier_epsilon(g))
        for tier, bound in TIERS:
            t = g if math.isinf(bound) else g[g["k_eps"].notna() & (g["k_eps"] <= bound)]
            if t.empty:
                continue
            wall = t["wall_s"] if "wall_s" in t else pd.Series(math.nan, index=t.index)
            t = t.assign(k_u=-t["utility_mean"].round(TIE_DECIMALS).fillna(-math.inf),
                         k_e=t["k_eps"].fillna(math.inf), k_b=t["bytes"].fillna(math.inf),
                         k_s=wall.fillna(math.inf))
            t = t.sort_values(["k_u", "k_e", "k_b", "k_s", "method", "privacy"],
                              kind="mergesort")
            rank, prev_u, above = 0, None, None
            tied = t["k_u"].map(t["k_u"].value_counts()) > 1
            for i, r in enumerate(t.itertuples(), 1):
                if r.k_u != prev_u:
                    rank, prev_u = i, r.k_u
                p = math.nan
                if above is not None:
                    _, _, p = paired_test(seeds.get((ds, above.method, above.privacy), {}),
                                          seeds.get((ds, r.method, r.privacy), {}))
                dist = None if math.isnan(p) else bool(p < ALPHA)
                rows.append([ds, tier, rank, f"{rank}=" if tied.loc[r.Index] else str(rank),
                             r.method, r.privacy, r.metric, r.utility_mean, r.utility_std,
                             r.utility_ci95, r.n, r.worst_site_mean, r.worst_site,
                             r.worst_site_gain, r.chance_seeds, r.k_eps, r.delta, r.unit,
                             r.accountant, r.bytes, r.bytes_per_round, getattr(r, "wall_s",
                                                                                math.nan),
                             p, dist, r.provenance])
                above = r
    return pd.DataFrame(rows, columns=cols)


#: the attack metric every leaderboard row shows for membership inference
MIA_METRIC = "tpr_at_0.1pct_fpr"
#: what counts as an attack succeeding in the scorecard: membership inference with an AUC
#: of at least this; gradient inversion with a PSNR of at least this (dB)
MIA_SUCCESS_AUC = 0.6
INVERSION_SUCCESS_PSNR = 20.0
#: the unit of an audit attack's claim when its record does not say (``claimed_unit``)
AUDIT_UNITS = {"audit-canary": "record", "audit-dirac": "record", "audit-clients": "client"}


def _entry_rows(df: pd.DataFrame, ds: str, method: str, privacy: str) -> pd.DataFrame:
    if df is None or df.empty:
        return pd.DataFrame()
    return df[(df["dataset"] == ds) & (df["method"] == method) & (df["privacy"] == privacy)
              & (df["status"] == "ok")]


def _attack_best(rows: pd.DataFrame, metric: str) -> tuple[str | None, float, float]:
    """``(attack, mean over seeds, n)`` of the attack with the highest mean
    ``metric`` among ``rows``' attacks."""
    best: tuple[str | None, float, float] = (None, math.nan, 0)
    for c in rows.columns if not rows.empty else []:
        if c.startswith("attack:") and c.endswith(f":{metric}"):
            v = rows[c].dropna()
            if len(v) and (best[0] is None or float(v.mean()) > best[1]):
                best = (c.split(":")[1], float(v.mean()), len(v))
    return best


def _not_applicable(rows: pd.DataFrame, kind: str) -> str | None:
    for c in rows.columns if not rows.empty else []:
        if c.startswith(f"attack:{kind}") and c.endswith(":not_applicable"):
            v = rows[c].dropna()
            if len(v):
                return str(v.iloc[0])
    return None


def audit_summary(rows: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per unit (``record``, ``client``), the audits of an entry's cells:
    the largest audited lower bound over seeds, the smallest ceiling (the
    audit's power), the claim, the seeds, and the flag: ``contradicts the
    claim`` when some seed's bound exceeds its claim, ``no power`` when the
    ceiling is below the claim (the audit could not have caught a
    violation), else ``within the claim``."""
    out: dict[str, dict[str, Any]] = {}
    for c in rows.columns if not rows.empty else []:
        if not (c.startswith("attack:") and c.endswith(":audited_epsilon")):
            continue
        name = c.split(":")[1]
        v = rows[c].dropna()
        if v.empty:
            continue
        unit_col = rows.get(f"auditflag:{name}:claimed_unit")
        unit = (str(unit_col.dropna().iloc[0]) if unit_col is not None and
                unit_col.notna().any() else AUDIT_UNITS.get(name, "record"))
        ceil = rows.get(f"attack:{name}:ceiling")
        claim = rows.get(f"attack:{name}:claimed_epsilon")
        contra = rows.get(f"auditflag:{name}:contradicts_claim")
        nopow = rows.get(f"auditflag:{name}:no_power")
        e = {"attack": name, "bound": float(v.max()), "n": int(len(v)),
             "ceiling": float(ceil.min()) if ceil is not None and ceil.notna().any()
             else math.nan,
             "claim": float(claim.max()) if claim is not None and claim.notna().any()
             else math.nan,
             "contradicts": bool(contra is not None and any(x is True for x in contra)),
             "no_power": bool(nopow is not None and any(x is True for x in nopow))}
        e["flag"] = ("contradicts the claim" if e["contradicts"] else
                     "no power" if e["no_power"] else "within the claim")
        if unit not in out or e["bound"] > out[unit]["bound"]:
            out[unit] = e
    return out


def claims(summ: pd.DataFrame, df: pd.DataFrame, adf: pd.DataFrame | None = None
           ) -> pd.DataFrame:
    """Verified claims, one row per entry: the accountant's ε against each
    adversary (server, another client, a party that sees only the released
    model) with δ and unit; the audited lower bound at sample (record) and
    client level with its ceiling and flag (:func:`audit_summary`, from the
    entry's audit cells and its own cells); the strongest membership
    inference at :data:`MIA_METRIC` and the best reconstruction PSNR, each
    beside the same method without protection."""
    cols = ["dataset", "method", "privacy", "unit", "delta", "eps_server", "eps_client",
            "eps_released", "protected", "accountant",
            "audit_record", "audit_record_ceiling", "audit_record_claim", "audit_record_n",
            "audit_record_flag", "audit_client", "audit_client_ceiling", "audit_client_claim",
            "audit_client_n", "audit_client_flag", "flagged",
            "mia_attack", "mia_tpr", "mia_auc", "mia_tpr_unprotected", "mia_auc_unprotected",
            "inv_attack", "psnr", "psnr_unprotected", "inv_note"]
    rows = []
    ok = summ[summ["n"] > 0] if not summ.empty else summ
    for r in ok.itertuples():
        mine = _entry_rows(df, r.dataset, r.method, r.privacy)
        aud = pd.concat([mine, _entry_rows(adf, r.dataset, r.method, r.privacy)],
                        ignore_index=True) if adf is not None and not adf.empty else mine
        au = audit_summary(aud)
        base = _entry_rows(df, r.dataset, r.method, "none") if r.privacy != "none" else mine
        ma, mtpr, _ = _attack_best(mine, MIA_METRIC)
        mauc = (float(mine[f"attack:{ma}:auc"].mean()) if ma and f"attack:{ma}:auc" in mine
                else math.nan)
        btpr = _attack_best(base, MIA_METRIC)[1]
        bauc = (float(base[f"attack:{ma}:auc"].mean()) if ma and f"attack:{ma}:auc" in base
                and not base.empty else math.nan)
        ia, psnr, _ = _attack_best(mine, "psnr")
        rec, cli = au.get("record", {}), au.get("client", {})
        rows.append([r.dataset, r.method, r.privacy, r.unit, r.delta,
                     getattr(r, "eps_server", math.nan), getattr(r, "eps_client", math.nan),
                     getattr(r, "eps_released", math.nan), getattr(r, "protected", None),
                     r.accountant,
                     rec.get("bound", math.nan), rec.get("ceiling", math.nan),
                     rec.get("claim", math.nan), rec.get("n", 0), rec.get("flag"),
                     cli.get("bound", math.nan), cli.get("ceiling", math.nan),
                     cli.get("claim", math.nan), cli.get("n", 0), cli.get("flag"),
                     bool(rec.get("contradicts") or cli.get("contradicts")),
                     ma, mtpr, mauc, btpr, bauc,
                     ia, psnr, _attack_best(base, "psnr")[1],
                     None if ia else _not_applicable(mine, "gradinv")])
    return pd.DataFrame(rows, columns=cols)


def _verdict(without: float, with_: float, success: Callable[[float], bool]) -> str:
    if math.isnan(without) and math.isnan(with_):
        return "—"
    if not math.isnan(with_) and success(with_):
        return "not stopped"
    if math.isnan(without) or not success(without):
        return "nothing to stop"
    return "stopped"


def scorecard(summ: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """The protection scorecard: per dataset, each protected entry against
    the same method without protection: Δ utility (paired over shared seeds,
    with its 95% t-interval and p), Δ worst site, × wall time, × bytes per
    round, and what the attacks achieved with and without it (membership
    inference: :data:`MIA_METRIC` and AUC; gradient inversion: PSNR), with a
    verdict: ``stopped`` (the attack succeeds without the protection, not
    with it: AUC ≥ :data:`MIA_SUCCESS_AUC`, PSNR ≥
    :data:`INVERSION_SUCCESS_PSNR` dB), ``not stopped``, ``nothing to stop``."""
    cols = ["dataset", "privacy", "method", "n", "d_utility", "d_utility_ci", "d_utility_p",
            "d_worst_site", "time_x", "bytes_x", "eps_server", "mia_attack",
            "mia_tpr", "mia_tpr_unprotected", "mia_auc", "mia_auc_unprotected", "mia_verdict",
            "inv_attack", "psnr", "psnr_unprotected", "inv_verdict"]
    rows = []
    if summ.empty:
        return pd.DataFrame(columns=cols)
    seeds = seed_utilities(df)
    ok = summ[summ["n"] > 0]
    for r in ok[ok["privacy"] != "none"].itertuples():
        ref = ok[(ok["dataset"] == r.dataset) & (ok["method"] == r.method)
                 & (ok["privacy"] == "none")]
        if ref.empty:
            continue
        b = ref.iloc[0]
        n, d, ci = paired_ci(seeds.get((r.dataset, r.method, r.privacy), {}),
                             seeds.get((r.dataset, r.method, "none"), {}))
        p = paired_test(seeds.get((r.dataset, r.method, r.privacy), {}),
                        seeds.get((r.dataset, r.method, "none"), {}))[2]

        def ratio(a: Any, z: Any) -> float:
            a, z = _num(a), _num(z)
            return a / z if z and z > 0 and not math.isnan(a) else math.nan

        mine = _entry_rows(df, r.dataset, r.method, r.privacy)
        base = _entry_rows(df, r.dataset, r.method, "none")
        ma, mtpr, _ = _attack_best(mine, MIA_METRIC)
        def auc(x: pd.DataFrame, ma: str | None = ma) -> float:
            col = f"attack:{ma}:auc"
            return float(x[col].mean()) if ma and col in x and not x.empty else math.nan

        ia, psnr, _ = _attack_best(mine, "psnr")
        bpsnr = (float(base[f"attack:{ia}:psnr"].mean()) if ia and f"attack:{ia}:psnr"
                 in base and not base.empty else math.nan)
        rows.append([r.dataset, r.privacy, r.method, n, d, ci, p,
                     r.worst_site_mean - b["worst_site_mean"],
                     ratio(getattr(r, "wall_s", math.nan), b.get("wall_s")),
                     ratio(r.bytes_per_round, b["bytes_per_round"]),
                     getattr(r, "eps_server", math.nan), ma, mtpr,
                     _attack_best(base, MIA_METRIC)[1], auc(mine), auc(base),
                     _verdict(auc(base), auc(mine), lambda x: x >= MIA_SUCCESS_AUC),
                     ia, psnr, bpsnr,
                     _verdict(bpsnr, psnr, lambda x: x >= INVERSION_SUCCESS_PSNR)])
    return pd.DataFrame(rows, columns=cols)


def convergence(records: list[dict[str, Any]], df: pd.DataFrame) -> pd.DataFrame:
    """Long format: dataset, method, privacy, round, mean utility and loss over
    ok seeds (rounds where utility was evaluated)."""
    cols = ["dataset", "method", "privacy", "topology", "round", "utility", "loss",
            "epsilon", "n"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    meta = df.drop_duplicates("cell_id").set_index("cell_id")[
        ["dataset", "method", "privacy", "topology", "status"]]
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
    claims: pd.DataFrame = field(default_factory=pd.DataFrame)
    scorecard: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: the audit cells attached to entries (one row per cell, under the entry's labels)
    audit_cells: pd.DataFrame = field(default_factory=pd.DataFrame)
    cache: dict[Any, Any] = field(default_factory=dict)  # for reporters (rendered figures)

    @property
    def datasets(self) -> list[str]:
        return sorted(self.cells["dataset"].unique()) if not self.cells.empty else []

    def tables(self) -> dict[str, pd.DataFrame]:
        """The exported tables by file stem (``cells`` has one row per record,
        ``legend`` maps the short labels to full configurations)."""
        return {"leaderboard": self.leaderboard, "summary": self.summary,
                "claims": self.claims, "scorecard": self.scorecard,
                "baselines": self.baselines, "sites": self.sites, "attacks": self.attacks,
                "convergence": self.convergence, "failures": self.failures,
                "cells": self.cells, "audit_cells": self.audit_cells, "legend": self.legend}


class RecordList(list):  # type: ignore[type-arg]
    """The records handed to reporters: a list that builds its report data
    once (:attr:`report`), however many reporters write it."""

    @functools.cached_property
    def report(self) -> ReportData:
        return _build(list(self))


def build(records: list[dict[str, Any]]) -> ReportData:
    """All report tables from ``records`` (merged, one per cell id); a
    :class:`RecordList`'s own, built once."""
    if isinstance(records, RecordList):
        return records.report
    return _build(records)


#: the attack keys that hold an audit's verdict (booleans, kept by :func:`frame`)
AUDIT_FLAGS = ("contradicts_claim", "no_power", "within_claim")


def _entry_key(df: pd.DataFrame) -> pd.Series:
    """What makes an audit cell belong to an entry: every axis label but the
    model (an audit may train an instrumented model), the backend and the
    tuning choice."""
    cols = [f"{a}_spec" for a in AXES if a != "model" and f"{a}_spec" in df]
    cols += [c for c in ("backend", "tuned") if c in df]
    return pd.Series(["\x1f".join(str(v) for v in row) for row in zip(*(df[c] for c in cols))],
                     index=df.index, dtype=object)


def split_audits(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                          list[dict[str, Any]]]:
    """``(measured, audits)``: records whose training an audit changed
    (canaries inserted) and that belong to a measured entry (the same labels
    but the model) go to ``audits``; they give the entry's verified claims,
    never its utility. An audit cell with no such entry stays measured."""
    if not records:
        return records, []
    df = frame(records)
    if df.empty or not df["audit_cell"].any():
        return records, []
    key = _entry_key(df)
    measured_keys = set(key[~df["audit_cell"]])
    attach = set(df["cell_id"][df["audit_cell"] & key.isin(measured_keys)])
    return ([r for r in records if str(r.get("cell_id")) not in attach],
            [r for r in records if str(r.get("cell_id")) in attach])


def _build(records: list[dict[str, Any]]) -> ReportData:
    records = sorted(records, key=lambda r: str(r.get("cell_id")))
    measured, audit_recs = split_audits(records)
    df = frame(measured)
    summ = summary(df)
    adf = frame(audit_recs) if audit_recs else pd.DataFrame()
    if not adf.empty:  # each audit cell under its entry's labels
        names = dict(zip(_entry_key(df), zip(df["method"], df["privacy"])))
        k = _entry_key(adf)
        adf["method"] = [names[x][0] for x in k]
        adf["privacy"] = [names[x][1] for x in k]
    at = attacks(df)
    return ReportData(
        records=records, cells=df, summary=summ, sites=sites(df), attacks=at,
        baselines=baseline_comparison(summ, df), leaderboard=leaderboard(summ, df),
        convergence=convergence(measured, df), failures=failures(frame(records)),
        legend=legend(measured, df), counts=summary_counts(records),
        claims=claims(summ, df, adf), scorecard=scorecard(summ, df),
        audit_cells=adf)


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


def chance_text(text: str, seeds: Any) -> str:
    """``text`` with :data:`CHANCE_MARK` when some seed is at chance level."""
    return f"{text} {CHANCE_MARK}" if isinstance(seeds, (int, np.integer)) and seeds > 0 \
        else text


def short(msg: Any, n: int = 120) -> str:
    s = "" if msg is None else str(msg).replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


Table = tuple[str, list[str], list[list[str]]]

#: the widest a terminal table may be (columns)
TERMINAL_WIDTH = 100


def headline_metric(data: ReportData, ds: str) -> tuple[str, str] | None:
    """The one attack metric a dataset's headline shows: ``(attack, metric)``
    for the first metric of :data:`ATTACK_HEADLINE` that an attack reports."""
    a = data.attacks[(data.attacks["dataset"] == ds)
                     & ~data.attacks["metric"].isin(["not_applicable", "failed"])]
    # an attack that succeeds somewhere first (what a protection has to stop), then
    # membership inference's AUC, where there is one
    wins = {"auc": MIA_SUCCESS_AUC, "psnr": INVERSION_SUCCESS_PSNR}
    for metric, bar in wins.items():
        names = sorted(set(a[(a["metric"] == metric) & (a["mean"] >= bar)]["attack"]))
        if names:
            return names[0], metric
    for metric in ATTACK_HEADLINE:
        names = sorted(set(a[a["metric"] == metric]["attack"]))
        if names:
            return names[0], metric
    return None


def fmt_ci(mean: float, half: float, n: int = 0) -> str:
    """``0.783 ± 0.054``: a mean with the half-width of its 95% interval."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if half is None or (isinstance(half, float) and math.isnan(half)):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {half:.3f}"


def fmt_eps_short(eps: Any, unit: Any) -> str:
    """``3.0 rec`` / ``8.0 cli`` / ``—`` (no guarantee against the adversary)."""
    if eps is None or (isinstance(eps, float) and math.isnan(eps)):
        return "—"
    u = {"record": "rec", "client": "cli"}.get(str(unit), "")
    return f"{eps:.2g} {u}".strip() if eps < 10 else f"{eps:.0f} {u}".strip()


def fmt_seconds(s: Any) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "—"
    return f"{s:.2g}" if s < 10 else f"{s:.0f}"


def fmt_x(v: Any) -> str:
    """A ratio: ``×1.8``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"×{v:.2g}" if v < 10 else f"×{v:.0f}"


def fmt_p(p: Any) -> str:
    """A paired test's verdict: ``≈ (p=0.41)`` not distinguishable, ``p=0.01``
    distinguishable, ``—`` untestable (fewer than 2 shared seeds)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return f"≈ (p={p:.2f})" if p >= ALPHA else f"p={p:.2g}"


def headline_table(data: ReportData, ds: str, *, width: int | None = None) -> Table:
    """The headline of one dataset: per method × privacy entry, utility (mean
    ± its 95% interval, :data:`CI_RULE`), the worst site
    (:data:`WORST_SITE_RULE`), ε against the server (unit: ``rec`` a patient
    record, ``cli`` a hospital), bytes per round, seconds per cell and one
    attack metric. Labels are cut to ``width`` characters where given."""
    s = data.summary[(data.summary["dataset"] == ds) & (data.summary["n"] > 0)]
    metric = _first(s["metric"]) or "utility"
    if s.empty:  # every cell of the dataset failed (a new plugin's first run)
        return (f"{ds}: no successful cells", [], [])
    ns = sorted(set(s["n"]))
    seeds = (f"n={ns[0]} seed{'s' * (ns[0] != 1)}" if len(ns) == 1
             else f"n={ns[0]}–{ns[-1]} seeds")
    att = headline_metric(data, ds)
    a = data.attacks
    headers = ["method", "privacy", metric, "worst site", "ε server", "bytes/round", "s/cell"]
    if att:
        headers.append(f"{att[0]} {att[1]}")
    eps = tier_epsilon(s)
    rows = []
    for r, e in zip(s.itertuples(), eps):
        row = [short(r.method, width) if width else r.method,
               short(r.privacy, width) if width else r.privacy,
               chance_text(fmt_ci(r.utility_mean, r.utility_ci95), r.chance_seeds),
               fmt(r.worst_site_mean), fmt_eps_short(e, r.unit),
               fmt_bytes(r.bytes_per_round), fmt_seconds(getattr(r, "wall_s", math.nan))]
        if att:
            v = a[(a["dataset"] == ds) & (a["method"] == r.method) & (a["privacy"] == r.privacy)
                  & (a["attack"] == att[0]) & (a["metric"] == att[1])]["mean"]
            row.append(fmt(float(v.iloc[0])) if len(v) else "—")
        rows.append(row)
    # a column with nothing to say (no timings, no attack) is left out
    keep = [j for j in range(len(headers)) if j < 3 or any(r[j] != "—" for r in rows)]
    headers = [headers[j] for j in keep]
    rows = [[r[j] for j in keep] for r in rows]
    return (f"{ds}: {metric} on the pooled test set (mean over seeds ± 95% CI, {seeds})",
            headers, rows)


#: what the headline's columns mean (printed under it in the terminal)
HEADLINE_KEY = ("95% CI: over seeds and test rows",
                "worst site: the lowest site's mean over seeds",
                "ε server: against an honest-but-curious server, rec = per patient record, "
                "cli = per hospital, — = no guarantee against it",
                "bytes/round: sent up + down", "s/cell: wall seconds on this machine")


def chance_note(data: ReportData, ds: str, *, sites: bool = True) -> str | None:
    """The footnote for :data:`CHANCE_MARK` on a dataset, if some entry or
    (with ``sites``, for the tables that show per-site scores) some site
    has it."""
    s = data.summary[(data.summary["dataset"] == ds) & (data.summary["chance_seeds"] > 0)]
    st = data.sites
    st = st[(st["dataset"] == ds) & (st["chance_seeds"] > 0)] if "chance_seeds" in st else st[:0]
    parts = []
    if not s.empty:
        base = s["majority_baseline"].dropna()
        at = f" ({fmt(float(base.iloc[0]))})" if len(base) else ""
        parts.append(f"{CHANCE_MARK} does not beat the majority-class baseline{at} in at "
                     f"least one seed (one-sided test on the test rows): "
                     f"{', '.join(f'{m} / {p}' for m, p in zip(s['method'], s['privacy']))}")
    if sites and not st.empty:
        parts.append(f"{CHANCE_MARK} on a site's score: it does not beat that site's own "
                     f"majority class in at least one seed ({len(st)} site score"
                     f"{'s' * (len(st) != 1)})")
    return "; ".join(parts) or None


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
            vals = {r.site: r for r in e.itertuples()}

            def cell(n: str, vals: dict[str, Any] = vals) -> str:
                r = vals.get(n)
                if r is None:
                    return "—"
                return chance_text(fmt(r.utility_mean), r.chance_seeds)

            worst = vals.get("(worst)")
            rows.append([m, p, *(cell(n) for n in names),
                         fmt(worst.utility_mean) if worst is not None else "—",
                         fmt(psm.get((m, p)))])
        base = {r.site: r.majority_baseline for r in st.itertuples()}
        if any(not math.isnan(_num(base.get(n))) for n in names):
            rows.append(["(majority class)", "", *(fmt(base.get(n)) for n in names), "", ""])
        return (f"per-site {metric} (mean over seeds; † the site does not beat its own majority "
                f"class in some seed), the worst site and the mean over sites",
                ["method", "privacy", *names, "worst", "site mean"], rows)
    for (m, p), e in st.groupby(["method", "privacy"], sort=False):
        e = e[e["site"] != "(worst)"].dropna(subset=["utility_mean"])
        v = e["utility_mean"].to_numpy(dtype=float)
        if not len(v):
            continue
        worst = e.iloc[int(np.argmin(v))]["site"]
        q = np.percentile(v, [10, 50, 90])
        at_chance = int((e["chance_seeds"] > 0).sum()) if "chance_seeds" in e else 0
        rows.append([m, p, str(len(v)), fmt(float(v.min())), str(worst), fmt(q[0]), fmt(q[1]),
                     fmt(q[2]), fmt(float(v.max())), fmt(psm.get((m, p))), str(at_chance)])
    return (f"per-site {metric} over {len(names)} sites (mean over seeds; every site in "
            f"tables/sites.csv)",
            ["method", "privacy", "sites", "worst", "worst site", "10th pct", "median",
             "90th pct", "best", "site mean", "sites at chance"], rows)


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


def _audit_text(bound: float, ceiling: float, n: int, flag: Any) -> str:
    if not n:
        return "—"
    mark = {"contradicts the claim": "⚠ CONTRADICTS THE CLAIM",
            "no power": "no power"}.get(str(flag), "within")
    return f"≥ {bound:.2f} (ceiling {ceiling:.2g}; {mark})"


def claims_table(data: ReportData, ds: str) -> Table | None:
    """Verified claims per entry (:func:`claims`)."""
    c = data.claims[data.claims["dataset"] == ds] if not data.claims.empty else data.claims
    if c.empty:
        return None
    rows = []
    for r in c.itertuples():
        eps = [fmt_eps_short(getattr(r, f"eps_{a}"), r.unit) for a in
               ("server", "client", "released")]
        if r.protected is False and eps[0] == "—":
            eps[0] = "— (not protected)"
        mia = ("—" if r.mia_attack is None else
               f"{fmt(r.mia_tpr)} (none {fmt(r.mia_tpr_unprotected)})")
        inv = (f"{r.psnr:.1f} dB (none {r.psnr_unprotected:.1f})" if r.inv_attack and not
               math.isnan(r.psnr) and not math.isnan(_num(r.psnr_unprotected)) else
               f"{r.psnr:.1f} dB" if r.inv_attack and not math.isnan(r.psnr) else
               ("n/a" if r.inv_note else "—"))
        rows.append([r.method, r.privacy, *eps,
                     _audit_text(r.audit_record, r.audit_record_ceiling, r.audit_record_n,
                                 r.audit_record_flag),
                     _audit_text(r.audit_client, r.audit_client_ceiling, r.audit_client_n,
                                 r.audit_client_flag), mia, inv])
    headers = ["method", "privacy", "ε server", "ε client", "ε released",
               "audited ε record-level", "audited ε client-level",
               "MIA TPR@0.1%FPR", "best PSNR"]
    keep = [j for j in range(len(headers)) if j < 3 or any(r[j] != "—" for r in rows)]
    return ("verified claims: the accountant's ε per adversary; the audited lower bound "
            "(95%, largest over seeds) with the audit's ceiling (the most it could certify) "
            "and verdict; the strongest attack, beside the same method without protection",
            [headers[j] for j in keep], [[r[j] for j in keep] for r in rows])


def scorecard_table(data: ReportData, ds: str) -> Table | None:
    """The protection scorecard (:func:`scorecard`)."""
    sc = data.scorecard[data.scorecard["dataset"] == ds] if not data.scorecard.empty \
        else data.scorecard
    if sc.empty:
        return None
    rows = []
    for r in sc.itertuples():
        du = ("—" if math.isnan(r.d_utility) else
              f"{r.d_utility:+.3f}" + ("" if math.isnan(r.d_utility_ci) else
                                       f" ± {r.d_utility_ci:.3f}")
              + (" ≈" if not math.isnan(r.d_utility_p) and r.d_utility_p >= ALPHA else ""))
        mia = ("—" if r.mia_attack is None else
               f"AUC {fmt(r.mia_auc_unprotected)} → {fmt(r.mia_auc)}: {r.mia_verdict}")
        inv = ("—" if r.inv_attack is None or math.isnan(r.psnr) else
               f"{_num(r.psnr_unprotected):.1f} → {r.psnr:.1f} dB: {r.inv_verdict}")
        rows.append([r.privacy, r.method, du, _signed(r.d_worst_site), fmt_x(r.time_x),
                     fmt_x(r.bytes_x), mia, inv])
    headers = ["protection", "method", "Δ utility (95% CI)", "Δ worst site", "× time",
               "× bytes/round", "membership inference", "gradient inversion"]
    keep = [j for j in range(len(headers)) if j < 3 or any(r[j] != "—" for r in rows)]
    return ("protection scorecard: each protection against the same method without it "
            "(paired over seeds; ≈ not distinguishable at 5%); attacks without → with it",
            [headers[j] for j in keep], [[r[j] for j in keep] for r in rows])


def settings_table(data: ReportData, ds: str) -> Table | None:
    """The resolved training settings and what DP used, per entry."""
    s = data.summary[(data.summary["dataset"] == ds) & (data.summary["n"] > 0)]
    if s.empty:
        return None
    rows = []
    for r in s.itertuples():
        def g(k: str, r: Any = r) -> Any:
            return getattr(r, k, math.nan)

        sig = _fmt_range(_num(g("sigma_min")), _num(g("sigma_max")))
        q = _fmt_range(_num(g("sample_rate_min")), _num(g("sample_rate_max")))
        steps = ("—" if math.isnan(_num(g("steps"))) else
                 f"{int(g('steps'))}/{int(g('planned_steps'))}"
                 if not math.isnan(_num(g("planned_steps"))) else f"{int(g('steps'))}")
        tuned = g("tuned")
        rows.append([r.method, r.privacy, fmt(g("rounds")), fmt(g("lr"), 3).rstrip("0")
                     .rstrip(".") if isinstance(g("lr"), float) else fmt(g("lr")),
                     fmt(g("local_steps"), 0), fmt(g("batch_size"), 0),
                     fmt(g("clients_per_round"), 2).rstrip("0").rstrip("."),
                     fmt(g("optimizer")), sig or "—", fmt(g("clip"), 2) if sig else "—",
                     q or "—", steps,
                     (f"{tuned} ({int(g('tuning_trials'))} trials)" if isinstance(tuned, str)
                      and tuned else "not tuned" if isinstance(g("tuning"), str) else "—")])
    return ("training settings as resolved (dataset defaults included) and what the DP "
            "mechanisms used: σ (noise multiplier) over sites and rounds, clip C, sampling "
            "rate q, steps taken/planned; tuning under the stated protocol",
            ["method", "privacy", "rounds", "lr", "local steps", "batch", "clients/round",
             "optimizer", "σ used", "C", "q", "steps", "tuned"], rows)


def text_tables(data: ReportData) -> dict[str, list[Table]]:
    """Per dataset, the display tables as (title, headers, rows) of strings;
    the key ``""`` holds tables that span datasets (labels, tuning protocols,
    warnings, failures). The markdown, terminal and HTML writers all render
    these, so they show the same cells."""
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
        lb = data.leaderboard[data.leaderboard["dataset"] == ds]
        for tier, _ in TIERS:
            t = lb[lb["tier"] == tier]
            if t.empty:
                continue
            tabs.append((f"leaderboard, {tier}",
                         ["rank", "method", "privacy", f"{metric} (95% CI)", "worst site",
                          "vs local", "ε (δ)", "unit", "bytes/round", "s/cell", "vs above",
                          "provenance"],
                         [[r.rank_text, r.method, r.privacy,
                           chance_text(fmt_ci(r.utility_mean, r.utility_ci95), r.chance_seeds),
                           fmt(r.worst_site_mean), _signed(r.worst_site_gain),
                           fmt_eps(r.epsilon, r.delta), fmt(r.unit),
                           fmt_bytes(r.bytes_per_round), fmt_seconds(r.wall_s),
                           fmt_p(r.vs_above_p), r.provenance] for r in t.itertuples()]))
        ct = claims_table(data, ds)
        if ct:
            tabs.append(ct)
        sc = scorecard_table(data, ds)
        if sc:
            tabs.append(sc)
        privs = sorted(ok["privacy"].unique(), key=lambda p: (p != "none", natural_key(p)))
        methods = list(dict.fromkeys(ok["method"]))
        cell = {(r.method, r.privacy): chance_text(fmt_ci(r.utility_mean, r.utility_ci95),
                                               r.chance_seeds)
                for r in ok.itertuples()}
        grid = [[m, *(cell.get((m, p), "—") for p in privs)] for m in methods]
        tabs.append((f"{metric} on the pooled test set (mean ± 95% CI over seeds and test rows)",
                     ["method \\ privacy", *privs], grid))
        b = data.baselines[data.baselines["dataset"] == ds]
        if not b.empty:
            def d(v: float, p: float) -> str:
                return _signed(v) + (" ≈" if not math.isnan(_num(p)) and p >= ALPHA else "")

            tabs.append(("federated learning against centralized and local training "
                         "(baselines without privacy; ≈ not distinguishable, paired over "
                         "seeds)",
                         ["method", "privacy", metric, "centralized", "local", "Δ centralized",
                          "Δ local", "gap closed", "worst site", "local worst site",
                          "worst site vs local"],
                         [[r.method, r.privacy, chance_text(fmt(r.utility_mean), r.chance_seeds),
                           fmt(r.centralized), fmt(r.local), d(r.vs_centralized, r.p_centralized),
                           d(r.vs_local, r.p_local), fmt(r.gap_closed, 2),
                           fmt(r.worst_site_mean), fmt(r.local_worst_site),
                           _signed(r.worst_site_gain)]
                          for r in b.itertuples()]))
        st = settings_table(data, ds)
        if st:
            tabs.append(st)
        cost_cols = [k for k in ("wall_s", "train_s") if k in ok and ok[k].notna().any()]
        # coordinates a secure-aggregation transport clipped (shown when any cell clipped)
        if "clipped_coordinates" in ok and (ok["clipped_coordinates"].fillna(0) > 0).any():
            cost_cols.append("clipped_coordinates")
        has_clock = "clock_s" in ok and ok["clock_s"].notna().any()
        ref = {m: r for m, r in zip(ok["method"], ok.itertuples()) if r.privacy == "none"}
        time_x = [fmt_x(_num(r.wall_s) / _num(ref[r.method].wall_s))
                  if "wall_s" in cost_cols and r.method in ref and _num(ref[r.method].wall_s)
                  else "—" for r in ok.itertuples()]
        tabs.append(("cost (mean per cell over seeds; × time: wall time against the same "
                     "method without protection, which includes DP-SGD's per-example work; "
                     "privacy_s in tables/summary.csv counts only separate privacy stages)",
                     ["method", "privacy", "bytes up", "bytes down", "bytes/round",
                      *[{"wall_s": "wall s", "train_s": "train s",
                         "clipped_coordinates": "clipped coords"}[k] for k in cost_cols],
                      *(["× time"] if "wall_s" in cost_cols else []),
                      *(["virtual h"] if has_clock else [])],
                     [[r["method"], r["privacy"], fmt_bytes(r["bytes_up"]),
                       fmt_bytes(r["bytes_down"]), fmt_bytes(r.get("bytes_per_round")),
                       *[fmt(r[k], 0 if k == "clipped_coordinates" else 2) for k in cost_cols],
                       *([tx] if "wall_s" in cost_cols else []),
                       *([fmt(_num(r.get("clock_s")) / 3600, 2)] if has_clock else [])]
                      for (_, r), tx in zip(ok.iterrows(), time_x)]))
        sit = _site_table(data, ds, metric)
        if sit:
            tabs.append(sit)
        at = _attack_table(data, ds)
        if at:
            tabs.append(at)
        out[ds] = _markchance_text(tabs, {(r.method, r.privacy) for r in ok.itertuples()
                                      if r.chance_seeds > 0})
    span: list[Table] = []
    if not data.legend.empty:
        span.append(("labels: each short label and the configuration it ran (privacy: the "
                     "parameters set, then what the mechanisms used and spent)",
                     ["axis", "label", "configuration"],
                     [[r.axis, r.label, r.config] for r in data.legend.itertuples()]))
    tp = s.dropna(subset=["tuning"]) if "tuning" in s else s[:0]
    if not tp.empty:
        span.append(("tuning protocols of tuned cells",
                     ["dataset", "method", "privacy", "protocol"],
                     [[r.dataset, r.method, r.privacy, str(r.tuning)]
                      for r in tp.itertuples()]))
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


def _markchance_text(tabs: list[Table], at_chance: set[tuple[str, str]]) -> list[Table]:
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
    headline, the leaderboard tiers, verified claims, the protection
    scorecard, the method × privacy utility grid, FL against the baselines,
    training settings, cost, per-site utility and attacks; the label legend,
    tuning protocols, warnings and the cells that did not finish ok after."""
    if not records:
        return "no result records\n"
    return render_text(build(records), tablefmt=fmt)


def fit_table(headers: list[str], rows: list[list[str]], width: int
              ) -> tuple[list[list[str]], list[list[list[str]]], list[str]]:
    """A table made to fit ``width`` columns of plain text: long labels in
    the ``method``/``privacy``/``label`` columns become keys (``L1`` ...)
    listed in a legend; if it is still too wide its other columns are split
    into blocks, each repeating the label columns. Returns the header blocks,
    the row blocks and the legend lines."""
    def wide(h: list[str], rs: list[list[str]]) -> int:
        ws = [max(len(str(x)) for x in col) for col in zip(h, *rs)]
        return sum(ws) + 2 * (len(ws) - 1)

    label_cols = [j for j, h in enumerate(headers) if h in ("method", "privacy", "label",
                                                            "protection", "method \\ privacy")]
    rows = [list(r) for r in rows]
    legend: dict[str, str] = {}
    if wide(headers, rows) > width and label_cols:
        longs = sorted({r[j] for r in rows for j in label_cols if len(r[j]) > 12},
                       key=lambda x: -len(x))
        for text in longs:
            if wide(headers, rows) <= width:
                break
            key = f"L{len(legend) + 1}"
            legend[key] = text
            rows = [[key if (j in label_cols and c == text) else c for j, c in enumerate(r)]
                    for r in rows]
    hblocks: list[Any] = [headers]
    rblocks: list[Any] = [rows]
    if wide(headers, rows) > width:
        lead = label_cols[:2]
        fixed = (list(range(max(lead) + 1)) if lead and max(lead) < 4 else lead) or [0]
        rest = [j for j in range(len(headers)) if j not in fixed]
        hblocks, rblocks = [], []
        cur: list[int] = []
        for j in rest:
            trial = fixed + cur + [j]
            if cur and wide([headers[i] for i in trial], [[r[i] for i in trial]
                                                          for r in rows]) > width:
                hblocks.append([headers[i] for i in fixed + cur])
                rblocks.append([[r[i] for i in fixed + cur] for r in rows])
                cur = []
            cur.append(j)
        if cur:
            hblocks.append([headers[i] for i in fixed + cur])
            rblocks.append([[r[i] for i in fixed + cur] for r in rows])
    lines = [f"{k} = {v}" for k, v in legend.items()]
    return hblocks, rblocks, lines


def render_text(data: ReportData, *, tablefmt: str = "github", level: int = 2,
                escape: Callable[[Any], str] | None = None,
                width: int | None = None) -> str:
    """Every table of :func:`text_tables` as text; ``escape`` (e.g.
    :func:`md_escape`) is applied to every title, header and cell. With
    ``width`` (the terminal) each table is made to fit (:func:`fit_table`)
    and titles wrap."""
    esc = escape or str
    h = "#" * level
    out: list[str] = []
    for ds, tabs in text_tables(data).items():
        if ds:
            out.append(f"{h} {esc(ds)}\n")
        for title, headers, rows in tabs:
            head = f"{h}# {esc(title)}" if ds else f"{h} {esc(title)}"
            out.append("\n".join(textwrap.wrap(head, width)) + "\n" if width else head + "\n")
            if headers:
                if width:
                    if title.startswith("labels:") or title.startswith("tuning protocols"):
                        rows = [[*r[:-1], short(r[-1], max(20, width - 40))] for r in rows]
                    hb, rb, leg = fit_table(headers, rows, width)
                    for hh, rr in zip(hb, rb):
                        out.append("\n".join(columns(hh, rr)))
                        out.append("")
                    out += leg
                else:
                    out.append(tabulate([[esc(c) for c in r] for r in rows],
                                        headers=[esc(x) for x in headers], tablefmt=tablefmt,
                                        disable_numparse=True))
            out.append("")
        note = chance_note(data, ds) if ds else None
        if note:
            out += [*(textwrap.wrap(esc(note), width) if width else [esc(note)]), ""]
    return "\n".join(out) + "\n"


def terminal_summary(data: ReportData, *, verbose: bool = False,
                     width: int = TERMINAL_WIDTH) -> str:
    """What ``fedmedbench run`` and ``report`` print: per dataset the
    :func:`headline_table` (with ``verbose``, every table of
    :func:`text_tables`), then the library warnings, each once. Every line
    fits ``width`` columns: long labels become keys listed under the table."""
    from fedmedbench.errors import printable

    if not data.records:
        return "no result records\n"
    if verbose:
        return printable(render_text(data, tablefmt="simple", width=width))
    out: list[str] = []
    keys: list[str] = []
    for ds in data.datasets:
        title, headers, rows = headline_table(data, ds)
        if not rows:
            out += [f"{ds}: no successful cells", ""]
            continue
        keys += [k for k in HEADLINE_KEY if (k.split(":")[0] in headers
                                             or k.startswith("95% CI")) and k not in keys]
        hb, rb, leg = fit_table(headers, rows, width)
        out += textwrap.wrap(title, width)
        for hh, rr in zip(hb, rb):
            out += columns(hh, rr)
        out += leg
        note = chance_note(data, ds, sites=False)
        if note:
            out += textwrap.wrap(note, width)
        out.append("")
    if keys:  # what the columns mean, once under every headline
        out += [*textwrap.wrap("; ".join(keys), width), ""]
    warn = warning_summary(data.records)
    if warn:
        out += textwrap.wrap(f"{len(warn)} distinct warning(s) from libraries, captured in the "
                             f"records (all of them: --verbose, or the report):", width)
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


def columns(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A plain table: columns two spaces apart, a rule under the headers."""
    w = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(n) for x, n in zip(r, w)).rstrip()  # noqa: E731
    return [line(headers), "  ".join("-" * n for n in w), *(line(r) for r in rows)]


def summary_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    return {s: int(np.sum([r.get("status") == s for r in records]))
            for s in ("ok", "failed", "skipped", "diverged")}
