"""The ``nn.Module`` classes behind the built-in architectures of
:mod:`fedmedbench.plugins.models.architectures`, which imports this module
(and torch) only when it builds a model.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmedbench.plugins.models.architectures import CNN_ACTS, CNN_POOLS, NORMS_MLP, check_cnn


class Logistic(nn.Module):
    """Multinomial logistic regression (one linear layer on flattened input)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class BatchNorm1dAnyBatch(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that accepts a training batch of one example (a
    client's last batch of an epoch can hold one row), which it normalises
    with the running statistics and leaves them unchanged; otherwise identical."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1 and self.track_running_stats:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var,
                                            self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)

class ReferenceLogistic(nn.Module):
    """Multinomial logistic regression with class 0 as the reference: logits
    ``[0, z_1, ..., z_{C-1}]`` with ``z = W·x + b`` (``C - 1`` outputs).

    For two classes this is one logit and a sigmoid: softmax over ``[0, z]``
    is ``(1 - sigmoid(z), sigmoid(z))``, so the engine's cross-entropy on
    these logits equals BCE on ``sigmoid(z)`` and argmax predicts 1 exactly
    when ``sigmoid(z) > 0.5``: FLamby's Fed-Heart-Disease ``Baseline``
    (``Linear(d, 1)`` + sigmoid, ``BCELoss``), initialised identically
    (PyTorch's ``Linear`` init, weight then bias).
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x.flatten(1))
        return torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)


class MLP(nn.Module):
    """A multilayer perceptron with ReLU hidden layers (``norm``: a
    normalisation layer after each hidden linear layer, before the ReLU)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,),
                 dropout: float = 0.0, norm: str = "none") -> None:
        super().__init__()
        if norm not in NORMS_MLP:
            raise ValueError(f"norm = {norm!r}; choose one of {NORMS_MLP}")
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers.append(nn.Linear(prev, h))
            if norm == "batch":
                layers.append(BatchNorm1dAnyBatch(h))
            elif norm == "layer":
                layers.append(nn.LayerNorm(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            prev = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.flatten(1)))


class SmallCNN(nn.Module):
    """Two conv blocks with GroupNorm (Opacus-compatible), then a linear head.

    Parameters
    ----------
    in_channels, num_classes : int
    image_size : int, default 28
        Side of the square input (a multiple of 4).
    width : int, default 16
        Channels of the first block (the second has ``2 * width``); a
        multiple of 4 (GroupNorm uses 4 groups).
    act : {"relu", "sigmoid", "tanh"}, default "relu"
        ``"sigmoid"`` gives the smooth network that gradient-inversion papers
        attack (Zhu et al. 2019).
    pool : {"max", "avg", "none"}, default "max"
        How each block halves the side: 2×2 max-pooling, 2×2 average pooling,
        or (``"none"``) a stride-2 convolution without pooling, as in the
        LeNet variant of Zhu et al. 2019. All three have the same head size.
    norm : {"group", "batch", "none"}, default "group"
        The normalisation after each convolution: GroupNorm with 4 groups,
        BatchNorm (running statistics; not Opacus-compatible), or none.
    """

    ACTS = CNN_ACTS
    POOLS = CNN_POOLS

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28,
                 width: int = 16, act: str = "relu", pool: str = "max",
                 norm: str = "group") -> None:
        super().__init__()
        check_cnn(width=width, act=act, pool=pool, norm=norm)
        a: type[nn.Module] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[act]
        stride = 2 if pool == "none" else 1

        def down() -> list[nn.Module]:
            pools: dict[str, list[nn.Module]] = {"max": [nn.MaxPool2d(2)],
                                                 "avg": [nn.AvgPool2d(2)], "none": []}
            return pools[pool]

        def normed(c: int) -> list[nn.Module]:
            norms: dict[str, list[nn.Module]] = {"group": [nn.GroupNorm(4, c)],
                                                 "batch": [nn.BatchNorm2d(c)], "none": []}
            return norms[norm]

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stride, padding=1), *normed(width),
            a(), *down(),
            nn.Conv2d(width, 2 * width, 3, stride=stride, padding=1),
            *normed(2 * width), a(), *down(),
        )
        side = image_size // 4
        self.fc = nn.Linear(2 * width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))
