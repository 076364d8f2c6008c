"""A generator of gene-expression data from several sites with batch effects.

Expression is a low-rank gene-module structure plus noise; each site adds its
own batch effect (a per-gene location and scale shift, the model of ComBat:
Johnson, Li & Rabinovic 2007, "Adjusting batch effects in microarray
expression data using empirical Bayes methods", Biostatistics 8:118-127), and
``n_signal`` genes shift with the class. ``batch_strength`` scales the batch
effect against the biological signal (``effect_size``); ``label_skew`` makes
the class prior differ by site.

Built for scale: float32 throughout, rows generated in chunks, samples laid
out by site (train rows, then test rows), so every split is a view of one
array. 20,000 genes x 10,000 samples is 800 MB and takes a few seconds.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from fedmedbench import Dataset, FederatedData, Range, Seed, Site, Split, Task

CHUNK = 1024


class SyntheticGenomics(Dataset):
    """Synthetic expression with sites, batch effects and signal genes.

    Parameters
    ----------
    n_genes : int, default 2000
    n_samples : int, default 800
        Total over all sites (at most 10,000 x 20,000 genes is the tested scale).
    n_sites : int, default 4
    batch_strength : float, default 1.0
        s.d. of the per-site, per-gene location shift (in units of the noise s.d.).
    n_signal : int, default 50
        Genes whose mean differs between the classes.
    effect_size : float, default 0.5
        Shift of a signal gene between classes (in noise s.d.).
    label_skew : float, default 0.5
        s.d. of the per-site logit of the class prior (0: balanced everywhere).
    n_factors : int, default 10
        Rank of the gene-module (co-expression) structure.
    test_fraction : float, default 0.25
    data_seed : int, default 0
        Seed of the generated data (the run seed does not change the data).
    """

    name = "synthetic-genomics"
    run_defaults = {"batch_size": 32, "lr": 0.01, "local_steps": 10, "clients_per_round": 64}

    def __init__(self, *, n_genes: Annotated[int, Range(ge=1, le=60_000)] = 2000,
                 n_samples: Annotated[int, Range(ge=8, le=100_000)] = 800,
                 n_sites: Annotated[int, Range(ge=1, le=1000)] = 4,
                 batch_strength: Annotated[float, Range(ge=0)] = 1.0,
                 n_signal: Annotated[int, Range(ge=0)] = 50,
                 effect_size: Annotated[float, Range(ge=0)] = 0.5,
                 label_skew: Annotated[float, Range(ge=0)] = 0.5,
                 n_factors: Annotated[int, Range(ge=0, le=1000)] = 10,
                 test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.25,
                 data_seed: Seed = 0) -> None:
        if n_signal > n_genes:
            raise ValueError(f"n_signal ({n_signal}) must be <= n_genes ({n_genes})")
        if n_samples < 8 * n_sites:
            raise ValueError(f"n_samples must be >= 8 * n_sites = {8 * n_sites}, "
                             f"got {n_samples!r}")
        self.n_genes, self.n_samples, self.n_sites = n_genes, n_samples, n_sites
        self.batch_strength, self.n_signal, self.effect_size = batch_strength, n_signal, effect_size
        self.label_skew, self.n_factors = label_skew, n_factors
        self.test_fraction, self.data_seed = test_fraction, data_seed

    def load(self, *, seed: int) -> FederatedData:
        G, N, S = self.n_genes, self.n_samples, self.n_sites
        rng = np.random.default_rng([self.data_seed, 41])
        sizes = np.full(S, N // S) + (np.arange(S) < N % S)
        n_test = np.maximum(1, np.round(sizes * self.test_fraction).astype(int))
        prior = 1 / (1 + np.exp(-rng.normal(0, self.label_skew, S))) if self.label_skew else \
            np.full(S, 0.5)
        site = np.repeat(np.arange(S), sizes)
        y = (rng.random(N) < prior[site]).astype(np.int64)
        # gene structure, batch effects (location + scale), signal
        base = rng.normal(6.0, 2.0, G).astype(np.float32)  # log-expression level per gene
        loadings = (rng.normal(0, 1, (self.n_factors, G)) / np.sqrt(max(self.n_factors, 1))
                    ).astype(np.float32)
        loc = rng.normal(0, self.batch_strength, (S, G)).astype(np.float32)
        scale = np.exp(rng.normal(0, 0.2 * self.batch_strength, (S, G))).astype(np.float32)
        signal = np.zeros(G, dtype=np.float32)
        sig_genes = rng.choice(G, size=self.n_signal, replace=False)
        signal[sig_genes] = self.effect_size * rng.choice([-1.0, 1.0], size=self.n_signal)
        X = np.empty((N, G), dtype=np.float32)
        for c in range(0, N, CHUNK):
            sl = slice(c, min(N, c + CHUNK))
            n = sl.stop - sl.start
            block = rng.standard_normal((n, G), dtype=np.float32)
            if self.n_factors:
                block += rng.standard_normal((n, self.n_factors), dtype=np.float32) @ loadings
            block += y[sl, None].astype(np.float32) * signal
            block *= scale[site[sl]]
            block += loc[site[sl]] + base
            X[sl] = block
        # rows of each site: the first sizes - n_test are training, the rest test
        starts = np.concatenate([[0], np.cumsum(sizes)])
        is_train = np.ones(N, dtype=bool)
        for s in range(S):
            is_train[starts[s + 1] - n_test[s]:starts[s + 1]] = False
        # standardise every gene with the pooled training rows only (chunked, in place)
        tot = np.zeros(G)
        sq = np.zeros(G)
        for c in range(0, N, CHUNK):
            blk = X[c:c + CHUNK][is_train[c:c + CHUNK]].astype(np.float64)
            tot += blk.sum(0)
            sq += (blk * blk).sum(0)
        n_tr = int(is_train.sum())
        mean = tot / n_tr
        std = np.sqrt(np.maximum(sq / n_tr - mean * mean, 0))
        std[std < 1e-8] = 1.0
        mean32, inv32 = mean.astype(np.float32), (1 / std).astype(np.float32)
        for c in range(0, N, CHUNK):
            rows = X[c:c + CHUNK]
            rows -= mean32
            rows *= inv32
        sites = []
        for s in range(S):
            a, b, e = starts[s], starts[s + 1] - n_test[s], starts[s + 1]
            sites.append(Site(f"site{s}", Split(X[a:b], y[a:b]), Split(X[b:e], y[b:e])))
        task = Task(kind="binary", num_classes=2, input_shape=(G,), metric="balanced_accuracy",
                    model="logistic", feature_names=None)
        return FederatedData(task=task, sites=sites, natural=True)

    def describe(self) -> dict:
        return {"title": "synthetic gene-expression generator with batch effects",
                "task": "binary classification from expression (signal genes known)",
                "metric": "balanced_accuracy", "licence": "generated",
                "partition": "natural: generated sites, each with its own batch effect",
                "sites": f"{self.n_sites} sites x {self.n_samples // self.n_sites} samples, "
                         f"{self.n_genes} genes ({self.n_signal} signal), "
                         f"batch_strength {self.batch_strength}"}


COMPONENTS = (SyntheticGenomics,)
