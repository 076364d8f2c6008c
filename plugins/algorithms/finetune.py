"""Fine-tuning: any federated algorithm, followed by k local steps per site
on the site's own training data before its model is evaluated — the simplest
personalization baseline (e.g. Wang, Mathews, Kiddon, Eichner, Beaufays,
Ramage. "Federated Evaluation of On-device Personalization".
arXiv:1910.10252, 2019; Yu, Bagdasaryan, Shmatikov. "Salvaging Federated
Learning by Local Adaptation". arXiv:2002.04758, 2020).

``finetune`` wraps another algorithm rather than copying it::

    algorithm = [{ name = "finetune", algorithm = "fedavg", steps = 10 },
                 { name = "finetune", algorithm = "fedprox", algorithm_params = { mu = 0.1 } }]

Training is the wrapped algorithm's, round for round (its client and server
updates, what it sends, its declared facts); after the last round every site
takes ``steps`` local steps from its model (the global model, for a
federated algorithm) and is scored with the result. ``metrics.utility_global``
keeps the wrapped algorithm's global model's numbers. With ``steps = 0`` the
models and numbers are the wrapped algorithm's (tests/test_personalization.py).
Under DP-SGD the fine-tuning steps are private steps on the site's records
and counted by the accountant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fedmedbench import (
    Algorithm,
    CellContext,
    ClientContext,
    Range,
    Received,
    Updates,
    build_component,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench import CellFacts


class Finetune(Algorithm):
    """A wrapped algorithm plus ``steps`` local steps per site before evaluation.

    Parameters
    ----------
    algorithm : str, default "fedavg"
        The algorithm to run, by name: a federated or personalized one (not
        ``finetune`` itself).
    algorithm_params : table, default {}
        Its parameters (``{ mu = 0.1 }`` for FedProx), checked as the
        algorithm's own.
    steps : int, default 5
        Local fine-tuning steps per site after the last round (>= 0).
    """

    name = "finetune"
    protocol = "personalized"

    def __init__(self, *, algorithm: str = "fedavg",
                 algorithm_params: dict = {},  # noqa: B006
                 steps: Annotated[int, Range(ge=0)] = 5) -> None:
        if "name" in algorithm_params:
            raise ValueError(f"finetune: algorithm_params = {algorithm_params!r}; give a table "
                             f"of the algorithm's parameters (without `name`)")
        spec = {"name": algorithm, **algorithm_params}
        if spec["name"] == self.name:
            raise ValueError("finetune: algorithm = 'finetune'; wrap a training algorithm")
        inner = build_component("algorithm", spec, key="finetune.algorithm")
        if inner.protocol not in ("federated", "personalized"):  # type: ignore[attr-defined]
            raise ValueError(f"finetune: algorithm {spec['name']!r} runs on the "
                             f"{inner.protocol} protocol; wrap a federated or "  # type: ignore[attr-defined]
                             f"personalized algorithm")
        self.algorithm, self.algorithm_params, self.steps = algorithm, dict(algorithm_params), steps
        self.inner: Algorithm = inner  # type: ignore[assignment]
        # the declared facts are the wrapped algorithm's (what is sent, how)
        self.sends = tuple(inner.sends)  # type: ignore[misc,attr-defined]
        self.summed = tuple(inner.summed)  # type: ignore[misc,attr-defined]
        self.broadcasts = tuple(inner.broadcasts)  # type: ignore[misc,attr-defined]
        self.shares = inner.shares  # type: ignore[misc,attr-defined]
        self.personal_model = inner.personal_model  # type: ignore[misc,attr-defined]
        self.needs_public = inner.needs_public  # type: ignore[misc,attr-defined]
        self.needs_individual_updates = inner.needs_individual_updates  # type: ignore[misc,attr-defined]
        self.vectorized = inner.vectorized  # type: ignore[misc,attr-defined]

    # -- the wrapped algorithm ---------------------------------------------------

    def validate(self, facts: CellFacts) -> str | None:
        return self.inner.validate(facts)

    def setup(self, ctx: CellContext) -> None:
        self.inner.setup(ctx)

    def planned_steps(self, steps: int, rounds: int) -> int:
        """The wrapped algorithm's steps, then ``steps`` fine-tuning steps once."""
        return self.inner.planned_steps(steps, rounds) + self.steps

    def begin_round(self, round: int) -> None:
        self.inner.begin_round(round)

    def end_round(self, round: int) -> None:
        self.inner.end_round(round)

    def close(self) -> None:
        self.inner.close()

    def broadcast(self, ctx: CellContext) -> dict[str, torch.Tensor]:
        return self.inner.broadcast(ctx)

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> Updates:
        return self.inner.client_update(ctx, global_params)

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        return self.inner.server_update(ctx, global_params, aggregate, received)

    def client_model(self, ctx: CellContext, client: int) -> dict[str, Any] | None:
        return self.inner.client_model(ctx, client)

    def shared_mask(self, ctx: CellContext) -> Any:
        return self.inner.shared_mask(ctx)

    # -- fine-tuning ---------------------------------------------------------------

    def finalize(self, ctx: ClientContext, params: torch.Tensor) -> torch.Tensor:
        params = self.inner.finalize(ctx, params)
        if self.steps == 0:
            return params
        trainer = "personal" if self.personal_model == "separate" else "main"
        return ctx.train(params, steps=self.steps, trainer=trainer)


COMPONENTS = (Finetune,)
