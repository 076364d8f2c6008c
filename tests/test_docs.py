"""Docs that stay true (issue 20.7): the generated parts of docs/ equal what
the code produces, and every relative link in the README and docs/ points to
a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

from fedmedbench.cli import cli_reference, plugins_markdown, tracks_table
from fedmedbench.registry import get_registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _block(path: Path, name: str) -> str:
    text = path.read_text(encoding="utf-8")
    m = re.search(rf"<!-- BEGIN {name} -->\n(.*?)<!-- END {name} -->", text, re.S)
    assert m, f"{path.name} lost its {name} markers"
    return m.group(1)


def test_the_cli_reference_is_the_argument_parsers_help() -> None:
    assert _block(DOCS / "cli.md", "CLI REFERENCE") == cli_reference(), (
        "docs/cli.md is stale: paste the output of "
        "`python -c 'from fedmedbench.cli import cli_reference; print(cli_reference(), end=\"\")'`")


def test_the_cli_reference_names_every_option() -> None:
    ref = cli_reference()
    for opt in ("--backend", "--wait", "--skip-invalid", "--no-progress", "--isolate-attacks",
                "--allow-mixed-versions", "--rerun", "--install", "--signed-off-by", "--tier",
                "--tune", "--entry", "--env"):
        assert opt in ref, opt
    assert max(map(len, ref.splitlines())) <= 100


def test_the_plugin_table_is_the_registrys() -> None:
    builtins = [i for i in get_registry().all() if i.distribution == "fedmedbench"]
    assert _block(DOCS / "plugins.md", "PLUGIN TABLE").strip() == \
        plugins_markdown(builtins).strip(), (
            "docs/plugins.md is stale: paste the output of `fedmedbench plugins --markdown`")


def test_the_tracks_table_is_fedmedbench_tracks() -> None:
    block = _block(DOCS / "tracks.md", "TRACKS").strip()
    assert block == f"```text\n{tracks_table()}\n```", (
        "docs/tracks.md is stale: paste the output of `fedmedbench tracks`")


def test_every_relative_link_points_to_a_file() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_the_dataframe_columns_the_docs_name_exist(quickstart_results: Path) -> None:
    """The README once named a column `protocol` where the frame has
    `topology`: every column docs/python-api.md names for `Results.frame()`
    is a column of the quickstart's frame."""
    from fedmedbench.report import frame
    from fedmedbench.results import load_records

    text = (DOCS / "python-api.md").read_text(encoding="utf-8")
    sec = text.split("`Results.frame()`", 1)[1].split("`Results.tables()`", 1)[0]
    named = {n for n in re.findall(r"`([a-z_]+)`", sec)}
    cols = set(frame(load_records([quickstart_results])[0]).columns)
    assert named - {"record", "client"} <= cols, sorted(named - cols)
