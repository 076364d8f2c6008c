"""SUPPORT2: in-hospital death of seriously ill hospitalised adults (Knaus et
al. 1995, "The SUPPORT prognostic model: objective estimates of survival for
seriously ill hospitalized adults", Annals of Internal Medicine 122:191-203).

SUPPORT2 has no hospital column, so the sites are pseudo-sites: the disease
class ``dzclass`` (4 sites) or the finer disease group ``dzgroup`` (8 sites).
Case mix then differs strongly between sites (in-hospital mortality ranges
from 9% in Cancer to 61% in Coma): a realistic kind of non-IID data, but not
hospitals. The shipped file and its card live in ``datasets/support2/``.

The primary task is in-hospital death (``hospdead``). ``target="long-stay"``
predicts instead a length of stay (``slos``, days from study entry to
discharge or death) above ``long_stay_days`` — a prolonged-stay task, since a
record's label must be a class. Predictors are the same baseline and day-3
values in both tasks.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np

from fedmedbench import (
    Dataset,
    FederatedData,
    Range,
    Task,
    cached_arrays,
    check_card_files,
    sha256_file,
    shipped_file,
)
from fedmedbench.plugins.datasets._common import (
    POOLED_NOTE,
    Scaling,
    read_csv,
    scaled_arrays,
    sites_from_arrays,
    sizes,
    split_indices,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

FILE = "support2.csv.gz"
PREPROCESSING_VERSION = "support2-3"
Target = Literal["hospdead", "long-stay"]
TARGETS: tuple[str, ...] = typing.get_args(Target)
SPLIT_SEED = 2024  # the train/test split is fixed, whatever the run seed
TEST_FRACTION = 0.3
SiteColumn = Literal["dzclass", "dzgroup"]
SITE_COLUMNS: tuple[str, ...] = typing.get_args(SiteColumn)
#: baseline and day-3 predictors; outcome-derived columns (death, slos, d.time,
#: hday, charges, costs, avtisst, surv*/prg*, dnr*, sfdm2, adl*) are excluded
NUMERIC = ["age", "num.co", "edu", "scoma", "sps", "aps", "meanbp", "wblc", "hrt", "resp",
           "temp", "pafi", "alb", "bili", "crea", "sod", "ph", "glucose", "bun", "urine",
           "diabetes", "dementia"]
MISSING_FLAGS = ["edu", "wblc", "pafi", "alb", "bili", "crea", "ph", "glucose", "bun", "urine"]
ONEHOT = {
    "race": ["white", "black", "asian", "hispanic", "other"],
    "ca": ["no", "yes", "metastatic"],
    "dzgroup": ["ARF/MOSF w/Sepsis", "CHF", "COPD", "Lung Cancer", "MOSF w/Malig", "Coma",
                "Colon Cancer", "Cirrhosis"],
}


class Support2(Dataset):
    """SUPPORT2 in-hospital mortality, 9,105 patients, disease-class pseudo-sites.

    Parameters
    ----------
    site_column : {"dzclass", "dzgroup"}, default "dzclass"
        Which diagnosis column defines the pseudo-sites (4 or 8 sites).
    target : {"hospdead", "long-stay"}, default "hospdead"
        In-hospital death, or a length of stay above ``long_stay_days``.
    long_stay_days : int, default 14
        Threshold of the ``long-stay`` task (days of ``slos``).
    scaling : {"site", "pooled"}, default "site"
        Standardise each pseudo-site with its own training statistics (the
        default), or all pseudo-sites with the pooled training rows'
        statistics: outside the federated threat model, and the record says so.
    """

    name = "support2"
    card = "support2"
    run_defaults = {"batch_size": 64, "lr": 0.1, "local_steps": 20}

    def __init__(self, *, site_column: SiteColumn = "dzclass", target: Target = "hospdead",
                 long_stay_days: Annotated[int, Range(ge=1)] = 14,
                 scaling: Scaling = "site") -> None:
        self.site_column = site_column
        self.target = target
        self.long_stay_days = long_stay_days
        self.scaling = scaling

    def check_files(self) -> None:
        """Every file on the card is present and matches its sha256."""
        check_card_files(self.card)

    def load(self, *, seed: int) -> FederatedData:
        path = shipped_file(self.card, FILE)
        arrays = cached_arrays(
            [self.name, sha256_file(path), PREPROCESSING_VERSION, self.site_column, self.target,
             str(self.long_stay_days), self.scaling],
            lambda: preprocess(read_csv(path, skipinitialspace=True), self.site_column,
                               self.target, self.long_stay_days, scaling=self.scaling))
        names = [str(s) for s in arrays["site_names"]]
        features = [str(f) for f in arrays["features"]]
        task = Task(kind="binary", num_classes=2, input_shape=(len(features),), metric="auroc",
                    model="logistic", feature_names=features)
        return FederatedData(task=task, sites=sites_from_arrays(arrays, names), natural=False)

    def describe(self) -> dict:
        return {"sites": sizes(self.load(seed=0).sites)}

    def outside_threat_model(self) -> list[str]:
        return [POOLED_NOTE] if self.scaling == "pooled" else []


def features_of(df: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    out = pd.DataFrame(index=df.index)
    for c in NUMERIC:
        out[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in MISSING_FLAGS:
        out[f"{c}_missing"] = df[c].isna().astype(float)
    out["sex=male"] = (df["sex"] == "male").astype(float)
    for c, levels in ONEHOT.items():
        for lv in levels:
            out[f"{c}={lv}"] = (df[c] == lv).astype(float)
    return out


def preprocess(df: pd.DataFrame, site_column: str, target: str = "hospdead",
               long_stay_days: int = 14, *, scaling: str = "site") -> dict[str, np.ndarray]:
    """Fixed per-site stratified 70/30 split, then standardisation with
    training rows only — each site's own by default, all sites' pooled with
    ``scaling = "pooled"`` (a missing value becomes the training mean)."""
    import pandas as pd

    label = "hospdead" if target == "hospdead" else "slos"
    missing = [c for c in [*NUMERIC, label, "sex", site_column, *ONEHOT] if c not in df]
    if missing:
        raise ValueError(f"support2 file lacks columns {missing}")
    df = df[df[label].notna()].reset_index(drop=True)
    names = sorted(df[site_column].dropna().unique())
    feats = features_of(df)
    X_all = feats.to_numpy(dtype=np.float64)
    if target == "hospdead":
        y_all = df["hospdead"].to_numpy().astype(np.int64)
    else:
        y_all = (pd.to_numeric(df["slos"]) > long_stay_days).to_numpy().astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    tr_rows, te_rows, tr_site, te_site = [], [], [], []
    for i, name in enumerate(names):
        rows = np.flatnonzero((df[site_column] == name).to_numpy())
        a, b = split_indices(y_all[rows], TEST_FRACTION, rng)
        tr_rows.append(rows[a])
        te_rows.append(rows[b])
        tr_site.append(np.full(len(a), i))
        te_site.append(np.full(len(b), i))
    tr, te = np.concatenate(tr_rows), np.concatenate(te_rows)
    return scaled_arrays(X_all, y_all, tr, te, np.concatenate(tr_site), np.concatenate(te_site),
                         scaling=scaling, features=np.array(list(feats.columns)),
                         site_names=np.array(names))


COMPONENTS = (Support2,)
