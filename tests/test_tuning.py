"""Hyperparameter selection inside the budget (issue 19.3): ``fedmedbench tune``
chooses on rows apart from the published cells' rows, and the published
record carries the protocol and the ε covering selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmedbench import run_cell
from fedmedbench.cli import main
from fedmedbench.federation import tuning_rows
from fedmedbench.registry import get_registry

MATRIX = """
name = "tune-test"
rounds = 2
seeds = [0]
[axes]
dataset = ["heart-disease"]
algorithm = ["fedavg"]
privacy = [{ name = "dp-sgd", epsilon = 3.0 }]
"""


def test_tuning_rows_and_the_rest_split_every_site_once():
    data = get_registry().build("dataset", {"name": "heart-disease"}).load(seed=0)
    tune = tuning_rows(data, {"role": "tune", "fraction": 0.2, "seed": 7})
    rest = tuning_rows(data, {"role": "rest", "fraction": 0.2, "seed": 7})
    again = tuning_rows(data, {"role": "tune", "fraction": 0.2, "seed": 7})
    for s, t, r, a in zip(data.sites, tune.sites, rest.sites, again.sites):
        assert len(t.train) + len(r.train) == len(s.train)
        assert len(t.train) == round(0.2 * len(s.train))
        rows = {tuple(x) for x in np.round(s.train.X, 6)}
        mine = [tuple(x) for x in np.round(t.train.X, 6)]
        others = {tuple(x) for x in np.round(r.train.X, 6)}
        assert set(mine) <= rows and not set(mine) & others  # disjoint, both of the site's
        np.testing.assert_array_equal(t.train.X, a.train.X)  # the same for every cell
        np.testing.assert_array_equal(t.test.X, s.test.X)  # the test split is untouched


def test_tune_chooses_on_tuning_rows_and_the_record_says_how(tmp_path: Path, capsys):
    mfile = tmp_path / "m.toml"
    mfile.write_text(MATRIX)
    out = tmp_path / "out"
    code = main(["tune", str(mfile), "--param", "lr=0.05,0.5", "--tune-seeds", "1001",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    log = json.loads((out / "tuning" / "log.json").read_text())
    assert len(log["trials"]) == 2 and {t["seed"] for t in log["trials"]} == {1001}
    scores = {json.dumps(t["point"]): t["validation"] for t in log["trials"]}
    best = max(scores, key=scores.get)
    (rec,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    tuning = rec["config"]["tuning"]
    assert rec["status"] == "ok" and rec["config"]["seed"] == 0
    assert json.dumps(tuning["chosen"]) == best and rec["config"]["run"]["lr"] == \
        tuning["chosen"]["lr"]
    assert tuning["trials"] == 2 and tuning["epsilon_selection"] == 0.0
    assert "selection read none of its rows" in tuning["protocol"]
    assert "basic composition over 2 trials" in tuning["tuning_rows"]
    # a DP cell publishes no un-noised validation score
    assert "not_published" in rec["metrics"]["utility"].get("validation", {"not_published": 1})
    # the published cell trained on the rest: its training rows are the others
    _, outcome = run_cell({k: v for k, v in rec.items() if k in ("cell_id", "config")}
                          | {"labels": rec["labels"]}, keep_run=True)
    trained = sum(len(s.train) for s in outcome.federation.clients)
    full = sum(len(s.train) for s in outcome.data.sites)
    assert trained == full - sum(round(0.2 * len(s.train)) for s in outcome.data.sites)
    assert "chose {'lr'" in capsys.readouterr().out


def test_tune_refuses_the_matrix_seeds(tmp_path: Path, capsys):
    mfile = tmp_path / "m.toml"
    mfile.write_text(MATRIX)
    code = main(["tune", str(mfile), "--param", "lr=0.05", "--tune-seeds", "0",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "seeds [0] are both the matrix's and the tuning's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", str(mfile), "--param"])


def test_tune_groups_keep_their_own_run_tables(tmp_path: Path):
    """A matrix with several cell groups and a ``[run.<component>]`` table for
    one of them (privacy.toml's shape): each group is tuned with the tables
    that apply to it, and its published cells keep them."""
    mfile = tmp_path / "m.toml"
    mfile.write_text(MATRIX.replace('privacy = [{ name = "dp-sgd", epsilon = 3.0 }]',
                                    'privacy = ["none", { name = "dp-sgd", epsilon = 3.0 }]\n'
                                    'model = ["default"]')
                     .replace("rounds = 2", "rounds = 1")
                     + "[run.dp-sgd]\nlocal_steps = 3\n")
    out = tmp_path / "out"
    assert main(["tune", str(mfile), "--param", "lr=0.05,0.5", "--tune-seeds", "1001",
                 "--out", str(out), "--no-progress"]) == 0
    recs = {r["labels"]["privacy"]: r for r in (json.loads(p.read_text())
                                                for p in out.glob("*.json"))}
    assert set(recs) == {"none", "dp-sgd(epsilon=3.0)"}
    assert all(r["status"] == "ok" and "tuning" in r["config"] for r in recs.values())
    assert recs["dp-sgd(epsilon=3.0)"]["config"]["run"]["local_steps"] == 3
    assert recs["none"]["config"]["run"]["local_steps"] != 3
    log = json.loads((out / "tuning" / "log.json").read_text())
    assert len(log["choices"]) == 2 and len(log["trials"]) == 4
