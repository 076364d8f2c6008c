"""Reports: shards merge into the same report as one run, escaping, the
leaderboard's tiers and ranking, FL against the baselines, invalid inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from report_fixtures import run, with_privacy_and_attacks

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


def _quickstart(out: Path, *args: str) -> int:
    """``fedmedbench run`` of the quickstart's seed 0 (6 cells) into ``out``."""
    return main(["run", "--out", str(out), "--select", "seed=0", "--no-progress",
                 "--no-report", *args])


@pytest.mark.slow
def test_report_over_shards_is_identical_to_report_over_one_run(tmp_path: Path) -> None:
    assert _quickstart(tmp_path / "whole") == 0
    # the CI way: `--shard I/4` into a directory each, merged by the report ...
    shards = [tmp_path / f"s{i}" for i in range(1, 5)]
    for i, d in enumerate(shards, 1):
        assert _quickstart(d, "--shard", f"{i}/4") == 0
    ids = [sorted(p.stem for p in d.glob("*.json")) for d in shards]
    whole_ids = sorted(p.stem for p in (tmp_path / "whole").glob("*.json"))
    assert sorted(sum(ids, [])) == whole_ids and len(whole_ids) == 6  # each cell once
    # ... and the tox way: every shard's records in ONE directory (what the
    # workflow's download of the shard artifacts makes)
    one = tmp_path / "one"
    one.mkdir()
    for d in shards:
        for p in d.glob("*.json"):
            shutil.copy(p, one / p.name)
    outs = {}
    for name, dirs in {"whole": [tmp_path / "whole"], "one": [one], "merged": shards}.items():
        out = tmp_path / f"rep-{name}"
        # every reporter; wall-clock seconds are the only thing two runs may differ in
        assert main(["report", *map(str, dirs), "--out", str(out), "--no-timings",
                     "--quiet"]) == 0
        outs[name] = _files(out)
    assert set(outs["whole"]) >= {"report.md", "report.json", "index.html",
                                  "tables/leaderboard.csv", "tables/cells.csv"}
    assert any(k.endswith("-frontier.svg") for k in outs["whole"])
    assert any(k.endswith("-convergence.png") for k in outs["whole"])
    for name in ("one", "merged"):
        diff = [k for k in outs["whole"] if outs["whole"][k] != outs[name].get(k)]
        assert set(outs[name]) == set(outs["whole"]) and not diff, (name, diff)
    # the report is about the right cells: the quickstart's 6 methods x privacy, ranked
    lb = json.loads(outs["whole"]["report.json"])["leaderboard"]
    assert {e["method"] for e in lb} == {"centralized", "local", "fedavg", "fedprox(mu=0.01)"}
    assert sum(e["n"] for e in lb) >= 6 and all(e["n"] == 1 for e in lb)


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
    failed.update(cell_id="f" * 16, status="failed",
                  error={"type": "PluginError", "message": f"boom {evil} \"quoted\" & more"})
    failed["metrics"] = {"cost": {"wall_s": 0.1}}
    out.append(failed)
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
    assert page.count('src="data:image/svg+xml;base64,') == 5
    assert '-reconstructions"><img alt=' in page
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
    assert set(tiers) == {"no formal guarantee", "ε ≤ 8", "ε ≤ 1"}
    assert set(tiers["ε ≤ 1"]["privacy"]) == {"dp-fedavg(epsilon=0.5)"}
    assert set(tiers["ε ≤ 8"]["privacy"]) == {"dp-fedavg(epsilon=0.5)", "dp-fedavg(epsilon=3)"}
    assert len(tiers["no formal guarantee"]) == 6  # 3 methods without DP + 3 DP settings
    for g in tiers.values():  # ranked by mean utility, 1..n
        assert list(g["rank"]) == list(range(1, len(g) + 1))
        assert g["utility_mean"].is_monotonic_decreasing
    e = tiers["ε ≤ 1"].iloc[0]
    assert e["epsilon"] == 0.5 and e["delta"] == 1e-5 and e["accountant"] == "rdp (client-level)"
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
    # figures: frontier, attacks, convergence, sites and the reconstruction grid
    from fedmedbench.plugins.reporters.figures import figures

    kinds = {k for _, k, _ in figures(data).values()}
    assert kinds == {"frontier", "attacks", "convergence", "sites", "reconstructions"}
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
