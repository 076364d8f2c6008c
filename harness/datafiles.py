"""Shipped data files, dataset cards, checksums and the derived-array cache.

Shipped files live in ``datasets/<card>/`` next to a ``card.toml``. From a
source checkout (editable install) that is the repository's ``datasets/``;
from a wheel it is ``harness/_datasets`` (the build copies it there).
``FEDMEDBENCH_DATASETS_DIR`` overrides both.

:func:`inspect_npz` reads the headers of an ``.npz`` a user supplies before
any array is loaded: a header that declares more data than the file holds (or
than the machine has), a compressed member that expands past
:data:`MAX_NPZ_RATIO` times its size (a zip bomb), or an object array
(pickle) is a :class:`DataError` naming the file and the array.

Derived arrays (after preprocessing) are cached as ``.npz`` (never pickle)
under ``FEDMEDBENCH_CACHE_DIR`` (default ``~/.cache/fedmedbench``), keyed by
the source file's sha256 and the loader's preprocessing version; a cache file
that fails to load is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from fedmedbench.errors import DataError
from fedmedbench.fileio import write_atomic


def datasets_dir() -> Path:
    """The folder holding the shipped dataset folders and their cards."""
    env = os.environ.get("FEDMEDBENCH_DATASETS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here / "_datasets", here.parent / "datasets"):
        if cand.is_dir():
            return cand
    raise DataError(
        "cannot find the shipped datasets folder (looked for harness/_datasets and "
        "./datasets next to the harness package); reinstall fedmedbench or set "
        "FEDMEDBENCH_DATASETS_DIR"
    )


def card_path(card: str) -> Path:
    return datasets_dir() / card / "card.toml"


def load_card(card: str) -> dict[str, Any]:
    """Parse ``datasets/<card>/card.toml``."""
    p = card_path(card)
    if not p.is_file():
        raise DataError(f"dataset card {p} is missing; every shipped dataset needs one")
    with p.open("rb") as f:
        return tomllib.load(f)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes as hex (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_file(card: str, filename: str, *, verify: bool = True) -> Path:
    """Path of a shipped file, verified against the sha256 on its card."""
    path = datasets_dir() / card / filename
    if not path.is_file():
        raise DataError(
            f"shipped data file {path} is missing; reinstall fedmedbench or restore it from "
            f"the repository (see datasets/{card}/card.toml for its source)"
        )
    if verify:
        expected = (load_card(card).get("files") or {}).get(filename, {}).get("sha256")
        if expected:
            actual = _sha256_cached(path)
            if actual != expected:
                raise DataError(
                    f"{path} is corrupt: sha256 {actual[:16]}… does not match the card's "
                    f"{expected[:16]}…; restore the file from the repository"
                )
    return path


_SHA_MEMO: dict[tuple[str, float, int], str] = {}


def _sha256_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def check_card_files(card: str) -> list[Path]:
    """Verify every file ``datasets/<card>/card.toml`` lists under ``[files]``
    against its sha256 (memoised by path, mtime and size); raise
    :class:`DataError` naming the first file missing or corrupt. The
    ``Dataset.check_files`` of a shipped dataset calls this."""
    files = load_card(card).get("files") or {}
    if not isinstance(files, dict):
        raise DataError(f"dataset card {card_path(card)}: [files] must be a table of file names")
    return [shipped_file(card, name) for name in files]


def check_gzip(path: Path, *, what: str) -> None:
    """Read a ``.gz`` file to its end (its CRC and length trailer included) and
    raise :class:`DataError` naming it when it is truncated or corrupt
    (memoised by path, mtime and size, like the checksums)."""
    import gzip
    import zlib

    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key in _GZIP_OK:
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{what}: {path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                        f"download it again") from None
    _GZIP_OK.add(key)


_GZIP_OK: set[tuple[str, float, int]] = set()


def verify_checksum(path: Path, expected: str, *, what: str) -> None:
    """Raise :class:`DataError` when ``path``'s sha256 is not ``expected``."""
    actual = _sha256_cached(Path(path))
    if actual != expected:
        raise DataError(
            f"{what}: {path} has sha256 {actual} but {expected} was expected; the file is "
            f"corrupt or a different version: download it again"
        )


#: a compressed .npz member larger than :data:`NPZ_RATIO_FROM` that expands more than this
#: many times is refused as a zip bomb (real arrays compress a few times at most)
MAX_NPZ_RATIO = 200
NPZ_RATIO_FROM = 64 * 2**20


def memory_bytes() -> int:
    """The machine's physical memory in bytes (a large number where unknown)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2**50


def _fmt_bytes(n: int) -> str:
    for unit, k in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n} B"


def inspect_npz(path: Path, *, what: str, limit: int | None = None
                ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, dtype)}`` of an ``.npz`` file, read from the
    ``.npy`` headers only, after checking that no array declares more bytes
    than its member holds, that together they fit in ``limit`` bytes (default:
    the machine's memory), that no compressed member expands more than
    :data:`MAX_NPZ_RATIO` times past :data:`NPZ_RATIO_FROM` bytes, and that
    no array holds Python objects (pickle). Raises :class:`DataError` naming
    the file and the array."""
    import math
    import zipfile

    limit = memory_bytes() if limit is None else limit
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                if (info.compress_type != zipfile.ZIP_STORED and info.compress_size
                        and info.file_size > NPZ_RATIO_FROM
                        and info.file_size > MAX_NPZ_RATIO * info.compress_size):
                    raise DataError(
                        f"{what}: {path}: {key} expands from {_fmt_bytes(info.compress_size)} "
                        f"compressed to {_fmt_bytes(info.file_size)} (a compression ratio over "
                        f"{MAX_NPZ_RATIO}:1, a zip bomb rather than image data); use the "
                        f"official file")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version in ((2, 0), (3, 0)):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"unknown .npy format version {version}")
                    header = f.tell()
                if dtype.hasobject:
                    raise DataError(f"{what}: {path}: {key} holds Python objects (it would need "
                                    f"pickle, which fedmedbench never loads); use the official "
                                    f"file")
                nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
                if nbytes != info.file_size - header:
                    raise DataError(
                        f"{what}: {path}: {key} declares shape {tuple(shape)} of {dtype} "
                        f"({_fmt_bytes(nbytes)}) but holds {_fmt_bytes(info.file_size - header)}; "
                        f"the file is corrupt or forged: download it again")
                total += nbytes
                out[key] = (tuple(int(d) for d in shape), dtype)
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, SyntaxError) as exc:
        raise DataError(f"{what}: {path} is not a readable .npz of numeric arrays "
                        f"({type(exc).__name__}: {exc})") from None
    if total > limit:
        raise DataError(f"{what}: {path} declares {_fmt_bytes(total)} of arrays, more than this "
                        f"machine's {_fmt_bytes(limit)} of memory; use a smaller file")
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("FEDMEDBENCH_CACHE_DIR", Path.home() / ".cache" / "fedmedbench"))


def cached_arrays(key_parts: list[str], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return ``build()``'s arrays, cached on disk under a hash of ``key_parts``
    (include the source checksum and a preprocessing version)."""
    key = hashlib.sha256("\x1f".join(key_parts).encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # corrupt or truncated cache: rebuild below
            path.unlink(missing_ok=True)
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path.parent)
        # the temp file never outlives a failure (a full disk, an interrupt)
        write_atomic(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    except OSError:
        pass  # a read-only or full cache dir only costs speed
    return arrays


#: a cache temp file older than this belongs to a writer that died
STALE_TEMP_S = 3600.0


def _remove_stale_temp_files(folder: Path) -> None:
    """Remove temp files that killed writers left in the cache (``.<key>.*.tmp``,
    and 0.1's ``tmp*.npz.tmp``) once they are older than :data:`STALE_TEMP_S`."""
    import time

    now = time.time()
    for p in [*folder.glob(".*.tmp"), *folder.glob("tmp*.npz.tmp")]:
        try:
            if now - p.stat().st_mtime > STALE_TEMP_S:
                p.unlink()
        except OSError:
            pass
