"""Reports: shards merge into the same report as one run, escaping, the
leaderboard's tiers and ranking, FL against the baselines, invalid inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_fixtures import run, seal, with_privacy_and_attacks

from fedmedbench.cli import main
from fedmedbench.report import build, comparison_tables
from fedmedbench.results import load_records, write_record


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the whole test matrix (6 cells)."""
    base = tmp_path_factory.mktemp("real")
    assert run(base / "whole") == 0
    return base


def _shards_job(tmp_path: Path, spawn) -> dict:
    """The runs and reports of the test below, each ``fedmedbench`` in a
    process of its own (a background job, tests/conftest.py)."""
    import subprocess
    import sys

    failed = []

    def cli(*args: str) -> None:
        p = spawn([sys.executable, "-m", "fedmedbench.cli", *args],
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = p.communicate(timeout=900)
        if p.returncode:
            failed.append((args, p.returncode, err.decode()[-3000:]))

    # the quickstart's seed 1 (9 cells): the seed whose unprotected gradient inversion
    # succeeds most clearly (PSNR 26.1 dB, where seed 0's reaches 19.1, below the
    # scorecard's 20 dB success line)
    quickstart = ["run", "--select", "seed=1", "--no-progress", "--no-report"]
    cli(*quickstart, "--out", str(tmp_path / "whole"))
    # the CI way: `--shard I/4` into a directory each, merged by the report ...
    shards = [tmp_path / f"s{i}" for i in range(1, 5)]
    for i, d in enumerate(shards, 1):
        cli(*quickstart, "--out", str(d), "--shard", f"{i}/4")
    # ... and the tox way: every shard's records in ONE directory (what the
    # workflow's download of the shard artifacts makes)
    one = tmp_path / "one"
    one.mkdir()
    for d in shards:
        for p in d.glob("*.json"):
            shutil.copy(p, one / p.name)
        if (d / "artifacts").is_dir():  # the inversion attack's images, beside the records
            shutil.copytree(d / "artifacts", one / "artifacts", dirs_exist_ok=True)
    for name, dirs in {"whole": [tmp_path / "whole"], "one": [one], "merged": shards}.items():
        # every reporter; wall-clock seconds are the only thing two runs may differ in
        cli("report", *map(str, dirs), "--out", str(tmp_path / f"rep-{name}"), "--no-timings",
            "--quiet")
    return {"tmp": tmp_path, "failed": failed}


@pytest.mark.slow
@pytest.mark.background(job=_shards_job)
def test_report_over_shards_is_identical_to_report_over_one_run(background) -> None:
    assert background["failed"] == []
    tmp_path = background["tmp"]
    shards = [tmp_path / f"s{i}" for i in range(1, 5)]
    ids = [sorted(p.stem for p in d.glob("*.json")) for d in shards]
    whole_ids = sorted(p.stem for p in (tmp_path / "whole").glob("*.json"))
    assert sorted(sum(ids, [])) == whole_ids and len(whole_ids) == 9  # each cell once
    outs = {name: _files(tmp_path / f"rep-{name}") for name in ("whole", "one", "merged")}
    assert set(outs["whole"]) >= {"report.md", "report.json", "index.html",
                                  "tables/leaderboard.csv", "tables/cells.csv"}
    assert any(k.endswith("-tradeoff.svg") for k in outs["whole"])
    assert any(k.endswith("-convergence.png") for k in outs["whole"])
    for name in ("one", "merged"):
        diff = [k for k in outs["whole"] if outs["whole"][k] != outs[name].get(k)]
        assert set(outs[name]) == set(outs["whole"]) and not diff, (name, diff)
    # the report is about the right cells: the quickstart's 9 methods x privacy, ranked
    lb = json.loads(outs["whole"]["report.json"])["leaderboard"]
    assert {e["method"] for e in lb} == {"centralized", "local", "fedavg", "fedprox[μ=0.01]"}
    assert sum(e["n"] for e in lb) >= 9 and all(e["n"] == 1 for e in lb)
    # the scorecard shows gradient inversion stopped by secure aggregation and DP-SGD
    sc = json.loads(outs["whole"]["report.json"])["scorecard"]
    inv = {e["privacy"]: e["inv_verdict"] for e in sc if e["inv_attack"]}
    assert inv == {"secagg": "stopped", "dp-sgd[ε=3]": "stopped"}, sc


def test_merge_of_split_records_is_byte_identical_with_timings(real: Path,
                                                               tmp_path: Path) -> None:
    recs, _ = load_records([real / "whole"])
    for i, r in enumerate(recs):  # the same records spread over three shard dirs
        write_record(tmp_path / f"shard{i % 3}", r)
    # a failed retry of an ok cell in a later shard must not replace it
    bad = dict(recs[0], status="failed", error={"message": "worker lost"})
    write_record(tmp_path / "shard2", bad)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["report", str(real / "whole"), "--out", str(a), "--quiet",
                 "--format", "markdown,csv,json"]) == 0
    assert main(["report", *(str(tmp_path / f"shard{i}") for i in (2, 0, 1)), "--out", str(b),
                 "--quiet", "--format", "markdown", "--format", "csv,json"]) == 0
    fa, fb = _files(a), _files(b)
    assert fa == fb
    assert "wall s" in fa["report.md"].decode()  # timings are in, and equal


@pytest.fixture(scope="module")
def rich(real: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Real records plus DP copies (ε 0.5, 3, 20) and attack results with
    reconstruction images, and hostile strings in labels, sites and errors."""
    d = tmp_path_factory.mktemp("rich") / "results"
    recs, _ = load_records([real / "whole"])
    out = with_privacy_and_attacks(recs, d / "images", rel=d)
    evil = "<script>alert(1)</script>"
    for r in out:
        if r["config"]["algorithm"]["name"] == "local":
            r["labels"]["algorithm"] = evil
            u = r["metrics"]["utility"]
            u["per_site"] = {f'site "{k}" & <b>': v for k, v in u["per_site"].items()}
    failed = json.loads(json.dumps(out[0]))
    failed.update(status="failed",
                  error={"type": "PluginError", "message": f"boom {evil} \"quoted\" & more"})
    failed["config"]["seed"] = 99
    failed["metrics"] = {"cost": {"wall_s": 0.1}}
    out.append(seal(failed))
    for r in out:
        write_record(d, r)
    return d, out


def test_html_escapes_every_record_string(rich: tuple[Path, list[dict]], tmp_path: Path) -> None:
    d, _ = rich
    assert main(["report", str(d), "--out", str(tmp_path), "--quiet",
                 "--format", "html,json,csv"]) == 0
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the label, shown as text
    assert "boom &lt;script&gt;alert(1)&lt;/script&gt; &quot;quoted&quot; &amp; more" in page
    assert "site &quot;Site0&quot; &amp; &lt;b&gt;" in page or \
        "site &quot;site0&quot; &amp; &lt;b&gt;" in page
    assert page.count("<script") == 1  # only the page's own sorting script
    # self-contained: nothing is fetched
    for needle in ("http://", "https://", "src=\"//", "<link", "@import"):
        assert needle not in page, needle
    assert "default-src &#x27;none&#x27;" in page  # CSP: no other source
    assert page.count('src="data:image/svg+xml;base64,') == 6  # 6 figure kinds
    assert '-reconstructions" data-kind="reconstructions"><img alt=' in page
    # exports keep the raw strings (they are data, not markup)
    rep = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert any(e["method"] == "<script>alert(1)</script>" for e in rep["leaderboard"])
    assert "<script>alert(1)</script>" in (tmp_path / "tables" / "cells.csv").read_text()


def test_leaderboard_tiers_ranking_attacks_and_baselines(rich: tuple[Path, list[dict]]) -> None:
    d, recs = rich
    # as `fedmedbench report` passes them: with the directories they came from
    recs = [{**r, "_dirs": [str(d)]} for r in recs]
    data = build(recs)
    lb = data.leaderboard
    tiers = {t: g for t, g in lb.groupby("tier")}
    every, eps8, eps1 = "every entry", "ε ≤ 8 against the server", "ε ≤ 1 against the server"
    assert set(tiers) == {every, eps8, eps1}
    tiers = {"ε ≤ 1": tiers[eps1], "ε ≤ 8": tiers[eps8], "any guarantee": tiers[every]}
    assert set(tiers["ε ≤ 1"]["privacy"]) == {"dp-fedavg[ε=0.5]"}
    assert set(tiers["ε ≤ 8"]["privacy"]) == {"dp-fedavg[ε=0.5]", "dp-fedavg[ε=3]"}
    assert len(tiers["any guarantee"]) == 6  # 3 methods without DP + 3 DP settings
    for g in tiers.values():  # ranked by mean utility; ties share a rank
        assert g["utility_mean"].round(3).is_monotonic_decreasing
        assert list(g["rank"]) == sorted(g["rank"]) and g["rank"].iloc[0] == 1
    e = tiers["ε ≤ 1"].iloc[0]
    assert e["epsilon"] == 0.5 and e["delta"] == 1e-5 and e["accountant"] == "rdp (client-level)"
    assert e["unit"] == "client"
    assert e["n"] == 2 and "fedmedbench" in e["provenance"]
    # FL against centralized and local training, without privacy
    b = data.baselines.set_index("privacy")
    row = b.loc["none"]
    s = data.summary.set_index(["method", "privacy"])
    cen = s.loc[("centralized", "none"), "utility_mean"]
    loc = s.loc[("<script>alert(1)</script>", "none"), "utility_mean"]
    assert row["centralized"] == pytest.approx(cen) and row["local"] == pytest.approx(loc)
    assert row["vs_local"] == pytest.approx(row["utility_mean"] - loc)
    assert row["gap_closed"] == pytest.approx((row["utility_mean"] - loc) / (cen - loc))
    assert len(b) == 4  # fedavg without DP and at three ε
    # attacks: metrics averaged over seeds, not-applicable kept with its reason
    a = data.attacks
    auc = a[(a["attack"] == "mia-loss") & (a["metric"] == "auc") & (a["privacy"] == "none")
            & (a["method"] == "fedavg")]
    assert auc["mean"].iloc[0] == pytest.approx(0.605) and auc["n"].iloc[0] == 2
    na = a[a["metric"] == "not_applicable"]
    assert list(na["method"]) == ["centralized"] and "no updates" in na["note"].iloc[0]
    assert "seconds" not in set(a["metric"])
    # failures listed with the reason; the failed cell does not count as a seed
    assert list(data.failures["status"]) == ["failed"]
    assert data.counts == {"ok": 12, "failed": 1, "skipped": 0, "diverged": 0}
    # figures: trade-off, attacks, convergence, sites and the reconstruction grid
    from fedmedbench.plugins.reporters.figures import figures

    kinds = {k for _, k, _ in figures(data).values()}
    # no virtual clock on a simulated network in these records: no clock figure
    assert kinds == {"tradeoff", "attacks", "roc", "convergence", "sites", "reconstructions"}
    text = comparison_tables(recs)
    assert "ε ≤ 1" in text and "0.5 (δ=1e-05)" in text and "gap closed" in text


def test_invalid_records_named_or_skipped(real: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "res"
    shutil.copytree(real / "whole", d)
    good = sorted(d.glob("*.json"))
    rec = json.loads(good[0].read_text())
    (d / "broken.json").write_text("{not json")
    (d / "old.json").write_text(json.dumps({**rec, "schema": "fedmedbench.result/0"}))
    (d / "typed.json").write_text(json.dumps({**rec, "metrics": [1, 2]}))
    for name, why in (("broken.json", "not a readable result record"),
                      ("old.json", "fedmedbench run MATRIX --force"),
                      ("typed.json", "metrics has the wrong type")):
        solo = tmp_path / name.replace(".", "_")
        solo.mkdir()
        shutil.copy(d / name, solo / name)
        assert main(["report", str(solo), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert str(solo / name) in err and why in err, err
    assert main(["report", str(d), "--quiet"]) == 2
    assert main(["report", str(d), "--skip-invalid", "--out", str(tmp_path / "o"),
                 "--format", "markdown"]) == 0
    cap = capsys.readouterr()
    assert "skipped 3 invalid record file(s) of 9 read" in cap.err
    assert cap.err.count("skipped: ") == 3
    assert "centralized" in (tmp_path / "o" / "report.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "no result records" in capsys.readouterr().err


# --------------------------------------------------------------------------
# reports read only what they wrote (issue 13, item 5 and "What was seen" 6)
# --------------------------------------------------------------------------


def _one(real: Path) -> dict:
    recs, _ = load_records([real / "whole"])
    return json.loads(json.dumps(next(r for r in recs if r["config"]["algorithm"]["name"]
                                      == "fedavg")))


def test_report_embeds_only_real_pngs_inside_the_results_folder(real: Path,
                                                                tmp_path: Path) -> None:
    from matplotlib.image import imsave

    from fedmedbench.report import record_image

    secret = tmp_path / "secret.png"  # a private image outside the results folder
    imsave(secret, np.full((8, 8), 0.3), cmap="gray")
    d = tmp_path / "results"
    d.mkdir()
    good = d / "artifacts" / "x" / "grid.png"
    good.parent.mkdir(parents=True)
    imsave(good, np.eye(8), cmap="gray")
    (d / "notpng.png").write_text("I am text, not an image")
    (d / "link.png").symlink_to(secret)
    rec = {**_one(real), "_dirs": [str(d)]}
    assert record_image(rec, str(secret)) is None  # absolute: never opened
    assert record_image(rec, "../secret.png") is None  # outside the folder
    assert record_image(rec, "link.png") is None  # a link out of the folder
    assert record_image(rec, "notpng.png") is None  # not a PNG (signature bytes)
    assert record_image(rec, "artifacts/x/grid.png") == good.resolve()
    # an absolute path of a moved folder: only its file name, in the cell's artifacts
    moved = d / "artifacts" / rec["cell_id"] / "gradinv-idlg.png"
    moved.parent.mkdir(parents=True)
    imsave(moved, np.eye(8), cmap="gray")
    assert record_image(rec, "/elsewhere/artifacts/x/gradinv-idlg.png") == moved.resolve()
    # end to end: records naming the secret, a text file and a link report without them
    for i, name in enumerate([str(secret), "../secret.png", "notpng.png", "link.png"]):
        r = _one(real)
        r["config"]["seed"] = 1000 + i
        r["metrics"]["attacks"] = {"gradinv-idlg": {"psnr": 20.0, "images": name}}
        write_record(d, seal(r))
    out = tmp_path / "rep"
    assert main(["report", str(d), "--out", str(out), "--quiet",
                 "--format", "figures,html"]) == 0
    assert not list((out / "figures").glob("*reconstructions*"))
    assert "-reconstructions" not in (out / "index.html").read_text(encoding="utf-8")


def test_markdown_escapes_html_and_pipes_and_csv_has_no_formulas(real: Path,
                                                                 tmp_path: Path) -> None:
    d = tmp_path / "results"
    for i, lab in enumerate(["<script>alert(1)</script> a|b", "=HYPERLINK(\"http://x\")",
                             "+cmd", "-2+3", "@SUM(A1)"]):
        r = _one(real)
        r["config"]["seed"] = 1000 + i
        r["labels"]["algorithm"] = lab
        write_record(d, seal(r))
    out = tmp_path / "rep"
    assert main(["report", str(d), "--out", str(out), "--quiet",
                 "--format", "markdown,csv"]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "<script>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt; a\\|b" in md
    for line in md.splitlines():  # every table row keeps its columns
        if line.startswith("| rank"):
            width = line.count("|") - line.count("\\|")
        elif line.startswith("| ") and "alert" in line and "rank" not in line:
            assert line.count("|") - line.count("\\|") >= 3
    assert width > 3
    import csv

    with (out / "tables" / "cells.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert {"'=HYPERLINK(\"http://x\")", "'+cmd", "'-2+3", "'@SUM(A1)"} <= methods
    assert not any(v.startswith(("=", "+", "-", "@")) for r in rows for k, v in r.items()
                   if k in ("method", "algorithm"))
    summ = list(csv.DictReader((out / "tables" / "summary.csv").open(encoding="utf-8")))
    assert all(float(r["utility_mean"]) > 0 for r in summ)  # numbers stay numbers


def test_report_format_is_checked_before_anything_is_written(real: Path, tmp_path: Path,
                                                             capsys) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(real / "whole"), "--out", str(out),
                 "--format", "markdown,htm"]) == 2
    err = capsys.readouterr().err
    assert "--format 'htm': no such reporter; did you mean 'html'?" in err
    assert not out.exists()  # report.md was not written first


def test_report_on_a_full_disk_is_one_line(real: Path, tmp_path: Path, monkeypatch,
                                           capsys) -> None:
    import errno
    import os

    from fedmedbench import fileio

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "rep" / "report.md"))

    monkeypatch.setattr(fileio, "write_atomic", full)
    assert main(["report", str(real / "whole"), "--out", str(tmp_path / "rep"), "--quiet",
                 "--format", "markdown"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert (f"no space left on the device holding {tmp_path / 'rep' / 'report.md'}; free some "
            f"space there") in err[0]


# --------------------------------------------------------------------------
# the tables: tiers, ties, the worst site against local, chance level, labels
# --------------------------------------------------------------------------


def _entries(real: Path) -> list[dict]:
    recs, _ = load_records([real / "whole"])
    return [json.loads(json.dumps(r)) for r in recs]


def test_ties_at_the_shown_precision_share_a_rank_and_break_by_the_stronger_guarantee(
        real: Path) -> None:
    """Issue 20.5: equal utilities at 3 decimals are a tie (shown ``1=``),
    ordered by the stronger guarantee, then fewer bytes, then less time."""
    recs = _entries(real)
    fed = [r for r in recs if r["config"]["algorithm"]["name"] == "fedavg"]
    extra = []
    for r in fed:  # the same utility (to 4 decimals) under DP, and 3x the bytes under HE
        c = json.loads(json.dumps(r))
        c["labels"]["privacy"] = "dp-sgd(epsilon=3.0)"
        c["config"]["privacy"] = [{"name": "dp-sgd", "epsilon": 3.0}]
        c["metrics"]["utility"]["global"] += 0.0001
        c["metrics"]["privacy"] = {"level": "dp", "epsilon": 3.0, "delta": 1e-5,
                                   "accountant": "rdp", "unit": "record", "mechanisms": {}}
        extra.append(seal(c))
        h = json.loads(json.dumps(r))
        h["labels"]["privacy"] = "he-ckks"
        h["config"]["privacy"] = [{"name": "he-ckks"}]
        h["metrics"]["utility"]["global"] += 0.0002  # higher hidden decimals
        h["metrics"]["cost"]["bytes_up"] *= 3
        extra.append(seal(h))
    lb = build(recs + extra).leaderboard
    top = lb[lb["tier"] == "every entry"]
    fa = top[top["method"] == "fedavg"]
    assert list(fa["privacy"]) == ["dp-sgd[ε=3]", "none", "he-ckks"]
    assert len(set(fa["rank"])) == 1 and set(fa["rank_text"]) == {f"{fa['rank'].iloc[0]}="}
    from fedmedbench.report import RANKING_RULE

    assert "stronger guarantee" in RANKING_RULE and "fewer bytes" in RANKING_RULE
    assert "'every entry'" in RANKING_RULE


def test_worst_site_gain_over_local_and_personalized_entries(real: Path) -> None:
    recs = _entries(real)
    pers = []
    for r in recs:
        if r["config"]["algorithm"]["name"] == "fedavg":
            c = json.loads(json.dumps(r))
            c["cell_id"] = c["cell_id"][::-1]
            c["labels"]["algorithm"] = "ditto(lam=0.1)"
            c["config"]["algorithm"] = {"name": "ditto", "lam": 0.1}
            c["protocol"] = "personalized"
            u = c["metrics"]["utility"]
            u["per_site"] = {k: 0.9 + 0.01 * i for i, k in enumerate(sorted(u["per_site"]))}
            u["worst_site"] = 0.9  # one definition: the lowest per-site mean over seeds
            pers.append(c)
    data = build(recs + pers)
    s = data.summary.set_index("method")
    local_w = s.loc["local", "worst_site_mean"]
    assert s.loc["fedavg", "worst_site_gain"] == pytest.approx(
        s.loc["fedavg", "worst_site_mean"] - local_w)
    assert s.loc["local", "worst_site_gain"] == pytest.approx(0.0)
    assert s.loc["ditto[lam=0.1]", "worst_site_gain"] == pytest.approx(0.9 - local_w)
    assert s.loc["ditto[lam=0.1]", "topology"] == "personalized"
    b = data.baselines.set_index("method")
    assert "ditto[lam=0.1]" in b.index  # personalized methods get the same columns
    assert b.loc["ditto[lam=0.1]", "worst_site_gain"] == pytest.approx(0.9 - local_w)
    lb = data.leaderboard
    assert lb[lb["method"] == "ditto[lam=0.1]"]["worst_site_gain"].iloc[0] == \
        pytest.approx(0.9 - local_w)
    text = comparison_tables(recs + pers)
    assert "vs local" in text and f"{0.9 - local_w:+.3f}" in text


def test_cells_at_chance_level_are_marked_in_every_table(real: Path) -> None:
    recs = _entries(real)
    for r in recs:
        u = r["metrics"]["utility"]
        u["majority_baseline"] = 0.6
        u["chance_level"] = r["config"]["algorithm"]["name"] == "local"
        u.pop("per_site_at_chance", None)  # per-site flags: their own test below
    data = build(recs)
    s = data.summary.set_index("method")
    assert s.loc["local", "chance_seeds"] == 2 and s.loc["fedavg", "chance_seeds"] == 0
    assert s.loc["local", "majority_baseline"] == pytest.approx(0.6)
    lb = data.leaderboard
    assert set(lb[lb["chance_seeds"] > 0]["method"]) == {"local"}
    from fedmedbench.report import CHANCE_MARK, terminal_summary, text_tables

    for title, _headers, rows in text_tables(data)[data.datasets[0]]:  # every table
        loc = [r for r in rows if any(c.startswith("local") for c in r[:2])]
        assert all(any(CHANCE_MARK in c for c in r) for r in loc), title
        assert loc or title.startswith("federated learning"), title  # only FL rows there
        others = [r for r in rows if r not in loc]
        assert not any(CHANCE_MARK in c for r in others for c in r), title
    assert "does not beat the majority-class baseline (0.600)" in terminal_summary(data)
    # records without the fields (before issue 12's datasets report them): no mark
    plain_recs = _entries(real)
    for r in plain_recs:
        r["metrics"]["utility"].pop("per_site_at_chance", None)
    plain = build(plain_recs)
    assert (plain.summary["chance_seeds"] == 0).all()
    assert CHANCE_MARK not in terminal_summary(plain)


def test_per_site_mean_is_a_metric_of_records_summary_and_the_site_table(real: Path) -> None:
    """``utility.per_site_mean`` (the unweighted mean over sites, FLamby's
    metric) is a column of the frame, averaged over seeds in the summary, and
    the site table's last column."""
    recs = _entries(real)
    for r in recs:
        u = r["metrics"]["utility"]
        assert u["per_site_mean"] == pytest.approx(np.mean(list(u["per_site"].values())))
        u["per_site_mean"] = 0.5 + 0.01 * r["config"]["seed"]  # a value no other column has
    data = build(recs)
    assert set(data.cells["per_site_mean"].round(6)) == {
        round(0.5 + 0.01 * r["config"]["seed"], 6) for r in recs}
    want = float(np.mean([0.5 + 0.01 * r["config"]["seed"] for r in recs
                          if r["config"]["algorithm"]["name"] == "fedavg"]))
    s = data.summary.set_index("method")
    assert s.loc["fedavg", "per_site_mean"] == pytest.approx(want)
    from fedmedbench.report import text_tables

    (title, headers, rows), = [t for t in text_tables(data)[data.datasets[0]]
                               if t[0].startswith("per-site")]
    assert headers[-1] == "site mean"
    assert [r[-1] for r in rows if r[0] == "fedavg"] == [f"{want:.3f}"]


def test_short_labels_are_stable_and_the_legend_maps_them_to_full_configs(real: Path) -> None:
    from fedmedbench.matrix import short_label

    cases = {
        "dp-fedavg(clip=0.1,noise=distributed,noise_multiplier=1.0)": "dp-fedavg[σ=1,C=0.1,dist]",
        "dp-sgd(epsilon=3.0)": "dp-sgd[ε=3]",
        "fedprox(mu=0.01)": "fedprox[μ=0.01]",
        "dp-fedavg(clip=1.0,delta=1e-05,epsilon=8.0)+secagg": "dp-fedavg[ε=8,C=1,δ=1e-05]+secagg",
        "he-ckks(layers=[0, 1])": "he-ckks[layers=[0,1]]",
        "weighted-mean(by=uniform)": "weighted-mean[uniform]",
        "x(flag=True)": "x[flag=True]",
        "none": "none", "fedavg": "fedavg",
        "<script>alert(1)</script>": "<script>alert(1)</script>",  # not name(k=v): unchanged
    }
    for long, want in cases.items():
        assert short_label(long) == want == short_label(long)
    recs = _entries(real)
    for r in recs:
        if r["config"]["algorithm"]["name"] == "fedavg":
            r["labels"]["algorithm"] = "fedavg(server_lr=1.0)"
    data = build(recs)
    assert "fedavg[server_lr=1]" in set(data.cells["algorithm"])
    assert set(data.cells["algorithm_spec"]) >= {"fedavg(server_lr=1.0)"}
    lg = data.legend.set_index(["axis", "label"])
    row = lg.loc[("algorithm", "fedavg[server_lr=1]")]
    assert row["spec"] == "fedavg(server_lr=1.0)" and row["config"].startswith("fedavg")
    full = lg.loc[("dataset", data.cells["dataset"].iloc[0]), "config"]
    assert full.startswith("synthetic-tabular(") and "n_samples=400" in full
    assert "n_sites=4" in full  # every resolved parameter, defaults included
    # two labels that would share a short label keep their full labels
    from fedmedbench.report import short_labels

    both = short_labels(pd.Series(["a(clip=1.0)", "a(max_grad_norm=1.0)", "b(mu=1.0)"]))
    assert list(both) == ["a(clip=1.0)", "a(max_grad_norm=1.0)", "b[μ=1]"]


def test_per_site_tables_flag_the_sites_the_records_flag(real: Path) -> None:
    """Issue 19.7: per-site tables judge each site on its own numbers: a
    site's score carries † exactly where the records' ``per_site_at_chance``
    says so in some seed, and the site's own majority class is shown."""
    from fedmedbench.report import CHANCE_MARK, text_tables

    recs = _entries(real)
    for r in recs:
        u = r["metrics"]["utility"]
        sites = sorted(u["per_site"])
        u["per_site_at_chance"] = {k: (k == sites[0] and r["config"]["seed"] == 0
                                       and r["config"]["algorithm"]["name"] == "fedavg")
                                   for k in sites}
        u["majority_baseline_per_site"] = {k: 0.5 + 0.01 * i for i, k in enumerate(sites)}
    data = build(recs)
    st = data.sites.set_index(["method", "site"])
    first = sorted(recs[0]["metrics"]["utility"]["per_site"])[0]
    assert st.loc[("fedavg", first), "chance_seeds"] == 1
    assert (data.sites[data.sites["chance_seeds"] > 0]["method"] == "fedavg").all()
    assert st.loc[("local", first), "majority_baseline"] == pytest.approx(0.5)
    (title, headers, rows), = [t for t in text_tables(data)[data.datasets[0]]
                               if t[0].startswith("per-site")]
    col = headers.index(first)
    marked = {(r[0], h) for r in rows for h, c in zip(headers, r) if CHANCE_MARK in c
              and h not in ("method", "privacy")}
    assert marked == {("fedavg", first)}, rows
    assert rows[-1][0] == "(majority class)" and rows[-1][col] == "0.500"


def test_tables_show_the_settings_and_sigma_the_run_used(real: Path) -> None:
    """Issue 19.8: the labels table shows the σ a target ε solved for, never
    the unused default of the config; the settings table and the DataFrame
    carry the resolved run settings."""
    from fedmedbench.report import text_tables

    recs = _entries(real)
    fed = [r for r in recs if r["config"]["algorithm"]["name"] == "fedavg"]
    extra = []
    for r in fed:
        c = json.loads(json.dumps(r))
        c["labels"]["privacy"] = "dp-sgd(epsilon=3.0)"
        c["config"]["privacy"] = [{"name": "dp-sgd", "epsilon": 3.0, "noise_multiplier": 1.0,
                                   "max_grad_norm": 1.0, "sample_rate": None, "delta": 1e-5}]
        sig = 1.88 + 0.1 * c["config"]["seed"]
        c["metrics"]["privacy"] = {
            "level": "dp", "epsilon": 2.99, "delta": 1e-5, "accountant": "rdp",
            "unit": "record", "noise_multiplier": sig,
            "by_adversary": {"server": 2.99, "client": 2.99, "released": 2.99},
            "mechanisms": {"dp-sgd": {
                "epsilon": 2.99, "target_epsilon": 3.0, "noise_multiplier": sig,
                "max_grad_norm": 1.0, "per_site": {
                    s: {"noise_multiplier": sig + i, "sample_rate": 0.1, "steps": 30,
                        "planned_steps": 30}
                    for i, s in enumerate(sorted(c["metrics"]["utility"]["per_site"]))}}}}
        extra.append(seal(c))
    data = build(recs + extra)
    lg = data.legend.set_index(["axis", "label"])
    text = lg.loc[("privacy", "dp-sgd[ε=3]"), "config"]
    assert "noise_multiplier" not in text and "σ=1.88" in text and "30 steps of 30" in text
    assert "ε spent against server 2.99" in text
    cells = data.cells
    dp = cells[cells["privacy"] == "dp-sgd[ε=3]"]
    assert set(dp["sigma_min"].round(2)) == {1.88, 1.98} and (dp["steps"] == 30).all()
    for k in ("lr", "local_steps", "batch_size", "clients_per_round", "rounds"):
        assert cells[k].notna().all(), k
    run = recs[0]["config"]["run"]
    (title, headers, rows), = [t for t in text_tables(data)[data.datasets[0]]
                               if t[0].startswith("training settings")]
    row = next(r for r in rows if r[1] == "dp-sgd[ε=3]")
    assert row[headers.index("σ used")].startswith("1.88") and row[headers.index("steps")] == \
        "30/30"
    assert row[headers.index("batch")] == str(int(run["batch_size"]))
    # a labels table that showed the unused default would fail here
    assert not any("noise_multiplier=1.0" in r[2] for t in text_tables(data)[""]
                   for r in t[2] if t[0].startswith("labels"))


def test_verified_claims_and_the_scorecard(real: Path) -> None:
    """Issue 20.3/20.4: every entry's accountant ε per adversary, the audited
    bound with its ceiling and flag from its audit cells (kept apart from
    its utility), the strongest attack beside the unprotected method."""
    recs = _entries(real)
    fed = [r for r in recs if r["config"]["algorithm"]["name"] == "fedavg"]
    extra = []
    for r in fed:
        mia = r["metrics"].setdefault("attacks", {}).setdefault("mia-loss", {})
        mia.update({"auc": 0.7, "tpr_at_0.1pct_fpr": 0.05})
        c = json.loads(json.dumps(r))
        c["labels"]["privacy"] = "dp-sgd(epsilon=1.0)"
        c["config"]["privacy"] = [{"name": "dp-sgd", "epsilon": 1.0}]
        c["metrics"]["privacy"] = {"level": "dp", "epsilon": 1.0, "delta": 1e-5,
                                   "accountant": "rdp", "unit": "record", "protected": True,
                                   "by_adversary": {"server": 1.0, "client": 1.0,
                                                    "released": 1.0}, "mechanisms": {}}
        c["metrics"]["attacks"] = {"mia-loss": {"auc": 0.52, "tpr_at_0.1pct_fpr": 0.001}}
        extra.append(seal(c))
        a = json.loads(json.dumps(c))  # its audit cell: canaries in training, another model
        a["labels"]["model"] = "mlp(hidden=[128])"
        a["config"]["model"] = {"name": "mlp", "hidden": [128]}
        a["metrics"]["utility"]["global"] = 0.1  # must never reach the entry's utility
        a["metrics"]["canaries"] = {"m": 1000, "kind": "gradients", "included": 500}
        a["metrics"]["attacks"] = {"audit-dirac": {
            "audited_epsilon": 2.5 + r["config"]["seed"], "ceiling": 5.4,
            "claimed_epsilon": 1.0, "claimed_unit": "record",
            "contradicts_claim": r["config"]["seed"] == 1, "no_power": False,
            "within_claim": r["config"]["seed"] != 1}}
        extra.append(seal(a))
        for x in (c, a):  # a second DP entry, whose audit finds nothing: kept apart
            y = json.loads(json.dumps(x))
            y["labels"]["privacy"] = "dp-sgd(epsilon=8.0)"
            y["config"]["privacy"] = [{"name": "dp-sgd", "epsilon": 8.0}]
            if "audit-dirac" in y["metrics"]["attacks"]:
                y["metrics"]["attacks"]["audit-dirac"].update(
                    audited_epsilon=0.5, claimed_epsilon=8.0, contradicts_claim=False,
                    no_power=True, within_claim=True)
            extra.append(seal(y))
    data = build(recs + extra)
    c8 = data.claims.set_index(["method", "privacy"]).loc[("fedavg", "dp-sgd[ε=8]")]
    assert c8["audit_record"] == 0.5 and c8["audit_record_flag"] == "no power"
    assert not c8["flagged"]
    s = data.summary.set_index(["method", "privacy"])
    assert s.loc[("fedavg", "dp-sgd[ε=1]"), "utility_mean"] > 0.5  # the audit cells kept apart
    assert len(data.audit_cells) == 2 * len(fed)
    c = data.claims.set_index(["method", "privacy"]).loc[("fedavg", "dp-sgd[ε=1]")]
    assert c["eps_server"] == 1.0 and c["audit_record_n"] == len(fed)
    assert c["audit_record"] == pytest.approx(2.5 + max(r["config"]["seed"] for r in fed))
    assert c["audit_record_ceiling"] == 5.4 and c["flagged"]
    assert c["audit_record_flag"] == "contradicts the claim"
    assert c["mia_tpr"] == pytest.approx(0.001) and c["mia_tpr_unprotected"] == \
        pytest.approx(0.05)
    sc = data.scorecard.set_index("privacy").loc["dp-sgd[ε=1]"]
    assert sc["mia_verdict"] == "stopped" and sc["bytes_x"] == pytest.approx(1.0)
    from fedmedbench.report import text_tables

    tabs = dict((t[0].split(":")[0], t) for t in text_tables(data)[data.datasets[0]])
    rows = tabs["verified claims"][2]
    assert any("CONTRADICTS" in cell for row in rows for cell in row)
