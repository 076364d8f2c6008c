"""Markdown, CSV and JSON reports: the tables of :mod:`fedmedbench.report`.

- ``markdown`` writes ``report.md``: per dataset the headline, the
  leaderboard tiers with their ranking rule, FL against centralized and
  local training, privacy, cost, per-site utility and attacks; then the
  legend of short labels. Every string is escaped for markdown (HTML and
  ``|``), so a label from a record cannot add markup or break a table.
- ``csv`` writes one file per table under ``tables/`` (``leaderboard.csv``,
  ``summary.csv``, ``baselines.csv``, ``sites.csv``, ``attacks.csv``,
  ``convergence.csv``, ``failures.csv``, ``cells.csv``, ``legend.csv``);
  text cells that a spreadsheet would run as a formula are neutralised
  (:func:`fedmedbench.report.csv_safe`).
- ``json`` writes ``report.json``: the same tables as lists of objects
  (schema ``fedmedbench.report/1``), NaN as ``null``.

Every file is written with no-follow semantics
(:func:`fedmedbench.fileio.write_output`): a symbolic link in the output
folder is refused, never written through.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedmedbench import write_output
from fedmedbench.report import RANKING_RULE, ReportData, build, csv_safe, md_escape, render_text

REPORT_SCHEMA = "fedmedbench.report/1"


def _header(data: ReportData) -> str:
    c = data.counts
    return (f"{len(data.records)} cells: " + ", ".join(f"{v} {k}" for k, v in c.items())
            + f"; datasets: {md_escape(', '.join(data.datasets) or 'none')}")


def write_markdown(records: list[dict], out_dir: Path) -> list[Path]:
    """Comparison tables and the leaderboard as ``report.md``."""
    data = build(records)
    text = (f"# fedmedbench report\n\n{_header(data)}\n\n"
            f"**Ranking rule.** {md_escape(RANKING_RULE)}\n\n"
            + render_text(data, escape=md_escape))
    return [write_output(Path(out_dir), "report.md", text)]


def write_csv(records: list[dict], out_dir: Path) -> list[Path]:
    """Every report table as a CSV file under ``tables/``."""
    data = build(records)
    paths = []
    for stem, df in data.tables().items():
        text = csv_safe(df).to_csv(None, index=False, float_format="%.6g", lineterminator="\n")
        paths.append(write_output(Path(out_dir), f"tables/{stem}.csv", text))
    return paths


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        return _clean(v.item())
    return v


def write_json(records: list[dict], out_dir: Path) -> list[Path]:
    """Every report table as lists of objects in ``report.json``."""
    data = build(records)
    doc: dict[str, Any] = {"schema": REPORT_SCHEMA, "counts": data.counts,
                           "datasets": data.datasets, "ranking_rule": RANKING_RULE}
    for stem, df in data.tables().items():
        doc[stem] = [{k: _clean(v) for k, v in row.items()}
                     for row in df.to_dict(orient="records")]
    text = json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    return [write_output(Path(out_dir), "report.json", text)]

