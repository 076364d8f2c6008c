"""Components a plugin author (or an attacker) might write, for
``tests/test_hostile.py``.

Loaded with ``FEDMEDBENCH_PLUGINS=fmb_hostile_plugins`` (tests/ on sys.path).
"""

from __future__ import annotations

import dataclasses

from fedmedbench import Algorithm, Attack, Reporter, hookimpl
from fedmedbench.plugins.datasets.synthetic_tabular import SyntheticTabular

ESC = "\x1b[2J\x1b]0;owned\x07"


class EscapeSites(SyntheticTabular):
    """Synthetic tabular data whose site names carry terminal escapes and markdown."""

    name = "hostile-escape-sites"

    def load(self, *, seed: int):
        data = super().load(seed=seed)
        data.sites = [dataclasses.replace(s, name=f"{ESC}site{i}![x](http://evil.example/x.png)")
                      for i, s in enumerate(data.sites)]
        return data


class AlwaysFails(Algorithm):
    """Raises in every client update, with terminal escapes in its message."""

    name = "hostile-fail"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        raise RuntimeError(f"{ESC}a new plugin's first bug")


class CtorBoom(Algorithm):
    """Its constructor raises something other than TypeError/ValueError."""

    name = "hostile-ctor-boom"

    def __init__(self) -> None:
        raise RuntimeError("constructor exploded")


class BigAttack(Attack):
    """Returns a metric of ``n`` floats (a record too large to read back)."""

    name = "hostile-big-attack"

    def __init__(self, *, n: int = 10) -> None:
        self.n = n

    def evaluate(self, ctx):
        return {"auc": 0.5, "scores": [0.123456789] * self.n}


class ScriptDoc(Reporter):
    """Writes nothing. <script>alert(1)</script> ![pwn](http://evil.example/p.png) | x"""

    name = "hostile-script-doc"

    def __init__(self) -> None:
        pass

    def write(self, records, out_dir):
        return []


@hookimpl
def register_datasets(register):
    register(EscapeSites)


@hookimpl
def register_algorithms(register):
    register(AlwaysFails)
    register(CtorBoom)


@hookimpl
def register_attacks(register):
    register(BigAttack)


@hookimpl
def register_reporters(register):
    register(ScriptDoc)
