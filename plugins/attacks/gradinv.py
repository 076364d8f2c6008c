"""Gradient inversion: reconstruct a client's training images from its update.

- ``gradinv-dlg``: Deep Leakage from Gradients, Zhu, Liu, Han, NeurIPS 2019:
  L-BFGS on dummy images and dummy (soft) labels minimising the L2 distance
  between the dummy gradient and the observed one.
- ``gradinv-idlg``: Improved DLG, Zhao, Mopuri, Bilen, arXiv:2001.02610
  (2020): the label read analytically from the last layer's gradient (the
  bias gradient of cross-entropy, ``p − onehot(y)``, is negative only at the
  true label), then DLG's L2 matching with that label fixed. For batches
  the label counts are estimated from the same gradient (at the near-uniform
  round-1 model, ``count_c ≈ B·(1/C − g_c)``).
- ``gradinv-ig``: Inverting Gradients, Geiping, Bauermeister, Dröge,
  Moeller, NeurIPS 2020: cosine distance + total variation, Adam on signed
  gradients with box constraints [0, 1] and step decay.

The attacker is the honest-but-curious server with the round-1 view: the
global model the clients started from (it sent it), the architecture, the
run settings (learning rate, batch size, local steps) and what it could read:
one client's update in plaintext; under partial encryption
(``ServerView.readable``: he-ckks ``layers`` with ``rest = "plaintext"``, or
a personalized algorithm that sends part of the model) only the coordinates
of that client's update it read in the clear, and the attack then matches
the simulated update on exactly those coordinates (``readable_coordinates``
in the result); only the sum of n updates under secure aggregation and under
HE, whose decrypted sum the server applies (the attack then inverts the
aggregate as if it came from one client); nothing when the view holds only
ciphertexts (``not_applicable``). iDLG's label read needs the output layer's
coordinates; when they are not readable the labels are optimised jointly.

From a single-step FedSGD update the gradient is ``−delta / lr``. For K local
steps ``local_steps_mode`` is ``"average"`` (treat ``−delta / (lr·K)`` as one
gradient of all the images used) or ``"simulate"`` (unroll K SGD steps on
K batches of dummy images and match the simulated update, Geiping et al.
2020, Sec. 5).

The architecture decides what these attacks can do. On synthetic-imaging
(one image, FedSGD, round 1) with the smooth SmallCNN (``act="sigmoid"``,
``pool="none"``: stride-2 convolutions, as in Zhu et al. 2019) iDLG reaches
about 47-51 dB and IG about 31-35 dB; with average pooling 25-33 dB; with
the default ReLU + max-pooling only 10-16 dB (ReLU has zero second
derivative, so the gradient-matching landscape is piecewise and L-BFGS
stalls; max-pooling passes the gradient of only one pixel in four). Under
clipping (dp-fedavg with central noise, the server sees the clipped update)
IG's cosine loss is scale-free and still succeeds; DLG's L2 loss does not.

Scoring uses ground truth the attacker does not have: the images the client
trained on in round 1 (replayed by the engine), matched to reconstructions
with the Hungarian algorithm; MSE, PSNR, SSIM (scikit-image) and label
recovery accuracy. Reconstructions are saved as PNG in the cell's artifacts
directory.
"""

from __future__ import annotations

import copy
import itertools
import typing
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np

from fedmedbench import Attack, AttackContext, Range

from ._metrics import label_accuracy, match_images, save_image_grid

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: how the labels are found: optimised jointly (DLG), read from the gradient (iDLG), or
#: given (the true labels)
LabelMode = Literal["optimize", "idlg", "known"]
LABEL_MODES: tuple[str, ...] = typing.get_args(LabelMode)
#: ``labels``: a label mode, or empty for the attack's default
Labels = Literal["", LabelMode]
#: how K local steps are inverted (``local_steps_mode``)
StepMode = Literal["average", "simulate"]
STEP_MODES: tuple[str, ...] = typing.get_args(StepMode)


# --------------------------------------------------------------------------
# analytic label recovery (iDLG)
# --------------------------------------------------------------------------


def last_layer_grads(model: nn.Module, grad: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (bias, weight) gradient of the output layer inside a flat gradient
    (the last parameters shaped ``(C,)`` and ``(C, d)``)."""
    off, slices = 0, []
    for _, p in model.named_parameters():
        slices.append((p.shape, slice(off, off + p.numel())))
        off += p.numel()
    bias = weight = None
    for shape, sl in reversed(slices):
        if bias is None and weight is None and tuple(shape) == (num_classes,):
            bias = grad[sl]
        elif weight is None and len(shape) == 2 and shape[0] == num_classes:
            weight = grad[sl].view(*shape)
            break
    return bias, weight


def _output_layer_read(model: nn.Module, mask: torch.Tensor, num_classes: int) -> bool:
    """The output layer's gradient (bias, else weight) lies in the read part."""
    bias, weight = last_layer_grads(model, mask, num_classes)
    part = bias if bias is not None else weight
    return part is not None and bool(part.all())


def recover_labels(model: nn.Module, grad: torch.Tensor, num_classes: int, batch: int
                   ) -> list[int]:
    """iDLG label recovery from the observed gradient (Zhao et al. 2020).

    One image: the class whose output-bias gradient is smallest (the only
    negative entry of ``p − onehot(y)``); without a bias, the class whose
    output-weight row sums lowest (the penultimate activations are >= 0).
    A batch of ``batch``: counts ``B·(1/C − g_c)`` rounded by largest
    remainders (exact at a uniform-output model, the round-1 regime).
    """
    import torch

    bias, weight = last_layer_grads(model, grad, num_classes)
    if bias is not None:
        g = bias.double()
    elif weight is not None:
        g = weight.double().sum(1)
        g = g / (g.abs().sum() + 1e-12)  # only the ordering matters for one image
    else:
        raise ValueError("the model has no output layer of shape (C,) or (C, d) to read labels from")
    if batch == 1:
        return [int(torch.argmin(g))]
    est = (batch * (1.0 / num_classes - g)).clamp(min=0).numpy()
    counts = np.floor(est).astype(int)
    while counts.sum() < batch:
        counts[int(np.argmax(est - counts))] += 1
    while counts.sum() > batch:
        counts[int(np.argmax(counts))] -= 1
    return [c for c in range(num_classes) for _ in range(counts[c])]


def step_label_orders(labels: list[int] | None, steps: int, limit: int = 24
                      ) -> list[list[int]]:
    """The distinct ways to deal a label multiset over ``steps`` equal batches
    (order within a batch ignored), at most ``limit`` of them; ``[]`` for one
    step or no labels. Label counts (iDLG) do not say which step saw which."""
    if labels is None or steps <= 1 or len(labels) % steps:
        return []
    per = len(labels) // steps
    out: list[list[int]] = []
    seen: set[tuple[tuple[int, ...], ...]] = set()

    def deal(rest: Counter, acc: list[tuple[int, ...]]) -> None:
        if len(out) >= limit:
            return
        if not rest:
            key = tuple(acc)
            if key not in seen:
                seen.add(key)
                out.append([v for b in acc for v in b])
            return
        for combo in sorted(set(itertools.combinations(sorted(rest.elements()), per))):
            deal(rest - Counter(combo), [*acc, combo])

    deal(Counter(int(v) for v in labels), [])
    return out


# --------------------------------------------------------------------------
# the inversion
# --------------------------------------------------------------------------


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation (mean absolute neighbour difference)."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


class _Simulator:
    """Differentiable imitation of a client's local SGD from the round's global model."""

    def __init__(self, model: nn.Module, lr: float, steps: int) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.w0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        self.lr, self.steps = lr, steps

    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The flat update the client would send after ``steps`` SGD steps on
        ``x`` split into that many batches (``y``: labels, or label logits)."""
        import torch
        from torch import nn
        from torch.func import functional_call

        w = list(self.w0)
        for xb, yb in zip(x.chunk(self.steps), y.chunk(self.steps)):
            out = functional_call(self.model, dict(zip(self.names, w)), (xb,))
            if yb.dtype == torch.long:
                loss = nn.functional.cross_entropy(out, yb)
            else:
                loss = -(torch.softmax(yb, -1) * torch.log_softmax(out, -1)).sum(-1).mean()
            g = torch.autograd.grad(loss, w, create_graph=True)
            w = [wi - self.lr * gi for wi, gi in zip(w, g)]
        return torch.cat([(wi - w0).reshape(-1) for wi, w0 in zip(w, self.w0)])


def invert(model: nn.Module, observed: torch.Tensor, *, shape: tuple[int, ...], n_images: int,
           num_classes: int, lr: float, steps: int, method: str, labels: list[int] | None,
           iterations: int, tv: float = 1e-4, step_size: float = 0.1, restarts: int = 1,
           seed: int = 0, mask: torch.Tensor | None = None
           ) -> tuple[np.ndarray, list[int], float]:
    """Reconstruct ``n_images`` images from an observed update ``observed``.

    Parameters
    ----------
    model : the global model the client started from.
    observed : the flat update (``w_local − w_global``) the attacker saw.
    lr, steps : the client's SGD learning rate and the number of steps to
        simulate (1 with ``lr·K`` for the "average" reading of K steps).
    method : ``"dlg"`` (L2 + L-BFGS) or ``"ig"`` (cosine + TV + Adam).
    labels : fixed labels, or ``None`` to optimise soft labels jointly (DLG).
    mask : the coordinates of the update the attacker read (boolean, flat);
        ``None``: all. The dummy update is matched on those only.

    Returns
    -------
    (images in [0, 1] as (B, C, H, W), labels, final matching loss)
    """
    import torch

    dtype = torch.float32
    model = copy.deepcopy(model).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sim = _Simulator(model, lr, steps)
    keep = None if mask is None else mask.to(torch.bool)
    target = observed.detach().to(dtype)
    if keep is not None:
        target = target[keep]
    tnorm2 = target.pow(2).sum().clamp_min(1e-30)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor, list[int]] | None = None
    for _ in range(restarts):
        x = torch.rand((n_images, *shape), generator=gen).to(dtype).requires_grad_(True)
        if labels is None:
            y = torch.randn((n_images, num_classes), generator=gen).to(dtype).requires_grad_(True)
            opt_vars = [x, y]
        else:
            y = torch.as_tensor(labels, dtype=torch.long)
            opt_vars = [x]

        def match() -> torch.Tensor:
            d = sim.delta(x, y)  # noqa: B023 (used within this iteration)
            if keep is not None:
                d = d[keep]
            if method == "dlg":
                return (d - target).pow(2).sum() / tnorm2
            cos = (d * target).sum() / (d.norm() * target.norm() + 1e-30)
            return 1 - cos

        if method == "dlg":
            opt = torch.optim.LBFGS(opt_vars, lr=1.0, max_iter=iterations, history_size=100,
                                    tolerance_grad=1e-12, tolerance_change=1e-14,
                                    line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad()  # noqa: B023
                loss = match()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                x.clamp_(0, 1)
        else:
            adam = torch.optim.Adam(opt_vars, lr=step_size)
            sched = torch.optim.lr_scheduler.MultiStepLR(
                adam, milestones=[int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
            for _ in range(iterations):
                adam.zero_grad()
                loss = match() + tv * total_variation(x)
                loss.backward()
                assert x.grad is not None
                x.grad.sign_()
                adam.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(0, 1)
        final = float(match().detach())
        lab = labels if labels is not None else y.detach().argmax(-1).tolist()
        if best is None or final < best[0]:
            best = (final, x.detach().clone(), list(lab))
    assert best is not None
    return best[1].clamp(0, 1).float().numpy(), best[2], best[0]


# --------------------------------------------------------------------------
# the attacks
# --------------------------------------------------------------------------


class _GradInv(Attack):
    """Shared evaluation: the round-1 view, ground truth, scoring, PNG.

    Parameters
    ----------
    client : int, default 0
        Index of the attacked client (>= 0).
    iterations : int, default 300 (500 for gradinv-ig)
        Optimiser iterations per restart (>= 1).
    labels : {"", "optimize", "idlg", "known"}, default ""
        How the labels are found: optimised jointly, read from the gradient
        (iDLG) or given; empty: the attack's default (``optimize`` for DLG,
        ``idlg`` for iDLG and IG).
    max_images : int, default 4
        Images reconstructed at most (>= 1).
    local_steps_mode : {"average", "simulate"}, default "average"
        How an update of K local steps is inverted (module docstring).
    restarts : int, default 1
        Random restarts (>= 1); the best matching loss is kept.
    tv : float, default 1e-4
        Weight of the total-variation prior (>= 0; IG).
    step_size : float, default 0.1
        Adam step size (> 0; IG).
    save_images : bool, default True
        Whether the reconstructions are saved as PNG.
    """

    method: ClassVar[str] = "dlg"
    default_labels: ClassVar[str] = "optimize"

    def __init__(self, *, client: Annotated[int, Range(ge=0)] = 0,
                 iterations: Annotated[int, Range(ge=1)] = 300, labels: Labels = "",
                 max_images: Annotated[int, Range(ge=1)] = 4,
                 local_steps_mode: StepMode = "average",
                 restarts: Annotated[int, Range(ge=1)] = 1,
                 tv: Annotated[float, Range(ge=0)] = 1e-4,
                 step_size: Annotated[float, Range(gt=0)] = 0.1,
                 save_images: bool = True) -> None:
        self.client, self.iterations, self.labels = client, iterations, labels
        self.max_images, self.local_steps_mode, self.restarts = max_images, local_steps_mode, restarts
        self.tv, self.step_size, self.save_images = tv, step_size, save_images

    def evaluate(self, ctx: AttackContext) -> dict[str, Any]:
        import torch

        task = ctx.data.task
        if len(task.input_shape) != 3:
            return {"not_applicable": f"gradient inversion scores images; this task's inputs "
                                      f"have shape {tuple(task.input_shape)}"}
        view = ctx.server_views.get(1)
        if view is None:
            return {"not_applicable": f"{ctx.protocol} protocol: no server view of round 1 "
                                      f"(no updates are sent)"}
        if not view.clients:
            return {"not_applicable": "no client took part in round 1"}
        s = ctx.settings
        c = self.client if self.client in view.clients else view.clients[0]
        mask: torch.Tensor | None = None
        if c in view.readable and c in view.updates:  # partly readable: those coordinates
            mask = torch.as_tensor(np.asarray(view.readable[c], dtype=bool))
            if not bool(mask.any()):
                return {"not_applicable": f"the round-1 view holds no coordinate of client "
                                          f"{c}'s update in the clear"}
            observed, participants = view.updates[c], [c]
        elif c in view.updates:
            observed, participants = view.updates[c], [c]
        elif view.kind == "aggregate" and view.aggregate is not None:
            observed, participants = view.aggregate, list(view.clients)
        elif view.kind == "ciphertext":
            return {"not_applicable": f"under {'+'.join(ctx.mechanisms) or 'HE'} the server "
                                      f"reads only ciphertexts of the updates (the key holder "
                                      f"is a separate party)"}
        else:
            return {"not_applicable": f"the round-1 view holds no readable update of client "
                                      f"{c}"}
        n_c = view.num_examples.get(c, 0)
        steps = s.steps_for(n_c)
        bsz = min(s.batch_size, n_c)

        # ground truth (scoring only)
        truth_x, truth_y, exact = [], [], True
        for p in participants:
            b = ctx.client_batches(p, steps) if ctx.client_batches else None
            if b is None:
                exact = False
                split = ctx.data.sites[p].train
                truth_x.append(split.X)
                truth_y.append(split.y)
            else:
                X = np.concatenate([xb for xb, _ in b])
                Y = np.concatenate([yb for _, yb in b])
                _, idx = np.unique(X.reshape(len(X), -1), axis=0, return_index=True)
                idx = np.sort(idx)
                truth_x.append(X[idx])
                truth_y.append(Y[idx])
        tx, ty = np.concatenate(truth_x), np.concatenate(truth_y)
        own = len(truth_x[participants.index(c)]) if exact else bsz * steps
        n_img = min(self.max_images, bsz if steps == 1 else own, len(tx))
        simulate = self.local_steps_mode == "simulate" and steps > 1
        if simulate:
            per = max(1, n_img // steps)
            n_img = per * steps
        model = ctx.model(view.global_params)
        lr_eff, k = (s.lr, steps) if simulate else (s.lr * steps, 1)
        # what the server read of the update: its clear part (``mask``, above), else the
        # sent part of a partial send (FedBN, FedRep, FedPer), also under secure aggregation
        if mask is None and view.sent is not None and not bool(np.all(view.sent)):
            mask = torch.as_tensor(np.asarray(view.sent, dtype=bool))
        if mask is not None and bool(mask.all()):
            mask = None

        label_mode = self.labels or self.default_labels
        if label_mode == "known" and not exact:
            label_mode = "idlg"
        label_note = None
        if label_mode == "idlg" and mask is not None and not _output_layer_read(
                model, mask, task.num_classes):
            label_mode = "optimize"
            label_note = ("the output layer is not in the view (kept on the clients or "
                          "encrypted), so the labels cannot be read from its gradient")
        if label_mode == "idlg":
            labels = recover_labels(model, -observed / (s.lr * steps), task.num_classes, n_img)
        elif label_mode == "known":
            labels = [int(v) for v in truth_y[participants.index(c)][:n_img]]
        else:
            labels = None
        common = dict(shape=tuple(task.input_shape), n_images=n_img,
                      num_classes=task.num_classes, lr=lr_eff, steps=k, method=self.method,
                      tv=self.tv, step_size=self.step_size, seed=ctx.seed, mask=mask)
        orders = step_label_orders(labels, k) if (simulate and label_mode == "idlg") else []
        if len(orders) > 1:
            # iDLG gives the label counts of all K steps, not which step saw which
            # label: a short probe of each assignment, keep the best-matching one
            probe = max(10, self.iterations // 10)
            losses = [invert(model, observed, labels=o, iterations=probe, restarts=1,
                             **common)[2] for o in orders]
            labels = orders[int(np.argmin(losses))]
        torch.manual_seed(ctx.seed)
        recon, rec_labels, final = invert(model, observed, labels=labels,
                                          iterations=self.iterations, restarts=self.restarts,
                                          **common)
        scores = match_images(recon, tx)
        matched = tx[scores["assignment"]]
        out: dict[str, Any] = {
            "mse": scores["mse"], "psnr": scores["psnr"], "ssim": scores["ssim"],
            "label_accuracy": label_accuracy(rec_labels, ty),
            "labels_recovered": [int(v) for v in rec_labels],
            "labels_true": [int(v) for v in ty[scores["assignment"]]],
            "per_image": scores["per_image"], "num_images": n_img, "batch_size": bsz,
            "local_steps": steps, "view": view.kind, "clients_in_view": len(view.clients),
            "target": (f"the securely aggregated round-1 update of {len(view.clients)} clients"
                       if participants != [c] else
                       f"client {ctx.data.site_names[c]}'s round-1 update" + (
                           f", the {int(mask.sum())} of {mask.numel()} coordinates read in the "
                           f"clear" if mask is not None else "")),
            "readable_coordinates": None if mask is None else int(mask.sum()),
            "matching_loss": final,
            "parameters_matched": int(observed.numel() if mask is None else mask.sum()),
            "ground_truth": (f"the {len(tx)} distinct images the targeted client(s) trained on "
                             f"in round 1" if exact else
                             f"the {len(tx)} training images of the targeted client(s) (the "
                             f"batches could not be replayed: a local-stage mechanism sampled "
                             f"them), so a failed reconstruction still gets its best match"),
            "ssim_implementation": "skimage.metrics.structural_similarity",
            "assumptions": {
                "labels": {"optimize": "inferred jointly with the images (soft labels)",
                           "idlg": "inferred analytically from the output-layer gradient",
                           "known": "known to the attacker"}[label_mode]
                          + (f" ({label_note})" if label_note else ""),
                "view_part": ("the whole update" if mask is None else
                              f"the {int(mask.sum())} of {observed.numel()} parameters the "
                              f"client sends (the rest never reaches the server)"),
                "local_steps": steps,
                "gradient": (f"{steps} local SGD steps simulated on dummy batches of "
                             f"{n_img // steps} (the client's: {bsz})" if simulate
                             else "-delta / lr (exact for one SGD step)" if steps == 1 else
                             f"-delta / (lr*{steps}): {steps} local steps read as one gradient "
                             f"of all images used"),
                "step_labels": (f"the label counts' assignment to the {steps} steps chosen "
                                f"among {len(orders)} by a short matching probe each"
                                if len(orders) > 1 else None),
                "model_state": "the round-1 global model (sent by the server) and the "
                               "architecture; client optimizer assumed plain SGD with "
                               f"lr={s.lr}, batch size {s.batch_size}",
                "mechanisms": ctx.mechanisms,
            },
        }
        if s.optimizer != "sgd" or s.momentum or s.weight_decay:
            out["assumptions"]["violated"] = (f"the client used {s.optimizer} (momentum "
                                              f"{s.momentum}, weight decay {s.weight_decay})")
        if self.save_images and ctx.artifacts_dir:
            path = save_image_grid(matched, recon, Path(ctx.artifacts_dir) / f"{self.name}.png")
            out["images"] = str(path)
        return out


class GradInvDLG(_GradInv):
    """Deep Leakage from Gradients: L2 gradient matching with L-BFGS (Zhu et al. 2019)."""

    name = "gradinv-dlg"
    method = "dlg"
    default_labels = "optimize"


class GradInvIDLG(_GradInv):
    """iDLG: analytic label recovery, then L2 matching (Zhao et al. 2020)."""

    name = "gradinv-idlg"
    method = "dlg"
    default_labels = "idlg"


class GradInvIG(_GradInv):
    """Inverting Gradients: cosine loss, total variation, Adam (Geiping et al. 2020)."""

    name = "gradinv-ig"
    method = "ig"
    default_labels = "idlg"

    def __init__(self, *, client: Annotated[int, Range(ge=0)] = 0,
                 iterations: Annotated[int, Range(ge=1)] = 500, labels: Labels = "",
                 max_images: Annotated[int, Range(ge=1)] = 4,
                 local_steps_mode: StepMode = "average",
                 restarts: Annotated[int, Range(ge=1)] = 1,
                 tv: Annotated[float, Range(ge=0)] = 1e-4,
                 step_size: Annotated[float, Range(gt=0)] = 0.1,
                 save_images: bool = True) -> None:
        super().__init__(client=client, iterations=iterations, labels=labels,
                         max_images=max_images, local_steps_mode=local_steps_mode,
                         restarts=restarts, tv=tv, step_size=step_size, save_images=save_images)


COMPONENTS = (GradInvDLG, GradInvIDLG, GradInvIG)
