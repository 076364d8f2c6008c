"""Knowledge distillation shared by FedDF (server side) and FedMD (client side)."""

from __future__ import annotations

import torch
from torch import nn

from fedmedbench import get_flat_params


def distill(model: nn.Module, X: torch.Tensor, teacher: torch.Tensor, *, steps: int,
            lr: float, batch_size: int, temperature: float,
            generator: torch.Generator) -> torch.Tensor:
    """Train ``model`` for ``steps`` Adam steps to match the soft labels
    ``teacher`` (rows of ``X``) under temperature ``temperature`` (Hinton et al.
    2015, KL divergence scaled by T²); return its parameters as a flat vector."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bs = min(batch_size, len(X))
    for _ in range(steps):
        idx = torch.randint(len(X), (bs,), generator=generator)
        opt.zero_grad(set_to_none=True)
        log_p = torch.log_softmax(model(X[idx]) / temperature, dim=1)
        loss = nn.functional.kl_div(log_p, teacher[idx], reduction="batchmean")
        (loss * temperature * temperature).backward()
        opt.step()
    return get_flat_params(model)
