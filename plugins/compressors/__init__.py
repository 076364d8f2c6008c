"""Built-in compressors of fedmedbench, registered through the ``compressors`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.compressors import quantize, topk

MODULES: tuple = (quantize, topk)


@hookimpl
def register_compressors(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
