"""Hook specifications: the contract between fedmedbench and its plugins.

A plugin is a module (or object) listed under the ``fedmedbench`` entry-point
group. It implements any of the hooks below, decorated with
:data:`fedmedbench.hookimpl`. Built-in components are registered exactly the same
way, from ``pyproject.toml``.

Registration hooks each receive a ``register`` callable. Call it once per
component class; the class's ``name`` must be unique across every installed
plugin (a clash is an error naming both plugins and their distributions).
Return values are ignored.

Observer hooks are called by the engine in the process that runs a cell;
they must not change the cell's computation (they may log, track or draw).
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("fedmedbench")

# --------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------


@hookspec
def register_datasets(register: Any) -> None:
    """Register :class:`fedmedbench.Dataset` subclasses.

    A dataset's ``load(seed=...)`` returns per-site train/test splits, an
    optional public split, the task, the primary metric and the default model.
    Shipped files live in ``datasets/<card>/`` with a ``card.toml`` giving
    source, licence, citation, sha256 of each file, sites, task and metric.
    """


@hookspec
def register_partitioners(register: Any) -> None:
    """Register :class:`fedmedbench.Partitioner` subclasses: rules that split
    pooled data into clients (natural sites, iid, Dirichlet label skew, ...).
    A partitioner must be deterministic for a seed and must never move a test
    row into a training split."""


@hookspec
def register_models(register: Any) -> None:
    """Register :class:`fedmedbench.Model` subclasses: architectures, each a
    factory of ``torch.nn.Module`` (``build(input_shape, num_classes)``) whose
    keyword-only constructor parameters configure it. A dataset's task names a
    default model; a matrix chooses another with its ``model`` axis."""


@hookspec
def register_algorithms(register: Any) -> None:
    """Register :class:`fedmedbench.Algorithm` subclasses (client update + server
    update). ``centralized`` and ``local`` baselines are algorithms too, told
    apart by their ``topology``."""


@hookspec
def register_aggregators(register: Any) -> None:
    """Register :class:`fedmedbench.Aggregator` subclasses. A ``linear``
    aggregator (weighted mean) works over secure aggregation; a non-linear one
    (median, Krum) needs plaintext updates and is rejected with transport
    privacy before training."""


@hookspec
def register_privacy(register: Any) -> None:
    """Register :class:`fedmedbench.PrivacyMechanism` subclasses.

    Each mechanism declares the stages it acts at (``local``, ``update``,
    ``transport``, ``server``) and reports what it spent through
    ``accounting()``: for differential privacy ε **with its δ**, the
    accountant's name, the noise multiplier σ, the clipping norm, the sampling
    rate q and its sampling assumption, and the number of steps. Bytes are
    counted from serialized messages; seconds are wall time inside the
    mechanism.
    """


@hookspec
def register_compressors(register: Any) -> None:
    """Register :class:`fedmedbench.Compressor` subclasses (lossy update encoding;
    bytes are the encoded size per client per round)."""


@hookspec
def register_adversaries(register: Any) -> None:
    """Register :class:`fedmedbench.Adversary` subclasses (malicious client
    behaviour: poisoned data or corrupted updates)."""


@hookspec
def register_attacks(register: Any) -> None:
    """Register :class:`fedmedbench.Attack` subclasses. An attack evaluates only
    what the cell's threat model exposes (``AttackContext.server_view`` and the
    final global model) and returns ``{"not_applicable": reason}`` when that
    view gives it nothing."""


@hookspec
def register_reporters(register: Any) -> None:
    """Register :class:`fedmedbench.Reporter` subclasses that write reports
    (markdown, HTML, CSV, figures) from result records."""


@hookspec
def register_networks(register: Any) -> None:
    """Register :class:`fedmedbench.Network` subclasses: site profiles for
    the hospital-network twin (the matrix's ``network`` axis). A network
    gives each site a :class:`~fedmedbench.components.SiteProfile`: compute
    speed relative to this machine, uplink and downlink in Mbit/s, latency
    in ms, and an availability process; the virtual clock turns them into
    seconds per round, stragglers and dropouts (:mod:`fedmedbench.clock`).
    State where each number comes from on the class's ``card``."""


# --------------------------------------------------------------------------
# observers
# --------------------------------------------------------------------------


@hookspec
def on_cell_start(cell: dict[str, Any]) -> None:
    """Called before a cell trains. ``cell`` is the resolved cell config
    (``cell["cell_id"]``, ``cell["config"]``)."""


@hookspec
def on_round_end(cell: dict[str, Any], round: int, metrics: dict[str, Any]) -> None:
    """Called after each round (1-based ``round``) with that round's history
    entry: ``loss``, ``utility`` (the primary metric on the pooled test set)
    and, under DP, ``epsilon`` so far."""


@hookspec
def on_cell_end(cell: dict[str, Any], record: dict[str, Any]) -> None:
    """Called with the finished result record (any status) before it is written."""
