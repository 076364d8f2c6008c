"""Built-in datasets of fedmedbench, registered through the ``datasets`` entry point.

Each module lists its classes in ``COMPONENTS``; add a module to ``MODULES``
to register it.
"""

from __future__ import annotations

from fedmedbench import hookimpl
from fedmedbench.plugins.datasets import (
    eicu,
    genomics,
    heart_disease,
    medmnist,
    support2,
    synthetic_ehr,
    synthetic_genomics,
    synthetic_imaging,
    synthetic_tabular,
)

MODULES: tuple = (heart_disease, support2, eicu, synthetic_ehr, genomics, synthetic_genomics,
                  medmnist, synthetic_imaging, synthetic_tabular)


@hookimpl
def register_datasets(register):
    for module in MODULES:
        for component in module.COMPONENTS:
            register(component)
