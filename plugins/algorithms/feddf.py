"""FedDF: ensemble distillation for model fusion. After averaging, the server
distils the ensemble of the received client models into the averaged global
model on public *unlabelled* data (the public split's labels are never read).

Lin, Kong, Stich, Jaggi. "Ensemble Distillation for Robust Model Fusion in
Federated Learning". NeurIPS 2020.

Server step of round t::

    w_avg   = w_t + aggregate                        # FedAvg initialisation
    teacher = mean_i logits(w_t + delta_i, x)        # averaged logits of the client models
    student = w_avg; `steps` Adam steps on public batches x minimising
              T² · KL(softmax(teacher / T) || softmax(student(x) / T))

The server needs every client's model (``needs_individual_updates``), so
FedDF is skipped under secure aggregation or HE, and it needs a public split
(``needs_public``): a cell whose data has none is skipped with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fedmedbench import Algorithm, CellContext, Range, Received, set_flat_params

if TYPE_CHECKING:  # pragma: no cover
    import torch



class FedDF(Algorithm):
    """Server-side ensemble distillation on public unlabelled data (Lin et al. 2020).

    Parameters
    ----------
    steps : int, default 100
        Distillation steps per round (>= 1); the paper uses up to 500 with early stopping.
    lr : float, default 1e-3
        Adam learning rate of the server's distillation (> 0), as in the paper.
    batch_size : int, default 64
        Public rows per distillation step (>= 1).
    temperature : float, default 1.0
        Softmax temperature T (> 0) of teacher and student.
    """

    name = "feddf"
    needs_public = True
    needs_individual_updates = True

    def __init__(self, *, steps: Annotated[int, Range(ge=1)] = 100,
                 lr: Annotated[float, Range(gt=0)] = 1e-3,
                 batch_size: Annotated[int, Range(ge=1)] = 64,
                 temperature: Annotated[float, Range(gt=0)] = 1.0) -> None:
        self.steps, self.lr, self.batch_size = steps, float(lr), batch_size
        self.temperature = float(temperature)

    def server_update(self, ctx: CellContext, global_params: torch.Tensor,
                      aggregate: torch.Tensor, received: Received) -> torch.Tensor:
        import torch

        from fedmedbench.plugins.algorithms._distill import distill

        w_avg = global_params + ctx.settings.server_lr * aggregate
        public = ctx.public
        if public is None or not len(received):
            return w_avg
        X = torch.as_tensor(public.X, dtype=torch.float32)
        T = self.temperature
        teacher_model = ctx.model_factory()
        with torch.no_grad():
            logits = []
            for delta in received.delta:  # plaintext only: transports are refused
                set_flat_params(teacher_model, global_params + delta)
                teacher_model.eval()
                logits.append(teacher_model(X))
            teacher = torch.softmax(torch.stack(logits).mean(0) / T, dim=1)
        student = ctx.model_factory()
        set_flat_params(student, w_avg)
        return distill(student, X, teacher, steps=self.steps, lr=self.lr,
                       batch_size=self.batch_size, temperature=T,
                       generator=ctx.torch_generator("feddf", ctx.round))

COMPONENTS = (FedDF,)
