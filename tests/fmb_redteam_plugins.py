"""Adversarial plugins for the threat-model tests (tests/test_threat_model.py).

Registered through a real entry point (the test writes a ``.dist-info`` with
an ``entry_points.txt`` naming this module), exactly as a third-party plugin.

- ``redteam-fedavg`` is FedAvg whose *client* half writes down, for the test,
  what each client computed (its starting model and its delta: what a client
  legitimately knows of itself), and whose *server* half walks everything
  reachable from what the server hands it and keeps what it found.
- ``redteam-walk`` is an attack that walks everything reachable from its
  :class:`~fedmedbench.AttackContext` (and from itself).
- ``redteam-undeclared`` puts a field on its update that ``sends`` does not
  declare (a copy of the delta, smuggled to the server).
- ``redteam-fedbuff`` is ``redteam-fedavg`` on the buffered (asynchronous)
  protocol (FedBuff): its clients' updates wait on their side until they
  arrive, and its server half walks what each buffer hands it.
- an ``on_round_end`` observer walks what it is given.

The walk follows attributes (``__dict__``, ``__slots__``), containers,
closures, bound methods' ``__self__``, ``functools.partial``, weak
references, generator frames, tensors' ``_base``/``.grad`` and arrays'
``.base``, and then ``gc.get_referrers`` of every tensor and array it holds
(and walks on from those). It does not enter modules, classes or a
function's globals: in-process plugin code can always ``import`` the engine
or read ``sys.modules``; that is what ``[evaluate] isolate = true`` is for.
"""

from __future__ import annotations

import functools
import gc
import sys
import types
import weakref
from collections import deque
from typing import Any

import numpy as np
import torch

from fedmedbench import Attack, hookimpl
from fedmedbench.plugins.algorithms.fedavg import FedAvg
from fedmedbench.plugins.algorithms.fedbuff import FedBuff

#: (round, client) -> {"start": array, "delta": array}: what each client computed
TRUTH: dict[tuple[int, int], dict[str, np.ndarray]] = {}
#: who walked -> list of findings ({"arrays": [...], "secrets": [...], "round": r})
FOUND: dict[str, list[dict[str, Any]]] = {"server_update": [], "attack": [], "observer": []}

#: objects that hold a party's secrets (by type name)
SECRET_TYPES = frozenset({"X25519PrivateKey", "AESGCM", "_Client", "KeyHolder"})
MIN_LEN = 16  # arrays shorter than this cannot be a model-sized vector's row


def reset() -> None:
    TRUTH.clear()
    for v in FOUND.values():
        v.clear()


def _is_private_context(o: Any) -> bool:
    mod = type(o).__module__ or ""
    if not mod.startswith("tenseal"):
        return False
    try:
        return bool(o.is_private())
    except Exception:  # not a context
        return False


def walk(*roots: Any, limit: int = 3_000_000) -> dict[str, Any]:
    """Everything reachable from ``roots`` (module docstring): the float
    arrays found (flattened float64 copies; each row of a 2-D one too) and
    the secret-holding objects found (type names)."""
    walker_ids: set[int] = set()
    seen: set[int] = set()
    # the dicts are kept alive while the walk runs: an id of a dict freed meanwhile
    # could be reused by an instance's lazily materialised __dict__
    held = [vars(m) for m in list(sys.modules.values())
            if isinstance(m, types.ModuleType) and isinstance(getattr(m, "__dict__", None), dict)]
    module_dicts = {id(d) for d in held}
    arrays: list[np.ndarray] = []
    secrets: list[str] = []
    pending_ref: list[Any] = []
    stack: list[Any] = list(roots)
    for c in (seen, arrays, secrets, pending_ref, stack, walker_ids, roots, held):
        walker_ids.add(id(c))
    seen |= walker_ids
    truth_ids = {id(TRUTH), id(FOUND), *map(id, FOUND.values())}
    seen |= truth_ids

    def push(x: Any) -> None:
        if id(x) not in seen:
            stack.append(x)

    def keep(a: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.float64)
        if a.ndim == 1 and a.size >= MIN_LEN:
            arrays.append(a.copy())
        elif a.ndim == 2 and a.shape[1] >= MIN_LEN and a.shape[0] <= 4096:
            arrays.extend(r.copy() for r in a)
        if a.size >= MIN_LEN and a.ndim > 2:
            arrays.append(a.reshape(-1).copy())

    n = 0
    for _ in range(6):  # forward walk, then the referrers of what it found, until nothing new
        while stack:
            o = stack.pop()
            if id(o) in seen:
                continue
            seen.add(id(o))
            n += 1
            if n > limit:
                raise RuntimeError("walk limit reached")
            if o is None or isinstance(o, (str, bytes, bytearray, int, float, complex, bool,
                                           range, types.ModuleType, type, types.FrameType,
                                           types.CodeType, types.BuiltinFunctionType)):
                continue
            if id(o) in module_dicts:
                continue
            tn = type(o).__name__
            if tn in SECRET_TYPES or _is_private_context(o):
                secrets.append(tn if tn in SECRET_TYPES else "private CKKS context")
            if isinstance(o, torch.Tensor):
                if o.is_floating_point() and o.layout == torch.strided:
                    keep(o.detach().cpu().numpy())
                for a in (getattr(o, "_base", None), o.grad):
                    if a is not None:
                        push(a)
                pending_ref.append(o)
                continue
            if isinstance(o, np.ndarray):
                if o.dtype.kind == "f":
                    keep(o)
                elif o.dtype == object:
                    for x in o.ravel().tolist():
                        push(x)
                if o.base is not None:
                    push(o.base)
                pending_ref.append(o)
                continue
            if isinstance(o, dict):
                for k, v in list(o.items()):
                    push(k)
                    push(v)
            elif isinstance(o, (list, tuple, set, frozenset, deque)):
                for x in list(o):
                    push(x)
            elif isinstance(o, types.FunctionType):
                for cell in o.__closure__ or ():
                    try:
                        push(cell.cell_contents)
                    except ValueError:  # an empty cell
                        pass
                push(o.__defaults__)
                push(o.__kwdefaults__)
                continue
            elif isinstance(o, types.MethodType):
                push(o.__self__)
                push(o.__func__)
                continue
            elif isinstance(o, functools.partial):
                push(o.func)
                push(o.args)
                push(o.keywords)
            elif isinstance(o, (types.GeneratorType, types.CoroutineType)):
                fr = getattr(o, "gi_frame", None) or getattr(o, "cr_frame", None)
                if fr is not None:
                    push(dict(fr.f_locals))
            elif isinstance(o, weakref.ref):
                push(o())
            d = getattr(o, "__dict__", None)
            if isinstance(d, dict):
                push(d)
            for klass in type(o).__mro__:
                for s in getattr(klass, "__slots__", ()) or ():
                    if isinstance(s, str) and s not in ("__dict__", "__weakref__"):
                        try:
                            push(getattr(o, s))
                        except AttributeError:
                            pass
        if not pending_ref:
            break
        refs = gc.get_referrers(*pending_ref)
        pending_ref.clear()
        for r in refs:
            if isinstance(r, types.FrameType) or id(r) in seen:
                continue
            stack.append(r)
        del refs
    return {"arrays": arrays, "secrets": sorted(set(secrets)), "visited": n}


class RedTeamFedAvg(FedAvg):
    """FedAvg whose client half records the truth and whose server half walks."""

    name = "redteam-fedavg"
    vectorized = True

    def client_update(self, ctx, global_params):
        upd = super().client_update(ctx, global_params)
        start = global_params if global_params.dim() == 2 else \
            global_params.unsqueeze(0).expand(len(ctx.clients), -1)
        for j, c in enumerate(ctx.clients):
            TRUTH[(int(ctx.round), int(c))] = {
                "start": start[j].detach().double().numpy().copy(),
                "delta": upd.delta[j].detach().double().numpy().copy()}
        return upd

    def server_update(self, ctx, global_params, aggregate, received):
        found = walk(self, ctx, global_params, aggregate, received)
        found["round"] = int(ctx.round)
        FOUND["server_update"].append(found)
        return super().server_update(ctx, global_params, aggregate, received)


class RedTeamFedBuff(FedBuff):
    """FedBuff with redteam-fedavg's truth-recording client half and walking server half."""

    name = "redteam-fedbuff"
    vectorized = True

    def client_update(self, ctx, global_params):
        upd = super().client_update(ctx, global_params)
        start = global_params if global_params.dim() == 2 else \
            global_params.unsqueeze(0).expand(len(ctx.clients), -1)
        for j, c in enumerate(ctx.clients):
            TRUTH[(int(ctx.round), int(c))] = {
                "start": start[j].detach().double().numpy().copy(),
                "delta": upd.delta[j].detach().double().numpy().copy()}
        return upd

    def server_update(self, ctx, global_params, aggregate, received):
        found = walk(self, ctx, global_params, aggregate, received)
        found["round"] = int(ctx.round)
        FOUND["server_update"].append(found)
        return super().server_update(ctx, global_params, aggregate, received)


class Undeclared(FedAvg):
    """Smuggles a copy of each delta in a field it does not declare."""

    name = "redteam-undeclared"
    vectorized = True

    def client_update(self, ctx, global_params):
        upd = super().client_update(ctx, global_params)
        return ctx.update(upd.delta, smuggled=upd.delta.clone())

    def server_update(self, ctx, global_params, aggregate, received):
        return super().server_update(ctx, global_params, aggregate, received)


class WalkAttack(Attack):
    """Walks everything reachable from the attack context."""

    name = "redteam-walk"

    def __init__(self) -> None:
        pass

    def evaluate(self, ctx):
        found = walk(self, ctx)
        FOUND["attack"].append(found)
        return {"visited": found["visited"], "secrets": found["secrets"]}


class ExitAttack(Attack):
    """Ends its process (as a crashing native extension would)."""

    name = "redteam-exit"

    def __init__(self) -> None:
        pass

    def evaluate(self, ctx):
        import os
        import sys

        print("redteam-exit: leaving now", file=sys.stderr, flush=True)
        os._exit(3)


class HangAttack(Attack):
    """Never returns."""

    name = "redteam-hang"

    def __init__(self) -> None:
        pass

    def evaluate(self, ctx):
        import time

        time.sleep(3600)


@hookimpl
def register_algorithms(register):
    register(RedTeamFedAvg)
    register(RedTeamFedBuff)
    register(Undeclared)


@hookimpl
def register_attacks(register):
    register(WalkAttack)
    register(ExitAttack)
    register(HangAttack)


@hookimpl
def on_round_end(cell, round, metrics):
    found = walk(cell, metrics)
    found["round"] = int(round)
    FOUND["observer"].append(found)


__all__ = ["TRUTH", "FOUND", "walk", "reset"]
