"""UCI Heart Disease from four hospitals, with FLamby's Fed-Heart-Disease
preprocessing and split (du Terrail et al., "FLamby: Datasets and Benchmarks
for Cross-Silo Federated Learning in Realistic Healthcare Settings", NeurIPS
2022 Datasets and Benchmarks).

The shipped file and its card live in ``datasets/heart-disease/``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fedmedbench import (
    Dataset,
    FederatedData,
    Site,
    Split,
    Task,
    cached_arrays,
    check_card_files,
    shipped_file,
)
from fedmedbench.datafiles import sha256_file

SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
NUMERIC = ["age", "trestbps", "chol", "thalch", "oldpeak"]
BINARY = {"sex": "Male", "fbs": True, "exang": True}
ONEHOT = {
    "cp": ["asymptomatic", "atypical angina", "non-anginal", "typical angina"],
    "restecg": ["lv hypertrophy", "normal", "st-t abnormality"],
}
PREPROCESSING_VERSION = "flamby-1"
SPLIT_SEED = 43


class HeartDisease(Dataset):
    """UCI Heart Disease: 740 patients from 4 real hospitals (FLamby split)."""

    name = "heart-disease"
    card = "heart-disease"
    run_defaults = {"batch_size": 16, "lr": 0.05, "local_steps": 10, "clients_per_round": 4}

    def __init__(self) -> None:
        pass

    def check_files(self) -> None:
        """Every file on the card is present and matches its sha256."""
        check_card_files(self.card)

    def load(self, *, seed: int) -> FederatedData:
        # FLamby's split is fixed (random_state=43) whatever the run seed.
        path = shipped_file(self.card, "heart_disease_uci.csv")
        arrays = cached_arrays([self.name, sha256_file(path), PREPROCESSING_VERSION],
                               lambda: _preprocess(pd.read_csv(path)))
        sites = []
        for i, name in enumerate(SITES):
            tr, te = arrays["site"] == i, arrays["site_test"] == i
            sites.append(Site(name, Split(arrays["X"][tr], arrays["y"][tr]),
                              Split(arrays["X_test"][te], arrays["y_test"][te])))
        features = [str(f) for f in arrays["features"]]
        task = Task(kind="binary", num_classes=2, input_shape=(len(features),),
                    metric="accuracy", model="logistic", feature_names=features)
        return FederatedData(task=task, sites=sites, natural=True)

    def describe(self) -> dict:
        return {"sizes": {s.name: {"train": len(s.train), "test": len(s.test)}
                          for s in self.load(seed=0).sites}}


def features_of(df: pd.DataFrame) -> pd.DataFrame:
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


def _preprocess(df: pd.DataFrame) -> dict[str, np.ndarray]:
    parts = split_sites(df)
    train = pd.concat([features_of(tr) for tr, _ in parts])
    mean, std = train[NUMERIC].mean(), train[NUMERIC].std(ddof=0).replace(0, 1)

    def scale(f: pd.DataFrame) -> np.ndarray:
        f = f.copy()
        f[NUMERIC] = (f[NUMERIC] - mean) / std  # training statistics only
        return f.to_numpy(dtype=np.float32)

    X = np.concatenate([scale(features_of(tr)) for tr, _ in parts])
    X_test = np.concatenate([scale(features_of(te)) for _, te in parts])
    return {
        "X": X, "y": np.concatenate([tr["target"].to_numpy() for tr, _ in parts]).astype(np.int64),
        "site": np.concatenate([np.full(len(tr), i) for i, (tr, _) in enumerate(parts)]),
        "X_test": X_test,
        "y_test": np.concatenate([te["target"].to_numpy() for _, te in parts]).astype(np.int64),
        "site_test": np.concatenate([np.full(len(te), i) for i, (_, te) in enumerate(parts)]),
        "features": np.array(list(train.columns)),
    }


COMPONENTS = (HeartDisease,)
