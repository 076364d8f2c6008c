"""Result records: one JSON file per cell, written atomically, never pickled.

Layout: ``<results>/<cell_id>.json``. A record's ``schema`` is
``fedmedbench.result/1``; loading any other schema fails with the command
that upgrades it (the pattern of asv's ``results.py``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedmedbench.errors import SchemaError
from fedmedbench.schema import SCHEMA

STATUSES = ("ok", "failed", "skipped", "diverged")
REQUIRED = ("schema", "cell_id", "status", "config", "metrics")


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
    (a temporary file in the same folder, fsync, rename)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{record['cell_id']}.json"
    data = json.dumps(clean_json(record), indent=1, sort_keys=True, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=f".{record['cell_id']}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: Path) -> dict[str, Any]:
    """Load and check one record file."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: not a readable result record ({exc}); delete it to rerun "
                          f"the cell, or pass --skip-invalid") from None
    if not isinstance(rec, dict):
        raise SchemaError(f"{path}: a result record must be a JSON object")
    schema = rec.get("schema")
    if schema != SCHEMA:
        raise SchemaError(
            f"{path}: record schema is {schema!r}, this fedmedbench reads {SCHEMA!r}. "
            f"Rerun its cell with `fedmedbench run MATRIX --force --out {path.parent}`, "
            f"or read it with the fedmedbench version that wrote it"
        )
    missing = [k for k in REQUIRED if k not in rec]
    if missing or rec.get("status") not in STATUSES:
        raise SchemaError(f"{path}: malformed record (missing {missing or 'a valid status'})")
    bad = [k for k in ("config", "metrics") if not isinstance(rec[k], dict)]
    if bad or not isinstance(rec["cell_id"], str):
        raise SchemaError(f"{path}: malformed record ({', '.join(bad) or 'cell_id'} has the "
                          f"wrong type)")
    return rec


def iter_record_paths(results_dir: Path) -> Iterator[Path]:
    d = Path(results_dir)
    if not d.is_dir():
        return iter(())
    return iter(sorted(p for p in d.glob("*.json") if not p.name.startswith(".")))


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
    """Cell ids with an ``ok`` record (resume skips them). Unreadable files
    are ignored here: their cells run again and overwrite them."""
    done = set()
    for p in iter_record_paths(results_dir):
        try:
            rec = read_record(p)
        except SchemaError:
            if _schema_of(p) not in (SCHEMA, None):
                raise  # another version's results: never overwrite them silently
            continue
        if rec["status"] == "ok":
            done.add(rec["cell_id"])
    return done


def _schema_of(path: Path) -> str | None:
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
        return rec.get("schema") if isinstance(rec, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
