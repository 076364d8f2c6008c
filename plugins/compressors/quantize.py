"""Stochastic uniform quantisation of client updates.

Each value ``x`` of the update is mapped onto ``2**bits`` evenly spaced levels
between the vector's minimum and maximum and rounded up or down at random
with the probabilities that make the decode unbiased, ``E[Q(x)] = x``: the
stochastic k-level quantisation with per-vector min/max of Suresh, Yu, Kumar,
McMahan, "Distributed Mean Estimation with Limited Communication", ICML 2017,
in the family of QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS
2017). The per-coordinate variance is at most ``step**2 / 4`` with
``step = (max - min) / (2**bits - 1)``.

What crosses the network is ``ceil(n * bits / 8)`` bytes of packed level
indices plus a header of two float32 values (minimum and step), 8 bytes; the
server uses the decoded vector. The rounding draws come from
``ctx.rng("quantize", round, client)``, so a cell is deterministic for a seed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

import numpy as np

from fedmedbench import CellContext, Compressor, Range, Updates

if TYPE_CHECKING:  # pragma: no cover
    pass

#: header floats sent with every vector: the minimum and the step (float32 each)
HEADER_BYTES = 2 * 4


def quantize(x: np.ndarray, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Stochastically quantise ``x`` to ``bits`` per value.

    Returns the integer levels in ``[0, 2**bits - 1]`` and the header
    ``(minimum, step)``; :func:`dequantize` inverts it.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    top = 2**bits - 1
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    # the header travels as float32: quantise against the values the server will
    # read, with the grid rounded outwards so that [lo, lo + top * step] covers x
    lo32 = np.float32(lo)
    if float(lo32) > lo:
        lo32 = np.nextafter(lo32, np.float32(-np.inf))
    lo = float(lo32)
    if not x.size or hi <= lo:
        return np.zeros(x.size, dtype=np.int64), lo, 0.0
    step32 = np.float32((hi - lo) / top)
    while lo + top * float(step32) < hi:
        step32 = np.nextafter(step32, np.float32(np.inf))
    step = float(step32)
    scaled = np.clip((x - lo) / step, 0.0, top)
    floor = np.floor(scaled)
    levels = floor + (rng.random(x.size) < scaled - floor)
    return np.minimum(levels, top).astype(np.int64), lo, step


def dequantize(levels: np.ndarray, lo: float, step: float) -> np.ndarray:
    """The decoded vector ``lo + levels * step`` (float64)."""
    return lo + levels.astype(np.float64) * step


class Quantize(Compressor):
    """Stochastic uniform quantisation to ``bits`` per value, unbiased (Suresh et al. 2017, QSGD).

    Parameters
    ----------
    bits : int, default 8
        Bits per value, 1 to 16 (``2**bits`` levels between the update's
        minimum and maximum). Bytes sent per update: ``ceil(n * bits / 8) + 8``.
    """

    name = "quantize"

    def __init__(self, *, bits: Annotated[int, Range(ge=1, le=16)] = 8) -> None:
        self.bits = bits

    def nbytes(self, n: int) -> int:
        """Encoded size of an ``n``-value update in bytes."""
        return math.ceil(n * self.bits / 8) + HEADER_BYTES

    def compress(self, ctx: CellContext, updates: Updates) -> Updates:
        import torch

        rows = []
        for client, delta in zip(updates.clients, updates.delta):
            rng = ctx.rng("quantize", ctx.round, client)
            levels, lo, step = quantize(delta.detach().cpu().numpy(), self.bits, rng)
            rows.append(torch.from_numpy(dequantize(levels, lo, step)).to(torch.float32))
        d = int(updates.delta.shape[1])
        return updates.replace(delta=torch.stack(rows), delta_bytes=[self.nbytes(d)] * len(rows))


COMPONENTS = (Quantize,)
