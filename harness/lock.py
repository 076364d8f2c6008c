"""The run lock: one ``fedmedbench run`` per results folder at a time.

``run`` holds an OS file lock (``fcntl.flock``) on
``<results>/.fedmedbench.lock`` for the whole run. The kernel drops it when
its holder exits, however it exits (``kill -9`` included), so a lock is never
stale. The holder writes its pid, host, start time and command line into the
file; a second run on the same folder reads them to say who holds it, and
either refuses (exit 2) or, with ``--wait``, queues until the lock is free.

Locks are advisory and per host: two machines writing one folder over NFS
are not serialised (give each shard its own ``--out``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedmedbench.errors import ConfigError
from fedmedbench.fileio import OutputError, os_error_message

__all__ = ["LOCK_NAME", "RunLock", "results_lock", "holder_of"]

LOCK_NAME = ".fedmedbench.lock"


class RunLock:
    """A held lock: ``path``, and ``acquired_at`` (``time.time()``)."""

    def __init__(self, path: Path, fd: int, acquired_at: float) -> None:
        self.path, self.fd, self.acquired_at = path, fd, acquired_at

    def release(self) -> None:
        if self.fd >= 0:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def holder_of(path: Path) -> dict[str, Any]:
    """What the current holder wrote into the lock file (empty if unreadable)."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8")[:10000] or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("host") and info.get("host") != socket.gethostname():
        parts.append(f"on host {info['host']}")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    text = ", ".join(parts)
    if info.get("command"):
        text += f": `{info['command']}`"
    return text


@contextlib.contextmanager
def results_lock(results_dir: Path, *, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[RunLock]:
    """Hold the run lock of ``results_dir`` (which must exist) for the block.

    Raises
    ------
    ConfigError
        When another process holds it and ``wait`` is false; the message
        names that process and says how to wait. With ``wait``, ``on_wait``
        is called once with the same description, then the call blocks.
    """
    import fcntl

    path = Path(results_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(os_error_message(exc, results_dir), errno_=exc.errno) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(holder_of(path))
            if not wait:
                raise ConfigError(
                    f"{results_dir} is in use by another fedmedbench run ({who}); wait for it "
                    f"to finish, pass --wait to queue behind it, or pass --out DIR for another "
                    f"folder") from None
            if on_wait:
                on_wait(f"{results_dir} is in use by {who}; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks (some NFS mounts)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            warnings.warn(f"cannot lock {path} ({exc.strerror}); running without the run "
                          f"lock: do not start a second run on {results_dir}", RuntimeWarning,
                          stacklevel=3)
        acquired = time.time()
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
                "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
                if sys.argv and sys.argv[0] else ""}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        except OSError as exc:
            raise OutputError(os_error_message(exc, results_dir), errno_=exc.errno) from None
        lock = RunLock(path, fd, acquired)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield lock
    finally:
        lock.release()
