"""FedMD: federated learning by model distillation. Clients never share
weights: each round every client publishes its class scores on a public set,
the server averages them into a consensus, and each client distils the
consensus into its own model ("digest") before training on its private data
again ("revisit"). Because only predictions travel, every client may run its
own architecture.

Li & Wang. "FedMD: Heterogenous Federated Learning via Model Distillation".
NeurIPS 2019 Workshop on Federated Learning for Data Privacy and
Confidentiality (arXiv:1910.03581).

Round t of client i (the paper's communicate → aggregate → distribute →
digest → revisit, pipelined so that one engine round holds one client step)::

    digest:  if a consensus from round t-1 exists, `digest_steps` Adam steps
             on its public rows minimising KL(consensus || softmax(f_i(x) / T))
    revisit: local training on the private split (run settings)
    publish: scores_i = softmax(f_i(x_pub_t) / T) on this round's public rows
    server:  consensus_t = mean_i scores_i

Bytes up per client and round are the scores (rows × classes × 4 bytes);
bytes down the consensus and the round it was formed in (the public rows it
covers are that round's seeded draw, which every party recomputes). The
server keeps the consensus in its own state and broadcasts it; each client
applies its own update and never receives another's. Utility is measured like ``local`` (each client's
own model). The paper's optional transfer-learning phase on labelled public
data is the run setting ``pretrain_steps``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import numpy as np

from fedmedbench import (
    Algorithm,
    CellContext,
    ClientContext,
    ConfigError,
    Range,
    Received,
    Updates,
    build_model,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench import CellFacts


class FedMD(Algorithm):
    """Soft-label sharing on a public set; clients may differ in architecture.

    Parameters
    ----------
    architectures : list, default []
        Client architectures, assigned round-robin (client i gets entry
        ``i % len``): model names of :func:`fedmedbench.build_model`
        (``"logistic"``, ``"mlp"``, ``"cnn"``) or tables
        ``{model = "mlp", hidden = [32]}``. Empty: the dataset's model for all.
    public_samples : int, default 0
        Public rows drawn (seeded) each round for the consensus (>= 0); 0 uses all.
    digest_steps : int, default 20
        Adam steps of distillation towards the consensus per round (>= 0).
    digest_lr : float, default 1e-3
        Adam learning rate of the digest phase (> 0).
    digest_batch : int, default 64
        Public rows per digest step (>= 1).
    temperature : float, default 1.0
        Softmax temperature T (> 0) of the shared scores and the digest loss.
    """

    name = "fedmd"
    protocol = "personalized"
    sends = ("scores",)
    broadcasts = ("consensus", "consensus_round")
    needs_public = True

    def __init__(self, *, architectures: list = [],  # noqa: B006
                 public_samples: Annotated[int, Range(ge=0)] = 0,
                 digest_steps: Annotated[int, Range(ge=0)] = 20,
                 digest_lr: Annotated[float, Range(gt=0)] = 1e-3,
                 digest_batch: Annotated[int, Range(ge=1)] = 64,
                 temperature: Annotated[float, Range(gt=0)] = 1.0) -> None:
        archs = []
        for j, a in enumerate(architectures):
            spec = {"model": a} if isinstance(a, str) else dict(a) if isinstance(a, dict) \
                else None
            if spec is None or not isinstance(spec.get("model"), str):
                raise ValueError(f"fedmd: architectures[{j}] = {a!r}; expected a model name or "
                                 f"a table with a string `model`")
            try:
                build_model(spec["model"], (1, 28, 28), 2,
                            **{k: v for k, v in spec.items() if k != "model"})
            except ConfigError as exc:
                raise ValueError(f"fedmd: architectures[{j}]: {exc}") from None
            except TypeError as exc:
                raise ValueError(f"fedmd: architectures[{j}] = {a!r}: {exc}") from None
            archs.append(a)
        self.architectures = archs
        self.public_samples, self.digest_steps = public_samples, digest_steps
        self.digest_lr, self.digest_batch = float(digest_lr), digest_batch
        self.temperature = float(temperature)

    def validate(self, facts: CellFacts) -> str | None:
        if facts.compressor is not None:
            return "FedMD shares soft labels, not model updates: there is nothing to compress"
        return None

    def client_model(self, ctx: CellContext, client: int) -> dict[str, Any] | None:
        if not self.architectures:
            return None
        a = self.architectures[client % len(self.architectures)]
        return {"model": a} if isinstance(a, str) else dict(a)

    def _round_rows(self, ctx: CellContext, rnd: int) -> np.ndarray:
        """The public rows of round ``rnd``'s consensus (a seeded draw every
        party computes alike)."""
        assert ctx.public is not None
        n = len(ctx.public)
        if self.public_samples == 0 or self.public_samples >= n:
            return np.arange(n)
        return np.sort(ctx.rng("fedmd-public", rnd).choice(n, self.public_samples,
                                                           replace=False))

    def client_update(self, ctx: ClientContext, global_params: torch.Tensor) -> Updates:
        import torch

        from fedmedbench.plugins.algorithms._distill import distill

        cell, T = ctx.cell, self.temperature
        pub = cell.public
        assert pub is not None
        X = torch.as_tensor(pub.X, dtype=torch.float32)
        params = global_params[0]  # under the personalized protocol: the client's own model
        target = ctx.broadcast.get("consensus")
        if target is not None and self.digest_steps:
            rows = self._round_rows(cell, int(ctx.broadcast["consensus_round"][0]))
            params = distill(ctx.model(params), X[torch.as_tensor(rows)], target,
                             steps=self.digest_steps, lr=self.digest_lr,
                             batch_size=self.digest_batch, temperature=T,
                             generator=cell.torch_generator("fedmd-digest", ctx.round,
                                                            ctx.client))
        new = ctx.train(params)  # revisit: private data
        rows = self._round_rows(cell, ctx.round)
        model = ctx.model(new[0])
        model.eval()
        with torch.no_grad():
            scores = torch.softmax(model(X[torch.as_tensor(rows)]) / T, dim=1)
        # only the scores leave the client (``sends``); the row ids are a public draw
        return ctx.update(new - global_params, scores=scores.unsqueeze(0))

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        scores = received.rows.get("scores")
        if scores is not None and len(scores):
            ctx.state["fedmd_consensus"] = scores.mean(0)
            ctx.state["fedmd_round"] = ctx.round
        return global_params  # no global model: each client applied its own update

    def broadcast(self, ctx: CellContext) -> dict[str, torch.Tensor]:
        import torch

        consensus = ctx.state.get("fedmd_consensus")
        if consensus is None:
            return {}
        return {"consensus": consensus,
                "consensus_round": torch.tensor([ctx.state["fedmd_round"]], dtype=torch.int32)}


COMPONENTS = (FedMD,)
