"""Shared fixtures: an isolated cache, a helper that runs a matrix text, and
background jobs for the tests that mostly wait."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("FEDMEDBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def quickstart_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The records of one ``fedmedbench run`` of the quickstart matrix (the
    default matrix), made once per test session (``--no-report``)."""
    import io

    from fedmedbench.cli import main

    out = tmp_path_factory.mktemp("quickstart") / "results"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["run", "--out", str(out), "--no-progress", "--no-report"])
    assert code == 0
    return out


@pytest.fixture
def quickstart(tmp_path: Path, quickstart_results: Path) -> Callable[[str], Path]:
    """``quickstart(name)``: a copy of the session's quickstart records in
    ``tmp_path / name``. ``fedmedbench run --out`` that folder finds every
    cell done, so it prints and reports what the records hold (the run
    itself was the session's)."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(quickstart_results, tmp_path / name))

    return copy


@pytest.fixture
def run_matrix(tmp_path: Path):
    """``run_matrix(toml_text, *cli_args) -> (exit_code, records)``: write the
    matrix, run ``fedmedbench run`` on it in-process, return the records."""
    from fedmedbench.cli import main
    from fedmedbench.results import load_records

    def _run(text: str, *args: str, out: Path | None = None):
        mfile = tmp_path / "matrix.toml"
        mfile.write_text(textwrap.dedent(text))
        out = out or tmp_path / "results"
        code = main(["run", str(mfile), "--out", str(out), "--no-progress", "--no-report", *args])
        records, _ = load_records([out]) if out.exists() else ([], [])
        return code, records

    return _run


# --------------------------------------------------------------------------
# tests that mostly wait: started in the background when the session starts
# --------------------------------------------------------------------------
#
# A few end-to-end tests spend most of their wall time waiting on other
# processes: a cell that hangs until its --cell-timeout, a driver killed at
# random moments. Their subprocess work is a *job* (a module-level function
# ``job(tmp, spawn) -> result`` that only runs subprocesses and reads files);
# ``spawn(args, **popen_kw)`` starts a process (killed with the session if
# still running) and ``spawn.environ`` is the environment as the session
# started, the base of every job's environment: a foreground test that
# monkeypatches ``os.environ`` meanwhile must not leak into a job's processes.
# The test is marked ``@pytest.mark.background(job=job)`` and takes the
# ``background`` fixture, which returns the job's result for the test to check.
# When the session starts, the selected tests' jobs run one after another in
# one background thread while the other tests run (the tests themselves use
# one core at a time; the jobs' processes take the other); jobs marked
# ``waits=True`` (a cell hanging until its timeout, a worker nobody answers)
# use little CPU and run beside them in a lane of their own, two at a time.
# Every process a job starts goes through ``spawn``, so that an interrupted
# session kills it, and a job still running then can start no other. The marked tests
# run last, so by their turn the work is mostly done. Nothing checked changes:
# the same commands, the same assertions. Run alone (or with --collect-only),
# a job runs in the test itself. The terminal summary says how long each job
# took and how long the tests waited for them.


class _Background:
    """The session's background jobs, their processes and scratch folders."""

    def __init__(self) -> None:
        self.pools: dict[bool, ThreadPoolExecutor] = {}
        self.futures: dict[str, Future] = {}
        self.seconds: dict[str, float] = {}  # each job's wall time
        self.waited = 0.0  # the marked tests' wait for their jobs
        self.t0 = time.monotonic()
        self.snapshot: dict[str, str] | None = None
        self.closing = False  # set when the session ends: no job starts another process
        self.procs: list[subprocess.Popen] = []
        self.dirs: list[str] = []
        self.lock = threading.Lock()

    @property
    def environ(self) -> dict[str, str]:
        """``os.environ`` as it was when the jobs started (a copy)."""
        return dict(self.snapshot if self.snapshot is not None else os.environ)

    def spawn(self, args: list[str], **kw: Any) -> subprocess.Popen:
        """``subprocess.Popen`` in a session of its own, killed with the test
        session if it is still running then; ``env`` defaults to
        :attr:`environ`."""
        kw.setdefault("env", self.environ)
        kw.setdefault("start_new_session", True)
        with self.lock:  # close() kills under the lock: nothing starts after it
            if self.closing:
                raise RuntimeError("the test session is ending: no new background process")
            p = subprocess.Popen(args, **kw)
            self.procs.append(p)
        return p

    def scratch(self) -> Path:
        d = tempfile.mkdtemp(prefix="fmb-background-")
        self.dirs.append(d)
        return Path(d)

    def timed(self, nodeid: str, job: Callable[..., Any]) -> Any:
        t = time.monotonic()
        try:
            return job(self.scratch(), _Spawn(self))
        finally:
            with self.lock:
                self.seconds[nodeid] = time.monotonic() - t

    def start(self, nodeid: str, job: Callable[..., Any], waits: bool) -> None:
        if waits not in self.pools:
            self.pools[waits] = ThreadPoolExecutor(max_workers=2 if waits else 1,
                                                   thread_name_prefix="fmb-background")
        self.futures[nodeid] = self.pools[waits].submit(self.timed, nodeid, job)

    def result(self, nodeid: str, job: Callable[..., Any]) -> Any:
        fut = self.futures.get(nodeid)
        if fut is None:  # not started with the session: run it here
            return self.timed(nodeid, job)
        t = time.monotonic()
        try:
            return fut.result()
        finally:
            self.waited += time.monotonic() - t

    def close(self) -> None:
        with self.lock:  # an interrupted session: end what is still running, start nothing
            self.closing = True
            for p in self.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


class _Spawn:
    """What a job gets as ``spawn``: :meth:`_Background.spawn`, with the
    session's starting environment as ``spawn.environ``."""

    def __init__(self, bg: _Background) -> None:
        self.bg = bg

    def __call__(self, args: list[str], **kw: Any) -> subprocess.Popen:
        return self.bg.spawn(args, **kw)

    @property
    def environ(self) -> dict[str, str]:
        return self.bg.environ


_BACKGROUND = _Background()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "background(job=fn, waits=False): the test's subprocess work (fn) starts in "
                   "the background when the session starts; the test runs last and checks its "
                   "result (waits=True: a job that mostly waits, in a lane of its own)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests with a background job run last (their jobs had the whole session)."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    jobs = [(item.nodeid, mark.kwargs["job"], mark.kwargs.get("waits", False))
            for item in session.items
            for mark in [item.get_closest_marker("background")]
            if mark is not None and not _skipped(item)]
    if jobs and "FEDMEDBENCH_CACHE_DIR" not in os.environ:
        # the jobs' processes start before any fixture: the isolated cache is set up here
        os.environ["FEDMEDBENCH_CACHE_DIR"] = str(_BACKGROUND.scratch())
    if jobs:  # (with none, a job run inside its test reads the environment then)
        _BACKGROUND.snapshot = dict(os.environ)
    for nodeid, job, waits in jobs:
        _BACKGROUND.start(nodeid, job, waits)


def _skipped(item: pytest.Item) -> bool:
    """Marked ``skip``, or ``skipif`` with a condition already True (a missing
    optional dependency): its job would be wasted."""
    return item.get_closest_marker("skip") is not None or any(
        m.args and m.args[0] is True for m in item.iter_markers("skipif"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    bg = _BACKGROUND
    if not bg.seconds:
        return
    tr = terminalreporter
    tr.write_sep("=", "background jobs (tests/conftest.py)")
    with bg.lock:  # after -x or Ctrl-C a job may still be finishing
        seconds = sorted(bg.seconds.items(), key=lambda kv: -kv[1])
    for nodeid, s in seconds:
        tr.write_line(f"{s:7.2f}s  {nodeid}")
    tr.write_line(f"the marked tests waited {bg.waited:.1f} s for their jobs "
                  f"(session {time.monotonic() - bg.t0:.0f} s)")


def pytest_unconfigure(config: pytest.Config) -> None:
    _BACKGROUND.close()


@pytest.fixture
def background(request: pytest.FixtureRequest) -> Any:
    """The result of the test's background job (``@pytest.mark.background(job)``)."""
    mark = request.node.get_closest_marker("background")
    assert mark is not None, "the background fixture needs @pytest.mark.background(job=...)"
    return _BACKGROUND.result(request.node.nodeid, mark.kwargs["job"])
