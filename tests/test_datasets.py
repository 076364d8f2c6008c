"""Datasets: the FLamby split, no leakage, user-supplied loaders (eICU,
MedMNIST) on generated fixtures in the real schema, the derived-array cache,
determinism, and a real matrix run over the shipped data."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmedbench import DataError
from fedmedbench.datafiles import cache_dir, shipped_file
from fedmedbench.plugins.datasets import genomics, heart_disease, support2
from fedmedbench.plugins.datasets.eicu import EICU
from fedmedbench.plugins.datasets.medmnist import MedMNIST
from fedmedbench.plugins.datasets.synthetic_ehr import SyntheticEHR
from fedmedbench.plugins.datasets.synthetic_genomics import SyntheticGenomics
from fedmedbench.plugins.datasets.synthetic_imaging import SyntheticImaging

SHIPPED = [heart_disease.HeartDisease, support2.Support2, genomics.BladderBatch,
           genomics.GSE7390]


# --------------------------------------------------------------------------
# heart-disease: FLamby's split
# --------------------------------------------------------------------------


def test_heart_disease_flamby_split():
    data = heart_disease.HeartDisease().load(seed=0)
    got = {s.name: (len(s.train), len(s.test)) for s in data.sites}
    # FLamby's split; the default preset drops the test copy of the patient the UCI file
    # repeats (ids 860 and 908, one copy in training, one in test); FLamby's keeps it
    assert got == {"Cleveland": (199, 104), "Hungary": (172, 89), "Switzerland": (30, 16),
                   "VA Long Beach": (85, 44)}
    flamby = heart_disease.HeartDisease(preprocessing="flamby").load(seed=0)
    got_f = {s.name: (len(s.train), len(s.test)) for s in flamby.sites}
    assert got_f == {**got, "VA Long Beach": (85, 45)}
    assert [a + b for a, b in got_f.values()] == [303, 261, 46, 130]
    va = data.sites[3]
    rows = {tuple(r) for r in np.round(va.train.X, 5)}
    assert not any(tuple(r) in rows for r in np.round(va.test.X, 5))  # no test patient trained on
    # each hospital standardised with its own training rows (the default); pooled on demand
    for s in data.sites:
        assert np.allclose(s.train.X[:, :5].mean(0), 0, atol=1e-5)
    pooled = heart_disease.HeartDisease(scaling="pooled")
    assert pooled.outside_threat_model() and not heart_disease.HeartDisease().outside_threat_model()
    p = pooled.load(seed=0)
    assert np.allclose(np.concatenate([s.train.X[:, :5] for s in p.sites]).mean(0), 0, atol=1e-5)
    assert not np.allclose(p.sites[2].train.X[:, :5].mean(0), 0, atol=1e-2)
    assert data.task.input_shape == (data.sites[0].train.X.shape[1],)
    # same split whatever the run seed (FLamby fixes random_state=43)
    other = heart_disease.HeartDisease().load(seed=5)
    for a, b in zip(data.sites, other.sites):
        np.testing.assert_array_equal(a.train.X, b.train.X)


# --------------------------------------------------------------------------
# leakage: preprocessing statistics from training rows only
# --------------------------------------------------------------------------


def _perturb(df: pd.DataFrame, rows: np.ndarray, cols: list[str]) -> pd.DataFrame:
    """``df`` with ``cols`` of the rows at positions ``rows`` changed wildly."""
    vals = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float, copy=True) \
        if len(cols) < 100 else df[cols].to_numpy(dtype=float, copy=True)
    rng = np.random.default_rng(0)
    vals[rows] = vals[rows] * 50 + rng.normal(0, 1e3, (len(rows), len(cols)))
    new = pd.DataFrame(vals, columns=cols, index=df.index)
    return pd.concat([df.drop(columns=cols), new], axis=1)[list(df.columns)]


def _read_support2() -> pd.DataFrame:
    return pd.read_csv(shipped_file("support2", support2.FILE), skipinitialspace=True)


def _read_bladder() -> pd.DataFrame:
    return pd.read_csv(shipped_file("bladderbatch", genomics.BladderBatch.FILE))


@pytest.mark.parametrize("which", ["support2", "bladderbatch"])
def test_test_rows_do_not_change_training_arrays(which):
    """Perturb every test row's features wildly in the source: the training
    arrays (after standardisation, imputation and variance filtering) must
    not move, and the test arrays must."""
    if which == "support2":
        df, prep, cols = _read_support2(), lambda d: support2.preprocess(d, "dzclass"), \
            support2.NUMERIC
    else:
        df = _read_bladder()
        ds = genomics.BladderBatch(n_genes=200)
        prep = ds.preprocess
        cols = [c for c in df.columns if c not in ("sample", "batch", "cancer", "outcome")]
    a = prep(df)
    assert not set(a["row"]) & set(a["row_test"]), "a row is both train and test"
    assert len(a["row"]) + len(a["row_test"]) == len(df)
    b = prep(_perturb(df, a["row_test"], cols))
    np.testing.assert_array_equal(a["row_test"], b["row_test"])
    np.testing.assert_array_equal(a["X"], b["X"])
    if "features" in a:
        np.testing.assert_array_equal(a["features"], b["features"])  # same genes kept
    assert not np.allclose(a["X_test"], b["X_test"])
    # and the training rows are standardised with their own statistics
    observed = a["X"][:, :5]
    assert np.allclose(observed.mean(0), 0, atol=1e-4) or which == "support2"


def test_heart_disease_and_gse7390_scale_with_training_rows_only():
    path = shipped_file("heart-disease", "heart_disease_uci.csv")
    df = pd.read_csv(path)
    # test rows of every hospital but VA Long Beach (whose duplicated patient the
    # default preset drops from test only while it equals its training copy)
    test_idx = np.concatenate([te.index.to_numpy() for _, te in heart_disease.split_sites(df)[:3]])
    pos = df.index.get_indexer(test_idx)
    a = heart_disease._preprocess(df)
    b = heart_disease._preprocess(_perturb(df, pos, heart_disease.NUMERIC))
    np.testing.assert_array_equal(a["X"], b["X"])
    assert not np.allclose(a["X_test"], b["X_test"])

    g = genomics.GSE7390().preprocess(shipped_file("gse7390", genomics.GSE7390.FILE))
    assert not set(g["row"]) & set(g["row_test"])
    assert np.allclose(g["X"].mean(0), 0, atol=1e-5)
    assert not np.allclose(g["X_test"].mean(0), 0, atol=1e-3)


def test_generators_standardise_with_training_rows():
    d = SyntheticGenomics(n_genes=300, n_samples=200).load(seed=0)
    tr, te = d.pooled_train(), d.pooled_test()
    assert tr.X.dtype == np.float32 and tr.X.shape[1] == 300
    assert np.allclose(tr.X.mean(0), 0, atol=1e-4) and np.allclose(tr.X.std(0), 1, atol=1e-3)
    assert not np.allclose(te.X.mean(0), 0, atol=1e-3)
    e = SyntheticEHR(n_hospitals=5, n_patients=1000).load(seed=0)
    Xtr = e.pooled_train().X[:, 3:9]  # vitals, no missing values
    assert np.allclose(Xtr.mean(0), 0, atol=1e-4)


# --------------------------------------------------------------------------
# eICU: generated files in the real schema
# --------------------------------------------------------------------------


def _write_eicu(folder: Path, hospitals: dict[int, int], seed: int = 0,
                gz: bool = True) -> pd.DataFrame:
    """Write patient / apachePatientResult / apacheApsVar in eICU-CRD 2.0's
    schema (every real column) and return the patient table."""
    rng = np.random.default_rng(seed)
    n = sum(hospitals.values())
    hid = np.repeat(list(hospitals), list(hospitals.values()))
    stay = np.arange(141000, 141000 + n)
    ages = rng.integers(20, 95, n).astype(str).astype(object)
    ages[ages.astype(int) > 89] = "> 89"
    ages[3] = ""  # eICU has empty ages
    dead = rng.random(n) < 0.2
    status = np.where(dead, "Expired", "Alive").astype(object)
    status[5] = np.nan  # no discharge status: dropped
    visit = np.ones(n, dtype=int)
    visit[7] = 2  # a second ICU stay of a hospital stay: dropped
    patient = pd.DataFrame({
        "patientunitstayid": stay, "patienthealthsystemstayid": stay + 1_000_000,
        "gender": rng.choice(["Male", "Female"], n), "age": ages,
        "ethnicity": "Caucasian", "hospitalid": hid, "wardid": hid * 10,
        "apacheadmissiondx": "Sepsis, pulmonary", "admissionheight": rng.normal(170, 10, n),
        "hospitaladmittime24": "10:00:00", "hospitaladmitoffset": -30,
        "hospitaladmitsource": "Emergency Department", "hospitaldischargeyear": 2014,
        "hospitaldischargetime24": "12:00:00", "hospitaldischargeoffset": 5000,
        "hospitaldischargelocation": "Home", "hospitaldischargestatus": status,
        "unittype": "Med-Surg ICU", "unitadmittime24": "11:00:00",
        "unitadmitsource": "Emergency Department", "unitvisitnumber": visit,
        "unitstaytype": "admit", "admissionweight": rng.normal(80, 15, n),
        "dischargeweight": rng.normal(80, 15, n), "unitdischargetime24": "09:00:00",
        "unitdischargeoffset": 3000, "unitdischargelocation": "Floor",
        "unitdischargestatus": "Alive", "uniquepid": [f"002-{i}" for i in range(n)],
    })
    score = np.where(dead, rng.normal(80, 20, n), rng.normal(45, 15, n)).round()
    result = pd.DataFrame({
        "apachepatientresultsid": np.arange(2 * n), "patientunitstayid": np.r_[stay, stay],
        "physicianspeciality": "critical care medicine (CCM)",
        "physicianinterventioncategory": "Unknown",
        "acutephysiologyscore": np.r_[score - 10, score - 12],
        "apachescore": np.r_[score, score - 99],  # the IV row (second) must not be used
        "apacheversion": ["IVa"] * n + ["IV"] * n,
        "predictedicumortality": 0.1, "actualicumortality": "ALIVE", "predictediculos": 3.0,
        "actualiculos": 2.0, "predictedhospitalmortality": 0.2,
        "actualhospitalmortality": "ALIVE", "predictedhospitallos": 8.0,
        "actualhospitallos": 7.0, "preopmi": 0, "preopcardiaccath": 0, "ptcawithin24h": 0,
        "unabridgedunitlos": 2.0, "unabridgedhosplos": 7.0, "actualventdays": 0.0,
        "predventdays": 0.0, "unabridgedactualventdays": 0.0,
    }).sample(frac=1.0, random_state=1)
    aps = pd.DataFrame({"apacheapsvarid": np.arange(n), "patientunitstayid": stay,
                        **{c: rng.normal(50, 10, n).round(1) for c in
                           ["intubated", "vent", "dialysis", "eyes", "motor", "verbal", "meds",
                            "urine", "wbc", "temperature", "respiratoryrate", "sodium",
                            "heartrate", "meanbp", "ph", "hematocrit", "creatinine", "albumin",
                            "pao2", "pco2", "bun", "glucose", "bilirubin", "fio2"]}})
    aps.loc[aps.index[:20], "albumin"] = -1  # eICU's missing code
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in (("patient", patient), ("apachePatientResult", result),
                     ("apacheApsVar", aps)):
        if gz:
            with gzip.open(folder / f"{name}.csv.gz", "wt") as f:
                df.to_csv(f, index=False)
        else:
            df.to_csv(folder / f"{name}.csv", index=False)
    return patient


def test_eicu_loads_generated_files_by_hospital(tmp_path, monkeypatch):
    folder = tmp_path / "eicu"
    patient = _write_eicu(folder, {73: 160, 167: 130, 420: 40})
    monkeypatch.setenv("FEDMEDBENCH_EICU_DIR", str(folder))  # the env var route
    data = EICU(min_stays=100).load(seed=0)
    assert [s.name for s in data.sites] == ["hospital73", "hospital167"]  # 420 is too small
    kept = patient[(patient.unitvisitnumber == 1) & patient.hospitaldischargestatus.notna()]
    for s, h in zip(data.sites, (73, 167)):
        g = kept[kept.hospitalid == h]
        assert len(s.train) + len(s.test) == len(g)
        assert s.train.y.sum() + s.test.y.sum() == (g.hospitaldischargestatus == "Expired").sum()
        assert 0.2 < len(s.test) / len(g) < 0.3
    assert data.task.metric == "auroc" and data.natural
    X = data.pooled_train().X
    assert np.isfinite(X).all() and X.dtype == np.float32
    # the IVa score was used: it separates the classes; the IV row would not
    col = data.task.feature_names.index("apachescore")
    tr = data.pooled_train()
    assert X[tr.y == 1, col].mean() > X[tr.y == 0, col].mean() + 1.0
    # plain .csv works through path= too, and gives the same data
    other = tmp_path / "plain"
    _write_eicu(other, {73: 160, 167: 130, 420: 40}, gz=False)
    same = EICU(path=str(other), min_stays=100).load(seed=0)
    np.testing.assert_array_equal(same.sites[0].train.X, data.sites[0].train.X)


def test_eicu_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMEDBENCH_EICU_DIR", raising=False)
    with pytest.raises(DataError, match="FEDMEDBENCH_EICU_DIR") as e:
        EICU().load(seed=0)
    assert "physionet.org/content/eicu-crd" in str(e.value) and "credentialed" in str(e.value)
    # missing file: names it
    folder = tmp_path / "e"
    _write_eicu(folder, {1: 120})
    (folder / "apacheApsVar.csv.gz").unlink()
    with pytest.raises(DataError, match=r"lacks apacheApsVar\.csv\.gz.*PhysioNet"):
        EICU(path=str(folder)).load(seed=0)
    # wrong schema: names the table and the column
    _write_eicu(folder, {1: 120})
    pd.read_csv(folder / "patient.csv.gz").drop(columns=["hospitalid"]).to_csv(
        folder / "patient.csv.gz", index=False, compression="gzip")
    with pytest.raises(DataError, match=r"not the eICU-CRD 2.0 patient table.*hospitalid"):
        EICU(path=str(folder)).load(seed=0)
    # checksum mismatch
    _write_eicu(folder, {1: 120})
    with pytest.raises(DataError, match="sha256"):
        EICU(path=str(folder), checksums={"patient.csv.gz": "0" * 64}).load(seed=0)
    good = hashlib.sha256((folder / "patient.csv.gz").read_bytes()).hexdigest()
    assert len(EICU(path=str(folder), checksums={"patient.csv.gz": good}).load(seed=0).sites) == 1
    # too few stays everywhere
    with pytest.raises(DataError, match="min_stays"):
        EICU(path=str(folder), min_stays=500).load(seed=0)
    with pytest.raises(ValueError, match="min_stays"):
        EICU(min_stays=1)


# --------------------------------------------------------------------------
# MedMNIST: generated .npz with the official keys and dtypes
# --------------------------------------------------------------------------


def _write_npz(path: Path, n=(60, 20, 30), classes=3, rgb=False, drop=None, multilabel=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, 28, 28, 3) if rgb else (k, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, (k, 4), dtype=np.uint8) if multilabel
                                     else (np.arange(k) % classes).astype(np.uint8)[:, None])
    if drop:
        arrays.pop(drop)
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_loads_generated_file(tmp_path, monkeypatch):
    arrays = _write_npz(tmp_path / "bloodmnist.npz", rgb=True)
    monkeypatch.setenv("FEDMEDBENCH_MEDMNIST_DIR", str(tmp_path))
    data = MedMNIST(subset="bloodmnist").load(seed=0)
    site = data.sites[0]
    assert site.train.X.shape == (60, 3, 28, 28) and site.train.X.dtype == np.float32
    assert site.test.X.shape == (30, 3, 28, 28) and data.public is not None
    assert len(data.public) == 20  # the official val split is the public split
    np.testing.assert_allclose(site.train.X[0, 1] * 255, arrays["train_images"][0, :, :, 1])
    assert data.task.num_classes == 3 and data.task.model == "cnn"
    assert site.train.y.dtype == np.int64
    merged = MedMNIST(path=str(tmp_path / "bloodmnist.npz"), val="train").load(seed=0)
    assert len(merged.sites[0].train) == 80 and merged.public is None


def test_medmnist_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMEDBENCH_MEDMNIST_DIR", raising=False)
    with pytest.raises(DataError, match="FEDMEDBENCH_MEDMNIST_DIR"):
        MedMNIST().load(seed=0)
    with pytest.raises(DataError, match=r"pneumoniamnist\.npz does not exist.*medmnist.com"):
        MedMNIST(path=str(tmp_path)).load(seed=0)
    bad = tmp_path / "bad.npz"
    _write_npz(bad, drop="test_labels")
    with pytest.raises(DataError, match=r"lacks keys \['test_labels'\]"):
        MedMNIST(path=str(bad)).load(seed=0)
    good = tmp_path / "good.npz"
    _write_npz(good)
    with pytest.raises(DataError, match="sha256"):
        MedMNIST(path=str(good), sha256="ab" * 32).load(seed=0)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    assert len(MedMNIST(path=str(good), sha256=digest).load(seed=0).sites[0].train) == 60
    multi = tmp_path / "chestmnist.npz"
    _write_npz(multi, multilabel=True)
    with pytest.raises(DataError, match="multi-label"):
        MedMNIST(path=str(multi)).load(seed=0)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        MedMNIST(path=str(tmp_path / "junk.npz")).load(seed=0)
    with pytest.raises(ValueError, match="sha256"):
        MedMNIST(sha256="xyz")


def test_user_file_loaders_run_end_to_end(tmp_path, run_matrix, monkeypatch):
    """Generated fixtures go through the real engine: partitioner, CNN, FedAvg."""
    _write_npz(tmp_path / "pneumoniamnist.npz", n=(80, 20, 40), classes=2)
    _write_eicu(tmp_path / "eicu", {5: 150, 6: 140})
    monkeypatch.setenv("FEDMEDBENCH_MEDMNIST_DIR", str(tmp_path))
    monkeypatch.setenv("FEDMEDBENCH_EICU_DIR", str(tmp_path / "eicu"))
    code, records = run_matrix("""
        name = "user-files"
        rounds = 2
        seeds = [0]
        [axes]
        dataset = ["medmnist", "eicu"]
        algorithm = ["fedavg"]
        [run]
        local_steps = 2
    """)
    assert code == 0, [r.get("error") for r in records]
    by = {r["config"]["dataset"]["name"]: r for r in records}
    assert by["medmnist"]["config"]["partitioner"]["name"] == "dirichlet"
    assert len(by["medmnist"]["metrics"]["utility"]["per_site"]) == 4
    assert set(by["eicu"]["metrics"]["utility"]["per_site"]) == {"hospital5", "hospital6"}


# --------------------------------------------------------------------------
# cache, determinism, scale, the CLI listing
# --------------------------------------------------------------------------


def test_cached_loading_is_fast_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    first = {cls.name: cls().load(seed=0) for cls in SHIPPED}  # builds the cache
    files = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(files) == len(SHIPPED)
    import fedmedbench.datafiles as datafiles

    real, built = datafiles.cached_arrays, []

    def spy(key_parts, build):
        return real(key_parts, lambda: built.append(key_parts) or build())

    for mod in {sys.modules[cls.__module__] for cls in SHIPPED}:
        if hasattr(mod, "cached_arrays"):
            monkeypatch.setattr(mod, "cached_arrays", spy)
    again = {cls.name: cls().load(seed=0) for cls in SHIPPED}
    assert built == []  # every shipped dataset came from its cache file, nothing re-parsed
    for name in first:
        for a, b in zip(first[name].sites, again[name].sites):
            np.testing.assert_array_equal(a.train.X, b.train.X)
    # corrupt every cache file: the loaders rebuild them and give the same data
    for f in files:
        f.write_bytes(b"PK\x03\x04 truncated garbage")
    rebuilt = {cls.name: cls().load(seed=0) for cls in SHIPPED}
    for name in first:
        for a, b in zip(first[name].sites, rebuilt[name].sites):
            np.testing.assert_array_equal(a.test.X, b.test.X)
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            assert "X" in z.files
    assert cache_dir() == tmp_path / "cache"
    # a different preprocessing parameter is a different cache entry
    genomics.BladderBatch(n_genes=50).load(seed=0)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == len(SHIPPED) + 1


def _flat(data) -> list[np.ndarray]:
    return [a for s in data.sites for a in (s.train.X, s.train.y, s.test.X, s.test.y)]


@pytest.mark.parametrize("make", [
    lambda: support2.Support2(), lambda: genomics.BladderBatch(),
    lambda: SyntheticEHR(n_hospitals=6, n_patients=1200),
    lambda: SyntheticGenomics(n_genes=100, n_samples=120),
    lambda: SyntheticImaging(n_per_site=40),
], ids=["support2", "bladderbatch", "synthetic-ehr", "synthetic-genomics", "synthetic-imaging"])
def test_same_data_for_the_same_seed(make):
    a, b = make().load(seed=3), make().load(seed=3)
    for x, y in zip(_flat(a), _flat(b)):
        np.testing.assert_array_equal(x, y)
    ds = make()
    if hasattr(ds, "data_seed"):
        ds.data_seed = 1
        x, y = _flat(a)[0], _flat(ds.load(seed=3))[0]
        assert x.shape != y.shape or not np.array_equal(x, y)


def test_synthetic_ehr_scales_to_hundreds_of_hospitals():
    data = SyntheticEHR(n_hospitals=300, n_patients=60_000).load(seed=0)
    assert len(data.sites) == 300 and data.sites[0].name == "hospital000"
    assert all(len(s.train) >= 10 and len(s.test) >= 2 for s in data.sites)
    prev = [s.train.y.mean() for s in data.sites]
    assert np.std(prev) > 0.03  # case mix: mortality differs by hospital
    q = [s.quality for s in data.sites]
    assert all(0 <= v <= 1 for v in q) and np.std(q) > 0
    none = SyntheticEHR(n_hospitals=4, n_patients=800, missing_rate=0.0).load(seed=0)
    assert all(s.quality == 1.0 for s in none.sites)


def test_synthetic_genomics_layout_and_batch_effect():
    d = SyntheticGenomics(n_genes=2000, n_samples=1000, n_sites=5, batch_strength=2.0).load(
        seed=0)
    assert d.sites[0].train.X.dtype == np.float32
    assert all(s.train.X.base is not None for s in d.sites)  # views, not copies
    means = np.stack([s.train.X.mean(0) for s in d.sites])
    weak = SyntheticGenomics(n_genes=2000, n_samples=1000, n_sites=5,
                             batch_strength=0.0).load(seed=0)
    weak_means = np.stack([s.train.X.mean(0) for s in weak.sites])
    assert means.std(0).mean() > 3 * weak_means.std(0).mean()


def test_synthetic_imaging_morphology_and_sites():
    d = SyntheticImaging(n_per_site=120, num_classes=3).load(seed=0)
    X = d.pooled_train().X
    assert X.shape[1:] == (1, 28, 28) and X.min() >= 0 and X.max() <= 1
    assert d.task.model == "cnn" and d.task.num_classes == 3
    priors = np.array([np.bincount(s.train.y, minlength=3) / len(s.train) for s in d.sites])
    assert priors.std(0).max() > 0.05  # label skew
    level = [s.train.X.mean() for s in d.sites]
    assert np.std(level) > 0.01  # acquisition shift


def test_cli_lists_every_dataset_with_sites(monkeypatch, capsys):
    from fedmedbench.cli import main

    monkeypatch.delenv("FEDMEDBENCH_EICU_DIR", raising=False)
    monkeypatch.delenv("FEDMEDBENCH_MEDMNIST_DIR", raising=False)
    assert main(["datasets", "--json"]) == 0
    cards = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    for name in ["heart-disease", "support2", "eicu", "synthetic-ehr", "bladderbatch",
                 "gse7390", "synthetic-genomics", "medmnist", "synthetic-imaging"]:
        assert name in cards and cards[name].get("sites"), name
        assert "describe_error" not in cards[name], cards[name]["describe_error"]
        assert cards[name].get("metric") in ("accuracy", "balanced_accuracy", "auroc")
    assert cards["eicu"]["needs_user_files"] and "note" in cards["eicu"]
    assert cards["medmnist"]["needs_user_files"] and "note" in cards["medmnist"]
    assert "train 172 / test 89" in json.dumps(cards["heart-disease"]) or \
        "172 / 89" in json.dumps(cards["heart-disease"])
    assert "2959" in json.dumps(cards["support2"]["sites"])


def test_shipped_matrix_fl_between_local_and_centralized(run_matrix):
    """A real run of shipped datasets x {centralized, local, fedavg}."""
    code, records = run_matrix("""
        name = "shipped"
        rounds = 15
        seeds = [0]
        [axes]
        dataset = ["heart-disease", "bladderbatch"]
        algorithm = ["centralized", "local", "fedavg"]
    """)
    assert code == 0 and len(records) == 6
    util = {(r["config"]["dataset"]["name"], r["config"]["algorithm"]["name"]):
            r["metrics"]["utility"]["global"] for r in records}
    for ds in ("heart-disease", "bladderbatch"):
        assert util[(ds, "fedavg")] > util[(ds, "local")] + 0.05, util
        assert util[(ds, "centralized")] > util[(ds, "local")], util


def test_support2_long_stay_target_thresholds_the_real_length_of_stay():
    from fedmedbench import shipped_file
    from fedmedbench.errors import ConfigError
    from fedmedbench.registry import get_registry

    reg = get_registry()
    data = reg.build("dataset", {"name": "support2", "target": "long-stay",
                                 "long_stay_days": 10}).load(seed=0)
    y = np.concatenate([np.concatenate([s.train.y, s.test.y]) for s in data.sites])
    slos = pd.read_csv(shipped_file("support2", "support2.csv.gz"),
                       skipinitialspace=True)["slos"].dropna()
    assert len(y) == len(slos) and y.sum() == int((slos > 10).sum())
    assert data.task.metric == "auroc"
    with pytest.raises(ConfigError, match=r"support2\.target = 'los' is not one of the choices"):
        reg.build("dataset", {"name": "support2", "target": "los"})


def test_the_record_names_preprocessing_done_outside_the_federation():
    """Pooled standardisation statistics are an explicit option, named in the
    record; the default preparation reads each site's rows only."""
    from fedmedbench import run_cell
    from fedmedbench.matrix import parse_matrix

    raw = {"name": "scope", "rounds": 1, "seeds": [0],
           "axes": {"dataset": ["heart-disease", {"name": "heart-disease", "scaling": "pooled"},
                                {"name": "bladderbatch", "n_genes": 50}],
                    "algorithm": ["fedavg"]}}
    recs = [run_cell(c) for c in parse_matrix(raw).cells]
    by = {json.dumps(r["config"]["dataset"], sort_keys=True): r for r in recs}
    outside = {k: r["metrics"]["privacy"]["outside_threat_model"] for k, r in by.items()}
    site, pooled, genes = (outside[json.dumps(d, sort_keys=True)] for d in (
        {"name": "heart-disease", "preprocessing": "fedmedbench", "scaling": "site"},
        {"name": "heart-disease", "preprocessing": "fedmedbench", "scaling": "pooled"},
        {"name": "bladderbatch", "n_genes": 50, "scaling": "site"}))
    assert site == [] and len(pooled) == 1 and "pooled training rows" in pooled[0]
    assert len(genes) == 1 and "variance" in genes[0]


def test_synthetic_imaging_offers_the_cnn_models_choices():
    """synthetic-imaging states the cnn model's activation and pooling choices
    itself (families never import each other): they must stay the same."""
    from fedmedbench.constraints import rules_of
    from fedmedbench.plugins.datasets.synthetic_imaging import SyntheticImaging
    from fedmedbench.plugins.models.architectures import CNNModel

    data, cnn = rules_of(SyntheticImaging), rules_of(CNNModel)
    assert data["model_act"].choices == cnn["act"].choices
    assert data["model_pool"].choices == cnn["pool"].choices
