"""The result-record schema version (one home, imported without the engine)."""

from __future__ import annotations

SCHEMA = "fedmedbench.result/1"
