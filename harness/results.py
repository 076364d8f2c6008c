"""Result records: one JSON file per cell, written atomically, never pickled.

This module is the one home of the record (the pattern of asv's
``results.py``): the type (:class:`Record`, :data:`RECORD_FIELDS`,
:data:`RECORD_TYPES`), its version (:data:`~fedmedbench.schema.SCHEMA`),
how a record is made (:func:`new_record`, :func:`failed_record`,
:func:`error_block`, :func:`provenance`), written (:func:`write_record`) and
read (:func:`read_record`).

Layout: ``<results>/<cell_id>.json``. A record's ``schema`` is
``fedmedbench.result/1``; loading any other schema fails with the command
that upgrades it.

Writing and reading agree: :func:`write_record` refuses (with
:class:`RecordNotReadable`, naming the field and the plugin that reported it)
a record that :func:`read_record` would refuse: larger than
:data:`MAX_RECORD_BYTES`, an integer over :data:`MAX_INT_DIGITS` digits, a
non-finite number. Reading is bounded and typed: the file must be a regular
file (a symbolic link, a FIFO or a device is refused without opening it for
long, so nothing hangs), at most :data:`MAX_RECORD_BYTES`, JSON nested no
deeper than :data:`MAX_DEPTH`, integers of at most :data:`MAX_INT_DIGITS`
digits (checked before conversion), finite numbers, and every field of the
type :data:`RECORD_TYPES` names; anything else is a :class:`SchemaError`
naming the file and the field. Resume and ``report`` trust a record only when
its ``cell_id`` is its file name and the hash of its ``config``
(:func:`trust_problem`); a record that is not trusted is recomputed, and the
file it would overwrite is kept aside as ``<cell_id>.json.invalid-<n>``
(:func:`set_aside`), never deleted (an identical copy is kept once).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import stat
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from fedmedbench.errors import SchemaError
from fedmedbench.fileio import short_path, write_atomic
from fedmedbench.schema import SCHEMA

STATUSES = ("ok", "failed", "skipped", "diverged")
REQUIRED = ("schema", "cell_id", "status", "config", "metrics")
#: the fields every record has, in the order a new record lists them
RECORD_FIELDS = ("schema", "cell_id", "status", "error", "labels", "matrix", "config",
                 "metrics", "history", "provenance")
#: a record file larger than this is refused unread, and never written (a record is kilobytes)
MAX_RECORD_BYTES = 64 * 2**20
#: JSON nested deeper than this is refused (a record is about 7 levels deep)
MAX_DEPTH = 64
#: an integer with more digits is refused before it is converted (a byte count, a seed
#: below 2**63 and a step count all have at most 20)
MAX_INT_DIGITS = 40


class Record(TypedDict, total=False):
    """One cell's result record (JSON object), schema :data:`~fedmedbench.schema.SCHEMA`.

    ``schema``, ``cell_id``, ``status`` (``ok``, ``failed``, ``skipped``,
    ``diverged``), ``error`` (``None`` or :func:`error_block`), ``labels``
    (the matrix's label of each axis), ``matrix`` (its name), ``config`` (the
    resolved config the cell id hashes), ``metrics`` (``utility``,
    ``privacy``, ``cost``, ``attacks``, ...), ``history`` (per round),
    ``provenance`` (:func:`provenance`); the engine adds ``protocol``,
    ``backend`` (``{name, reason}``) and ``warnings``.
    """

    schema: str
    cell_id: str
    status: str
    error: dict[str, Any] | None
    labels: dict[str, str]
    matrix: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    provenance: dict[str, Any]
    protocol: str
    backend: dict[str, Any]
    warnings: list[dict[str, Any]]


class RecordNotReadable(SchemaError):
    """A record :func:`write_record` refuses because :func:`read_record` could
    not read it back; ``path`` is the offending field (``metrics.attacks.x``)
    and ``plugin`` the plugin that reported it, where known."""

    def __init__(self, message: str, *, path: str = "", plugin: str | None = None,
                 component: str | None = None, too_large: bool = False) -> None:
        super().__init__(message)
        self.path, self.plugin, self.component = path, plugin, component
        self.too_large = too_large


# --------------------------------------------------------------------------
# making records
# --------------------------------------------------------------------------

_PROVENANCE: dict[str, Any] | None = None


def provenance(registry: Any = None) -> dict[str, Any]:
    """Versions of fedmedbench (:data:`fedmedbench.__version__`, the one
    version number), of the plugins of ``registry`` (default: the installed
    ones) with their distributions, python, torch and platform; the git commit
    where known. Without a loadable registry, the plugins are left out."""
    global _PROVENANCE
    if _PROVENANCE is None:
        from importlib import metadata

        from fedmedbench import __version__

        torch = sys.modules.get("torch")
        try:
            tv = torch.__version__ if torch is not None else metadata.version("torch")
        except metadata.PackageNotFoundError:
            tv = None
        _PROVENANCE = {"fedmedbench": __version__, "python": platform.python_version(),
                       "torch": tv, "platform": platform.platform(),
                       "git_commit": _git_commit()}
    out = dict(_PROVENANCE)
    if registry is not False:
        try:
            if registry is None:
                from fedmedbench.registry import get_registry

                registry = get_registry()
            out["plugins"] = {i.plugin: {"distribution": i.distribution, "version": i.version}
                              for i in registry.all()}
        except Exception:  # plugins that do not load: the record says what it can
            pass
    return out


def _git_commit() -> str | None:
    """The commit of the code that runs: a source checkout's HEAD; a wheel
    installed from git: pip's ``direct_url.json``; else
    ``FEDMEDBENCH_GIT_COMMIT`` or ``GITHUB_SHA``; else ``None``."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                 text=True, timeout=5)
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    return (_direct_url_commit() or os.environ.get("FEDMEDBENCH_GIT_COMMIT")
            or os.environ.get("GITHUB_SHA") or None)


def _direct_url_commit(text: str | None = None) -> str | None:
    """The VCS commit in an install's PEP 610 ``direct_url.json`` (``text``,
    or the installed fedmedbench distribution's), or ``None``."""
    from importlib import metadata

    if text is None:
        try:
            text = metadata.distribution("fedmedbench").read_text("direct_url.json")
        except metadata.PackageNotFoundError:
            return None
    try:
        info = json.loads(text or "")
    except ValueError:
        return None
    vcs = info.get("vcs_info") if isinstance(info, dict) else None
    commit = vcs.get("commit_id") if isinstance(vcs, dict) else None
    return commit if isinstance(commit, str) and commit else None


def error_block(kind: str, message: str, *, plugin: str | None = None,
                component: str | None = None, hook: str | None = None,
                tb: str | None = None) -> dict[str, Any]:
    """A record's ``error``: ``{type, message, plugin, component, hook}``
    (and ``traceback`` where given)."""
    err: dict[str, Any] = {"type": kind, "message": message, "plugin": plugin,
                           "component": component, "hook": hook}
    if tb:
        err["traceback"] = tb
    return err


def new_record(cell: dict[str, Any], *, registry: Any = None,
               provenance_: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fresh ``ok`` record of ``cell`` (no metrics yet): what the engine
    fills in as the cell runs. ``registry`` names the plugins in the
    provenance (``False``: none, for a worker whose plugins did not load)."""
    return {"schema": SCHEMA, "cell_id": cell["cell_id"], "status": "ok", "error": None,
            "labels": dict(cell.get("labels") or {}), "matrix": cell.get("matrix"),
            "config": cell["config"], "metrics": {}, "history": [],
            "provenance": provenance_ if provenance_ is not None else provenance(registry)}


def failed_record(cell: dict[str, Any], message: str, kind: str, *,
                  plugin: str | None = None, component: str | None = None,
                  hook: str | None = None, tb: str | None = None, registry: Any = None,
                  status: str = "failed") -> dict[str, Any]:
    """A ``failed`` record of ``cell`` (or of another record: its cell id,
    labels, matrix and config are kept) with :func:`error_block`."""
    rec = new_record(cell, registry=registry)
    rec["status"] = status
    rec["error"] = error_block(kind, message, plugin=plugin, component=component, hook=hook,
                               tb=tb)
    for k in ("protocol", "backend"):
        if k in cell:
            rec[k] = cell[k]
    return rec


def clean_json(v: Any) -> Any:
    """A JSON-ready copy: numpy scalars and arrays become Python numbers and
    lists; NaN and infinities (not JSON) become null."""
    if isinstance(v, np.generic):
        v = v.item()
    elif isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_json(x) for x in v]
    return v


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def encode_record(record: dict[str, Any]) -> bytes:
    """The bytes :func:`write_record` writes: JSON (sorted keys, indent 1),
    checked to be readable by :func:`read_record`.

    Raises
    ------
    TypeError, ValueError
        A value that is not JSON.
    RecordNotReadable
        The record is larger than :data:`MAX_RECORD_BYTES` or holds a value
        :func:`read_record` refuses; the message names the field and the
        plugin that reported it.
    """
    data = json.dumps(clean_json(record), indent=1, sort_keys=True,
                      allow_nan=False).encode("utf-8")
    limit = MAX_RECORD_BYTES
    if len(data) > limit:
        where, size = _largest_field(record)
        owner = owner_of(record, where)
        raise RecordNotReadable(
            f"the cell's record would be {len(data):,} bytes, over the {limit:,} bytes a record "
            f"may have (more than `fedmedbench report` reads); {where} alone is about "
            f"{size:,} bytes{_by(owner)}: report a summary there (or save large arrays as "
            f"files under the cell's artifacts_dir)",
            path=where, plugin=owner[0] if owner else None,
            component=owner[2] if owner else None, too_large=True)
    try:
        _parse(data, "the record")
    except SchemaError as exc:
        where = _first_bad_field(record) or "a field"
        owner = owner_of(record, where)
        why = str(exc).removeprefix("the record: ").split("; delete it")[0]
        raise RecordNotReadable(f"{where}{_by(owner)}: {why}", path=where,
                                plugin=owner[0] if owner else None,
                                component=owner[2] if owner else None) from None
    return data


def write_record(results_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``<results_dir>/<cell_id>.json`` atomically
    (a temporary file in the same folder, fsync, rename), with the mode the
    umask gives. A file already there that is not a trusted record of this
    schema (a symbolic link, a FIFO, a malformed file) is first kept aside
    (:func:`set_aside`), never overwritten or followed.

    Raises
    ------
    RecordNotReadable
        The record could not be read back (:func:`encode_record`); nothing
        is written.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    data = encode_record(record)
    path = results_dir / f"{record['cell_id']}.json"
    if os.path.lexists(path):
        why = _untrusted(path)
        if why:
            kept = set_aside(path)
            warnings.warn(f"{path}: {why}; kept it as {kept.name} and wrote the new record",
                          RuntimeWarning, stacklevel=2)
    write_atomic(path, data)
    return path


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.invalid-<n>`` (the first free ``n``) and
    return the new path; nothing reads those names, and nothing deletes them.
    When an earlier ``.invalid-<k>`` holds the very same bytes, ``path`` is
    removed instead (a copy is kept once) and that file returned, so rerunning
    over the same bad file never piles up copies."""
    path = Path(path)
    st = os.lstat(path)
    digest = None
    n = 1
    while True:
        dest = path.with_name(f"{path.name}.invalid-{n}")
        if not os.path.lexists(dest):
            os.replace(path, dest)
            return dest
        if stat.S_ISREG(st.st_mode):
            try:
                dst = os.lstat(dest)
                if stat.S_ISREG(dst.st_mode) and dst.st_size == st.st_size:
                    digest = digest or _sha256(path)
                    if _sha256(dest) == digest:
                        path.unlink()
                        return dest
            except OSError:
                pass
        n += 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _largest_field(rec: Any) -> tuple[str, int]:
    """The deepest field that holds most of the record's bytes (a path like
    ``metrics.attacks.mia.scores``) and its size."""
    path, v = "", rec
    size = len(json.dumps(clean_json(rec), default=str))
    while isinstance(v, (dict, list)) and v:
        items = list(v.items()) if isinstance(v, dict) else list(enumerate(v))
        sizes = [(len(json.dumps(clean_json(x), default=str)), k, x) for k, x in items]
        best, k, x = max(sizes, key=lambda t: t[0])
        if isinstance(v, list) or best < size / 2:
            break
        path, v, size = f"{path}.{k}" if path else str(k), x, best
    return path or "the record", size


def _first_bad_field(rec: Any) -> str | None:
    """The first field a reader refuses: an integer of more than
    :data:`MAX_INT_DIGITS` digits."""
    stack: list[tuple[Any, str]] = [(rec, "")]
    while stack:
        v, p = stack.pop()
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10 ** MAX_INT_DIGITS:
            return p or "the record"
        if isinstance(v, dict):
            stack.extend((x, f"{p}.{k}" if p else str(k)) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{p}[{i}]") for i, x in enumerate(v))
    return None


def owner_of(rec: dict[str, Any], where: str) -> tuple[str, str, str, str] | None:
    """``(plugin, family, component, distribution)`` that reported field
    ``where`` of ``rec``, where it can be told: an attack's metrics are its
    attack's; the rest of ``metrics`` and the history are the algorithm's."""
    from fedmedbench.errors import ConfigError

    parts = where.split(".")
    cfg: dict[str, Any] = rec["config"] if isinstance(rec.get("config"), dict) else {}
    name: str | None
    if parts[:2] == ["metrics", "attacks"] and len(parts) > 2:
        family, name = "attack", parts[2].split("(")[0]
    elif parts[0] in ("metrics", "history"):
        family, name = "algorithm", (cfg.get("algorithm") or {}).get("name")
    else:
        return None
    try:
        from fedmedbench.registry import get_registry

        info = get_registry().get(family, str(name))
    except (ConfigError, ImportError):
        return None
    return info.plugin, family, info.name, info.distribution


def _by(owner: tuple[str, str, str, str] | None) -> str:
    if owner is None:
        return ""
    plugin, family, name, dist = owner
    return f", reported by the {family} {name!r} of plugin {plugin} ({dist})"


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


class _BadValue(ValueError):
    pass


def _parse_int(s: str) -> int:
    digits = len(s) - (s[0] in "+-")
    if digits > MAX_INT_DIGITS:
        raise _BadValue(f"an integer of {digits:,} digits (at most {MAX_INT_DIGITS} are read)")
    return int(s)


def _parse_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _BadValue(f"the number {s[:40]} is not finite")
    return v


def _parse_constant(s: str) -> Any:
    raise _BadValue(f"{s} is not a JSON number")


def _parse(raw: bytes, where: str) -> Any:
    hint = "delete it or move it away to rerun the cell, or pass --skip-invalid"
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except _BadValue as exc:
        raise SchemaError(f"{where}: not a readable result record ({exc}); {hint}") from None
    except RecursionError:
        raise SchemaError(f"{where}: not a result record (JSON nested too deeply to read); "
                          f"{hint}") from None
    except MemoryError:
        raise SchemaError(f"{where}: too large to read with the memory available; {hint}"
                          ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SchemaError(f"{where}: not a readable result record ({str(exc)[:200]}); {hint}"
                          ) from None


def _read_bounded(path: Path, hint: str) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_RECORD_BYTES`, opened
    without following a link or blocking on a FIFO, read in pieces (never a
    buffer of the limit's size)."""
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise SchemaError(f"{short_path(path)}: a symbolic link, not a record file (records "
                              f"are never read through links); {hint}") from None
        raise SchemaError(f"{short_path(path)}: cannot read it ({exc.strerror or exc}); "
                          f"{hint}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder"
                    if stat.S_ISDIR(st.st_mode) else "a device or socket")
            raise SchemaError(f"{short_path(path)}: not a regular file ({kind}); {hint}")
        if st.st_size > MAX_RECORD_BYTES:
            raise SchemaError(f"{short_path(path)}: {st.st_size:,} bytes, larger than any "
                              f"result record (the limit is {MAX_RECORD_BYTES:,} bytes); {hint}")
        chunks, total = [], 0
        while total <= MAX_RECORD_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_RECORD_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_RECORD_BYTES:
            raise SchemaError(f"{short_path(path)}: larger than any result record (the limit "
                              f"is {MAX_RECORD_BYTES:,} bytes); {hint}")
        return b"".join(chunks)
    except MemoryError:
        raise SchemaError(f"{short_path(path)}: too large to read with the memory available; "
                          f"{hint}") from None
    except OSError as exc:
        raise SchemaError(f"{short_path(path)}: cannot read it ({exc.strerror or exc}); "
                          f"{hint}") from None
    finally:
        os.close(fd)


def read_record(path: Path) -> dict[str, Any]:
    """Load and check one record file: a regular file (links and FIFOs are
    refused without blocking), its size, nesting, integers and numbers, schema
    and the type of every field :data:`RECORD_TYPES` names."""
    path = Path(path)
    hint = "delete it or move it away to rerun the cell, or pass --skip-invalid"
    rec = _parse(_read_bounded(path, hint), short_path(path))
    if not isinstance(rec, dict):
        raise SchemaError(f"{path}: a result record must be a JSON object; {hint}")
    schema = rec.get("schema")
    if schema != SCHEMA:
        raise SchemaError(
            f"{path}: record schema is {_short(schema)}, this fedmedbench reads {SCHEMA!r}. "
            f"Rerun its cell with `fedmedbench run MATRIX --force --out {path.parent}`, "
            f"or read it with the fedmedbench version that wrote it"
        )
    deep = _depth_over(rec, MAX_DEPTH)
    if deep:
        raise SchemaError(f"{path}: malformed record (JSON nested deeper than {MAX_DEPTH} levels "
                          f"at {deep}); {hint}")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise SchemaError(f"{path}: malformed record (missing {', '.join(missing)}); {hint}")
    if rec.get("status") not in STATUSES:
        raise SchemaError(f"{path}: malformed record (status = {_short(rec.get('status'))}; "
                          f"expected one of {', '.join(STATUSES)}); {hint}")
    bad = _type_error(rec, RECORD_TYPES, "")
    if bad:
        raise SchemaError(f"{path}: malformed record ({bad}); {hint}")
    return rec


def trust_problem(path: Path, rec: dict[str, Any]) -> str | None:
    """Why resume and ``report`` must not trust ``rec`` read from ``path``
    (``None``: they may): its ``cell_id`` must be the file name and the hash
    of its ``config``."""
    from fedmedbench.matrix import cell_id

    cid = rec["cell_id"]
    if Path(path).stem != cid:
        return f"its cell_id {_short(cid)} is not its file name"
    try:
        actual = cell_id(rec["config"])
    except (TypeError, ValueError, RecursionError) as exc:
        return f"its config cannot be hashed ({exc})"
    if actual != cid:
        return (f"its config hashes to {actual}, not to its cell_id {cid} (the file was "
                f"edited, or written for another config)")
    return None


def read_trusted(path: Path) -> dict[str, Any]:
    """:func:`read_record`, then :func:`trust_problem` as a :class:`SchemaError`."""
    rec = read_record(path)
    why = trust_problem(path, rec)
    if why:
        raise SchemaError(f"{path}: {why}; delete it or move it away to rerun the cell, or "
                          f"pass --skip-invalid")
    return rec


def _untrusted(path: Path) -> str | None:
    try:
        rec = read_record(path)
    except SchemaError as exc:
        return str(exc).removeprefix(f"{path}: ").removeprefix(f"{short_path(path)}: ")
    return trust_problem(path, rec)


def iter_record_paths(results_dir: Path) -> Iterator[Path]:
    """The record files of a folder: every ``*.json`` entry that is not a
    folder or hidden, links and FIFOs included (the readers refuse them by
    name, so they are reported rather than silently skipped)."""
    d = Path(results_dir)
    if not d.is_dir():
        return iter(())
    out = []
    for p in d.glob("*.json"):
        if p.name.startswith("."):
            continue
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                continue
        except OSError:
            continue
        out.append(p)
    return iter(sorted(out))


def load_records(dirs: list[Path], *, skip_invalid: bool = False, trust: bool = True,
                 origin: dict[str, list[str]] | None = None
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of several result directories, merged by cell id (an ``ok``
    record wins over others; otherwise the last one read). Every file is
    read as ``run`` reads it (:func:`read_record`) and, with ``trust``,
    must pass :func:`trust_problem` (its cell id is its file name and its
    config's hash). Returns the records and, with ``skip_invalid``, messages
    for the files skipped; ``origin`` (where given) gets, per cell id, the
    folders holding a readable record of it."""
    merged: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for d in dirs:
        try:
            is_dir = Path(d).is_dir()
        except OSError as exc:
            raise SchemaError(f"cannot read results directory {short_path(d)} "
                              f"({exc.strerror or exc})") from None
        if not is_dir:
            raise SchemaError(f"results directory {short_path(d)} does not exist")
        for p in iter_record_paths(d):
            try:
                rec = read_trusted(p) if trust else read_record(p)
            except SchemaError as exc:
                if not skip_invalid:
                    raise
                skipped.append(str(exc))
                continue
            if origin is not None:
                origin.setdefault(rec["cell_id"], []).append(str(d))
            cur = merged.get(rec["cell_id"])
            if cur is None or cur["status"] != "ok" or rec["status"] == "ok":
                merged[rec["cell_id"]] = rec
    return [merged[k] for k in sorted(merged)], skipped


def completed_ids(results_dir: Path) -> set[str]:
    """Cell ids with a trusted ``ok`` record (resume skips them). Any other
    file is ignored here: its cell runs again, and :func:`write_record` keeps
    the old file aside. (``fedmedbench run`` refuses beforehand to touch
    records of another schema unless ``--skip-invalid``: :func:`scan`.)"""
    done: set[str] = set()
    for p in iter_record_paths(results_dir):
        v = _verdict(p)
        if v.problem is None and v.status == "ok" and v.cell_id is not None:
            done.add(v.cell_id)
    return done


def scan(results_dir: Path) -> tuple[list[str], list[str]]:
    """Problems of the record files in ``results_dir`` before a run resumes:
    ``(other_schema, untrusted)``, each a list of one-line messages. Records of
    another schema are the other version's results (the run refuses them
    unless told to skip them); untrusted ones (malformed, or failing
    :func:`trust_problem`) are recomputed when their cell runs."""
    other: list[str] = []
    untrusted: list[str] = []
    for p in iter_record_paths(results_dir):
        v = _verdict(p)
        if v.problem is not None:
            (other if v.other_schema else untrusted).append(v.problem)
    return other, untrusted


class _Verdict:
    __slots__ = ("status", "cell_id", "problem", "other_schema")

    def __init__(self, status: str | None, cell_id: str | None, problem: str | None,
                 other_schema: bool = False) -> None:
        self.status, self.cell_id = status, cell_id
        self.problem, self.other_schema = problem, other_schema


#: what resume concluded about a record file, by (path, inode, size, mtime):
#: ``run`` scans before resuming and the executor asks again, one read each
_VERDICTS: dict[tuple[str, int, int, int], _Verdict] = {}


def _verdict(p: Path) -> _Verdict:
    try:
        st = os.lstat(p)
        key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError as exc:
        return _Verdict(None, None, f"{p}: cannot read it ({exc.strerror})")
    hit = _VERDICTS.get(key)
    if hit is not None:
        return hit
    try:
        rec = read_record(p)
    except SchemaError as exc:
        v = _Verdict(None, None, str(exc), other_schema=_schema_of(p) not in (SCHEMA, None))
    else:
        why = trust_problem(p, rec)
        v = _Verdict(rec["status"], rec["cell_id"], f"{p}: {why}" if why else None)
    if len(_VERDICTS) > 1_000_000:
        _VERDICTS.clear()
    _VERDICTS[key] = v
    return v


def remove_stale_temp_files(results_dir: Path, *, before: float) -> list[Path]:
    """Remove the temp files (``.<cell_id>.*.tmp``) that an interrupted write
    left in ``results_dir``, if last modified before ``before`` (a
    ``time.time()``; the caller holds the run lock, so no live writer's file
    is older than the lock). Returns the files removed."""
    gone: list[Path] = []
    d = Path(results_dir)
    if not d.is_dir():
        return gone
    for p in d.glob(".*.tmp"):
        try:
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < before:
                p.unlink()
                gone.append(p)
        except OSError:
            pass
    return gone


def _schema_of(path: Path) -> str | None:
    try:
        rec = _parse(_read_bounded(Path(path), ""), str(path))
        return rec.get("schema") if isinstance(rec, dict) else None
    except SchemaError:
        return None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _depth_over(v: Any, limit: int) -> str | None:
    """The path of the first container nested deeper than ``limit``, or ``None``."""
    stack: list[tuple[Any, int]] = [(v, 1)]
    deepest = 1
    while stack:  # a quick pass without paths: records are almost always fine
        x, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > limit:
            break
        for y in (x.values() if isinstance(x, dict) else x):
            if isinstance(y, (dict, list)):
                stack.append((y, depth + 1))
    if deepest <= limit:
        return None
    return _deep_path(v, limit)


def _deep_path(v: Any, limit: int) -> str:
    stack2: list[tuple[Any, int, str]] = [(v, 1, "")]
    while stack2:
        x, depth, path = stack2.pop()
        if depth > limit:
            return (path[:60] + "...") if len(path) > 60 else (path or "the top")
        items = x.items() if isinstance(x, dict) else enumerate(x)
        for k, y in items:
            if isinstance(y, (dict, list)):
                sub = (f"{path}.{k}" if path else str(k)) if isinstance(x, dict) \
                    else f"{path}[{k}]"
                stack2.append((y, depth + 1, sub))
    return "the top"  # pragma: no cover


# --------------------------------------------------------------------------
# field types
# --------------------------------------------------------------------------


class _Number:
    """An int or float, not a bool."""


NUMBER = _Number()


class Opt:
    """``spec`` or null."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


class DictOf:
    """A JSON object whose values all match ``spec``."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


class ListOf:
    """A JSON array whose items all match ``spec``."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


#: a component config: an object with a string ``name``
_COMPONENT = {"name": str}

#: The type of every field a reader relies on: a dict is an object whose
#: listed keys, where present, match (other keys are free); ``Opt`` also
#: takes null; ``DictOf``/``ListOf`` type every value/item.
RECORD_TYPES: dict[str, Any] = {
    "schema": str, "cell_id": str, "status": str,
    "error": Opt({"type": Opt(str), "message": Opt(str), "plugin": Opt(str),
                  "component": Opt(str), "hook": Opt(str), "traceback": Opt(str)}),
    "labels": DictOf(str), "matrix": Opt(str), "topology": Opt(str),
    "config": {
        "dataset": _COMPONENT, "partitioner": _COMPONENT, "algorithm": _COMPONENT,
        "aggregator": _COMPONENT, "privacy": ListOf(_COMPONENT),
        "compressor": Opt(_COMPONENT), "adversary": Opt(_COMPONENT),
        "attacks": ListOf(_COMPONENT), "run": dict, "rounds": int, "seed": int,
    },
    "metrics": {
        "utility": {"metric": Opt(str), "global": Opt(NUMBER), "per_site": DictOf(Opt(NUMBER)),
                    "worst_site": Opt(NUMBER)},
        "privacy": {"level": Opt(str), "epsilon": Opt(NUMBER), "delta": Opt(NUMBER),
                    "accountant": Opt(str), "unit": Opt(str), "noise_multiplier": Opt(NUMBER),
                    "mechanisms": DictOf(dict)},
        "cost": {k: Opt(NUMBER) for k in ("bytes_up", "bytes_down", "wall_s", "train_s",
                                          "privacy_s")},
        "attacks": DictOf(dict),
    },
    "history": ListOf({"round": int, "loss": Opt(NUMBER), "utility": Opt(NUMBER),
                       "epsilon": Opt(NUMBER), "clients": Opt(NUMBER)}),
    "provenance": dict,
}

_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "an array"}


def _wrong(path: str, v: Any, want: str) -> str:
    return f"{path} has the wrong type: {_short(v)}, expected {want}"


def _type_error(v: Any, spec: Any, path: str) -> str | None:
    """The first field of ``v`` that does not match ``spec``, as a message."""
    if isinstance(spec, Opt):
        return None if v is None else _type_error(v, spec.spec, path)
    if spec is NUMBER:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return None if ok else _wrong(path, v, "a number")
    if spec in (str, int, list):
        ok = isinstance(v, spec) and not isinstance(v, bool)
        return None if ok else _wrong(path, v, _NAMES[spec])
    if spec is dict or isinstance(spec, (dict, DictOf)):
        if not isinstance(v, dict):
            return _wrong(path or "the record", v, "an object")
        if isinstance(spec, DictOf):
            for k, x in v.items():
                bad = _type_error(x, spec.spec, f"{path}.{k}" if path else k)
                if bad:
                    return bad
        elif isinstance(spec, dict):
            for k, sub in spec.items():
                if k in v:
                    bad = _type_error(v[k], sub, f"{path}.{k}" if path else k)
                    if bad:
                        return bad
        return None
    if isinstance(spec, ListOf):
        if not isinstance(v, list):
            return _wrong(path, v, "an array")
        for i, x in enumerate(v):
            bad = _type_error(x, spec.spec, f"{path}[{i}]")
            if bad:
                return bad
        return None
    raise TypeError(f"bad record type spec {spec!r}")  # pragma: no cover
