"""The Python API (DESIGN, "Python API"): fedmedbench.run / load / Results,
the same numbers as the command line, documented public names, and the
notebook example."""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import os
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

import fedmedbench as fmb
from fedmedbench.cli import main
from fedmedbench.errors import ConfigError
from fedmedbench.results import load_records

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

TINY = {
    "name": "tiny", "rounds": 2, "seeds": [0, 1],
    "axes": {"dataset": [{"name": "synthetic-tabular", "n_samples": 300}],
             "algorithm": ["local", "fedavg"]},
    "evaluate": {"attacks": ["mia-loss"]},
}


# --------------------------------------------------------------------------
# every public name is documented
# --------------------------------------------------------------------------


def undocumented(module: object, names: list[str]) -> list[str]:
    """The names of ``module.__all__`` without a docstring of their own: a
    class, function or module needs a non-empty ``__doc__`` of its own (a
    class does not inherit one here); a constant needs a ``#:`` comment on
    the line above its assignment in the harness source."""
    sources = {p: p.read_text(encoding="utf-8").splitlines()
               for p in (ROOT / "harness").glob("*.py")}
    def commented(name: str) -> bool:
        pat = re.compile(rf"^{re.escape(name)}\s*(:[^=]*)?=")
        return any(pat.match(line) and i > 0 and lines[i - 1].lstrip().startswith("#:")
                   for lines in sources.values() for i, line in enumerate(lines))

    bad = []
    for name in names:
        obj = getattr(module, name)
        if typing.get_origin(obj) is not None:  # a type alias (Literal[...]): as a constant
            ok = commented(name)
        elif inspect.isclass(obj):
            ok = bool((vars(obj).get("__doc__") or "").strip())
        elif inspect.isfunction(obj) or inspect.ismodule(obj) or inspect.isbuiltin(obj) \
                or callable(obj):
            ok = bool((getattr(obj, "__doc__", None) or "").strip())
        else:
            ok = commented(name)
        if not ok:
            bad.append(name)
    return bad


def test_every_public_name_has_a_docstring() -> None:
    assert {"run", "load", "plan", "Results"} <= set(fmb.__all__)
    assert undocumented(fmb, list(fmb.__all__)) == []
    # numpydoc sections on the API itself
    for f in (fmb.run, fmb.load, fmb.plan, fmb.Results.report, fmb.Results.frame,
              fmb.Results.tables):
        assert "Returns\n" in f.__doc__ or "Parameters\n" in f.__doc__, f.__name__


def test_the_docstring_check_fails_when_a_name_loses_its_docstring(monkeypatch) -> None:
    import types

    def bare():
        pass

    class Bare:
        pass

    class Child(fmb.Algorithm):  # inherits Algorithm's docstring: not its own
        pass

    fake = types.SimpleNamespace(bare=bare, Bare=Bare, Child=Child, run=fmb.run,
                                 SCHEMA=fmb.SCHEMA, UNDOCUMENTED_CONSTANT=3)
    names = ["bare", "Bare", "Child", "run", "SCHEMA", "UNDOCUMENTED_CONSTANT"]
    assert undocumented(fake, names) == ["bare", "Bare", "Child", "UNDOCUMENTED_CONSTANT"]
    monkeypatch.setattr(fmb.load, "__doc__", None)
    assert undocumented(fmb, ["load"]) == ["load"]


def test_import_stays_light() -> None:
    code = ("import sys, fedmedbench as f; f.run; f.Results; "
            "print('torch' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]  # the names resolve without importing torch or pandas


# --------------------------------------------------------------------------
# run, load, frame, tables, report
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[fmb.Results, Path]:
    out = tmp_path_factory.mktemp("api") / "r"
    return fmb.run(TINY, out=out, progress=False, quiet=True), out


def test_run_returns_results_whose_frame_is_the_records(tiny) -> None:
    res, out = tiny
    recs, _ = load_records([out])
    assert len(res) == len(recs) == 4 and res.counts["ok"] == 4 and res.exit_code == 0
    df = res.frame()
    assert list(df["cell_id"]) == sorted(r["cell_id"] for r in recs)
    for r in recs:
        row = df[df["cell_id"] == r["cell_id"]].iloc[0]
        u, c = r["metrics"]["utility"], r["metrics"]["cost"]
        assert row["utility"] == u["global"] and row["worst_site"] == u["worst_site"]
        assert all(row[f"site:{k}"] == v for k, v in u["per_site"].items())
        assert row["bytes_up"] == c["bytes_up"] and row["bytes_down"] == c["bytes_down"]
        assert row["wall_s"] == c["wall_s"] and row["seed"] == r["config"]["seed"]
        assert row["attack:mia-loss:auc"] == r["metrics"]["attacks"]["mia-loss"]["auc"]
        assert math.isnan(row["epsilon"])  # no DP in this matrix
    assert set(df["method"]) == {"local", "fedavg"}
    df.loc[:, "utility"] = 0  # a copy: the results are not changed
    assert res.frame()["utility"].gt(0).all()


def test_tables_report_and_load(tiny, tmp_path) -> None:
    res, out = tiny
    tabs = res.tables()
    assert list(tabs) == ["leaderboard", "summary", "claims", "scorecard", "baselines",
                          "sites", "attacks", "convergence", "failures", "cells",
                          "audit_cells", "legend"]
    s = tabs["summary"].set_index("method")
    assert s.loc["fedavg", "n"] == 2 and s.loc["fedavg", "worst_site_gain"] == pytest.approx(
        s.loc["fedavg", "worst_site_mean"] - s.loc["local", "worst_site_mean"])
    paths = res.report(tmp_path / "rep", formats=["markdown", "csv"])
    assert (tmp_path / "rep" / "report.md") in paths
    assert (tmp_path / "rep" / "tables" / "legend.csv").is_file()
    # formats are checked before anything is written
    with pytest.raises(ConfigError, match="'htm': no such reporter; did you mean 'html'"):
        res.report(tmp_path / "rep2", formats="markdown,htm")
    assert not (tmp_path / "rep2").exists()
    # load: one folder or several (shards), merged by cell id
    again = fmb.load(out)
    assert again.records == res.records and again.frame().equals(res.frame())
    a, b = tmp_path / "a", tmp_path / "b"
    from fedmedbench.results import write_record

    for i, r in enumerate(res.records):
        write_record(a if i % 2 else b, r)
    merged = fmb.load([a, b])
    assert [r["cell_id"] for r in merged.records] == [r["cell_id"] for r in res.records]
    assert "4 cells (4 ok" in repr(merged)


def test_run_takes_a_path_select_and_resumes(tiny, tmp_path, capsys) -> None:
    import tomllib  # noqa: F401  (the file below is TOML)

    _, out = tiny
    f = tmp_path / "m.toml"
    f.write_text(textwrap.dedent("""
        name = "tiny"
        rounds = 2
        seeds = [0, 1]
        [axes]
        dataset = [{ name = "synthetic-tabular", n_samples = 300 }]
        algorithm = ["local", "fedavg"]
        [evaluate]
        attacks = ["mia-loss"]
        """))
    res = fmb.run(f, out=out, select=["algorithm=fedavg"], progress=False)
    assert {r["config"]["algorithm"]["name"] for r in res.records} == {"fedavg"}
    err = capsys.readouterr().err
    assert "2 cells, 2 already done, 0 to run" in err  # nothing was computed again
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        fmb.run({**TINY, "axes": {**TINY["axes"], "algorithm": ["fedavgg"]}}, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="give a path, a dict"):
        fmb.run(42, out=tmp_path / "x")  # type: ignore[arg-type]


def test_example_notebook_runs_and_plots(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook_api.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = tmp_path / "utility_vs_epsilon.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "report" / "index.html").is_file()
    assert "dp-sgd[ε=1]" in proc.stdout


# --------------------------------------------------------------------------
# the README's quickstart, as Python, gives the command line's numbers
# --------------------------------------------------------------------------


def _readme_snippet() -> str:
    sec = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)\n```", sec, re.S)
    assert block, "README's Python API section lost its snippet"
    return block.group(1)


def _readme_snippet_job(tmp: Path, spawn) -> dict:
    """The README's Python snippet, run as a script in a fresh folder (a
    background job, tests/conftest.py); its DataFrame comes back as JSON
    (floats written as Python's repr: exact)."""
    script = (_readme_snippet() + "\nimport json, sys\nwith open(sys.argv[1], 'w') as f:\n"
              "    json.dump(df.to_dict(orient='list'), f, default=lambda o: o.item())\n")
    p = spawn([sys.executable, "-c", script, str(tmp / "df.json")], cwd=tmp,
              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=900)
    return {"code": p.returncode, "err": err.decode()[-3000:], "df": tmp / "df.json"}


@pytest.mark.slow
@pytest.mark.background(job=_readme_snippet_job)
def test_readme_quickstart_in_python_equals_the_cli_run(tmp_path, quickstart, background) -> None:
    import json

    import pandas as pd

    assert background["code"] == 0, background["err"]
    df = pd.DataFrame(json.loads(background["df"].read_text()))
    quickstart("cli")  # the command line's cells, run once for the session (conftest.py)
    here = os.getcwd()
    os.chdir(tmp_path)  # the command line writes into ./cli
    try:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(["run", "--out", "cli", "--no-progress"]) == 0
    finally:
        os.chdir(here)
    # the terminal: a headline and where the reports are, in 40 lines of 120 columns
    lines = out.getvalue().splitlines() + err.getvalue().splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert max(map(len, lines)) <= 120, "\n".join(lines)
    assert "full report: cli/report/index.html" in out.getvalue()
    # the DataFrame's numbers are the records of the command line's run
    recs, _ = load_records([tmp_path / "cli"])
    assert len(recs) == len(df) == 27
    by = df.set_index("cell_id")
    for r in recs:
        row = by.loc[r["cell_id"]]
        m = r["metrics"]
        assert row["utility"] == m["utility"]["global"]
        assert row["worst_site"] == m["utility"]["worst_site"]
        for site, v in m["utility"]["per_site"].items():
            assert row[f"site:{site}"] == v
        eps = m["privacy"].get("epsilon")
        assert (math.isnan(row["epsilon"]) if eps is None else row["epsilon"] == eps)
        assert row["bytes_up"] == m["cost"]["bytes_up"]
        assert row["bytes_down"] == m["cost"]["bytes_down"]
        assert row["attack:mia-loss:auc"] == m["attacks"]["mia-loss"]["auc"]


def test_builtins_import_only_the_public_api() -> None:
    """DESIGN: a plugin imports what ``fedmedbench`` exports (and libraries);
    the built-ins are plugins like any other, so none of them imports an
    engine module (``fedmedbench.training``, ``fedmedbench.report``, ...)
    directly. Within a family one built-in may build on another
    (``fedmedbench.plugins.<family>``), never across families; the report
    model (``fedmedbench.report``) is a public module for reporters."""
    import ast

    bad = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        family = path.relative_to(ROOT / "plugins").parts[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for mod in names:
                parts = mod.split(".")
                if parts[0] != "fedmedbench":
                    continue
                if len(parts) == 1:  # from fedmedbench import name: an exported name
                    bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports fedmedbench."
                            f"{a.name}, which fedmedbench does not export"
                            for a in (node.names if isinstance(node, ast.ImportFrom) else [])
                            if a.name not in fmb.__all__]
                    continue
                if parts[1] == "plugins" and len(parts) > 2 and parts[2] == family:
                    continue
                if len(parts) == 2 and parts[1] in fmb.__all__:  # a public module (report)
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {mod}")
    assert bad == [], "\n".join(bad)
