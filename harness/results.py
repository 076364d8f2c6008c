"""Result records: one JSON file per cell, written atomically, never pickled.

Layout: ``<results>/<cell_id>.json``. A record's ``schema`` is
``fedmedbench.result/1``; loading any other schema fails with the command
that upgrades it (the pattern of asv's ``results.py``).

Reading is bounded and typed: a file over :data:`MAX_RECORD_BYTES`, JSON
nested deeper than :data:`MAX_DEPTH`, or a field of the wrong type
(:data:`RECORD_TYPES`) is a :class:`SchemaError` naming the file and the
field. Resume trusts a record only when its ``cell_id`` is its file name and
the hash of its ``config`` (:func:`trust_problem`); a record that is not
trusted is recomputed, and the file it would overwrite is kept aside as
``<cell_id>.json.invalid-<n>`` (:func:`set_aside`), never deleted.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedmedbench.errors import SchemaError
from fedmedbench.fileio import write_atomic
from fedmedbench.schema import SCHEMA

STATUSES = ("ok", "failed", "skipped", "diverged")
REQUIRED = ("schema", "cell_id", "status", "config", "metrics")
#: a record file larger than this is refused unread (a record is kilobytes)
MAX_RECORD_BYTES = 64 * 2**20
#: JSON nested deeper than this is refused (a record is about 7 levels deep)
MAX_DEPTH = 64


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


def write_record(results_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``<results_dir>/<cell_id>.json`` atomically
    (a temporary file in the same folder, fsync, rename), with the mode the
    umask gives. A file already there that is not a trusted record of this
    schema is first kept aside (:func:`set_aside`), never overwritten."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{record['cell_id']}.json"
    data = json.dumps(clean_json(record), indent=1, sort_keys=True, allow_nan=False)
    if path.exists():
        why = _untrusted(path)
        if why:
            kept = set_aside(path)
            warnings.warn(f"{path}: {why}; kept it as {kept.name} and wrote the new record",
                          RuntimeWarning, stacklevel=2)
    write_atomic(path, data.encode("utf-8"))
    return path


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.invalid-<n>`` (the first free ``n``) and
    return the new path; nothing reads those names, and nothing deletes them."""
    path = Path(path)
    n = 1
    while True:
        dest = path.with_name(f"{path.name}.invalid-{n}")
        if not dest.exists():
            os.replace(path, dest)
            return dest
        n += 1


def read_record(path: Path) -> dict[str, Any]:
    """Load and check one record file: its size, nesting, schema and the type
    of every field :data:`RECORD_TYPES` names."""
    path = Path(path)
    hint = "delete it or move it away to rerun the cell, or pass --skip-invalid"
    try:
        size = path.stat().st_size
        if size > MAX_RECORD_BYTES:
            raise SchemaError(f"{path}: {size} bytes, larger than any result record "
                              f"(the limit is {MAX_RECORD_BYTES} bytes); {hint}")
        with path.open("rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        rec = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise SchemaError(f"{path}: not a result record (JSON nested too deeply to read); "
                          f"{hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: not a readable result record ({exc}); {hint}") from None
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
    """Why resume must not trust ``rec`` read from ``path`` (``None``: it may):
    its ``cell_id`` must be the file name and the hash of its ``config``."""
    from fedmedbench.matrix import cell_id

    cid = rec["cell_id"]
    if Path(path).stem != cid:
        return f"its cell_id {_short(cid)} is not its file name"
    try:
        actual = cell_id(rec["config"])
    except (TypeError, ValueError) as exc:
        return f"its config cannot be hashed ({exc})"
    if actual != cid:
        return (f"its config hashes to {actual}, not to its cell_id {cid} (the file was "
                f"edited, or written for another config)")
    return None


def _untrusted(path: Path) -> str | None:
    try:
        rec = read_record(path)
    except SchemaError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return trust_problem(path, rec)


def iter_record_paths(results_dir: Path) -> Iterator[Path]:
    d = Path(results_dir)
    if not d.is_dir():
        return iter(())
    return iter(sorted(p for p in d.glob("*.json") if not p.name.startswith(".")
                       and p.is_file()))


def load_records(dirs: list[Path], *, skip_invalid: bool = False
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of several result directories, merged by cell id (an ``ok``
    record wins over others; otherwise the last one read). Returns the
    records and, with ``skip_invalid``, messages for the files skipped."""
    merged: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for d in dirs:
        if not Path(d).is_dir():
            raise SchemaError(f"results directory {d} does not exist")
        for p in iter_record_paths(d):
            try:
                rec = read_record(p)
            except SchemaError as exc:
                if not skip_invalid:
                    raise
                skipped.append(str(exc))
                continue
            cur = merged.get(rec["cell_id"])
            if cur is None or cur["status"] != "ok" or rec["status"] == "ok":
                merged[rec["cell_id"]] = rec
    return [merged[k] for k in sorted(merged)], skipped


def completed_ids(results_dir: Path) -> set[str]:
    """Cell ids with a trusted ``ok`` record (resume skips them). Any other
    file is ignored here: its cell runs again, and :func:`write_record` keeps
    the old file aside. (``fedmedbench run`` refuses beforehand to touch
    records of another schema unless ``--skip-invalid``: :func:`scan`.)"""
    done = set()
    for p in iter_record_paths(results_dir):
        v = _verdict(p)
        if v.problem is None and v.status == "ok":
            done.add(v.cell_id)
    return done


def scan(results_dir: Path) -> tuple[list[str], list[str]]:
    """Problems of the record files in ``results_dir`` before a run resumes:
    ``(other_schema, untrusted)``, each a list of one-line messages. Records of
    another schema are the other version's results (the run refuses them
    unless told to skip them); untrusted ones (malformed, or failing
    :func:`trust_problem`) are recomputed when their cell runs."""
    other, untrusted = [], []
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
        st = p.stat()
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
    gone = []
    d = Path(results_dir)
    if not d.is_dir():
        return gone
    for p in d.glob(".*.tmp"):
        try:
            if p.is_file() and p.stat().st_mtime < before:
                p.unlink()
                gone.append(p)
        except OSError:
            pass
    return gone


def _schema_of(path: Path) -> str | None:
    try:
        if Path(path).stat().st_size > MAX_RECORD_BYTES:
            return None
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
        return rec.get("schema") if isinstance(rec, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
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
