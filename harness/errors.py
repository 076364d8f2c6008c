"""Exceptions with messages that name what is wrong and how to fix it."""

from __future__ import annotations


class FedmedbenchError(Exception):
    """Base of fedmedbench's own errors."""


class ConfigError(FedmedbenchError):
    """Bad usage or configuration (exit code 2): the message names the key,
    the value and what is allowed."""


class PluginConflictError(ConfigError):
    """Two plugins registered the same component name."""


class DataError(FedmedbenchError):
    """Missing, malformed or corrupt data files; the message says which file
    and how to obtain or repair it."""


class SchemaError(FedmedbenchError):
    """A result record of another schema version or a malformed record file."""


class PluginError(FedmedbenchError):
    """A plugin raised inside a cell; carries which plugin and which hook."""

    def __init__(self, message: str, *, plugin: str, component: str, hook: str,
                 exc_type: str) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.component = component
        self.hook = hook
        self.exc_type = exc_type


class Diverged(FedmedbenchError):
    """Training produced a non-finite loss or non-finite parameters."""


class Skip(FedmedbenchError):
    """A cell whose components cannot work together; the message is the reason."""


class SettingWarning(UserWarning):
    """A setting that makes a cell's numbers suspect (a secure-aggregation clip
    range that clips most of an update): recorded in the record's
    ``warnings`` and printed when the cell ends."""
