"""Two real gene-expression datasets.

- ``bladderbatch``: 57 bladder samples on Affymetrix HG-U133A, processed in 5
  batches (Dyrskjøt et al. 2004, "Gene expression in the urinary bladder: a
  common carcinoma in situ gene expression signature exists disregarding
  histopathological classification", Cancer Research 64:4040-4048; the batch
  annotation of Leek et al. 2010, "Tackling the widespread and critical impact
  of batch effects in high-throughput data", Nat Rev Genet 11:733-739). The
  batches are the sites and the label (cancer vs not) is confounded with them:
  batch 1 is all cancer, batches 3 and 4 have none.
- ``gse7390``: 198 node-negative breast-cancer patients of the TRANSBIG
  validation series (Desmedt et al. 2007, "Strong time dependence of the
  76-gene prognostic signature for node-negative breast cancer patients in
  the TRANSBIG multicenter independent validation series", Clin Cancer Res
  13:3207-3214): 76 probes plus age, size, grade and ER; distant metastasis.

Variance filtering and standardisation are fitted on training rows only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

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

TEST_FRACTION = 0.3


class BladderBatch(Dataset):
    """bladderbatch: 5 processing batches as sites, cancer vs non-cancer.

    Parameters
    ----------
    n_genes : int, default 1000
        Keep the ``n_genes`` probes with the largest variance over the pooled
        training rows (0 keeps all 22,283).
    scaling : {"site", "pooled"}, default "site"
        Standardise each batch with its own training statistics (the default),
        or all batches with the pooled training rows' statistics: outside the
        federated threat model, and the record says so.
    """

    name = "bladderbatch"
    card = "bladderbatch"
    FILE = "bladderbatch_expression.csv.gz"
    PREPROCESSING_VERSION = "bladderbatch-2"
    SPLIT_SEED = 7
    run_defaults = {"batch_size": 8, "lr": 0.05, "local_steps": 5}

    def __init__(self, *, n_genes: Annotated[int, Range(ge=0)] = 1000,
                 scaling: Scaling = "site") -> None:
        self.n_genes = n_genes
        self.scaling = scaling

    def outside_threat_model(self) -> list[str]:
        out = [POOLED_NOTE] if self.scaling == "pooled" else []
        if self.n_genes:
            out.append(f"preprocessing: the {self.n_genes} genes kept are those of largest "
                       f"variance over every batch's pooled training rows, chosen outside the "
                       f"federation (it reveals which probes vary most across all sites)")
        return out

    def check_files(self) -> None:
        """Every file on the card is present and matches its sha256."""
        check_card_files(self.card)

    def load(self, *, seed: int) -> FederatedData:
        path = shipped_file(self.card, self.FILE)
        arrays = cached_arrays(
            [self.name, sha256_file(path), self.PREPROCESSING_VERSION, str(self.n_genes),
             self.scaling],
            lambda: self.preprocess(read_csv(path)))
        names = [str(s) for s in arrays["site_names"]]
        task = Task(kind="binary", num_classes=2, input_shape=(arrays["X"].shape[1],),
                    metric="balanced_accuracy", model="logistic",
                    feature_names=[str(f) for f in arrays["features"]])
        return FederatedData(task=task, sites=sites_from_arrays(arrays, names), natural=True)

    def preprocess(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        missing = [c for c in ("batch", "cancer") if c not in df]
        if missing:
            raise ValueError(f"bladderbatch file lacks columns {missing}")
        genes = [c for c in df.columns if c not in ("sample", "batch", "cancer", "outcome")]
        X_all = df[genes].to_numpy(dtype=np.float64)
        y_all = (df["cancer"] == "Cancer").to_numpy().astype(np.int64)
        batches = sorted(df["batch"].unique())
        rng = np.random.default_rng(self.SPLIT_SEED)
        tr, te, tr_site, te_site = [], [], [], []
        for i, b in enumerate(batches):
            rows = np.flatnonzero((df["batch"] == b).to_numpy())
            a, c = split_indices(y_all[rows], TEST_FRACTION, rng)
            tr.append(rows[a])
            te.append(rows[c])
            tr_site.append(np.full(len(a), i))
            te_site.append(np.full(len(c), i))
        tr_rows, te_rows = np.concatenate(tr), np.concatenate(te)
        keep = np.arange(len(genes))
        if self.n_genes and self.n_genes < len(genes):  # variance filter: training rows only
            var = X_all[tr_rows].var(axis=0)
            keep = np.sort(np.argsort(-var, kind="stable")[:self.n_genes])
        X_all = X_all[:, keep]
        return scaled_arrays(X_all, y_all, tr_rows, te_rows, np.concatenate(tr_site),
                             np.concatenate(te_site), scaling=self.scaling,
                             features=np.array(genes)[keep],
                             site_names=np.array([f"batch{b}" for b in batches]))

    def describe(self) -> dict:
        return {"sites": sizes(self.load(seed=0).sites)}


GRADES = ["well differentiated", "intermediate", "poorly differentiated", "unkown"]


class GSE7390(Dataset):
    """GSE7390 (TRANSBIG): distant metastasis from 76 probes and clinical covariates.

    The file has no centre column, so the data come as one pooled site and the
    default partitioner deals them into 3 IID clients (say another in the
    matrix's ``partitioner`` axis).
    """

    name = "gse7390"
    card = "gse7390"
    FILE = "breast_cancer_GSE7390-metastasis.arff"
    PREPROCESSING_VERSION = "gse7390-1"
    SPLIT_SEED = 11
    default_partitioner = {"name": "iid", "n_clients": 3}
    run_defaults = {"batch_size": 16, "lr": 0.02, "local_steps": 5, "weight_decay": 0.01}

    def __init__(self) -> None:
        pass

    def check_files(self) -> None:
        """Every file on the card is present and matches its sha256."""
        check_card_files(self.card)

    def load(self, *, seed: int) -> FederatedData:
        path = shipped_file(self.card, self.FILE)
        arrays = cached_arrays([self.name, sha256_file(path), self.PREPROCESSING_VERSION],
                               lambda: self.preprocess(path))
        task = Task(kind="binary", num_classes=2, input_shape=(arrays["X"].shape[1],),
                    metric="auroc", model="logistic",
                    feature_names=[str(f) for f in arrays["features"]])
        return FederatedData(task=task, sites=sites_from_arrays(arrays, ["GSE7390"]),
                             natural=False)

    def outside_threat_model(self) -> list[str]:
        return ["preprocessing: one source cohort, standardised with the statistics of all its "
                "training rows before a partitioner splits it into clients; every client's "
                "features carry those shared statistics"]

    def preprocess(self, path) -> dict[str, np.ndarray]:
        import pandas as pd
        from scipy.io import arff

        data, _meta = arff.loadarff(str(path))
        df = pd.DataFrame(data)
        for c in ("grade", "er", "e.tdm"):
            df[c] = df[c].str.decode("utf-8")
        probes = [c for c in df.columns if c.startswith("X")]
        feats = pd.DataFrame({"age": df["age"].astype(float), "size": df["size"].astype(float),
                              "er=positive": (df["er"] == "positive").astype(float)})
        for g in GRADES:
            feats[f"grade={g}"] = (df["grade"] == g).astype(float)
        feats = pd.concat([feats, df[probes].astype(float)], axis=1)  # t.tdm (follow-up) excluded
        X_all = feats.to_numpy(dtype=np.float64)
        y_all = (df["e.tdm"] == "1").to_numpy().astype(np.int64)
        tr, te = split_indices(y_all, TEST_FRACTION, np.random.default_rng(self.SPLIT_SEED))
        return scaled_arrays(X_all, y_all, tr, te, np.zeros(len(tr)), np.zeros(len(te)),
                             features=np.array(list(feats.columns)))

    def describe(self) -> dict:
        return {"sites": sizes(self.load(seed=0).sites)}


COMPONENTS = (BladderBatch, GSE7390,)
