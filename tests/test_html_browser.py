"""The HTML leaderboard rendered in a real browser (headless Chromium): the
rows are there, sorting works, hostile strings stay text, no script error."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixtures import run, with_privacy_and_attacks

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
    lb_id = re.search(r"<h3>leaderboard, no formal guarantee</h3>\s*<table class=\"sortable\" "
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
    assert lb[0][:4] == ["rank", "method", "privacy", "accuracy"]
    body = lb[1:]
    assert len(body) == 6
    assert [int(r[0]) for r in body] == [6, 5, 4, 3, 2, 1]
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
