"""Writing files safely, and naming what went wrong when the OS refuses.

- :func:`write_atomic`: a temporary file in the target's folder, fsync,
  rename; the file gets the mode a plain ``open()`` would give it under the
  current umask (``mkstemp`` alone gives 0600), and the temporary file never
  survives an exception.
- :func:`os_error_message`: one line with the path, what the error means and
  the fix, for disk full, read-only or unwritable folders and a path that is
  a file.
- :func:`probe_writable`: create a folder (and parents) and prove a file can
  be written there, before any cell spends time training.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["current_umask", "write_atomic", "os_error_message", "probe_writable",
           "OutputError"]

_UMASK_LOCK = threading.Lock()


class OutputError(OSError):
    """An output folder cannot be written; ``str()`` is the one-line message."""

    def __init__(self, message: str, *, errno_: int | None = None) -> None:
        super().__init__(errno_ or 0, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def current_umask() -> int:
    """The process umask (read from ``/proc`` where it is available, which
    leaves the umask untouched; else set and restored under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], object], *,
                 mode: int = 0o666) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to
    ``path`` atomically: ``.<stem>.<random>.tmp`` in the same folder, fsync,
    rename over ``path``. The file's permissions are ``mode`` less the umask
    (0644 under the usual umask 022)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def os_error_message(exc: OSError, path: Path | str, *, option: str = "--out") -> str:
    """One line: what failed on ``path``, why, and the fix (``option`` names
    the command-line option that chooses another path)."""
    p = str(path)
    code = exc.errno
    other = f"pass {option} DIR" if option else "choose another folder"
    if code == errno.ENOSPC:
        return (f"no space left on the device holding {p}; free some space there or "
                f"{other} on another disk, then run again (finished cells are kept)")
    if code == errno.EDQUOT:
        return (f"disk quota exceeded writing {p}; free some of your quota or {other} on "
                f"another disk, then run again (finished cells are kept)")
    if code == errno.EROFS:
        return f"{p} is on a read-only file system; {other} on a writable disk"
    if code in (errno.EACCES, errno.EPERM):
        return (f"no permission to write in {p}; make it writable (chmod u+w {p}) or "
                f"{other}")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return (f"{p} is a file, or lies under a file, so it cannot be a folder; {other} "
                f"with a folder path")
    if code == errno.ENAMETOOLONG:
        return f"the path {p} is too long for the file system; {other} with a shorter path"
    reason = exc.strerror or str(exc)
    return f"cannot write {p}: {reason}; {other}"


def probe_writable(folder: Path, *, option: str = "--out") -> Path:
    """Create ``folder`` (with parents) and write and remove a small file
    there; raise :class:`OutputError` with :func:`os_error_message` when the
    OS refuses (a file in the way, read-only, no permission, disk full)."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fedmedbench-probe.", suffix=".tmp")
        try:
            os.write(fd, b"probe\n" * 512)  # a few kB: a full disk usually refuses this
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(os_error_message(exc, folder, option=option),
                          errno_=exc.errno) from None
    return folder
