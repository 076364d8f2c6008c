"""fedmedbench's engine: plugin host, matrix, round engine, results, reports.

Plugins import only what this module exports (and libraries).
"""

from __future__ import annotations

from harness.components import (
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
from harness.datafiles import cached_arrays, load_card, sha256_file, shipped_file, verify_checksum
from harness.engine import SCHEMA, AttackContext, ClientContext, RoundContext, ServerView, run_cell
from harness.errors import (
    ConfigError,
    DataError,
    Diverged,
    FedmedbenchError,
    PluginConflictError,
    SchemaError,
)
from harness.metrics import score
from harness.models import build_model, get_flat_params, set_flat_params
from harness.registry import hookimpl
from harness.training import RunSettings, per_example_loss, predict_proba

__version__ = "0.1.0"

__all__ = [
    "FAMILIES", "STAGES", "SCHEMA", "__version__",
    "Adversary", "Aggregator", "Algorithm", "Attack", "ClientUpdate", "Component", "Compressor",
    "Dataset", "FederatedData", "Message", "ParamLayout", "Partitioner", "PrivacyMechanism",
    "Reporter", "Site", "Split", "Task",
    "AttackContext", "ClientContext", "RoundContext", "ServerView", "RunSettings", "run_cell",
    "ConfigError", "DataError", "Diverged", "FedmedbenchError", "PluginConflictError",
    "SchemaError",
    "cached_arrays", "load_card", "sha256_file", "shipped_file", "verify_checksum",
    "score", "build_model", "get_flat_params", "set_flat_params", "per_example_loss",
    "predict_proba", "hookimpl",
]
