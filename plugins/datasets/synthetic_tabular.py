"""A small synthetic tabular generator with N sites and a heterogeneity knob.

Each site draws features around its own mean (covariate shift), has its own
label prior and a perturbed decision boundary (concept shift), all scaled by
``heterogeneity`` (0 gives IID sites). Labels come from a known logistic
model, so the Bayes-optimal accuracy is high and differences between methods
come from the federation, not from the data.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from fedmedbench import Dataset, FederatedData, Range, Seed, Site, Split, Task


class SyntheticTabular(Dataset):
    """Synthetic tabular binary task: N sites, tunable heterogeneity."""

    name = "synthetic-tabular"
    run_defaults = {"batch_size": 32, "lr": 0.1, "local_steps": 10}

    def __init__(self, *, n_sites: Annotated[int, Range(ge=1, le=1000)] = 4,
                 n_samples: Annotated[int, Range(ge=4, le=1_000_000)] = 2000,
                 n_features: Annotated[int, Range(ge=1, le=10_000)] = 10,
                 heterogeneity: Annotated[float, Range(ge=0)] = 0.5,
                 test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.25,
                 data_seed: Seed = 0) -> None:
        if n_samples < 4 * n_sites:
            raise ValueError(f"n_samples must be >= 4 * n_sites = {4 * n_sites}, "
                             f"got {n_samples!r}")
        self.n_sites, self.n_samples, self.n_features = n_sites, n_samples, n_features
        self.heterogeneity, self.test_fraction, self.data_seed = heterogeneity, test_fraction, data_seed

    def load(self, *, seed: int) -> FederatedData:
        rng = np.random.default_rng(self.data_seed)
        h, d = self.heterogeneity, self.n_features
        w = rng.normal(size=d)
        sizes = rng.multinomial(self.n_samples - 4 * self.n_sites,
                                rng.dirichlet(np.full(self.n_sites, 1.0 / max(h, 0.05) + 1))) + 4
        sites = []
        for s in range(self.n_sites):
            mu = rng.normal(scale=h, size=d)
            ws = w + rng.normal(scale=0.5 * h, size=d)
            bias = rng.normal(scale=h)
            X = rng.normal(size=(sizes[s], d)) + mu
            logits = X @ ws / np.sqrt(d) * 3 + bias
            y = (rng.random(sizes[s]) < 1 / (1 + np.exp(-logits))).astype(np.int64)
            n_test = max(1, int(round(self.test_fraction * sizes[s])))
            perm = rng.permutation(sizes[s])
            te, tr = perm[:n_test], perm[n_test:]
            Xf = X.astype(np.float32)
            sites.append(Site(f"site{s}", Split(Xf[tr], y[tr]), Split(Xf[te], y[te])))
        task = Task(kind="binary", num_classes=2, input_shape=(d,), metric="accuracy",
                    model="logistic")
        return FederatedData(task=task, sites=sites, natural=True)

    def describe(self) -> dict:
        data = self.load(seed=0)
        return {"title": "synthetic tabular generator", "task": "binary classification",
                "metric": "accuracy", "licence": "generated",
                "sites": {s.name: len(s.train) + len(s.test) for s in data.sites}}


COMPONENTS = (SyntheticTabular,)
