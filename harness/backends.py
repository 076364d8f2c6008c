"""Backends run clients' local training: ``loop`` (one client after another,
the reference) and ``vectorized`` (all sampled clients of a round in one
torch.func computation, :mod:`fedmedbench.vectorized`).

A backend is the training service behind
:class:`~fedmedbench.context.ClientContext`, on the clients' side of the
round: the clients' party asks it for the round's
:class:`~fedmedbench.Updates` (:meth:`LoopBackend.client_updates`), which
calls the algorithm's ``client_update`` — once per client on the loop
backend, once for all clients on the vectorized one — and ``ctx.train``
comes back here. It gets the parts it needs explicitly (:class:`ClientData`):
the clients' context, their data and held-out rows, their model factories
and the local-stage mechanism. A module the loop backend's clients share is
wiped after every client's steps: no training module keeps a client's model.

:func:`choose_backend` picks ``vectorized`` under ``auto`` when every
component of the cell says it can run there, and names the component that
made it fall back otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.components import LocalStage, Site, Split, Updates
from fedmedbench.context import CellContext, ClientContext
from fedmedbench.meters import calling
from fedmedbench.models import get_flat_buffers, set_flat_buffers
from fedmedbench.training import SGDTrainer, grad_reset

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.cell import Cell
    from fedmedbench.training import ExtraLoss, LocalTrainer

__all__ = ["BACKENDS", "ClientData", "LoopBackend", "choose_backend", "make_backend"]

BACKENDS = ("auto", "loop", "vectorized")


@dataclass(frozen=True)
class ClientData:
    """What a backend needs of the clients' side, and nothing else.

    Attributes
    ----------
    ctx : CellContext
        The clients' context.
    sites : list of Site
        Each training party's own rows (after the validation and holdout
        carve, an adversary's corruption and an audit's canaries).
    holdout : mapping of int to Split
        Rows held out for the aggregator's client-side scores.
    factories : mapping of int to callable
        Clients with an architecture of their own; the others use ``factory``.
    factory : callable
        The cell's model factory (its seeded initialisation).
    local : LocalStage or None
        The clients' instance of a local-stage privacy mechanism.
    """

    ctx: CellContext
    sites: list[Site]
    holdout: Mapping[int, Split]
    factories: Mapping[int, Callable[[], Any]]
    factory: Callable[[], Any]
    local: LocalStage | None

    def factory_for(self, client: int) -> Callable[[], Any]:
        return self.factories.get(client, self.factory)


class LoopBackend:
    """One client after another: persistent trainers per client (the
    harness's :class:`~fedmedbench.training.SGDTrainer`, or the local-stage
    mechanism's), created on the client's first round.

    A client may have several trainers, by name (``ctx.train(trainer=...)``):
    ``"main"`` and, for Ditto, ``"personal"``. Each keeps its module's
    buffers (BatchNorm running statistics) between rounds — put into the
    architecture's shared module before its steps and read back after — so
    they are the client's own unless the protocol loads others
    (:meth:`load_buffers`).
    """

    name = "loop"
    #: where the clients train: the loop backend (and Opacus's trainers) on the CPU
    device = "cpu"

    def __init__(self, parts: ClientData) -> None:
        self.parts = parts
        self.ctx: CellContext = parts.ctx
        self.local: LocalStage | None = parts.local
        self.trainers: dict[tuple[int, str], LocalTrainer] = {}
        #: each trainer's module (SGD trainers of one architecture share one)
        self.modules: dict[tuple[int, str], torch.nn.Module] = {}
        #: one model and optimizer per architecture, shared by the clients' SGD trainers
        self._shared: dict[Any, tuple[Any, Any]] = {}
        #: each trainer's running statistics (a shared module holds only the last client's)
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self._fresh_buffers: dict[Any, torch.Tensor] = {}

    # -- the protocol's entry points ------------------------------------------

    def client_updates(self, algorithm: Any, clients: list[int],
                       params: torch.Tensor | dict[int, torch.Tensor], *,
                       personal: torch.Tensor | None = None,
                       broadcast: Mapping[str, Any] | None = None) -> Updates:
        """The clients' updates from ``params``: the global model (D,), each
        client's model by id (isolated), or one starting row per client
        (k, D) (personalized); ``personal`` (k, D) is handed to the algorithm
        as ``ctx.personal`` and ``broadcast`` as ``ctx.broadcast``."""
        parts = []
        for j, c in enumerate(clients):
            ctx = ClientContext(self.ctx, [c], self,
                                personal=None if personal is None else personal[j:j + 1],
                                broadcast=broadcast)
            # per-client models (isolated, personalized): always (k, D) rows
            if isinstance(params, dict):
                p = params[c].unsqueeze(0)
            else:
                p = params[j:j + 1] if params.dim() == 2 else params
            parts.append(_checked(algorithm.client_update(ctx, p), algorithm, [c]))
        if len({int(u.delta.shape[1]) for u in parts}) > 1:
            # clients of different architectures: one batch of what they send, without
            # the deltas (their own models stay per client: ``per_client``)
            import torch

            merged = Updates.concat([u.replace(delta=torch.zeros((1, 0))) for u in parts])
            return merged.replace(per_client={u.clients[0]: u.delta[0] for u in parts})
        return Updates.concat(parts)

    def client_metrics(self, aggregator: Any, updates: Updates, w: torch.Tensor) -> Updates:
        """The aggregator's client-side numbers, computed by each client
        (``w``: the global model, or each client's starting row (k, D))."""
        if not aggregator.client_metric_keys:  # it declares it reads none
            return updates
        extra: dict[str, list[float]] = {}
        for i, c in enumerate(updates.clients):
            got = aggregator.client_metrics(ClientContext(self.ctx, [c], self),
                                            w[i] if w.dim() == 2 else w, updates.rows([i]))
            for k, v in (got or {}).items():
                extra.setdefault(k, []).append(float(np.asarray(v).reshape(-1)[0]))
        return updates.replace(metrics={**updates.metrics,
                                        **{k: np.asarray(v) for k, v in extra.items()}})

    def finalize(self, algorithm: Any, clients: list[int], params: torch.Tensor,
                 personal: torch.Tensor | None = None) -> torch.Tensor:
        """``algorithm.finalize`` on each client ((k, D) in, (k, D) out)."""
        import torch

        rows = []
        for j, c in enumerate(clients):
            ctx = ClientContext(self.ctx, [c], self,
                                personal=None if personal is None else personal[j:j + 1])
            rows.append(_finalized(algorithm.finalize(ctx, params[j:j + 1]), algorithm, 1))
        return torch.cat(rows)

    # -- buffers (BatchNorm running statistics) ---------------------------------

    def buffers(self, client: int, trainer: str = "main") -> torch.Tensor | None:
        """The floating-point buffers of ``client``'s trainer, flat (``None``
        before that trainer has run or been given any)."""
        own = self._buffers.get((client, trainer))
        return None if own is None else own.clone()

    def load_buffers(self, client: int, flat: torch.Tensor, trainer: str = "main") -> None:
        """Start ``client``'s next local steps from the buffers ``flat``."""
        self._buffers[(client, trainer)] = flat.detach().clone()

    def _enter_buffers(self, key: tuple[int, str]) -> bool:
        """Put the trainer's own running statistics into its module (shared by
        the architecture's clients) before its steps; False: it has none."""
        module = self.modules[key]
        factory = self.factory_for(key[0])
        if factory not in self._fresh_buffers:
            self._fresh_buffers[factory] = get_flat_buffers(factory())
        if not self._fresh_buffers[factory].numel():
            return False
        set_flat_buffers(module, self._buffers.get(key, self._fresh_buffers[factory]))
        return True

    # -- the ClientContext service --------------------------------------------

    def train(self, clients: list[int], params: torch.Tensor, steps: list[int], *,
              extra_loss: ExtraLoss | None, grad_offset: torch.Tensor | None,
              trainable: torch.Tensor | None = None, trainer: str = "main",
              delta: bool = False) -> tuple[torch.Tensor, np.ndarray]:
        """The clients' new rows (``delta``: minus ``params``) and losses."""
        import torch

        rows, losses = [], []
        for j, c in enumerate(clients):
            tr = self.trainer(c, trainer)
            has_buffers = self._enter_buffers((c, trainer))
            off = None if grad_offset is None else grad_offset[j]
            if trainable is not None and self.local is not None:
                new, loss = self._train_frozen(tr, params[j], int(steps[j]), trainable,
                                               extra_loss=extra_loss, grad_offset=off)
            else:
                frozen = _freeze(self.modules[(c, trainer)], trainable)
                try:
                    with calling(self.local if self.local is not None else None, "train"):
                        new, loss = tr.train(params[j], int(steps[j]), extra_loss=extra_loss,
                                             grad_offset=off)
                finally:
                    for p in frozen:
                        p.requires_grad_(True)
            if has_buffers:
                self._buffers[(c, trainer)] = get_flat_buffers(self.modules[(c, trainer)])
            self._wipe(c, trainer)
            rows.append(new)
            losses.append(loss)
        out = torch.stack(rows)
        return (out.sub_(params) if delta else out), np.asarray(losses, dtype=float)

    def _wipe(self, client: int, trainer: str) -> None:
        """Leave no client's model, gradient or optimizer state in a module
        the clients share (its parameters become zeros); a client's own
        trainer (a local-stage mechanism's) keeps its module: it is that
        client's, on the clients' side."""
        if self.local is not None:
            return
        import torch

        tr = self.trainers[(client, trainer)]
        model = self.modules[(client, trainer)]
        opt = getattr(tr, "optimizer", None)
        if opt is not None:
            opt.state.clear()
            grad_reset(opt)()
        flat = getattr(tr, "flat", None)
        with torch.no_grad():
            if flat is not None:
                flat.zero_()
            else:
                for p in model.parameters():
                    p.zero_()
            for p in model.parameters():
                p.grad = None
            for b in model.buffers():
                if b.is_floating_point():
                    b.zero_()

    def _train_frozen(self, tr: LocalTrainer, w: torch.Tensor, steps: int,
                      trainable: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, float]:
        """A local-stage mechanism's trainer owns its module (Opacus's hooks
        expect every parameter it wrapped to take part): its steps run one at
        a time and the frozen parameters are put back after each, so they do
        not move; their per-example gradients still count in DP-SGD's clipping
        norm (a valid, slightly looser bound), as on the vectorized backend."""
        import torch

        if trainable.numel() != w.numel():
            raise ValueError(f"trainable mask has {trainable.numel()} values, the model has "
                             f"{w.numel()} parameters")
        keep = trainable.to(torch.bool)
        seen = []
        for _ in range(steps):
            with calling(self.local, "train"):  # type: ignore[arg-type]
                new, loss = tr.train(w, 1, **kw)
            w = torch.where(keep, new, w)
            if np.isfinite(loss):
                seen.append(loss)
        return w.clone(), float(np.mean(seen)) if seen else float("nan")

    def trainer(self, client: int, name: str = "main") -> LocalTrainer:
        """``client``'s trainer ``name``: the local-stage mechanism's (one model
        per client and name, made private once per cell), or an SGD trainer
        on the model and optimizer its architecture shares with the other
        clients (its own batch stream, seeded like the first)."""
        key = (client, name)
        if key not in self.trainers:
            data = self.parts.sites[client].train
            factory = self.factory_for(client)
            if self.local is not None:
                with calling(self.local, "local_trainer"):  # type: ignore[arg-type]
                    model = factory()
                    self.trainers[key] = self.local.local_trainer(self.ctx, client, model, data)
            else:
                if factory not in self._shared:
                    model = factory()
                    self._shared[factory] = (model, self.ctx.settings.make_optimizer(
                        model.parameters()))
                model, opt = self._shared[factory]
                self.trainers[key] = SGDTrainer(model, data, self.ctx.settings,
                                                seed=self.ctx.batch_seed(client),
                                                optimizer=opt)
            self.modules[key] = model
        return self.trainers[key]

    def holdout(self, client: int) -> Split | None:
        return self.parts.holdout.get(client)

    def site(self, client: int) -> Site:
        return self.parts.sites[client]

    def factory_for(self, client: int) -> Callable[[], torch.nn.Module]:
        return self.parts.factory_for(client)


def _freeze(module: torch.nn.Module, trainable: torch.Tensor | None) -> list[Any]:
    """Turn off ``requires_grad`` of the parameters outside ``trainable`` (a
    flat boolean mask, whole tensors only); return them to turn back on."""
    if trainable is None:
        return []
    frozen, off = [], 0
    params = list(module.named_parameters())
    total = sum(p.numel() for _, p in params)
    if trainable.numel() != total:
        raise ValueError(f"trainable mask has {trainable.numel()} values, the model has "
                         f"{total} parameters")
    for name, p in params:
        part = trainable[off:off + p.numel()]
        off += p.numel()
        if bool(part.any()) and not bool(part.all()):
            raise ValueError(f"trainable masks whole parameter tensors: {name} is partly "
                             f"frozen")
        if not bool(part.any()):
            frozen.append(p)
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _finalized(out: Any, algorithm: Any, k: int) -> torch.Tensor:
    import torch

    from fedmedbench.errors import PluginError

    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != k:
        raise PluginError(f"finalize returned {type(out).__name__}"
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}, not "
                          f"the ({k}, D) models to evaluate", plugin=algorithm.plugin,
                          component=algorithm.name, hook="finalize", exc_type="TypeError")
    return out


def _checked(out: Any, algorithm: Any, clients: list[int]) -> Updates:
    from fedmedbench.errors import PluginError

    if not isinstance(out, Updates):
        raise PluginError(f"client_update returned {type(out).__name__}, not fedmedbench.Updates "
                          f"(return ctx.update(delta))", plugin=algorithm.plugin,
                          component=algorithm.name, hook="client_update", exc_type="TypeError")
    if list(out.clients) != list(clients):
        raise PluginError(f"client_update for clients {clients} returned updates of "
                          f"{list(out.clients)}", plugin=algorithm.plugin,
                          component=algorithm.name, hook="client_update", exc_type="ValueError")
    return out


def choose_backend(cell: Cell, requested: str, *, batch_norm: bool = False) -> tuple[str, str]:
    """(backend, reason) for the cell: ``requested`` is ``auto``, ``loop`` or
    ``vectorized``; a component that cannot run vectorized forces ``loop``
    (named in the reason; an explicit ``vectorized`` then falls back too)."""
    if requested == "loop":
        return "loop", "requested"
    alg, model, local = cell.clients.algorithm, cell.model, cell.clients.local_stage
    blockers = []
    if not alg.vectorized:
        blockers.append(f"algorithm {alg.name} (vectorized = False)")
    drop = ""
    if model is not None:
        from fedmedbench.cell import peek_model
        from fedmedbench.compiled import DRAWS_ON_COMPILED_ONLY, compile_model, drawing_dropout

        drop = drawing_dropout(peek_model(cell.factory))
    if model is not None and not model.vectorized:
        why = ": BatchNorm updates its running statistics, buffers, in place" if batch_norm \
            else (f": {drop} draws masks" if drop else "")
        blockers.append(f"model {model.name} (vectorized = False{why})")
    elif drop:  # masks drawn by the compiled step only: not on its per-example or vmap paths
        if local is not None:
            blockers.append(f"model {model.name}: {drop} {DRAWS_ON_COMPILED_ONLY}, and privacy "
                            f"{local.name}'s per-example steps are not compiled")  # type: ignore[attr-defined]
        else:
            compiled, why = compile_model(peek_model(cell.factory))
            if compiled is None:
                blockers.append(f"model {model.name}: {drop} {DRAWS_ON_COMPILED_ONLY}, and the "
                                f"model does not compile ({why})")
    if cell.client_factories:
        blockers.append(f"algorithm {alg.name} gives clients their own architectures")
    if local is not None and local.vector_steps(cell.clients_ctx) is None:
        blockers.append(f"privacy {local.name} has no vectorized form")  # type: ignore[attr-defined]
    if blockers:
        return "loop", "fell back to loop: " + "; ".join(blockers)
    if requested == "auto" and cell.per_round < 2:
        return "loop", "one client per round: nothing to vectorize"
    return "vectorized", "requested" if requested == "vectorized" else (
        "every component of the cell runs vectorized")


def make_backend(name: str, parts: ClientData, *, device: str = "cpu") -> LoopBackend:
    """The backend ``name`` over the clients' ``parts``; ``device`` is where
    the vectorized backend trains (``cpu``, the default and the reference,
    ``cuda`` or ``cuda:N``); the loop backend trains on the CPU."""
    if name == "vectorized":
        from fedmedbench.vectorized import VectorBackend

        return VectorBackend(parts, device=device)
    return LoopBackend(parts)
