"""fedmedbench's engine: plugin host, matrix, round engine, results, reports.

Plugins import only what this module exports (and libraries).
"""

from __future__ import annotations

from fedmedbench.components import (
    FAMILIES,
    STAGES,
    Adversary,
    Aggregator,
    Algorithm,
    Attack,
    ClientUpdate,
    Component,
    Compressor,
    Dataset,
    FederatedData,
    Message,
    ParamLayout,
    Partitioner,
    PrivacyMechanism,
    Reporter,
    Site,
    Split,
    Task,
)
from fedmedbench.constraints import Range, Seed
from fedmedbench.datafiles import (
    cached_arrays,
    check_card_files,
    check_gzip,
    load_card,
    sha256_file,
    shipped_file,
    verify_checksum,
)
from fedmedbench.engine import (
    SCHEMA,
    AttackContext,
    ClientContext,
    RoundContext,
    ServerView,
    run_cell,
)
from fedmedbench.errors import (
    ConfigError,
    DataError,
    Diverged,
    FedmedbenchError,
    PluginConflictError,
    SchemaError,
)
from fedmedbench.metrics import score
from fedmedbench.models import build_model, get_flat_params, set_flat_params
from fedmedbench.registry import hookimpl
from fedmedbench.training import RunSettings, per_example_loss, predict_proba

__version__ = "0.1.0"

__all__ = [
    "FAMILIES", "STAGES", "SCHEMA", "__version__",
    "Adversary", "Aggregator", "Algorithm", "Attack", "ClientUpdate", "Component", "Compressor",
    "Dataset", "FederatedData", "Message", "ParamLayout", "Partitioner", "PrivacyMechanism",
    "Reporter", "Site", "Split", "Task",
    "AttackContext", "ClientContext", "RoundContext", "ServerView", "RunSettings", "run_cell",
    "ConfigError", "DataError", "Diverged", "FedmedbenchError", "PluginConflictError",
    "SchemaError",
    "Range", "Seed", "check_card_files", "check_gzip",
    "cached_arrays", "load_card", "sha256_file", "shipped_file", "verify_checksum",
    "score", "build_model", "get_flat_params", "set_flat_params", "per_example_loss",
    "predict_proba", "hookimpl",
]
