"""Built-in attacks of fedmedbench, registered through the ``attacks`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.attacks import audit, gradinv, mia

MODULES: tuple = (mia, gradinv, audit)


@hookimpl
def register_attacks(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
