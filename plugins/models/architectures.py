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

import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fedmedbench import Model, Range

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


#: the choices of the MLP's ``norm``, the CNN's ``norm``, ``act`` and ``pool``
NormMLP = Literal["none", "batch", "layer"]
NormCNN = Literal["group", "batch", "none"]
CnnAct = Literal["relu", "sigmoid", "tanh"]
CnnPool = Literal["max", "avg", "none"]
NORMS_MLP: tuple[str, ...] = typing.get_args(NormMLP)
NORMS_CNN: tuple[str, ...] = typing.get_args(NormCNN)
CNN_ACTS: tuple[str, ...] = typing.get_args(CnnAct)
CNN_POOLS: tuple[str, ...] = typing.get_args(CnnPool)

#: the module classes, importable from here as before (loaded with torch on first use)
MODULE_CLASSES = ("Logistic", "BatchNorm1dAnyBatch", "ReferenceLogistic", "MLP", "SmallCNN")


def __getattr__(name: str) -> Any:
    if name in MODULE_CLASSES:
        from fedmedbench.plugins.models import _modules

        return getattr(_modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_cnn(*, width: int, act: str, pool: str, norm: str) -> None:
    """Refuse a :class:`SmallCNN` configuration, naming the option and the choices
    (the module is built from a task's ``model_kwargs``, not checked as a
    component's parameters are)."""
    if act not in CNN_ACTS:
        raise ValueError(f"act = {act!r}; choose one of {CNN_ACTS}")
    if pool not in CNN_POOLS:
        raise ValueError(f"pool = {pool!r}; choose one of {CNN_POOLS}")
    if norm not in NORMS_CNN:
        raise ValueError(f"norm = {norm!r}; choose one of {NORMS_CNN}")
    if not isinstance(width, int) or width < 4 or width % 4:
        raise ValueError(f"width = {width!r}; use a positive multiple of 4 (GroupNorm "
                         f"has 4 groups)")


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
        from fedmedbench.plugins.models._modules import Logistic

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
        from fedmedbench.plugins.models._modules import ReferenceLogistic

        return ReferenceLogistic(_flat(input_shape), num_classes)


class MLPModel(Model):
    """A multilayer perceptron with ReLU hidden layers.

    Parameters
    ----------
    hidden : list of int, default [64]
        Widths of the hidden layers.
    dropout : float, default 0.0
        Dropout after each hidden layer, in [0, 1). The vectorized backend
        draws each client's masks from its own stream on its compiled step
        (under DP-SGD, whose per-example steps are not compiled, the model
        runs on the loop backend).
    norm : {"none", "batch", "layer"}, default "none"
        A normalisation layer after each hidden linear layer: none,
        BatchNorm (running statistics: loop backend only, not
        Opacus-compatible) or LayerNorm.
    """

    name = "mlp"

    def __init__(self, *, hidden: Sequence[int] = (64,),
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
                 norm: NormMLP = "none") -> None:
        widths = list(hidden)
        if not widths or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                 for h in widths):
            raise ValueError(f"mlp: hidden = {widths!r}; give a list of positive integer widths")
        self.hidden, self.dropout, self.norm = widths, float(dropout), norm
        # BatchNorm updates its buffers in place: loop only (dropout's masks are drawn by
        # the compiled vectorized step, each client's from its own stream)
        self.vectorized = norm != "batch"

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        from fedmedbench.plugins.models._modules import MLP

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

    def __init__(self, *, width: Annotated[int, Range(ge=4, le=1024)] = 16,
                 act: CnnAct = "relu", pool: CnnPool = "max", norm: NormCNN = "group") -> None:
        if width % 4:
            raise ValueError(f"cnn: width = {width!r}; use a multiple of 4 (GroupNorm has 4 "
                             f"groups)")
        self.width, self.act, self.pool, self.norm = width, act, pool, norm
        # BatchNorm updates its running statistics (buffers) in place: loop backend only
        self.vectorized = norm != "batch"

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs (channels, height, width) inputs; the task's input "
                             f"shape is {tuple(input_shape)}")
        from fedmedbench.plugins.models._modules import SmallCNN

        return SmallCNN(input_shape[0], num_classes, image_size=input_shape[-1],
                        width=self.width, act=self.act, pool=self.pool, norm=self.norm)


COMPONENTS = (LogisticModel, ReferenceLogisticModel, MLPModel, CNNModel)
