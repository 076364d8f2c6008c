"""eICU Collaborative Research Database 2.0: in-hospital mortality across
hospitals, from files the user obtains (Pollard et al. 2018, "The eICU
Collaborative Research Database, a freely available multi-center database
for critical care research", Scientific Data 5:180178).

eICU-CRD is credentialed-access data on PhysioNet, so nothing ships: point
``path`` (or ``FEDMEDBENCH_EICU_DIR``) at the folder holding ``patient``,
``apachePatientResult`` and ``apacheApsVar`` (``.csv`` or ``.csv.gz``, as
downloaded). Sites are the real hospitals (``hospitalid``), the natural
multi-hospital ICU case; hospitals with fewer than ``min_stays`` stays are
dropped. Features are APACHE IV(a) inputs and scores (Zimmerman et al. 2006,
"Acute Physiology and Chronic Health Evaluation (APACHE) IV: hospital
mortality assessment for today's critically ill patients", Crit Care Med
34:1297-1310); the label is ``hospitaldischargestatus == "Expired"``.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np

from fedmedbench import (
    DataError,
    Dataset,
    FederatedData,
    Range,
    Task,
    cached_arrays,
    check_gzip,
    sha256_file,
    verify_checksum,
)
from fedmedbench.plugins.datasets._common import (
    POOLED_NOTE,
    Scaling,
    scaled_arrays,
    sites_from_arrays,
    split_indices,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

ENV = "FEDMEDBENCH_EICU_DIR"
ACCESS = ("eICU-CRD 2.0 is credentialed-access data: create a PhysioNet account, complete "
          "the required CITI 'Data or Specimens Only Research' training, sign the data use "
          "agreement at https://physionet.org/content/eicu-crd/2.0/ and download the files; "
          f"then pass path=DIR or set {ENV}=DIR")
PREPROCESSING_VERSION = "eicu-2"
SPLIT_SEED = 5
TEST_FRACTION = 0.25
APS_VARS = ["intubated", "vent", "dialysis", "eyes", "motor", "verbal", "meds", "urine", "wbc",
            "temperature", "respiratoryrate", "sodium", "heartrate", "meanbp", "ph",
            "hematocrit", "creatinine", "albumin", "pao2", "pco2", "bun", "glucose",
            "bilirubin", "fio2"]
RESULT_VARS = ["acutephysiologyscore", "apachescore"]
TABLES = {
    "patient": ["patientunitstayid", "hospitalid", "age", "gender", "admissionheight",
                "admissionweight", "unitvisitnumber", "hospitaldischargestatus"],
    "apachePatientResult": ["patientunitstayid", "apacheversion", *RESULT_VARS],
    "apacheApsVar": ["patientunitstayid", *APS_VARS],
}
FEATURES = ["age", "gender=male", "admissionheight", "admissionweight", *RESULT_VARS,
            *APS_VARS, "apache_missing"]


def table_file(folder: Path, table: str) -> Path | None:
    for suffix in (".csv.gz", ".csv"):
        p = folder / f"{table}{suffix}"
        if p.is_file():
            return p
    return None


class EICU(Dataset):
    """eICU-CRD 2.0 in-hospital mortality; sites are real hospitals (user-supplied files).

    Parameters
    ----------
    path : str, default ""
        Folder with the eICU-CRD CSV files; empty means ``$FEDMEDBENCH_EICU_DIR``.
    min_stays : int, default 100
        Hospitals with fewer first-ICU stays (after filtering) are dropped.
    checksums : dict or None, default None
        Optional ``{file name: sha256}`` to verify (e.g. the SHA256SUMS that
        PhysioNet publishes); a mismatch is an error.
    scaling : {"site", "pooled"}, default "site"
        Standardise each hospital with its own training statistics (the
        default), or all hospitals with the pooled training rows' statistics:
        outside the federated threat model, and the record says so.
    """

    name = "eicu"
    card = "eicu"
    needs_user_files = True
    run_defaults = {"batch_size": 64, "lr": 0.1, "local_steps": 10, "clients_per_round": 0.5}

    def __init__(self, *, path: str = "", min_stays: Annotated[int, Range(ge=4)] = 100,
                 checksums: dict | None = None, scaling: Scaling = "site") -> None:
        if checksums is not None and not (isinstance(checksums, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in checksums.items())):
            raise ValueError(f"checksums must map file names to sha256 strings, got {checksums!r}")
        self.path, self.min_stays, self.checksums = path, min_stays, checksums
        self.scaling = scaling

    def outside_threat_model(self) -> list[str]:
        return [POOLED_NOTE] if self.scaling == "pooled" else []

    def folder(self) -> Path:
        p = self.path or os.environ.get(ENV, "")
        if not p:
            raise DataError(f"eicu: no data folder given; expected {self.expected()} in a "
                            f"folder. {ACCESS}")
        return Path(p).expanduser()

    @staticmethod
    def expected() -> str:
        return ", ".join(f"{t}.csv.gz (or .csv)" for t in TABLES)

    def files(self) -> dict[str, Path]:
        folder = self.folder()
        found = {t: table_file(folder, t) for t in TABLES}
        missing = [t for t, p in found.items() if p is None]
        if missing:
            raise DataError(f"eicu: {folder} lacks {', '.join(m + '.csv.gz' for m in missing)} "
                            f"(expected {self.expected()}). {ACCESS}")
        files = {t: p for t, p in found.items() if p is not None}
        for t, p in files.items():
            cols = set(_read(p, None, nrows=0).columns)
            lacking = [c for c in TABLES[t] if c not in cols]
            if lacking:
                raise DataError(f"eicu: {p} is not the eICU-CRD 2.0 {t} table: it lacks "
                                f"columns {lacking} (found {sorted(cols)[:12]}...)")
        for name, sha in (self.checksums or {}).items():
            match = [p for p in files.values() if p.name == name]
            if not match:
                raise DataError(f"eicu: checksums names {name!r}, which is not one of "
                                f"{sorted(p.name for p in files.values())}")
            verify_checksum(match[0], sha, what=f"eicu {name}")
        return files

    def check_files(self) -> None:
        """The three tables are there with their columns, match ``checksums``
        where given, and each ``.csv.gz`` decompresses to its end."""
        for t, p in self.files().items():
            if p.suffix == ".gz":
                check_gzip(p, what=f"eicu {t} table")

    def load(self, *, seed: int) -> FederatedData:
        files = self.files()
        key = [self.name, PREPROCESSING_VERSION, str(self.min_stays),
               *(sha256_file(files[t]) for t in TABLES)]
        arrays = cached_arrays(key + [self.scaling],
                               lambda: preprocess(files, self.min_stays, scaling=self.scaling))
        names = [f"hospital{h}" for h in arrays["site_names"]]
        task = Task(kind="binary", num_classes=2, input_shape=(len(FEATURES),), metric="auroc",
                    model="logistic", feature_names=list(FEATURES))
        return FederatedData(task=task, sites=sites_from_arrays(arrays, names), natural=True)

    def describe(self) -> dict:
        try:
            data = self.load(seed=0)
        except DataError as exc:
            return {"sites": "hospitals (hospitalid) of the files you supply",
                    "note": f"files not found: {exc}"}
        ns = [len(s.train) + len(s.test) for s in data.sites]
        return {"sites": f"{len(ns)} hospitals, {sum(ns)} stays (smallest {min(ns)}, "
                         f"largest {max(ns)})"}


def _read(path: Path, cols: list[str] | None, **kw: object) -> pd.DataFrame:
    """One table; a truncated, corrupt or non-CSV file is a :class:`DataError`
    naming it (pandas and gzip would raise a bare ``EOFError``)."""
    import pandas as pd

    try:
        return pd.read_csv(path, usecols=cols, low_memory=False, **kw)
    except (EOFError, OSError, UnicodeDecodeError, zlib.error, pd.errors.ParserError,
            pd.errors.EmptyDataError) as exc:
        raise DataError(f"eicu: {path} is truncated, corrupt or not a CSV table "
                        f"({type(exc).__name__}: {exc}); download it again. {ACCESS}") from None


def _hospital_ids(col: pd.Series, path: Path) -> pd.Series:
    """``hospitalid`` as numbers (missing stays missing); a value that is not
    an integer id (``'1x'``, ``1.5``, ``1e30``) is a :class:`DataError`
    naming the file, the row and the value."""
    import pandas as pd

    num = pd.to_numeric(col, errors="coerce")
    bad = col.notna() & (num.isna() | (num % 1 != 0) | (num.abs() >= 2**53))
    if bad.any():
        i = bad.idxmax()
        raise DataError(f"eicu: {path}: hospitalid {col[i]!r} (row {int(i) + 2} of the file) is "
                        f"not an integer hospital id; eICU-CRD's hospitalid column holds "
                        f"integers: download the table again. {ACCESS}")
    return num


def preprocess(files: dict[str, Path], min_stays: int, *, scaling: str = "site"
               ) -> dict[str, np.ndarray]:
    """Join the three tables on ``patientunitstayid``; first ICU stay of each
    hospital stay; APACHE IVa where present; -1 (eICU's missing code) -> NaN;
    per-hospital stratified 75/25 split (fixed seed); standardisation fitted on
    training rows only: each hospital's own (``scaling = "site"``) or all
    hospitals' pooled (``"pooled"``)."""
    import pandas as pd

    pat = _read(files["patient"], TABLES["patient"])
    hid = _hospital_ids(pat["hospitalid"], files["patient"])
    pat = pat[hid.notna()].assign(hospitalid=hid[hid.notna()].astype(np.int64))
    pat = pat[pat["unitvisitnumber"] == 1]
    status = pat["hospitaldischargestatus"].astype("string").str.strip().str.lower()
    pat = pat[status.isin(["alive", "expired"])].copy()
    pat["y"] = (status[pat.index] == "expired").astype(np.int64)
    age = pat["age"].astype("string").str.strip().replace({"> 89": "90", ">89": "90"})
    pat["age"] = pd.to_numeric(age, errors="coerce")
    pat["gender=male"] = (pat["gender"].astype("string") == "Male").astype(float)

    res = _read(files["apachePatientResult"], TABLES["apachePatientResult"])
    res["_pref"] = (res["apacheversion"].astype("string") == "IVa").astype(int)
    res = res.sort_values(["patientunitstayid", "_pref"], ascending=[True, False])
    res = res.drop_duplicates("patientunitstayid")[["patientunitstayid", *RESULT_VARS]]
    aps = _read(files["apacheApsVar"], TABLES["apacheApsVar"]).drop_duplicates("patientunitstayid")

    df = pat.merge(res, on="patientunitstayid", how="left").merge(aps, on="patientunitstayid",
                                                                  how="left")
    for c in [*RESULT_VARS, *APS_VARS]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
        df.loc[df[c] < 0, c] = np.nan  # eICU codes a missing APACHE value as -1
    df["apache_missing"] = df["apachescore"].isna().astype(float)
    counts = df["hospitalid"].value_counts()
    hospitals = sorted(int(h) for h in counts[counts >= min_stays].index)
    if not hospitals:
        raise DataError(f"eicu: no hospital has min_stays={min_stays} first ICU stays with a "
                        f"discharge status (largest has {int(counts.max()) if len(counts) else 0});"
                        f" lower min_stays")
    X_all = df[FEATURES].to_numpy(dtype=np.float64)
    y_all = df["y"].to_numpy()
    hid = df["hospitalid"].to_numpy()
    rng = np.random.default_rng(SPLIT_SEED)
    tr, te, tr_site, te_site = [], [], [], []
    for i, h in enumerate(hospitals):
        rows = np.flatnonzero(hid == h)
        a, b = split_indices(y_all[rows], TEST_FRACTION, rng)
        tr.append(rows[a])
        te.append(rows[b])
        tr_site.append(np.full(len(a), i))
        te_site.append(np.full(len(b), i))
    tr_rows, te_rows = np.concatenate(tr), np.concatenate(te)
    return scaled_arrays(X_all, y_all, tr_rows, te_rows, np.concatenate(tr_site),
                         np.concatenate(te_site), scaling=scaling,
                         site_names=np.array(hospitals))


COMPONENTS = (EICU,)
