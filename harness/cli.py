"""The ``fedmedbench`` command line.

Exit codes: 0 every cell ok or skipped; 1 some cell failed or diverged (the
rest still ran and were saved); 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from fedmedbench.errors import ConfigError, DataError, SchemaError


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
    r.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-report", action="store_true", help="do not print the table afterwards")

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
    rep.add_argument("--no-timings", action="store_true",
                     help="leave out wall-clock seconds, so reports of the same cells from "
                          "different runs compare byte for byte")
    rep.add_argument("--quiet", action="store_true", help="do not print the tables")

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
    try:
        return {"run": cmd_run, "report": cmd_report, "plugins": cmd_plugins,
                "datasets": cmd_datasets, "check": cmd_check}[args.command](args)
    except (ConfigError, SchemaError, DataError) as exc:
        print(f"fedmedbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmedbench: interrupted; finished cells are saved, run again to resume",
              file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from fedmedbench.executors import resolve_settings
    from fedmedbench.fileio import OutputError, probe_writable
    from fedmedbench.matrix import MAX_CELLS, load_matrix

    m = load_matrix(args.matrix, select=args.select)
    settings = resolve_settings(m.executor, executor=args.executor, workers=args.workers,
                                scheduler=args.scheduler, cluster=args.cluster,
                                retries=args.retries, cell_timeout=args.cell_timeout)
    if args.max_cells is not None and args.max_cells < 1:
        raise ConfigError(f"--max-cells {args.max_cells}: must be at least 1")
    if args.shard is not None:
        m.set_shard(args.shard)
    if args.backend is not None:  # an execution option: not part of the cell ids
        m.execution["backend"] = args.backend
    n = m.check_size(args.max_cells or MAX_CELLS)
    if args.dry_run:
        return _dry_run(m)
    out = Path(args.out)
    try:
        probe_writable(out)  # before any cell trains
    except OutputError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return _run_locked(args, m, out, n, settings)
    except OutputError as exc:  # the lock file could not be written
        raise ConfigError(str(exc)) from None


def _run_locked(args: argparse.Namespace, m: Any, out: Path, n: int,
                settings: dict[str, Any]) -> int:
    from fedmedbench.executors import execute
    from fedmedbench.fileio import os_error_message
    from fedmedbench.lock import results_lock
    from fedmedbench.report import comparison_tables, summary_counts
    from fedmedbench.results import load_records, remove_stale_temp_files, scan

    with results_lock(out, wait=args.wait,
                      on_wait=lambda msg: print(f"fedmedbench: {msg}", file=sys.stderr)) as lock:
        remove_stale_temp_files(out, before=lock.acquired_at)
        other, untrusted = scan(out)
        if other and not (args.skip_invalid or args.force):
            more = f" ({len(other)} such files)" if len(other) > 1 else ""
            raise SchemaError(f"{other[0]}{more}. Or pass --skip-invalid: their cells then run "
                              f"again and the old files are kept as <name>.invalid-<n>")
        for msg in [*other, *untrusted]:
            print(f"fedmedbench: not resuming from {msg.split(';')[0]}; if this matrix has "
                  f"that cell it runs again, and the file is kept as <name>.invalid-<n>",
                  file=sys.stderr)
        part = f"shard {m.shard[0]}/{m.shard[1]} of " if m.shard else ""
        print(f"matrix {m.name!r}: {part}{n} cells -> {out}/ ({settings['executor']} executor)",
              file=sys.stderr)
        try:
            with warnings.catch_warnings():  # the files kept aside were listed above
                warnings.filterwarnings("ignore", message=r".*kept it as .*\.invalid-",
                                        category=RuntimeWarning)
                ran = execute(m.iter_cells(), out, force=args.force,
                              progress=not args.no_progress, total=None if m.shard else n,
                              **settings)
        except OSError as exc:  # the driver writes only into `out`: name the folder
            print(f"fedmedbench: error: {os_error_message(exc, out)}", file=sys.stderr)
            return 1
        ids = ran.cell_ids
        records, _ = load_records([out], skip_invalid=True)
        mine = [r for r in records if r["cell_id"] in ids]
    if not args.no_report:
        print(comparison_tables(mine))
    counts = summary_counts(mine)
    print("cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr)
    return 1 if counts["failed"] or counts["diverged"] else 0


def _dry_run(m: Any) -> int:
    """Print the cells as they are generated (the first at once)."""
    try:
        for i, c in enumerate(m.iter_cells()):
            lab = c["labels"]
            print(c["cell_id"], " ".join(f"{k}={v}" for k, v in lab.items()),
                  f"seed={c['config']['seed']}")
            if i == 0:
                sys.stdout.flush()
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has all it wants
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedmedbench.fileio import OutputError, probe_writable
    from fedmedbench.registry import get_registry
    from fedmedbench.report import comparison_tables, strip_timings
    from fedmedbench.results import iter_record_paths, load_records

    dirs = [Path(d) for d in args.results]
    records, skipped = load_records(dirs, skip_invalid=args.skip_invalid)
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} invalid record file(s) of "
              f"{len(skipped) + len(records)} read; the report covers the other "
              f"{len(records)}", file=sys.stderr)
    if not records:
        raise ConfigError(f"no result records in {', '.join(map(str, dirs))}; run "
                          f"`fedmedbench run MATRIX --out DIR` first")
    # where each cell's files live (attacks may store images beside the records)
    where: dict[str, list[str]] = {}
    for d in dirs:
        for p in iter_record_paths(d):
            where.setdefault(p.stem, []).append(str(d))
    records = [{**r, "_dirs": where.get(r["cell_id"], [])} for r in records]
    if args.no_timings:
        records = strip_timings(records)
    if not args.quiet:
        print(comparison_tables(records))
    if args.out:
        reg = get_registry()
        names = ([n for f in args.format for n in f.split(",") if n] if args.format
                 else reg.names("reporter"))
        out = Path(args.out)
        try:
            probe_writable(out)
        except OutputError as exc:
            raise ConfigError(str(exc)) from None
        for n in names:
            rep = reg.build("reporter", {"name": n})
            for p in rep.write(records, out):
                print(f"wrote {p}", file=sys.stderr)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from fedmedbench.registry import get_registry

    reg = get_registry()
    if args.markdown:
        print(plugins_markdown(reg.all()))
        return 0
    rows = [[i.family, i.name, i.plugin, i.distribution, i.version, i.doc[:70]]
            for i in reg.all()]
    print(tabulate(rows, headers=["family", "name", "plugin", "distribution", "version",
                                  "description"]))
    return 0


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
        doc = i.doc.replace("|", "\\|").replace("``", "`")
        lines.append(f"| {i.family} | `{i.name}` | {doc} | {params or '—'} |")
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
    if args.json:
        print(json.dumps(cards, indent=1, default=str))
        return 0
    for c in cards:
        flag = "  (needs files you supply)" if c.get("needs_user_files") else ""
        print(f"{c['name']}{flag}")
        for key in ("title", "task", "metric", "sites", "licence", "source", "citation",
                    "partition", "preprocessing", "access", "note"):
            if key in c:
                v = c[key]
                if isinstance(v, dict):
                    v = ", ".join(f"{k}: {x}" for k, x in v.items())
                elif isinstance(v, list):
                    v = ", ".join(map(str, v))
                print(f"  {key:<13} {v}")
        if "error" in c:
            print(f"  error         {c['error']}")
        print()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from fedmedbench.testing import run_checks

    failures = run_checks(args.plugin)
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
