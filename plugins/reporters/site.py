"""The static leaderboard site that ``fedmedbench leaderboard`` writes.

``fedmedbench leaderboard`` (:mod:`fedmedbench.leaderboard`) verifies each
submission folder and hands this reporter the records, each annotated with
``_track`` (the track's definition) and ``_submission`` (what the manifest
says: package, hashes, environment, sign-off). Records without ``_track``
(an ordinary ``fedmedbench report``) give ``site/index.html``: the same
leaderboard layout (tiers with verified claims, the scorecard) of those
results, marked unverified.

The site is one folder, nothing fetched (the page style, script and CSP of
:mod:`~fedmedbench.plugins.reporters.html`):

- ``index.html``: every track with its submissions, entries, the best entry
  of each tier and how many rows an audit flags;
- ``track-<id>.html`` per track: its definition; the leaderboard per tier
  with **verified claims on every row** (the accountant's ε per adversary,
  the audited lower bound at record and client level with the audit's
  ceiling and verdict, the strongest membership inference at TPR@0.1% FPR
  and the best reconstruction PSNR, each beside the same method without
  protection) — a row whose claim an audit contradicts is flagged; the
  protection scorecard; the figures; the other tables; and every
  submission's provenance (package and wheel hash, environment, seeds,
  tuning, sign-off, manifest digest), which each row names (``S1`` ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedmedbench.plugins.reporters.figures import figures, slug
from fedmedbench.plugins.reporters.html import (
    _e,
    document,
    figure,
    flagged_entries,
    rules_box,
    table,
)
from fedmedbench.report import (
    CHANCE_MARK,
    TIERS,
    ReportData,
    build,
    chance_note,
    chance_text,
    fmt,
    fmt_bytes,
    fmt_ci,
    fmt_eps,
    fmt_eps_short,
    fmt_p,
    fmt_seconds,
    text_tables,
)

#: tables of :func:`fedmedbench.report.text_tables` the track page shows in its own form
OWN = ("leaderboard, ", "verified claims", "protection scorecard")


def _audit(bound: float, ceiling: float, n: int, flag: Any) -> str:
    if not n:
        return "—"
    verdict = {"contradicts the claim": "⚠ CONTRADICTS THE CLAIM",
               "no power": "no power"}.get(str(flag), "within claim")
    return f"≥ {bound:.2f} (ceiling {ceiling:.2g}, {verdict})"


def _f(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _vs(v: float, base: float, digits: int = 3, unit: str = "") -> str:
    """``0.002 (unprot. 0.008)``: a value beside the same method's without protection."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    s = f"{v:.{digits}f}{unit}"
    if base is not None and not (isinstance(base, float) and math.isnan(base)):
        s += f" (unprot. {base:.{digits}f})"
    return s


def entry_submissions(records: list[dict[str, Any]], data: ReportData
                      ) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(method, privacy): _submission}`` of the entries of ``data``."""
    byid = {str(r.get("cell_id")): r.get("_submission") or {} for r in records}
    out: dict[tuple[str, str], Any] = {}
    for cid, m, p in zip(data.cells["cell_id"], data.cells["method"], data.cells["privacy"]):
        out.setdefault((m, p), byid.get(cid, {}))
    return out


def leaderboard_rows(data: ReportData, ds: str, tier: str,
                     subs: dict[tuple[str, str], dict[str, Any]]) -> tuple[list[str],
                                                                           list[list[str]],
                                                                           list[str]]:
    """One tier's rows with verified claims; the row classes (``flagged``)."""
    lb = data.leaderboard
    lb = lb[(lb["dataset"] == ds) & (lb["tier"] == tier)]
    cl = data.claims
    claims = {(r.method, r.privacy): r for r in cl[cl["dataset"] == ds].itertuples()} \
        if not cl.empty else {}
    metric = str(lb["metric"].iloc[0]) if len(lb) else "utility"
    headers = ["rank", "method", "privacy", "submission", f"{metric} (95% CI)", "worst site",
               "ε server (δ)", "ε client, released", "audited ε, record-level",
               "audited ε, client-level", "MIA TPR@0.1% FPR", "best PSNR (dB)",
               "bytes/ round", "s/ cell", "vs above"]
    rows, classes = [], []
    for r in lb.itertuples():
        c = claims.get((r.method, r.privacy))
        sub = subs.get((r.method, r.privacy), {})
        flagged = bool(c is not None and c.flagged)
        rows.append([
            r.rank_text + (" ⚠" if flagged else ""), r.method, r.privacy,
            f"S{sub.get('index', '?')} {sub.get('short', '?')}",
            chance_text(fmt_ci(r.utility_mean, r.utility_ci95), r.chance_seeds),
            fmt(r.worst_site_mean),
            fmt_eps(r.epsilon, r.delta) if c is None or c.protected is not False
            else "— (not protected)",
            (f"{fmt_eps_short(c.eps_client, c.unit)}, {fmt_eps_short(c.eps_released, c.unit)}"
             if c is not None and not (math.isnan(_f(c.eps_client))
                                       and math.isnan(_f(c.eps_released))) else "—"),
            _audit(c.audit_record, c.audit_record_ceiling, c.audit_record_n,
                   c.audit_record_flag) if c is not None else "—",
            _audit(c.audit_client, c.audit_client_ceiling, c.audit_client_n,
                   c.audit_client_flag) if c is not None else "—",
            _vs(c.mia_tpr, c.mia_tpr_unprotected) if c is not None and c.mia_attack else "—",
            (_vs(c.psnr, c.psnr_unprotected, 1) if c is not None and c.inv_attack
             else "n/a" if c is not None and c.inv_note else "—"),
            fmt_bytes(r.bytes_per_round), fmt_seconds(r.wall_s),
            fmt_p(r.vs_above_p).replace("≈ (p=", "≈ p=").rstrip(")")])
        classes.append("flagged" if flagged else "")
    keep = [j for j in range(len(headers)) if j < 5 or any(r[j] != "—" for r in rows)]
    if not subs:  # results of a run, not submissions: no submission column
        keep = [j for j in keep if headers[j] != "submission"]
    return [headers[j] for j in keep], [[r[j] for j in keep] for r in rows], classes


def _definition(t: dict[str, Any]) -> str:
    d = t.get("definition") or {}

    def stack(s: Any) -> str:
        items = s if isinstance(s, list) else [s]
        out = []
        for x in items:
            if isinstance(x, dict):
                params = ", ".join(f"{k}={v}" for k, v in x.items() if k != "name")
                out.append(f"{x.get('name')}({params})" if params else str(x.get("name")))
            else:
                out.append(str(x))
        return " + ".join(out)

    items = [("summary", t.get("summary", "")), ("provenance", t.get("provenance", "")),
             ("dataset", stack(d.get("dataset"))), ("partitioner", stack(d.get("partitioner"))),
             ("model", stack(d.get("model"))), ("aggregator", stack(d.get("aggregator"))),
             ("budget", f"{d.get('rounds')} rounds; " + ", ".join(
                 f"{k}={v}" for k, v in (d.get("run") or {}).items())),
             ("seeds", ", ".join(map(str, d.get("seeds") or []))),
             ("tiers", "; ".join(f"{x['id']}: {x['name']}" for x in d.get("tiers") or [])),
             ("protections", "; ".join(f"{p['id']}: {stack(p['stack'])}"
                                       for p in d.get("protections") or [])),
             ("attacks", ", ".join(stack(a) for a in d.get("attacks") or [])
              + " on every entry; attacks a submission brings run sealed (a separate process)"),
             ("audits", "; ".join(f"{u}-level claims: {stack(a['attack'])}"
                                  + (f" on {stack(a['model'])}" if a.get("model") else "")
                                  for u, a in (d.get("audits") or {}).items()) or "—"),
             ("tuning", t.get("tuning_text", "")),
             ("metric", t.get("metric_ci", "")), ("digest", t.get("digest", ""))]
    return '<dl class="def">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>"
                                        for k, v in items) + "</dl>"


def _submissions_table(subs: list[dict[str, Any]], tid: str) -> str:
    headers = ["id", "submission", "package and wheel SHA-256", "environment", "seeds",
               "tuning", "records", "attacks sealed", "signed off by", "manifest digest"]
    rows = []
    for s in subs:
        pkg = s.get("package")
        env = s.get("environment") or {}
        rows.append([
            f"S{s['index']}", s["label"],
            (f"{pkg['name']} {pkg['version']} ({pkg['wheel'].split('/')[-1]}, "
             f"{pkg['sha256'][:16]}…)" if pkg else "fedmedbench's built-ins"),
            (f"fedmedbench {env.get('fedmedbench')}, python {env.get('python')}, torch "
             f"{env.get('torch')}, {env.get('platform')}"
             + (f", commit {str(env.get('git_commit'))[:10]}" if env.get("git_commit") else "")
             + (f"; {env.get('isolation')}" if env.get("isolation") else "")),
            ", ".join(map(str, s.get("seeds") or [])),
            f"{s.get('tuning_trials', 0)} trials",
            str(s.get("records", 0)), "yes" if s.get("attacks_isolated") else "no",
            s.get("signed_off_by") or "—", str(s.get("digest", ""))[:16] + "…"])
    return table(tid, headers, rows)


def track_page(records: list[dict[str, Any]], t: dict[str, Any],
               subs: list[dict[str, Any]]) -> str:
    data = build(records)
    ds = data.datasets[0] if data.datasets else ""
    entry_sub = entry_submissions(records, data)
    flagged = flagged_entries(data)
    body = [f"<header><p><a href=\"index.html\">← all tracks</a></p>"
            f"<h1>{_e(t['title'])}</h1>",
            f'<p class="meta">track {_e(t["id"])}@{_e(t["version"])} · {len(subs)} '
            f'submission{"s" * (len(subs) != 1)} · {len(data.summary)} entries · digest '
            f'{_e(str(t.get("digest"))[:16])}…</p>',
            '<nav><a href="#leaderboard">leaderboard</a><a href="#scorecard">protection '
            'scorecard</a><a href="#figures">figures</a><a href="#tables">all tables</a>'
            '<a href="#submissions">submissions and provenance</a>'
            '<a href="#definition">track definition</a></nav>', rules_box()]
    if flagged:
        body.append(f'<p class="flag">⚠ {len(flagged)} entr{"ies" if len(flagged) > 1 else "y"}'
                    f" whose privacy claim an audit contradicts (the audited lower bound on ε "
                    f"exceeds the ε its accountant claims): "
                    f"{_e(', '.join(f'{m} / {p}' for m, p in flagged))}</p>")
    body.append("</header>")
    body.append('<section id="leaderboard"><h2>leaderboard</h2>')
    for i, (tier, _) in enumerate(TIERS):
        headers, rows, classes = leaderboard_rows(data, ds, tier, entry_sub)
        if not rows:
            continue
        body.append(f"<h3>{_e(tier)}</h3>")
        body.append(table(f"lb-{slug(t['id'])}-{i}", headers, rows, row_classes=classes,
                          css="lb"))
    note = chance_note(data, ds)
    if note:
        body.append(f'<p class="note">{_e(note)}</p>')
    body.append("</section>")
    tabs = text_tables(data).get(ds, [])
    sc = [x for x in tabs if x[0].startswith("protection scorecard")]
    body.append('<section id="scorecard"><h2>protection scorecard</h2>')
    if sc:
        body.append(f'<p class="note">{_e(sc[0][0])}</p>')
        body.append(table(f"sc-{slug(t['id'])}", sc[0][1], sc[0][2]))
    else:
        body.append("<p>no protected entry has an unprotected twin to compare with</p>")
    body.append("</section>")
    body.append('<section id="figures"><h2>figures</h2>')
    body += [figure(data, stem, d, kind) for stem, (d, kind, _) in figures(data).items()]
    body.append("</section>")
    body.append('<section id="tables"><h2>all tables</h2>')
    rows_cls = flagged
    for i, (ttl, headers, rows) in enumerate(tabs):
        if i == 0 or ttl.startswith(OWN) or not headers:
            continue
        body.append(f"<h3>{_e(ttl)}</h3>")
        cls = None
        if "method" in headers and "privacy" in headers:
            mi, pi = headers.index("method"), headers.index("privacy")
            cls = [rows_cls.get((r[mi].rstrip(" " + CHANCE_MARK), r[pi]), "") for r in rows]
        body.append(table(f"t-{slug(t['id'])}-{i}", headers, rows, row_classes=cls))
    for ttl, headers, rows in text_tables(data).get("", []):
        if headers:
            body.append(f"<h3>{_e(ttl)}</h3>")
            body.append(table(f"t-{slug(t['id'])}-all-{len(body)}", headers, rows))
    body.append("</section>")
    body.append('<section id="submissions"><h2>submissions and provenance</h2>')
    body.append('<p class="note">Every submission verified: its manifest digest, the track '
                "version and digest, the SHA-256 of every record, tuning log and wheel, and "
                "each record made for this track by fedmedbench and its package alone. A "
                "row's submission column names its S-number here.</p>")
    body.append(_submissions_table(subs, f"subs-{slug(t['id'])}"))
    body.append("</section>")
    body.append(f'<section id="definition"><h2>track definition</h2>{_definition(t)}</section>')
    return document(f"{t['title']} — fedmedbench leaderboard", body)


def index_page(tracks: list[tuple[dict[str, Any], list[dict[str, Any]], ReportData]]) -> str:
    body = ["<header><h1>fedmedbench leaderboard</h1>",
            '<p class="meta">Verified submissions on versioned tracks: every number comes '
            "from records whose hashes match their manifest, rerun in CI from the submitted "
            "wheel.</p>", rules_box(), "</header>", "<h2>tracks</h2>"]
    headers = ["track", "title", "submissions", "entries", *[f"best, {n}" for n, _ in TIERS],
               "flagged"]
    rows = []
    for t, subs, data in tracks:
        lb = data.leaderboard
        best = []
        for tier, _ in TIERS:
            x = lb[lb["tier"] == tier]
            best.append("—" if x.empty else
                        f"{x.iloc[0]['method']} / {x.iloc[0]['privacy']}: "
                        f"{x.iloc[0]['utility_mean']:.3f}")
        nflag = int(data.claims["flagged"].sum()) if not data.claims.empty else 0
        rows.append([f"{t['id']}@{t['version']}", t["title"], str(len(subs)),
                     str(len(data.summary)), *best, str(nflag)])
    body.append(table("tracks", headers, rows))
    body.append("<ul>" + "".join(
        f'<li><a href="track-{_e(slug(t["id"]))}.html">{_e(t["title"])}</a> '
        f'({_e(t["id"])}@{_e(t["version"])})</li>' for t, _, _ in tracks) + "</ul>")
    return document("fedmedbench leaderboard", body)


def results_page(records: list[dict[str, Any]]) -> str:
    """The leaderboard layout for results that are not submissions (``fedmedbench
    report``): per dataset, the tiers with verified claims on every row and the
    scorecard; the full report is ``../index.html``."""
    data = build(records)
    body = ["<header><p><a href=\"../index.html\">← the full report</a></p>"
            "<h1>leaderboard view of these results</h1>",
            '<p class="meta">Not a track: these cells are the ones this report was made '
            "from, unverified. `fedmedbench leaderboard` builds the verified site of "
            "submissions to tracks.</p>", rules_box(), "</header>"]
    for ds in data.datasets:
        body.append(f"<section><h2>{_e(ds)}</h2>")
        for i, (tier, _) in enumerate(TIERS):
            headers, rows, classes = leaderboard_rows(data, ds, tier, {})
            if rows:
                body.append(f"<h3>{_e(tier)}</h3>")
                body.append(table(f"lb-{slug(ds)}-{i}", headers, rows, row_classes=classes,
                                  css="lb"))
        sc = [x for x in text_tables(data).get(ds, [])
              if x[0].startswith("protection scorecard")]
        if sc:
            body.append(f"<h3>{_e(sc[0][0])}</h3>")
            body.append(table(f"sc-{slug(ds)}", sc[0][1], sc[0][2]))
        body.append("</section>")
    return document("fedmedbench: leaderboard view", body)


def write_site(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The site's pages (none when no record carries ``_track``)."""
    from fedmedbench import write_output

    by: dict[str, list[dict[str, Any]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    subs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        t = r.get("_track")
        if not isinstance(t, dict) or "id" not in t:
            continue
        by.setdefault(t["id"], []).append(r)
        meta[t["id"]] = t
        s = r.get("_submission") or {}
        subs.setdefault(t["id"], {})[int(s.get("index", 0))] = s
    if not by:  # the results of a run: one page in the leaderboard's layout
        return [write_output(Path(out_dir), "site/index.html", results_page(records))]
    paths, done = [], []
    for tid in sorted(by):
        ss = [subs[tid][k] for k in sorted(subs[tid])]
        paths.append(write_output(Path(out_dir), f"track-{slug(tid)}.html",
                                  track_page(by[tid], meta[tid], ss)))
        done.append((meta[tid], ss, build(by[tid])))
    paths.append(write_output(Path(out_dir), "index.html", index_page(done)))
    return paths


__all__ = ["write_site", "track_page", "index_page", "leaderboard_rows"]
