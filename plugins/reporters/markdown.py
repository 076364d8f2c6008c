"""Markdown report: the comparison tables as ``report.md``."""

from __future__ import annotations

from pathlib import Path

from harness import Reporter
from harness.report import comparison_tables


class Markdown(Reporter):
    """Comparison tables as a markdown file."""

    name = "markdown"

    def __init__(self) -> None:
        pass

    def write(self, records: list[dict], out_dir: Path) -> list[Path]:
        path = Path(out_dir) / "report.md"
        path.write_text("# fedmedbench report\n\n" + comparison_tables(records), encoding="utf-8")
        return [path]


COMPONENTS = (Markdown,)
