"""DP-SGD: sample-level differential privacy inside each client's local training.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. "Deep Learning with
Differential Privacy". CCS 2016. Implemented with Opacus (Yousefpour et al.,
"Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021):
per-example gradients clipped to ``max_grad_norm``, Gaussian noise
``noise_multiplier · max_grad_norm`` per step, Poisson sampling of records.

Each client is made private **once per cell** (the engine asks for one trainer
per client) and keeps its Opacus accountant across rounds. With ``epsilon``
set, σ is solved per site over the whole planned training (every local step
the algorithm plans at that site, ``rounds × local steps`` for most, at that
site's sample rate), so the planned ε never exceeds the target.

The mechanism's parameters come from public, declared quantities only: the
sample rate is ``sample_rate`` when given, else ``1 / ceil(n / batch_size)``
with ``n`` the site's **public** example count (``ctx.num_examples``: what
the dataset card declares public and the client sends in the clear, before
an audit's canaries are inserted); the noise is solved from that rate; the
sum of clipped gradients is divided by the expected batch ``int(n · q)`` of
that count. So a record more or fewer — a canary the audit includes or not —
never changes q, σ or the divisor (0.2 took them from the private row count,
for which add/remove-one adjacency gives no finite ε). Poisson sampling runs
over the site's actual rows at rate q. The trainer is assembled from Opacus's
own parts (``GradSampleModule``, ``DPOptimizer``, ``DPDataLoader`` and an
accountant hook) with those values.

Audits: white-box gradient-space canaries (:class:`~fedmedbench.GradientCanaries`,
``audit-dirac``) join a site's steps like records: at every step each
included canary of the site is present with probability q, and a present
canary adds the per-example gradient ``C · e_j`` (the clipping norm at its
coordinate) to the step's clipped sum before the noise, on both backends.

Noise and Poisson sampling draw from seeded torch generators so that a cell is
reproducible; that is Opacus's ``secure_mode=False`` (not a cryptographically
secure RNG), which is right for a benchmark and wrong for a deployment: the
record says so under ``noise_rng``.
"""

from __future__ import annotations

import types
import warnings
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np

from fedmedbench import (
    Accountant,
    Accounting,
    CellContext,
    Guarantee,
    Ledger,
    LocalStage,
    PrivacyMechanism,
    Range,
    Split,
    add_flat_grad,
    epsilon_for,
    finish_local,
    get_flat_params,
    noise_for_epsilon,
    set_flat_params,
    to_tensors,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

# stated in every record instead (noise_rng); and Opacus's backward hooks warn on
# every step that the input needs no gradient, which is expected here
warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")

NOISE_RNG = ("seeded torch generator for reproducibility (Opacus secure_mode off: not a "
             "cryptographically secure RNG)")


class DPSGD(PrivacyMechanism, LocalStage):
    """Sample-level DP-SGD with Opacus; ε per site (the largest is the cell's ε).

    Parameters
    ----------
    noise_multiplier : float, default 1.0
        σ, noise std relative to ``max_grad_norm``; ignored when ``epsilon`` is
        set. 0 clips per-example gradients without noise: no DP guarantee (the
        record then reports none), for ablations.
    epsilon : float or None, default None
        Target ε per site over the planned training; σ is solved for it.
    max_grad_norm : float, default 1.0
        Per-example clipping norm C.
    delta : float, default 1e-5
        δ of the (ε, δ) guarantee.
    accountant : {"rdp", "prv"}, default "rdp"
        The Opacus accountant (PRV is tighter and approximate by design).
    sample_rate : float or None, default None
        q, the Poisson rate of records per step, declared; ``None`` takes
        ``1 / ceil(n / batch_size)`` of each site's public count.
    """

    name = "dp-sgd"
    dp_unit = "record"

    def __init__(self, *, noise_multiplier: Annotated[float, Range(ge=0)] = 1.0,
                 epsilon: Annotated[float | None, Range(gt=0)] = None,
                 max_grad_norm: Annotated[float, Range(gt=0)] = 1.0,
                 delta: Annotated[float, Range(gt=0, lt=1)] = 1e-5,
                 accountant: Accountant = "rdp",
                 sample_rate: Annotated[float | None, Range(gt=0, le=1)] = None) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.epsilon = None if epsilon is None else float(epsilon)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.accountant = accountant
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self._sites: dict[int, dict[str, Any]] = {}
        self._canaries: dict[int, np.ndarray] = {}

    # -- per-site calibration ---------------------------------------------------

    def setup(self, ctx: CellContext) -> None:
        self._ctx = ctx
        self._sites = {}
        self._canaries = {}

    def insert_gradient_canaries(self, ctx: CellContext, canaries: Any) -> bool:
        """Each included canary joins its site's steps (the pooled party's: all)."""
        inc = np.asarray(canaries.included, dtype=bool)
        coords = np.asarray(canaries.coords, dtype=np.int64)
        site = np.asarray(canaries.site, dtype=np.int64)
        for client in range(ctx.num_clients):
            mine = inc if ctx.protocol == "pooled" else inc & (site == client)
            if mine.any():
                self._canaries[client] = coords[mine]
        return True

    def _canary_stream(self, client: int) -> tuple[np.ndarray, Any] | None:
        """(coordinates, generator) of ``client``'s included canaries, or None."""
        coords = self._canaries.get(client)
        if coords is None or not len(coords):
            return None
        return coords, self._ctx.torch_generator("dp-sgd-canaries", client)

    def _site(self, client: int) -> dict[str, Any]:
        """σ, q, the expected batch and the planned steps of ``client``, from
        public quantities only (solved once per cell)."""
        if client not in self._sites:
            ctx = self._ctx
            B = int(ctx.settings.batch_size)
            n = int(ctx.num_examples[client])  # public: before any canary is inserted
            # Opacus's Poisson rate 1 / len(DataLoader), of the public count
            q = self.sample_rate if self.sample_rate is not None else 1.0 / -(-n // B)
            planned = ctx.planned_steps(client)  # every trainer's steps (Ditto, fine-tuning)
            if self.epsilon is not None:
                sigma = noise_for_epsilon(target_epsilon=self.epsilon, delta=self.delta,
                                          sample_rate=q, steps=planned,
                                          accountant=self.accountant)
            else:
                sigma = self.noise_multiplier
            self._sites[client] = {"site": ctx.client_names[client], "noise_multiplier": sigma,
                                   "sample_rate": q, "planned_steps": planned, "n": n,
                                   "expected_batch": max(1, int(n * q)), "ledger": None,
                                   "engines": []}
        return self._sites[client]

    # -- the local stage: loop (Opacus hooks) and vectorized forms ----------------

    def local_trainer(self, ctx: CellContext, client: int, model: torch.nn.Module,
                      data: Split) -> OpacusTrainer:
        info = self._site(client)
        # a client's second trainer (Ditto's personal model) draws its own noise and
        # its steps compose with the first's in the site's accounting
        nth = len(info["engines"])
        noise = ctx.torch_generator("dp-sgd-noise", client, *([nth] if nth else []))
        tr = OpacusTrainer(model, data, ctx.settings, seed=ctx.batch_seed(client),
                           noise_multiplier=info["noise_multiplier"],
                           max_grad_norm=self.max_grad_norm, accountant=self.accountant,
                           noise_generator=noise, sample_rate=info["sample_rate"],
                           expected_batch_size=info["expected_batch"],
                           canaries=None if nth else self._canary_stream(client))
        info["engines"].append(tr)
        return tr

    def vector_steps(self, ctx: CellContext) -> VectorDPSGD:
        return VectorDPSGD(self, ctx)

    # -- accounting ------------------------------------------------------------

    def _history(self, info: dict[str, Any]) -> list[tuple[float, float, int]]:
        if info["engines"]:
            return [h for e in info["engines"] for h in e.accountant.history]
        return list(info["ledger"].history) if info["ledger"] is not None else []

    def accounting(self) -> Accounting | None:
        if self.epsilon is None and self.noise_multiplier == 0:
            return None  # clipping only: no guarantee to report
        per_site: dict[str, Any] = {}
        for info in self._sites.values():
            hist = self._history(info)
            key = tuple(hist)
            if info.get("_key") != key:
                info["_key"], info["_eps"] = key, epsilon_for(hist, self.delta, self.accountant)
            per_site[info["site"]] = {
                "epsilon": info["_eps"], "noise_multiplier": info["noise_multiplier"],
                "sample_rate": info["sample_rate"], "steps": sum(n for _, _, n in hist),
                "planned_steps": info["planned_steps"], "records": info["n"],
                "expected_batch": info["expected_batch"]}
        worst = max(per_site.items(), key=lambda kv: (kv[1]["epsilon"], kv[0]), default=None)
        top: dict[str, Any] = worst[1] if worst else {"epsilon": 0.0, "noise_multiplier": self.noise_multiplier,
                                      "sample_rate": None, "steps": 0}
        eps, q, steps = float(top["epsilon"]), top["sample_rate"], int(top["steps"])
        note = ("record-level: each client samples its own records (Poisson, rate q), which "
                "no other party sees, so amplification by record sampling holds against "
                "every party; the server reads each update as the transport shows it")
        adversaries = {a: Guarantee(a, eps, self.delta, q, steps, True, note)
                       for a in ("server", "client", "released")}
        return Accounting(
            unit="record", accountant=self.accountant, epsilon=float(top["epsilon"]),
            delta=self.delta, noise_multiplier=top["noise_multiplier"],
            sample_rate=top["sample_rate"], steps=int(top["steps"]),
            sampling=("record-level Poisson sampling inside each site at rate q_i = " + (
                f"{self.sample_rate:g} (declared)" if self.sample_rate is not None else
                "1/ceil(n_i/batch_size) of the site's public count n_i") + "; the noise and "
                "the expected batch follow from q_i and n_i, never from the private row count; "
                "ε is per site over that site's records and counts only the steps the site "
                "took; no amplification by client sampling is claimed; the cell's ε is the "
                "largest over sites" + (f" (site {worst[0]})" if worst else "")),
            clip=self.max_grad_norm, target_epsilon=self.epsilon, per_site=per_site,
            adversaries=adversaries,
            details={"noise_rng": NOISE_RNG, "max_grad_norm": self.max_grad_norm,
                     "sample_rate_from": "declared" if self.sample_rate is not None else
                     "public count"})


class OpacusTrainer:
    """DP-SGD local steps through Opacus's hooks (GradSampleModule, DPOptimizer,
    DPDataLoader with Poisson sampling), made private once per client per cell
    so that its accountant persists across rounds.

    ``extra_loss`` and ``grad_offset`` are added after privatisation:
    post-processing of the privatised gradient, with no ε cost (Opacus would
    otherwise rebuild ``.grad`` from per-example gradients and drop them).
    An empty Poisson batch is a noise-only step, as DP-SGD's analysis assumes.
    """

    def __init__(self, model: torch.nn.Module, data: Split, settings: Any, *, seed: int,
                 noise_multiplier: float, max_grad_norm: float, accountant: str,
                 noise_generator: torch.Generator, sample_rate: float,
                 expected_batch_size: int,
                 canaries: tuple[np.ndarray, torch.Generator] | None = None) -> None:
        import torch
        from opacus import GradSampleModule
        from opacus.accountants import create_accountant
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator
        from torch.utils.data import TensorDataset

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"dp-sgd cannot wrap this model: {errors[0]} (use a model without "
                             f"BatchNorm, e.g. GroupNorm)")
        X, y = to_tensors(data)
        # what PrivacyEngine.make_private assembles, with q and the expected batch given
        # (public) instead of read off the private row count
        self.model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.model.forbid_grad_accumulation()
        self.optimizer = DPOptimizer(
            settings.make_optimizer(model.parameters()), noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, expected_batch_size=int(expected_batch_size),
            loss_reduction="mean", generator=noise_generator, secure_mode=False)
        self.accountant = create_accountant(mechanism=accountant)
        self.optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=float(sample_rate)))
        loader = DPDataLoader(TensorDataset(X, y), sample_rate=float(sample_rate),
                              generator=torch.Generator().manual_seed(seed))
        _noise_on_empty_batches(self.optimizer)
        self.loader = loader
        self.q, self.C = float(sample_rate), float(max_grad_norm)
        self.canaries = canaries
        self._it: Any = iter(())

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def train(self, params: torch.Tensor, steps: int, *, extra_loss: Any = None,
              grad_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        import torch
        from torch import nn


        model, opt = self.model, self.optimizer
        inner = model._module
        set_flat_params(inner, params)
        opt.state.clear()
        model.train()
        plist = [p for p in inner.parameters() if p.requires_grad]
        total, count = torch.zeros(()), 0
        for _ in range(steps):
            xb, yb = self._next()
            opt.zero_grad(set_to_none=True)
            if len(yb):
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                total += loss.detach()
                count += 1
            if self.canaries is not None:
                self._add_canaries(inner)
            if opt.pre_step():  # clip, noise, scale; the accountant counts the step
                if extra_loss is not None:
                    extra = torch.autograd.grad(extra_loss(get_flat_params(inner, grad=True)), plist,
                                                allow_unused=True)
                    for p, g in zip(plist, extra):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad + g
                if grad_offset is not None:
                    add_flat_grad(inner, grad_offset)
                opt.original_optimizer.step()
        return finish_local(inner, total, count)

    def _add_canaries(self, inner: torch.nn.Module) -> None:
        """The canaries present at this step (each with probability q) as
        per-example gradient rows ``C · e_j`` beside the batch's."""
        import torch

        assert self.canaries is not None
        coords, gen = self.canaries
        here = coords[(torch.rand(len(coords), generator=gen) < self.q).numpy()]
        if not len(here):
            return
        off = 0
        for p in inner.parameters():
            n = p.numel()
            rows = torch.zeros((len(here), n), dtype=p.dtype)
            hit = np.flatnonzero((here >= off) & (here < off + n))
            rows[torch.as_tensor(hit), torch.as_tensor(here[hit] - off)] = self.C
            rows = rows.reshape(len(here), *p.shape)
            held: Any = p  # Opacus keeps per-example gradients on the parameter
            g = getattr(held, "grad_sample", None)
            held.grad_sample = rows if g is None else torch.cat([g, rows])
            off += n


class _PoissonStream:
    """The Poisson batches Opacus's DPDataLoader draws for one client, draw for
    draw: per pass of ``int(1/q)`` batches, one int64 for the DataLoader
    iterator's base seed, then ``rand(n) < q`` per batch, from one generator."""

    def __init__(self, n: int, q: float, seed: int) -> None:
        import torch

        self.n, self.q = n, q
        self.per_pass = int(1 / q)
        self.gen = torch.Generator().manual_seed(seed)
        self.left = 0

    def next_indices(self) -> np.ndarray:
        import torch

        if self.left == 0:
            torch.empty((), dtype=torch.int64).random_(generator=self.gen)
            self.left = self.per_pass
        self.left -= 1
        mask = torch.rand(self.n, generator=self.gen) < self.q
        return mask.nonzero(as_tuple=False).reshape(-1).numpy()


class VectorDPSGD:
    """DP-SGD on the vectorized backend: each client's Poisson batches (the same
    draws as the loop's DPDataLoader), per-example gradients clipped to C and
    summed, Gaussian noise σ·C added, divided by the expected batch size —
    Opacus's arithmetic, inside the vmapped step — and every step counted in
    each site's ledger for the same accountant."""

    def __init__(self, mech: DPSGD, ctx: CellContext) -> None:
        self.mech, self.ctx = mech, ctx
        self.step = 0
        self._canaries: dict[int, Any] = {}

    def stream(self, client: int, n: int) -> _PoissonStream:
        info = self.mech._site(client)
        if info["ledger"] is None:
            info["ledger"] = Ledger(self.mech.accountant)
        return _PoissonStream(n, info["sample_rate"], self.ctx.batch_seed(client))

    def privatize(self, per_example: torch.Tensor, mask: torch.Tensor, clients: list[int],
                  active: list[bool]) -> torch.Tensor:
        """``per_example`` (k, B, D) gradients and ``mask`` (k, B) of the step's
        k rows; ``clients`` are the ids of the active rows, in row order."""
        import torch

        C = self.mech.max_grad_norm
        ids = iter(clients)
        infos = [self.mech._sites[next(ids)] if a else None for a in active]
        norms = per_example.norm(dim=2)
        factor = (C / (norms + 1e-6)).clamp(max=1.0) * mask
        summed = torch.einsum("kb,kbd->kd", factor, per_example)
        dev = summed.device  # the backend's device (CPU, the reference, or CUDA)
        sigma = torch.tensor([i["noise_multiplier"] if i else 0.0 for i in infos],
                             dtype=summed.dtype, device=dev)
        expected = torch.tensor([max(1, i["expected_batch"]) if i else 1 for i in infos],
                                dtype=summed.dtype, device=dev)
        rows = [j for j, a in enumerate(active) if a]
        for j, c in zip(rows, clients):  # present canaries: C at their coordinates
            stream = self._canaries.get(c)
            if stream is None:
                stream = self._canaries[c] = self.mech._canary_stream(c) or ()
            if stream:
                coords, cg = stream
                info = infos[j]
                assert info is not None
                here = coords[(torch.rand(len(coords), generator=cg) < info["sample_rate"]
                               ).numpy()]
                if len(here):
                    summed[j, torch.as_tensor(here, device=dev)] += C
        self.step += 1
        g = self.ctx.torch_generator("dp-sgd-vector-noise", self.ctx.round, self.step)
        # drawn on the CPU from the cell's stream whatever the device: the same noise as
        # the CPU reference, so a CUDA run differs from it only by float order
        noise = torch.randn(summed.shape, generator=g, dtype=summed.dtype).to(dev) * (
            sigma * C)[:, None]
        for i in infos:
            if i is not None:
                i["ledger"].record(i["noise_multiplier"], i["sample_rate"])
        return (summed + noise) / expected[:, None]


def _noise_on_empty_batches(optimizer: Any) -> None:
    """Make an Opacus optimizer add noise and count the step when a Poisson
    batch is empty (the engine then calls ``step`` without a forward pass).

    Stock Opacus skips such a step silently (no noise, no accountant step),
    which makes "the batch was empty" observable. Here it becomes a
    noise-only step, exactly as DP-SGD's analysis assumes.
    """
    import torch

    original = optimizer.pre_step

    def pre_step(self: Any, closure: Any = None) -> Any:
        if self.params and all(getattr(p, "grad_sample", None) is None for p in self.params):
            # one all-zero per-sample gradient: clipping and summing give zero,
            # then Opacus adds the noise, scales and counts the step as usual
            for p in self.params:
                p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
        return original(closure)

    optimizer.pre_step = types.MethodType(pre_step, optimizer)


COMPONENTS = (DPSGD,)
