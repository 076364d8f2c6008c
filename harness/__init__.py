"""fedmedbench: a plugin-based benchmark harness for federated learning in healthcare.

Run a matrix and read its results from Python (:mod:`fedmedbench.api`)::

    import fedmedbench as fmb

    results = fmb.run()                 # the built-in quickstart, into results/
    results.frame()                     # one row per cell, a pandas DataFrame

Plugins import only what this package exports (and libraries)::

    import fedmedbench as fmb
    from fedmedbench import Algorithm, hookimpl

Names are resolved lazily (PEP 562), so ``import fedmedbench`` and the
command line start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: the version of this package: the one version number (pyproject.toml reads it at build
#: time; records, cell ids and ``fedmedbench plugins`` carry it)
__version__ = "0.3.0.dev0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # families and the data they exchange
    **{n: "fedmedbench.components" for n in (
        "FAMILIES", "STAGES", "PROTOCOLS", "WEIGHTINGS", "Component", "Dataset", "Partitioner",
        "Model", "Algorithm", "Aggregator", "PrivacyMechanism", "LocalStage", "UpdateStage",
        "TransportStage", "ServerStage", "Compressor", "Adversary", "Attack", "Reporter",
        "Split", "Site", "Task", "FederatedData", "ParamLayout", "Updates", "Message",
        "Network", "SiteProfile", "Availability", "RoundAborted", "DROP_PHASES",
        "DropPhase")},
    # what crosses between the parties of a round
    **{n: "fedmedbench.messages" for n in ("Broadcast", "Sent", "Received", "RowsHidden")},
    # what components see of a running cell
    **{n: "fedmedbench.context" for n in (
        "CellContext", "ClientContext", "ServerView", "AttackContext", "Canaries",
        "GradientCanaries", "ClientCanaries", "ShadowTrainer", "BatchReplay")},
    **{n: "fedmedbench.facts" for n in (
        "CellFacts", "AlgorithmFacts", "AggregatorFacts", "PrivacyFacts", "CompressorFacts")},
    **{n: "fedmedbench.accounting" for n in (
        "Accounting", "Ledger", "Guarantee", "ADVERSARIES", "Accountant", "epsilon_for",
        "noise_for_epsilon", "noise_for_schedule", "check_accountant")},
    **{n: "fedmedbench.training" for n in (
        "RunSettings", "LocalTrainer", "SGDTrainer", "BatchStream", "predict_proba",
        "per_example_loss", "to_tensors", "finish_local")},
    **{n: "fedmedbench.errors" for n in (
        "printable", "ParameterError", "ConfigError", "DataError", "Diverged", "FedmedbenchError", "PluginConflictError",
        "PluginError", "SchemaError", "SettingWarning")},
    **{n: "fedmedbench.datafiles" for n in (
        "cached_arrays", "check_card_files", "check_gzip", "inspect_npz", "load_card",
        "sha256_file",
        "shipped_file", "verify_checksum")},
    **{n: "fedmedbench.constraints" for n in ("Range", "Seed")},
    **{n: "fedmedbench.models" for n in (
        "build_model", "get_flat_params", "set_flat_params", "add_flat_grad",
        "get_flat_buffers", "set_flat_buffers")},
    # the Python API: run a matrix, load results, DataFrames and reports
    **{n: "fedmedbench.api" for n in ("run", "load", "plan", "Results")},
    "score": "fedmedbench.metrics",
    **{n: "fedmedbench.fileio" for n in ("write_output", "output_dir")},
    "hookimpl": "fedmedbench.registry",
    "build_component": "fedmedbench.registry",
    "SCHEMA": "fedmedbench.engine",
    "run_cell": "fedmedbench.engine",
}

#: public modules: the report model reporter plugins build on (``fedmedbench.report``)
_MODULES = ("report",)

__all__ = ["__version__", *sorted(_EXPORTS), *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"fedmedbench.{name}")
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'fedmedbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))
