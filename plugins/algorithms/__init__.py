"""Built-in algorithms of fedmedbench, registered through the ``algorithms`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.algorithms import (
    centralized,
    ditto,
    fedasync,
    fedavg,
    fedbn,
    fedbuff,
    feddf,
    fedmd,
    fednova,
    fedopt,
    fedper,
    fedprox,
    fedrep,
    finetune,
    local,
    scaffold,
)

MODULES: tuple = (fedavg, centralized, local, fedprox, scaffold, fedopt, feddf, fedmd,
                  fedbn, ditto, fedper, fedrep, finetune, fednova, fedbuff, fedasync)


@hookimpl
def register_algorithms(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
