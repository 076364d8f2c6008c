"""A generator of ICU-like tabular data from many hospitals.

Patients have a latent acuity; vitals and labs follow it (the physiology
behind APACHE-style scores, Knaus et al. 1991, "The APACHE III prognostic
system", Chest 100:1619-1636), and in-hospital death follows a known logistic
model of the *true* values (age, acuity-driven lactate, GCS, MAP,
creatinine, ...). Hospitals differ in

- size (log-normal, ``size_skew``),
- case mix (their acuity and age distributions, ``case_mix``), hence in
  mortality, and
- measurement (per-hospital lab calibration bias and extra noise, vital-sign
  offsets, ``measurement_shift``; and missingness, ``missing_rate``),

so the label model is the same everywhere but what each hospital records is
not: covariate, prior and measurement shift, as between real ICUs (eICU-CRD
spans 208 hospitals). Everything is vectorised over patients, so hundreds of
hospitals and 10^5-10^6 patients take seconds.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from fedmedbench import Dataset, FederatedData, Range, Seed, Site, Split, Task
from fedmedbench.plugins.datasets._common import apply_scaler, fit_scaler, split_indices

VITALS = ["heart_rate", "mean_bp", "resp_rate", "temperature", "spo2", "gcs"]
LABS = ["lactate", "creatinine", "wbc", "bilirubin", "platelets", "sodium"]
FEATURES = ["age", "sex_male", "emergency", *VITALS, *LABS, *(f"{lab}_missing" for lab in LABS)]
#: the label model on true values, standardised: known, so tests can check it
TRUE_COEF = {"age": 0.6, "emergency": 0.4, "heart_rate": 0.3, "mean_bp": -0.5,
             "resp_rate": 0.3, "gcs": -0.8, "lactate": 0.9, "creatinine": 0.5,
             "bilirubin": 0.3, "platelets": -0.3}


class SyntheticEHR(Dataset):
    """Synthetic ICU mortality with many hospitals and per-hospital shifts.

    Parameters
    ----------
    n_hospitals : int, default 20
    n_patients : int, default 8000
        Total ICU stays over all hospitals.
    size_skew : float, default 0.6
        s.d. of log hospital size (0: equal sizes).
    case_mix : float, default 1.0
        Strength of per-hospital differences in acuity, age and admission type.
    measurement_shift : float, default 1.0
        Strength of per-hospital lab calibration bias, noise and vital offsets.
    missing_rate : float, default 0.1
        Mean fraction of missing lab values (varies by hospital).
    min_stays : int, default 20
        Each hospital has at least this many stays.
    test_fraction : float, default 0.25
    data_seed : int, default 0
        Seed of the generated population (the run seed does not change the data).
    """

    name = "synthetic-ehr"
    run_defaults = {"batch_size": 64, "lr": 0.1, "local_steps": 10, "clients_per_round": 0.5,
                    "eval_every": 5}

    def __init__(self, *, n_hospitals: Annotated[int, Range(ge=1, le=1000)] = 20,
                 n_patients: Annotated[int, Range(ge=4, le=1_000_000)] = 8000,
                 size_skew: Annotated[float, Range(ge=0)] = 0.6,
                 case_mix: Annotated[float, Range(ge=0)] = 1.0,
                 measurement_shift: Annotated[float, Range(ge=0)] = 1.0,
                 missing_rate: Annotated[float, Range(ge=0, lt=0.9)] = 0.1,
                 min_stays: Annotated[int, Range(ge=4)] = 20,
                 test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.25,
                 data_seed: Seed = 0) -> None:
        if not isinstance(n_hospitals, int) or n_hospitals < 1:
            raise ValueError(f"n_hospitals must be an integer >= 1, got {n_hospitals!r}")
        if not isinstance(min_stays, int) or min_stays < 4:
            raise ValueError(f"min_stays must be an integer >= 4, got {min_stays!r}")
        if not isinstance(n_patients, int) or n_patients < n_hospitals * min_stays:
            raise ValueError(f"n_patients must be an integer >= n_hospitals * min_stays "
                             f"= {n_hospitals * min_stays}, got {n_patients!r}")
        for k, v in (("size_skew", size_skew), ("case_mix", case_mix),
                     ("measurement_shift", measurement_shift)):
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{k} must be a number >= 0, got {v!r}")
        if not 0 <= missing_rate < 0.9:
            raise ValueError(f"missing_rate must be in [0, 0.9), got {missing_rate!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.n_hospitals, self.n_patients, self.size_skew = n_hospitals, n_patients, size_skew
        self.case_mix, self.measurement_shift = case_mix, measurement_shift
        self.missing_rate, self.min_stays = missing_rate, min_stays
        self.test_fraction, self.data_seed = test_fraction, data_seed

    def generate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Raw (recorded) features with NaN for missing, labels, hospital of each
        stay, and the per-hospital missing rate."""
        rng = np.random.default_rng([self.data_seed, 31])
        H, N, cm, ms = self.n_hospitals, self.n_patients, self.case_mix, self.measurement_shift
        w = rng.lognormal(0, self.size_skew, H) if self.size_skew > 0 else np.ones(H)
        size = rng.multinomial(N - H * self.min_stays, w / w.sum()) + self.min_stays
        hosp = np.repeat(np.arange(H), size)
        # case mix
        acu_mu, age_mu = rng.normal(0, 0.5 * cm, H), rng.normal(0, 5 * cm, H)
        emerg_p = 1 / (1 + np.exp(-(0.8 + rng.normal(0, 0.8 * cm, H))))
        acuity = rng.normal(acu_mu[hosp], 1.0)
        age = np.clip(rng.normal(64 + age_mu[hosp], 15), 18, 95)
        sex = (rng.random(N) < 0.56).astype(float)
        emergency = (rng.random(N) < emerg_p[hosp]).astype(float)
        a = acuity + 0.3 * emergency
        true = {
            "heart_rate": 86 + 9 * a + rng.normal(0, 12, N),
            "mean_bp": 80 - 7 * a + rng.normal(0, 10, N),
            "resp_rate": 19 + 3 * a + rng.normal(0, 4, N),
            "temperature": 37 + 0.3 * a + rng.normal(0, 0.6, N),
            "spo2": np.clip(96 - 1.5 * a + rng.normal(0, 2, N), 60, 100),
            "gcs": np.clip(np.round(13.5 - 1.6 * a + rng.normal(0, 1.5, N)), 3, 15),
            "lactate": np.exp(0.4 + 0.35 * a + rng.normal(0, 0.3, N)),
            "creatinine": np.exp(0.1 + 0.3 * a + rng.normal(0, 0.4, N)),
            "wbc": np.exp(2.2 + 0.2 * a + rng.normal(0, 0.35, N)),
            "bilirubin": np.exp(-0.3 + 0.3 * a + rng.normal(0, 0.6, N)),
            "platelets": np.clip(220 - 30 * a + rng.normal(0, 60, N), 5, None),
            "sodium": 139 + rng.normal(0, 4, N),
        }
        # the label: a known logistic model of the true, standardised values
        z = {"age": (age - 64) / 15, "emergency": emergency}
        z.update({k: (v - v.mean()) / v.std() for k, v in true.items()})
        logit = -3.0 + sum(c * z[k] for k, c in TRUE_COEF.items())
        y = (rng.random(N) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        # what each hospital records: calibration bias, extra noise, offsets, missingness
        rec = {}
        for k, v in true.items():
            sd = v.std()
            if k in LABS:
                gain = np.exp(rng.normal(0, 0.1 * ms, H))[hosp]
                off = rng.normal(0, 0.2 * ms * sd, H)[hosp]
                noise = np.abs(rng.normal(0, 0.2 * ms, H))[hosp] * sd
                rec[k] = v * gain + off + rng.normal(0, 1, N) * noise
            else:
                rec[k] = v + rng.normal(0, 0.15 * ms * sd, H)[hosp]
        miss_rate = np.clip(rng.beta(2, 2 / max(self.missing_rate, 1e-6) - 2, H), 0, 0.8) \
            if self.missing_rate > 0 else np.zeros(H)
        cols = [age, sex, emergency, *(rec[k] for k in VITALS)]
        labs = []
        for k in LABS:
            v = rec[k].copy()
            v[rng.random(N) < miss_rate[hosp]] = np.nan
            labs.append(v)
        flags = [np.isnan(v).astype(float) for v in labs]
        X = np.stack([*cols, *labs, *flags], axis=1)
        return X, y, hosp, miss_rate

    def load(self, *, seed: int) -> FederatedData:
        X, y, hosp, miss_rate = self.generate()
        rng = np.random.default_rng([self.data_seed, 32])
        order = np.argsort(hosp, kind="stable")
        starts = np.searchsorted(hosp[order], np.arange(self.n_hospitals + 1))
        tr_idx, te_idx = [], []
        for h in range(self.n_hospitals):
            rows = order[starts[h]:starts[h + 1]]
            a, b = split_indices(y[rows], self.test_fraction, rng)
            tr_idx.append(rows[a]), te_idx.append(rows[b])
        mean, std = fit_scaler(X[np.concatenate(tr_idx)])  # pooled training rows only
        width = len(str(self.n_hospitals - 1))
        sites = [Site(f"hospital{h:0{width}d}",
                      Split(apply_scaler(X[a], mean, std), y[a]),
                      Split(apply_scaler(X[b], mean, std), y[b]),
                      quality=float(1 - miss_rate[h]))
                 for h, (a, b) in enumerate(zip(tr_idx, te_idx))]
        task = Task(kind="binary", num_classes=2, input_shape=(X.shape[1],), metric="auroc",
                    model="logistic", feature_names=list(FEATURES))
        return FederatedData(task=task, sites=sites, natural=True)

    def describe(self) -> dict:
        data = self.load(seed=0)
        ns = [len(s.train) + len(s.test) for s in data.sites]
        prev = float(np.mean(np.concatenate([s.train.y for s in data.sites])))
        return {"title": "synthetic ICU EHR generator (many hospitals)",
                "task": "binary classification: in-hospital death from vitals, labs, demographics",
                "metric": "auroc", "licence": "generated (no real patients)",
                "partition": "natural: generated hospitals with case-mix and measurement shift",
                "sites": f"{len(ns)} hospitals, {sum(ns)} stays (smallest {min(ns)}, largest "
                         f"{max(ns)}), mortality {prev:.1%}"}


COMPONENTS = (SyntheticEHR,)
