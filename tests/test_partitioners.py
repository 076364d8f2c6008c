"""Partitioners: every row accounted for, no test row in training or public
data, the public carve-out, the skews each one promises, and a real run."""

from __future__ import annotations

import numpy as np
import pytest

from fedmedbench import FederatedData, Site, Split, Task
from fedmedbench.plugins.partitioners.basic import IID, Dirichlet, Natural
from fedmedbench.plugins.partitioners.skew import FeatureShift, Quantity


def _tagged(n_train=(300, 200, 100), n_test=(60, 50, 40)) -> FederatedData:
    """Three sites whose single feature is a unique row id (test ids negative)."""
    rng = np.random.default_rng(0)
    sites, nxt_tr, nxt_te = [], 1, -1
    for i, (a, b) in enumerate(zip(n_train, n_test)):
        tr_ids = np.arange(nxt_tr, nxt_tr + a)
        te_ids = np.arange(nxt_te, nxt_te - b, -1)
        nxt_tr += a
        nxt_te -= b
        sites.append(Site(f"s{i}", Split(tr_ids[:, None].astype(np.float32), rng.integers(0, 3, a)),
                          Split(te_ids[:, None].astype(np.float32), rng.integers(0, 3, b))))
    task = Task(kind="multiclass", num_classes=3, input_shape=(1,))
    return FederatedData(task=task, sites=sites)


def _ids(split: Split | None) -> np.ndarray:
    return np.zeros(0) if split is None else split.X[:, 0].astype(int)


PARTITIONERS = [
    lambda f: Natural(public_fraction=f),
    lambda f: IID(n_clients=5, public_fraction=f),
    lambda f: Dirichlet(n_clients=5, alpha=0.3, public_fraction=f),
    lambda f: Quantity(n_clients=5, alpha=0.5, public_fraction=f),
    lambda f: FeatureShift(n_clients=5, strength=0.0, public_fraction=f),
]
NAMES = ["natural", "iid", "dirichlet", "quantity", "feature-shift"]


@pytest.mark.parametrize("fraction", [0.0, 0.2])
@pytest.mark.parametrize("make", PARTITIONERS, ids=NAMES)
def test_rows_are_conserved_and_test_rows_never_train(make, fraction):
    data = _tagged()
    train_ids = np.concatenate([_ids(s.train) for s in data.sites])
    test_ids = np.concatenate([_ids(s.test) for s in data.sites])
    out = make(fraction).partition(data, seed=1)
    got_train = np.concatenate([_ids(s.train) for s in out.sites])
    got_test = np.concatenate([_ids(s.test) for s in out.sites])
    public = _ids(out.public)
    # every test row is a test row of exactly one client, and nowhere else
    assert sorted(got_test) == sorted(test_ids)
    assert not set(test_ids) & (set(got_train) | set(public))
    # training rows: each held by one client or public, never both
    assert len(set(got_train)) == len(got_train)
    assert not set(got_train) & set(public)
    assert sorted(np.concatenate([got_train, public])) == sorted(train_ids)
    assert len(public) == pytest.approx(fraction * len(train_ids), abs=3)
    # labels travel with their rows
    label = {int(i): int(y) for s in data.sites for i, y in zip(_ids(s.train), s.train.y)}
    for s in out.sites:
        assert all(label[int(i)] == int(y) for i, y in zip(_ids(s.train), s.train.y))
    # same seed, same partition; another seed, another draw
    again = make(fraction).partition(_tagged(), seed=1)
    assert [list(_ids(s.train)) for s in again.sites] == [list(_ids(s.train)) for s in out.sites]
    np.testing.assert_array_equal(_ids(again.public), public)
    if fraction or not isinstance(make(0.0), Natural):
        other = make(fraction).partition(_tagged(), seed=2)
        assert ([list(_ids(s.train)) for s in other.sites]
                != [list(_ids(s.train)) for s in out.sites]) or \
            not np.array_equal(_ids(other.public), public)


def test_natural_keeps_sites_and_existing_public_split():
    data = _tagged()
    data.public = Split(np.full((7, 1), 10_000, dtype=np.float32), np.zeros(7, dtype=np.int64))
    assert Natural().partition(data, seed=0) is data
    out = Natural(public_fraction=0.1).partition(data, seed=0)
    assert [s.name for s in out.sites] == ["s0", "s1", "s2"]
    assert [len(s.train) for s in out.sites] == [270, 180, 90]  # 10% of each site
    assert len(out.public) == 7 + 60 and (out.public.X[:7] == 10_000).all()


def test_quantity_skews_sizes_not_labels():
    data = _tagged(n_train=(2000, 1000, 1000), n_test=(400, 200, 200))
    out = Quantity(n_clients=8, alpha=0.3, min_size=10).partition(data, seed=0)
    sizes = np.array([len(s.train) for s in out.sites])
    assert sizes.min() >= 10 and sizes.max() / sizes.min() > 4
    share_tr = sizes / sizes.sum()
    share_te = np.array([len(s.test) for s in out.sites]) / sum(len(s.test) for s in out.sites)
    assert np.abs(share_tr - share_te).max() < 0.02  # test follows the client's share
    big = out.sites[int(sizes.argmax())].train.y
    assert np.bincount(big, minlength=3).min() / len(big) > 0.2  # labels stay mixed
    iid = IID(n_clients=8).partition(data, seed=0)
    assert np.ptp([len(s.train) for s in iid.sites]) <= 1


def test_dirichlet_skews_labels_more_than_iid():
    data = _tagged(n_train=(2000, 1000, 1000), n_test=(400, 200, 200))

    def skew(fd):
        p = np.array([np.bincount(s.train.y, minlength=3) / max(len(s.train), 1)
                      for s in fd.sites])
        return p.std(0).mean()

    assert skew(Dirichlet(n_clients=5, alpha=0.1).partition(data, seed=0)) > \
        5 * skew(IID(n_clients=5).partition(data, seed=0))


def test_feature_shift_transforms_each_client_consistently():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6)).astype(np.float32)
    y = rng.integers(0, 2, 400)
    data = FederatedData(task=Task(kind="binary", num_classes=2, input_shape=(6,)),
                         sites=[Site("a", Split(X[:300], y[:300]), Split(X[300:], y[300:]))])
    plain = FeatureShift(n_clients=3, strength=0.0).partition(data, seed=0)
    shifted = FeatureShift(n_clients=3, strength=1.5).partition(data, seed=0)
    for p, s in zip(plain.sites, shifted.sites):
        np.testing.assert_array_equal(p.train.y, s.train.y)  # same rows, same order
        # one affine map per client, shared by its train and test rows
        a = (s.train.X[1] - s.train.X[0]) / (p.train.X[1] - p.train.X[0])
        b = s.train.X[0] - a * p.train.X[0]
        np.testing.assert_allclose(s.test.X, p.test.X * a + b, rtol=1e-4, atol=1e-4)
    means = [s.train.X.mean(0) for s in shifted.sites]
    assert np.std(means, axis=0).mean() > 0.5
    # images: contrast / brightness / noise, still in [0, 1]
    imgs = rng.random((90, 1, 8, 8)).astype(np.float32)
    lab = rng.integers(0, 2, 90)
    idata = FederatedData(task=Task(kind="binary", num_classes=2, input_shape=(1, 8, 8)),
                          sites=[Site("a", Split(imgs[:60], lab[:60]), Split(imgs[60:], lab[60:]))])
    out = FeatureShift(n_clients=3, strength=2.0, public_fraction=0.1).partition(idata, seed=0)
    Xs = np.concatenate([s.train.X for s in out.sites])
    assert Xs.min() >= 0 and Xs.max() <= 1
    assert not np.allclose([s.train.X.mean() for s in out.sites], imgs[:60].mean(), atol=0.01)
    assert out.public is not None and np.isin(out.public.X, imgs).all()  # public untransformed


@pytest.mark.parametrize("make, match", [
    (lambda: Natural(public_fraction=1.0), "public_fraction"),
    (lambda: IID(n_clients=0), "n_clients"),
    (lambda: Dirichlet(alpha=0), "alpha"),
    (lambda: Quantity(min_size=0), "min_size"),
    (lambda: FeatureShift(strength=-1), "strength"),
])
def test_bad_parameters_name_themselves(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_partitioners_run_end_to_end(run_matrix):
    code, records = run_matrix("""
        name = "partitioners"
        rounds = 2
        seeds = [0]
        [axes]
        dataset = ["heart-disease"]
        algorithm = ["fedavg"]
        partitioner = [{ name = "natural", public_fraction = 0.2 },
                       { name = "quantity", n_clients = 6 },
                       { name = "feature-shift", n_clients = 3, strength = 0.5 }]
    """)
    assert code == 0, [r.get("error") for r in records]
    per_site = {r["config"]["partitioner"]["name"]: r["metrics"]["utility"]["per_site"]
                for r in records}
    assert set(per_site["natural"]) == {"Cleveland", "Hungary", "Switzerland", "VA Long Beach"}
    assert len(per_site["quantity"]) == 6 and len(per_site["feature-shift"]) == 3


def test_public_split_reaches_the_engine(run_matrix):
    """The engine's transfer-learning option pretrains on FederatedData.public:
    it runs with public_fraction > 0 and is skipped without a public split."""
    code, records = run_matrix("""
        name = "public"
        rounds = 1
        seeds = [0]
        [axes]
        dataset = ["heart-disease"]
        algorithm = ["fedavg"]
        partitioner = [{ name = "natural", public_fraction = 0.2 }, "natural"]
        [run]
        pretrain_steps = 3
    """)
    status = {r["config"]["partitioner"]["public_fraction"]: r["status"] for r in records}
    assert status == {0.2: "ok", 0.0: "skipped"}, [r.get("error") for r in records]
