"""Ditto: fair and robust federated learning through personalization. The
clients train a global model by FedAvg and, beside it, a personal model each,
regularised towards the global model the round started from.

Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
Personalization". ICML 2021 (Algorithm 1).

Round t of a sampled client k with global model w^t and personal model v_k::

    global:   w_k = local SGD from w^t (the run's local steps; FedAvg)  -> sent
    personal: s steps on  F_k(v) + λ/2 ||v - w^t||²                    -> kept

The personal steps are proximal SGD steps, ``v ← w^t + (v' − w^t) / (1 + ηλ)``
after each plain SGD step ``v' = v − η∇F_k(v)`` (η the run's ``lr``): the
exact minimiser of the quadratic term, stable for every λ, where a gradient
step on λ/2 ||v − w||² diverges once ηλ > 2. λ = 0 is local training
(bit for bit: the personal model sees the batches ``local`` would, from its
own trainer, ``ctx.train(trainer="personal")``); λ → ∞ pins the personal
model to the global one (tests/test_personalization.py). The proximal form
assumes plain SGD (momentum or Adam state would restart at every step), so
λ > 0 with another optimiser is refused.

Only the global update is sent (``sends = ("delta",)``): the personal model
never leaves the client (:attr:`Algorithm.personal_model` ``"separate"``).
Each site is scored with its personal model; ``metrics.utility_global``
scores the global model. Under DP-SGD both the global and the personal
steps are private steps on the site's records and the accountant counts
them all (so a site's ε is that of twice FedAvg's steps with the default
``personal_steps``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fedmedbench import ClientContext, Range, Updates
from fedmedbench.plugins.algorithms.fedavg import FedAvg

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench import CellFacts


class Ditto(FedAvg):
    """A FedAvg global model plus a personal model per client (Li et al. 2021).

    Parameters
    ----------
    lam : float, default 1.0
        λ >= 0, the strength that pulls each personal model towards the
        global one (0: local training; large: the global model). The paper
        tunes λ in {0.05, 0.1, 0.2, 0.5, 1, 2}.
    personal_steps : int, default 0
        Steps s on the personal model per round (>= 0); 0 takes the round's
        local steps (run settings).
    """

    name = "ditto"
    protocol = "personalized"
    personal_model = "separate"

    def __init__(self, *, lam: Annotated[float, Range(ge=0)] = 1.0,
                 personal_steps: Annotated[int, Range(ge=0)] = 0) -> None:
        self.lam, self.personal_steps = float(lam), personal_steps

    def validate(self, facts: CellFacts) -> str | None:
        run = facts.run
        if self.lam > 0 and (run.optimizer != "sgd" or float(run.momentum) != 0.0):
            return (f"the proximal personal steps (lam = {self.lam:g}) assume plain SGD; the "
                    f"run uses optimizer={run.optimizer!r}, momentum={run.momentum} (optimizer "
                    f"state would restart at every personal step)")
        return None

    def planned_steps(self, steps: int, rounds: int) -> int:
        """Each round: the global model's steps, then the personal model's."""
        return int(rounds) * (int(steps) + (self.personal_steps or int(steps)))

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> Updates:
        w = global_params  # (k, D): the round's global model, one row per client
        v = ctx.personal
        assert v is not None, "ditto runs under the personalized protocol"
        k = len(ctx.clients)
        steps = ctx.steps if self.personal_steps == 0 else [self.personal_steps] * k
        if self.lam == 0:  # local training, applied as a delta like ``local`` applies it
            v = v + (ctx.train(v, steps=steps, trainer="personal") - v)
        else:
            import torch

            shrink = 1.0 / (1.0 + float(ctx.cell.settings.lr) * self.lam)
            for s in range(max(steps, default=0)):
                on = [int(s < st) for st in steps]
                stepped = ctx.train(v, steps=on, trainer="personal")
                prox = w + (stepped - w) * shrink
                v = torch.where(torch.as_tensor(on, dtype=torch.bool).unsqueeze(1), prox, v)
        new = ctx.train(w)  # the global update (FedAvg); its loss is the one reported
        return ctx.update(new - w, personal=v)


COMPONENTS = (Ditto,)
