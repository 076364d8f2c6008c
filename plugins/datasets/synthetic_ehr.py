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

Standardisation (``scaling``): each hospital's columns with its own
training rows' statistics (the default: what a hospital computes alone), or
with all hospitals' pooled training rows (``"pooled"``, outside the
federated threat model, and the record says so).

Memory: :meth:`SyntheticEHR.load` never holds the float64 feature matrix. It
generates one column at a time (a column that is needed twice, before and
after the labels are drawn, is generated again from a saved generator state:
the same numbers), standardises it with training rows' statistics and
writes it as float32 into one preallocated matrix whose rows are ordered
hospital by hospital, train then test; every site's splits are views of it.
The peak is about 1.4x the final data. The numbers are those of generating
the whole float64 matrix first (:meth:`SyntheticEHR.generate`) and scaling
it with ``fit_scaler`` / ``apply_scaler`` (per hospital, or once over the
pooled training rows; tests/test_datasets.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np

from fedmedbench import Dataset, FederatedData, Range, Seed, Site, Split, Task
from fedmedbench.plugins.datasets._common import POOLED_NOTE, Scaling, split_indices

VITALS = ["heart_rate", "mean_bp", "resp_rate", "temperature", "spo2", "gcs"]
LABS = ["lactate", "creatinine", "wbc", "bilirubin", "platelets", "sodium"]
FEATURES = ["age", "sex_male", "emergency", *VITALS, *LABS, *(f"{lab}_missing" for lab in LABS)]
#: the label model on true values, standardised: known, so tests can check it
TRUE_COEF = {"age": 0.6, "emergency": 0.4, "heart_rate": 0.3, "mean_bp": -0.5,
             "resp_rate": 0.3, "gcs": -0.8, "lactate": 0.9, "creatinine": 0.5,
             "bilirubin": 0.3, "platelets": -0.3}
#: the true values: (name, s.d. of its N(0, s.d.) draw, value from acuity ``a`` and
#: that draw ``e``), in the order of the generator's draws, each expression
#: evaluated as written (left to right) so every number is reproducible
TRUE = (
    ("heart_rate", 12, lambda a, e: 86 + 9 * a + e),
    ("mean_bp", 10, lambda a, e: 80 - 7 * a + e),
    ("resp_rate", 4, lambda a, e: 19 + 3 * a + e),
    ("temperature", 0.6, lambda a, e: 37 + 0.3 * a + e),
    ("spo2", 2, lambda a, e: np.clip(96 - 1.5 * a + e, 60, 100)),
    ("gcs", 1.5, lambda a, e: np.clip(np.round(13.5 - 1.6 * a + e), 3, 15)),
    ("lactate", 0.3, lambda a, e: np.exp(0.4 + 0.35 * a + e)),
    ("creatinine", 0.4, lambda a, e: np.exp(0.1 + 0.3 * a + e)),
    ("wbc", 0.35, lambda a, e: np.exp(2.2 + 0.2 * a + e)),
    ("bilirubin", 0.6, lambda a, e: np.exp(-0.3 + 0.3 * a + e)),
    ("platelets", 60, lambda a, e: np.clip(220 - 30 * a + e, 5, None)),
    ("sodium", 4, lambda a, e: 139 + e),
)
#: rows per block of element-wise work (keeps temporaries small)
CHUNK = 1 << 16


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
    scaling : {"site", "pooled"}, default "site"
        Standardise each hospital with its own training statistics, or all
        with the pooled training rows' (outside the federated threat model).
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
                 data_seed: Seed = 0, scaling: Scaling = "site") -> None:
        if n_patients < n_hospitals * min_stays:
            raise ValueError(f"n_patients must be >= n_hospitals * min_stays "
                             f"= {n_hospitals * min_stays}, got {n_patients!r}")
        self.n_hospitals, self.n_patients, self.size_skew = n_hospitals, n_patients, size_skew
        self.case_mix, self.measurement_shift = case_mix, measurement_shift
        self.missing_rate, self.min_stays = missing_rate, min_stays
        self.test_fraction, self.data_seed = test_fraction, data_seed
        self.scaling = scaling

    def outside_threat_model(self) -> list[str]:
        return [POOLED_NOTE] if self.scaling == "pooled" else []

    def generate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Raw (recorded) features with NaN for missing, labels, hospital of each
        stay, and the per-hospital missing rate (the whole float64 matrix, which
        :meth:`load` never builds)."""
        pop = self._population()
        X = np.empty((pop.n, len(FEATURES)))
        for j, col in pop.columns():
            X[:, j] = col
        assert pop.y is not None
        return X, pop.y, pop.hosp.astype(np.int64), pop.miss_rate

    def load(self, *, seed: int) -> FederatedData:
        pop = self._population()
        assert pop.y is not None
        H, N = self.n_hospitals, pop.n
        rng = np.random.default_rng([self.data_seed, 32])
        starts = np.concatenate([[0], np.cumsum(pop.size)])  # hospitals are contiguous
        idx = np.int32 if N < 2 ** 31 else np.int64
        perm = np.empty(N, dtype=idx)  # stay of each final row
        is_train = np.zeros(N, dtype=bool)  # of each final row
        n_tr = np.empty(H, dtype=np.int64)
        for h in range(H):  # hospital by hospital: its training rows, then its test rows
            lo, hi = starts[h], starts[h + 1]
            a, b = split_indices(pop.y[lo:hi], self.test_fraction, rng)
            n_tr[h] = len(a)
            perm[lo:lo + len(a)] = lo + a
            perm[lo + len(a):hi] = lo + b
            is_train[lo:lo + len(a)] = True
        y = pop.y[perm]
        pop.y = None
        X = np.empty((N, len(FEATURES)), dtype=np.float32)
        for j, col in pop.columns():
            if self.scaling == "pooled":
                _scale_into(X[:, j], col, perm, is_train)
            else:
                _scale_into_sites(X[:, j], col, perm, starts, n_tr)
            del col  # before the next column is generated
        width = len(str(H - 1))
        sites = []
        for h in range(H):
            a, m, b = starts[h], starts[h] + n_tr[h], starts[h + 1]
            sites.append(Site(f"hospital{h:0{width}d}", Split(X[a:m], y[a:m]),
                              Split(X[m:b], y[m:b]), quality=float(1 - pop.miss_rate[h])))
        task = Task(kind="binary", num_classes=2, input_shape=(X.shape[1],), metric="auroc",
                    model="logistic", feature_names=list(FEATURES))
        return FederatedData(task=task, sites=sites, natural=True)

    def _population(self) -> _Population:
        """Draw everything up to the labels and the per-hospital recording
        parameters, saving the generator's state where
        :meth:`_Population.columns` draws the same numbers again."""
        rng = np.random.default_rng([self.data_seed, 31])
        H, N, cm, ms = self.n_hospitals, self.n_patients, self.case_mix, self.measurement_shift
        w = rng.lognormal(0, self.size_skew, H) if self.size_skew > 0 else np.ones(H)
        size = rng.multinomial(N - H * self.min_stays, w / w.sum()) + self.min_stays
        hosp = np.repeat(np.arange(H, dtype=np.min_scalar_type(-H)), size)
        # case mix
        acu_mu, age_mu = rng.normal(0, 0.5 * cm, H), rng.normal(0, 5 * cm, H)
        emerg_p = 1 / (1 + np.exp(-(0.8 + rng.normal(0, 0.8 * cm, H))))
        acuity_state = rng.bit_generator.state
        acuity = _fill(N, lambda c: rng.normal(acu_mu[hosp[c]], 1.0))
        age_loc = 64 + age_mu
        age = _fill(N, lambda c: np.clip(rng.normal(age_loc[hosp[c]], 15), 18, 95))
        sex = _fill(N, lambda c: rng.random(c.stop - c.start) < 0.56, dtype=bool)
        emergency = _fill(N, lambda c: rng.random(c.stop - c.start) < emerg_p[hosp[c]],
                          dtype=bool)
        pop = _Population(n=N, size=size, hosp=hosp, y=None, miss_rate=np.zeros(H), age=age,
                          sex=sex, emergency=emergency, acu_mu=acu_mu,
                          acuity_state=acuity_state, true_states=[], record=[],
                          missing_state={})
        for c in _chunks(N):  # a = acuity + 0.3 * emergency
            acuity[c] += 0.3 * emergency[c].astype(float)
        # the label: a known logistic model of the true, standardised values
        # (sum(c * z[k] for k in TRUE_COEF), term for term); each true column is
        # drawn, used and dropped: columns() draws it again
        logit = _fill(N, lambda c: 0 + TRUE_COEF["age"] * ((age[c] - 64) / 15))
        for c in _chunks(N):
            logit[c] += TRUE_COEF["emergency"] * emergency[c].astype(float)
        sds, v = [], np.empty(N)
        for name, sd_draw, f in TRUE:
            pop.true_states.append(rng.bit_generator.state)
            _true_column(f, sd_draw, acuity.__getitem__, rng, out=v)
            mean, sd = v.mean(), v.std()
            sds.append(sd)
            if name in TRUE_COEF:
                coef = TRUE_COEF[name]
                for c in _chunks(N):
                    logit[c] += coef * ((v[c] - mean) / sd)
        del acuity, v
        y = np.empty(N, dtype=np.int64)
        for c in _chunks(N):
            p = 1 / (1 + np.exp(-(-3.0 + logit[c])))
            y[c] = rng.random(c.stop - c.start) < p
        del logit
        pop.y = y
        # what each hospital records: calibration bias, extra noise, offsets (the
        # per-hospital draws are kept; a lab's N(0, 1) noise per stay is skipped
        # here and drawn again in columns() from the saved state)
        for (name, _, _), sd in zip(TRUE, sds):
            if name in LABS:
                gain = np.exp(rng.normal(0, 0.1 * ms, H))
                off = rng.normal(0, 0.2 * ms * sd, H)
                noise = np.abs(rng.normal(0, 0.2 * ms, H)) * sd
                pop.record.append((gain, off, noise, rng.bit_generator.state))
                for c in _chunks(N):
                    rng.normal(0, 1, c.stop - c.start)
            else:
                pop.record.append((None, rng.normal(0, 0.15 * ms * sd, H), None, None))
        if self.missing_rate > 0:
            pop.miss_rate = np.clip(rng.beta(2, 2 / max(self.missing_rate, 1e-6) - 2, H), 0, 0.8)
        pop.missing_state = rng.bit_generator.state
        return pop

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


def _chunks(n: int) -> Iterator[slice]:
    for i in range(0, n, CHUNK):
        yield slice(i, min(i + CHUNK, n))


def _fill(n: int, block: Callable[[slice], Any], dtype: Any = float,
          out: np.ndarray | None = None) -> np.ndarray:
    """An array of ``n`` (or ``out``) filled block by block: a generator's
    draws in blocks are the same numbers as in one call."""
    out = np.empty(n, dtype=dtype) if out is None else out
    for c in _chunks(n):
        out[c] = block(c)
    return out


def _true_column(f: Callable, sd_draw: float, a: Callable[[slice], np.ndarray],
                 rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    """One true value per stay into ``out``: ``f(a, rng.normal(0, sd_draw, N))``
    with the acuity ``a`` given block by block."""
    return _fill(len(out), lambda c: f(a(c), rng.normal(0, sd_draw, c.stop - c.start)),
                 out=out)


def _generator(state: Mapping[str, Any]) -> np.random.Generator:
    g = np.random.Generator(np.random.PCG64())
    g.bit_generator.state = state
    return g


@dataclass
class _Population:
    """What :meth:`SyntheticEHR._population` drew, and the states to draw the
    rest again."""

    n: int
    size: np.ndarray
    hosp: np.ndarray
    y: np.ndarray | None
    miss_rate: np.ndarray
    age: np.ndarray | None
    sex: np.ndarray | None
    emergency: np.ndarray
    acu_mu: np.ndarray
    acuity_state: Mapping[str, Any]
    true_states: list[Mapping[str, Any]]
    record: list[tuple]
    missing_state: Mapping[str, Any]

    def _acuity(self) -> Callable[[slice], np.ndarray]:
        """a = acuity + 0.3 * emergency, block by block, drawn again (blocks
        must be asked for in order)."""
        g = _generator(self.acuity_state)
        hosp, acu_mu, em = self.hosp, self.acu_mu, self.emergency
        return lambda c: g.normal(acu_mu[hosp[c]], 1.0) + 0.3 * em[c].astype(float)

    def columns(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(j, column j of FEATURES)`` one at a time: float64 with NaN for
        missing, or bool for the 0/1 columns. The float64 columns share one
        buffer: use each before asking for the next."""
        N, hosp = self.n, self.hosp
        age, sex, self.age, self.sex = self.age, self.sex, None, None  # dropped once used
        assert age is not None and sex is not None, "columns() runs once"
        yield 0, age
        del age
        yield 1, sex
        del sex
        yield 2, self.emergency
        v = np.empty(N)
        miss = _generator(self.missing_state)
        for (name, sd_draw, f), state, (gain, off, noise, nstate) in zip(
                TRUE, self.true_states, self.record):
            _true_column(f, sd_draw, self._acuity(), _generator(state), out=v)
            if name not in LABS:  # v + offset
                for c in _chunks(N):
                    v[c] += off[hosp[c]]
                yield 3 + VITALS.index(name), v
                continue
            gn = _generator(nstate)
            for c in _chunks(N):  # v * gain + off + N(0, 1) * noise, as written
                h = hosp[c]
                vc = v[c]
                vc *= gain[h]
                vc += off[h]
                vc += gn.normal(0, 1, c.stop - c.start) * noise[h]
                # missing at the hospital's rate (one draw per stay, lab after lab)
                vc[miss.random(c.stop - c.start) < self.miss_rate[h]] = np.nan
            k = LABS.index(name)
            yield 3 + len(VITALS) + k, v
            yield 3 + len(VITALS) + len(LABS) + k, np.isnan(v)


def _scale_into(out: np.ndarray, col: np.ndarray, perm: np.ndarray,
                is_train: np.ndarray) -> None:
    """``out[i] = float32((col[perm[i]] - mean) / std)``, missing as 0, with
    the statistics of the training rows (``perm[is_train]``, ascending) that
    ``fit_scaler`` computes -- nanmean and nanstd over axis 0 of a C-ordered
    matrix add strictly row after row, as here -- and its rules for constant
    or all-missing columns: number for number ``apply_scaler(X, *fit_scaler(
    X[train]))`` on the float64 matrix."""
    def train_values(c: slice) -> np.ndarray:
        return np.asarray(col[perm[c][is_train[c]]], dtype=float)

    cnt, total, sq = 0, None, None
    with np.errstate(all="ignore"):
        for c in _chunks(len(perm)):  # Σ x over the present training values
            x = train_values(c)
            nan = np.isnan(x)
            cnt += len(x) - int(nan.sum())
            x[nan] = 0.0
            total = _carry_sum(total, x)
        mean = np.float64(0.0 if total is None else total) / cnt
        for c in _chunks(len(perm)):  # Σ (x - mean)² over the same
            x = train_values(c)
            nan = np.isnan(x)
            x -= mean
            x[nan] = 0.0
            sq = _carry_sum(sq, x * x)
        std = np.sqrt(np.float64(0.0 if sq is None else sq) / cnt)
    mean = mean if np.isfinite(mean) else np.float64(0.0)
    std = std if np.isfinite(std) and std > 1e-8 else np.float64(1.0)
    for c in _chunks(len(perm)):
        z = np.subtract(col[perm[c]], mean, dtype=float)
        z /= std
        z[np.isnan(z)] = 0.0
        out[c] = z


def _scale_into_sites(out: np.ndarray, col: np.ndarray, perm: np.ndarray,
                      starts: np.ndarray, n_tr: np.ndarray) -> None:
    """``out`` = each hospital's rows standardised with its own training rows'
    statistics (``fit_scaler``'s: NaN-aware mean and population s.d.; a
    constant or all-missing column gets mean 0, s.d. 1), missing as 0. Rows
    are hospital by hospital, training rows first (``starts``, ``n_tr``)."""
    with np.errstate(all="ignore"):
        # hospital by hospital, no column-long transient (the peak stays near the data)
        for lo, hi, k in zip(starts[:-1], starts[1:], n_tr):
            x = np.asarray(col[perm[lo:hi]], dtype=float)
            v = x[:k].copy()  # its training rows, added row after row as fit_scaler does
            nan = np.isnan(v)
            cnt = k - int(nan.sum())
            v[nan] = 0.0
            m = np.float64(_carry_sum(None, v) or 0.0) / cnt
            v = x[:k] - m
            v[nan] = 0.0
            sd = np.sqrt(np.float64(_carry_sum(None, v * v) or 0.0) / cnt)
            m = m if np.isfinite(m) else np.float64(0.0)
            sd = sd if np.isfinite(sd) and sd > 1e-8 else np.float64(1.0)
            x -= m
            x /= sd
            x[np.isnan(x)] = 0.0
            out[lo:hi] = x


def _carry_sum(carry: float | None, x: np.ndarray) -> float | None:
    """``carry + x[0] + x[1] + ...`` added left to right."""
    if not len(x):
        return carry
    if carry is not None:
        x[0] = carry + x[0]
    return float(np.add.accumulate(x, out=x)[-1])


COMPONENTS = (SyntheticEHR,)
