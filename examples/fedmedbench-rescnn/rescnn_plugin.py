"""A residual CNN as a third-party fedmedbench model plugin.

He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition". CVPR 2016.

A stem convolution, ``blocks`` residual blocks (two 3×3 convolutions with
GroupNorm, the block's input added back: ``h + f(h)``), 2×2 max-pooling after
the first block, global average pooling and a linear head. GroupNorm instead
of BatchNorm keeps it free of running statistics, so every backend and
Opacus can train it.

On fedmedbench's vectorized backend the model runs on the **compiled step**
(the record's ``backend.kernel`` is ``"compiled"``): every layer here,
the ``+`` skip included, has an analytic backward pass there. With
``act = "silu"`` the blocks use ``SiLU``, which the compiled step does not
have yet: the cell then runs the slower vmap step and its record says which
layer prevented it (``"vmap (not compiled: SiLU (layer 'blocks.0.act1'))"``).

Use it without installing anything::

    PYTHONPATH=examples/fedmedbench-rescnn FEDMEDBENCH_PLUGINS=rescnn_plugin \\
        fedmedbench run examples/fedmedbench-rescnn/matrix.toml --out results/rescnn

or ``pip install ./examples/fedmedbench-rescnn`` (the entry point registers it).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from fedmedbench import Model, Range, hookimpl

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Block(nn.Module):
    """conv-GN-act-conv-GN, plus the block's input (the skip); then act."""

    def __init__(self, c: int, act: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, c)
        self.act1 = ACTS[act]()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, c)
        self.act2 = ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.norm1(self.conv1(x)))
        return self.act2(x + self.norm2(self.conv2(h)))


class ResCNN(nn.Module):
    """Stem, residual blocks (max-pooling after the first), global average
    pooling, linear head."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 16,
                 blocks: int = 2, act: str = "relu") -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.stem_norm = nn.GroupNorm(4, width)
        self.blocks = nn.ModuleList([Block(width, act) for _ in range(blocks)])
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem_norm(self.stem(x)))
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == 0:
                h = self.pool(h)
        return self.head(torch.flatten(self.gap(h), 1))


class ResCNNModel(Model):
    """A small residual CNN (He et al. 2016) with GroupNorm.

    Parameters
    ----------
    width : int, default 16
        Channels of every block (a multiple of 4: GroupNorm has 4 groups).
    blocks : int, default 2
        Residual blocks.
    act : {"relu", "gelu", "silu"}, default "relu"
        The blocks' activation; ``"silu"`` is not (yet) on the vectorized
        backend's compiled step (the record names the layer).
    """

    name = "rescnn"

    def __init__(self, *, width: Annotated[int, Range(ge=4, le=256)] = 16,
                 blocks: Annotated[int, Range(ge=1, le=8)] = 2,
                 act: str = "relu") -> None:
        if width % 4:
            raise ValueError(f"width = {width!r}: a multiple of 4 (GroupNorm has 4 groups)")
        if act not in ACTS:
            raise ValueError(f"act = {act!r}; choose one of {tuple(ACTS)}")
        self.width, self.blocks, self.act = width, blocks, act

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"rescnn needs (channels, height, width) inputs; the task's "
                             f"input shape is {tuple(input_shape)}")
        return ResCNN(int(input_shape[0]), num_classes, width=self.width, blocks=self.blocks,
                      act=self.act)


@hookimpl
def register_models(register):
    register(ResCNNModel)
