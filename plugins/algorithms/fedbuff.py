"""FedBuff: buffered asynchronous aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning
with Buffered Asynchronous Aggregation". AISTATS 2022.

The server keeps ``concurrency`` clients training at once; each starts from
the model current when it was sent, and its update joins a buffer when it
arrives. When ``buffer_size`` updates are buffered the server applies their
mean, each scaled by ``1 / sqrt(1 + staleness)`` (the paper's staleness
weight; staleness: server updates since the client's model was sent), with
the server learning rate: ``w ← w + η_g Σ_k p_k s(τ_k) Δ_k`` (``p_k`` the
aggregator's weights). Slow clients no longer hold a round: the server
moves on with whoever arrived. The ``buffered`` protocol
(:mod:`fedmedbench.protocols`) runs it on the virtual clock
(:mod:`fedmedbench.clock`), whose event order decides who reaches which
buffer.

Privacy (the paper's section 5, as fedmedbench runs it):

- **secure aggregation over the buffer**: with ``secagg`` (or
  ``secagg-plus``) in the stack the protocol runs among each buffer's
  clients, so the server reads only the buffer's weighted sum. The paper
  does this in a trusted execution environment (Papaya, Huba et al. 2022),
  since a buffer's clients are never online together; the simulation runs
  the masking protocol among them at the buffer's end, which shows the
  server the same thing (and charges the measured cryptographic seconds to
  the server);
- **client-level DP per buffer** (``dp-fedavg``): each update is clipped
  and each buffer's sum noised, one release per server update. The ε
  against the server under secure aggregation composes each client's actual
  buffers at q = 1 and holds; a claim that amplifies by client sampling
  (the released model's) assumes a Poisson sample, which asynchronous
  arrival is not: the record's ``metrics.clock.privacy_note`` says so.

With ``buffer_size = concurrency =`` the number of clients, every client
trains from the same model and arrives before the server updates, with
staleness 0: FedBuff is then FedAvg with every client in every round, to
the bit (tests/test_clock.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from fedmedbench import Range
from fedmedbench.plugins.algorithms.fedavg import FedAvg

if TYPE_CHECKING:  # pragma: no cover
    from fedmedbench import CellFacts


class FedBuff(FedAvg):
    """Buffered asynchronous aggregation (Nguyen et al. 2022).

    Parameters
    ----------
    buffer_size : int, default 0
        K, the updates per server update; 0 means half the concurrency
        (rounded up).
    concurrency : int, default 0
        M, the clients training at once; 0 means the cell's clients per
        round (the cohort of a synchronous round).
    max_staleness : int, default 0
        Updates staler than this are discarded on arrival; 0 keeps all.
    """

    name = "fedbuff"
    protocol = "buffered"
    vectorized = True

    def __init__(self, *, buffer_size: Annotated[int, Range(ge=0)] = 0,
                 concurrency: Annotated[int, Range(ge=0)] = 0,
                 max_staleness: Annotated[int, Range(ge=0)] = 0) -> None:
        self.buffer_size = buffer_size
        self.concurrency = concurrency
        self.max_staleness = max_staleness

    def validate(self, facts: CellFacts) -> str | None:
        if self.buffer_size and self.concurrency and self.buffer_size > self.concurrency:
            return (f"buffer_size {self.buffer_size} > concurrency {self.concurrency}: the "
                    f"buffer would wait for more clients than ever train at once")
        return None

    def plan(self, num_clients: int, per_round: int) -> tuple[int, int, int]:
        """(buffer size, concurrency, maximum staleness) for ``num_clients``
        clients and the cell's ``per_round``."""
        M = min(num_clients, self.concurrency or per_round)
        K = min(M, self.buffer_size or max(1, math.ceil(M / 2)))
        return K, M, self.max_staleness

    def staleness_weight(self, staleness: int) -> float:
        """The paper's ``1 / sqrt(1 + staleness)``."""
        return 1.0 / math.sqrt(1.0 + staleness) if staleness else 1.0


COMPONENTS = (FedBuff,)
