"""Built-in reporters of fedmedbench, registered through the ``reporters`` entry point.

The registered classes live in :mod:`~fedmedbench.plugins.reporters.writers`
(light: each imports its implementation when it writes); add a module with a
``COMPONENTS`` tuple to ``MODULES`` to register more.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.reporters import writers

MODULES: tuple = (writers,)


@hookimpl
def register_reporters(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
