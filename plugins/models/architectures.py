"""Built-in model architectures (the ``models`` family); datasets name them in
:class:`fedmedbench.Task`, a matrix may pick another with its ``model`` axis.

All are small enough to train on CPU and built deterministically from the
torch seed. By default they are Opacus-compatible (no BatchNorm: the CNN uses
GroupNorm). The ``norm`` option of the MLP and the CNN adds or changes the
normalisation layers (FedBN keeps them local): ``"batch"`` is BatchNorm (Ioffe
& Szegedy 2015), what FedBN was written for. BatchNorm mixes the examples of a
batch and keeps running statistics of the records it saw as *buffers*, updated
in place while training, so a BatchNorm model is not Opacus-compatible (DP-SGD
cells are refused) and runs on the loop backend only (``vectorized = False``;
the record's ``backend.reason`` names it); the round protocols decide whose
running statistics each model is scored with (:mod:`fedmedbench.protocols`).
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


NORMS_MLP = ("none", "batch", "layer")
NORMS_CNN = ("group", "batch", "none")


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

    ACTS = ("relu", "sigmoid", "tanh")
    POOLS = ("max", "avg", "none")

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28,
                 width: int = 16, act: str = "relu", pool: str = "max",
                 norm: str = "group") -> None:
        super().__init__()
        if act not in self.ACTS:
            raise ValueError(f"act = {act!r}; choose one of {self.ACTS}")
        if pool not in self.POOLS:
            raise ValueError(f"pool = {pool!r}; choose one of {self.POOLS}")
        if norm not in NORMS_CNN:
            raise ValueError(f"norm = {norm!r}; choose one of {NORMS_CNN}")
        if not isinstance(width, int) or width < 4 or width % 4:
            raise ValueError(f"width = {width!r}; use a positive multiple of 4 (GroupNorm "
                             f"has 4 groups)")
        a: type[nn.Module] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[act]
        stride = 2 if pool == "none" else 1

        def down() -> list[nn.Module]:
            return {"max": [nn.MaxPool2d(2)], "avg": [nn.AvgPool2d(2)], "none": []}[pool]

        def normed(c: int) -> list[nn.Module]:
            return {"group": [nn.GroupNorm(4, c)], "batch": [nn.BatchNorm2d(c)],
                    "none": []}[norm]

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
    norm : {"none", "batch", "layer"}, default "none"
        A normalisation layer after each hidden linear layer: none,
        BatchNorm (running statistics: loop backend only, not
        Opacus-compatible) or LayerNorm.
    """

    name = "mlp"

    def __init__(self, *, hidden: list = (64,),  # noqa: B006
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
                 norm: str = "none") -> None:
        hidden = list(hidden)
        if not hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                 for h in hidden):
            raise ValueError(f"mlp: hidden = {hidden!r}; give a list of positive integer widths")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"mlp: dropout = {dropout!r}; it must be in [0, 1)")
        if norm not in NORMS_MLP:
            raise ValueError(f"mlp: norm = {norm!r}; choose one of {', '.join(NORMS_MLP)}")
        self.hidden, self.dropout, self.norm = hidden, float(dropout), norm
        # dropout draws at random and BatchNorm updates its buffers in place: loop only
        self.vectorized = self.dropout == 0 and norm != "batch"

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return MLP(_flat(input_shape), num_classes, hidden=tuple(self.hidden),
                   dropout=self.dropout, norm=self.norm)


class CNNModel(Model):
    """Two conv blocks with GroupNorm, then a linear head (see :class:`SmallCNN`).

    Parameters
    ----------
    width : int, default 16
        Channels of the first block (a multiple of 4).
    act : {"relu", "sigmoid", "tanh"}, default "relu"
    pool : {"max", "avg", "none"}, default "max"
    norm : {"group", "batch", "none"}, default "group"
        Normalisation after each convolution; ``"batch"`` (BatchNorm, as in
        FedBN) runs on the loop backend only and is not Opacus-compatible.
    """

    name = "cnn"

    def __init__(self, *, width: Annotated[int, Range(ge=4, le=1024)] = 16, act: str = "relu",
                 pool: str = "max", norm: str = "group") -> None:
        SmallCNN(1, 2, image_size=4, width=width, act=act, pool=pool, norm=norm)  # validates
        self.width, self.act, self.pool, self.norm = width, act, pool, norm
        # BatchNorm updates its running statistics (buffers) in place: loop backend only
        self.vectorized = norm != "batch"

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs (channels, height, width) inputs; the task's input "
                             f"shape is {tuple(input_shape)}")
        return SmallCNN(input_shape[0], num_classes, image_size=input_shape[-1],
                        width=self.width, act=self.act, pool=self.pool, norm=self.norm)


COMPONENTS = (LogisticModel, ReferenceLogisticModel, MLPModel, CNNModel)
