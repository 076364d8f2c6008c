"""UCI Heart Disease from four hospitals, with FLamby's Fed-Heart-Disease
split (du Terrail et al., "FLamby: Datasets and Benchmarks for Cross-Silo
Federated Learning in Realistic Healthcare Settings", NeurIPS 2022 Datasets
and Benchmarks; owkin/FLamby ``flamby/datasets/fed_heart_disease/dataset.py``).

Two preprocessings (``preprocessing``), over the same rows and split:

- ``"fedmedbench"`` (the default): 15 features, every one-hot level of ``cp``
  and ``restecg`` kept, the 5 numeric columns standardised with each
  hospital's own training rows' statistics (population s.d.; ``scaling =
  "pooled"`` uses all hospitals' pooled training rows instead, outside the
  federated threat model, and the record says so), binary columns as 0/1;
  logistic regression with two logits. The UCI file repeats one VA Long
  Beach patient (ids 860 and 908, identical rows) and the split puts one
  copy in training and one in test: this preset drops the test copy.
- ``"flamby"``: FLamby's loader since its PR #223. 13 features in FLamby's
  order ``age, sex, trestbps, chol, fbs, thalach, exang, oldpeak, cp_2, cp_3,
  cp_4, restecg_1, restecg_2`` (``pd.get_dummies(drop_first=True)``); **all
  13** z-scored **per hospital** with that hospital's training rows (mean and
  unbiased s.d. in float32, ``(x - μ) / (σ + 1e-9)``), for its training and
  its test rows alike; the pooled party (the ``centralized`` baseline) holds
  the same rows standardised with the statistics of all 486 training rows
  (:attr:`FederatedData.pooled_sites`); FLamby's model, one logit and a
  sigmoid (``logistic-ref``). Its rows are FLamby's, the duplicated patient
  included, so its numbers compare with FLamby's table.

The shipped file and its card live in ``datasets/heart-disease/``.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedmedbench import (
    Dataset,
    FederatedData,
    Site,
    Split,
    Task,
    cached_arrays,
    check_card_files,
    sha256_file,
    shipped_file,
)
from fedmedbench.plugins.datasets._common import POOLED_NOTE, Scaling, read_csv

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
NUMERIC = ["age", "trestbps", "chol", "thalch", "oldpeak"]
BINARY = {"sex": "Male", "fbs": True, "exang": True}
ONEHOT = {
    "cp": ["asymptomatic", "atypical angina", "non-anginal", "typical angina"],
    "restecg": ["lv hypertrophy", "normal", "st-t abnormality"],
}
#: FLamby's 13 features, in the column order of its loader
FLAMBY_FEATURES = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
                   "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2"]
Preprocessing = Literal["fedmedbench", "flamby"]
PREPROCESSINGS: tuple[str, ...] = typing.get_args(Preprocessing)
PREPROCESSING_VERSION = {"fedmedbench": "fedmedbench-2", "flamby": "flamby-pr223-1"}
SPLIT_SEED = 43


class HeartDisease(Dataset):
    """UCI Heart Disease: 740 patients from 4 real hospitals (FLamby split).

    Parameters
    ----------
    preprocessing : {"fedmedbench", "flamby"}, default "fedmedbench"
        ``"flamby"`` is FLamby's Fed-Heart-Disease preprocessing (13 features
        standardised per hospital, pooled statistics for the pooled party)
        with FLamby's one-logit model, rows exactly FLamby's (the duplicated
        VA Long Beach patient kept, for comparability); ``"fedmedbench"``
        keeps every one-hot level, standardises the numeric columns with each
        hospital's own training statistics (``scaling``) and drops the test
        copy of the duplicated patient (module docstring).
    scaling : {"site", "pooled"}, default "site"
        (``preprocessing = "fedmedbench"``) Each hospital's own training
        statistics, or all hospitals' pooled ones: outside the federated
        threat model, and the record says so.
    """

    name = "heart-disease"
    card = "heart-disease"
    run_defaults = {"batch_size": 16, "lr": 0.05, "local_steps": 10, "clients_per_round": 4}

    def __init__(self, *, preprocessing: Preprocessing = "fedmedbench",
                 scaling: Scaling = "site") -> None:
        if preprocessing == "flamby" and scaling != "site":
            raise ValueError("heart-disease: scaling applies to preprocessing = 'fedmedbench'; "
                             "FLamby's preprocessing standardises each hospital with its own "
                             "statistics")
        self.preprocessing = preprocessing
        self.scaling = scaling

    def outside_threat_model(self) -> list[str]:
        return [POOLED_NOTE] if self.scaling == "pooled" else []

    def check_files(self) -> None:
        """Every file on the card is present and matches its sha256."""
        check_card_files(self.card)

    def load(self, *, seed: int) -> FederatedData:
        # FLamby's split is fixed (random_state=43) whatever the run seed.
        path = shipped_file(self.card, "heart_disease_uci.csv")
        if self.preprocessing == "fedmedbench":
            def build(df: Any) -> dict[str, np.ndarray]:
                return _preprocess(df, scaling=self.scaling)
        else:
            build = _preprocess_flamby
        arrays = cached_arrays([self.name, sha256_file(path),
                                PREPROCESSING_VERSION[self.preprocessing], self.scaling],
                               lambda: build(read_csv(path)))

        def sites_of(X: str, X_test: str) -> list[Site]:
            out = []
            for i, name in enumerate(SITES):
                tr, te = arrays["site"] == i, arrays["site_test"] == i
                out.append(Site(name, Split(arrays[X][tr], arrays["y"][tr]),
                                Split(arrays[X_test][te], arrays["y_test"][te])))
            return out

        features = [str(f) for f in arrays["features"]]
        flamby = self.preprocessing == "flamby"
        task = Task(kind="binary", num_classes=2, input_shape=(len(features),),
                    metric="accuracy", model="logistic-ref" if flamby else "logistic",
                    feature_names=features)
        return FederatedData(task=task, sites=sites_of("X", "X_test"), natural=True,
                             pooled_sites=sites_of("X_pooled", "X_test_pooled") if flamby
                             else None)

    def describe(self) -> dict:
        return {"sizes": {s.name: {"train": len(s.train), "test": len(s.test)}
                          for s in self.load(seed=0).sites},
                "option": f"preprocessing = {self.preprocessing!r} (see the card)"}


def features_of(df: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    out = pd.DataFrame(index=df.index)
    for c in NUMERIC:
        out[c] = df[c].astype(float)
    for c, pos in BINARY.items():
        out[c] = (df[c] == pos).astype(float)
    for c, levels in ONEHOT.items():
        for lv in levels:
            out[f"{c}={lv}"] = (df[c] == lv).astype(float)
    return out


def split_sites(df: pd.DataFrame) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """FLamby's cleaning and per-hospital 66/34 split (rows, before scaling)."""
    from sklearn.model_selection import train_test_split

    df = df.copy()
    df.loc[df["id"] == 304, "dataset"] = "Hungary"  # known defect of this mirror
    df = df.drop(columns=["slope", "ca", "thal"]).dropna()
    df["target"] = (df["num"] > 0).astype(int)
    out = []
    for name in SITES:
        g = df[df["dataset"] == name]
        strat = g["target"] if g["target"].value_counts().min() >= 2 else None
        tr, te = train_test_split(g, test_size=0.34, stratify=strat, random_state=SPLIT_SEED)
        out.append((tr, te))
    return out


def drop_test_duplicates(parts: list[tuple[pd.DataFrame, pd.DataFrame]]
                         ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Drop each test row identical (every column but ``id``) to a training
    row of its hospital: the UCI file repeats one VA Long Beach patient (ids
    860 and 908), and FLamby's split puts one copy in training and one in
    test, so the test set would score a patient the model was trained on."""
    out = []
    for tr, te in parts:
        cols = [c for c in tr.columns if c != "id"]
        seen = set(map(tuple, tr[cols].astype(str).to_numpy()))
        keep = [tuple(r) not in seen for r in te[cols].astype(str).to_numpy()]
        out.append((tr, te[keep]))
    return out


def _preprocess(df: pd.DataFrame, *, scaling: str = "site") -> dict[str, np.ndarray]:
    import pandas as pd

    parts = drop_test_duplicates(split_sites(df))
    train = pd.concat([features_of(tr) for tr, _ in parts])

    def stats(f: pd.DataFrame) -> tuple[Any, Any]:
        return f[NUMERIC].mean(), f[NUMERIC].std(ddof=0).replace(0, 1)

    pooled = stats(train)

    def scale(f: pd.DataFrame, ref: pd.DataFrame) -> np.ndarray:
        mean, std = pooled if scaling == "pooled" else stats(ref)  # training statistics only
        f = f.copy()
        f[NUMERIC] = (f[NUMERIC] - mean) / std
        return f.to_numpy(dtype=np.float32)

    X = np.concatenate([scale(features_of(tr), features_of(tr)) for tr, _ in parts])
    X_test = np.concatenate([scale(features_of(te), features_of(tr)) for tr, te in parts])
    return {
        "X": X, "y": np.concatenate([tr["target"].to_numpy() for tr, _ in parts]).astype(np.int64),
        "site": np.concatenate([np.full(len(tr), i) for i, (tr, _) in enumerate(parts)]),
        "X_test": X_test,
        "y_test": np.concatenate([te["target"].to_numpy() for _, te in parts]).astype(np.int64),
        "site_test": np.concatenate([np.full(len(te), i) for i, (_, te) in enumerate(parts)]),
        "features": np.array(list(train.columns)),
    }


def flamby_sites(df: pd.DataFrame) -> list[tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
    """FLamby's rows and split, exactly: each hospital's rows in the original
    file order (the mirror's ``id`` order), ``slope, ca, thal`` dropped
    before ``dropna``, then ``train_test_split(arange(n), test_size=1 - 0.66,
    train_size=0.66, random_state=43, stratify=label if each class has more
    than 2 rows)``. Returns (rows, sorted train positions, sorted test
    positions) per hospital."""
    from sklearn.model_selection import train_test_split

    df = df.copy()
    df.loc[df["id"] == 304, "dataset"] = "Hungary"  # known defect of this mirror
    df = df.sort_values("id", kind="stable")
    df = df.drop(columns=["slope", "ca", "thal"]).dropna()
    df["target"] = (df["num"] > 0).astype(int)
    out = []
    for name in SITES:
        g = df[df["dataset"] == name].reset_index(drop=True)
        lab = g["target"]
        counts = lab.value_counts()
        strat = lab if len(counts) > 1 and (counts > 2).all() else None
        tr, te = train_test_split(np.arange(len(g)), test_size=1.0 - 0.66, train_size=0.66,
                                  random_state=SPLIT_SEED, shuffle=True, stratify=strat)
        out.append((g, np.sort(tr), np.sort(te)))
    return out


def flamby_features(g: pd.DataFrame) -> np.ndarray:
    """FLamby's 13 unscaled features of rows ``g`` (float32, FLAMBY_FEATURES order)."""
    cp = g["cp"].map({"typical angina": 1, "atypical angina": 2, "non-anginal": 3,
                      "asymptomatic": 4})
    ecg = g["restecg"].map({"normal": 0, "st-t abnormality": 1, "lv hypertrophy": 2})
    cols = [g["age"], g["sex"] == "Male", g["trestbps"], g["chol"], g["fbs"] == True,  # noqa: E712
            g["thalch"], g["exang"] == True, g["oldpeak"],  # noqa: E712
            cp == 2, cp == 3, cp == 4, ecg == 1, ecg == 2]
    return np.column_stack([np.asarray(c, dtype=np.float64) for c in cols]).astype(np.float32)


def _zscore(X: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """FLamby's normalisation in float32 torch arithmetic: ``(x - mean) / (std +
    1e-9)`` with the mean and unbiased s.d. of ``ref``."""
    import torch

    r = torch.as_tensor(ref)
    mean, std = r.mean(0), r.std(0)
    return ((torch.as_tensor(X) - mean) / (std + 1e-9)).numpy().astype(np.float32)


def _preprocess_flamby(df: pd.DataFrame) -> dict[str, np.ndarray]:
    parts = flamby_sites(df)
    F = [flamby_features(g) for g, _, _ in parts]
    pooled_ref = np.concatenate([f[tr] for f, (_, tr, _) in zip(F, parts)])
    X, X_test, Xp, Xp_test, y, y_test = [], [], [], [], [], []
    for f, (g, tr, te) in zip(F, parts):
        X.append(_zscore(f[tr], f[tr]))          # each hospital: its own training statistics
        X_test.append(_zscore(f[te], f[tr]))
        Xp.append(_zscore(f[tr], pooled_ref))    # the pooled party: all training rows' statistics
        Xp_test.append(_zscore(f[te], pooled_ref))
        lab = g["target"].to_numpy().astype(np.int64)
        y.append(lab[tr])
        y_test.append(lab[te])
    return {
        "X": np.concatenate(X), "X_test": np.concatenate(X_test),
        "X_pooled": np.concatenate(Xp), "X_test_pooled": np.concatenate(Xp_test),
        "y": np.concatenate(y), "y_test": np.concatenate(y_test),
        "site": np.concatenate([np.full(len(tr), i) for i, (_, tr, _) in enumerate(parts)]),
        "site_test": np.concatenate([np.full(len(te), i) for i, (_, _, te) in enumerate(parts)]),
        "features": np.array(FLAMBY_FEATURES),
    }


COMPONENTS = (HeartDisease,)
