"""The Python API: run a matrix, load results, get tables as DataFrames, write reports.

::

    import fedmedbench as fmb

    results = fmb.run(out="results")        # the built-in quickstart (a path or a dict also)
    df = results.frame()                     # one row per cell (pandas)
    results.tables()["leaderboard"]          # the report's tables, as DataFrames
    results.report("reports/")               # markdown, csv, json, figures, html

    fmb.load(["shard-1", "shard-2"]).frame()  # results folders, merged by cell id

The command line is a thin layer over these: ``fedmedbench run`` calls
:func:`run` and prints :meth:`Results.summary`; ``fedmedbench report`` calls
:func:`load` and :meth:`Results.report`. Both compute the same numbers from
the same records.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmedbench.errors import ConfigError, SchemaError
from fedmedbench.fileio import OutputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from fedmedbench.matrix import Matrix
    from fedmedbench.report import ReportData

__all__ = ["run", "load", "Results", "plan"]


class Results:
    """Result records (of a run or of results folders) and the report made of them.

    Parameters
    ----------
    records
        Result records, one per cell (as :func:`fedmedbench.results.read_record`
        returns them).
    dirs
        The results folders the records were read from: a report embeds
        images only from inside these (:func:`fedmedbench.report.record_image`).
    skipped
        Messages for record files that were skipped as invalid.

    Attributes
    ----------
    records : list of dict
        The records, sorted by cell id.
    dirs : list of pathlib.Path
        The results folders.
    skipped : list of str
        One line per invalid record file skipped (``skip_invalid=True``).
    """

    def __init__(self, records: Iterable[dict[str, Any]], *, dirs: Iterable[str | Path] = (),
                 skipped: Iterable[str] = ()) -> None:
        self.records = sorted((dict(r) for r in records), key=lambda r: str(r.get("cell_id")))
        self.dirs = [Path(d) for d in dirs]
        self.skipped = list(skipped)
        self._located: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        c = self.counts
        where = ", ".join(map(str, self.dirs)) or "memory"
        return (f"<Results: {len(self)} cells ({', '.join(f'{v} {k}' for k, v in c.items())}) "
                f"from {where}>")

    @property
    def counts(self) -> dict[str, int]:
        """Cells by status: ``{"ok": ..., "failed": ..., "skipped": ..., "diverged": ...}``."""
        from fedmedbench.report import summary_counts

        return summary_counts(self.records)

    @property
    def exit_code(self) -> int:
        """The command line's exit code for these cells: 1 if some cell failed
        or diverged, else 0."""
        c = self.counts
        return 1 if c["failed"] or c["diverged"] else 0

    def data(self, *, timings: bool = True) -> ReportData:
        """Every table of the report, computed once
        (:class:`fedmedbench.report.ReportData`; reporters read it).

        Parameters
        ----------
        timings
            Keep wall-clock seconds; ``False`` drops them so that reports of
            the same cells from different runs compare byte for byte.
        """
        from fedmedbench.report import build, strip_timings

        recs = self._with_dirs()
        return build(recs if timings else strip_timings(recs))

    def frame(self) -> pd.DataFrame:
        """One row per cell, as a :class:`pandas.DataFrame`.

        Columns: ``cell_id``, ``status``, the short label of each axis
        (``dataset``, ``algorithm``, ``privacy``, ... ; ``<axis>_spec`` is the
        record's full label), ``method``, ``topology``, ``seed``; ``metric``,
        ``utility`` (pooled test set), ``worst_site`` and ``site:<name>`` per
        site; ``epsilon``, ``delta``, ``unit`` (``record`` or ``client``),
        ``accountant``; ``bytes_up``, ``bytes_down``, ``bytes``,
        ``bytes_per_round``, ``wall_s``, ``train_s``, ``privacy_s``; attack
        metrics as ``attack:<name>:<metric>``. See
        :func:`fedmedbench.report.frame` for every column.

        Returns
        -------
        pandas.DataFrame
            A copy: changing it changes nothing here.
        """
        return self.data().cells.copy()

    def tables(self) -> dict[str, pd.DataFrame]:
        """The report's tables as DataFrames, by name: ``leaderboard``,
        ``summary`` (one row per dataset × method × privacy over seeds),
        ``baselines`` (FL against centralized and local training), ``sites``,
        ``attacks``, ``convergence``, ``failures``, ``cells`` (= :meth:`frame`)
        and ``legend`` (each short label and its full configuration).

        Returns
        -------
        dict of str to pandas.DataFrame
            Copies, in the order the report writes them.
        """
        return {k: v.copy() for k, v in self.data().tables().items()}

    def summary(self, *, verbose: bool = False) -> str:
        """What the command line prints: per dataset the headline table
        (utility, worst site, ε, bytes per round, one attack metric) and the
        library warnings once; with ``verbose``, every table of the report.

        Parameters
        ----------
        verbose
            Every table instead of the headline.
        """
        from fedmedbench.report import terminal_summary

        return terminal_summary(self.data(), verbose=verbose)

    def report(self, out: str | Path, *, formats: Iterable[str] | None = None,
               timings: bool = True) -> list[Path]:
        """Write the reports into ``out``.

        Parameters
        ----------
        out
            The folder (created if missing).
        formats
            Reporter plugins to run (``markdown``, ``csv``, ``json``,
            ``figures``, ``html``, or any installed one); default: all
            installed. Every name is checked before anything is written.
        timings
            ``False`` leaves wall-clock seconds out (reports of the same
            cells from different runs then compare byte for byte).

        Returns
        -------
        list of pathlib.Path
            The files written.

        Raises
        ------
        fedmedbench.ConfigError
            An unknown reporter (with a did-you-mean), no records, or an
            ``out`` that cannot be written (a file in the way, read-only).
        fedmedbench.fileio.OutputError
            The disk filled up or refused a file while writing (a one-line
            message with the path and the fix).
        """
        from fedmedbench.fileio import os_error_message, probe_writable
        from fedmedbench.registry import get_registry

        reg = get_registry()
        names = check_formats(formats, reg.names("reporter"))
        if not self.records:
            raise ConfigError("no result records to report on")
        reporters = [reg.build("reporter", {"name": n}, key="--format") for n in names]
        out = Path(out)
        try:
            probe_writable(out)
        except OutputError as exc:
            raise ConfigError(str(exc)) from None
        from fedmedbench.report import RecordList, strip_timings

        recs = RecordList(self._with_dirs() if timings else strip_timings(self._with_dirs()))
        paths: list[Path] = []
        for rep in reporters:
            try:
                paths += rep.write(recs, out)
            except OSError as exc:
                where = Path(exc.filename) if getattr(exc, "filename", None) else out
                raise OutputError(os_error_message(exc, where), errno_=exc.errno) from None
        return paths

    def _with_dirs(self) -> list[dict[str, Any]]:
        """The records, each with ``_dirs``: the results folders holding its file."""
        if self._located is None:
            from fedmedbench.results import iter_record_paths

            where: dict[str, list[str]] = {}
            for d in self.dirs:
                for p in iter_record_paths(d):
                    where.setdefault(p.stem, []).append(str(d))
            self._located = [{**r, "_dirs": where.get(str(r.get("cell_id")), [])}
                             for r in self.records]
        return self._located


def check_formats(formats: Iterable[str] | None, known: list[str]) -> list[str]:
    """Reporter names from ``formats`` (each item may be comma-separated;
    ``None``: every known one), every one checked against ``known``.

    Raises
    ------
    fedmedbench.ConfigError
        For an unknown name, with a did-you-mean and the installed reporters.
    """
    if formats is None:
        return list(known)
    if isinstance(formats, str):
        formats = [formats]
    names = [n.strip() for f in formats for n in str(f).split(",") if n.strip()]
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, known, n=1, cutoff=0.5)
            hint = f" did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--format {n!r}: no such reporter;{hint} installed reporters: "
                              f"{', '.join(known)}")
    if not names:
        raise ConfigError(f"--format: no reporter named; installed reporters: "
                          f"{', '.join(known)}")
    return list(dict.fromkeys(names))


def load(results: str | Path | Iterable[str | Path] = "results", *,
         skip_invalid: bool = False, allow_mixed_versions: bool = False) -> Results:
    """Load the records of one or more results folders, merged by cell id.

    Every record is checked as ``run`` checks it: readable, of this schema,
    its ``cell_id`` its file name and its config's hash.

    Parameters
    ----------
    results
        A results folder, or several (tox shards, CI artifacts). Where two
        hold a record of the same cell, an ``ok`` record wins.
    skip_invalid
        Skip invalid records (listed in :attr:`Results.skipped`) instead of
        raising.
    allow_mixed_versions
        Merge records written by different versions of fedmedbench or of a
        plugin's distribution (refused by default: one table's mean would
        mix two versions of the code).

    Returns
    -------
    Results

    Raises
    ------
    fedmedbench.SchemaError
        A folder that does not exist, or an invalid record without
        ``skip_invalid``.
    fedmedbench.ConfigError
        Records of different versions (without ``allow_mixed_versions``), or
        two different cells that would count as the same table entry and
        seed (a re-labelled or edited copy), naming both.
    """
    from fedmedbench.results import load_records

    dirs = [Path(results)] if isinstance(results, (str, Path)) else [Path(d) for d in results]
    if not dirs:
        raise ConfigError("load(): give at least one results folder")
    origin: dict[str, list[str]] = {}
    records, skipped = load_records(dirs, skip_invalid=skip_invalid, origin=origin)
    if not allow_mixed_versions:
        check_versions(records, origin)
    check_duplicates(records, origin)
    return Results(records, dirs=dirs, skipped=skipped)


def record_versions(rec: dict[str, Any]) -> dict[str, str]:
    """``{distribution: version}`` a record was written by: fedmedbench's
    (``provenance.fedmedbench``) and those of the plugins its config names
    (``config.versions``)."""
    out: dict[str, str] = {}
    cfg: dict[str, Any] = rec["config"] if isinstance(rec.get("config"), dict) else {}
    vs = cfg.get("versions")
    if isinstance(vs, dict):
        out.update({str(k): str(v) for k, v in vs.items() if v})
    prov: dict[str, Any] = (rec["provenance"] if isinstance(rec.get("provenance"), dict)
                            else {})
    if isinstance(prov.get("fedmedbench"), str) and prov["fedmedbench"]:
        out["fedmedbench"] = prov["fedmedbench"]
    return out


def check_versions(records: list[dict[str, Any]], origin: dict[str, list[str]]) -> None:
    """:class:`ConfigError` when ``records`` were written by different
    versions of one distribution, naming the versions, how many records each
    has and the folders they are in."""
    seen: dict[str, dict[str, list[str]]] = {}
    for r in records:
        for dist, v in record_versions(r).items():
            seen.setdefault(dist, {}).setdefault(v, []).append(str(r.get("cell_id")))
    mixed = {d: vs for d, vs in sorted(seen.items()) if len(vs) > 1}
    if not mixed:
        return
    parts = []
    for dist, vs in mixed.items():
        each = []
        for v, ids in sorted(vs.items()):
            folders = sorted({f for i in ids for f in origin.get(i, [])})
            each.append(f"{v} ({len(ids)} record{'s' * (len(ids) != 1)} in "
                        f"{', '.join(folders) or '?'})")
        parts.append(f"{dist} " + " and ".join(each))
    from fedmedbench.errors import printable

    raise ConfigError(printable(
        f"these records were written by different versions, and one table's mean would mix "
        f"them: {'; '.join(parts)}. Report each version's folders separately, rerun the old "
        f"cells with this version (`fedmedbench run MATRIX --out DIR`), or pass "
        f"--allow-mixed-versions to merge them anyway", keep_newlines=False))


def _flat(v: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(v, dict):
        out: dict[str, Any] = {}
        for k, x in v.items():
            out.update(_flat(x, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: v}


def check_duplicates(records: list[dict[str, Any]], origin: dict[str, list[str]]) -> None:
    """:class:`ConfigError` when two different cells would be one table entry
    and seed (the same label on every axis, the same backend and seed): their
    seeds would be counted twice. The message names both cells, their folders
    and where their configs differ."""
    from fedmedbench.report import AXES, _label, backend_of, is_audit_cell

    first: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        cfg: dict[str, Any] = r["config"] if isinstance(r.get("config"), dict) else {}
        # an audit cell (canaries in its training) is its entry's, never one of its seeds
        key = (*(_label(r, a) for a in AXES), backend_of(r), repr(cfg.get("seed")),
               is_audit_cell(r))
        other = first.setdefault(key, r)
        if other is r:
            continue
        a, b = _flat(other.get("config")), _flat(cfg)
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        shown = ", ".join(f"{k}: {_brief(a.get(k))} vs {_brief(b.get(k))}" for k in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""

        def where(x: dict[str, Any]) -> str:
            return ", ".join(origin.get(str(x.get("cell_id")), [])) or "?"

        from fedmedbench.errors import printable

        raise ConfigError(printable(
            f"records {other.get('cell_id')} (in {where(other)}) and {r.get('cell_id')} (in "
            f"{where(r)}) are different cells but the same table entry "
            f"({' / '.join(key[:1] + key[3:4] + key[5:6])}, seed {key[-2]}), so that seed would "
            f"count twice; their configs differ at {shown or 'nothing'}{more}. A record's labels "
            f"were edited, or folders of different matrices are merged: report them separately",
            keep_newlines=False))


def _brief(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def plan(matrix: str | Path | dict[str, Any] | Matrix | None = None, *,
         select: Iterable[str] | None = None, shard: str | None = None,
         backend: str | None = None, max_cells: int | None = None,
         isolate_attacks: bool = False, device: str | None = None) -> Matrix:
    """Parse and validate a matrix, with the slices and settings of a run,
    without running anything (what :func:`run` and ``--dry-run`` start from).

    Parameters
    ----------
    matrix
        A matrix file's path, a dict in the matrix file's shape (``{"name":
        ..., "rounds": ..., "axes": {...}}``), a parsed
        :class:`~fedmedbench.matrix.Matrix`, or ``None`` for the built-in
        quickstart.
    select
        ``AXIS=NAME[,NAME...]`` slices (``--select``).
    shard
        ``"I/N"``: only the cells of shard ``I`` of ``N``.
    backend
        ``auto``, ``loop`` or ``vectorized`` (part of the cell ids: the
        backends' numbers may differ, so their records never merge).
    max_cells
        Refuse a matrix with more cells (default
        :data:`fedmedbench.matrix.MAX_CELLS`).
    isolate_attacks
        Run each cell's attacks in a separate process that receives only
        the serialized attack context (as ``[evaluate] isolate = true``).
    device
        ``cpu`` (the default and the reference), ``cuda`` or ``auto`` (CUDA
        when torch sees one): where the vectorized backend trains (as
        ``[run] device``). A device other than the CPU is part of the cell
        ids.

    Returns
    -------
    fedmedbench.matrix.Matrix
        Its cells come from :meth:`~fedmedbench.matrix.Matrix.iter_cells`.
    """
    from fedmedbench.matrix import MAX_CELLS, Matrix, load_matrix, parse_matrix

    sel = list(select or [])
    if isinstance(matrix, Matrix):
        if sel:
            raise ConfigError("select applies to a matrix path or dict, not to a parsed Matrix")
        m = matrix
    elif isinstance(matrix, dict):
        m = parse_matrix(matrix, select=sel)
    elif matrix is None or isinstance(matrix, (str, Path)):
        m = load_matrix(matrix, select=sel)
    else:
        raise ConfigError(f"matrix = {type(matrix).__name__}: give a path, a dict in the matrix "
                          f"file's shape, or None for the quickstart")
    if max_cells is not None and (isinstance(max_cells, bool) or not isinstance(max_cells, int)
                                  or max_cells < 1):
        raise ConfigError(f"--max-cells {max_cells}: must be at least 1")
    if shard is not None:
        m.set_shard(shard)
    from fedmedbench.matrix import EXECUTION_KEYS

    # how and where clients train: part of the cell ids (results may differ)
    for key, value in (("backend", backend), ("device", device)):
        if value is None:
            continue
        if value not in EXECUTION_KEYS[key]:
            raise ConfigError(f"{key} {value!r}; choose one of "
                              f"{', '.join(EXECUTION_KEYS[key])}")
        m.execution[key] = value
    if m.execution.get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device cuda: torch {torch.__version__} sees no CUDA device "
                              f"here; use --device cpu (the reference) or auto")
    if isolate_attacks:
        m.execution["isolate_attacks"] = True
    m.check_size(max_cells or MAX_CELLS)
    return m


def run(matrix: str | Path | dict[str, Any] | Matrix | None = None, *,
        out: str | Path = "results", executor: str | None = None, workers: int | None = None,
        scheduler: str | None = None, cluster: str | Path | None = None,
        retries: int | None = None, cell_timeout: float | None = None,
        backend: str | None = None, select: Iterable[str] | None = None,
        shard: str | None = None, max_cells: int | None = None, force: bool = False,
        wait: bool = False, skip_invalid: bool = False, progress: bool = True,
        quiet: bool = False, isolate_attacks: bool = False,
        device: str | None = None) -> Results:
    """Run a matrix and return its results; ``fedmedbench run`` is this.

    Cells already done in ``out`` (an ``ok`` record) are not run again
    (resume); each cell's record is written the moment it finishes.

    Parameters
    ----------
    matrix
        A matrix file's path, a dict in the matrix file's shape, a parsed
        :class:`~fedmedbench.matrix.Matrix`, or ``None`` for the built-in
        quickstart.
    out
        The results folder (one ``<cell_id>.json`` per cell).
    executor
        ``local`` (in this process), ``process`` (a worker pool) or
        ``dask``; default: the matrix's ``[executor]`` table, else ``local``.
    workers, scheduler, cluster, retries, cell_timeout
        Executor settings, as the options of ``fedmedbench run`` (over the
        matrix's ``[executor]`` table).
    backend
        How clients train: ``auto``, ``loop`` or ``vectorized``.
    select
        ``AXIS=NAME[,NAME...]`` slices, e.g. ``["algorithm=fedavg", "seed=0"]``.
    shard
        ``"I/N"``: run only shard ``I`` of ``N``.
    max_cells
        Refuse a matrix with more cells (default 100,000).
    force
        Rerun cells that already have an ``ok`` record.
    wait
        Wait for another run holding ``out`` to finish instead of refusing.
    skip_invalid
        Run although ``out`` holds records of another schema (their cells
        run again; the old files are kept aside).
    progress
        Progress bars on stderr.
    quiet
        Print nothing on stderr (no run header, no notices, no bars).
    isolate_attacks
        Each cell's attacks in a separate process (``[evaluate] isolate``).
    device
        Where the vectorized backend trains: ``cpu`` (default), ``cuda`` or
        ``auto`` (as ``[run] device``; see :func:`plan`).

    Returns
    -------
    Results
        The records of this matrix's cells (done before or computed now).

    Raises
    ------
    fedmedbench.ConfigError
        Bad usage or configuration, before anything trains (the message names
        the key, the value and what is allowed).
    fedmedbench.SchemaError
        ``out`` holds records of another schema (pass ``skip_invalid``).
    fedmedbench.fileio.OutputError
        A record could not be written (disk full, ...): finished cells are kept.
    """
    from fedmedbench.executors import execute, resolve_settings
    from fedmedbench.fileio import os_error_message, probe_writable
    from fedmedbench.lock import results_lock
    from fedmedbench.results import completed_ids, load_records, remove_stale_temp_files, scan

    say: Callable[[str], None] = (lambda msg: None) if quiet else _stderr
    m = plan(matrix, select=select, shard=shard, backend=backend, max_cells=max_cells,
             isolate_attacks=isolate_attacks, device=device)
    settings = resolve_settings(m.executor, executor=executor, workers=workers,
                                scheduler=scheduler,
                                cluster=None if cluster is None else str(cluster),
                                retries=retries, cell_timeout=cell_timeout)
    n = m.count()
    out = Path(out)
    try:
        probe_writable(out)  # before any cell trains
    except OutputError as exc:
        raise ConfigError(str(exc)) from None
    with contextlib.ExitStack() as stack:
        try:
            lock = stack.enter_context(results_lock(
                out, wait=wait, on_wait=lambda msg: say(f"fedmedbench: {msg}"), shard=m.shard))
        except OutputError as exc:  # the lock file could not be written
            raise ConfigError(str(exc)) from None
        # shards of a split run side by side: only temp files no live writer can own go
        remove_stale_temp_files(out, before=lock.acquired_at if lock.exclusive
                                else lock.acquired_at - 3600)
        other, untrusted = scan(out)
        if other and not (skip_invalid or force):
            more = f" ({len(other)} such files)" if len(other) > 1 else ""
            raise SchemaError(f"{other[0]}{more}. Or pass --skip-invalid: their cells then run "
                              f"again and the old files are kept as <name>.invalid-<n>")
        for msg in [*other, *untrusted]:
            say(f"fedmedbench: not resuming from {msg.split(';')[0]}; if this matrix has that "
                f"cell it runs again, and the file is kept as <name>.invalid-<n>")
        done = set() if force else completed_ids(out)
        cells, todo = _to_run(m, n, done)
        say(_header(m, n, cells, todo, out, settings["executor"]))
        try:
            with warnings.catch_warnings():  # the files kept aside were listed above
                warnings.filterwarnings("ignore", message=r".*kept it as .*\.invalid-",
                                        category=RuntimeWarning)
                ran = execute(m.iter_cells(), out, force=force,
                              progress=progress and not quiet, total=todo, **settings)
        except OutputError:
            raise
        except OSError as exc:  # the driver writes only into `out`: name the folder
            raise OutputError(os_error_message(exc, out), errno_=exc.errno) from None
        ids = ran.cell_ids
        records, _ = load_records([out], skip_invalid=True)
    return Results([r for r in records if r["cell_id"] in ids], dirs=[out])


def _header(m: Matrix, n: int, cells: int | None, todo: int | None, out: Path,
            executor: str) -> str:
    """``matrix 'q': 18 cells, 6 already done, 12 to run -> out/ (local executor)``."""
    part = f"shard {m.shard[0]}/{m.shard[1]} ({cells} cells) of " if m.shard and cells \
        is not None else f"shard {m.shard[0]}/{m.shard[1]} of " if m.shard else ""
    left = ""
    if cells is not None and todo is not None and todo != cells:
        left = f", {cells - todo} already done, {todo} to run"
    return f"matrix {m.name!r}: {part}{n} cells{left} -> {out}/ ({executor} executor)"


def _to_run(m: Matrix, n: int, done: set[str]) -> tuple[int | None, int | None]:
    """``(cells of this run, cells to run)``: counted from the ids when some
    cells are done (or under a shard), else ``(n, n)`` without generating."""
    if not done and m.shard is None:
        return n, n
    if not done and n > 10_000:  # a big shard: not worth a pass over the ids
        return None, None
    total = todo = 0
    for c in m.iter_cells():
        total += 1
        todo += c["cell_id"] not in done
    return total, todo


def _stderr(msg: str) -> None:
    from fedmedbench.errors import printable

    print(printable(msg), file=sys.stderr)
