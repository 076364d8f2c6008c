"""Built-in adversaries of fedmedbench, registered through the ``adversaries`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.adversaries import label_flip, model_poisoning

MODULES: tuple = (model_poisoning, label_flip)


@hookimpl
def register_adversaries(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
