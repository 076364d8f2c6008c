"""synthetic-ehr's lean load: one float32 matrix written column by column,
with the same numbers as before it was lean.

The digests below were computed with the generator as it was before
(commit a7dcb80: the whole float64 matrix, then ``fit_scaler`` /
``apply_scaler`` per site); other tests pin results on this dataset.
Peak memory and time at 1,000 hospitals: tests/benchmarks/test_bench_data.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedmedbench.plugins.datasets._common import apply_scaler, fit_scaler, split_indices
from fedmedbench.plugins.datasets.synthetic_ehr import FEATURES, SyntheticEHR

PINNED = {  # (load digest, generate digest) of the generator before the change
    (7, 3000, 0): ("c530986d1e77348966169d94e62b538469d72e028f57494546e19f54f95bb0cd",
                   "5a74b6871ddd073ea6eb9ed227946a5251505fd7e75f7e831317c70787d72e7d"),
    (40, 150_000, 3): ("22f52a84bf5250ef8627e47ba33c80ff90f6fd9f00e73c8cc1a2e778f41f65bd",
                       "684655e01621ac75bbe08331bff45348b3501966f48982ffb77be7277fede39d"),
}


def _digest_load(data) -> str:
    h = hashlib.sha256()
    for s in data.sites:
        for a in (s.train.X, s.train.y, s.test.X, s.test.y):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr(s.quality).encode())
    return h.hexdigest()


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("key", sorted(PINNED))
def test_the_numbers_are_those_of_the_generator_before(key):
    H, N, seed = key
    ds = SyntheticEHR(n_hospitals=H, n_patients=N, data_seed=seed, scaling="pooled")
    assert _digest_load(ds.load(seed=0)) == PINNED[key][0]
    assert _digest(ds.generate()) == PINNED[key][1]


@pytest.mark.parametrize("kw", [
    dict(n_hospitals=6, n_patients=1200),
    dict(n_hospitals=5, n_patients=900, missing_rate=0.0),
    dict(n_hospitals=9, n_patients=70_000, size_skew=1.2, case_mix=0.0, data_seed=5),
    dict(n_hospitals=2, n_patients=140_000, measurement_shift=0.0, missing_rate=0.5),
])
@pytest.mark.parametrize("scaling", ["site", "pooled"])
def test_load_is_generate_then_the_scaler(kw, scaling):
    """load() against the float64 path it replaces, written out with the
    shared helpers (also for columns longer than one block of CHUNK rows):
    each hospital's own training rows fit its scaler (the default), or the
    pooled training rows fit one (``scaling="pooled"``)."""
    ds = SyntheticEHR(**kw, scaling=scaling)
    X, y, hosp, miss = ds.generate()
    rng = np.random.default_rng([ds.data_seed, 32])
    tr, te = [], []
    for h in range(ds.n_hospitals):
        rows = np.flatnonzero(hosp == h)
        a, b = split_indices(y[rows], ds.test_fraction, rng)
        tr.append(rows[a]), te.append(rows[b])
    pooled = fit_scaler(X[np.concatenate(tr)])
    data = ds.load(seed=0)
    for h, s in enumerate(data.sites):
        mean, std = pooled if scaling == "pooled" else fit_scaler(X[tr[h]])
        np.testing.assert_array_equal(s.train.X, apply_scaler(X[tr[h]], mean, std))
        np.testing.assert_array_equal(s.test.X, apply_scaler(X[te[h]], mean, std))
        np.testing.assert_array_equal(s.train.y, y[tr[h]])
        np.testing.assert_array_equal(s.test.y, y[te[h]])
        assert s.quality == float(1 - miss[h])


def test_sites_are_views_of_one_float32_matrix():
    data = SyntheticEHR(n_hospitals=8, n_patients=2000).load(seed=0)
    base = data.sites[0].train.X.base
    assert base is not None and base.dtype == np.float32 and base.flags.c_contiguous
    assert base.shape == (2000, len(FEATURES))
    for s in data.sites:
        assert s.train.X.base is base and s.test.X.base is base
        assert s.train.X.flags.c_contiguous and s.train.y.dtype == np.int64
    # rows: hospital by hospital, train then test, every stay once
    assert sum(len(s.train) + len(s.test) for s in data.sites) == 2000
