"""Built-in partitioners of fedmedbench, registered through the ``partitioners`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.partitioners import basic, skew

MODULES: tuple = (basic, skew,)


@hookimpl
def register_partitioners(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
