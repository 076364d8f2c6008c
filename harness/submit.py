"""Submissions: a plugin package run on a track, with its provenance
(``fedmedbench submit``), verified and rerun (``fedmedbench verify``).

``fedmedbench submit TRACK [PACKAGE]`` writes a **submission folder**::

    submission.json     the manifest (schema fedmedbench.submission/1): the track
                        (id, version, digest), the package (name, version, the
                        wheel's SHA-256 and every file's), the entries, the seeds,
                        the environment, the tuning rule and log, and the SHA-256
                        of every file below; a sign-off line and the manifest's
                        own digest
    package/NAME.whl    the exact wheel that ran (absent for the baselines)
    records/ID.json     one result record per cell (fedmedbench.result/1)
    tuning/log.json     every tuning trial (grid point, seed, validation score)

PACKAGE is a wheel file, a source folder (built into a wheel with ``pip
wheel``) or a pinned requirement (``name==version``, downloaded with ``pip
download``); without PACKAGE the track's built-in baselines run. The wheel
is installed into a **fresh virtual environment** (``--env fresh``, the
default) that sees this environment's packages (fedmedbench, torch) through
a path file but installs nothing here; every fedmedbench plugin of another
distribution is blocked there (``FEDMEDBENCH_DISABLE_PLUGINS``), so the
cells run with fedmedbench's built-ins and the package alone.
``--env current`` runs in this process (the package installed already; what
the CI rerun uses inside its own fresh environment).

What an entry runs: each algorithm the package registers under every
protection of the chosen tiers; each privacy mechanism with FedAvg; each
aggregator with FedAvg unprotected; ``--entry`` names entries explicitly.
Attacks the package registers join the track's attacks on the baseline
entries and run **sealed** (``[evaluate] isolate``: a separate process that
gets only the serialized attack context). Every DP entry also runs the
track's audit cells (their canaries change training, so they are apart).

``fedmedbench verify DIR`` checks a folder as the leaderboard does
(:func:`verify`); with ``--rerun`` it runs every cell again from scratch in
this environment (tuning included) and compares each record with the
submitted one: every number must be equal, bit for bit (on CPU); each
difference is listed (:func:`rerun`). ``--install`` first installs the
submission's wheel (its hash checked) into this environment: the CI
template (``tox -e rerun``, ``.github/workflows/rerun-submission.yml``)
does exactly that in a fresh environment.

"Signed off" is a statement (``--signed-off-by``, as a DCO sign-off) plus
the manifest digest, not a cryptographic signature: what makes a
submission trustworthy is that CI reruns it and gets the same numbers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmedbench.errors import ConfigError, SchemaError, printable
from fedmedbench.tracks import Protection, Track, get_track

__all__ = ["SUBMISSION_SCHEMA", "MANIFEST", "SubmissionError", "submit", "verify", "rerun",
           "Submission", "plan", "run_plan"]

SUBMISSION_SCHEMA = "fedmedbench.submission/1"
MANIFEST = "submission.json"
RECORDS = "records"
PACKAGE = "package"
TUNING_LOG = "tuning/log.json"
#: the largest manifest read (bytes)
MAX_MANIFEST = 8 * 2**20
#: the largest wheel accepted (bytes)
MAX_WHEEL = 200 * 2**20
#: keys of a record that hold wall-clock measurements (never compared on a rerun); the
#: virtual clock (``clock_s``, ``metrics.clock``) scales a step time measured on each
#: machine, so it is left out too
TIMING_KEYS = ("wall_s", "train_s", "privacy_s", "setup_s", "seconds", "eval_s", "attack_s",
               "clock_s", "clock")


class SubmissionError(ConfigError):
    """A submission folder that does not verify: the message names the file
    and what is wrong with it."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of the manifest as canonical JSON, without its ``digest``."""
    return sha256_bytes(canonical({k: v for k, v in doc.items() if k != "digest"}))


# --------------------------------------------------------------------------
# entries and the cells they run
# --------------------------------------------------------------------------


@dataclass
class Group:
    """One entry under one protection: its matrix, and its tuning grid."""

    entry: str
    algorithm: Any
    protection: Protection
    raw: dict[str, Any]
    grid: dict[str, list[Any]] = field(default_factory=dict)


def _name(spec: Any) -> str:
    return spec if isinstance(spec, str) else str(spec.get("name"))


def parse_entry(text: str) -> dict[str, Any]:
    """An ``--entry``: a JSON object (``{"algorithm": {"name": "fedavgm",
    "beta": 0.5}, "protections": ["none", "dp-sgd-8"]}``) or ``KEY=NAME``
    pairs separated by commas (``algorithm=fedavgm,aggregator=median``).
    Keys: ``algorithm`` (required), ``aggregator``, ``privacy`` (a stack of
    its own) or ``protections`` (the track's protection ids)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            e = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--entry {text!r}: not JSON ({exc.msg})") from None
    else:
        e = {}
        for part in text.split(","):
            k, sep, v = part.partition("=")
            if not sep or not k.strip() or not v.strip():
                raise ConfigError(f"--entry {text!r}: write KEY=NAME[,KEY=NAME] (e.g. "
                                  f"algorithm=fedavgm) or a JSON object")
            e[k.strip()] = v.strip()
        if "protections" in e:
            e["protections"] = e["protections"].split("+")
    bad = sorted(set(e) - {"algorithm", "aggregator", "privacy", "protections"})
    if bad or "algorithm" not in e:
        raise ConfigError(f"--entry {text!r}: keys are algorithm (required), aggregator, "
                          f"privacy, protections" + (f"; unknown: {', '.join(bad)}" if bad
                                                     else ""))
    return e


def default_entries(track: Track, components: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Entries for a package's components ``(family, name)``: algorithms under
    the track's protections, privacy mechanisms with FedAvg, aggregators
    with FedAvg; attacks ride on the baselines (see :func:`plan`)."""
    out: list[dict[str, Any]] = []
    for fam, name in components:
        if fam == "algorithm":
            out.append({"algorithm": name})
        elif fam == "privacy":
            out.append({"algorithm": "fedavg", "privacy": {"name": name}})
        elif fam == "aggregator":
            out.append({"algorithm": "fedavg", "aggregator": name, "protections": ["none"]})
    return out


def plan(track: Track, entries: list[dict[str, Any]] | None, *, tiers: Iterable[str] = (),
         attacks: list[Any] | None = None, isolate: bool = False,
         tune: dict[str, list[Any]] | None = None) -> list[Group]:
    """The groups a submission runs. ``entries=None`` means the track's
    baselines (tuned over the track's baseline grid); ``tiers`` keeps the
    protections aiming at those tiers (all when empty); ``attacks`` are
    added to every entry's attacks (a package's own, run sealed with
    ``isolate``)."""
    keep = set(tiers)
    for t in keep:
        track.tier(t)  # a typo is an error, not an empty submission
    groups: list[Group] = []

    def add(label: str, alg: Any, prot: Protection, aggregator: Any, grid: dict) -> None:
        if keep and prot.tier not in keep:
            return
        raw = track.matrix(algorithm=alg, protection=prot, aggregator=aggregator,
                           attacks=attacks, isolate=isolate)
        groups.append(Group(label, alg, prot, raw, dict(grid)))

    if entries is None:
        grid = track.tuning.baseline_grid
        for alg, pids in track.baselines:
            for pid in pids:
                add(_name(alg), alg, track.protection(pid), None, grid)
    else:
        for e in entries:
            alg = e["algorithm"]
            label = _name(alg)
            if "privacy" in e:
                st = e["privacy"]
                prot = Protection(f"own:{'+'.join(_name(s) for s in (st if isinstance(st, list) else [st]))}",
                                  st, "all")
                add(label, alg, prot, e.get("aggregator"), tune or {})
                continue
            for pid in e.get("protections") or [p.id for p in track.protections]:
                add(label, alg, track.protection(pid), e.get("aggregator"), tune or {})
    if not groups:
        raise ConfigError(f"track {track.id}: nothing to run (no entry has a protection in "
                          f"tier(s) {', '.join(sorted(keep))})")
    if tune:
        from fedmedbench.tuning import TuneSpec

        n = len(TuneSpec(params=tune).grid())
        if n > track.tuning.max_trials:
            raise ConfigError(f"--tune: {n} grid points; track {track.id} allows at most "
                              f"{track.tuning.max_trials} ({track.tuning.text()})")
    return groups


def untuned_block(track: Track) -> dict[str, Any]:
    """``config.tuning`` of an entry that was not tuned: it trains on the same
    rows as a tuned one (the rows left after the track's tuning rows)."""
    from fedmedbench.tuning import TUNING_SEED

    r = track.tuning
    return {"seed": TUNING_SEED, "fraction": r.fraction, "role": "rest", "rule": r.rule,
            "grid": {}, "trials": 0, "tuning_seeds": [], "validation": r.validation,
            "tolerance": 0.0, "chosen": {}, "mean_validation": None,
            "epsilon_selection": 0.0,
            "protocol": (f"not tuned: the track's settings; trains on the rows left after the "
                         f"track's tuning rows ({1 - r.fraction:g} of each site's training "
                         f"rows), as every entry of the track does"),
            "tuning_rows": "not used"}


def _with_tuning(cell: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    from fedmedbench.matrix import cell_id

    cfg = {**cell["config"], "tuning": block}
    return {**cell, "config": cfg, "cell_id": cell_id(cfg)}


def _units(records: list[dict[str, Any]]) -> list[str]:
    """The units of the DP claims the records make (``record``, ``client``)."""
    out: list[str] = []
    for r in records:
        p = ((r.get("metrics") or {}).get("privacy") or {})
        for u in (p.get("by_unit") or {}):
            if u not in out:
                out.append(u)
        if p.get("unit") and p.get("epsilon") is not None and p["unit"] not in out:
            out.append(p["unit"])
    return out


def run_plan(track: Track, groups: list[Group], out: Path, *, registry: Any = None,
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every group into ``out/records`` (tuning first where a group has
    a grid, then the published cells, then the audit cells of DP entries)
    and write the tuning log. Cells with an ok record there already are not
    run again. Returns the tuning summary for the manifest."""
    from fedmedbench.engine import run_cell
    from fedmedbench.fileio import write_output
    from fedmedbench.matrix import parse_matrix
    from fedmedbench.registry import get_registry
    from fedmedbench.results import completed_ids, read_trusted, write_record
    from fedmedbench.tuning import TuneSpec, published_cells, tune

    reg = registry or get_registry()
    say = say or (lambda m: None)
    rec_dir = out / RECORDS
    rec_dir.mkdir(parents=True, exist_ok=True)
    done = completed_ids(rec_dir)
    log: list[dict[str, Any]] = []
    choices: list[dict[str, Any]] = []
    n_done = 0

    def execute(cells: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        nonlocal n_done
        recs = []
        for cell in cells:
            path = rec_dir / f"{cell['cell_id']}.json"
            if cell["cell_id"] in done:
                recs.append(read_trusted(path))
                continue
            rec = run_cell(cell, registry=reg)
            write_record(rec_dir, rec)
            n_done += 1
            say(f"  {what} seed {cell['config']['seed']}: {rec['status']}"
                + (f" ({(rec.get('error') or {}).get('message', '')})"
                   if rec["status"] not in ("ok", "skipped") else ""))
            recs.append(rec)
        return recs

    for g in groups:
        what = f"{g.entry} / {g.protection.id}"
        say(f"{what}:")
        labels = parse_matrix(g.raw, registry=reg).cells[0]["labels"]
        if g.grid:
            spec = TuneSpec(params=g.grid, seeds=list(track.tuning.seeds),
                            fraction=track.tuning.fraction, validation=track.tuning.validation)
            result = tune(g.raw, spec, registry=reg)
            log += [{**t, "entry": g.entry, "protection": g.protection.id} for t in result.log]
            choices += [{**c, "entry": g.entry, "protection": g.protection.id}
                        for c in result.choices]
            cells = published_cells(result, registry=reg)
            raw_chosen, block, _labels = result.matrix["groups"][0]
            # the labels of the entry as the track names it (labels are not part of a
            # cell's id): the tuned values are in config.tuning, never in the label
            cells = [{**c, "labels": labels} for c in cells]
            say(f"  tuned {spec.grid().__len__()} grid points x {len(spec.seeds)} seeds: chose "
                f"{result.choices[0]['chosen']}")
        else:
            block = untuned_block(track)
            raw_chosen = g.raw
            cells = [_with_tuning(c, block) for c in parse_matrix(g.raw, registry=reg).cells]
        recs = execute(cells, what)
        for unit in _units(recs):
            audit = track.audit_matrix(raw_chosen, unit)
            if audit is None:
                continue
            alabels = parse_matrix(track.audit_matrix(g.raw, unit),
                                   registry=reg).cells[0]["labels"]
            acells = [{**_with_tuning(c, block), "labels": alabels}
                      for c in parse_matrix(audit, registry=reg).cells]
            execute(acells, f"{what} audit ({unit}-level)")
    write_output(out, TUNING_LOG, json.dumps({"rule": track.tuning.text(), "choices": choices,
                                              "trials": log}, indent=1, default=str) + "\n")
    return {"rule": track.tuning.text(), "trials": len(log), "choices": choices,
            "cells_run": n_done}


# --------------------------------------------------------------------------
# packages and environments
# --------------------------------------------------------------------------


def _pip(python: str | Path, *args: str, env: dict[str, str] | None = None) -> None:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise ConfigError(printable(f"`{' '.join(cmd[1:])}` failed: " + " | ".join(tail)))


def resolve_package(package: str, work: Path) -> Path:
    """A wheel file for PACKAGE: the file itself, a folder built with ``pip
    wheel``, or a pinned requirement downloaded with ``pip download``."""
    p = Path(package)
    work.mkdir(parents=True, exist_ok=True)
    if p.is_file():
        if p.suffix != ".whl":
            raise ConfigError(f"{package}: give a wheel (.whl), a source folder or a pinned "
                              f"requirement NAME==VERSION")
        return p
    if p.is_dir():
        _pip(sys.executable, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work),
             str(p))
    elif "==" in package and not any(c in package for c in "<>~!*"):
        _pip(sys.executable, "download", "--no-deps", "--only-binary=:all:", "-d", str(work),
             package)
    else:
        raise ConfigError(f"{package!r}: neither a wheel file, a folder nor a pinned "
                          f"requirement (write NAME==VERSION: a submission runs exactly one "
                          f"version)")
    wheels = sorted(work.glob("*.whl"))
    if len(wheels) != 1:
        raise ConfigError(f"{package}: expected one wheel, got {[w.name for w in wheels]}")
    return wheels[0]


def wheel_info(wheel: Path) -> dict[str, Any]:
    """Name, version, SHA-256 of the wheel and of every file in it, and the
    fedmedbench entry points it declares (read from the zip, nothing run)."""
    if wheel.stat().st_size > MAX_WHEEL:
        raise ConfigError(f"{wheel}: larger than {MAX_WHEEL // 2**20} MiB")
    files: dict[str, str] = {}
    meta: dict[str, str] = {}
    eps: list[str] = []
    with zipfile.ZipFile(wheel) as z:
        total = 0
        for info in z.infolist():
            if info.is_dir():
                continue
            total += info.file_size
            if total > 4 * MAX_WHEEL:
                raise ConfigError(f"{wheel}: unpacks to more than {4 * MAX_WHEEL // 2**20} MiB")
            data = z.read(info)
            files[info.filename] = sha256_bytes(data)
            if info.filename.endswith(".dist-info/METADATA"):
                for line in data.decode("utf-8", "replace").splitlines():
                    k, sep, v = line.partition(": ")
                    if sep and k in ("Name", "Version") and k not in meta:
                        meta[k] = v.strip()
            if info.filename.endswith(".dist-info/entry_points.txt"):
                group = ""
                for line in data.decode("utf-8", "replace").splitlines():
                    line = line.strip()
                    if line.startswith("["):
                        group = line.strip("[]")
                    elif line and group == "fedmedbench":
                        eps.append(line)
    if "Name" not in meta:
        raise ConfigError(f"{wheel}: not a wheel (no .dist-info/METADATA)")
    if not eps:
        raise ConfigError(f"{wheel}: declares no entry point in the `fedmedbench` group, so "
                          f"fedmedbench would load nothing from it (pyproject.toml: "
                          f"[project.entry-points.fedmedbench])")
    return {"name": meta["Name"], "version": meta.get("Version", ""),
            "wheel": f"{PACKAGE}/{wheel.name}", "sha256": sha256_path(wheel),
            "entry_points": eps, "files": dict(sorted(files.items()))}


def _norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def other_plugins(keep: Iterable[str]) -> list[str]:
    """Entry-point names of the ``fedmedbench`` group whose distribution is
    not in ``keep`` (blocked in a submission's environment)."""
    from importlib import metadata

    keep = {_norm(k) for k in keep}
    out = []
    for ep in metadata.entry_points(group="fedmedbench"):
        dist = getattr(ep, "dist", None)
        if dist is None or _norm(dist.metadata["Name"]) not in keep:
            out.append(ep.name)
    return sorted(set(out))


def fresh_env(where: Path) -> Path:
    """A new virtual environment at ``where`` that sees this environment's
    packages through a path file (``_fedmedbench_parent.pth``: fedmedbench,
    torch and their dependencies come from here, nothing is installed here),
    with its own site-packages first. Returns its python."""
    import site
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True,
                   capture_output=True)
    py = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    parents = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"],
                                         *site.getsitepackages()]) if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    Path(purelib, "_fedmedbench_parent.pth").write_text(lines, encoding="utf-8")
    return py


def environment() -> dict[str, Any]:
    """Python, torch, fedmedbench, platform and git commit of this process."""
    from fedmedbench.results import provenance

    p = provenance(False)
    return {k: p.get(k) for k in ("python", "torch", "fedmedbench", "platform", "git_commit")}


# --------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------


def _components(dist: str | None, registry: Any) -> list[tuple[str, str]]:
    if dist is None:
        return []
    return [(i.family, i.name) for i in registry.all() if _norm(i.distribution) == _norm(dist)]


def run_inside(track_ref: str, out: Path, *, dist: str | None, entries: list[dict] | None,
               tiers: list[str], tune: dict[str, list[Any]] | None,
               say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The part of :func:`submit` that runs in the submission's environment:
    checks that only fedmedbench and ``dist`` provide plugins, plans, runs,
    and returns the run's half of the manifest (written to ``out/.run.json``)."""
    from fedmedbench.fileio import write_output
    from fedmedbench.registry import get_registry

    track = get_track(track_ref)
    reg = get_registry()
    foreign = sorted({f"{i.distribution} ({i.plugin})" for i in reg.all()
                      if _norm(i.distribution or "") not in {"fedmedbench",
                                                             _norm(dist or "fedmedbench")}})
    if foreign:
        raise ConfigError(f"the submission's environment holds plugins of other distributions: "
                          f"{', '.join(foreign)}; a submission runs with fedmedbench's built-ins "
                          f"and its package only (block them with FEDMEDBENCH_DISABLE_PLUGINS, "
                          f"or use --env fresh)")
    comps = _components(dist, reg)
    if dist is not None and not comps:
        raise ConfigError(f"package {dist!r} registers no fedmedbench component here")
    attacks = [{"name": n} for f, n in comps if f == "attack"]
    if entries is None and dist is not None:
        entries = default_entries(track, comps) or None  # an attack package: the baselines
    groups = plan(track, entries, tiers=tiers, attacks=attacks, isolate=bool(attacks),
                  tune=tune)
    tuning = run_plan(track, groups, out, registry=reg, say=say)
    half = {"components": [{"family": f, "name": n} for f, n in comps],
            "entries": entries, "tiers": list(tiers), "tune": tune or {},
            "groups": [{"entry": g.entry, "protection": g.protection.id,
                        "stack": g.protection.stack} for g in groups],
            "attacks_isolated": bool(attacks), "environment": environment(),
            "tuning": tuning}
    write_output(out, ".run.json", json.dumps(half, indent=1, default=str))
    return half


def submit(track_ref: str, package: str | None, out: str | Path, *,
           entries: list[dict[str, Any]] | None = None, tiers: Iterable[str] = (),
           tune: dict[str, list[Any]] | None = None, env: str = "fresh",
           signed_off_by: str = "", command: str = "",
           say: Callable[[str], None] | None = None) -> Path:
    """Run a package (or, with ``package=None``, the built-in baselines) on a
    track and write the submission folder ``out``; returns the manifest's path."""
    say = say or (lambda m: None)
    track = get_track(track_ref)
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ConfigError(f"{out} already holds a submission ({MANIFEST}); choose another "
                          f"--out")
    out.mkdir(parents=True, exist_ok=True)
    if env not in ("fresh", "current"):
        raise ConfigError(f"--env {env!r}; choose fresh or current")
    pkg: dict[str, Any] | None = None
    tiers = list(tiers)
    if package is not None:
        with tempfile.TemporaryDirectory(prefix="fmb-wheel-") as tmp:
            wheel = resolve_package(package, Path(tmp))
            pkg = wheel_info(wheel)
            (out / PACKAGE).mkdir(exist_ok=True)
            shutil.copyfile(wheel, out / pkg["wheel"])
        pkg["requirement"] = package if not Path(package).exists() else Path(package).name
    dist = pkg["name"] if pkg else None
    if env == "current" or pkg is None:
        half = run_inside(track.ref, out, dist=dist, entries=entries, tiers=tiers, tune=tune,
                          say=say)
        half["environment"]["isolation"] = ("this process" if env == "current" else
                                            "this process (the built-ins only)")
    else:
        with tempfile.TemporaryDirectory(prefix="fmb-env-") as tmp:
            say(f"fresh environment for {pkg['name']} {pkg['version']} ...")
            py = fresh_env(Path(tmp) / "env")
            child_env = {k: v for k, v in os.environ.items() if k != "FEDMEDBENCH_PLUGINS"}
            blocked = other_plugins(["fedmedbench", pkg["name"]])
            if blocked:
                child_env["FEDMEDBENCH_DISABLE_PLUGINS"] = ",".join(blocked)
            _pip(py, "install", str(out / pkg["wheel"]), env=child_env)
            cmd = [str(py), "-m", "fedmedbench.submit", "_inside", track.ref, str(out),
                   "--dist", pkg["name"], "--json",
                   json.dumps({"entries": entries, "tiers": tiers, "tune": tune})]
            proc = subprocess.run(cmd, env=child_env, stdout=sys.stderr)
            if proc.returncode != 0:
                raise ConfigError(f"the submission's run failed in its environment (exit "
                                  f"{proc.returncode}); see the messages above")
        half = json.loads((out / ".run.json").read_text(encoding="utf-8"))
        half["environment"]["isolation"] = ("a fresh virtual environment over this one's "
                                            "packages; plugins of other distributions "
                                            "blocked")
    (out / ".run.json").unlink(missing_ok=True)
    return write_manifest(track, out, pkg, half, signed_off_by=signed_off_by, command=command)


def write_manifest(track: Track, out: Path, pkg: dict[str, Any] | None, half: dict[str, Any],
                   *, signed_off_by: str = "", command: str = "") -> Path:
    from fedmedbench.fileio import write_output
    from fedmedbench.results import iter_record_paths

    files = {f"{RECORDS}/{p.name}": sha256_path(p) for p in iter_record_paths(out / RECORDS)}
    files[TUNING_LOG] = sha256_path(out / TUNING_LOG)
    doc: dict[str, Any] = {
        "schema": SUBMISSION_SCHEMA,
        "track": {"id": track.id, "version": track.version, "digest": track.digest},
        "package": pkg,
        "entries": half["entries"], "tiers": half["tiers"], "tune": half["tune"],
        "components": half["components"], "groups": half["groups"],
        "attacks_isolated": half["attacks_isolated"],
        "seeds": list(track.seeds),
        "environment": half["environment"],
        "tuning": {k: half["tuning"][k] for k in ("rule", "trials", "choices")}
        | {"log": TUNING_LOG},
        "files": dict(sorted(files.items())),
        "command": command,
        "signed_off_by": signed_off_by,
    }
    doc["digest"] = manifest_digest(doc)
    return write_output(out, MANIFEST, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------
# verify and rerun
# --------------------------------------------------------------------------


@dataclass
class Submission:
    """A verified submission folder."""

    path: Path
    manifest: dict[str, Any]
    track: Track
    records: list[dict[str, Any]]

    @property
    def label(self) -> str:
        p = self.manifest.get("package")
        return f"{p['name']} {p['version']}" if p else "baselines (fedmedbench built-ins)"

    @property
    def distribution(self) -> str | None:
        p = self.manifest.get("package")
        return p["name"] if p else None


def _refuse(path: Path, why: str) -> SubmissionError:
    return SubmissionError(printable(f"{path}: {why}; the submission is refused",
                                     keep_newlines=False))


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        if path.is_symlink() or not path.is_file():
            raise _refuse(path, "missing, or not a regular file")
        if path.stat().st_size > MAX_MANIFEST:
            raise _refuse(path, f"larger than {MAX_MANIFEST // 2**20} MiB")
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise _refuse(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SUBMISSION_SCHEMA:
        raise _refuse(path, f"not a {SUBMISSION_SCHEMA} manifest")
    for key, typ in (("track", dict), ("files", dict), ("digest", str), ("seeds", list)):
        if not isinstance(doc.get(key), typ):
            raise _refuse(path, f"malformed manifest ({key})")
    if manifest_digest(doc) != doc["digest"]:
        raise _refuse(path, "its digest does not match its contents (edited after it was "
                            "written)")
    return doc


def verify(folder: str | Path) -> Submission:
    """Check a submission folder; :class:`SubmissionError` naming the file
    at the first problem: the manifest's digest; the track (id, version and
    digest must be this fedmedbench's); every listed file's SHA-256, no
    record file that is not listed; the wheel's hash; each record readable,
    its id its config's hash, made for this track (dataset, split, model
    family, rounds, seeds, run settings, attacks) and by fedmedbench and
    the package alone."""
    from fedmedbench.results import iter_record_paths, read_trusted

    folder = Path(folder)
    doc = read_manifest(folder)
    mpath = folder / MANIFEST
    t = doc["track"]
    try:
        track = get_track(str(t.get("id")))
    except ConfigError as exc:
        raise _refuse(mpath, str(exc)) from None
    if t.get("version") != track.version or t.get("digest") != track.digest:
        raise _refuse(mpath, f"made for track {t.get('id')}@{t.get('version')} (digest "
                             f"{str(t.get('digest'))[:12]}), but this fedmedbench defines "
                             f"{track.ref} (digest {track.digest[:12]})")
    files = doc["files"]
    listed = set()
    for rel, digest in sorted(files.items()):
        p = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise _refuse(mpath, f"lists a file outside the folder ({rel!r})")
        if p.is_symlink() or not p.is_file():
            raise _refuse(p, "listed in the manifest but missing (or not a regular file)")
        if sha256_path(p) != digest:
            raise _refuse(p, "its SHA-256 does not match the manifest (the file was changed "
                             "after the submission was written)")
        listed.add(p.name if rel.startswith(f"{RECORDS}/") else rel)
    for p in iter_record_paths(folder / RECORDS):
        if p.name not in listed:
            raise _refuse(p, "a record the manifest does not list")
    pkg = doc.get("package")
    if pkg is not None:
        w = folder / str(pkg.get("wheel", ""))
        if not w.is_file() or sha256_path(w) != pkg.get("sha256"):
            raise _refuse(w, "the package's wheel is missing or its SHA-256 does not match")
    keep = {"fedmedbench", _norm(pkg["name"]) if pkg else "fedmedbench"}
    records = []
    for rel in sorted(files):
        if not rel.startswith(f"{RECORDS}/"):
            continue
        p = folder / rel
        try:
            rec = read_trusted(p)
        except SchemaError as exc:
            raise _refuse(p, str(exc).split(": ", 1)[-1]) from None
        why = track_problem(track, rec, doc)
        if why:
            raise _refuse(p, why)
        plugins = ((rec.get("provenance") or {}).get("plugins") or {})
        other = sorted({str((v or {}).get("distribution")) for v in plugins.values()
                        if _norm(str((v or {}).get("distribution"))) not in keep})
        if other:
            raise _refuse(p, f"written with plugins of {', '.join(other)}, which this "
                             f"submission does not declare")
        records.append(rec)
    if not records:
        raise _refuse(folder / RECORDS, "no records")
    return Submission(folder, doc, track, records)


def track_problem(track: Track, rec: dict[str, Any], doc: dict[str, Any]) -> str | None:
    """Why ``rec`` was not made for ``track`` (``None``: it was)."""
    cfg = rec.get("config") or {}

    def norm(v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    if (cfg.get("dataset") or {}).get("name") != track.dataset["name"]:
        return f"dataset {(cfg.get('dataset') or {}).get('name')!r} is not the track's"
    for k, v in track.dataset.items():
        if (cfg.get("dataset") or {}).get(k) != v:
            return f"dataset parameter {k} = {(cfg.get('dataset') or {}).get(k)!r}, the track " \
                   f"fixes {v!r}"
    if cfg.get("rounds") != track.rounds:
        return f"rounds = {cfg.get('rounds')!r}, the track fixes {track.rounds}"
    if cfg.get("seed") not in track.seeds:
        return f"seed {cfg.get('seed')!r} is not one of the track's {list(track.seeds)}"
    run = cfg.get("run") or {}
    comps = {norm(cfg.get(a)).get("name") for a in ("algorithm", "aggregator")
             if isinstance(norm(cfg.get(a)), dict)}
    comps |= {p.get("name") for p in (cfg.get("privacy") or []) if isinstance(p, dict)}
    fixed = dict(track.run)
    for comp, over in track.run_overrides.items():
        if comp in comps:
            fixed.update(over)
    tuned = set((cfg.get("tuning") or {}).get("chosen") or {})
    for k, v in fixed.items():
        if k in tuned:
            continue
        if run.get(k) != v:
            return f"run setting {k} = {run.get(k)!r}, the track fixes {v!r}"
    tun = cfg.get("tuning") or {}
    if tun.get("role") != "rest" or tun.get("fraction") != track.tuning.fraction:
        return "not trained on the track's rows (config.tuning must be the track's rule)"
    if len(tun.get("chosen") or {}) and tun.get("trials", 0) > track.tuning.max_trials * len(
            track.tuning.seeds):
        return f"tuned with {tun.get('trials')} trials, more than the track allows"
    names = [a.get("name") for a in (cfg.get("attacks") or []) if isinstance(a, dict)]
    audits = {a["attack"]["name"] for a in track.audits.values()}
    if set(names) & audits:
        return None  # an audit cell: the audit attack alone, the entry's settings
    for a in track.attacks:
        if a["name"] not in names:
            return f"the track's attack {a['name']} did not run"
    part = cfg.get("partitioner") or {}
    if track.partitioner != "default" and norm(track.partitioner).get("name") != part.get("name"):
        return "partitioner is not the track's"
    return None


def comparable(rec: dict[str, Any]) -> dict[str, Any]:
    """What a rerun must reproduce exactly: status, metrics, history and
    labels, without wall-clock measurements (:data:`TIMING_KEYS`)."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in TIMING_KEYS}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip({k: copy.deepcopy(rec.get(k)) for k in ("status", "metrics", "history",
                                                           "labels", "error")})


def differences(a: Any, b: Any, path: str = "", out: list[str] | None = None,
                limit: int = 20) -> list[str]:
    """``path: a != b`` for each leaf where ``a`` and ``b`` differ (up to ``limit``)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            differences(x, y, f"{path}[{i}]", out, limit)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        out.append(f"{path}: submitted {json.dumps(a, default=str)[:80]}, rerun "
                   f"{json.dumps(b, default=str)[:80]}")
    return out


def rerun(folder: str | Path, *, work: str | Path | None = None,
          say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Verify ``folder``, run its cells again from scratch in this
    environment (the package must be installed here) and compare each record
    with the submitted one. Returns ``{"cells", "identical", "mismatched":
    [{cell_id, labels, differences}], "missing", "extra", "environment"}``."""
    sub = verify(folder)
    doc = sub.manifest
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="fmb-rerun-")
        work = tmp.name
    try:
        run_inside(sub.track.ref, Path(work), dist=sub.distribution, entries=doc.get("entries"),
                   tiers=doc.get("tiers") or [], tune=doc.get("tune") or None, say=say)
        from fedmedbench.results import load_records

        again = {r["cell_id"]: r for r in load_records([Path(work) / RECORDS])[0]}
    finally:
        if tmp is not None:
            tmp.cleanup()
    submitted = {r["cell_id"]: r for r in sub.records}
    mism = []
    for cid in sorted(set(submitted) & set(again)):
        d = differences(comparable(submitted[cid]), comparable(again[cid]))
        if d:
            mism.append({"cell_id": cid, "labels": submitted[cid].get("labels"),
                         "differences": d})
    return {"cells": len(submitted), "identical": len(set(submitted) & set(again)) - len(mism),
            "mismatched": mism, "missing": sorted(set(submitted) - set(again)),
            "extra": sorted(set(again) - set(submitted)),
            "environment": environment(), "submitted_environment": doc.get("environment")}


def install_wheel(folder: str | Path) -> None:
    """Install the submission's wheel into this environment after checking
    its SHA-256 against the manifest (the CI rerun's first step)."""
    doc = read_manifest(Path(folder))
    pkg = doc.get("package")
    if not pkg:
        return
    w = Path(folder) / pkg["wheel"]
    if not w.is_file() or sha256_path(w) != pkg["sha256"]:
        raise _refuse(w, "the package's wheel is missing or its SHA-256 does not match")
    _pip(sys.executable, "install", "--no-deps", str(w))


def _main(argv: list[str] | None = None) -> int:
    """``python -m fedmedbench.submit _inside TRACK OUT --dist NAME --json SPEC``:
    the run inside a submission's fresh environment (internal)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedmedbench.submit")
    p.add_argument("what", choices=["_inside"])
    p.add_argument("track")
    p.add_argument("out")
    p.add_argument("--dist", default=None)
    p.add_argument("--json", default="{}")
    a = p.parse_args(argv)
    spec = json.loads(a.json)
    try:
        run_inside(a.track, Path(a.out), dist=a.dist, entries=spec.get("entries"),
                   tiers=spec.get("tiers") or [], tune=spec.get("tune") or None,
                   say=lambda m: print(printable(m), file=sys.stderr, flush=True))
    except ConfigError as exc:
        print(f"fedmedbench: error: {printable(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
