"""Exceptions with messages that name what is wrong and how to fix it."""

from __future__ import annotations

import threading


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


#: set by the command line's SIGINT handler: a KeyboardInterrupt while it is set
#: is the user's Ctrl-C, any other one was raised by plugin code
INTERRUPTED = threading.Event()


def install_interrupt_handler() -> None:
    """Make Ctrl-C set :data:`INTERRUPTED` before raising KeyboardInterrupt (main
    thread only), so that the engine can tell it from ``raise KeyboardInterrupt``
    in a plugin."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


class Skip(FedmedbenchError):
    """A cell whose components cannot work together; the message is the reason."""


class SettingWarning(UserWarning):
    """A setting that makes a cell's numbers suspect (a secure-aggregation clip
    range that clips most of an update): recorded in the record's
    ``warnings`` and printed when the cell ends."""
