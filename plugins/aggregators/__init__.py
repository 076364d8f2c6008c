"""Built-in aggregators of fedmedbench, registered through the ``aggregators`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.aggregators import robust, weighted_mean

MODULES: tuple = (weighted_mean, robust,)


@hookimpl
def register_aggregators(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
