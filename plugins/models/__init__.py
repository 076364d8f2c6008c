"""Built-in model architectures of fedmedbench, registered through the ``models`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.models import architectures

MODULES: tuple = (architectures,)


@hookimpl
def register_models(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
