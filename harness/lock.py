"""The run lock: one ``fedmedbench run`` per results folder at a time, or
one run per shard of a split.

``run`` holds an OS file lock (``fcntl.flock``) on
``<results>/.fedmedbench.lock`` for the whole run. The kernel drops it when
its holder exits, however it exits (``kill -9`` included), so a lock is never
stale. The holder writes its pid, host, start time and command line into the
file; a second run on the same folder reads them to say who holds it, and
either refuses (exit 2) or, with ``--wait``, queues until the lock is free.

Shards of one split (``--shard I/N``, e.g. ``tox p -m matrix``) write disjoint
cells, so they may share a folder: a sharded run holds the folder lock
*shared* and ``.fedmedbench.shard-I-of-N.lock`` exclusively. Two runs of the
same shard still exclude each other, and a run of the whole matrix excludes
(and is excluded by) every shard.

Lock files are opened with ``O_NOFOLLOW``: a symbolic link in their place is
refused (exit 2), never followed, so no file of the user's is overwritten.

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
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedmedbench.errors import ConfigError
from fedmedbench.fileio import OutputError, SymlinkRefused, os_error_message, short_path

__all__ = ["LOCK_NAME", "RunLock", "results_lock", "holder_of", "shard_lock_name"]

LOCK_NAME = ".fedmedbench.lock"


def shard_lock_name(shard: tuple[int, int]) -> str:
    """The lock file of shard ``(I, N)``: ``.fedmedbench.shard-I-of-N.lock``."""
    return f".fedmedbench.shard-{shard[0]}-of-{shard[1]}.lock"


class RunLock:
    """A held lock: ``path``, ``acquired_at`` (``time.time()``) and whether it
    is ``exclusive`` (a whole run) or shared with other shards."""

    def __init__(self, path: Path, fd: int, acquired_at: float, *, exclusive: bool = True,
                 extra_fds: tuple[int, ...] = ()) -> None:
        self.path, self.fd, self.acquired_at = path, fd, acquired_at
        self.exclusive = exclusive
        self._fds = [fd, *extra_fds]

    def release(self) -> None:
        import fcntl

        for fd in reversed(self._fds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds = []
        self.fd = -1


def _open_lock_file(path: Path, results_dir: Path) -> int:
    """Open (create) a lock file without following a symbolic link; refuse
    anything that is not a regular file."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            from fedmedbench.fileio import refuse_symlink

            refuse_symlink(path)
        raise OutputError(os_error_message(exc, results_dir), errno_=exc.errno) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SymlinkRefused(f"{short_path(path)} is not a regular file; fedmedbench keeps its "
                             f"run lock there: remove it, or pass --out DIR")
    return fd


def holder_of(path: Path) -> dict[str, Any]:
    """What the current holder wrote into the lock file (empty if unreadable;
    a symbolic link or a FIFO is never opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        info = json.loads(os.read(fd, 10000).decode("utf-8", "replace") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("host") and info.get("host") != socket.gethostname():
        parts.append(f"on host {info['host']}")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    if info.get("shard"):
        parts.append(f"shard {info['shard']}")
    text = ", ".join(parts)
    if info.get("command"):
        text += f": `{info['command']}`"
    from fedmedbench.errors import printable

    return printable(text, keep_newlines=False)


def _shard_holders(results_dir: Path) -> str:
    """Who holds shard locks of ``results_dir`` (for a whole run that must wait)."""
    import fcntl

    held = []
    for p in sorted(Path(results_dir).glob(".fedmedbench.shard-*.lock")):
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            held.append(_describe(holder_of(p)))
        finally:
            os.close(fd)
    return "; ".join(held)


def _flock(fd: int, how: int, *, wait: bool, describe: Callable[[], str],
           refuse: Callable[[str], str], on_wait: Callable[[str], None] | None,
           path: Path, results_dir: Path) -> None:
    import fcntl

    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        who = describe()
        if not wait:
            raise ConfigError(refuse(who)) from None
        if on_wait:
            on_wait(f"{results_dir} is in use by {who}; waiting for it to finish")
        fcntl.flock(fd, how)
    except OSError as exc:  # a file system without locks (some NFS mounts)
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        warnings.warn(f"cannot lock {path} ({exc.strerror}); running without the run "
                      f"lock: do not start a second run on {results_dir}", RuntimeWarning,
                      stacklevel=4)


def _info(shard: tuple[int, int] | None) -> bytes:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
            if sys.argv and sys.argv[0] else ""}
    if shard:
        info["shard"] = f"{shard[0]}/{shard[1]}"
    return json.dumps(info).encode("utf-8")


def _write_info(fd: int, data: bytes, results_dir: Path) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError as exc:
        raise OutputError(os_error_message(exc, results_dir), errno_=exc.errno) from None


@contextlib.contextmanager
def results_lock(results_dir: Path, *, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None,
                 shard: tuple[int, int] | None = None) -> Iterator[RunLock]:
    """Hold the run lock of ``results_dir`` (which must exist) for the block:
    exclusively, or with ``shard=(I, N)`` shared with the other shards of the
    split and exclusively for shard ``I``.

    Raises
    ------
    ConfigError
        When another process holds it and ``wait`` is false; the message
        names that process and says how to wait. With ``wait``, ``on_wait``
        is called once with the same description, then the call blocks.
        :class:`~fedmedbench.fileio.SymlinkRefused` (a ``ConfigError``) when
        a lock file is a symbolic link or not a regular file.
    """
    import fcntl

    results_dir = Path(results_dir)
    path = results_dir / LOCK_NAME
    fd = _open_lock_file(path, results_dir)
    fds = [fd]
    try:
        if shard is None:
            _flock(fd, fcntl.LOCK_EX, wait=wait, path=path, results_dir=results_dir,
                   on_wait=on_wait,
                   describe=lambda: (_shard_holders(results_dir)
                                     or _describe(holder_of(path))),
                   refuse=lambda who: (
                       f"{results_dir} is in use by another fedmedbench run ({who}); wait for "
                       f"it to finish, pass --wait to queue behind it, or pass --out DIR for "
                       f"another folder"))
            acquired = time.time()
            _write_info(fd, _info(None), results_dir)
            lock = RunLock(path, fd, acquired, exclusive=True)
        else:
            i, n = shard
            _flock(fd, fcntl.LOCK_SH, wait=wait, path=path, results_dir=results_dir,
                   on_wait=on_wait, describe=lambda: _describe(holder_of(path)),
                   refuse=lambda who: (
                       f"{results_dir} is in use by a fedmedbench run of the whole matrix "
                       f"({who}); wait for it to finish, pass --wait to queue behind it, or "
                       f"pass --out DIR for another folder"))
            spath = results_dir / shard_lock_name(shard)
            sfd = _open_lock_file(spath, results_dir)
            fds.append(sfd)
            _flock(sfd, fcntl.LOCK_EX, wait=wait, path=spath, results_dir=results_dir,
                   on_wait=on_wait, describe=lambda: _describe(holder_of(spath)),
                   refuse=lambda who: (
                       f"shard {i}/{n} of {results_dir} is in use by another fedmedbench run "
                       f"({who}); other shards of the split may run beside it, the same shard "
                       f"may not: wait for it, pass --wait, or pass --out DIR"))
            acquired = time.time()
            _write_info(sfd, _info(shard), results_dir)
            lock = RunLock(path, fd, acquired, exclusive=False, extra_fds=(sfd,))
    except BaseException:
        for f in fds:
            with contextlib.suppress(OSError):
                os.close(f)
        raise
    try:
        yield lock
    finally:
        lock.release()
