"""The result-record schema version (one home, imported without the engine)."""

from __future__ import annotations

#: the schema of every result record this version writes and reads
SCHEMA = "fedmedbench.result/1"
