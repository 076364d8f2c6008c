"""Tracks, submissions and the leaderboard (issue 20).

- ``fedmedbench tracks`` lists at least 4 versioned tracks in 100 columns,
  and every shipped track plans cells that parse;
- a baseline submission verifies, carries its provenance, and the
  leaderboard refuses it, naming the file, once anything in it changed;
- a rerun compares every number and shows a mismatch (it is not hidden);
- the held-out example plugin, submitted from its wheel in a fresh
  environment and rerun by the CI template's command in another fresh
  environment, gives identical numbers (slow);
- a row whose claim an audit contradicts is flagged (the deliberately broken
  accountant of tests/fmb_test_plugins.py, packaged as a wheel; slow).
"""

from __future__ import annotations

import configparser
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedmedbench.cli import main
from fedmedbench.submit import (
    MANIFEST,
    fresh_env,
    manifest_digest,
    sha256_path,
    submit,
    verify,
)
from fedmedbench.tracks import TRACKS, get_track

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# tracks
# --------------------------------------------------------------------------


def test_tracks_lists_at_least_four_tracks_in_100_columns(capsys) -> None:
    assert main(["tracks"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100, out
    ids = [t.id for t in TRACKS]
    assert len(ids) >= 4 and all(f"{i}@" in out for i in ids)
    for want in ("heart-disease", "icu-support2", "icu-synthetic-ehr", "genomics-gse7390",
                 "imaging-synthetic", "imaging-medmnist"):
        assert want in ids
    assert main(["tracks", "heart-disease"]) == 0
    one = capsys.readouterr().out
    assert max(map(len, one.splitlines())) <= 100, one
    for key in ("provenance", "budget", "seeds", "tiers", "protection", "attacks", "audit",
                "tuning", "metric", "digest"):
        assert f"\n{key}" in one, key
    assert main(["tracks", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {d["id"] for d in doc} == set(ids) and all(len(d["digest"]) == 64 for d in doc)


def test_every_shipped_track_plans_cells_that_parse() -> None:
    from fedmedbench.errors import ConfigError
    from fedmedbench.matrix import parse_matrix
    from fedmedbench.submit import plan

    for t in TRACKS:
        groups = plan(t, None)
        assert len(groups) == sum(len(ps) for _, ps in t.baselines)
        if t.needs_user_files:
            with pytest.raises(ConfigError, match="no file given"):
                parse_matrix(groups[0].raw)
            continue
        for g in groups:
            m = parse_matrix(g.raw)
            assert m.count() == len(t.seeds) and m.rounds == t.rounds
            assert {a["name"] for a in m.attacks} >= {a["name"] for a in t.attacks}


def test_a_track_is_versioned_by_its_definition() -> None:
    import dataclasses

    from fedmedbench.errors import ConfigError

    t = get_track("heart-disease")
    assert get_track("heart-disease@1") is t and t.digest == get_track("heart-disease").digest
    for change in ({"rounds": t.rounds + 1}, {"seeds": (0, 1)},
                   {"run": {**t.run, "lr": 0.1}}, {"attacks": ()}):
        assert dataclasses.replace(t, **change).digest != t.digest, change
    with pytest.raises(ConfigError, match="version 1"):
        get_track("heart-disease@2")
    with pytest.raises(ConfigError, match="did you mean 'heart-disease'"):
        get_track("heart-diseas")


# --------------------------------------------------------------------------
# a baseline submission: provenance, verification, tampering, rerun
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fedmedbench submit heart-disease --tier all`` (the built-ins without
    DP: 5 entries x 3 seeds, each tuned over the track's grid)."""
    out = tmp_path_factory.mktemp("subs") / "baseline"
    submit("heart-disease", None, out, tiers=["all"], signed_off_by="Test <t@example.org>")
    return out


def test_a_submission_carries_its_provenance(baseline: Path) -> None:
    doc = json.loads((baseline / MANIFEST).read_text())
    t = get_track("heart-disease")
    assert doc["track"] == {"id": t.id, "version": t.version, "digest": t.digest}
    assert doc["package"] is None and doc["seeds"] == list(t.seeds)
    env = doc["environment"]
    assert env["python"] and env["torch"] and env["fedmedbench"] and env["platform"]
    assert doc["signed_off_by"] == "Test <t@example.org>" and doc["digest"] == \
        manifest_digest(doc)
    records = [k for k in doc["files"] if k.startswith("records/")]
    assert len(records) == 5 * 3
    log = json.loads((baseline / "tuning/log.json").read_text())
    assert doc["tuning"]["trials"] == len(log["trials"]) == 5 * 2 * 2  # grid 2 x seeds 2
    sub = verify(baseline)
    assert len(sub.records) == 15
    for r in sub.records:  # every entry trains on the track's rows, tuned or not
        tun = r["config"]["tuning"]
        assert tun["role"] == "rest" and tun["fraction"] == t.tuning.fraction
        assert "noise_multiplier" not in json.dumps(r["labels"])


def _tamper_number(d: Path) -> Path:
    p = sorted((d / "records").glob("*.json"))[0]
    rec = json.loads(p.read_text())
    rec["metrics"]["utility"]["global"] = 0.99
    p.write_text(json.dumps(rec))
    return p


def _extra_record(d: Path) -> Path:
    src = sorted((d / "records").glob("*.json"))[0]
    rec = json.loads(src.read_text())
    rec["config"]["seed"] = 7
    from fedmedbench.matrix import cell_id

    rec["cell_id"] = cell_id(rec["config"])
    p = d / "records" / f"{rec['cell_id']}.json"
    p.write_text(json.dumps(rec))
    return p


def _edit_manifest(d: Path) -> Path:
    doc = json.loads((d / MANIFEST).read_text())
    doc["signed_off_by"] = "someone else"
    (d / MANIFEST).write_text(json.dumps(doc))
    return d / MANIFEST


def _other_track_version(d: Path) -> Path:
    doc = json.loads((d / MANIFEST).read_text())
    doc["track"]["version"] = 0
    doc["digest"] = manifest_digest(doc)
    (d / MANIFEST).write_text(json.dumps(doc))
    return d / MANIFEST


@pytest.mark.parametrize("tamper,why", [
    (_tamper_number, "SHA-256 does not match the manifest"),
    (_extra_record, "a record the manifest does not list"),
    (_edit_manifest, "digest does not match"),
    (_other_track_version, "made for track heart-disease@0"),
])
def test_the_leaderboard_refuses_a_tampered_submission_naming_the_file(
        baseline: Path, tmp_path: Path, capsys, tamper, why) -> None:
    d = Path(shutil.copytree(baseline, tmp_path / "sub"))
    bad = tamper(d)
    assert main(["leaderboard", str(d), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and why in err and "refused" in err, err
    assert not (tmp_path / "site" / "index.html").exists()


def test_a_rerun_compares_every_number_and_shows_a_mismatch(baseline: Path, tmp_path: Path,
                                                             capsys) -> None:
    """A dishonest submitter edits a number and re-hashes the folder: it
    verifies, but the rerun finds the number and names it; every other
    record is identical, bit for bit."""
    d = Path(shutil.copytree(baseline, tmp_path / "sub"))
    p = _tamper_number(d)
    doc = json.loads((d / MANIFEST).read_text())
    doc["files"][f"records/{p.name}"] = sha256_path(p)
    doc["digest"] = manifest_digest(doc)
    (d / MANIFEST).write_text(json.dumps(doc))
    verify(d)  # the hashes agree again
    report = tmp_path / "rerun.json"
    assert main(["verify", str(d), "--rerun", "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "rerun: 14 of 15 records identical" in out
    assert f"MISMATCH {p.stem}" in out and "metrics.utility.global: submitted 0.99" in out
    res = json.loads(report.read_text())
    assert res["identical"] == 14 and [m["cell_id"] for m in res["mismatched"]] == [p.stem]
    assert not res["missing"] and not res["extra"]


def test_the_site_has_a_page_per_track_with_claims_and_provenance_on_every_row(
        baseline: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    assert main(["leaderboard", str(baseline), "--out", str(site), "--quiet"]) == 0
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "track-heart-disease.html"]
    page = (site / "track-heart-disease.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    tables = re.findall(r'<table class="sortable lb" id="([^"]+)"><thead><tr>(.*?)</tr>'
                        r'</thead><tbody>(.*?)</tbody>', page, re.S)
    assert tables
    for _tid, head, body in tables:
        headers = [html.unescape(h) for h in re.findall(r"<th[^>]*>(.*?)</th>", head)]
        for want in ("ε server (δ)", "MIA TPR@0.1% FPR", "submission"):
            assert want in headers, headers
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body):
            cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            assert cells[headers.index("submission")].startswith("S1 ")
            assert "unprot." in cells[headers.index("MIA TPR@0.1% FPR")]
    assert 'id="submissions"' in page and "Test &lt;t@example.org&gt;" in page
    digest = json.loads((baseline / MANIFEST).read_text())["digest"]
    assert digest[:16] in page


# --------------------------------------------------------------------------
# the held-out package from its wheel, rerun by the CI template (slow)
# --------------------------------------------------------------------------


def _wheel(src: Path, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dest), str(src)], check=True, capture_output=True)
    (whl,) = dest.glob("*.whl")
    return whl


def _ci_command() -> list[str]:
    """The rerun command of tox's ``rerun`` env, which the workflow template runs."""
    flow = (ROOT / ".github/workflows/rerun-submission.yml").read_text()
    assert 'tox -e rerun -- "$f"' in flow
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "tox.ini")
    cmd = cfg["testenv:rerun"]["commands"].strip()
    assert cmd.startswith("fedmedbench verify {posargs} --rerun --install"), cmd
    return cmd.split()


@pytest.mark.slow
def test_the_example_plugin_from_its_wheel_reruns_identically_in_a_fresh_environment(
        baseline: Path, tmp_path: Path) -> None:
    whl = _wheel(ROOT / "examples/fedmedbench-fedavgm", tmp_path / "dist")
    sub = tmp_path / "fedavgm"
    assert main(["submit", "heart-disease", str(whl), "--out", str(sub), "--tier", "all"]) == 0
    doc = json.loads((sub / MANIFEST).read_text())
    assert doc["package"]["name"] == "fedmedbench-fedavgm"
    assert doc["package"]["sha256"] == sha256_path(whl)
    assert "fedavgm_plugin.py" in doc["package"]["files"]
    assert "fresh virtual environment" in doc["environment"]["isolation"]
    assert [c["name"] for c in doc["components"]] == ["fedavgm"]
    n = sum(k.startswith("records/") for k in doc["files"])
    assert n == 2 * 3  # fedavgm under none and secagg, 3 seeds
    # the CI template: tox's rerun env in a fresh environment (here one over this
    # environment's packages: no network needed for torch)
    py = fresh_env(tmp_path / "ci-env")
    cmd = _ci_command()
    report = tmp_path / "rerun.json"
    args = [a.replace("{posargs}", str(sub)).replace("{env_tmp_dir}/rerun.json", str(report))
            for a in cmd[1:]]
    proc = subprocess.run([str(py), "-m", "fedmedbench.cli", *args], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"rerun: {n} of {n} records identical" in proc.stdout
    res = json.loads(report.read_text())
    assert res["identical"] == n and not res["mismatched"]
    # the wheel went into the fresh environment, not this one
    from importlib import metadata

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("fedmedbench-fedavgm")
    # and the leaderboard merges it with the baselines
    site = tmp_path / "site"
    assert main(["leaderboard", str(baseline), str(sub), "--out", str(site), "--quiet"]) == 0
    page = html.unescape((site / "track-heart-disease.html").read_text())
    assert "S2 fedmedbench-fedavgm 0.1.0" in page and "fedavgm" in page


def _wrong_accountant_job(tmp_path: Path, spawn) -> dict:
    """The submission of the test below, ``fedmedbench submit`` in a process of
    its own (a background job, tests/conftest.py)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shutil.copy(ROOT / "tests/fmb_test_plugins.py", pkg)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = '
        '"setuptools.build_meta"\n[project]\nname = "fmb-test-plugins"\nversion = "0.0.1"\n'
        '[project.entry-points.fedmedbench]\nfmb-test = "fmb_test_plugins"\n'
        '[tool.setuptools]\npy-modules = ["fmb_test_plugins"]\n')
    sub = tmp_path / "sub"
    p = spawn([sys.executable, "-m", "fedmedbench.cli", "submit", "heart-disease", str(pkg),
               "--out", str(sub),
               "--entry", '{"algorithm": "fedavg", "privacy": '
                          '{"name": "test-dp-sgd-wrong-accountant"}}',
               "--entry", '{"algorithm": "fedavg", "protections": ["dp-sgd-1"]}'],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=900)
    return {"code": p.returncode, "output": (out + err).decode()[-4000:], "sub": sub}


@pytest.mark.slow
@pytest.mark.background(job=_wrong_accountant_job)
def test_a_row_whose_claim_the_audit_contradicts_is_flagged(tmp_path: Path, background) -> None:
    """The broken accountant of tests/fmb_test_plugins.py (records ε = 1 while
    its σ gives ε = 50), packaged and submitted like any plugin, beside the
    built-in DP-SGD at ε = 1: the audit flags the first row only."""
    assert background["code"] == 0, background["output"]
    sub = background["sub"]
    # the package's own attack ran sealed: in a separate process, on every entry
    doc = json.loads((sub / MANIFEST).read_text())
    assert doc["attacks_isolated"] is True
    assert {"family": "attack", "name": "test-value-attack"} in doc["components"]
    for r in verify(sub).records:
        assert r["metrics"]["attacks_isolated"] is True
        if "audit-dirac" not in r["metrics"]["attacks"]:
            assert "test-value-attack" in r["metrics"]["attacks"]
    site = tmp_path / "site"
    assert main(["leaderboard", str(sub), "--out", str(site), "--quiet"]) == 0
    page = (site / "track-heart-disease.html").read_text()
    tier = page.split("ε ≤ 1 against the server</h3>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr( class=\"flagged\")?>(.*?)</tr>", tier.split("<tbody>", 1)[1])
    flagged = {("wrong" in html.unescape(r)): bool(c) for c, r in rows}
    assert flagged == {True: True, False: False}, rows
    wrong = next(html.unescape(r) for c, r in rows if c)
    assert "CONTRADICTS THE CLAIM" in wrong and "1 (δ=1e-05)" in wrong
    right = next(html.unescape(r) for c, r in rows if not c)
    assert "within claim" in right
    assert '<p class="flag">⚠ 1 entry whose privacy claim an audit contradicts' in page


def test_a_rerun_on_another_machine_ignores_the_virtual_clock_but_not_the_numbers():
    """The virtual clock scales a step time measured on the machine that ran
    the cell (and says whether it was measured or cached): a rerun elsewhere
    must not count it as a mismatch, while a changed metric still is one."""
    from fedmedbench.submit import comparable, differences

    rec = {"status": "ok", "labels": {"algorithm": "fedavg"}, "error": None,
           "metrics": {"utility": {"global": 0.75},
                       "clock": {"reference_step_s": 1.5e-4, "reference_step": "measured",
                                 "total_s": 0.3},
                       "cost": {"bytes_up": 10, "wall_s": 1.0}},
           "history": [{"round": 1, "clock_s": 0.3, "utility": 0.7}]}
    other = json.loads(json.dumps(rec))
    other["metrics"]["clock"].update(reference_step_s=2.1e-4, reference_step="cached",
                                     total_s=0.42)
    other["history"][0]["clock_s"] = 0.42
    other["metrics"]["cost"]["wall_s"] = 3.0
    assert differences(comparable(rec), comparable(other)) == []
    other["metrics"]["utility"]["global"] = 0.76
    assert differences(comparable(rec), comparable(other)) == [
        "metrics.utility.global: submitted 0.75, rerun 0.76"]
