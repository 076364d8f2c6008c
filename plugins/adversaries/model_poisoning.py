"""Model-poisoning adversaries: malicious clients change the update they send.

The malicious clients (a ``fraction`` of all clients, chosen once per cell
with the cell seed by the engine) train honestly on their own data and then
replace the update they send:

- ``sign-flip``: ``-scale * u`` (the "reversed gradient" / sign-flipping
  attack of Damaskinos, El Mhamdi, Guerraoui, Patra, Taziki, "Asynchronous
  Byzantine Machine Learning (the case of SGD)", ICML 2018, and Li, Xu, Chen,
  Giannakis, Ling, "RSA: Byzantine-Robust Stochastic Aggregation Methods for
  Distributed Learning from Heterogeneous Datasets", AAAI 2019, whose
  sign-flipping attack sends ``-4`` times the honest message; Fang, Cao, Jia,
  Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated
  Learning", USENIX Security 2020, study it against Krum and the median);
- ``scaling``: ``factor * u``, the boosting step of model replacement
  (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated
  Learning", AISTATS 2020, scale by ``n / eta`` so that their model survives
  averaging); here what is boosted is the client's own honest update (there
  is no backdoor task), so the attack measures how far a few clients can
  dominate the aggregate;
- ``gaussian``: the update is replaced by ``N(0, sigma^2 I)`` noise (the
  Gaussian Byzantine client of Blanchard, El Mhamdi, Guerraoui, Stainer,
  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017).

Randomness comes from the generator the engine hands ``corrupt_update``
(derived from the cell seed, the round and the client), so attacks are
deterministic for a seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import numpy as np

from fedmedbench import Adversary, CellContext, Range, Updates
from fedmedbench.plugins.adversaries._common import check_fraction, check_positive, with_delta

if TYPE_CHECKING:  # pragma: no cover
    pass


class SignFlip(Adversary):
    """Malicious clients send ``-scale`` times their honest update.

    Parameters
    ----------
    fraction : float, default 0.2
        Share of clients that are malicious, in [0, 1); the engine makes
        ``round(fraction * n_clients)`` of them malicious, chosen with the
        cell seed.
    scale : float, default 4.0
        Magnitude of the reversed update (> 0); 4 is the sign-flipping attack
        of Li et al. (2019), 1 a plain reversed gradient.
    """

    name = "sign-flip"

    def __init__(self, *, fraction: Annotated[float, Range(ge=0, lt=1)] = 0.2,
                 scale: Annotated[float, Range(gt=0)] = 4.0) -> None:
        super().__init__(fraction=check_fraction(self.name, fraction))
        self.scale = check_positive(self.name, "scale", scale)

    def corrupt_update(self, ctx: CellContext, update: Updates,
                       rng: np.random.Generator) -> Updates:
        return with_delta(update, -self.scale * update.delta)


class Scaling(Adversary):
    """Malicious clients boost their update by ``factor`` (model replacement).

    Parameters
    ----------
    fraction : float, default 0.2
        Share of clients that are malicious, in [0, 1).
    factor : float, default 10.0
        Boost applied to the update (> 0). Bagdasaryan et al. (2020) use
        ``n_clients / server_lr`` so that one client replaces the global model.
    """

    name = "scaling"

    def __init__(self, *, fraction: Annotated[float, Range(ge=0, lt=1)] = 0.2,
                 factor: Annotated[float, Range(gt=0)] = 10.0) -> None:
        super().__init__(fraction=check_fraction(self.name, fraction))
        self.factor = check_positive(self.name, "factor", factor)

    def corrupt_update(self, ctx: CellContext, update: Updates,
                       rng: np.random.Generator) -> Updates:
        return with_delta(update, self.factor * update.delta)


class Gaussian(Adversary):
    """Malicious clients send Gaussian noise ``N(0, sigma^2 I)`` instead of an update.

    Parameters
    ----------
    fraction : float, default 0.2
        Share of clients that are malicious, in [0, 1).
    sigma : float, default 1.0
        Standard deviation of every coordinate of the sent vector (> 0).
    """

    name = "gaussian"

    def __init__(self, *, fraction: Annotated[float, Range(ge=0, lt=1)] = 0.2,
                 sigma: Annotated[float, Range(gt=0)] = 1.0) -> None:
        super().__init__(fraction=check_fraction(self.name, fraction))
        self.sigma = check_positive(self.name, "sigma", sigma)

    def corrupt_update(self, ctx: CellContext, update: Updates,
                       rng: np.random.Generator) -> Updates:
        import torch

        noise = rng.normal(0.0, self.sigma, size=update.delta.numel())
        return with_delta(update, torch.from_numpy(noise).reshape(update.delta.shape))


COMPONENTS = (SignFlip, Scaling, Gaussian)
