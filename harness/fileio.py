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
- :func:`output_dir` and :func:`write_output`: what reporters write inside an
  output folder, with no-follow semantics: a symbolic link where a file or a
  sub-folder goes is refused (:class:`SymlinkRefused`, a configuration error),
  and the file itself is replaced by a rename, never written through.
- :func:`short_path`: a path cut to a readable length for a message.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fedmedbench.errors import ConfigError

__all__ = ["current_umask", "write_atomic", "os_error_message", "probe_writable",
           "OutputError", "SymlinkRefused", "output_dir", "write_output", "short_path",
           "refuse_symlink"]

#: a path in a message is cut to about this many characters
SHORT_PATH = 160

_UMASK_LOCK = threading.Lock()


class OutputError(OSError):
    """An output folder cannot be written; ``str()`` is the one-line message."""

    def __init__(self, message: str, *, errno_: int | None = None) -> None:
        super().__init__(errno_ or 0, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SymlinkRefused(ConfigError):
    """A symbolic link where fedmedbench would write a file or a folder: it is
    never followed (it could point at any file of the user's)."""


def short_path(path: Path | str, limit: int = SHORT_PATH) -> str:
    """``path`` as text, cut in the middle when longer than ``limit``
    characters (a 100,000-character path stays a one-line message)."""
    p = str(path)
    if len(p) <= limit:
        return p
    keep = max(10, (limit - 30) // 2)
    return f"{p[:keep]}...{p[-keep:]} ({len(p):,} characters)"


def refuse_symlink(path: Path, *, option: str = "--out") -> None:
    """Raise :class:`SymlinkRefused` when ``path`` is a symbolic link (checked
    with ``lstat``, so the link is never followed); nothing when it is
    missing or anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(os_error_message(exc, path, option=option), errno_=exc.errno) from None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = f" (to {short_path(os.readlink(path), 80)})"
        except OSError:
            target = ""
        raise SymlinkRefused(
            f"{short_path(path)} is a symbolic link{target}; fedmedbench never writes through "
            f"a link, which could overwrite a file of yours: remove the link, or pass {option} "
            f"with another folder")


def output_dir(root: Path, *parts: str, option: str = "--out") -> Path:
    """``root/parts...``, each part created if missing and refused when it is
    a symbolic link or not a folder (``root`` itself is the user's choice and
    may be a link)."""
    d = Path(root)
    for part in parts:
        d = d / part
        refuse_symlink(d, option=option)
        try:
            d.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(os_error_message(exc, d, option=option),
                              errno_=exc.errno) from None
        if not d.is_dir():
            raise OutputError(os_error_message(
                NotADirectoryError(errno.ENOTDIR, "Not a directory"), d, option=option),
                errno_=errno.ENOTDIR)
    return d


def write_output(root: Path, relpath: str, data: bytes | str, *,
                 option: str = "--out") -> Path:
    """Write ``data`` to ``root/relpath`` with no-follow semantics: every
    folder under ``root`` and the file itself must not be symbolic links
    (:class:`SymlinkRefused`), and the file is replaced atomically by a
    rename (:func:`write_atomic`), so a link that appears meanwhile is
    replaced, never followed. Text is UTF-8; characters UTF-8 cannot hold (a
    lone surrogate from a record) are written as ``\\udXXX`` escapes."""
    rel = Path(relpath)
    d = output_dir(root, *rel.parent.parts, option=option)
    target = d / rel.name
    refuse_symlink(target, option=option)
    if target.is_dir():
        raise OutputError(f"{short_path(target)} is a folder where a report file goes; move it "
                          f"away or pass {option} DIR")
    if isinstance(data, str):
        data = data.encode("utf-8", errors="backslashreplace")
    return write_atomic(target, data)


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
    p = short_path(path)
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
