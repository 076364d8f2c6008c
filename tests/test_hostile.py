"""Issue 23: the surfaces 0.2 added, under attack.

One test per case of the issue. Each asserts the exit code and the message
(a named one-line error with exit 2 for configuration, a recorded failed
cell with its cause at run time, or correct behaviour), and that nothing of
the user's outside the results folder is touched. Every case that could hang
runs in a subprocess with a timeout. Cases that start dask clusters or
several command-line runs are marked ``slow``.

Plugins: ``tests/fmb_hostile_plugins.py`` (what a plugin author or an
attacker might write) and ``tests/fmb_executor_plugins.py`` (faults).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import fedmedbench
from fedmedbench import results as results_mod
from fedmedbench.cli import main
from fedmedbench.errors import ConfigError, DataError

TESTS = Path(__file__).parent
ROOT = TESTS.parent
ESC = "\x1b"

TINY = """
name = "tiny"
rounds = 1
seeds = [0, 1]
[axes]
dataset = [{ name = "synthetic-tabular", n_samples = 200 }]
algorithm = ["fedavg"]
"""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (``os.environ`` by default) with the tests' folder on
    PYTHONPATH and ``extra`` set."""
    base = dict(os.environ) if base is None else base
    env = {**base, "PYTHONPATH": os.pathsep.join(
        [str(TESTS), *filter(None, [base.get("PYTHONPATH")])])}
    env.update(extra)
    return env


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``fedmedbench ARGS`` in a subprocess, bounded by ``timeout`` seconds."""
    return subprocess.run([sys.executable, "-m", "fedmedbench.cli", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=env or _env(), cwd=cwd)


def one_error(err: str) -> str:
    """The ``fedmedbench: error: ...`` line of ``err``; no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("fedmedbench: error:")]
    assert lines, err
    return lines[0]


def run_in(tmp: Path, text: str, *args: str, out: Path | None = None) -> int:
    m = tmp / "matrix.toml"
    m.write_text(textwrap.dedent(text))
    return main(["run", str(m), "--out", str(out or tmp / "results"), "--no-progress", *args])


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder of the tiny matrix (2 ok cells), made once; tests copy it."""
    d = tmp_path_factory.mktemp("tiny")
    assert run_in(d, TINY, "--no-report") == 0
    return d / "results"


@pytest.fixture
def results(tiny_results: Path, tmp_path: Path) -> Path:
    out = tmp_path / "res"
    shutil.copytree(tiny_results, out)
    return out


def records_in(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.json") if not p.name.startswith("."))


def edit_record(path: Path, fn) -> dict:
    rec = json.loads(path.read_text())
    fn(rec)
    path.write_text(json.dumps(rec))
    return rec


def rehash(rec: dict, folder: Path, old: Path | None = None) -> Path:
    """Give ``rec`` the cell id of its (edited) config and write it under that name."""
    from fedmedbench.matrix import cell_id

    rec["cell_id"] = cell_id(rec["config"])
    if old is not None:
        old.unlink()
    p = folder / f"{rec['cell_id']}.json"
    p.write_text(json.dumps(rec))
    return p


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_hostile_plugins")
    monkeypatch.syspath_prepend(str(TESTS))


# --------------------------------------------------------------------------
# files of the user's: never followed, never exhausting the machine
# --------------------------------------------------------------------------


def test_run_lock_symlink_is_refused_and_its_target_untouched(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / ".fedmedbench.lock").symlink_to(victim)
    assert run_in(tmp_path, TINY, "--no-report", out=out) == 2
    msg = one_error(capsys.readouterr().err)
    assert ".fedmedbench.lock" in msg and "symbolic link" in msg
    assert victim.read_text() == "precious\n"
    assert records_in(out) == []


def test_links_in_the_results_folder_are_never_followed(results, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    rec = records_in(results)[0]
    rec.unlink()
    rec.symlink_to(victim)  # a record file that is a link: kept aside, not followed
    assert run_in(tmp_path, TINY, "--no-report", out=results) == 0
    assert victim.read_text() == "precious\n"
    assert (results / f"{rec.name}.invalid-1").is_symlink()
    assert results_mod.read_record(rec)["status"] == "ok"
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (results / "artifacts").symlink_to(elsewhere, target_is_directory=True)
    assert run_in(tmp_path, TINY, "--no-report", "--force", out=results) == 2
    assert "artifacts" in one_error(capsys.readouterr().err)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("target", ["index.html", "report.md", "tables"])
def test_report_files_through_symlinks_are_refused(results, tmp_path, capsys, target):
    rep = tmp_path / "rep"
    rep.mkdir()
    if target == "tables":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (rep / "tables").symlink_to(elsewhere, target_is_directory=True)
    else:
        victim = tmp_path / "victim.txt"
        victim.write_text("precious\n")
        (rep / target).symlink_to(victim)
    assert main(["report", str(results), "--out", str(rep), "--quiet"]) == 2
    msg = one_error(capsys.readouterr().err)
    assert target in msg and "symbolic link" in msg
    if target == "tables":
        assert list(elsewhere.iterdir()) == []
    else:
        assert victim.read_text() == "precious\n"


def test_run_report_figures_symlink_is_refused(tmp_path, capsys):
    out = tmp_path / "results"
    (out / "report").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "report" / "figures").symlink_to(elsewhere, target_is_directory=True)
    assert run_in(tmp_path, TINY, out=out) == 2
    msg = one_error(capsys.readouterr().err)
    assert "figures" in msg and "symbolic link" in msg
    assert list(elsewhere.iterdir()) == []
    assert len(records_in(out)) == 2  # the cells are saved; only the report was refused


def _png(width: int, height: int, pixels: bytes | None = None) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    raw = pixels if pixels is not None else b"".join(b"\x00" + bytes(width)
                                                     for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_huge_png_named_by_a_record_is_refused_before_decoding(results, tmp_path,
                                                               monkeypatch):
    from matplotlib import image as mimage

    # a 14000 x 14000 image that compresses to a few hundred kB: never decoded
    (results / "bomb.png").write_bytes(_png(14000, 14000, pixels=b""))
    (results / "small.png").write_bytes(_png(8, 8))
    paths = records_in(results)
    edit_record(paths[0], lambda r: r["metrics"]["attacks"].update(
        {"gradinv-x": {"psnr": 10.0, "images": "bomb.png"}}))
    edit_record(paths[1], lambda r: r["metrics"]["attacks"].update(
        {"gradinv-x": {"psnr": 11.0, "images": "small.png"}}))
    decoded = []
    real = mimage.imread
    monkeypatch.setattr(mimage, "imread", lambda f, *a, **k: (decoded.append(Path(f).name),
                                                                real(f, *a, **k))[1])
    from fedmedbench.report import MAX_IMAGE_PIXELS, record_image

    assert MAX_IMAGE_PIXELS < 14000 * 14000
    assert record_image({"cell_id": "x", "_dirs": [str(results)]}, "bomb.png") is None
    assert record_image({"cell_id": "x", "_dirs": [str(results)]}, "small.png") is not None
    assert main(["report", str(results), "--out", str(tmp_path / "rep"), "--quiet",
                 "--format", "figures"]) == 0
    assert "bomb.png" not in decoded and "small.png" in decoded


@pytest.mark.parametrize("command", ["run", "report"])
def test_a_fifo_record_never_hangs(tmp_path, command):
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(TINY))
    out = tmp_path / "results"
    out.mkdir()
    dry = cli("run", str(m), "--out", str(out), "--dry-run")
    ids = [line.split()[0] for line in dry.stdout.splitlines()]
    assert len(ids) == 2
    os.mkfifo(out / f"{ids[0]}.json")  # the record path of a cell of the matrix
    if command == "run":
        p = cli("run", str(m), "--out", str(out), "--no-progress", "--no-report", timeout=120)
        assert p.returncode == 0, p.stderr
        assert "not a regular file" in p.stderr
        assert results_mod.read_record(out / f"{ids[0]}.json")["status"] == "ok"
    else:
        p = cli("report", str(out), timeout=60)
        assert p.returncode == 2
        assert "not a regular file" in one_error(p.stderr)
        p = cli("report", str(out), "--skip-invalid", timeout=60)
        assert p.returncode == 2 and "no result records" in one_error(p.stderr)


def test_a_5000_digit_integer_is_a_per_file_schema_error(results, tmp_path, capsys):
    bad, good = records_in(results)
    text = bad.read_text().replace('"rounds": 1', '"rounds": 1' + "0" * 5000)
    bad.write_text(text)
    assert main(["report", str(results)]) == 2
    msg = one_error(capsys.readouterr().err)
    assert bad.name in msg and "digits" in msg
    assert main(["report", str(results), "--skip-invalid", "--quiet"]) == 0
    assert f"skipped: {bad}" in capsys.readouterr().err
    # `run` recomputes that cell, keeping the bad file aside
    assert run_in(tmp_path, TINY, "--no-report", "--skip-invalid", out=results) == 0
    assert results_mod.read_record(bad)["status"] == "ok"
    assert (results / f"{bad.name}.invalid-1").exists()


def test_huge_integers_in_a_matrix_are_a_config_error(tmp_path, capsys):
    big = "1" + "0" * 400
    text = TINY.replace('algorithm = ["fedavg"]',
                        f'algorithm = [{{ name = "fedprox", mu = {big} }}]')
    assert run_in(tmp_path, text, "--no-report") == 2
    msg = one_error(capsys.readouterr().err)
    assert "fedprox.mu" in msg and "too large" in msg
    assert run_in(tmp_path, TINY + f"\n[run]\nlr = {big}\n", "--no-report") == 2
    msg = one_error(capsys.readouterr().err)
    assert "run.lr" in msg and "too large" in msg
    huge = "9" * 5000  # over Python's int-string limit: refused before conversion
    (tmp_path / "h.toml").write_text(TINY + f"\n[run]\nlr = {huge}\n")
    assert main(["run", str(tmp_path / "h.toml"), "--dry-run"]) == 2
    assert "digits" in one_error(capsys.readouterr().err)


def test_deeply_nested_toml_is_a_config_error(tmp_path, capsys):
    (tmp_path / "deep.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["run", str(tmp_path / "deep.toml"), "--dry-run"]) == 2
    msg = one_error(capsys.readouterr().err)
    assert "deep.toml" in msg and "nested too deeply" in msg


@pytest.mark.parametrize("where", ["matrix", "out", "report", "report-out"])
def test_a_100000_character_path_is_a_config_error(tmp_path, capsys, where, results):
    long = str(tmp_path / ("x" * 100_000))
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(TINY))
    args = {"matrix": ["run", long, "--no-progress"],
            "out": ["run", str(m), "--out", long, "--no-progress"],
            "report": ["report", long],
            "report-out": ["report", str(results), "--out", long, "--quiet"]}[where]
    assert main(args) == 2
    msg = one_error(capsys.readouterr().err)
    assert "too long" in msg and len(msg) < 600


def test_non_finite_and_huge_numbers_in_a_record_are_schema_errors(results, capsys):
    bad = records_in(results)[0]
    bad.write_text(bad.read_text().replace('"bytes_up": ', '"bytes_up": 1e400, "x": ', 1))
    assert main(["report", str(results), "--quiet"]) == 2
    msg = one_error(capsys.readouterr().err)
    assert bad.name in msg and "1e400" in msg
    assert main(["report", str(results), "--quiet", "--skip-invalid"]) == 0


def test_a_lone_surrogate_in_a_label_is_written_escaped(results, tmp_path, capsys):
    p = records_in(results)[0]
    p.write_text(p.read_text().replace('"algorithm": "fedavg"', '"algorithm": "fed\\ud800avg"',
                                       1))
    rep = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "fed\\ud800avg" in out
    assert "fed\\ud800avg" in (rep / "tables" / "cells.csv").read_text(encoding="utf-8")


# --------------------------------------------------------------------------
# records: what `run` writes, `run` and `report` can read back
# --------------------------------------------------------------------------


def test_an_oversized_record_is_refused_at_write_naming_plugin_and_metric(
        hostile, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results_mod, "MAX_RECORD_BYTES", 200_000)
    text = TINY.replace("seeds = [0, 1]", "seeds = [0]") + """
    [evaluate]
    attacks = [{ name = "hostile-big-attack", n = 30000 }]
    """
    out = tmp_path / "results"
    for _ in range(3):  # reruns never pile up copies of the same record
        assert run_in(tmp_path, text, "--no-report", out=out) == 1
        err = capsys.readouterr().err
        assert "cells: 0 ok, 1 failed" in err
    (rec_path,) = records_in(out)
    rec = results_mod.read_record(rec_path)
    assert rec["status"] == "failed" and rec["error"]["type"] == "RecordTooLarge"
    msg = rec["error"]["message"]
    assert "metrics.attacks.hostile-big-attack.scores" in msg
    assert "fmb_hostile_plugins" in msg and rec["error"]["plugin"] == "fmb_hostile_plugins"
    assert list(out.glob("*.invalid-*")) == []


def test_an_old_oversized_record_is_kept_aside_once(results, tmp_path, monkeypatch, capsys):
    p = records_in(results)[0]
    big = p.read_text()[:-1] + ', "pad": "' + "x" * 300_000 + '"}'
    monkeypatch.setattr(results_mod, "MAX_RECORD_BYTES", 200_000)
    for _ in range(3):
        p.write_text(big)  # the same oversized file comes back each time
        assert run_in(tmp_path, TINY, "--no-report", out=results) == 0
    assert [x.name for x in results.glob("*.invalid-*")] == [f"{p.name}.invalid-1"]


def test_reading_a_small_record_does_not_allocate_the_size_limit(results):
    code = textwrap.dedent(f"""
        import resource, sys
        from fedmedbench.results import read_record, MAX_RECORD_BYTES
        assert MAX_RECORD_BYTES >= 64 * 2**20
        vm = next(int(x.split()[1]) for x in open("/proc/self/status")
                  if x.startswith("VmSize:")) * 1024
        # 32 MiB free: far less than the size limit, far more than a 4 kB record needs
        resource.setrlimit(resource.RLIMIT_AS, (vm + 32 * 2**20, resource.RLIM_INFINITY))
        for _ in range(50):
            read_record({str(records_in(results)[0])!r})
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=_env(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"))
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_report_applies_runs_record_validation(results, tmp_path, capsys):
    a, b = records_in(results)
    # a record whose cell_id names the other cell: it must not hide that cell
    edit_record(b, lambda r: r.update(cell_id=a.stem))
    assert main(["report", str(results), "--quiet"]) == 2
    msg = one_error(capsys.readouterr().err)
    assert b.name in msg and "is not its file name" in msg
    assert main(["report", str(results), "--quiet", "--skip-invalid"]) == 0
    capsys.readouterr()
    # ../../x never listed as a cell
    edit_record(b, lambda r: r.update(cell_id="../../x"))
    assert main(["report", str(results), "--skip-invalid", "--out", str(tmp_path / "rep")]) == 0
    assert "../../x" not in (tmp_path / "rep" / "tables" / "cells.csv").read_text()
    # a config edited after the run (the hash no longer matches)
    edit_record(b, lambda r: (r.update(cell_id=b.stem), r["config"].update(rounds=7)))
    assert main(["report", str(results), "--quiet"]) == 2
    assert "hashes to" in one_error(capsys.readouterr().err)


def test_report_refuses_records_of_different_versions_unless_asked(results, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    src = records_in(results)[0]
    rec = json.loads(src.read_text())
    rec["config"]["versions"]["fedmedbench"] = "0.2.0"
    rec["provenance"]["fedmedbench"] = "0.2.0"
    rec["config"]["seed"] = 5
    rehash(rec, other)
    assert main(["report", str(results), str(other), "--quiet"]) == 2
    msg = one_error(capsys.readouterr().err)
    assert "0.2.0" in msg and fedmedbench.__version__ in msg
    assert "--allow-mixed-versions" in msg and str(other) in msg
    assert main(["report", str(results), str(other), "--quiet", "--allow-mixed-versions"]) == 0


def test_relabelled_duplicates_do_not_inflate_n(results, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    rec = json.loads(records_in(results)[0].read_text())
    rec["config"]["run"]["lr"] = 0.01234  # another cell, labelled like the first
    rehash(rec, other)
    assert main(["report", str(results), str(other), "--quiet"]) == 2
    msg = one_error(capsys.readouterr().err)
    assert "same table entry" in msg and rec["cell_id"] in msg and "run.lr" in msg


# --------------------------------------------------------------------------
# shards of one matrix into one folder (tox p -m matrix)
# --------------------------------------------------------------------------


def test_tox_documents_parallel_shards_and_a_deterministic_report():
    text = (ROOT / "tox.ini").read_text()
    assert "tox p -m matrix" in text
    assert "--no-timings" in text.split("[testenv:report]")[1].split("\n[")[0]


@pytest.mark.slow
def test_parallel_shards_into_one_folder_equal_a_single_run(tmp_path):
    text = TINY.replace("seeds = [0, 1]", "seeds = [0, 1, 2, 3, 4, 5]").replace(
        'algorithm = ["fedavg"]', 'algorithm = ["fedavg", "local"]')
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(text))
    shards = tmp_path / "tox"
    procs = [subprocess.Popen([sys.executable, "-m", "fedmedbench.cli", "run", str(m),
                               "--shard", f"{i}/4", "--out", str(shards), "--no-progress",
                               "--no-report"], stderr=subprocess.PIPE, text=True, env=_env())
             for i in (1, 2, 3, 4)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0, 0, 0], [p.stderr.read() for p in procs]
    single = tmp_path / "single"
    assert main(["run", str(m), "--out", str(single), "--no-progress", "--no-report"]) == 0
    assert sorted(p.name for p in records_in(shards)) == sorted(
        p.name for p in records_in(single))
    assert len(records_in(single)) == 12
    for d in (shards, single):
        assert main(["report", str(d), "--out", f"{d}-report", "--no-timings", "--quiet"]) == 0
    a = {p.relative_to(f"{shards}-report"): p.read_bytes()
         for p in Path(f"{shards}-report").rglob("*") if p.is_file()}
    b = {p.relative_to(f"{single}-report"): p.read_bytes()
         for p in Path(f"{single}-report").rglob("*") if p.is_file()}
    assert a.keys() == b.keys() and len(a) > 5
    differ = [k for k in a if a[k] != b[k]]
    if differ:  # say what differs: the first differing lines of each file
        import difflib

        shown = []
        for k in differ[:3]:
            lines = difflib.unified_diff(a[k].decode(errors="replace").splitlines(),
                                         b[k].decode(errors="replace").splitlines(), lineterm="",
                                         n=0)
            shown.append(f"{k}:\n" + "\n".join(list(lines)[2:8])[:1500])
        raise AssertionError("the shards' report differs from the single run's:\n"
                             + "\n".join(shown))


def test_the_same_shard_twice_is_refused_but_other_shards_run(tmp_path):
    from fedmedbench.lock import results_lock

    out = tmp_path / "r"
    out.mkdir()
    with results_lock(out, shard=(1, 2)):
        with results_lock(out, shard=(2, 2)):  # another shard of the same split: fine
            pass
        with pytest.raises(ConfigError, match="shard 1/2"):
            with results_lock(out, shard=(1, 2)):
                pass
        with pytest.raises(ConfigError, match="in use"):
            with results_lock(out):  # a whole run waits for every shard
                pass


# --------------------------------------------------------------------------
# raw tracebacks that became named errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("address,words", [
    ("tls://127.0.0.1:8786", "tls://"), ("ucx://127.0.0.1:8786", "ucx://"),
    ("inproc://127.0.0.1/1/2", "inproc://"), ("foo://127.0.0.1:8786", "foo://"),
    ("tcp://127.0.0.1", "port"), ("tcp://127.0.0.1:99999", "port"), ("127.0.0.1:8786", "tcp://")])
def test_bad_scheduler_addresses_are_config_errors(tmp_path, capsys, address, words):
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(TINY))
    assert main(["run", str(m), "--executor", "dask", "--scheduler", address,
                 "--out", str(tmp_path / "r")]) == 2
    msg = one_error(capsys.readouterr().err)
    assert words in msg and "tcp://HOST:PORT" in msg


@contextlib.contextmanager
def _server(reply: bytes | None):
    """A TCP server that accepts and then says ``reply`` (``None``: nothing, ever)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            conns.append(c)
            if reply is not None:
                with contextlib.suppress(OSError):
                    c.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


@pytest.mark.parametrize("reply", [None, b"\x00garbage" * 1000])
def test_a_scheduler_that_never_answers_or_sends_garbage_is_bounded(tmp_path, reply):
    pytest.importorskip("distributed")
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(TINY))
    with _server(reply) as address:
        p = cli("run", str(m), "--executor", "dask", "--scheduler", address, "--out",
                str(tmp_path / "r"), timeout=90, env=_env(FEDMEDBENCH_DASK_TIMEOUT="3"))
    assert p.returncode == 2, p.stderr[-3000:]
    msg = one_error(p.stderr)
    assert address in msg and "dask scheduler" in msg


def _npz(path: Path, arrays: dict[str, np.ndarray], *, lie: dict[str, tuple] | None = None,
         compress: bool = False) -> None:
    """An .npz; ``lie`` gives members whose .npy header declares another shape."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
                         ) as z:
        for k, a in arrays.items():
            buf = io.BytesIO()
            if lie and k in lie:
                np.lib.format.write_array_header_1_0(buf, {
                    "descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False,
                    "shape": lie[k]})
                buf.write(a.tobytes())
            else:
                np.lib.format.write_array(buf, a)
            z.writestr(f"{k}.npy", buf.getvalue())


def _medmnist_arrays(labels_max: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for s, n in (("train", 40), ("val", 10), ("test", 20)):
        out[f"{s}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        out[f"{s}_labels"] = (np.arange(n) % labels_max).astype(np.uint64)[:, None]
    return out


def _medmnist_run(tmp_path: Path, path: Path) -> int:
    text = TINY.replace('{ name = "synthetic-tabular", n_samples = 200 }',
                        f'{{ name = "medmnist", path = "{path}" }}')
    return run_in(tmp_path, text, "--no-report", "--dry-run")


def test_medmnist_header_declaring_800_gb_is_a_data_error(tmp_path, capsys):
    a = _medmnist_arrays()
    p = tmp_path / "lie.npz"
    _npz(p, a, lie={"train_labels": (800_000_000_000,)})
    assert _medmnist_run(tmp_path, p) == 2
    msg = one_error(capsys.readouterr().err)
    assert "train_labels" in msg and "800" in msg and "lie.npz" in msg


def test_medmnist_zip_bomb_is_a_data_error(tmp_path, capsys):
    a = _medmnist_arrays()
    a["train_images"] = np.zeros((110_000, 28, 28), dtype=np.uint8)  # 86 MB of zeros
    a["train_labels"] = np.zeros((110_000, 1), dtype=np.uint64)
    p = tmp_path / "bomb.npz"
    _npz(p, a, compress=True)
    assert p.stat().st_size < 2_000_000
    from fedmedbench.plugins.datasets.medmnist import MedMNIST

    with pytest.raises(DataError, match="train_images.*compress"):
        MedMNIST(path=str(p)).load(seed=0)


def test_medmnist_label_2_to_the_40_is_a_data_error(tmp_path, capsys):
    a = _medmnist_arrays()
    a["test_labels"][3, 0] = 2**40
    p = tmp_path / "labels.npz"
    _npz(p, a)
    assert _medmnist_run(tmp_path, p) == 2
    msg = one_error(capsys.readouterr().err)
    assert "test_labels" in msg and str(2**40) in msg


@pytest.mark.parametrize("value", ["1x", "1.5"])
def test_eicu_hospitalid_that_is_not_an_integer_is_a_data_error(tmp_path, value):
    import pandas as pd
    from test_datasets import _write_eicu

    from fedmedbench.plugins.datasets.eicu import EICU

    folder = tmp_path / "eicu"
    _write_eicu(folder, {1: 60, 2: 60})
    with gzip.open(folder / "patient.csv.gz", "rt") as f:
        pat = pd.read_csv(f)
    pat["hospitalid"] = pat["hospitalid"].astype(object)
    pat.loc[10, "hospitalid"] = value
    with gzip.open(folder / "patient.csv.gz", "wt") as f:
        pat.to_csv(f, index=False)
    with pytest.raises(DataError, match=rf"hospitalid.*{value}"):
        EICU(path=str(folder), min_stays=4).load(seed=0)


@pytest.mark.slow
def test_dataset_sizes_beyond_memory_are_named(tmp_path):
    code = textwrap.dedent("""
        import resource, json, sys
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.RLIM_INFINITY))
        from fedmedbench.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(TINY.replace(
        '{ name = "synthetic-tabular", n_samples = 200 }',
        '{ name = "synthetic-genomics", n_genes = 60000, n_samples = 100000 }').replace(
        "seeds = [0, 1]", "seeds = [0]")))
    out = tmp_path / "r"
    p = subprocess.run([sys.executable, "-c", code, "run", str(m), "--out", str(out),
                        "--no-progress", "--no-report"], capture_output=True, text=True,
                       timeout=120, env=_env(OPENBLAS_NUM_THREADS="1"))
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    (rec,) = [results_mod.read_record(x) for x in records_in(out)]
    assert rec["error"]["type"] == "MemoryError"
    assert "synthetic-genomics" in rec["error"]["message"]
    assert "out of memory" in rec["error"]["message"]


@pytest.mark.parametrize("args", [["plugins"], ["plugins", "--markdown"], ["datasets"],
                                  ["report", "RES"], ["run", "MATRIX", "--dry-run"]])
def test_stdout_closed_early_is_not_a_traceback(results, tmp_path, args):
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(TINY))
    args = [str(results) if a == "RES" else str(m) if a == "MATRIX" else a for a in args]
    p = subprocess.Popen([sys.executable, "-m", "fedmedbench.cli", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    p.stdout.close()  # `| head` that has read all it wants
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err


@pytest.mark.slow
def test_run_into_a_closed_pipe_saves_records_and_exits_cleanly(tmp_path):
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(TINY))
    p = subprocess.Popen([sys.executable, "-m", "fedmedbench.cli", "run", str(m), "--out",
                          str(tmp_path / "r"), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and b"Traceback" not in err, err
    assert len(records_in(tmp_path / "r")) == 2


# --------------------------------------------------------------------------
# as a plugin author would
# --------------------------------------------------------------------------


def test_every_cell_of_a_dataset_failing_still_prints_and_writes_a_report(
        hostile, tmp_path, capsys):
    text = TINY.replace('["fedavg"]', '["hostile-fail"]')
    out = tmp_path / "results"
    assert run_in(tmp_path, text, out=out) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    assert "no successful cells" in cap.out
    assert "2 cell(s) did not finish ok" in cap.out and "hostile-fail" in cap.out
    assert "RuntimeError" in cap.out
    assert (out / "report" / "index.html").is_file()
    assert "a new plugin's first bug" in (out / "report" / "report.md").read_text()
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    cap = capsys.readouterr()
    assert "no successful cells" in cap.out and "RuntimeError" in cap.out
    assert "Traceback" not in cap.err


def _fake_dist(root: Path, *, module_text: str, name: str = "fmb-broken-plugin",
               ep: str = "broken") -> None:
    (root / "fmb_broken_mod.py").write_text(module_text)
    info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[fedmedbench]\n{ep} = fmb_broken_mod\n")


def test_an_installed_plugin_that_cannot_import_names_its_distribution(tmp_path):
    _fake_dist(tmp_path, module_text="import no_such_module_xyz\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS)]))
    p = cli("plugins", env=env, timeout=60)
    assert p.returncode == 2
    msg = one_error(p.stderr)
    for word in ("fmb-broken-plugin 1.2.3", "entry point 'broken'", "fmb_broken_mod",
                 "no_such_module_xyz", "FEDMEDBENCH_DISABLE_PLUGINS=broken"):
        assert word in msg, msg
    env["FEDMEDBENCH_DISABLE_PLUGINS"] = "broken"
    assert cli("plugins", env=env, timeout=60).returncode == 0


def test_a_hookimpl_name_typo_gets_a_did_you_mean(tmp_path, monkeypatch):
    (tmp_path / "fmb_typo_mod.py").write_text(textwrap.dedent("""
        from fedmedbench import hookimpl

        @hookimpl
        def register_algorithm(register):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_typo_mod")
    from fedmedbench.registry import plugin_manager

    with pytest.raises(ConfigError) as e:
        plugin_manager()
    msg = str(e.value)
    assert "fmb_typo_mod" in msg and "register_algorithm" in msg
    assert "did you mean 'register_algorithms'?" in msg


def test_a_constructor_error_names_the_plugin(hostile, tmp_path, capsys):
    assert run_in(tmp_path, TINY.replace('["fedavg"]', '["hostile-ctor-boom"]'),
                  "--no-report") == 2
    msg = one_error(capsys.readouterr().err)
    assert "hostile-ctor-boom" in msg and "fmb_hostile_plugins" in msg
    assert "RuntimeError: constructor exploded" in msg


def test_the_label_form_in_a_matrix_keeps_its_parameters(tmp_path, capsys):
    from fedmedbench.api import plan

    m = plan({"rounds": 1, "axes": {"dataset": ["synthetic-tabular"],
                                    "algorithm": ["fedprox(mu=0.1)"],
                                    "privacy": ["dp-fedavg(noise_multiplier=0.5)+secagg"]}})
    (cell,) = m.cells
    assert cell["config"]["algorithm"]["mu"] == 0.1
    assert cell["config"]["privacy"][0]["noise_multiplier"] == 0.5
    assert [p["name"] for p in cell["config"]["privacy"]] == ["dp-fedavg", "secagg"]
    with pytest.raises(ConfigError, match=r"fedprox\[μ=0.1\].*short label.*name = \"fedprox\""):
        plan({"rounds": 1, "axes": {"dataset": ["synthetic-tabular"],
                                    "algorithm": ["fedprox[μ=0.1]"]}})
    with pytest.raises(ConfigError, match=r"fedprox\(mu=0\.1.*cannot be read"):
        plan({"rounds": 1, "axes": {"dataset": ["synthetic-tabular"],
                                    "algorithm": ["fedprox(mu=0.1"]}})


def test_an_axis_name_typo_gets_a_did_you_mean(tmp_path, capsys):
    text = TINY.replace("dataset =", "datasets =")
    assert run_in(tmp_path, text, "--dry-run") == 2
    msg = one_error(capsys.readouterr().err)
    assert "'datasets'" in msg and "did you mean 'dataset'?" in msg


def test_a_matrix_reports_all_its_errors_at_once(tmp_path, capsys):
    text = """
    name = "bad"
    rounds = 0
    seeds = [0]
    colour = "red"
    [axes]
    dataset = ["synthetic-tabularr"]
    algorithm = ["fedavg", { name = "fedprox", mux = 1 }]
    [run]
    lrr = 0.1
    """
    assert run_in(tmp_path, text, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in ("5 problems", "rounds = 0", "'colour'", "synthetic-tabularr",
                 "did you mean 'synthetic-tabular'", "'mux'", "did you mean 'mu'",
                 "did you mean 'lr'"):
        assert word in err, err


# --------------------------------------------------------------------------
# the terminal and the report: nothing injected
# --------------------------------------------------------------------------


def test_escape_sequences_never_reach_the_terminal(hostile, tmp_path, capsys):
    text = TINY.replace('{ name = "synthetic-tabular", n_samples = 200 }',
                        '{ name = "hostile-escape-sites", n_samples = 200 }').replace(
        '["fedavg"]', '["fedavg", "hostile-fail"]')
    out = tmp_path / "results"
    assert run_in(tmp_path, text, "-v", out=out) == 1
    cap = capsys.readouterr()
    assert ESC not in cap.out and ESC not in cap.err and "\x07" not in cap.out + cap.err
    assert "site0" in cap.out and "\\x1b" in cap.out  # shown, escaped
    assert main(["report", str(out), "-v"]) == 0
    cap = capsys.readouterr()
    assert ESC not in cap.out + cap.err and "site0" in cap.out
    md = (out / "report" / "report.md").read_text()
    assert ESC not in md and "\x07" not in md
    # no injected markdown image or link: every bracket of one is escaped
    assert "![" not in md and re.search(r"(?<!\\)\]\(", md) is None
    assert "evil.example" in md  # the text is still there, inert
    page = (out / "report" / "index.html").read_text()
    assert ESC not in page
    from fedmedbench.executors import _desc  # the progress bar's label of a cell

    assert ESC not in _desc({"labels": {"dataset": f"{ESC}[2Jx", "algorithm": "fedavg"}})


def test_plugins_markdown_escapes_docstrings(hostile, capsys):
    assert main(["plugins", "--markdown"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "hostile-script-doc" in line)
    assert "<script>" not in row and "&lt;script" in row
    assert "![" not in row and "\\|" in row


def test_component_names_with_control_characters_are_refused(tmp_path, monkeypatch):
    (tmp_path / "fmb_ctrl_mod.py").write_text(textwrap.dedent("""
        from fedmedbench import Algorithm, hookimpl

        class Bad(Algorithm):
            name = "bad\\x1b[31mname"

            def __init__(self):
                pass

        @hookimpl
        def register_algorithms(register):
            register(Bad)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FEDMEDBENCH_PLUGINS", "fmb_ctrl_mod")
    from fedmedbench.registry import get_registry

    with pytest.raises(ConfigError, match=r"fmb_ctrl_mod.*control character"):
        get_registry(refresh=True)


# --------------------------------------------------------------------------
# reproducibility: the backend is part of a cell's identity
# --------------------------------------------------------------------------


def test_the_backend_is_part_of_the_cell_id_and_the_report_keeps_them_apart(results, capsys):
    from fedmedbench.api import plan

    spec = {"rounds": 1, "axes": {"dataset": ["synthetic-tabular"], "algorithm": ["fedavg"]}}
    ids = {b: plan(spec, backend=b).cells[0]["cell_id"] for b in ("auto", "loop", "vectorized")}
    assert len(set(ids.values())) == 3
    assert plan(spec, backend="loop").cells[0]["config"]["backend"] == "loop"
    # records of the same entry and seed from two backends: two rows, never one mean
    a, b = records_in(results)
    ra = json.loads(a.read_text())
    for rec, name in ((ra, "loop"),):
        rec["config"]["backend"] = name
        rec["backend"] = {"name": name, "reason": ""}
        rehash(rec, results)
    from fedmedbench.api import load

    res = load([results])
    summ = res.tables()["summary"]
    assert len(summ) == 2 and sorted(summ["n"]) == [1, 2]
    assert any("loop" in m for m in summ["method"])


def test_the_device_is_part_of_the_cell_id_unless_it_is_the_cpu(monkeypatch):
    """Issue 22.6 / 23: ``--device``. The CPU (the default and the reference)
    keeps the ids cells always had; ``auto`` enters the id resolved (what it
    trains on here); CUDA where torch sees none is refused before anything
    runs; every record says where its clients trained."""
    import torch

    from fedmedbench.api import plan
    from fedmedbench.engine import run_cell

    spec = {"rounds": 1, "axes": {"dataset": ["synthetic-tabular"], "algorithm": ["fedavg"]},
            "run": {"backend": "vectorized"}}
    base = plan(spec).cells[0]
    assert "device" not in base["config"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan(spec, device="cpu").cells[0]["cell_id"] == base["cell_id"]
    assert plan(spec, device="auto").cells[0]["cell_id"] == base["cell_id"]
    with pytest.raises(ConfigError, match=r"device cuda: torch .* sees no CUDA device"):
        plan(spec, device="cuda")
    with pytest.raises(ConfigError, match=r"device 'gpu'; choose one of cpu, auto, cuda"):
        plan(spec, device="gpu")
    with pytest.raises(ConfigError, match=r"run.device = .gpu.; choose one of cpu, auto, cuda"):
        plan({**spec, "run": {"device": "gpu"}})
    rec = run_cell(base)
    assert rec["status"] == "ok" and rec["backend"]["name"] == "vectorized"
    assert rec["backend"]["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = plan(spec, device="auto").cells[0]
    assert gpu["config"]["device"] == "cuda" and gpu["cell_id"] != base["cell_id"]


# --------------------------------------------------------------------------
# one version number, one record type (issue 18, item 6)
# --------------------------------------------------------------------------


def test_one_version_number_everywhere(results):
    import tomllib

    from fedmedbench.matrix import plugin_versions
    from fedmedbench.registry import get_registry

    assert fedmedbench.__version__ == "0.3.0.dev0"
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in py["project"] and "version" in py["project"]["dynamic"]
    assert py["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fedmedbench.__version__"}
    assert get_registry().get("algorithm", "fedavg").version == fedmedbench.__version__
    rec = results_mod.read_record(records_in(results)[0])
    assert rec["provenance"]["fedmedbench"] == fedmedbench.__version__
    assert rec["config"]["versions"]["fedmedbench"] == fedmedbench.__version__
    assert plugin_versions({"algorithm": {"name": "fedavg"}}, get_registry()) == {
        "fedmedbench": fedmedbench.__version__}


def test_one_record_type_written_and_read_in_one_place(tmp_path):
    from fedmedbench import executors, executors_dask
    from fedmedbench.results import RECORD_FIELDS, failed_record, new_record, read_record

    cell = {"cell_id": "0123456789abcdef", "matrix": "m", "labels": {"algorithm": "fedavg"},
            "config": {"seed": 0, "rounds": 1}}
    rec = new_record(cell)
    assert set(rec) >= set(RECORD_FIELDS) and rec["status"] == "ok"
    assert rec["provenance"]["fedmedbench"] == fedmedbench.__version__
    bad = failed_record(cell, "it broke", "WorkerDied", plugin="p", hook="h")
    assert bad["status"] == "failed" and bad["error"] == {
        "type": "WorkerDied", "message": "it broke", "plugin": "p", "component": None,
        "hook": "h"}
    results_mod.write_record(tmp_path, bad)
    assert read_record(tmp_path / f"{cell['cell_id']}.json")["error"]["message"] == "it broke"
    for mod in (executors, executors_dask):  # no record dict literals outside results.py
        src = Path(mod.__file__).read_text()
        assert '"schema": SCHEMA' not in src and "SCHEMA," not in src


# --------------------------------------------------------------------------
# dask: deadlines and honest attempt counts
# --------------------------------------------------------------------------

needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason="needs dask.distributed")

FAULTY = """
name = "faulty"
rounds = 1
seeds = [{seeds}]
[axes]
dataset = [{{ name = "synthetic-tabular", n_samples = 200 }}]
algorithm = ["fedavg"]
"""


def _wait_for(cond, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


#: dask's command line: beside this interpreter (a venv not activated) or on PATH
_DASK = next((str(p) for p in [Path(sys.executable).parent / "dask"] if p.exists()),
             shutil.which("dask") or "dask")


@contextlib.contextmanager
def _external_cluster(tmp_path: Path, spawn, *, env: dict[str, str], nanny: bool = True,
                      workers: int = 1):
    """A dask scheduler and worker(s) in their own processes (an external
    cluster) in the environment ``env``, started by the background job's
    ``spawn`` (tests/conftest.py: killed with an interrupted session)."""
    sched_file = tmp_path / "scheduler.json"
    procs = [spawn([_DASK, "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file",
                    str(sched_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env)]
    try:
        _wait_for(sched_file.exists, 60, "the scheduler")
        time.sleep(0.5)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(workers):
            procs.append(spawn([_DASK, "worker", address, "--nthreads", "1", "--no-dashboard",
                                *([] if nanny else ["--no-nanny"])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        yield address, procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _driver(tmp_path: Path, spawn, text: str, *args: str, env: dict[str, str],
            timeout: float = 240) -> tuple[subprocess.CompletedProcess, list]:
    """``fedmedbench run`` of ``text`` by the job's ``spawn``, bounded by
    ``timeout`` seconds (``subprocess.run``'s behaviour: killed, then raised)."""
    m = tmp_path / "driver.toml"
    m.write_text(textwrap.dedent(text))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fedmedbench.cli", "run", str(m), "--out", str(out),
            "--no-progress", "--no-report", *args]
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        so, se = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    p = subprocess.CompletedProcess(argv, proc.returncode, so, se)
    recs = [results_mod.read_record(x) for x in records_in(out)] if out.exists() else []
    return p, recs


def _fault_env(tmp: Path, spec: str, base: dict[str, str]) -> dict[str, str]:
    """The environment of a driver or worker with the fault plugin armed with
    ``spec`` (tests/test_executors.py's ``faults`` fixture's, for a background job: built on the
    session's environment ``base``, the test process's own untouched)."""
    (tmp / "faults").mkdir(exist_ok=True)
    return _env(base, FEDMEDBENCH_PLUGINS="fmb_executor_plugins",
                FMB_FAULT_DIR=str(tmp / "faults"), FMB_FAULT=spec)


def _attempts(tmp: Path) -> list[tuple[int, int]]:
    p = tmp / "faults" / "attempts"
    lines = p.read_text().split() if p.exists() else []
    return [(int(s), int(pid)) for s, pid in zip(lines[::2], lines[1::2])]


# The dask fault runs below mostly wait (on a hung import, a cell timeout, a
# worker that never comes back): background jobs (tests/conftest.py) in the
# lane for jobs that wait; each test checks its job's result.

def _import_hangs_job(tmp: Path, spawn) -> dict:
    env = _fault_env(tmp, "", spawn.environ)
    with _external_cluster(tmp, spawn, env={**env, "FMB_HANG_AT_IMPORT": "1"}) as (address, _):
        time.sleep(3)
        p, recs = _driver(tmp, spawn, FAULTY.format(seeds="0"), "--executor", "dask",
                          "--scheduler", address, "--cell-timeout", "30", timeout=180,
                          env={**env, "FEDMEDBENCH_DASK_TIMEOUT": "10"})
    return p, recs


@needs_dask
@pytest.mark.slow
@pytest.mark.background(job=_import_hangs_job, waits=True)
def test_dask_worker_whose_plugin_import_hangs_is_named_within_a_deadline(background):
    p, recs = background
    assert p.returncode == 2, p.stderr[-3000:]
    msg = one_error(p.stderr)
    assert "did not answer" in msg and "plugins" in msg and recs == []


def _attempt_counts_job(tmp: Path, spawn) -> dict:
    env = _fault_env(tmp, "die:0", spawn.environ)  # the cell kills its worker on every try
    # an external scheduler keeps its own allowed-failures (3 by default)
    with _external_cluster(tmp, spawn, env=env) as (address, _):
        p, recs = _driver(tmp, spawn, FAULTY.format(seeds="0, 1"), "--executor", "dask",
                          "--scheduler", address, "--retries", "1", timeout=240, env=env)
    return p, recs, _attempts(tmp)


@needs_dask
@pytest.mark.slow
@pytest.mark.background(job=_attempt_counts_job, waits=True)
def test_dask_attempt_counts_come_from_the_scheduler(background):
    p, recs, attempts = background
    assert p.returncode == 1, p.stderr[-3000:]
    by = {r["config"]["seed"]: r for r in recs}
    assert by[1]["status"] == "ok", p.stderr[-3000:]
    err = by[0]["error"]
    assert err["type"] == "WorkerDied"
    n = len(attempts)
    assert f"died on each of {n} tries" in err["message"], (n, err["message"])
    assert n >= 2


def _after_timeout_job(tmp: Path, spawn) -> dict:
    p, recs = _driver(tmp, spawn, FAULTY.format(seeds="0, 1, 2"), "--executor", "dask",
                      "--workers", "1", "--cell-timeout", "15", timeout=240,
                      env=_fault_env(tmp, "hang:0", spawn.environ))
    return p, recs


@needs_dask
@pytest.mark.slow
@pytest.mark.background(job=_after_timeout_job, waits=True)
def test_dask_a_cell_after_a_timeout_kill_is_not_blamed(background):
    p, recs = background
    assert p.returncode == 1, p.stderr[-3000:]
    by = {r["config"]["seed"]: r for r in recs}
    assert by[0]["error"]["type"] == "Timeout"
    assert by[1]["status"] == "ok" and by[2]["status"] == "ok", (by[1].get("error"),
                                                                  by[2].get("error"))


def _no_worker_job(tmp: Path, spawn) -> dict:
    env = _fault_env(tmp, "die:0", spawn.environ)
    with _external_cluster(tmp, spawn, nanny=False, env=env) as (address, _):
        p, recs = _driver(tmp, spawn, FAULTY.format(seeds="0, 1"), "--executor", "dask",
                          "--scheduler", address, "--retries", "0", "--cell-timeout", "20",
                          timeout=240, env=env)
    return p, recs


@needs_dask
@pytest.mark.slow
@pytest.mark.background(job=_no_worker_job, waits=True)
def test_dask_cells_no_worker_ran_are_not_recorded_as_timeouts(background):
    p, recs = background
    assert p.returncode == 1, p.stderr[-3000:]
    by = {r["config"]["seed"]: r for r in recs}
    assert by[0]["error"]["type"] == "WorkerDied"
    if 1 in by:  # never started: not a timeout of code that ran
        assert by[1]["error"]["type"] == "NotStarted", by[1]["error"]
        assert "no dask worker" in by[1]["error"]["message"]


def _scheduler_killed_job(tmp: Path, spawn) -> dict:
    env = _fault_env(tmp, "hang:0", spawn.environ)
    with _external_cluster(tmp, spawn, env=env) as (address, procs):
        m = tmp / "driver.toml"
        m.write_text(textwrap.dedent(FAULTY.format(seeds="0")))
        out = tmp / "out"
        drv = spawn([sys.executable, "-m", "fedmedbench.cli", "run", str(m),
                     "--out", str(out), "--no-progress", "--no-report",
                     "--executor", "dask", "--scheduler", address],
                    stderr=subprocess.PIPE, text=True, env=env)
        try:
            _wait_for(lambda: _attempts(tmp), 120, "the cell to start")
            os.killpg(procs[0].pid, signal.SIGKILL)
            _, err = drv.communicate(timeout=120)
        finally:
            if drv.poll() is None:
                drv.kill()
    return {"drv": drv, "err": err, "address": address, "out": out}


@needs_dask
@pytest.mark.slow
@pytest.mark.background(job=_scheduler_killed_job, waits=True)
def test_dask_scheduler_killed_is_reported_as_such(background):
    drv, err, address, out = (background[k] for k in ("drv", "err", "address", "out"))
    assert drv.returncode == 1, err[-3000:]
    msg = one_error(err)
    assert "scheduler" in msg and address in msg and "pass --out" not in msg
    (rec,) = [results_mod.read_record(x) for x in records_in(out)]
    assert rec["status"] == "failed" and rec["error"]["type"] == "SchedulerLost"
