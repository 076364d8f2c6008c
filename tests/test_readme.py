"""The README stays true: its plugin table and its test command."""

from __future__ import annotations

import re
from pathlib import Path

from fedmedbench.cli import plugins_markdown
from fedmedbench.registry import get_registry

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_plugin_table_lists_every_builtin_with_its_defaults():
    block = re.search(r"<!-- BEGIN PLUGIN TABLE -->\n(.*?)\n<!-- END PLUGIN TABLE -->", README,
                      re.S)
    assert block, "README lost its plugin table markers"
    builtins = [i for i in get_registry().all() if i.distribution == "fedmedbench"]
    assert block.group(1).strip() == plugins_markdown(builtins).strip(), (
        "README's plugin table is stale: paste the output of `fedmedbench plugins --markdown`")


def test_ci_runs_the_readme_test_command():
    cmds = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(cmds) == 2 and cmds[0].endswith("fedmedbench run")
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    assert cmds[1] in ci
