"""Stages, and the meters that observe the round: time, bytes, the server's view.

A round runs each stage through :meth:`Stages.run`, which calls the
component (turning a plugin's exception into a
:class:`~fedmedbench.errors.PluginError` naming plugin, component and hook),
checks the type of what it returned and charges its seconds to a cost
bucket (:class:`Clock`). What crosses between the parties is *published* as
a typed message (:mod:`fedmedbench.messages`), and the meters subscribe to
message types, not to stage names: the :class:`ByteMeter` counts
:attr:`Broadcast.nbytes <fedmedbench.messages.Broadcast.nbytes>` down and
:attr:`Sent.nbytes <fedmedbench.messages.Sent.nbytes>` up, and the
:class:`ViewRecorder` keeps the server's view of a round, a pure function
of what it :class:`~fedmedbench.messages.Received`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fedmedbench.components import Component, Sharing, Updates
from fedmedbench.errors import INTERRUPTED, ConfigError, DataError, Diverged, PluginError, Skip
from fedmedbench.messages import Broadcast, Received, Sent, ServerView, view_of

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = ["Stages", "Clock", "ByteMeter", "ViewRecorder", "calling", "VIEW_ROUNDS",
           "contained_message"]

#: rounds whose server view is kept for attacks (plus the last)
VIEW_ROUNDS = (1,)

#: which cost bucket a stage's seconds go to
TIME_BUCKETS = {
    "local": "train_s", "pretrain": "train_s", "finalize": "train_s",
    "update": "privacy_s", "encode": "privacy_s", "secure_aggregate": "privacy_s",
    "server": "privacy_s", "privacy_setup": "privacy_s", "begin_round": "privacy_s",
    "end_round": "privacy_s", "privacy_broadcast": "privacy_s", "drop": "privacy_s",
}


def contained_message(exc: BaseException) -> str:
    """How a plugin's exception reads in a record: ``sys.exit(3)`` is named as
    the call it was, not as a bare ``SystemExit: 3``."""
    if isinstance(exc, SystemExit):
        return (f"plugin code called sys.exit({exc.code!r}); the cell was stopped and the "
                f"other cells went on")
    return f"{type(exc).__name__}: {exc}"


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
            contained_message(exc), plugin=comp.plugin or type(comp).__module__,
            component=comp.name, hook=hook, exc_type=type(exc).__name__,
        ) from exc


#: what each stage must return, checked where the round uses it
def _expect(stage: str, out: Any, comp: Component | None, hook: str) -> None:
    import torch

    want: type | tuple[type, ...] | None = {
        "local": Updates, "client_metrics": Updates, "adversary": Updates,
        "update": Updates, "compress": Updates, "aggregate": torch.Tensor,
        "secure_aggregate": torch.Tensor, "server": torch.Tensor,
        "server_update": torch.Tensor, "broadcast": dict}.get(stage)
    if want is None or comp is None or isinstance(out, want):
        return
    names = want.__name__ if isinstance(want, type) else " or ".join(w.__name__ for w in want)
    raise PluginError(f"{hook} returned {type(out).__module__}.{type(out).__name__}, not "
                      f"{names}", plugin=comp.plugin or type(comp).__module__,
                      component=comp.name, hook=hook, exc_type="TypeError")


class Stages:
    """Runs the stages of a round (timed, attributed, type-checked) and
    publishes the messages that cross between parties to their subscribers."""

    def __init__(self, clock: Clock, subscribers: Sequence[Any] = ()) -> None:
        self.clock = clock
        self._subs: dict[type, list[Callable[[Any], None]]] = {}
        for s in subscribers:
            for kind, fn in s.subscriptions().items():
                self._subs.setdefault(kind, []).append(fn)

    def run(self, stage: str, comp: Component | None, hook: str, fn: Callable[..., Any],
            *args: Any) -> Any:
        t0 = time.perf_counter()
        with calling(comp, hook):
            out = fn(*args)
        _expect(stage, out, comp, hook)
        self.clock.charge(stage, time.perf_counter() - t0)
        return out

    def publish(self, message: Any) -> None:
        """Tell the subscribers of ``type(message)`` that it crossed."""
        for fn in self._subs.get(type(message), ()):
            fn(message)


class Clock:
    """Seconds by cost bucket (``train_s``, ``privacy_s``)."""

    def __init__(self) -> None:
        self.seconds = {"train_s": 0.0, "privacy_s": 0.0}

    def charge(self, stage: str, dt: float) -> None:
        bucket = TIME_BUCKETS.get(stage)
        if bucket:
            self.seconds[bucket] += dt


class ByteMeter:
    """Bytes down (every :class:`Broadcast`) and up (every :class:`Sent`):
    properties of the messages that crossed."""

    def __init__(self) -> None:
        self.up = 0
        self.down = 0

    def subscriptions(self) -> dict[type, Callable[[Any], None]]:
        return {Broadcast: self._down, Sent: self._up}

    def _down(self, b: Broadcast) -> None:
        self.down += b.nbytes

    def _up(self, s: Sent) -> None:
        self.up += s.nbytes


class ViewRecorder:
    """Keeps the server's view of rounds :data:`VIEW_ROUNDS` and the last one:
    :func:`~fedmedbench.messages.view_of` what it received and the model it
    sent that round."""

    def __init__(self, rounds: int, sharing: Sharing, transport_view: str | None) -> None:
        self.keep = set(VIEW_ROUNDS) | {rounds}
        self.sharing = sharing
        self.transport_view = transport_view
        self.views: dict[int, ServerView] = {}
        self._broadcast: Broadcast | None = None

    def subscriptions(self) -> dict[type, Callable[[Any], None]]:
        return {Broadcast: self._sent_model, Received: self._received}

    def _sent_model(self, b: Broadcast) -> None:
        self._broadcast = b if b.round in self.keep else None

    def _received(self, r: Received) -> None:
        b = self._broadcast
        if r.round not in self.keep or b is None or b.round != r.round:
            return
        self.views[r.round] = view_of(r, b, sharing=self.sharing,
                                      server_view=self.transport_view)
