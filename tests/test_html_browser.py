"""The HTML leaderboard rendered in a real browser (headless Chromium): the
rows are there, sorting works, hostile strings stay text, no script error;
every figure is shown at its full size, no wider than the page, and no text
in it is cut off (matplotlib's text boxes against the figure's, the
browser's boxes against the page's).

Screenshots for the README: ``FEDMEDBENCH_SCREENSHOTS=reports/screenshots``
with ``FEDMEDBENCH_SCREENSHOT_RESULTS=quickstart=DIR,privacy=DIR@synthetic-ehr``
(results folders of ``fedmedbench run`` and ``fedmedbench run
matrices/privacy.toml``; ``@DATASET`` starts the screenshot at that dataset's
section) makes :func:`test_screenshots_of_real_reports` report each folder,
check its figures the same way and save ``<name>.png`` there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixtures import (
    clipped_texts,
    run,
    with_many_sites,
    with_network_clock,
    with_privacy_and_attacks,
    with_sample_level_dp,
)

from fedmedbench.cli import main
from fedmedbench.results import load_records, write_record

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: `apt-get install -y "
                             "chromium`; .ci/run installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-extensions", "--enable-logging=stderr", "--v=0"]
EVIL = "<script>alert(1)</script>"


class Tables(HTMLParser):
    """Text of every table cell by table id, and the body's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.body: dict[str, str | None] = {}
        self.scripts = 0
        self._t: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._t = a.get("id") or ""
            self.tables[self._t] = []
        elif tag == "tr" and self._t is not None:
            self.tables[self._t].append([])
        elif tag in ("td", "th") and self._t is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._t is not None:
            self.tables[self._t][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._t = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("browser")
    assert run(base / "whole") == 0
    recs, _ = load_records([base / "whole"])
    res = base / "results"
    for r in with_privacy_and_attacks(recs, res / "images", rel=res):
        if r["config"]["algorithm"]["name"] == "local":
            r["labels"]["algorithm"] = EVIL
        write_record(res, r)
    out = base / "report"
    assert main(["report", str(res), "--out", str(out), "--format", "html", "--quiet"]) == 0
    return out / "index.html"


def test_page_renders_sorts_and_raises_no_script_error(page: Path, tmp_path: Path) -> None:
    src = page.read_text(encoding="utf-8")
    lb_id = re.search(r"<h3>leaderboard, every entry</h3>\s*<table class=\"sortable\" "
                      r'id="([^"]+)"', src).group(1)
    # sort the open leaderboard by utility, ascending, through the URL
    url = page.as_uri() + f"#sort={lb_id}:3:asc"
    proc = _chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = Tables()
    dom.feed(proc.stdout)
    # the script ran to its end and nothing raised
    assert dom.body.get("data-ready") == "1", proc.stdout[:500]
    assert "data-errors" not in dom.body, dom.body
    console = [ln for ln in proc.stderr.splitlines()
               if "Uncaught" in ln or "Refused to" in ln or "Content Security Policy" in ln
               or ("CONSOLE" in ln and "error" in ln.lower())]
    assert not console, console
    # the rows are there: 6 entries (3 methods, fedavg also at 3 ε), sorted ascending
    lb = dom.tables[lb_id]
    assert lb[0][:4] == ["rank", "method", "privacy", "accuracy (95% CI)"]
    body = lb[1:]
    assert len(body) == 6
    utility = [float(r[3].split()[0]) for r in body]
    assert utility == sorted(utility)  # ascending, as the URL asked
    assert lb[0][3] and all(len(r) == len(lb[0]) for r in body)
    # the hostile label is text in a cell, and only the page's own script exists
    assert EVIL in {r[1] for r in body}
    assert dom.scripts == 1
    # the tiers with DP made it to the page
    assert any(t[0][:1] == ["rank"] and len(t) == 2 for t in dom.tables.values())  # ε ≤ 1
    # and it paints: a screenshot is a real PNG of some size
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, "--hide-scrollbars", "--window-size=1280,1600",
                     f"--screenshot={shot}", page.as_uri())
    assert proc.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000


# --------------------------------------------------------------------------
# figures at the size the page shows them
# --------------------------------------------------------------------------


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 and 4),
    so that a test can measure the page and take screenshots without any
    package beyond the standard library."""

    def __init__(self, tmp: Path, *, width: int = 1280, height: int = 900) -> None:
        import os

        r3, self._w3 = os.pipe()
        self._r4, w4 = os.pipe()

        def fds() -> None:  # the child reads commands on fd 3 and answers on fd 4
            a, b = os.dup(r3), os.dup(w4)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS[:4], "--remote-debugging-pipe", "--hide-scrollbars",
             f"--user-data-dir={tmp / 'cdp-profile'}", "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(r3)
        os.close(w4)
        self._id, self._buf = 0, b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.width, self.height = width, height

    def call(self, method: str, *, _session: str | None = None, **params: object) -> dict:
        import json
        import os
        import select

        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if _session:
            msg["sessionId"] = _session
        os.write(self._w3, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                ready, _, _ = select.select([self._r4], [], [], 60)
                assert ready, f"no answer from Chromium to {method}"
                chunk = os.read(self._r4, 1 << 20)
                assert chunk, "Chromium closed the pipe"
                self._buf += chunk
            line, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(line)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer["error"]
                return answer.get("result", {})

    def page(self, method: str, **params: object) -> dict:
        return self.call(method, _session=self.session, **params)

    def eval(self, js: str) -> object:
        res = self.page("Runtime.evaluate", expression=js, returnByValue=True)
        assert "exceptionDetails" not in res, res
        return res["result"].get("value")

    def open(self, url: str) -> None:
        import time

        self.page("Page.navigate", url=url)
        for _ in range(300):
            if self.eval("document.readyState === 'complete' && !!document.body && "
                         "document.body.dataset.ready === '1' && "
                         "Array.from(document.images).every(i => i.complete)"):
                return
            time.sleep(0.1)
        raise AssertionError(f"{url} did not finish loading")

    def screenshot(self, path: Path, *, y: float = 0, height: float | None = None) -> None:
        import base64

        h = height or self.height
        data = self.page("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": y, "width": self.width, "height": h, "scale": 1})
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        import os

        try:
            self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        self.proc.wait(timeout=30)
        os.close(self._w3)
        os.close(self._r4)


#: what the browser reports of the page: every figure image and the page's width
MEASURE = """JSON.stringify({
  inner: window.innerWidth,
  scroll: document.documentElement.scrollWidth,
  figures: Array.from(document.querySelectorAll('figure')).map(f => {
    const img = f.querySelector('img'), r = img.getBoundingClientRect();
    const fr = f.getBoundingClientRect();
    return {id: f.id, natural: img.naturalWidth, naturalH: img.naturalHeight,
            width: r.width, height: r.height, left: r.left, right: r.right,
            figRight: fr.right};
  })
})"""
#: the smallest text a figure may show, in CSS pixels at the size the page shows it
MIN_TEXT_PX = 9.0


def smallest_font_pt(fig) -> float:
    from matplotlib.text import Text

    return min((t.get_fontsize() for t in fig.findobj(Text)
                if t.get_visible() and t.get_text().strip()), default=99.0)


def check_figures(records: list[dict], page: Path, tmp: Path) -> dict:
    """Assert the figures of ``records`` (the report at ``page``) fit: no
    clipped text in matplotlib, and in Chromium at 1280 px each image shown at
    its full size, inside the page, with text of at least MIN_TEXT_PX; returns
    the browser's measurements."""
    import json

    from fedmedbench.plugins.reporters.figures import figures, render, slug
    from fedmedbench.report import build

    data = build(records)
    figs = figures(data)
    assert figs
    fonts = {}
    for stem, (_, _, fig) in figs.items():
        render(data, stem, "svg")
        assert clipped_texts(fig) == [], (stem, clipped_texts(fig))
        fonts[f"f-{stem}"] = smallest_font_pt(fig)
    b = Browser(tmp)
    try:
        b.open(page.as_uri())
        m = json.loads(b.eval(MEASURE))
    finally:
        b.close()
    assert m["scroll"] <= m["inner"], f"the page is wider than the window: {m['scroll']} px"
    shown = {f["id"]: f for f in m["figures"]}
    assert set(fonts) <= set(shown), (sorted(fonts), sorted(shown))
    for fid, f in shown.items():
        assert f["natural"] > 0, fid
        assert f["natural"] <= m["inner"] - 30, f"{fid} is wider than the page: {f}"
        assert f["width"] >= f["natural"] - 1, f"{fid} is shrunk to fit the page: {f}"
        assert f["right"] <= m["inner"] and f["left"] >= 0, f"{fid} sticks out: {f}"
        if fid in fonts:  # text height in CSS px at the size shown (1 pt = 4/3 px)
            px = fonts[fid] * 4 / 3 * f["width"] / f["natural"]
            assert px >= MIN_TEXT_PX, f"{fid}: text of {px:.1f} px"
    assert slug  # the ids are f-<slug(dataset)>-<kind>
    return m


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """A report with every kind of figure: client- and sample-level ε side by
    side, attacks with reconstructions, and datasets of 50 and 500 sites."""
    base = tmp_path_factory.mktemp("rich")
    assert run(base / "whole") == 0
    recs, _ = load_records([base / "whole"])
    res = base / "results"
    out = with_privacy_and_attacks(recs, res / "images", rel=res)
    out += with_sample_level_dp(recs) + with_many_sites(recs, 50) + with_many_sites(recs, 500)
    out += with_network_clock(recs)  # issue 21's figure: utility against virtual hours
    for r in out:
        write_record(res, r)
    rep = base / "report"
    assert main(["report", str(res), "--out", str(rep), "--quiet"]) == 0
    recs, _ = load_records([res])
    return [{**r, "_dirs": [str(res)]} for r in recs], rep / "index.html"


def test_every_figure_fits_the_page_with_no_text_cut_off(rich, tmp_path: Path) -> None:
    records, page = rich
    m = check_figures(records, page, tmp_path)
    kinds = {f["id"].rsplit("-", 1)[1] for f in m["figures"]}
    assert kinds == {"tradeoff", "attacks", "roc", "convergence", "sites", "reconstructions",
                     "clock"}
    assert [f["id"] for f in m["figures"] if f["id"].endswith("-clock")] == ["f-clocked-clock"]
    # 50 and 500 sites: one figure each, the same size whatever the number of sites
    sizes = {f["id"]: (f["natural"], f["naturalH"]) for f in m["figures"]
             if f["id"].endswith("-sites") and "sites-" in f["id"]}
    assert len(sizes) == 2 and len(set(sizes.values())) == 1, sizes


def test_figures_keep_units_apart_and_colours_distinct(rich) -> None:
    from matplotlib.colors import to_hex

    from fedmedbench.plugins.reporters.figures import figures
    from fedmedbench.report import build

    data = build(rich[0])
    figs = figures(data)
    trade = next(f for (ds, k, f) in figs.values() if k == "tradeoff" and "tabular" in ds)
    labels = [ax.get_xlabel() for ax in trade.axes]
    assert any("sample-level ε" in x for x in labels) and any("client-level ε" in x
                                                               for x in labels)
    assert not any("sample-level" in x and "client-level" in x for x in labels)
    assert any("bytes per round" in x and ax.get_xscale() == "log"
               for ax, x in zip(trade.axes, labels))
    att = next(f for (ds, k, f) in figs.values() if k == "attacks" and "tabular" in ds)
    panels = [(ax.get_title(), getattr(ax, "_fmb_metric", None)) for ax in att.axes
              if ax.get_visible()]
    assert ("mia-loss, record-level ε", "auc") in panels
    assert ("mia-loss, client-level ε", "auc") in panels
    legend = att.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert "privacy: dp-fedavg[ε=3]" in texts and "privacy: dp-sgd[ε=1]" in texts
    assert "fedavg" in texts
    conv = next(f for (ds, k, f) in figs.values() if k == "convergence" and "tabular" in ds)
    drawn = {(getattr(ln, "_fmb_entry", None), to_hex(ln.get_color()), ln.get_marker())
             for ln in conv.axes[0].lines if getattr(ln, "_fmb_entry", None)}
    assert len({(c, mk) for _, c, mk in drawn}) == len(drawn) >= 5  # one style per entry


@pytest.mark.skipif(not os.environ.get("FEDMEDBENCH_SCREENSHOTS"),
                    reason="set FEDMEDBENCH_SCREENSHOTS=DIR and FEDMEDBENCH_SCREENSHOT_RESULTS="
                           "name=RESULTS_DIR,... to check real reports and save screenshots")
def test_screenshots_of_real_reports(tmp_path: Path) -> None:
    import json

    dest = Path(os.environ["FEDMEDBENCH_SCREENSHOTS"])
    dest.mkdir(parents=True, exist_ok=True)
    pairs = [p.split("=", 1) for p in os.environ["FEDMEDBENCH_SCREENSHOT_RESULTS"].split(",")]
    for name, spec in pairs:
        results, _, section = spec.partition("@")  # DIR@DATASET: start at that dataset
        rep = tmp_path / name
        assert main(["report", results, "--out", str(rep), "--quiet",
                     "--format", "html"]) == 0
        recs, _ = load_records([Path(results)])
        check_figures([{**r, "_dirs": [results]} for r in recs], rep / "index.html", tmp_path)
        b = Browser(tmp_path, height=1500)
        try:
            b.open((rep / "index.html").as_uri())
            sel = f"section[id^='ds-{section}'] h2" if section else None
            top = json.loads(b.eval(f"JSON.stringify(document.querySelector({json.dumps(sel)})"
                                    f".getBoundingClientRect().top)")) if sel else 10
            b.screenshot(dest / f"{name}.png", y=max(0, top - 10), height=1500)
        finally:
            b.close()
        assert (dest / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_checks_catch_cut_text_and_a_figure_wider_than_the_page(tmp_path: Path) -> None:
    import base64
    import io
    import json

    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    fig.add_subplot().set_ylabel("a label pushed out of the figure", labelpad=200)
    fig.text(0.9, 0.5, "a note that runs past the right edge")
    bad = clipped_texts(fig)
    assert bad and "'a note that runs past the right edge'" in bad
    ok = Figure(figsize=(4, 3), layout="constrained")
    ok.add_subplot().set_ylabel("a label")
    assert clipped_texts(ok) == []
    # the 0.1 per-site figure of 50 hospitals: 15,334 px wide
    wide = Figure(figsize=(139.4, 4.0))
    wide.add_subplot()
    buf = io.BytesIO()
    wide.savefig(buf, format="svg")
    page = tmp_path / "wide.html"
    page.write_text('<!DOCTYPE html><html><body data-ready="1" style="max-width:1200px">'
                    '<figure id="f-wide"><img style="max-width:100%" src="data:image/svg+xml;'
                    f'base64,{base64.b64encode(buf.getvalue()).decode()}"></figure>'
                    "</body></html>")
    b = Browser(tmp_path)
    try:
        b.open(page.as_uri())
        f = json.loads(b.eval(MEASURE))["figures"][0]
    finally:
        b.close()
    assert f["natural"] > 10_000 and f["width"] < f["natural"] / 10  # shrunk to a sliver


# --------------------------------------------------------------------------
# the leaderboard site (issue 20.6): 1,400 and 800 px, sorting, filtering,
# JavaScript off, no console errors, no clipped labels
# --------------------------------------------------------------------------

#: what the browser reports of a site page: overflow of the page and of every table,
#: and every cell whose text is cut (its content wider than its box)
LAYOUT = """JSON.stringify({
  inner: window.innerWidth,
  scroll: document.documentElement.scrollWidth,
  wide: Array.from(document.querySelectorAll('table')).filter(
    t => t.getBoundingClientRect().right > window.innerWidth + 0.5
         || t.scrollWidth > t.clientWidth + 1).map(t => t.id),
  clipped: Array.from(document.querySelectorAll('th, td, h1, h2, h3, figcaption')).filter(
    e => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).display !== 'none'
  ).map(e => e.textContent.slice(0, 40)),
  figures: Array.from(document.querySelectorAll('figure img')).map(
    i => [i.getBoundingClientRect().right, i.naturalWidth, i.getBoundingClientRect().width]),
  rows: document.querySelectorAll('table.lb tbody tr').length,
  errors: document.body.getAttribute('data-errors')
})"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The leaderboard of heart-disease's built-in baselines without DP and at
    ε ≤ 1 (with its audits), written by ``fedmedbench leaderboard``. With
    ``FEDMEDBENCH_SCREENSHOT_SUBMISSIONS=DIR,DIR`` the site of those
    submission folders instead (the README's screenshots)."""
    from fedmedbench.submit import submit

    base = tmp_path_factory.mktemp("site")
    subs = [p for p in os.environ.get("FEDMEDBENCH_SCREENSHOT_SUBMISSIONS", "").split(",") if p]
    if not subs:
        subs = [str(base / "baseline")]
        submit("heart-disease", None, subs[0], tiers=["all", "eps1"])
    assert main(["leaderboard", *subs, "--out", str(base / "site"), "--quiet"]) == 0
    return base / "site"


@pytest.mark.parametrize("width", [1400, 800])
def test_site_layout_has_no_sideways_scroll_and_no_cut_text(site: Path, tmp_path: Path,
                                                           width: int) -> None:
    import json

    shots = os.environ.get("FEDMEDBENCH_SCREENSHOTS")
    for page in ("index.html", "track-heart-disease.html"):
        b = Browser(tmp_path, width=width, height=1200)
        try:
            b.open((site / page).as_uri())
            m = json.loads(b.eval(LAYOUT))
            if shots and page != "index.html":
                Path(shots).mkdir(parents=True, exist_ok=True)
                b.screenshot(Path(shots) / f"leaderboard-{width}.png", height=1200)
        finally:
            b.close()
        assert m["errors"] is None, m["errors"]
        assert m["scroll"] <= m["inner"], (page, width, m["scroll"])
        assert m["wide"] == [], (page, width, m["wide"])
        assert m["clipped"] == [], (page, width, m["clipped"])
        for right, natural, shown in m["figures"]:
            assert right <= m["inner"] + 0.5
            if width >= 1400:  # full size on a wide screen; shrunk to fit on a narrow one
                assert shown >= natural - 1, (natural, shown)
        if page != "index.html":
            assert m["rows"] >= 6


def test_site_pages_raise_no_console_error(site: Path, tmp_path: Path) -> None:
    for page in ("index.html", "track-heart-disease.html"):
        proc = _chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom",
                         (site / page).as_uri())
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = Tables()
        dom.feed(proc.stdout)
        assert dom.body.get("data-ready") == "1" and "data-errors" not in dom.body
        console = [ln for ln in proc.stderr.splitlines()
                   if "Uncaught" in ln or "Refused to" in ln or "Content Security Policy" in ln
                   or ("CONSOLE" in ln and "error" in ln.lower())]
        assert not console, console
        assert dom.scripts == 1


SORT_AND_FILTER = """(() => {
  const t = document.querySelector('table.lb');
  const heads = Array.from(t.tHead.rows[0].cells).map(c => c.textContent);
  const col = heads.indexOf('s/ cell');
  t.tHead.rows[0].cells[col].click();
  const asc = Array.from(t.tBodies[0].rows).map(r => parseFloat(r.cells[col].textContent));
  t.tHead.rows[0].cells[col].click();
  const desc = Array.from(t.tBodies[0].rows).map(r => parseFloat(r.cells[col].textContent));
  const box = document.querySelector('input.filter[data-for="' + t.id + '"]');
  box.value = 'secagg';
  box.dispatchEvent(new Event('input'));
  const shown = Array.from(t.tBodies[0].rows).filter(r => !r.hidden);
  return JSON.stringify({asc, desc, shown: shown.map(r => r.textContent),
                         total: t.tBodies[0].rows.length, attr: t.getAttribute('data-shown'),
                         sort: t.tHead.rows[0].cells[col].getAttribute('aria-sort')});
})()"""


def test_site_tables_sort_and_filter(site: Path, tmp_path: Path) -> None:
    import json

    b = Browser(tmp_path, width=1400)
    try:
        b.open((site / "track-heart-disease.html").as_uri())
        m = json.loads(b.eval(SORT_AND_FILTER))
    finally:
        b.close()
    assert m["asc"] == sorted(m["asc"]) and m["desc"] == sorted(m["desc"], reverse=True)
    assert m["sort"] == "descending"
    assert m["shown"] and all("secagg" in r for r in m["shown"])
    assert len(m["shown"]) < m["total"] and m["attr"] == str(len(m["shown"]))


def test_site_reads_as_static_tables_with_javascript_off(site: Path, tmp_path: Path) -> None:
    import json
    import time

    b = Browser(tmp_path, width=1400)
    try:
        b.page("Emulation.setScriptExecutionDisabled", value=True)
        b.page("Page.navigate", url=(site / "track-heart-disease.html").as_uri())
        for _ in range(100):
            if b.eval("document.readyState") == "complete":
                break
            time.sleep(0.1)
        m = json.loads(b.eval("""JSON.stringify({
          ready: document.body.getAttribute('data-ready'),
          filters: document.querySelectorAll('input.filter').length,
          rows: Array.from(document.querySelectorAll('table.lb tbody tr')).filter(
            r => r.offsetParent !== null).length,
          total: document.querySelectorAll('table.lb tbody tr').length,
          note: document.body.innerText.includes('JavaScript is off'),
          first: document.querySelector('table.lb tbody tr td').textContent})"""))
    finally:
        b.close()
    assert m["ready"] == "0"  # the script did not run
    assert m["filters"] == 0 and m["rows"] == m["total"] >= 6  # every row, static
    assert m["note"] and m["first"].startswith("1")  # in rank order
