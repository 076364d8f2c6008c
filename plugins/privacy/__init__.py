"""Built-in privacy of fedmedbench, registered through the ``privacy`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.privacy import dp_fedavg, dp_sgd, he_ckks, secagg, secagg_plus

MODULES: tuple = (dp_sgd, dp_fedavg, secagg, secagg_plus, he_ckks)


@hookimpl
def register_privacy(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
