"""The ``fedmedbench`` command line: a thin layer over the Python API
(:mod:`fedmedbench.api`): ``run`` is :func:`fedmedbench.run`, ``report`` is
:func:`fedmedbench.load` and :meth:`fedmedbench.Results.report`.

Exit codes: 0 every cell ok or skipped; 1 some cell failed or diverged (the
rest still ran and were saved); 2 bad usage or configuration.

Everything printed passes through :func:`fedmedbench.errors.printable`
(escape sequences from plugin names, site names or records are shown, never
run), and a reader that closes the pipe early (``| head``) ends nothing but
the printing: the command finishes its work and exits normally.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from fedmedbench.errors import ConfigError, DataError, ExecutorLost, SchemaError, printable


class _PipeSafe(io.TextIOBase):
    """A text stream over ``stream`` that turns a closed pipe (``| head``)
    into silence: the first ``BrokenPipeError`` points the file descriptor at
    ``/dev/null`` and later writes are dropped."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.broken = stream, False

    def _broke(self) -> None:
        self.broken = True
        try:
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._broke()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._broke()

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def _error(message: object) -> None:
    print(f"fedmedbench: error: {printable(message)}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmedbench",
        description="Federated learning in healthcare: utility, privacy and cost side by side.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a matrix (default: the built-in quickstart)")
    r.add_argument("matrix", nargs="?", help="matrix TOML file; omit for the quickstart")
    r.add_argument("--out", default="results", help="results directory (default: results)")
    r.add_argument("--select", action="append", default=[], metavar="AXIS=NAME",
                   help="keep only these values of an axis (repeatable; NAME may be a "
                        "comma-separated list; AXIS may be `seed`)")
    r.add_argument("--executor", default=None, choices=["local", "process", "dask"],
                   help="local: in this process (default); process: a pool of worker "
                        "processes; dask: dask.distributed workers (pip install "
                        "'fedmedbench[dask]')")
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes for --executor process and a local dask cluster "
                        "(default: the CPU cores less one, at least 1)")
    r.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="--executor dask: a running dask scheduler, e.g. tcp://HOST:8786")
    r.add_argument("--cluster", default=None, metavar="FILE",
                   help="--executor dask: a SLURM/PBS cluster file for dask-jobqueue "
                        "(pip install 'fedmedbench[cluster]')")
    r.add_argument("--retries", type=int, default=None, metavar="N",
                   help="times a cell whose worker process died is tried again before it is "
                        "recorded failed (default 1; not in-process)")
    r.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="record a cell failed and kill its process after this many seconds, "
                        "counted from when it is handed to a worker (every executor; local "
                        "then runs each cell in a child process)")
    r.add_argument("--backend", default=None, choices=["auto", "loop", "vectorized"],
                   help="how clients train: auto (vectorized when every component of a cell "
                        "can, else loop; the default, or [run] backend), loop, vectorized")
    r.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the cells whose id falls in shard I of N "
                        "(int(cell_id, 16) %% N == I-1); merge shards with `report`")
    r.add_argument("--max-cells", type=int, default=None, metavar="N",
                   help="refuse a matrix of more cells than this (default: 100,000)")
    r.add_argument("--force", action="store_true", help="rerun cells that already have an ok record")
    r.add_argument("--wait", action="store_true",
                   help="if another run holds the results folder, wait for it to finish "
                        "(default: refuse)")
    r.add_argument("--skip-invalid", action="store_true",
                   help="run even when the results folder holds records of another schema "
                        "(their cells run again; the old files are kept as *.invalid-N)")
    r.add_argument("--dry-run", action="store_true",
                   help="list the cells (those with an ok record in OUT marked done) and exit")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-report", action="store_true",
                   help="neither print the headline nor write the reports into OUT/report/")
    r.add_argument("--verbose", "-v", action="store_true",
                   help="print every table of the report, not only the headline")
    r.add_argument("--isolate-attacks", action="store_true",
                   help="run each cell's attacks in a separate process that receives only "
                        "the serialized attack context (as [evaluate] isolate = true)")

    tu = sub.add_parser(
        "tune", help="choose hyperparameters on rows apart from the published cells', then "
                     "run the cells with the choice and the tuning protocol in their records")
    tu.add_argument("matrix", help="matrix TOML file")
    tu.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2,...",
                    help="a grid axis: a run setting (lr=0.01,0.1) or a component's parameter "
                         "(dp-sgd.max_grad_norm=0.5,1); repeatable")
    tu.add_argument("--tune-seeds", default="1001,1002", metavar="S1,S2",
                    help="the trials' seeds, apart from the matrix's (default 1001,1002)")
    tu.add_argument("--fraction", type=float, default=0.2,
                    help="share of each site's training rows reserved for tuning (default 0.2)")
    tu.add_argument("--validation", type=float, default=0.25,
                    help="share of the tuning rows the trials validate on (default 0.25)")
    tu.add_argument("--tolerance", type=float, default=0.0,
                    help="a grid point within this of the best mean score ties; the first in "
                         "grid order wins (default 0)")
    tu.add_argument("--out", default="results", help="results directory (default: results)")
    tu.add_argument("--no-progress", action="store_true", help="no progress bars")

    rep = sub.add_parser(
        "report", help="tables, leaderboard, figures and an HTML page from results directories",
        description="Merge one or more results directories (shards) by cell id and write "
                    "every installed reporter's output (markdown, csv, json, figures, html).")
    rep.add_argument("results", nargs="*", default=["results"],
                     help="results directories, merged by cell id (an ok record wins)")
    rep.add_argument("--out", default=None, help="write reports here (default: print only)")
    rep.add_argument("--format", action="append", default=None, metavar="REPORTER",
                     help="reporter plugin(s) to run with --out (repeatable or "
                          "comma-separated; default: all installed)")
    rep.add_argument("--skip-invalid", action="store_true",
                     help="skip malformed or other-schema records and list them")
    rep.add_argument("--allow-mixed-versions", action="store_true",
                     help="merge records written by different versions of fedmedbench or of "
                          "a plugin (refused by default: a mean would mix two codes)")
    rep.add_argument("--no-timings", action="store_true",
                     help="leave out wall-clock seconds, so reports of the same cells from "
                          "different runs compare byte for byte")
    rep.add_argument("--quiet", action="store_true", help="do not print the headline")
    rep.add_argument("--verbose", "-v", action="store_true",
                     help="print every table of the report, not only the headline")

    pl = sub.add_parser("plugins", help="list every component: family, name, distribution, version")
    pl.add_argument("--markdown", action="store_true",
                    help="a markdown table with each component's parameters and defaults "
                         "(the README's table of built-ins is this output)")
    ds = sub.add_parser("datasets", help="dataset cards: sites, sizes, task, licence")
    ds.add_argument("--json", action="store_true")
    ck = sub.add_parser("check", help="run the conformance kit against a plugin or component")
    ck.add_argument("plugin", help="entry-point (plugin) name or component name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fedmedbench.errors import install_interrupt_handler

    install_interrupt_handler()
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeSafe(out), _PipeSafe(err)
    try:
        return {"run": cmd_run, "report": cmd_report, "plugins": cmd_plugins,
                "datasets": cmd_datasets, "check": cmd_check,
                "tune": cmd_tune}[args.command](args)
    except (ConfigError, SchemaError, DataError) as exc:
        _error(exc)
        return 2
    except ExecutorLost as exc:  # the cluster died: what finished is saved
        _error(exc)
        return 1
    except KeyboardInterrupt:
        print("fedmedbench: interrupted; finished cells are saved, run again to resume",
              file=sys.stderr)
        return 130
    except OSError as exc:  # a path the OS refuses (too long, a loop of links, ...)
        from fedmedbench.fileio import os_error_message

        where = exc.filename if getattr(exc, "filename", None) else "a path"
        _error(str(exc) if type(exc).__name__ == "OutputError"
               else os_error_message(exc, where, option=""))
        return 2
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = out, err


def cmd_run(args: argparse.Namespace) -> int:
    """``fedmedbench run``: :func:`fedmedbench.run`, then the reports into
    ``<out>/report/`` and the headline on the terminal."""
    from fedmedbench.api import plan, run
    from fedmedbench.executors import resolve_settings
    from fedmedbench.fileio import OutputError

    options = {"executor": args.executor, "workers": args.workers, "scheduler": args.scheduler,
               "cluster": args.cluster, "retries": args.retries,
               "cell_timeout": args.cell_timeout}
    if args.dry_run:
        m = plan(args.matrix, select=args.select, shard=args.shard, backend=args.backend,
                 max_cells=args.max_cells)
        resolve_settings(m.executor, **options)
        return _dry_run(m, Path(args.out), force=args.force)
    try:
        results = run(args.matrix, out=args.out, select=args.select, shard=args.shard,
                      backend=args.backend, max_cells=args.max_cells, force=args.force,
                      wait=args.wait, skip_invalid=args.skip_invalid,
                      progress=not args.no_progress, isolate_attacks=args.isolate_attacks,
                      **options)
    except OutputError as exc:
        _error(exc)
        return 1
    code = results.exit_code
    if not args.no_report:
        code = max(code, _summary_and_reports(results, Path(args.out) / REPORT_DIR,
                                              verbose=args.verbose))
    counts = results.counts
    print("cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr)
    return code


#: where ``fedmedbench run`` writes the reports of its cells, inside the results folder
REPORT_DIR = "report"


def _summary_and_reports(results: Any, out: Path, *, verbose: bool) -> int:
    """Write every report of ``results`` into ``out``, print the headline (or
    every table) and where the reports are; 1 if the reports could not be
    written."""
    from fedmedbench.fileio import OutputError, refuse_symlink

    if not results.records:
        return 0
    print(results.summary(verbose=verbose))
    refuse_symlink(out)  # the run's own report folder: never a link to elsewhere
    try:
        paths = results.report(out)
    except OutputError as exc:
        _error(f"the reports could not be written: {exc}")
        return 1
    print(printable(_written(paths, out)))
    return 0


def _written(paths: list[Path], out: Path) -> str:
    """Where the report is: the page and the markdown, and what else is beside them."""
    main_files = [p for p in paths if p.name in ("index.html", "report.md")] or paths[:1]
    rest = len(paths) - len(main_files)
    lines = [f"full report: {main_files[0]}", *(f"             {p}" for p in main_files[1:])]
    if rest:
        lines.append(f"             and {rest} more files (tables/*.csv, figures/, "
                     f"report.json) in {out}/")
    return "\n".join(lines)


def _dry_run(m: Any, out: Path, *, force: bool = False) -> int:
    """Print the cells as they are generated (the first at once); a cell
    that already has an ``ok`` record in ``out`` is marked ``done`` (it will
    not run again, unless ``--force``); a count goes to stderr at the end."""
    from fedmedbench.results import completed_ids

    done = set() if force or not out.is_dir() else completed_ids(out)
    n = k = 0
    try:
        for c in m.iter_cells():
            lab = c["labels"]
            mark = "  done" if c["cell_id"] in done else ""
            print(printable(f"{c['cell_id']} {' '.join(f'{a}={v}' for a, v in lab.items())} "
                            f"seed={c['config']['seed']}{mark}", keep_newlines=False))
            n += 1
            k += bool(mark)
            if n == 1:
                sys.stdout.flush()
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has all it wants
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    left = f", {k} already done in {out}/, {n - k} to run" if k else ""
    print(f"{n} cells{left}", file=sys.stderr)
    return 0


def _grid_value(text: str) -> Any:
    """A grid value from the command line: a number when it reads as one."""
    try:
        v = float(text)
    except ValueError:
        return text
    return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v


def cmd_tune(args: argparse.Namespace) -> int:
    """``fedmedbench tune``: :func:`fedmedbench.tuning.tune` on tuning rows,
    then the published cells with the choice (:mod:`fedmedbench.tuning`)."""
    import json

    from fedmedbench.matrix import read_matrix_file
    from fedmedbench.tuning import TuneSpec, published_cells, tune

    grid: dict[str, list[Any]] = {}
    for p in args.param:
        name, sep, values = p.partition("=")
        if not sep or not name or not values:
            raise ConfigError(f"--param {p!r}: write NAME=V1,V2 (e.g. --param lr=0.01,0.1)")
        grid[name.strip()] = [_grid_value(v.strip()) for v in values.split(",") if v.strip()]
    try:
        seeds = [int(s) for s in args.tune_seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--tune-seeds {args.tune_seeds!r}: integers, comma-separated") from None
    raw = read_matrix_file(args.matrix)
    spec = TuneSpec(params=grid, seeds=seeds, fraction=args.fraction,
                    validation=args.validation, tolerance=args.tolerance)
    result = tune(raw, spec)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"spec": {"params": grid, "seeds": seeds, "fraction": args.fraction,
                    "validation": args.validation, "tolerance": args.tolerance,
                    "rule": spec.rule},
           "choices": result.choices, "trials": result.log}
    from fedmedbench.fileio import write_atomic

    logdir = out / "tuning"  # beside the records, not among them
    logdir.mkdir(exist_ok=True)
    write_atomic(logdir / "log.json", json.dumps(log, indent=1, default=str).encode("utf-8"))
    for choice in result.choices:
        print(printable(f"chose {choice['chosen']} for "
                        f"{' '.join(f'{k}={v}' for k, v in choice['group'].items())}"))
    from fedmedbench.engine import run_cell
    from fedmedbench.results import write_record

    counts: dict[str, int] = {}
    for cell in published_cells(result):
        rec = run_cell(cell)
        write_record(out, rec)
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    print(f"tuning log: {logdir / 'log.json'}; records: {out}/", file=sys.stderr)
    print("cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 1 if counts.get("failed") else 0


def cmd_report(args: argparse.Namespace) -> int:
    """``fedmedbench report``: :func:`fedmedbench.load`, the headline, and
    :meth:`fedmedbench.Results.report` with ``--out``."""
    from fedmedbench.api import check_formats, load
    from fedmedbench.fileio import OutputError
    from fedmedbench.registry import get_registry

    formats = None
    if args.out or args.format:  # every name checked before anything is read or written
        formats = check_formats(args.format, get_registry().names("reporter"))
    results = load(args.results, skip_invalid=args.skip_invalid,
                   allow_mixed_versions=args.allow_mixed_versions)
    for s in results.skipped:
        print(printable(f"skipped: {s}"), file=sys.stderr)
    if results.skipped:
        print(f"skipped {len(results.skipped)} invalid record file(s) of "
              f"{len(results.skipped) + len(results)} read; the report covers the other "
              f"{len(results)}", file=sys.stderr)
    if not results.records:
        raise ConfigError(f"no result records in {', '.join(map(str, results.dirs))}; run "
                          f"`fedmedbench run MATRIX --out DIR` first")
    if not args.quiet:
        from fedmedbench.report import terminal_summary

        print(terminal_summary(results.data(timings=not args.no_timings),
                               verbose=args.verbose))
    if args.out:
        try:
            paths = results.report(args.out, formats=formats, timings=not args.no_timings)
        except OutputError as exc:
            _error(exc)
            return 1
        print(printable(_written(paths, Path(args.out))), file=sys.stderr)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from fedmedbench.registry import get_registry

    reg = get_registry()
    if args.markdown:
        print(plugins_markdown(reg.all()))
        return 0
    rows = [[printable(x, keep_newlines=False) for x in
             (i.family, i.name, i.plugin, i.distribution, i.version, i.doc[:70])]
            for i in reg.all()]
    print(tabulate(rows, headers=["family", "name", "plugin", "distribution", "version",
                                  "description"]))
    return 0


def _md(text: object) -> str:
    """Text safe in a markdown table cell, written as plainly as it can be
    (the README's table of built-ins is this output): control characters
    shown as escapes, every ``<`` that could open an HTML tag as ``&lt;``
    (``<script>`` stays text), ``|`` escaped, and the ``![`` / ``](`` of an
    image or a link broken by a backslash."""
    import re

    s = printable(str(text).replace("\n", " "), keep_newlines=False)
    s = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", s).replace("|", "\\|")
    return s.replace("![", "!\\[").replace("](", "\\](")


def plugins_markdown(infos: list[Any]) -> str:
    """A markdown table: family, name, description, parameters with defaults
    and, in parentheses, their declared ranges (:mod:`fedmedbench.constraints`)."""
    from fedmedbench.constraints import rules_of, short_text

    lines = ["| family | name | what it is | parameters (defaults, allowed range) |",
             "|---|---|---|---|"]
    for i in infos:
        rules = rules_of(i.cls)
        params = ", ".join(
            f"`{n}={p.default!r}`" + (f" ({short_text(rules[n])})"
                                      if n in rules and short_text(rules[n]) else "")
            for n, p in i.cls.param_spec().items())
        doc = _md(i.doc.replace("``", "`"))
        lines.append(f"| {_md(i.family)} | `{_md(i.name)}` | {doc} | {_md(params) or '—'} |")
    return "\n".join(lines)


def dataset_cards() -> list[dict[str, Any]]:
    from fedmedbench.datafiles import load_card
    from fedmedbench.registry import get_registry

    out = []
    for info in get_registry().all("dataset"):
        cls = info.cls
        card: dict[str, Any] = {}
        if cls.card:
            try:
                card = load_card(cls.card)
            except DataError as exc:
                card = {"error": str(exc)}
        entry = {"name": info.name, "plugin": info.plugin,
                 "needs_user_files": cls.needs_user_files, **card}
        try:
            entry.update(cls().describe())
        except Exception as exc:  # a card must still print when describe fails
            entry["describe_error"] = f"{type(exc).__name__}: {exc}"
        out.append(entry)
    return out


def cmd_datasets(args: argparse.Namespace) -> int:
    cards = dataset_cards()
    if args.json:  # JSON escapes every control character itself
        print(json.dumps(cards, indent=1, default=str))
        return 0
    for c in cards:
        flag = "  (needs files you supply)" if c.get("needs_user_files") else ""
        print(printable(f"{c['name']}{flag}", keep_newlines=False))
        for key in ("title", "task", "metric", "sites", "licence", "source", "citation",
                    "partition", "preprocessing", "access", "note"):
            if key in c:
                v = c[key]
                if isinstance(v, dict):
                    v = ", ".join(f"{k}: {x}" for k, x in v.items())
                elif isinstance(v, list):
                    v = ", ".join(map(str, v))
                print(printable(f"  {key:<13} {v}", keep_newlines=False))
        if "error" in c:
            print(printable(f"  error         {c['error']}", keep_newlines=False))
        print()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """``fedmedbench check NAME``: the conformance kit on a plugin or a
    component; an unknown name is a usage error with a did-you-mean."""
    import difflib

    from fedmedbench.registry import get_registry

    infos = get_registry().all()
    known = sorted({i.plugin for i in infos} | {i.name for i in infos})
    if args.plugin not in known:
        close = difflib.get_close_matches(args.plugin, known, n=1, cutoff=0.5)
        hint = f" did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"no plugin or component named {args.plugin!r};{hint} `fedmedbench "
                          f"plugins` lists plugins (column plugin) and components (column name)")
    from fedmedbench.testing import run_checks

    failures = run_checks(args.plugin)
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
