"""Exceptions with messages that name what is wrong and how to fix it."""

from __future__ import annotations

import threading


class FedmedbenchError(Exception):
    """Base of fedmedbench's own errors."""


class ConfigError(FedmedbenchError):
    """Bad usage or configuration (exit code 2): the message names the key,
    the value and what is allowed."""


class ParameterError(ConfigError, ValueError):
    """A parameter value its annotation refuses (type, ``Range``, ``Literal``
    choices), raised where a matrix cell is built and where a component is
    constructed directly; a :class:`ValueError` too."""


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


# characters that must not reach a terminal or a report as they are: C0 and C1
# controls (escape sequences, bells, carriage returns), DEL, bidirectional
# overrides and lone surrogates (which no encoder writes)
_UNSAFE = {*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x200E, 0x200F,
           *range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000)}
_KEEP = {0x0A, 0x09}  # newline and tab keep their meaning in printed text


def printable(text: object, *, keep_newlines: bool = True) -> str:
    """``text`` safe to print on a terminal or write into a report: control
    characters (``ESC`` and every other C0/C1 control, DEL), bidirectional
    overrides and lone surrogates are written as visible escapes (``\\x1b``,
    ``\\u202e``, ``\\ud800``); everything else is unchanged. With
    ``keep_newlines=False`` newlines and tabs are escaped too (one line)."""
    s = str(text)
    keep = _KEEP if keep_newlines else set()
    if not any(ord(c) in _UNSAFE and ord(c) not in keep for c in s):
        return s
    out = []
    for c in s:
        o = ord(c)
        if o in _UNSAFE and o not in keep:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out)


class ExecutorLost(FedmedbenchError):
    """The executor's cluster went away mid-run (a dask scheduler killed):
    finished cells are saved, the cells in flight are recorded failed with the
    cause; the command line exits 1 with this one-line message."""
