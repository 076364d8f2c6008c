"""The README stays true: a tutorial under ~300 lines, its two commands (the
test command is what CI runs), its links, and the quickstart headline it
shows is the one this code prints."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command():
    cmds = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(cmds) == 2 and cmds[0].endswith("fedmedbench run")
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    assert cmds[1] in ci


def test_the_readme_is_a_tutorial_under_350_lines():
    lines = README.splitlines()
    assert len(lines) <= 350, len(lines)
    heads = [ln for ln in lines if ln.startswith("## ")]
    for want in ("## The two commands", "## The quickstart, and how to read it",
                 "## Tracks and the leaderboard", "## Where to go next"):
        assert want in heads, heads
    # reference lives in docs/ (parameters, option-by-option CLI text); the README
    # names every built-in plugin by family
    assert "BEGIN PLUGIN TABLE" not in README and "--cell-timeout" not in README
    from fedmedbench.registry import get_registry

    table = README[README.index("## Built-in plugins"):README.index("## Running a study")]
    for info in get_registry().all():
        if info.distribution == "fedmedbench":
            assert f"| {info.family} |" in table and f"`{info.name}`" in table, info.name
    for placeholder in ("QUICKSTART_", "TRACK_TIMES"):
        assert placeholder not in README


def _rows(block: str) -> list[list[str]]:
    """The table rows of printed headlines, in order (method, privacy, values)."""
    out = []
    for ln in block.splitlines():
        parts = re.split(r"\s{2,}", ln.strip())
        if len(parts) >= 6 and not set(parts[0]) <= {"-"} and parts[0] != "method":
            out.append(parts)
    return out


def test_the_quickstart_headline_in_the_readme_is_what_run_prints(quickstart) -> None:
    """The README's printed output, row by row, against `fedmedbench run` of
    the quickstart's records (the session's run): the same entries and the
    same utility, worst site, ε, bytes and attack numbers (seconds per cell
    are this machine's; numbers within 0.002 for other CPUs' float kernels)."""
    from fedmedbench.cli import main

    block = README.split("it prints:\n\n```\n", 1)[1].split("\n```", 1)[0]
    want = _rows(block)
    out = io.StringIO()
    d = quickstart("readme")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", "--out", str(d), "--no-progress"]) == 0
    got = _rows(out.getvalue())
    shutil.rmtree(d)
    assert [r[:2] for r in got] == [r[:2] for r in want] and len(want) == 9, (got, want)

    def nums(cells: list[str]) -> list[float]:
        return [float(x) for c in cells for x in re.findall(r"-?\d+\.\d+", c)]

    for a, b in zip(want, got):
        # method, privacy, utility ± CI, worst site, ε, bytes, s/cell, attack
        assert (a[4], a[5]) == (b[4], b[5]), (a, b)  # ε server, bytes/round
        keep = [2, 3, 7]
        for x, y in zip(nums([a[i] for i in keep]), nums([b[i] for i in keep]), strict=True):
            assert abs(x - y) <= 0.002, (a, b)
