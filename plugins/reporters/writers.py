"""The built-in reporters as registered components.

These classes are what the registry lists; each ``write`` imports its
implementation (pandas, matplotlib) only when a report is written, so
``fedmedbench plugins``, ``datasets`` and ``run --dry-run`` never pay for
those imports. The tables are :mod:`fedmedbench.plugins.reporters.tables`,
the figures :mod:`~fedmedbench.plugins.reporters.figures`, the page
:mod:`~fedmedbench.plugins.reporters.html` and the leaderboard site
:mod:`~fedmedbench.plugins.reporters.site`.
"""

from __future__ import annotations

from pathlib import Path

from fedmedbench import Reporter

FIGURE_FORMATS = ("png", "svg")


class Markdown(Reporter):
    """Comparison tables and the leaderboard as ``report.md``."""

    name = "markdown"

    def __init__(self) -> None:
        pass

    def write(self, records: list[dict], out_dir: Path) -> list[Path]:
        from fedmedbench.plugins.reporters.tables import write_markdown

        return write_markdown(records, out_dir)


class Csv(Reporter):
    """Every report table as a CSV file under ``tables/``."""

    name = "csv"

    def __init__(self) -> None:
        pass

    def write(self, records: list[dict], out_dir: Path) -> list[Path]:
        from fedmedbench.plugins.reporters.tables import write_csv

        return write_csv(records, out_dir)


class Json(Reporter):
    """Every report table as lists of objects in ``report.json``."""

    name = "json"

    def __init__(self) -> None:
        pass

    def write(self, records: list[dict], out_dir: Path) -> list[Path]:
        from fedmedbench.plugins.reporters.tables import write_json

        return write_json(records, out_dir)


class Figures(Reporter):
    """Privacy–utility–cost trade-off, attacks against ε, convergence,
    per-site utility and reconstruction grids as PNG and SVG under
    ``figures/``."""

    name = "figures"

    def __init__(self, *, formats: tuple[str, ...] | list[str] = FIGURE_FORMATS) -> None:
        bad = [f for f in formats if f not in FIGURE_FORMATS]
        if bad:
            raise ValueError(f"formats={list(formats)!r}: allowed are 'png' and 'svg'")
        self.formats = tuple(formats)

    def write(self, records: list[dict], out_dir: Path) -> list[Path]:
        from fedmedbench.plugins.reporters.figures import write_figures

        return write_figures(records, out_dir, self.formats)


class Html(Reporter):
    """One self-contained static page (``index.html``): leaderboard, tables
    and figures, sortable, nothing fetched."""

    name = "html"

    def __init__(self, *, title: str = "fedmedbench leaderboard") -> None:
        if not isinstance(title, str) or not title.strip():
            raise ValueError(f"title={title!r}: must be a non-empty string")
        self.title = title

    def write(self, records: list[dict], out_dir: Path) -> list[Path]:
        from fedmedbench.plugins.reporters.html import write_html

        return write_html(records, out_dir, title=self.title)


class Site(Reporter):
    """The static leaderboard site of verified submissions (``fedmedbench
    leaderboard``): a page per track with verified claims on every row; for
    plain results, `site/index.html` in the same layout."""

    name = "site"

    def __init__(self) -> None:
        pass

    def write(self, records: list[dict], out_dir: Path) -> list[Path]:
        from fedmedbench.plugins.reporters.site import write_site

        return write_site(records, out_dir)


COMPONENTS = (Markdown, Csv, Json, Figures, Html, Site)
