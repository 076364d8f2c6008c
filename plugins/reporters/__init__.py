"""Built-in reporters of fedmedbench, registered through the ``reporters`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.reporters import figures, html, tables

MODULES: tuple = (tables, figures, html)


@hookimpl
def register_reporters(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
