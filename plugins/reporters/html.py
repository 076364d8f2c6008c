"""The leaderboard as one self-contained static HTML page, ``index.html``.

Per dataset the headline table comes first with the privacy–utility–cost and
attack figures under it, then the leaderboard tiers and the other tables and
figures; the labels table (short label → full configuration), the library
warnings and the cells that did not finish close the page. Figures are shown
at their own size (none is wider than the page).

Nothing is fetched: figures are embedded as SVG data URIs, the style and the
small sorting script are inline, and a Content-Security-Policy forbids every
other source (``default-src 'none'``; the one script is admitted by its
SHA-256 hash, so even a string that slipped through unescaped could not run).
Every string from a record or a plugin goes through :func:`html.escape`.

Tables sort by clicking a header (numbers, byte sizes and ``∞`` sort as
values; ``—`` last); ``#sort=<table id>:<column>:<asc|desc>`` in the URL
sorts one table on load.
"""

from __future__ import annotations

import base64
import hashlib
import html
from pathlib import Path

from fedmedbench.plugins.reporters.figures import figures, render, slug
from fedmedbench.report import RANKING_RULE, ReportData, build, chance_note, text_tables

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
    var m = /^([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(GB|MB|kB|B)?(?=\s|$|\()/.exec(t);
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
  var tables = document.querySelectorAll('table.sortable');
  Array.prototype.forEach.call(tables, function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      function go() {
        var dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
        sortTable(table, col, dir);
      }
      th.addEventListener('click', go);
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter') go(); });
    });
  });
  var m = /[#&]sort=([^:&]+):(\d+):(asc|desc)/.exec(decodeURIComponent(location.hash));
  if (m) {
    var t = document.getElementById(m[1]);
    if (t) sortTable(t, parseInt(m[2], 10), m[3] === 'asc' ? 1 : -1);
  }
  document.body.setAttribute('data-ready', '1');
})();
"""

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:0 1.2em 3em;color:#1d2330}
h1{margin:.8em 0 .2em}h2{border-bottom:2px solid #dde3ee;padding-bottom:.2em;margin-top:2em}
h3{margin:1.4em 0 .4em;font-size:1.05em}
nav a{margin-right:1em}.meta{color:#556}.rule{background:#f4f6fa;border-left:4px solid #7b8fb8;
padding:.6em .9em;font-size:.92em;margin:.8em 0}.rule p{margin:.5em 0 0}summary{cursor:pointer}
table{border-collapse:collapse;margin:.3em 0 1em;font-size:.9em;display:block;overflow-x:auto}
th,td{border-bottom:1px solid #e4e8ef;padding:.28em .6em;text-align:left;white-space:nowrap}
th{background:#eef2f8;cursor:pointer;user-select:none;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:nth-child(odd){background:#fafbfd}td.wrap{white-space:normal;min-width:18em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#556;font-size:.85em}.note{color:#556;font-size:.9em}
.counts span{display:inline-block;margin-right:1em;padding:.1em .5em;border-radius:3px;
background:#eef2f8}
"""

WRAP_HEADERS = {"provenance", "reason", "value", "configuration", "message", "note"}


def _e(s: object) -> str:
    from fedmedbench.errors import printable

    return html.escape(printable(str(s)), quote=True)


def _table(tid: str, headers: list[str], rows: list[list[str]]) -> str:
    wrap = [h in WRAP_HEADERS for h in headers]
    out = [f'<table class="sortable" id="{_e(tid)}"><thead><tr>']
    out += [f'<th scope="col" aria-sort="none">{_e(h)}</th>' for h in headers]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(
            f'<td class="wrap">{_e(c)}</td>' if w else f"<td>{_e(c)}</td>"
            for c, w in zip(r, wrap)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


#: figures shown right after a dataset's headline table; the others follow its tables
FIRST_KINDS = ("tradeoff", "attacks")
CAPTIONS = {
    "tradeoff": "Utility against ε (sample-level and client-level ε on separate axes; no DP "
                "at the right) and against bytes per round. Colour: method; marker: privacy "
                "mechanism.",
    "attacks": "Attack success against ε, one panel per attack and unit of ε; the dashed line "
               "is chance (membership inference) or recognisable reconstruction (PSNR).",
    "convergence": "Utility on the pooled test set and training loss per round.",
    "sites": "Utility on each site's own test split.",
    "reconstructions": "Gradient-inversion reconstructions (bottom row of each grid) under the "
                       "original images.",
}


def _figure(data: ReportData, stem: str, ds: str, kind: str) -> str:
    svg = base64.b64encode(render(data, stem, "svg")).decode("ascii")
    cap = CAPTIONS.get(kind, "")
    return (f'<figure id="f-{_e(stem)}" data-kind="{_e(kind)}"><img alt="{_e(ds)}: {_e(kind)}" '
            f'src="data:image/svg+xml;base64,{svg}">'
            f"<figcaption>{_e(ds)}: {_e(kind)}. {_e(cap)}</figcaption></figure>")


def page(data: ReportData, *, title: str = "fedmedbench leaderboard") -> str:
    """The whole page as a string."""
    figs = figures(data)
    by_ds: dict[str, list[tuple[str, str]]] = {}
    for stem, (ds, kind, _) in figs.items():
        by_ds.setdefault(ds, []).append((stem, kind))
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    body: list[str] = []
    c = data.counts
    body.append(f"<header><h1>{_e(title)}</h1>")
    body.append('<p class="counts">' + "".join(
        f"<span>{v} {_e(k)}</span>" for k, v in c.items()) + "</p>")
    tabs = text_tables(data)
    body.append("<nav>" + "".join(
        f'<a href="#ds-{_e(slug(ds))}">{_e(ds)}</a>' for ds in tabs if ds)
        + ('<a href="#all">labels, warnings, cells that did not finish</a>' if "" in tabs
           else "") + "</nav>")
    body.append('<details class="rule"><summary><strong>Ranking rule</strong>: how the '
                'leaderboard orders entries, and what † marks</summary>'
                f"<p>{_e(RANKING_RULE)}</p></details>")
    if not data.legend.empty:
        body.append('<p class="note">Labels are short (<code>dp-fedavg[σ=1,C=0.1,dist]</code>); '
                    '<a href="#all">the labels table</a> gives the full configuration of '
                    "each.</p>")
    body.append("</header>")
    for ds, tables in tabs.items():
        sid = f"ds-{slug(ds)}" if ds else "all"
        body.append(f'<section id="{_e(sid)}">')
        if ds:
            body.append(f"<h2>{_e(ds)}</h2>")
        first = [(s, k) for s, k in by_ds.get(ds, []) if k in FIRST_KINDS]
        rest = [(s, k) for s, k in by_ds.get(ds, []) if k not in FIRST_KINDS]
        for i, (ttl, headers, rows) in enumerate(tables):
            body.append(f"<h3>{_e(ttl)}</h3>" if ds else f"<h2>{_e(ttl)}</h2>")
            if headers:
                body.append(_table(f"t-{slug(ds) if ds else 'all'}-{i}", headers, rows))
            if ds and i == 0:
                note = chance_note(data, ds)
                if note:
                    body.append(f'<p class="note">{_e(note)}</p>')
                body += [_figure(data, s, ds, k) for s, k in first]
        body += [_figure(data, s, ds, k) for s, k in rest]
        body.append("</section>")
    if not tabs:
        body.append("<p>no result records</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n"
            '<body data-ready="0">\n' + "\n".join(body)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def write_html(records: list[dict], out_dir: Path, *, title: str) -> list[Path]:
    """The page of :func:`page` as ``index.html``."""
    from fedmedbench.fileio import write_output

    return [write_output(Path(out_dir), "index.html", page(build(records), title=title))]
