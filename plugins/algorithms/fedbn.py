"""FedBN: federated learning on non-IID features via local batch normalisation.
Each client keeps its normalisation layers — their affine parameters and
their running statistics — and sends everything else, which the server
averages as FedAvg does.

Li, Jiang, Zhang, Kamp, Dou. "FedBN: Federated Learning on Non-IID Features
via Local Batch Normalization". ICLR 2021 (Algorithm 1).

Written for feature shift (different scanners, protocols or labs): a site's
normalisation absorbs its own intensity and contrast. The paper keeps
BatchNorm layers local; here every normalisation layer is (BatchNorm,
InstanceNorm, GroupNorm, LayerNorm), so FedBN also personalises the default
GroupNorm CNN. On a model without normalisation layers nothing is kept and
FedBN is FedAvg bit for bit (tests/test_personalization.py).

What a client sends is the delta of the non-normalisation parameters only
(:class:`fedmedbench.components.Sharing`): bytes, the server's view and
every update- and transport-stage mechanism see exactly that part, and
BatchNorm running statistics never leave the client. Each site is scored with
its own model: the global non-normalisation parameters and its own
normalisation layers. FedBN has no global model (the server has no
normalisation layers to score it with).
"""

from __future__ import annotations

import numpy as np

from fedmedbench import CellContext
from fedmedbench.plugins.algorithms._personal import norm_mask
from fedmedbench.plugins.algorithms.fedavg import FedAvg


class FedBN(FedAvg):
    """Local normalisation layers, everything else averaged (Li et al. 2021).

    No parameters: local steps, learning rates and the server step
    (``server_lr``) are the run settings, as for FedAvg.
    """

    name = "fedbn"
    protocol = "personalized"
    shares = "part"

    def __init__(self) -> None:
        pass

    def shared_mask(self, ctx: CellContext) -> np.ndarray:
        return ~norm_mask(ctx)


COMPONENTS = (FedBN,)
