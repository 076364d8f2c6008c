"""Bad input named before training, records that can be trusted, I/O errors
named, and the run lock (issue 13, "What was seen" 5, 7, 8, 9 and 11).

Every case reproduces what the 0.1 fault-injection review saw (a traceback, a
wrong exit code, a silently accepted value) and asserts the message now given.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pytest

from fedmedbench.cli import main, plugins_markdown
from fedmedbench.constraints import Range, rule_problems, rules_of, violations
from fedmedbench.errors import ConfigError, DataError, SchemaError
from fedmedbench.lock import LOCK_NAME, results_lock
from fedmedbench.matrix import parse_matrix
from fedmedbench.registry import get_registry
from fedmedbench.results import read_record, write_record

ROOT = Path(__file__).resolve().parent.parent

#: two cells that train in about a second each
TINY = """
rounds = 1
[axes]
dataset = [{ name = "synthetic-tabular", n_samples = 200, n_sites = 2 }]
algorithm = ["fedavg", "local"]
"""


def _matrix(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return f


def _run(matrix: Path, out: Path, *args: str) -> int:
    return main(["run", str(matrix), "--out", str(out), "--no-progress", "--no-report", *args])


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


# --------------------------------------------------------------------------
# 7. every numeric parameter and run setting finite and in range, before training
# --------------------------------------------------------------------------

BASE = """
rounds = 1
[axes]
dataset = [{ name = "synthetic-tabular", n_samples = 200, n_sites = 2 }]
"""


@pytest.mark.parametrize("body, fragment", [
    ('algorithm = ["fedavg"]\nprivacy = [{ name = "dp-sgd", epsilon = nan }]',
     "dp-sgd.epsilon = nan is not a number (NaN); allowed: epsilon is a finite number > 0 "
     "(or leave it out)"),
    ('algorithm = ["fedavg"]\nprivacy = [{ name = "dp-sgd", epsilon = inf }]',
     "dp-sgd.epsilon = inf is not finite; allowed: epsilon is a finite number > 0"),
    ('algorithm = ["fedavg"]\nprivacy = [{ name = "dp-fedavg", epsilon = -inf }]',
     "dp-fedavg.epsilon = -inf is not finite"),
    ('algorithm = [{ name = "fedprox", mu = nan }]',
     "fedprox.mu = nan is not a number (NaN); allowed: mu is a finite number >= 0"),
    ('algorithm = ["fedavg"]\naggregator = [{ name = "weighted-mean", scores = { a = nan } }]',
     "weighted-mean.scores = {'a': nan} holds a non-finite number at ['a']"),
    ('algorithm = ["fedavg"]\ncompressor = [{ name = "quantize", bits = 17 }]',
     "quantize.bits = 17 is out of range; allowed: bits is an integer in [1, 16]"),
])
def test_non_finite_and_out_of_range_parameters_exit_2(tmp_path, capsys, body, fragment):
    f = _matrix(tmp_path, BASE + body)
    assert _run(f, tmp_path / "r") == 2
    err = _err(capsys)
    assert fragment in err and str(f) in err, err
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("setting, value, fragment", [
    ("lr", "inf", "run.lr = inf is not finite; allowed: lr is a finite number > 0"),
    ("lr", "0.0", "run.lr = 0.0 is out of range; allowed: lr is a finite number > 0"),
    ("server_lr", "nan", "run.server_lr = nan is not a number (NaN)"),
    ("momentum", "-0.5", "run.momentum = -0.5 is out of range; allowed: momentum is a finite "
                         "number >= 0"),
    ("weight_decay", "-1.0", "run.weight_decay = -1.0 is out of range"),
    ("local_epochs", "inf", "run.local_epochs = inf is not finite"),
    ("local_epochs", "nan", "run.local_epochs = nan is not a number (NaN)"),
    ("batch_size", "0", "run.batch_size = 0 is out of range; allowed: batch_size is an integer "
                        ">= 1"),
    ("local_steps", "2.5", "run.local_steps = 2.5 has type float; expected int"),
])
def test_bad_run_settings_exit_2(tmp_path, capsys, setting, value, fragment):
    f = _matrix(tmp_path, BASE + f'algorithm = ["fedavg"]\n[run]\n{setting} = {value}\n')
    assert _run(f, tmp_path / "r") == 2
    assert fragment in _err(capsys)


def test_bad_run_setting_override_of_one_component_exit_2(tmp_path, capsys):
    f = _matrix(tmp_path, BASE + 'algorithm = ["fedavg"]\n[run.fedavg]\nlr = -inf\n')
    assert _run(f, tmp_path / "r") == 2
    assert "run.fedavg.lr = -inf is not finite" in _err(capsys)


@pytest.mark.parametrize("seeds, fragment", [
    ("[0, -1]", "seeds[1] = -1: out of range; seeds are integers in [0, 2**63)"),
    ("[18446744073709551616]", "seeds[0] = 18446744073709551616: out of range"),
    ("[9223372036854775808]", "seeds[0] = 9223372036854775808: out of range"),
    ('"0"', "seeds = '0' (a string, not a list)"),
])
def test_seeds_out_of_range_exit_2(tmp_path, capsys, seeds, fragment):
    f = _matrix(tmp_path, f"seeds = {seeds}\n" + BASE + 'algorithm = ["fedavg"]\n')
    assert _run(f, tmp_path / "r") == 2
    assert fragment in _err(capsys)


def test_largest_seed_is_accepted():
    m = parse_matrix({"rounds": 1, "seeds": [2**63 - 1],
                      "axes": {"dataset": ["synthetic-tabular"], "algorithm": ["fedavg"]}})
    assert m.cells[0]["config"]["seed"] == 2**63 - 1


@pytest.mark.parametrize("value, fragment", [
    ("1e12", "synthetic-tabular.n_samples = 1000000000000.0 has type float; expected int; "
             "allowed: n_samples is an integer in [4, 1000000]"),
    ("1000000000000", "synthetic-tabular.n_samples = 1000000000000 is out of range; allowed: "
                      "n_samples is an integer in [4, 1000000]"),
])
def test_generator_sizes_have_a_sane_upper_bound(tmp_path, capsys, value, fragment):
    f = _matrix(tmp_path, f"""
        rounds = 1
        [axes]
        dataset = [{{ name = "synthetic-tabular", n_samples = {value} }}]
        algorithm = ["fedavg"]
        """)
    assert _run(f, tmp_path / "r") == 2
    assert fragment in _err(capsys)


def test_every_constrained_builtin_parameter_refuses_its_violations():
    """The helper the conformance kit uses: values just outside each bound,
    NaN and infinity are all refused by validation, and every built-in's
    defaults satisfy its own constraints."""
    reg = get_registry()
    n = 0
    for info in reg.all():
        assert rule_problems(info.cls) == [], info.name
        for key, bad in violations(info.cls):
            with pytest.raises(ConfigError, match=rf"{info.name}\.{key} = "):
                reg.build(info.family, {"name": info.name, key: bad})
            n += 1
    assert n > 300  # most built-ins declare ranges


def test_plugin_table_shows_each_constraint_next_to_the_default():
    text = plugins_markdown(get_registry().all())
    assert "`mu=0.01` (>= 0)" in text
    assert "`bits=8` (integer in [1, 16])" in text
    assert "`epsilon=None` (> 0)" in text
    assert "`data_seed=0` (integer in [0, 2**63))" in text
    assert "parameters (defaults, allowed range)" in text


def test_constraint_declarations_are_checked():
    with pytest.raises(TypeError, match="at most one lower bound"):
        Range(ge=0, gt=0)
    with pytest.raises(TypeError, match="finite number"):
        Range(le=math.inf)
    with pytest.raises(TypeError, match="above upper bound"):
        Range(ge=2, le=1)
    assert str(Range(ge=0, lt=1)) == "in [0, 1)" and str(Range(gt=0)) == "> 0"
    assert str(Range(ge=0, allow_inf=True)) == ">= 0, inf allowed"


def test_constraint_rules_of_a_third_party_component():
    from fedmedbench import Algorithm

    class Custom(Algorithm):
        name = "fmb-test-custom"

        def __init__(self, *, rate: Annotated[float, Range(gt=0, allow_inf=True)] = 1.0,
                     count: int = 3, label: str = "x") -> None:
            self.rate, self.count, self.label = rate, count, label

    r = rules_of(Custom)
    assert r["rate"].problem(math.inf) is None  # allowed explicitly
    assert r["rate"].problem(math.nan) == "is not a number (NaN)"
    assert r["count"].problem(math.inf) == "has type float; expected int"
    assert r["count"].problem(2) is None and r["label"].problem(3).startswith("has type int")
    bad = violations(Custom)  # gt=0 and NaN; inf is allowed
    assert [k for k, _ in bad] == ["rate", "rate"] and bad[0][1] == 0.0 and math.isnan(bad[1][1])

    class Unresolvable(Algorithm):
        name = "fmb-test-unresolvable"

        def __init__(self, *, x: NotImportedAnywhere = 1.0) -> None:  # noqa: F821
            self.x = x

    probs = rule_problems(Unresolvable)
    assert probs and "cannot be resolved" in probs[0] and "NotImportedAnywhere" in probs[0]
    assert rules_of(Unresolvable)["x"].problem("a") == "has type str; expected a number"
    assert rules_of(Unresolvable)["x"].problem(math.nan) == "is not a number (NaN)"


def test_one_validation_path_for_matrices_and_direct_construction():
    """The annotations are the only check a constructor needs: building from a
    matrix and calling the class refuse the same values with the same message
    (a ParameterError, which is a ConfigError and a ValueError), ``Literal``
    choices included; a check the annotations cannot state (two parameters
    together) stays in the constructor."""
    from fedmedbench import Algorithm
    from fedmedbench.errors import ParameterError
    from fedmedbench.testing import kit_registry

    class Chooser(Algorithm):
        name = "fmb-test-chooser"

        def __init__(self, *, mode: Literal["fast", "exact"] = "fast",
                     lo: Annotated[float, Range(ge=0)] = 0.0,
                     hi: Annotated[float, Range(ge=0)] = 1.0) -> None:
            if lo > hi:
                raise ValueError(f"lo = {lo!r} must not exceed hi = {hi!r}")
            self.mode, self.lo, self.hi = mode, lo, hi

    class Sub(Chooser):  # inherits the checked constructor
        name = "fmb-test-chooser-sub"

    for make, fragment in [(lambda: Chooser(mode="slow"),
                            "fmb-test-chooser.mode = 'slow' is not one of the choices; allowed: "
                            "mode is one of 'fast', 'exact'"),
                           (lambda: Chooser(lo=-1.0), "fmb-test-chooser.lo = -1.0 is out of range"),
                           (lambda: Sub(hi=math.nan), "fmb-test-chooser-sub.hi = nan is not a "
                                                      "number (NaN)")]:
        with pytest.raises(ParameterError) as err:
            make()
        assert fragment in str(err.value) and isinstance(err.value, (ValueError, ConfigError))
    with pytest.raises(ValueError, match="must not exceed"):
        Chooser(lo=2.0, hi=1.0)
    assert Chooser(mode="exact").params() == {"mode": "exact", "lo": 0.0, "hi": 1.0}
    r = rules_of(Chooser)["mode"]
    assert r.choices == ("fast", "exact") and r.kind == "str"
    assert ("mode", "<not one of the choices>") in violations(Chooser)

    class Plug:
        from fedmedbench import hookimpl

        @hookimpl
        def register_algorithms(self, register):
            register(Chooser)

    reg = kit_registry(extra=[Plug()])
    with pytest.raises(ConfigError, match=r"fmb-test-chooser\.mode = 'slow' is not one of"):
        reg.build("algorithm", {"name": "fmb-test-chooser", "mode": "slow"})
    assert "`mode='fast'` (one of fast, exact)" in plugins_markdown(reg.all())


# --------------------------------------------------------------------------
# 7. --select, 0-cell matrices, a string where a list is expected
# --------------------------------------------------------------------------


def test_select_with_an_unknown_name_is_an_error(tmp_path, capsys):
    f = _matrix(tmp_path, TINY)
    assert main(["run", str(f), "--dry-run", "--select", "algorithm=fedavg,fedavgg"]) == 2
    err = _err(capsys)
    assert "--select 'algorithm=fedavg,fedavgg': axis algorithm has no 'fedavgg'; did you " \
           "mean 'fedavg'?" in err and "['fedavg', 'local']" in err
    assert main(["run", str(f), "--dry-run", "--select", "seed=0,7"]) == 2
    assert "the matrix has no seed 7; its seeds are [0]" in _err(capsys)
    assert main(["run", str(f), "--dry-run", "--select", "algoritm=fedavg"]) == 2
    assert "unknown axis 'algoritm'; did you mean 'algorithm'?" in _err(capsys)
    assert main(["run", str(f), "--dry-run", "--select", "algorithm=fedavg"]) == 0


def test_a_matrix_that_selects_no_cells_is_an_error(tmp_path, capsys):
    f = _matrix(tmp_path, TINY + '[[exclude]]\ndataset = "synthetic-tabular"\n')
    assert _run(f, tmp_path / "r") == 2
    err = _err(capsys)
    assert "the matrix selects no cells (every cell is removed by 1 [[exclude]] table(s))" in err
    f2 = _matrix(tmp_path, TINY + '[[exclude]]\nalgorithm = "local"\n', "m2.toml")
    assert main(["run", str(f2), "--dry-run", "--select", "algorithm=local"]) == 2
    assert "[[exclude]] table(s) and --select algorithm=local" in _err(capsys)


@pytest.mark.parametrize("body, fragment", [
    ('algorithm = ["fedavg"]\n[evaluate]\nattacks = "mia-loss"',
     'evaluate.attacks = "mia-loss" is a string, but attacks is a list: write attacks = '
     '["mia-loss"]'),
    ('algorithm = "fedavg"',
     'axes.algorithm = "fedavg" is a string, but an axis is a list: write algorithm = '
     '["fedavg"]'),
])
def test_a_string_where_a_list_is_expected_is_named(tmp_path, capsys, body, fragment):
    f = _matrix(tmp_path, BASE + body)
    assert _run(f, tmp_path / "r") == 2
    err = _err(capsys)
    assert fragment in err and "no attack 'm'" not in err


# --------------------------------------------------------------------------
# 7. dataset files present and intact at validation (Dataset.check_files)
# --------------------------------------------------------------------------


@pytest.fixture
def datasets_copy(tmp_path, monkeypatch):
    d = tmp_path / "datasets"
    shutil.copytree(ROOT / "datasets", d)
    monkeypatch.setenv("FEDMEDBENCH_DATASETS_DIR", str(d))
    return d


HEART = """
rounds = 1
[axes]
dataset = ["heart-disease"]
algorithm = ["fedavg"]
"""


def test_corrupt_shipped_file_is_found_before_training(tmp_path, capsys, datasets_copy):
    f = _matrix(tmp_path, HEART)
    csv = datasets_copy / "heart-disease" / "heart_disease_uci.csv"
    with csv.open("a") as fh:
        fh.write("1,2,3\n")
    assert _run(f, tmp_path / "r") == 2
    err = _err(capsys)
    assert f"axes.dataset[0]: {csv} is corrupt: sha256" in err and "restore the file" in err
    csv.unlink()
    assert _run(f, tmp_path / "r") == 2
    assert f"shipped data file {csv} is missing" in _err(capsys)
    assert not (tmp_path / "r").exists()


def test_missing_user_file_is_named_before_training(tmp_path, capsys):
    f = _matrix(tmp_path, f"""
        rounds = 1
        [axes]
        dataset = [{{ name = "medmnist", path = "{tmp_path / 'nope.npz'}" }}]
        algorithm = ["fedavg"]
        """)
    assert _run(f, tmp_path / "r") == 2
    assert f"medmnist: {tmp_path / 'nope.npz'} does not exist" in _err(capsys)


def test_negative_medmnist_labels_name_the_file(tmp_path, capsys):
    from fedmedbench.plugins.datasets.medmnist import MedMNIST

    p = tmp_path / "pneumoniamnist.npz"
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in (("train", 40), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (k, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 2).astype(np.int8)[:, None]
    arrays["test_labels"][3] = -1
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=r"test_labels holds negative labels \(min -1\)") as e:
        MedMNIST(path=str(p)).load(seed=0)
    assert str(p) in str(e.value)
    f = _matrix(tmp_path, f"""
        rounds = 1
        [axes]
        dataset = [{{ name = "medmnist", path = "{p}" }}]
        algorithm = ["fedavg"]
        """)
    assert _run(f, tmp_path / "r") == 2
    assert f"{p}: test_labels holds negative labels" in _err(capsys)


def _eicu_folder(folder: Path) -> None:
    """The three eICU tables with their required columns, a few rows each."""
    import gzip

    from fedmedbench.plugins.datasets.eicu import TABLES

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for table, cols in TABLES.items():
        rows = [",".join(cols)]
        for i in range(2000):
            vals = [str(i) if c == "patientunitstayid" else f"{rng.normal():.6f}" for c in cols]
            rows.append(",".join(vals))
        with gzip.open(folder / f"{table}.csv.gz", "wt") as fh:
            fh.write("\n".join(rows) + "\n")


def test_truncated_eicu_file_is_named(tmp_path, capsys):
    from fedmedbench.plugins.datasets.eicu import EICU

    folder = tmp_path / "eicu"
    _eicu_folder(folder)
    gz = folder / "apacheApsVar.csv.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated") as e:
        EICU(path=str(folder)).load(seed=0)
    assert str(gz) in str(e.value) and "EOFError" in str(e.value)
    f = _matrix(tmp_path, f"""
        rounds = 1
        [axes]
        dataset = [{{ name = "eicu", path = "{folder}" }}]
        algorithm = ["fedavg"]
        """)
    assert _run(f, tmp_path / "r") == 2
    err = _err(capsys)
    assert f"{gz} is truncated" in err and "EOFError" in err and "download it again" in err


# --------------------------------------------------------------------------
# 8. I/O errors named
# --------------------------------------------------------------------------


def test_non_utf8_matrix_is_a_config_error(tmp_path, capsys):
    f = tmp_path / "latin1.toml"
    f.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    assert _run(f, tmp_path / "r") == 2
    err = _err(capsys)
    assert f"matrix file {f} is not UTF-8 text (byte 0xe9 at offset 11" in err
    assert "save it as UTF-8" in err and "Traceback" not in err


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = _matrix(tmp_path, TINY)
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    for out in (afile, afile / "sub"):
        assert _run(f, out) == 2
        err = _err(capsys)
        assert f"{out} is a file, or lies under a file, so it cannot be a folder; pass --out " \
               f"DIR" in err and "Traceback" not in err
    assert main(["report", str(tmp_path), "--out", str(afile), "--quiet"]) == 2


@pytest.mark.parametrize("code, fragment", [
    (errno.EROFS, "is on a read-only file system; pass --out DIR on a writable disk"),
    (errno.EACCES, "no permission to write in"),
    (errno.ENOSPC, "no space left on the device holding"),
])
def test_unwritable_output_is_found_before_training(tmp_path, capsys, monkeypatch, code,
                                                    fragment):
    import fedmedbench.executors as executors
    import fedmedbench.fileio as fileio

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))

    trained = []
    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(executors, "run_cell", lambda *a, **k: trained.append(1))
    f = _matrix(tmp_path, TINY)
    assert _run(f, tmp_path / "r") == 2
    err = _err(capsys)
    assert f"{tmp_path / 'r'}" in err and fragment in err and "Traceback" not in err
    assert trained == []


@pytest.mark.parametrize("executor", ["local", pytest.param("process", marks=pytest.mark.slow)])
def test_disk_full_while_running_is_one_line(tmp_path, capsys, monkeypatch, executor):
    import fedmedbench.results as results

    def full(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "write_atomic", full)
    f = _matrix(tmp_path, TINY)
    assert _run(f, tmp_path / "r", "--executor", executor, "--select", "algorithm=fedavg") == 1
    err = _err(capsys)
    assert f"fedmedbench: error: no space left on the device holding {tmp_path / 'r'}" in err
    assert "run again (finished cells are kept)" in err and "Traceback" not in err
    assert not list((tmp_path / "r").glob(".*.tmp"))


def _plugin_module(tmp_path: Path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_fedmedbench_plugins_errors_are_config_errors(tmp_path, capsys, monkeypatch):
    _plugin_module(tmp_path, monkeypatch, "fmb_raises_at_import",
                   "x = 1\nraise RuntimeError('broken at import')\n")
    _plugin_module(tmp_path, monkeypatch, "fmb_fine", "x = 1\n")
    cases = [
        ("fmb_fine,fmb_fine", "lists 'fmb_fine' more than once; list each module once"),
        ("fedmedbench.plugins.algorithms", "FEDMEDBENCH_PLUGINS names "
         "'fedmedbench.plugins.algorithms', which is already registered as plugin 'algorithms'"),
        ("fmb_raises_at_import", "FEDMEDBENCH_PLUGINS names 'fmb_raises_at_import', which raised "
         f"RuntimeError while importing at {tmp_path / 'fmb_raises_at_import.py'}:2: broken at "
         "import"),
    ]
    for env, fragment in cases:
        monkeypatch.setenv("FEDMEDBENCH_PLUGINS", env)
        assert main(["plugins"]) == 2
        err = _err(capsys)
        assert fragment in err and "Traceback" not in err, err
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_fine")
    assert main(["plugins"]) == 0


# --------------------------------------------------------------------------
# 5. records: bounded, typed, recomputed and kept aside, trusted only when they hash right
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tiny")
    f = _matrix(base, TINY)
    assert _run(f, base / "whole") == 0
    return f, base / "whole"


@pytest.fixture
def results(tiny_results, tmp_path) -> tuple[Path, Path, Path]:
    """``(matrix, results dir, fedavg's record)`` in a fresh copy."""
    f, whole = tiny_results
    d = tmp_path / "res"
    shutil.copytree(whole, d)
    fedavg = next(p for p in sorted(d.glob("*.json"))
                  if json.loads(p.read_text())["labels"]["algorithm"] == "fedavg")
    return f, d, fedavg


def _edit(path: Path, change) -> dict:
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))
    return rec


def test_deeply_nested_record_blocks_nothing(results, tmp_path, capsys):
    f, d, bad = results
    deep = "[" * 100_000 + "]" * 100_000
    bad.write_text(deep)
    assert main(["report", str(d), "--quiet"]) == 2
    err = _err(capsys)
    assert f"{bad}: not a result record (JSON nested too deeply to read)" in err
    assert main(["report", str(d), "--skip-invalid", "--out", str(tmp_path / "o"),
                 "--format", "markdown"]) == 0
    assert f"skipped: {bad}" in _err(capsys)
    assert _run(f, d) == 0  # resume is not blocked: the cell runs again
    err = _err(capsys)
    assert f"not resuming from {bad}: not a result record" in err
    kept = bad.with_name(bad.name + ".invalid-1")
    assert kept.read_text() == deep  # kept aside, not deleted
    assert read_record(bad)["status"] == "ok"


@pytest.mark.parametrize("change, fragment", [
    (lambda r: r["history"][0].update(round="a"),
     "history[0].round has the wrong type: 'a', expected an integer"),
    (lambda r: r["config"].update(seed="zero"),
     "config.seed has the wrong type: 'zero', expected an integer"),
    (lambda r: r["metrics"].update(attacks=[1]),
     "metrics.attacks has the wrong type: [1], expected an object"),
    (lambda r: r["metrics"]["utility"].update({"global": "0.9"}),
     "metrics.utility.global has the wrong type: '0.9', expected a number"),
    (lambda r: r.update(labels={"algorithm": 3}),
     "labels.algorithm has the wrong type: 3, expected a string"),
    (lambda r: r.update(error={"message": ["x"]}),
     "error.message has the wrong type: ['x'], expected a string"),
])
def test_mistyped_record_is_named_skipped_and_recomputed(results, tmp_path, capsys, change,
                                                         fragment):
    f, d, bad = results
    _edit(bad, change)
    assert main(["report", str(d), "--quiet"]) == 2
    err = _err(capsys)
    assert f"{bad}: malformed record ({fragment})" in err and "--skip-invalid" in err
    assert main(["report", str(d), "--skip-invalid", "--out", str(tmp_path / "o"),
                 "--format", "markdown,csv"]) == 0
    assert "skipped 1 invalid record file(s) of 2 read" in _err(capsys)
    assert main(["run", str(f), "--out", str(d), "--no-progress"]) == 0  # with the summary
    assert read_record(bad)["status"] == "ok"
    assert (d / f"{bad.name}.invalid-1").is_file()


def test_edited_config_is_not_trusted_for_resume(results, capsys):
    f, d, bad = results
    other = next(p for p in d.glob("*.json") if p != bad)
    before = other.read_bytes()
    _edit(bad, lambda r: r["config"]["run"].update(lr=99.0))
    assert _run(f, d) == 0
    err = _err(capsys)
    assert f"not resuming from {bad}: its config hashes to" in err
    assert read_record(bad)["config"]["run"]["lr"] != 99.0  # recomputed
    kept = json.loads((d / f"{bad.name}.invalid-1").read_text())
    assert kept["config"]["run"]["lr"] == 99.0
    assert other.read_bytes() == before  # the trusted record was not recomputed


def test_record_under_another_name_is_not_trusted(results, capsys):
    f, d, bad = results
    renamed = d / "0123456789abcdef.json"
    shutil.copy(bad, renamed)
    assert _run(f, d) == 0
    err = _err(capsys)
    assert f"not resuming from {renamed}: its cell_id '{bad.stem}' is not its file name" in err


def test_record_size_and_depth_are_bounded(results, monkeypatch):
    import fedmedbench.results as res

    _, d, bad = results
    deep: dict = {}
    cur = deep
    for _ in range(80):
        cur["x"] = {}
        cur = cur["x"]
    _edit(bad, lambda r: r.update(provenance=deep))
    with pytest.raises(SchemaError, match=r"nested deeper than 64 levels at provenance\.x\.x"):
        read_record(bad)
    monkeypatch.setattr(res, "MAX_RECORD_BYTES", 100)
    with pytest.raises(SchemaError, match="larger than any result record"):
        read_record(bad)


def test_other_schema_is_skipped_by_run_with_skip_invalid(results, capsys):
    f, d, bad = results
    _edit(bad, lambda r: r.update(schema="fedmedbench.result/0"))
    assert _run(f, d) == 2
    err = _err(capsys)
    assert "record schema is 'fedmedbench.result/0'" in err and "--skip-invalid" in err
    assert _run(f, d, "--skip-invalid") == 0
    assert read_record(bad)["schema"] != "fedmedbench.result/0"
    assert json.loads((d / f"{bad.name}.invalid-1").read_text())["schema"] == \
        "fedmedbench.result/0"
    # --force, the upgrade path the refusal names, rewrites it too, keeping the old file
    _edit(bad, lambda r: r.update(schema="fedmedbench.result/0"))
    assert _run(f, d, "--force", "--select", "algorithm=fedavg") == 0
    assert read_record(bad)["schema"] != "fedmedbench.result/0"
    assert (d / f"{bad.name}.invalid-2").is_file()


def test_stale_temp_files_are_removed_by_the_next_run(results):
    f, d, bad = results
    stale = d / f".{bad.stem}.k2j3h4.tmp"
    stale.write_text('{"half": ')
    old = time.time() - 3600
    os.utime(stale, (old, old))
    live = d / f".{bad.stem}.live.tmp"  # a writer's file from after the lock was taken
    live.write_text("")
    future = time.time() + 3600
    os.utime(live, (future, future))
    assert _run(f, d) == 0
    assert not stale.exists() and live.exists()


def test_records_follow_the_umask(tmp_path):
    rec = {"schema": "x", "cell_id": "abc", "status": "ok", "config": {}, "metrics": {}}
    old = os.umask(0o022)
    try:
        p = write_record(tmp_path / "a", rec)
        assert p.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        p = write_record(tmp_path / "b", rec)
        assert p.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert [x.name for x in (tmp_path / "a").iterdir()] == ["abc.json"]


def test_cache_write_leaves_no_temp_file_when_the_disk_is_full(tmp_path, monkeypatch):
    import fedmedbench.datafiles as datafiles

    monkeypatch.setenv("FEDMEDBENCH_CACHE_DIR", str(tmp_path / "cache"))

    def full(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datafiles.np, "savez", full)
    out = datafiles.cached_arrays(["k"], lambda: {"a": np.arange(3)})
    assert out["a"].tolist() == [0, 1, 2]
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("FEDMEDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "tmpab12.npz.tmp"  # what 0.1 left behind
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    old = os.umask(0o022)
    try:
        datafiles.cached_arrays(["k"], lambda: {"a": np.arange(3)})
    finally:
        os.umask(old)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    assert files[0].stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------
# 9. the run lock
# --------------------------------------------------------------------------


def test_second_run_on_the_same_folder_refuses_naming_the_other(tmp_path, capsys):
    f = _matrix(tmp_path, TINY)
    out = tmp_path / "r"
    out.mkdir()
    with results_lock(out):
        assert _run(f, out) == 2
    err = _err(capsys)
    assert f"{out} is in use by another fedmedbench run (pid {os.getpid()}" in err
    assert "pass --wait to queue behind it" in err
    assert not list(out.glob("*.json"))  # no cell was computed twice


def test_wait_queues_until_the_lock_is_free(tmp_path, capsys):
    f = _matrix(tmp_path, TINY)
    out = tmp_path / "r"
    out.mkdir()
    held = results_lock(out)
    held.__enter__()
    timer = threading.Timer(1.0, lambda: held.__exit__(None, None, None))
    timer.start()
    try:
        assert _run(f, out, "--wait", "--select", "algorithm=fedavg") == 0
    finally:
        timer.join()
    err = _err(capsys)
    assert f"{out} is in use by pid {os.getpid()}" in err and "waiting for it to finish" in err
    assert len(list(out.glob("*.json"))) == 1


def test_lock_dies_with_its_holder(tmp_path, capsys):
    f = _matrix(tmp_path, TINY)
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, json, os, sys, time
            fd = os.open({str(out / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({{"pid": os.getpid(), "started": "then",
                                     "command": "fedmedbench run other.toml"}}).encode())
            print("held", flush=True)
            time.sleep(60)
            """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _run(f, out, "--select", "algorithm=fedavg") == 2
        err = _err(capsys)
        assert f"(pid {holder.pid}, started then: `fedmedbench run other.toml`)" in err
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
        assert _run(f, out, "--select", "algorithm=fedavg") == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    info = json.loads((out / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and "command" in info and "started" in info


# --------------------------------------------------------------------------
# 11. the README tells where secagg's randomness comes from
# --------------------------------------------------------------------------


def test_readme_says_secagg_masks_come_from_os_randomness():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "noise and masks all derive from the cell seed" not in readme
    assert "secagg's keys, self-mask seeds and Shamir coefficients come from the operating " \
           "system's randomness" in readme
