"""Built-in datasets of fedmedbench, registered through the ``datasets`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from harness import hookimpl
from plugins.datasets import heart_disease, synthetic_tabular

MODULES: tuple = (heart_disease, synthetic_tabular,)


@hookimpl
def register_datasets(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
