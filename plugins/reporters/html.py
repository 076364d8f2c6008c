"""The report as one self-contained static HTML page, ``index.html``, and the
pieces the leaderboard site (:mod:`~fedmedbench.plugins.reporters.site`)
shares with it.

Per dataset the headline table comes first with the privacy–utility–cost and
attack figures under it, then the leaderboard tiers, the verified claims,
the protection scorecard and the other tables and figures; the labels
table (short label → the configuration that ran), the tuning protocols, the
library warnings and the cells that did not finish close the page. Figures
are shown at their own size (none is wider than a 1,400 px window) and
shrink only on narrower screens.

Nothing is fetched: figures are embedded as SVG data URIs, the style and the
small script are inline, and a Content-Security-Policy forbids every other
source (``default-src 'none'``; the one script is admitted by its SHA-256
hash, so even a string that slipped through unescaped could not run). Every
string from a record or a plugin goes through :func:`html.escape`.

Tables are plain HTML first: without JavaScript they read as static tables
in rank order. The script adds a filter box above each table (rows whose
text does not contain the words typed are hidden) and sorting by clicking a
header (numbers, byte sizes and ``∞`` sort as values; ``—`` last).
``#sort=<table id>:<column>:<asc|desc>`` and ``#filter=<table id>:<text>``
in the URL apply one on load. Below 900 px each row becomes a block of
"column: value" lines, so no table scrolls sideways.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterable
from pathlib import Path

from fedmedbench.plugins.reporters.figures import figures, render, slug
from fedmedbench.report import (
    CI_RULE,
    RANKING_RULE,
    WORST_SITE_RULE,
    ReportData,
    build,
    chance_note,
    text_tables,
)

SCRIPT = r"""
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message));
    document.body.setAttribute('data-errors', errors.join(' | '));
  });
  var UNITS = {GB: 1e9, MB: 1e6, kB: 1e3, B: 1};
  function key(td) {
    var t = td.textContent.trim();
    if (t === '' || t === '\u2014') return null;
    if (t.charAt(0) === '\u221e') return Infinity;
    if (t.charAt(0) === '\u00d7') t = t.slice(1);
    var m = /^[\u2265\u2264]?\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)=?\s*(GB|MB|kB|B)?(?=\s|$|\(|=)/.exec(t);
    if (m) return parseFloat(m[1]) * (m[2] ? UNITS[m[2]] : 1);
    return t.toLowerCase();
  }
  function sortTable(table, col, dir) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, i) { return {r: r, i: i, k: key(r.cells[col])}; });
    keyed.sort(function (a, b) {
      var x = a.k, y = b.k;
      if (x === y) return a.i - b.i;
      if (x === null) return 1;
      if (y === null) return -1;
      var c;
      if (typeof x === typeof y) c = x < y ? -1 : 1;
      else c = typeof x === 'number' ? -1 : 1;
      return dir * c;
    });
    keyed.forEach(function (e) { body.appendChild(e.r); });
    var ths = table.tHead.rows[0].cells;
    for (var j = 0; j < ths.length; j++) {
      ths[j].setAttribute('aria-sort', j === col ? (dir > 0 ? 'ascending' : 'descending')
                                                 : 'none');
    }
  }
  function filterTable(table, text) {
    var words = text.toLowerCase().split(/\s+/).filter(function (w) { return w; });
    var shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      var t = r.textContent.toLowerCase();
      var ok = words.every(function (w) { return t.indexOf(w) >= 0; });
      r.hidden = !ok;
      if (ok) shown++;
    });
    table.setAttribute('data-shown', String(shown));
  }
  var tables = document.querySelectorAll('table.sortable');
  Array.prototype.forEach.call(tables, function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = 'sort by this column';
      function go() {
        var dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
        sortTable(table, col, dir);
      }
      th.addEventListener('click', go);
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter') go(); });
    });
    if (table.tBodies[0].rows.length > 3) {
      var box = document.createElement('input');
      box.type = 'search';
      box.className = 'filter';
      box.placeholder = 'filter rows (e.g. dp-sgd, fedavg)';
      box.setAttribute('aria-label', 'filter the rows of the table below');
      box.setAttribute('data-for', table.id);
      box.addEventListener('input', function () { filterTable(table, box.value); });
      table.parentNode.insertBefore(box, table);
    }
  });
  var h = decodeURIComponent(location.hash);
  var m = /[#&]sort=([^:&]+):(\d+):(asc|desc)/.exec(h);
  if (m) {
    var t = document.getElementById(m[1]);
    if (t) sortTable(t, parseInt(m[2], 10), m[3] === 'asc' ? 1 : -1);
  }
  var f = /[#&]filter=([^:&]+):([^&]*)/.exec(h);
  if (f) {
    var ft = document.getElementById(f[1]);
    if (ft) {
      filterTable(ft, f[2]);
      var fb = document.querySelector('input.filter[data-for="' + f[1] + '"]');
      if (fb) fb.value = f[2];
    }
  }
  document.body.setAttribute('data-ready', '1');
})();
"""

STYLE = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1360px;padding:0 1.2em 3em;color:#1d2330}
h1{margin:.8em 0 .2em}h2{border-bottom:2px solid #dde3ee;padding-bottom:.2em;margin-top:2em}
h3{margin:1.4em 0 .4em;font-size:1.05em}
nav a{margin-right:1em;display:inline-block}.meta{color:#556}
.rule{background:#f4f6fa;border-left:4px solid #7b8fb8;padding:.6em .9em;font-size:.92em;
margin:.8em 0}.rule p{margin:.5em 0 0}summary{cursor:pointer}
table{border-collapse:collapse;margin:.3em 0 1em;font-size:.86em;width:100%}
th,td{border-bottom:1px solid #e4e8ef;padding:.28em .45em;text-align:left;vertical-align:top;
overflow-wrap:break-word}
td.n{white-space:nowrap}table.lb{font-size:.8em}table.lb th{font-size:.95em}
th{background:#eef2f8;cursor:pointer;user-select:none;overflow-wrap:anywhere}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:nth-child(odd){background:#fafbfd}td.wrap{min-width:12em}
tr.flagged td{background:#fdecea}tr.flagged td:first-child{border-left:4px solid #b2182b}
.flag{color:#b2182b;font-weight:600}
input.filter{margin:.2em 0 .3em;padding:.25em .5em;width:20em;max-width:100%;font:inherit;
border:1px solid #c5cedd;border-radius:3px}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#556;font-size:.85em}.note{color:#556;font-size:.9em}
.counts span{display:inline-block;margin-right:1em;padding:.1em .5em;border-radius:3px;
background:#eef2f8}
dl.def{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;font-size:.92em}
dl.def dt{font-weight:600}dl.def dd{margin:0}
@media (max-width:900px){
 body{padding:0 .6em 2em}
 table.sortable,table.sortable tbody,table.sortable tr,table.sortable td{display:block;
 width:100%}
 table.sortable thead tr{display:flex;flex-wrap:wrap;gap:.2em}
 table.sortable thead th{border:0;border-radius:3px;font-size:.9em}
 table.sortable tr{border-bottom:2px solid #dde3ee;padding:.3em 0}
 table.sortable td{border:0;padding:.1em .3em;white-space:normal}
 table.sortable td::before{content:attr(data-label) ": ";font-weight:600;color:#445}
 td.wrap{min-width:0}
}
"""

WRAP_HEADERS = {"provenance", "reason", "value", "configuration", "message", "note",
                "protocol", "submission", "membership inference", "gradient inversion"}


def _e(s: object) -> str:
    from fedmedbench import printable

    return html.escape(printable(str(s)), quote=True)


def _numeric(text: str) -> bool:
    """A short number-like cell, kept on one line (longer ones may wrap)."""
    t = text.strip().lstrip("+-×≥≤ ")
    return bool(t) and len(text) <= 10 and (t[0].isdigit() or t[0] in "∞—.")


def table(tid: str, headers: list[str], rows: list[list[str]], *,
          row_classes: Iterable[str] | None = None, css: str = "") -> str:
    """A sortable, filterable table; each cell carries its column name
    (``data-label``) for the narrow-screen layout."""
    wrap = [h in WRAP_HEADERS for h in headers]
    classes = list(row_classes) if row_classes is not None else [""] * len(rows)
    out = [f'<table class="sortable{" " + _e(css) if css else ""}" id="{_e(tid)}"><thead><tr>']
    out += [f'<th scope="col" aria-sort="none">{_e(h)}</th>' for h in headers]
    out.append("</tr></thead><tbody>")
    for r, cls in zip(rows, classes):
        cells = []
        for c, w, h in zip(r, wrap, headers):
            kind = ' class="wrap"' if w else ' class="n"' if _numeric(str(c)) else ""
            cells.append(f'<td{kind} data-label="{_e(h)}">{_e(c)}</td>')
        out.append((f'<tr class="{_e(cls)}">' if cls else "<tr>") + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


#: figures shown right after a dataset's headline table; the others follow its tables
FIRST_KINDS = ("tradeoff", "attacks")
CAPTIONS = {
    "tradeoff": "Utility against ε (sample-level and client-level ε on separate axes; no DP "
                "at the right), against bytes per round and against wall seconds per cell. "
                "Colour: method (the same in every figure); marker: privacy configuration. "
                "Dashed: the majority class.",
    "attacks": "Attack success against ε, one panel per attack, metric and unit of ε, each "
               "metric on a fixed scale that starts at chance (AUC 0.5–1; TPR at 0.1% FPR on "
               "a log axis); the dashed line is chance, or a recognisable reconstruction "
               "(PSNR 20 dB).",
    "roc": "Membership inference's ROC curve on log–log axes; the diagonal is chance. The "
           "low false-positive rates are where an attack on one patient matters.",
    "convergence": "Utility on the pooled test set and training loss per round.",
    "sites": "Utility on each site's own test split; the grey bar is that site's own "
             "majority class.",
    "clock": "Utility against virtual hours on the simulated hospital network.",
    "reconstructions": "Gradient-inversion reconstructions (bottom row of each grid) under the "
                       "original images.",
}


def figure(data: ReportData, stem: str, ds: str, kind: str) -> str:
    svg = base64.b64encode(render(data, stem, "svg")).decode("ascii")
    cap = CAPTIONS.get(kind, "")
    return (f'<figure id="f-{_e(stem)}" data-kind="{_e(kind)}"><img alt="{_e(ds)}: {_e(kind)}" '
            f'src="data:image/svg+xml;base64,{svg}">'
            f"<figcaption>{_e(ds)}: {_e(kind)}. {_e(cap)}</figcaption></figure>")


def document(title: str, body: list[str]) -> str:
    """A whole page: the CSP admitting only the inline style and the script
    by its hash, ``body`` (already escaped HTML), the script."""
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n"
            '<body data-ready="0">\n<noscript><p class="note">JavaScript is off: the tables '
            "below are static, in rank order (sorting and filtering need JavaScript)."
            "</p></noscript>\n" + "\n".join(body)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def rules_box() -> str:
    return ('<details class="rule"><summary><strong>How to read this</strong>: the ranking '
            "rule, ties, the confidence interval, the worst site and † marks</summary>"
            f"<p>{_e(RANKING_RULE)}</p><p>{_e(CI_RULE)}.</p><p>{_e(WORST_SITE_RULE)}.</p>"
            "</details>")


def dataset_sections(data: ReportData, *, table_prefix: str = "t",
                     row_classes: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Per dataset, its tables and figures (and the tables spanning
    datasets under ``#all``), as HTML fragments."""
    figs = figures(data)
    by_ds: dict[str, list[tuple[str, str]]] = {}
    for stem, (ds, kind, _) in figs.items():
        by_ds.setdefault(ds, []).append((stem, kind))
    body: list[str] = []
    for ds, tables in text_tables(data).items():
        sid = f"ds-{slug(ds)}" if ds else "all"
        body.append(f'<section id="{_e(sid)}">')
        if ds:
            body.append(f"<h2>{_e(ds)}</h2>")
        first = [(s, k) for s, k in by_ds.get(ds, []) if k in FIRST_KINDS]
        rest = [(s, k) for s, k in by_ds.get(ds, []) if k not in FIRST_KINDS]
        for i, (ttl, headers, rows) in enumerate(tables):
            body.append(f"<h3>{_e(ttl)}</h3>" if ds else f"<h2>{_e(ttl)}</h2>")
            if headers:
                cls = None
                if row_classes and "method" in headers and "privacy" in headers:
                    mi, pi = headers.index("method"), headers.index("privacy")
                    cls = [row_classes.get((r[mi].rstrip(" †"), r[pi]), "") for r in rows]
                body.append(table(f"{table_prefix}-{slug(ds) if ds else 'all'}-{i}", headers,
                                  rows, row_classes=cls))
            if ds and i == 0:
                note = chance_note(data, ds)
                if note:
                    body.append(f'<p class="note">{_e(note)}</p>')
                body += [figure(data, s, ds, k) for s, k in first]
        body += [figure(data, s, ds, k) for s, k in rest]
        body.append("</section>")
    return body


def flagged_entries(data: ReportData) -> dict[tuple[str, str], str]:
    """``{(method, privacy): "flagged"}`` for entries whose claim an audit contradicts."""
    c = data.claims
    if c is None or c.empty:
        return {}
    return {(r.method, r.privacy): "flagged" for r in c.itertuples() if r.flagged}


def page(data: ReportData, *, title: str = "fedmedbench leaderboard") -> str:
    """The whole page as a string."""
    body: list[str] = []
    c = data.counts
    body.append(f"<header><h1>{_e(title)}</h1>")
    body.append('<p class="counts">' + "".join(
        f"<span>{v} {_e(k)}</span>" for k, v in c.items()) + "</p>")
    tabs = text_tables(data)
    body.append("<nav>" + "".join(
        f'<a href="#ds-{_e(slug(ds))}">{_e(ds)}</a>' for ds in tabs if ds)
        + ('<a href="#all">labels, tuning, warnings, cells that did not finish</a>'
           if "" in tabs else "") + "</nav>")
    body.append(rules_box())
    if not data.legend.empty:
        body.append('<p class="note">Labels are short (<code>dp-fedavg[σ=1,C=0.1,dist]</code>); '
                    '<a href="#all">the labels table</a> gives the configuration each ran, '
                    "with the σ the mechanisms actually used.</p>")
    body.append("</header>")
    body += dataset_sections(data, row_classes=flagged_entries(data))
    if not tabs:
        body.append("<p>no result records</p>")
    return document(title, body)


def write_html(records: list[dict], out_dir: Path, *, title: str) -> list[Path]:
    """The page of :func:`page` as ``index.html``."""
    from fedmedbench import write_output

    return [write_output(Path(out_dir), "index.html", page(build(records), title=title))]
