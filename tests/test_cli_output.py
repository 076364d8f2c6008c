"""A quiet terminal (issue 11, items 4 and 5): the headline and the report
paths, everything with --verbose, library warnings captured and shown once,
dry runs and run headers that say what is done, an ETA that adapts,
did-you-mean in `check`, plugin versions in the cell id, and the commit of a
wheel install."""

from __future__ import annotations

import json
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from fedmedbench.cli import main
from fedmedbench.results import load_records

SMALL = """
name = "small"
rounds = 2
seeds = [0, 1]

[axes]
dataset = [{ name = "synthetic-tabular", n_samples = 300 }]
algorithm = ["centralized", "local", "fedavg", { name = "fedprox", mu = 0.01 }]

[evaluate]
attacks = ["mia-loss"]
"""

NOISY_PLUGIN = '''
import logging
import warnings

from fedmedbench import Algorithm, hookimpl


class Noisy(Algorithm):
    """FedAvg whose clients warn the way Opacus does (a logging record and a warning)."""

    name = "test-noisy"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        logging.getLogger("opacus.data_loader").warning(
            "First batch is empty. We are using a list of zero-valued tensors")
        warnings.warn("Optimal order is the largest alpha. Please consider expanding the "
                      "range of alphas to get a tighter privacy bound.", UserWarning)
        return super().client_update(ctx, global_params)


@hookimpl
def register_algorithms(register):
    register(Noisy)
'''


def _write(tmp_path: Path, text: str, name: str = "matrix.toml") -> Path:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return f


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """One run of SMALL through the command line: (matrix, results, stdout, stderr)."""
    import contextlib
    import io
    import os

    base = tmp_path_factory.mktemp("small")
    f = _write(base, SMALL)
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(base)  # `--out r`: the paths a user sees
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(["run", "matrix.toml", "--out", "r", "--no-progress"]) == 0
    finally:
        os.chdir(here)
    return f, base / "r", out.getvalue(), err.getvalue()


def test_run_prints_the_headline_and_where_the_reports_are(small) -> None:
    f, r, out, err = small
    lines = _lines(out) + _lines(err)
    # issue 20: terminal tables fit 100 columns (long labels become keys in a legend)
    assert len(lines) <= 40 and max(map(len, lines)) <= 100, "\n".join(lines)
    assert "accuracy on the pooled test set (mean over seeds ± 95% CI, n=2" in out
    head = next(ln for ln in _lines(out) if ln.startswith("method"))
    for col in ("privacy", "accuracy", "worst site", "bytes/round", "s/cell",
                "mia-loss auc"):
        assert col in head, head
    assert "fedprox[μ=0.01]" in out  # short labels
    # no sub-metric tables on the terminal (n_members, fpr_resolution, ...)
    assert "n_members" not in out and "leaderboard, every entry" not in out
    assert "full report: r/report/index.html\n             r/report/report.md\n" in out
    assert (r / "report" / "index.html").is_file() and (r / "report" / "report.md").is_file()
    assert err.splitlines()[0] == "matrix 'small': 8 cells -> r/ (local executor)"
    assert err.splitlines()[-1] == "cells: 8 ok, 0 failed, 0 skipped, 0 diverged"
    # the headline's numbers are the records'
    recs, _ = load_records([r])
    fed = [x["metrics"]["utility"]["global"] for x in recs
           if x["config"]["algorithm"]["name"] == "fedavg"]
    row = next(ln for ln in _lines(out) if ln.startswith("fedavg "))
    assert f"{sum(fed) / len(fed):.3f}" in row


def test_verbose_prints_every_table(small, capsys) -> None:
    f, r, _, _ = small
    assert main(["run", str(f), "--out", str(r), "--no-progress", "--verbose"]) == 0
    out = capsys.readouterr().out
    for title in ("leaderboard, every entry", "federated learning against centralized",
                  "cost (mean per cell over seeds", "per-site accuracy", "attacks (mean",
                  "labels: each short label", "verified claims", "training settings"):
        assert title in out, title
    tables = [ln for ln in out.splitlines() if not ln.startswith(("full report:", "  "))]
    assert max(map(len, tables)) <= 100  # every table fits 100 columns (paths aside)
    assert main(["report", str(r)]) == 0  # report: the headline too, by default
    short = capsys.readouterr().out
    assert "leaderboard" not in short and "mia-loss auc" in short
    assert main(["report", str(r), "--verbose"]) == 0
    assert "leaderboard, every entry" in capsys.readouterr().out


def test_library_warnings_go_into_the_record_and_are_shown_once(tmp_path, monkeypatch,
                                                                 capsys) -> None:
    (tmp_path / "fmb_noisy.py").write_text(NOISY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_noisy")
    f = _write(tmp_path, """
        rounds = 2
        seeds = [0, 1]
        [axes]
        dataset = [{ name = "synthetic-tabular", n_samples = 200 }]
        algorithm = ["test-noisy"]
        """)
    assert main(["run", str(f), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    recs, _ = load_records([tmp_path / "r"])
    for rec in recs:
        by = {w["category"]: w for w in rec["warnings"]}
        log = by["logging.WARNING"]
        assert log["message"].startswith("First batch is empty") and log["count"] == 8
        assert log["logger"] == "opacus.data_loader" and "fmb_noisy.py" in log["source"]
        assert by["UserWarning"]["message"].startswith("Optimal order is the largest alpha")
    # not printed while the cells ran; once in the summary, with the totals
    assert "First batch is empty" not in cap.err
    assert cap.out.count("First batch is empty") == 1
    assert "logging.WARNING ×16 in 2 cell(s): First batch is empty" in cap.out
    assert cap.out.count("Optimal order is the largest alpha") == 1
    assert "2 distinct warning(s) from libraries" in cap.out


def test_dry_run_marks_done_cells_and_the_header_counts_cells_to_run(small, tmp_path,
                                                                     capsys) -> None:
    import shutil

    f, r, _, _ = small
    d = tmp_path / "r"
    shutil.copytree(r, d)
    gone = sorted(d.glob("*.json"))[:3]
    for p in gone:
        p.unlink()
    assert main(["run", str(f), "--out", str(d), "--dry-run"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert len(lines) == 8
    todo = {ln.split()[0] for ln in lines if not ln.endswith("  done")}
    assert todo == {p.stem for p in gone}
    assert cap.err.strip() == f"8 cells, 5 already done in {d}/, 3 to run"
    assert main(["run", str(f), "--out", str(d), "--dry-run", "--force"]) == 0
    assert "done" not in capsys.readouterr().out
    assert main(["run", str(f), "--out", str(d), "--no-progress", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert f"matrix 'small': 8 cells, 5 already done, 3 to run -> {d}/" in err


def test_eta_leaves_out_start_up_and_counts_only_cells_to_run() -> None:
    from fedmedbench.executors import Progress, estimate_remaining

    assert estimate_remaining(0.0, [], 10) is None
    # the first cell took 10 s (imports, the first data load), the next ones 1 s each
    assert estimate_remaining(0.0, [10.0], 17) == pytest.approx(170.0)
    assert estimate_remaining(0.0, [10.0, 11.0, 12.0], 15) == pytest.approx(15.0)
    assert estimate_remaining(0.0, [10.0, 12.0, 14.0, 16.0], 2) == pytest.approx(4.0)
    p = Progress(4, enabled=False)
    assert p.eta() is None
    p.started = 0.0
    p.finished_at = [10.0, 11.0]
    assert p.eta() == pytest.approx(2.0)  # 2 left of 4, 1 s each


def test_check_names_a_close_plugin(capsys) -> None:
    assert main(["check", "fedavgg"]) == 2
    err = capsys.readouterr().err
    assert "no plugin or component named 'fedavgg'; did you mean 'fedavg'?" in err
    assert main(["check", "zzzzzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err


# --------------------------------------------------------------------------
# cell ids carry the plugins' distribution versions
# --------------------------------------------------------------------------


def test_builtin_cell_ids_change_only_with_the_fedmedbench_version(monkeypatch) -> None:
    import dataclasses

    import fedmedbench.matrix as matrix_mod
    from fedmedbench.matrix import cell_id, load_matrix
    from fedmedbench.registry import get_registry

    m = load_matrix(None)
    cells = m.cells
    version = metadata.version("fedmedbench")
    assert all(c["config"]["versions"] == {"fedmedbench": version} for c in cells)
    # the id is the hash of the config with its versions (resume's trust check holds)
    assert all(cell_id(c["config"]) == c["cell_id"] for c in cells)
    # another fedmedbench version: every id changes, and only by that
    reg = get_registry(refresh=True)
    try:
        for name, info in list(reg._by_name.items()):
            reg._by_name[name] = dataclasses.replace(info, version="99.0")
        other = matrix_mod.load_matrix(None, registry=reg).cells
    finally:
        get_registry(refresh=True)
    assert len(other) == len(cells)
    for a, b in zip(cells, other):
        assert a["cell_id"] != b["cell_id"]
        assert b["config"]["versions"] == {"fedmedbench": "99.0"}
        assert {**a["config"], "versions": None} == {**b["config"], "versions": None}
        assert cell_id({**a["config"], "versions": {"fedmedbench": "99.0"}}) == b["cell_id"]


def test_a_plugin_distributions_version_is_in_its_cells_ids(monkeypatch, tmp_path) -> None:
    import dataclasses

    from fedmedbench.matrix import parse_matrix
    from fedmedbench.registry import get_registry

    raw = {"axes": {"dataset": ["heart-disease"], "algorithm": ["fedavg", "local"]}}
    reg = get_registry(refresh=True)
    try:
        info = reg._by_name["fedavg"]
        reg._by_name["fedavg"] = dataclasses.replace(info, distribution="fedmedbench-fedavg2",
                                                     version="1.0")
        v1 = {c["labels"]["algorithm"]: c for c in parse_matrix(raw, registry=reg).cells}
        reg._by_name["fedavg"] = dataclasses.replace(info, distribution="fedmedbench-fedavg2",
                                                     version="1.1")
        v2 = {c["labels"]["algorithm"]: c for c in parse_matrix(raw, registry=reg).cells}
        # a module named by FEDMEDBENCH_PLUGINS is not installed: no version to go by
        reg._by_name["fedavg"] = dataclasses.replace(info, distribution="(not installed)",
                                                     version="")
        local = {c["labels"]["algorithm"]: c for c in parse_matrix(raw, registry=reg).cells}
    finally:
        get_registry(refresh=True)
    assert v1["fedavg"]["config"]["versions"]["fedmedbench-fedavg2"] == "1.0"
    assert v1["fedavg"]["cell_id"] != v2["fedavg"]["cell_id"]  # new plugin code: new cells
    assert v1["local"]["cell_id"] == v2["local"]["cell_id"]  # the other cells keep theirs
    assert "(not installed)" not in local["fedavg"]["config"]["versions"]


def test_git_commit_of_a_wheel_installed_from_git() -> None:
    from fedmedbench.results import _direct_url_commit

    sha = "0123456789abcdef0123456789abcdef01234567"
    vcs = {"url": "https://github.com/x/fedmedbench", "vcs_info": {"vcs": "git",
                                                                    "commit_id": sha}}
    assert _direct_url_commit(json.dumps(vcs)) == sha
    # built from a folder: the folder may have moved on since; no commit is claimed
    assert _direct_url_commit(json.dumps({"url": "file:///src", "dir_info": {}})) is None
    assert _direct_url_commit("not json") is None
    assert _direct_url_commit("") is None
