"""Default model architectures that datasets name in :class:`fedmedbench.Task`.

All are Opacus-compatible (no BatchNorm: the CNN uses GroupNorm), small
enough to train on CPU, and built deterministically from the torch seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedmedbench.errors import ConfigError


class Logistic(nn.Module):
    """Multinomial logistic regression (one linear layer on flattened input)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


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


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logistic": lambda input_shape, num_classes, **kw: Logistic(_flat(input_shape), num_classes),
    "mlp": lambda input_shape, num_classes, **kw: MLP(_flat(input_shape), num_classes, **kw),
    "cnn": lambda input_shape, num_classes, **kw: SmallCNN(
        input_shape[0], num_classes, image_size=input_shape[-1], **kw),
}


def _flat(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                **kwargs: Any) -> nn.Module:
    """Build a registered architecture by name."""
    if name not in MODELS:
        raise ConfigError(f"no model {name!r}; known models: {', '.join(MODELS)}")
    if "hidden" in kwargs:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)


def get_flat_params(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one detached float32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy ``flat`` into the model's parameters in place."""
    off = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[off:off + n].view_as(p))
            off += n
    if off != flat.numel():
        raise ValueError(f"parameter vector has {flat.numel()} values, model has {off}")
