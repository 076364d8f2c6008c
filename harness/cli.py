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
    r.add_argument("--device", default=None, choices=["cpu", "auto", "cuda"],
                   help="where the vectorized backend trains: cpu (the default, or [run] "
                        "device; the reference), cuda, auto (CUDA when torch sees one); a "
                        "device other than the CPU is part of the cell ids")
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

    tr = sub.add_parser("tracks", help="the benchmark tracks: data, model, budget, seeds, "
                                       "privacy tiers, attacks, tuning rule",
                        description="List the versioned benchmark tracks, or show one.")
    tr.add_argument("track", nargs="?", help="a track id: show its whole definition")
    tr.add_argument("--json", action="store_true", help="the definitions as JSON")

    sb = sub.add_parser(
        "submit", help="run a plugin package (or the built-in baselines) on a track and write "
                       "a submission folder",
        description="Run PACKAGE (a wheel, a source folder or a pinned requirement NAME==VER) "
                    "on TRACK in a fresh environment and write a submission folder: records, "
                    "the wheel and its hashes, the environment, seeds and the tuning log. "
                    "Without PACKAGE the track's built-in baselines run.")
    sb.add_argument("track", help="track id (`fedmedbench tracks` lists them)")
    sb.add_argument("package", nargs="?", default=None,
                    help="wheel file, source folder or NAME==VERSION; omit for the baselines")
    sb.add_argument("--out", required=True, help="the submission folder to write")
    sb.add_argument("--entry", action="append", default=None, metavar="SPEC",
                    help="an entry: KEY=NAME[,KEY=NAME] (algorithm=fedavgm) or a JSON object "
                         "with algorithm, aggregator, privacy or protections; repeatable "
                         "(default: every algorithm, privacy mechanism and aggregator the "
                         "package registers)")
    sb.add_argument("--tier", action="append", default=[], metavar="TIER",
                    help="only the protections aiming at this tier (all, eps8, eps1); "
                         "repeatable (default: every tier)")
    sb.add_argument("--tune", action="append", default=[], metavar="NAME=V1,V2,...",
                    help="tune this setting under the track's rule (at most its max trials); "
                         "repeatable")
    sb.add_argument("--env", default="fresh", choices=["fresh", "current"],
                    help="fresh: a new virtual environment over this one's packages, other "
                         "plugins blocked (default); current: this process, the package "
                         "already installed")
    sb.add_argument("--signed-off-by", default="", metavar="NAME <EMAIL>",
                    help="who vouches for the submission (a sign-off statement, not a "
                         "cryptographic signature)")

    vf = sub.add_parser(
        "verify", help="check a submission folder's hashes and track; --rerun runs it again "
                       "and compares every number",
        description="Check a submission folder as `leaderboard` does. With --rerun, run every "
                    "cell again from scratch in this environment and compare each record with "
                    "the submitted one: on CPU every number must be equal; each difference "
                    "is listed and the exit code is 1.")
    vf.add_argument("submission", help="a submission folder")
    vf.add_argument("--rerun", action="store_true", help="rerun every cell and compare")
    vf.add_argument("--install", action="store_true",
                    help="first install the submission's wheel here (its hash checked), then "
                         "rerun in a new process (what the CI template does)")
    vf.add_argument("--report", default=None, metavar="FILE",
                    help="write the comparison as JSON to FILE")

    lb = sub.add_parser(
        "leaderboard", help="verify submission folders and merge them into a static "
                            "leaderboard site",
        description="Verify each submission folder (hashes, track version, records made for "
                    "the track) and write one self-contained HTML folder: a page per track "
                    "with the ranked entries, verified claims, the protection scorecard, "
                    "figures and each row's provenance.")
    lb.add_argument("submissions", nargs="+", help="submission folders")
    lb.add_argument("--out", required=True, help="the site folder to write")
    lb.add_argument("--quiet", action="store_true", help="print nothing but errors")

    pl = sub.add_parser("plugins", help="list every component: family, name, distribution, version")
    pl.add_argument("--markdown", action="store_true",
                    help="a markdown table with each component's parameters and defaults "
                         "(docs/plugins.md is this output)")
    ds = sub.add_parser("datasets", help="dataset cards: sites, sizes, task, licence")
    ds.add_argument("--json", action="store_true")
    ck = sub.add_parser("check", help="run the conformance kit against a plugin or component")
    ck.add_argument("plugin", help="entry-point (plugin) name or component name")
    return p


def cli_reference(width: int = 100) -> str:
    """The command-line reference (docs/cli.md's generated part): the help of
    ``fedmedbench`` and of every subcommand, from the argument parser itself,
    wrapped at ``width`` columns."""
    import functools

    p = _parser()
    fmt = functools.partial(argparse.HelpFormatter, width=width, max_help_position=30)
    p.formatter_class = fmt
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    out = ["```text", p.format_help().rstrip(), "```", ""]
    for name, sp in subs.choices.items():
        sp.formatter_class = fmt
        out += [f"### fedmedbench {name}", "", "```text", sp.format_help().rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fedmedbench.errors import install_interrupt_handler

    install_interrupt_handler()
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeSafe(out), _PipeSafe(err)
    try:
        return {"run": cmd_run, "report": cmd_report, "plugins": cmd_plugins,
                "datasets": cmd_datasets, "check": cmd_check,
                "tune": cmd_tune, "tracks": cmd_tracks, "submit": cmd_submit,
                "verify": cmd_verify, "leaderboard": cmd_leaderboard}[args.command](args)
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
                 max_cells=args.max_cells, device=args.device)
        resolve_settings(m.executor, **options)
        return _dry_run(m, Path(args.out), force=args.force)
    try:
        results = run(args.matrix, out=args.out, select=args.select, shard=args.shard,
                      backend=args.backend, max_cells=args.max_cells, force=args.force,
                      wait=args.wait, skip_invalid=args.skip_invalid,
                      progress=not args.no_progress, isolate_attacks=args.isolate_attacks,
                      device=args.device, **options)
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


def cmd_tracks(args: argparse.Namespace) -> int:
    """``fedmedbench tracks [TRACK]``: the track table, or one track in full."""
    from fedmedbench.tracks import TRACKS, get_track

    if args.track:
        t = get_track(args.track)
        if args.json:
            print(json.dumps({**t.definition(), "digest": t.digest}, indent=1,
                             ensure_ascii=False))
            return 0
        print(printable(track_text(t)))
        return 0
    if args.json:
        print(json.dumps([{**t.definition(), "title": t.title, "digest": t.digest}
                          for t in TRACKS], indent=1, ensure_ascii=False))
        return 0
    print(printable(tracks_table()))
    return 0


def tracks_table(width: int = 100) -> str:
    """The tracks as a table of at most ``width`` columns, each title under it."""
    import textwrap

    from fedmedbench.tracks import TRACKS

    rows = []
    for t in TRACKS:
        n = sum(len(ps) for _, ps in t.baselines)
        rows.append([t.ref, _dataset_text(t.dataset), str(t.rounds),
                     ",".join(map(str, t.seeds)), str(len(t.protections)), str(n)])
    headers = ["track", "dataset", "rounds", "seeds", "protections", "baselines"]
    from fedmedbench.report import columns

    out = columns(headers, rows)
    out.append("")
    for t in TRACKS:
        data = " (data: files you supply)" if t.needs_user_files else ""
        out += textwrap.wrap(f"{t.ref}: {t.title}{data}", width, subsequent_indent="  ")
    out.append("")
    out.append("`fedmedbench tracks ID` shows a whole definition; `fedmedbench submit ID` runs "
               "its baselines.")
    return "\n".join(out)


def _dataset_text(spec: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}[{params}]" if params else spec["name"]


def track_text(t: Any, width: int = 100) -> str:
    """One track in full, wrapped to ``width`` columns."""
    import textwrap

    def para(key: str, text: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=f"{key:<13}",
                             subsequent_indent=" " * 13, break_on_hyphens=False) or [key]

    def stack(s: Any) -> str:
        items = s if isinstance(s, list) else [s]
        def one(x: Any) -> str:
            if isinstance(x, str):
                return x
            params = ", ".join(f"{k}={v}" for k, v in x.items() if k != "name")
            return f"{x['name']}({params})" if params else str(x["name"])

        return " + ".join(one(x) for x in items)

    lines = [f"{t.ref}: {t.title}", ""]
    lines += para("summary", t.summary)
    lines += para("provenance", t.provenance)
    lines += para("dataset", _dataset_text(t.dataset) + f"; partitioner {t.partitioner}; "
                  f"model {t.model if isinstance(t.model, str) else t.model['name']}")
    lines += para("budget", f"{t.rounds} rounds; " + ", ".join(f"{k}={v}" for k, v in
                                                                t.run.items()))
    if t.run_overrides:
        lines += para("", "; ".join(f"{c}: " + ", ".join(f"{k}={v}" for k, v in o.items())
                                    for c, o in t.run_overrides.items()))
    lines += para("seeds", ", ".join(map(str, t.seeds)))
    lines += para("aggregator", stack(t.aggregator))
    lines += para("tiers", "; ".join(f"{x.id}: {x.name}" for x in t.tiers))
    for p in t.protections:
        lines += para("protection", f"{p.id} ({p.tier}): {stack(p.stack)}")
    lines += para("baselines", "; ".join(f"{a if isinstance(a, str) else stack(a)} under "
                                         f"{', '.join(ps)}" for a, ps in t.baselines))
    lines += para("attacks", ", ".join(stack(a) for a in t.attacks) + " on every entry")
    for unit, a in t.audits.items():
        model = a.get("model")
        lines += para("audit", f"{unit}-level claims: {stack(a['attack'])}"
                      + (f" on {stack(model)} (same mechanism and settings)" if model else ""))
    lines += para("tuning", t.tuning.text())
    lines += para("metric", f"the dataset's metric on the pooled test set; {t.metric_ci}")
    lines += para("digest", t.digest)
    return "\n".join(lines)


def _grid(items: list[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for p in items:
        name, sep, values = p.partition("=")
        if not sep or not name or not values:
            raise ConfigError(f"--tune {p!r}: write NAME=V1,V2 (e.g. --tune lr=0.01,0.1)")
        grid[name.strip()] = [_grid_value(v.strip()) for v in values.split(",") if v.strip()]
    return grid


def cmd_submit(args: argparse.Namespace) -> int:
    """``fedmedbench submit TRACK [PACKAGE]``: :func:`fedmedbench.submit.submit`."""
    from fedmedbench.submit import parse_entry, submit

    entries = [parse_entry(e) for e in args.entry] if args.entry else None
    if entries and args.package is None:
        raise ConfigError("--entry names entries of a PACKAGE; without one the track's "
                          "baselines run")
    command = "fedmedbench " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(
        "fedmedbench") else "fedmedbench submit " + args.track
    path = submit(args.track, args.package, args.out, entries=entries, tiers=args.tier,
                  tune=_grid(args.tune) or None, env=args.env,
                  signed_off_by=args.signed_off_by, command=command,
                  say=lambda m: print(printable(m), file=sys.stderr, flush=True))
    doc = json.loads(path.read_text(encoding="utf-8"))
    n = sum(1 for k in doc["files"] if k.startswith("records/"))
    print(printable(f"submission: {path.parent}/ ({n} records, track "
                    f"{doc['track']['id']}@{doc['track']['version']}, digest "
                    f"{doc['digest'][:16]})"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``fedmedbench verify DIR [--rerun] [--install]``."""
    import subprocess

    from fedmedbench.submit import install_wheel, rerun, verify

    if args.install:
        verify(args.submission)
        install_wheel(args.submission)
        cmd = [sys.executable, "-m", "fedmedbench.cli", "verify", args.submission]
        cmd += ["--rerun"] if args.rerun else []
        cmd += ["--report", args.report] if args.report else []
        return subprocess.run(cmd).returncode
    sub = verify(args.submission)
    print(printable(f"{args.submission}: verified: {len(sub.records)} records of "
                    f"{sub.label} for track {sub.track.ref}; every file matches its hash"))
    if not args.rerun:
        return 0
    res = rerun(args.submission, say=lambda m: print(printable(m), file=sys.stderr, flush=True))
    if args.report:
        from fedmedbench.fileio import write_atomic

        write_atomic(Path(args.report), (json.dumps(res, indent=1, default=str) + "\n")
                     .encode("utf-8"))
    print(printable(f"rerun: {res['identical']} of {res['cells']} records identical"))
    for m in res["mismatched"]:
        lab = m.get("labels") or {}
        print(printable(f"MISMATCH {m['cell_id']} {lab.get('algorithm')} / "
                        f"{lab.get('privacy')}:"))
        for d in m["differences"]:
            print(printable(f"  {d}"))
    for cid in res["missing"]:
        print(printable(f"MISSING in the rerun: {cid}"))
    for cid in res["extra"]:
        print(printable(f"EXTRA in the rerun (not submitted): {cid}"))
    return 1 if res["mismatched"] or res["missing"] or res["extra"] else 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """``fedmedbench leaderboard DIR... --out SITE``."""
    from fedmedbench.leaderboard import build_site

    paths = build_site(args.submissions, args.out)
    if not args.quiet:
        print(printable(f"leaderboard: {Path(args.out) / 'index.html'} ({len(paths)} files)"))
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
    (docs/plugins.md is this output): control characters
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
                 "needs_user_files": cls.needs_user_files, **card,
                 # the run settings a cell of this dataset trains with unless the matrix
                 # sets them (issue 19.6: every card says how its results were trained)
                 "run_defaults": dict(getattr(cls, "run_defaults", {}) or {}),
                 "default_partitioner": getattr(cls, "default_partitioner", None)}
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
                    "partition", "preprocessing", "access", "note", "run_defaults"):
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
