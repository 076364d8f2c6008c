"""MedMNIST v2 2D subsets from the official ``.npz`` files the user
downloads (Yang et al. 2023, "MedMNIST v2 - A large-scale lightweight
benchmark for 2D and 3D biomedical image classification", Scientific Data
10:41).

Nothing ships (the files are CC BY 4.0 but tens of MB each and need a
download); point ``path`` at a ``.npz`` file, or at a folder holding
``<subset>.npz``, or set ``FEDMEDBENCH_MEDMNIST_DIR``. The arrays are read
with ``np.load(allow_pickle=False)``. The data come as one pooled site, split
into clients by the partitioner (default: Dirichlet label skew over 4
clients). The official validation split becomes the public split by default
(data no client holds, for distillation or pretraining).
"""

from __future__ import annotations

import os
import typing
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from fedmedbench import (
    DataError,
    Dataset,
    FederatedData,
    Site,
    Split,
    Task,
    inspect_npz,
    verify_checksum,
)

ENV = "FEDMEDBENCH_MEDMNIST_DIR"
SPLITS = ("train", "val", "test")
KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
HOWTO = ("download the official MedMNIST .npz file (https://medmnist.com, or "
         "`python -m medmnist save` / Zenodo record 10519652) and pass path=FILE_OR_DIR or set "
         f"{ENV}=DIR")
#: where the official validation split goes (``val``)
ValUse = Literal["public", "train", "drop"]
VAL_USES: tuple[str, ...] = typing.get_args(ValUse)
#: class labels are integers below this (MedMNIST's subsets have at most 11 classes; a
#: label of 2**40 would size a model's output layer in petabytes)
MAX_CLASSES = 1000


class MedMNIST(Dataset):
    """A MedMNIST 2D subset from a user-supplied official ``.npz`` file.

    Parameters
    ----------
    path : str, default ""
        The ``.npz`` file, or a folder holding ``<subset>.npz``; empty means
        ``$FEDMEDBENCH_MEDMNIST_DIR/<subset>.npz``.
    subset : str, default "pneumoniamnist"
        File stem to look for in a folder (``pathmnist``, ``dermamnist_64``, ...).
    sha256 : str, default ""
        If given, the file's sha256 must match it.
    val : {"public", "train", "drop"}, default "public"
        Where the official validation split goes.
    """

    name = "medmnist"
    card = "medmnist"
    needs_user_files = True
    default_partitioner = {"name": "dirichlet", "n_clients": 4, "alpha": 1.0}
    run_defaults = {"batch_size": 32, "lr": 0.05, "local_steps": 10, "clients_per_round": 64}

    def __init__(self, *, path: str = "", subset: str = "pneumoniamnist", sha256: str = "",
                 val: ValUse = "public") -> None:
        if not subset or "/" in subset:
            raise ValueError(f"subset must be a file stem such as 'pathmnist', got {subset!r}")
        if sha256 and (len(sha256) != 64 or any(c not in "0123456789abcdef"
                                                for c in sha256.lower())):
            raise ValueError(f"sha256 must be empty or 64 hex digits, got {sha256!r}")
        self.path, self.subset, self.sha256, self.val = path, subset, sha256.lower(), val

    def file(self) -> Path:
        given = self.path or os.environ.get(ENV, "")
        if not given:
            raise DataError(f"medmnist: no file given (expected {self.subset}.npz). {HOWTO}")
        p = Path(given).expanduser()
        if p.is_dir():
            p = p / f"{self.subset}.npz"
        if not p.is_file():
            raise DataError(f"medmnist: {p} does not exist. {HOWTO}")
        return p

    def _inspect(self, p: Path) -> None:
        """The headers of the file, checked before any array is read
        (:func:`fedmedbench.datafiles.inspect_npz`): no forged shape, no zip
        bomb, nothing larger than this machine's memory."""
        heads = inspect_npz(p, what=f"medmnist {self.subset}")
        missing = [k for k in KEYS if k not in heads]
        if missing:
            raise DataError(f"medmnist: {p} lacks keys {missing} (found {sorted(heads)}); an "
                            f"official MedMNIST file has {list(KEYS)}")

    def arrays(self) -> dict[str, np.ndarray]:
        p = self.file()
        if self.sha256:
            verify_checksum(p, self.sha256, what=f"medmnist {self.subset}")
        self._inspect(p)
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in KEYS if k not in z.files]
                if missing:
                    raise DataError(f"medmnist: {p} lacks keys {missing} (found {z.files}); an "
                                    f"official MedMNIST file has {list(KEYS)}")
                return {k: z[k] for k in KEYS}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"medmnist: {p} is not a readable .npz of numeric arrays "
                            f"({type(exc).__name__}: {exc}). {HOWTO}") from exc

    def check_files(self) -> None:
        """The file is there, matches ``sha256`` if given, holds the six
        official arrays, and its labels are non-negative integers (the labels
        are small; the images are read only by :meth:`load`)."""
        p = self.file()
        if self.sha256:
            verify_checksum(p, self.sha256, what=f"medmnist {self.subset}")
        self._inspect(p)
        try:
            with np.load(p, allow_pickle=False) as z:
                for s in SPLITS:
                    _check_labels(z[f"{s}_labels"], s, p)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"medmnist: {p} is not a readable .npz of numeric arrays "
                            f"({type(exc).__name__}: {exc}). {HOWTO}") from exc

    def load(self, *, seed: int) -> FederatedData:
        a = self.arrays()
        p = self.file()
        for s in SPLITS:
            _check_labels(a[f"{s}_labels"], s, p)
        splits = {s: _split(a[f"{s}_images"], a[f"{s}_labels"], s) for s in SPLITS}
        shapes = {s: splits[s].X.shape[1:] for s in SPLITS}
        if len(set(shapes.values())) != 1:
            raise DataError(f"medmnist: image shapes differ between splits: {shapes}")
        C = int(max(int(splits[s].y.max()) for s in SPLITS if len(splits[s]))) + 1
        train, public = splits["train"], None
        if self.val == "train":
            train = Split.concat([train, splits["val"]])
        elif self.val == "public":
            public = splits["val"]
        shape = tuple(int(d) for d in train.X.shape[1:])
        if shape[-1] % 4:
            raise DataError(f"medmnist: image side {shape[-1]} is not a multiple of 4")
        task = Task(kind="binary" if C == 2 else "multiclass", num_classes=C, input_shape=shape,
                    metric="auroc", model="cnn", model_kwargs={"width": 16})
        return FederatedData(task=task, sites=[Site(self.subset, train, splits["test"])],
                             public=public, natural=False)

    def describe(self) -> dict:
        try:
            data = self.load(seed=0)
        except DataError as exc:
            return {"sites": "one pooled site, split by the partitioner (default dirichlet, "
                             "4 clients)", "note": f"file not found: {exc}"}
        s = data.sites[0]
        return {"sites": f"{s.name}: train {len(s.train)} / test {len(s.test)}"
                         f"{f' / public {len(data.public)}' if data.public is not None else ''},"
                         f" {data.task.num_classes} classes, images {data.task.input_shape}"}


def _check_labels(labels: np.ndarray, name: str, path: Path) -> None:
    """Class labels are integers from 0 (a negative one would index outside
    every class table)."""
    if labels.dtype.kind not in "ui":
        raise DataError(f"medmnist: {path}: {name}_labels has dtype {labels.dtype}; expected "
                        f"integer class labels")
    if labels.size and int(labels.min()) < 0:
        raise DataError(f"medmnist: {path}: {name}_labels holds negative labels (min "
                        f"{int(labels.min())}); class labels are integers from 0. {HOWTO}")
    if labels.size and int(labels.max()) >= MAX_CLASSES:
        raise DataError(f"medmnist: {path}: {name}_labels holds the label {int(labels.max())}; "
                        f"class labels are integers from 0 to {MAX_CLASSES - 1} (MedMNIST's "
                        f"subsets have at most 11 classes). {HOWTO}")


def _split(images: np.ndarray, labels: np.ndarray, name: str) -> Split:
    if images.dtype.kind not in "uif" or labels.dtype.kind not in "ui":
        raise DataError(f"medmnist: {name} arrays have dtypes {images.dtype}/{labels.dtype}; "
                        f"expected uint8 images and integer labels")
    if images.ndim == 3:
        X = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        X = np.transpose(images, (0, 3, 1, 2))
    else:
        raise DataError(f"medmnist: {name}_images has shape {images.shape}; expected N x H x W "
                        f"or N x H x W x 3 (2D subsets only)")
    y = labels.reshape(len(labels), -1)
    if y.shape[1] != 1:
        raise DataError(f"medmnist: {name}_labels has shape {labels.shape}: multi-label subsets "
                        f"(chestmnist) are not supported, only single-label classification")
    if len(y) != len(X):
        raise DataError(f"medmnist: {len(X)} {name} images but {len(y)} labels")
    X = X.astype(np.float32)
    if images.dtype.kind in "ui":
        X /= 255.0
    return Split(np.ascontiguousarray(X), y[:, 0].astype(np.int64))


COMPONENTS = (MedMNIST,)
