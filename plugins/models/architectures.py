"""Built-in model architectures (the ``models`` family); datasets name them in
:class:`fedmedbench.Task`, a matrix may pick another with its ``model`` axis.

All are Opacus-compatible (no BatchNorm: the CNN uses GroupNorm), small
enough to train on CPU, and built deterministically from the torch seed.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from fedmedbench import Model, Range


class Logistic(nn.Module):
    """Multinomial logistic regression (one linear layer on flattened input)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


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
    """A multilayer perceptron with ReLU hidden layers."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
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
    """

    ACTS = ("relu", "sigmoid", "tanh")
    POOLS = ("max", "avg", "none")

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28,
                 width: int = 16, act: str = "relu", pool: str = "max") -> None:
        super().__init__()
        if act not in self.ACTS:
            raise ValueError(f"act = {act!r}; choose one of {self.ACTS}")
        if pool not in self.POOLS:
            raise ValueError(f"pool = {pool!r}; choose one of {self.POOLS}")
        if not isinstance(width, int) or width < 4 or width % 4:
            raise ValueError(f"width = {width!r}; use a positive multiple of 4 (GroupNorm "
                             f"has 4 groups)")
        a: type[nn.Module] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[act]
        stride = 2 if pool == "none" else 1

        def down() -> list[nn.Module]:
            return {"max": [nn.MaxPool2d(2)], "avg": [nn.AvgPool2d(2)], "none": []}[pool]

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stride, padding=1), nn.GroupNorm(4, width),
            a(), *down(),
            nn.Conv2d(width, 2 * width, 3, stride=stride, padding=1),
            nn.GroupNorm(4, 2 * width), a(), *down(),
        )
        side = image_size // 4
        self.fc = nn.Linear(2 * width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _flat(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------
# the registered components
# --------------------------------------------------------------------------


class LogisticModel(Model):
    """Multinomial logistic regression: one linear layer on the flattened input."""

    name = "logistic"

    def __init__(self) -> None:
        pass

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return Logistic(_flat(input_shape), num_classes)


class ReferenceLogisticModel(Model):
    """Logistic regression with class 0 as reference (``C - 1`` outputs; for two
    classes one logit and a sigmoid, FLamby's Fed-Heart-Disease model; see
    :class:`ReferenceLogistic`)."""

    name = "logistic-ref"

    def __init__(self) -> None:
        pass

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if num_classes < 2:
            raise ValueError(f"logistic-ref needs at least two classes; the task has "
                             f"{num_classes}")
        return ReferenceLogistic(_flat(input_shape), num_classes)


class MLPModel(Model):
    """A multilayer perceptron with ReLU hidden layers.

    Parameters
    ----------
    hidden : list of int, default [64]
        Widths of the hidden layers.
    dropout : float, default 0.0
        Dropout after each hidden layer, in [0, 1) (with dropout the model
        runs only on the loop backend).
    """

    name = "mlp"

    def __init__(self, *, hidden: list = (64,),  # noqa: B006
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> None:
        hidden = list(hidden)
        if not hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                 for h in hidden):
            raise ValueError(f"mlp: hidden = {hidden!r}; give a list of positive integer widths")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"mlp: dropout = {dropout!r}; it must be in [0, 1)")
        self.hidden, self.dropout = hidden, float(dropout)
        self.vectorized = self.dropout == 0

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return MLP(_flat(input_shape), num_classes, hidden=tuple(self.hidden),
                   dropout=self.dropout)


class CNNModel(Model):
    """Two conv blocks with GroupNorm, then a linear head (see :class:`SmallCNN`).

    Parameters
    ----------
    width : int, default 16
        Channels of the first block (a multiple of 4).
    act : {"relu", "sigmoid", "tanh"}, default "relu"
    pool : {"max", "avg", "none"}, default "max"
    """

    name = "cnn"

    def __init__(self, *, width: Annotated[int, Range(ge=4, le=1024)] = 16, act: str = "relu",
                 pool: str = "max") -> None:
        SmallCNN(1, 2, image_size=4, width=width, act=act, pool=pool)  # validates
        self.width, self.act, self.pool = width, act, pool

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs (channels, height, width) inputs; the task's input "
                             f"shape is {tuple(input_shape)}")
        return SmallCNN(input_shape[0], num_classes, image_size=input_shape[-1],
                        width=self.width, act=self.act, pool=self.pool)


COMPONENTS = (LogisticModel, ReferenceLogisticModel, MLPModel, CNNModel)
