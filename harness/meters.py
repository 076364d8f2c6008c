"""Stages and the observers that wrap them: time, bytes, the server's view.

A round protocol runs each stage of the round through :meth:`Stages.run`,
which calls the component (turning a plugin's exception into a
:class:`~fedmedbench.errors.PluginError` naming plugin, component and hook)
and then tells every observer what the stage produced. Metering is not
interleaved with the round: the :class:`Clock` charges seconds by stage, the
:class:`ByteMeter` counts what crosses the network from the fields that are
sent, and the :class:`ViewRecorder` keeps what the server read.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmedbench.components import Component, Message, Updates
from fedmedbench.context import ServerView
from fedmedbench.errors import INTERRUPTED, ConfigError, DataError, Diverged, PluginError, Skip

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Stages", "Clock", "ByteMeter", "ViewRecorder", "calling", "VIEW_ROUNDS"]

#: rounds whose server view is kept for attacks (plus the last)
VIEW_ROUNDS = (1,)

#: which cost bucket a stage's seconds go to
TIME_BUCKETS = {
    "local": "train_s", "pretrain": "train_s",
    "update": "privacy_s", "encode": "privacy_s", "secure_aggregate": "privacy_s",
    "server": "privacy_s", "privacy_setup": "privacy_s", "begin_round": "privacy_s",
}


@contextlib.contextmanager
def calling(comp: Component | None, hook: str) -> Iterator[None]:
    """Attribute an exception raised inside to ``comp``'s plugin and ``hook``.

    Harness errors (config, data, divergence, skips) and errors already
    attributed pass through. ``SystemExit`` and ``KeyboardInterrupt`` raised
    by plugin code become a :class:`PluginError` too: a plugin cannot end the
    run or fake an interrupt. The user's Ctrl-C (the command line's SIGINT
    handler sets :data:`fedmedbench.errors.INTERRUPTED`) still interrupts.
    """
    try:
        yield
    except (PluginError, Diverged, Skip, ConfigError, DataError):
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        if comp is None or (isinstance(exc, KeyboardInterrupt) and INTERRUPTED.is_set()):
            raise
        raise PluginError(
            f"{type(exc).__name__}: {exc}", plugin=comp.plugin or type(comp).__module__,
            component=comp.name, hook=hook, exc_type=type(exc).__name__,
        ) from exc


#: what each stage must return, checked where the round uses it
def _expect(stage: str, out: Any, comp: Component | None, hook: str) -> None:
    import torch

    want: type | tuple[type, ...] | None = {
        "local": Updates, "client_metrics": Updates, "adversary": Updates,
        "update": Updates, "compress": Updates, "aggregate": torch.Tensor,
        "secure_aggregate": torch.Tensor, "server": torch.Tensor,
        "server_update": torch.Tensor, "encode": list}.get(stage)
    if want is None or comp is None or isinstance(out, want):
        return
    names = want.__name__ if isinstance(want, type) else " or ".join(w.__name__ for w in want)
    raise PluginError(f"{hook} returned {type(out).__module__}.{type(out).__name__}, not "
                      f"{names}", plugin=comp.plugin or type(comp).__module__,
                      component=comp.name, hook=hook, exc_type="TypeError")


class Stages:
    """Runs the stages of a round and tells the observers what each produced."""

    def __init__(self, observers: Sequence[Any]) -> None:
        self.observers = list(observers)
        self.round = 0

    def run(self, stage: str, comp: Component | None, hook: str, fn: Callable[..., Any],
            *args: Any) -> Any:
        t0 = time.perf_counter()
        with calling(comp, hook):
            out = fn(*args)
        _expect(stage, out, comp, hook)
        dt = time.perf_counter() - t0
        for o in self.observers:
            o.after(stage, out, dt, self.round)
        return out


class Clock:
    """Seconds by cost bucket (``train_s``, ``privacy_s``)."""

    def __init__(self) -> None:
        self.seconds = {"train_s": 0.0, "privacy_s": 0.0}

    def after(self, stage: str, out: Any, dt: float, rnd: int) -> None:
        bucket = TIME_BUCKETS.get(stage)
        if bucket:
            self.seconds[bucket] += dt


class ByteMeter:
    """Bytes up and down, from what is sent.

    Stage outputs it reads: ``broadcast`` (a list of bytes per participating
    client), ``send`` (plaintext :class:`Updates`: the serialized size of the
    fields the algorithm ``sends``), ``encode`` (transport :class:`Message`
    list; their final sizes, which a protocol may grow during
    ``secure_aggregate`` with unmasking shares, are read then).
    """

    def __init__(self, sends: Sequence[str]) -> None:
        self.sends = tuple(sends)
        self.up = 0
        self.down = 0
        self._messages: list[Message] = []

    def after(self, stage: str, out: Any, dt: float, rnd: int) -> None:
        if stage == "broadcast":
            self.down += int(sum(out))
        elif stage == "send":
            self.up += int(sum(out.row_bytes(self.sends)))
        elif stage == "encode":
            self._messages = list(out)
        elif stage == "secure_aggregate":
            self.up += int(sum(m.nbytes for m in self._messages))
            self._messages = []


class ViewRecorder:
    """Keeps the server's view of rounds :data:`VIEW_ROUNDS` and the last one.

    ``applies_aggregate``: whoever runs the server update reads the (decrypted)
    aggregate it applies, so under HE the view of such a round is the
    aggregate (DESIGN, "Threat model").
    """

    def __init__(self, rounds: int, sends: Sequence[str], transport_view: str | None,
                 global_params: Callable[[], torch.Tensor], metric_keys: Callable[[], set[str]],
                 applies_aggregate: bool = True) -> None:
        self.keep = set(VIEW_ROUNDS) | {rounds}
        self.sends = tuple(sends)
        self.transport_view = transport_view
        self.global_params = global_params
        self.metric_keys = metric_keys
        self.applies_aggregate = applies_aggregate
        self.views: dict[int, ServerView] = {}
        self._w: torch.Tensor | None = None
        self._messages: list[Message] = []
        self._meta: Updates | None = None

    def after(self, stage: str, out: Any, dt: float, rnd: int) -> None:
        if rnd not in self.keep:
            return
        if stage == "broadcast":
            self._w = self.global_params().clone()
        elif stage == "send":
            self.views[rnd] = self._plaintext(rnd, out)
        elif stage == "encode":
            self._messages = list(out)
        elif stage == "metadata":
            self._meta = out
        elif stage == "weights":
            self._weights = np.asarray(out, dtype=float)
        elif stage == "secure_aggregate":
            self.views[rnd] = self._transport(rnd, out)
            self._messages = []

    def _base(self, rnd: int, kind: str, u: Updates) -> ServerView:
        assert self._w is not None
        keys = self.metric_keys()
        return ServerView(
            rnd, kind, list(u.clients), self._w,
            num_examples=dict(zip(u.clients, (int(n) for n in u.num_examples))),
            metrics={k: dict(zip(u.clients, (float(x) for x in np.asarray(v))))
                     for k, v in u.metrics.items() if k in keys},
            extra={k: dict(zip(u.clients, _rows(u.extra[k], len(u))))
                   for k in self.sends if k != "delta" and k in u.extra})

    def _plaintext(self, rnd: int, u: Updates) -> ServerView:
        view = self._base(rnd, "plaintext", u)
        if "delta" in self.sends:
            view.updates = {c: u.delta[i].detach().clone() for i, c in enumerate(u.clients)}
        return view

    def _transport(self, rnd: int, aggregate: torch.Tensor) -> ServerView:
        import torch

        meta = self._meta
        assert meta is not None
        kind = str(self.transport_view)
        if kind == "ciphertext" and self.applies_aggregate:
            kind = "aggregate"
        view = self._base(rnd, kind, meta)
        if kind == "aggregate":
            view.aggregate = aggregate.detach().clone()
        weights = dict(zip(meta.clients, getattr(self, "_weights", np.ones(len(meta)))))
        for m in self._messages:  # what each message shows in the clear (partial HE)
            if m.readable is not None:
                mask, values = m.readable
                full = torch.zeros_like(aggregate)
                # the server knows each client's aggregation weight: it reads the update
                scale = float(weights.get(m.client, 1.0)) or 1.0
                full[torch.as_tensor(mask)] = values.to(full.dtype) / scale
                view.updates[m.client] = full
                view.readable[m.client] = np.asarray(mask, dtype=bool)
        return view


def _rows(v: Any, k: int) -> list[Any]:
    return list(v) if isinstance(v, list) else [v[i] for i in range(k)]
