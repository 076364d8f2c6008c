"""Built-in networks (site profiles for the hospital-network twin),
registered through the ``networks`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.networks import presets

MODULES: tuple = (presets,)


@hookimpl
def register_networks(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
