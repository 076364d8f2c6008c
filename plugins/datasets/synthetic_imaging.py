"""Procedurally generated grayscale lesion images with per-site acquisition shifts.

A lesion is a bright blob whose border is a radius function
``r(θ) = r0 (1 + Σ_k a_k cos(kθ + φ_k))``. The class is morphology, as in the
BI-RADS mass descriptors (circumscribed vs spiculated margins; American
College of Radiology, "ACR BI-RADS Atlas", 5th ed., 2013):

- class 0 "circumscribed": round or oval, smooth border (low harmonics only);
- class 1 "spiculated": irregular border with high-frequency spikes;
- class 2 "lobulated" (``num_classes=3``): a few large lobes (k = 3, 4).

Each site has its own acquisition: contrast, intensity offset, Gaussian
blur and noise (``acquisition_shift`` scales them), and its own class prior
(Dirichlet(``label_alpha``), label skew). Images are ``1 × size × size``
float32 in [0, 1]; 2,000 images take a fraction of a second, and their small
size suits gradient-inversion attacks.

The default model is the SmallCNN (``"cnn"``, GroupNorm) with ReLU and
max-pooling; ``model_act = "sigmoid"`` with ``model_pool = "none"`` (stride-2
convolutions) gives the smooth network of the classic gradient-inversion
setting (Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019, attack a
sigmoid LeNet that downsamples by stride, not pooling).
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np

from fedmedbench import Dataset, FederatedData, Range, Seed, Site, Split, Task
from fedmedbench.plugins.datasets._common import split_indices

if TYPE_CHECKING:  # pragma: no cover
    pass

HARMONICS = np.arange(2, 10)
#: the default model's activations and downsamplings: the ``cnn`` model's choices,
#: stated again here because plugin families never import each other
#: (tests/test_datasets.py checks that they stay the same)
ModelAct = Literal["relu", "sigmoid", "tanh"]
ModelPool = Literal["max", "avg", "none"]
MODEL_ACTS: tuple[str, ...] = typing.get_args(ModelAct)
MODEL_POOLS: tuple[str, ...] = typing.get_args(ModelPool)


class SyntheticImaging(Dataset):
    """Synthetic lesion images: class from morphology, per-site acquisition shifts.

    Parameters
    ----------
    n_sites : int, default 4
    n_per_site : int, default 400
        Images per site (train + test).
    num_classes : {2, 3}, default 2
    image_size : int, default 28
        Side in pixels (a multiple of 4, >= 16).
    acquisition_shift : float, default 1.0
        Strength of the per-site contrast, offset, blur and noise differences.
    label_alpha : float, default 2.0
        Dirichlet concentration of each site's class prior (large: balanced).
    test_fraction : float, default 0.25
    data_seed : int, default 0
        Seed of the generated images (the run seed does not change the data).
    model_act : {"relu", "sigmoid", "tanh"}, default "relu"
        Activation of the default SmallCNN.
    model_width : int, default 8
        Channels of the SmallCNN's first block (a multiple of 4).
    model_pool : {"max", "avg", "none"}, default "max"
        How the SmallCNN downsamples: 2×2 max-pooling, 2×2 average pooling, or
        stride-2 convolutions (``"none"``). ``model_act="sigmoid"``,
        ``model_pool="none"`` is the smooth network gradient-inversion attacks
        are evaluated on (matrices/attacks.toml).

    The defaults keep the task's ``model_kwargs`` at ``{"width": 8}``, so
    cells and results from before these parameters existed stay valid.
    """

    name = "synthetic-imaging"
    run_defaults = {"batch_size": 32, "lr": 0.05, "local_steps": 10, "clients_per_round": 64,
                    "eval_every": 5}

    def __init__(self, *, n_sites: Annotated[int, Range(ge=1, le=1000)] = 4,
                 n_per_site: Annotated[int, Range(ge=8, le=100_000)] = 400,
                 num_classes: Annotated[int, Range(ge=2, le=3)] = 2,
                 image_size: Annotated[int, Range(ge=16, le=256)] = 28,
                 acquisition_shift: Annotated[float, Range(ge=0)] = 1.0,
                 label_alpha: Annotated[float, Range(gt=0)] = 2.0,
                 test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.25, data_seed: Seed = 0,
                 model_act: ModelAct = "relu",
                 model_width: Annotated[int, Range(ge=4, le=1024)] = 8,
                 model_pool: ModelPool = "max") -> None:
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size!r}")
        if model_width % 4:
            raise ValueError(f"model_width must be a multiple of 4 (GroupNorm has 4 groups), "
                             f"got {model_width!r}")
        self.model_act, self.model_width, self.model_pool = model_act, model_width, model_pool
        self.n_sites, self.n_per_site, self.num_classes = n_sites, n_per_site, num_classes
        self.image_size, self.acquisition_shift = image_size, acquisition_shift
        self.label_alpha, self.test_fraction, self.data_seed = label_alpha, test_fraction, data_seed

    def render(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clean lesion images (n × size × size, float32 in [0, 1]) for labels ``y``."""
        n, S = len(y), self.image_size
        s = S / 28.0
        g = np.arange(S, dtype=np.float32)
        cx = (S - 1) / 2 + rng.uniform(-3, 3, n) * s
        cy = (S - 1) / 2 + rng.uniform(-3, 3, n) * s
        dx = g[None, None, :] - cx[:, None, None]
        dy = g[None, :, None] - cy[:, None, None]
        dist = np.sqrt(dx * dx + dy * dy)
        theta = np.arctan2(dy, dx)
        amp = np.zeros((n, len(HARMONICS)), dtype=np.float32)
        amp[:, :] = rng.uniform(0, 0.03, amp.shape)  # every border is a little irregular
        amp[:, 0] = rng.uniform(0, 0.2, n)  # k=2: oval
        spic = y == 1
        k_sp = rng.integers(5, 8, n)  # dominant spike frequency 7..9
        amp[spic, k_sp[spic]] = rng.uniform(0.18, 0.3, int(spic.sum()))
        amp[spic, k_sp[spic] - 2] += rng.uniform(0.05, 0.12, int(spic.sum()))
        lob = y == 2
        k_lb = rng.integers(1, 3, n)  # k = 3 or 4
        amp[lob, k_lb[lob]] = rng.uniform(0.2, 0.3, int(lob.sum()))
        phase = rng.uniform(0, 2 * np.pi, amp.shape).astype(np.float32)
        r0 = rng.uniform(5.0, 8.0, n).astype(np.float32) * s
        border = np.ones_like(theta)
        for j, k in enumerate(HARMONICS):
            border += amp[:, j, None, None] * np.cos(k * theta + phase[:, j, None, None])
        border *= r0[:, None, None]
        lesion = 1 / (1 + np.exp(-(border - dist) / 0.6))
        level = rng.uniform(0.5, 0.75, n).astype(np.float32)
        bg = 0.15 + 0.05 * np.cos(dx / (3 * s) * rng.uniform(0.5, 1.5, (n, 1, 1))
                                  + rng.uniform(0, 6.3, (n, 1, 1)))
        return (bg + lesion * level[:, None, None]).astype(np.float32)

    def load(self, *, seed: int) -> FederatedData:
        from scipy.ndimage import gaussian_filter

        rng = np.random.default_rng([self.data_seed, 51])
        C, sh = self.num_classes, self.acquisition_shift
        sites = []
        for s in range(self.n_sites):
            prior = rng.dirichlet(np.full(C, self.label_alpha))
            y = rng.choice(C, size=self.n_per_site, p=prior).astype(np.int64)
            img = self.render(y, rng)
            contrast = float(np.exp(rng.normal(0, 0.25 * sh)))
            offset = float(rng.normal(0, 0.08 * sh))
            blur = float(abs(rng.normal(0, 0.7 * sh)))
            noise = float(0.03 + abs(rng.normal(0, 0.04 * sh)))
            if blur > 0.05:
                img = gaussian_filter(img, sigma=(0, blur, blur))
            img = (img - 0.3) * contrast + 0.3 + offset
            img += rng.normal(0, noise, img.shape).astype(np.float32)
            X = np.clip(img, 0, 1).astype(np.float32)[:, None]
            tr, te = split_indices(y, self.test_fraction, rng)
            sites.append(Site(f"site{s}", Split(X[tr], y[tr]), Split(X[te], y[te])))
        task = Task(kind="binary" if C == 2 else "multiclass", num_classes=C,
                    input_shape=(1, self.image_size, self.image_size),
                    metric="balanced_accuracy", model="cnn", model_kwargs=self.model_kwargs())
        return FederatedData(task=task, sites=sites, natural=True)

    def model_kwargs(self) -> dict:
        """The SmallCNN's keyword arguments; only non-default choices are added,
        so the default task is unchanged (``{"width": 8}``)."""
        kw: dict = {"width": self.model_width}
        if self.model_act != "relu":
            kw["act"] = self.model_act
        if self.model_pool != "max":
            kw["pool"] = self.model_pool
        return kw

    def describe(self) -> dict:
        return {"title": "synthetic lesion images (procedural, per-site acquisition shifts)",
                "task": f"{self.num_classes}-class lesion morphology (circumscribed / spiculated"
                        f"{' / lobulated' if self.num_classes == 3 else ''})",
                "metric": "balanced_accuracy", "licence": "generated",
                "partition": "natural: generated sites, each with its own acquisition and "
                             "class prior",
                "sites": f"{self.n_sites} sites x {self.n_per_site} images "
                         f"(1x{self.image_size}x{self.image_size})",
                "model": f"SmallCNN (GroupNorm) width {self.model_width}, {self.model_act}, "
                         f"pool {self.model_pool}"}


COMPONENTS = (SyntheticImaging,)
