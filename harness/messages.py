"""What crosses between the parties of a round, as typed values.

One round, by type (``docs/architecture.md`` draws it)::

    server  --Broadcast-->  clients          the model (its shared part), the
                                             algorithm's broadcast fields
    clients: Updates                         what they computed (client side:
                                             local training, adversary, update
                                             privacy, compression)
    clients --Sent-->       server           built once by :func:`seal`: copies
                                             of the declared fields only, the
                                             sharing mask applied, or one
                                             transport Message per client
    server: Received                         what the server can read of Sent:
                                             each client's fields (plaintext)
                                             or only their sums (transport)
    server: aggregate -> server_update       the next global model

Every value here is built from copies: a :class:`Sent` holds no reference to
the clients' :class:`~fedmedbench.Updates`, a :class:`Received` none to the
messages' secrets, and a :class:`~fedmedbench.ServerView` is a pure function
of a :class:`Received` and the round's :class:`Broadcast`. Bytes are a
property of the message that crossed (:attr:`Broadcast.nbytes`,
:attr:`Sent.nbytes`).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fedmedbench.components import Message, Sharing, Updates
from fedmedbench.errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedmedbench.components import Component

__all__ = ["Broadcast", "Sent", "Received", "ServerView", "seal", "receive", "view_of",
           "RowsHidden", "CLIENT_ONLY_FIELDS"]

#: extra fields a client's update may carry that never leave the client
#: (the personalized protocol's separate personal model)
CLIENT_ONLY_FIELDS = ("personal",)

_K = TypeVar("_K")
_V = TypeVar("_V")


def _frozen(d: Mapping[_K, _V] | None) -> Mapping[_K, _V]:
    return types.MappingProxyType(dict(d or {}))


def _copy(v: Any) -> Any:
    """A copy holding no reference to ``v`` (tensors detached and cloned, so
    neither ``_base`` nor an autograd graph leads back)."""
    import torch

    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _nbytes(x: Any) -> int:
    if hasattr(x, "element_size") and hasattr(x, "numel"):
        return int(x.numel() * x.element_size())
    return int(np.asarray(x).nbytes)


class RowsHidden(AttributeError):
    """Individual rows were asked of what a transport shows only as a sum."""


@dataclass(frozen=True, eq=False)
class Broadcast:
    """What the server sends each of the round's clients.

    Attributes
    ----------
    round : int
    clients : tuple of int
        The round's clients.
    params : torch.Tensor, shape (D,)
        The global model as sent (a copy; under a partial send the clients
        take its shared parameters).
    fields : mapping of str to torch.Tensor
        The algorithm's :meth:`~fedmedbench.Algorithm.broadcast` values.
    privacy : mapping of str to mapping
        Each privacy mechanism's :meth:`~fedmedbench.PrivacyMechanism.broadcast`
        values, by mechanism name (an adaptive clipping norm).
    per_client_bytes : int
        What each client receives: the model's shared part (and running
        statistics when they are averaged), the fields, a transport's keys.
    """

    round: int
    clients: tuple[int, ...]
    params: torch.Tensor
    fields: Mapping[str, torch.Tensor]
    per_client_bytes: int
    privacy: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _frozen({}))

    @property
    def nbytes(self) -> int:
        return int(self.per_client_bytes) * len(self.clients)


@dataclass(frozen=True, eq=False)
class Sent:
    """What crossed from the round's clients to the server (built by :func:`seal`).

    Attributes
    ----------
    round : int
    clients : tuple of int
    num_examples : tuple of int
        Each client's training-set size (public metadata, named as such in
        the record).
    metrics : mapping of str to numpy.ndarray
        Numbers sent in the clear, one per client: the training ``loss``
        (without DP), an aggregator's scores, a privacy mechanism's
        declared :attr:`~fedmedbench.PrivacyMechanism.metric_keys`.
    fields : mapping of str to torch.Tensor
        Without a transport: each field of :attr:`~fedmedbench.Algorithm.sends`
        (``"delta"`` zero outside the shared parameters), rows (k, ...).
    messages : tuple of Message
        Under a transport: one encoded message per client (the payloads are
        the transport's; their ``nbytes`` final once it has aggregated).
    weights : numpy.ndarray or None
        The aggregation weights the clients scaled their updates by before
        encoding (transport), or ``None``.
    field_bytes : mapping of str to tuple of int
        Without a transport: each field's serialized size per client.
    layout : tuple of (str, int)
        Under a transport: the encoded vector's parts in order, as (field,
        values): the delta's shared coordinates, then each summed field.
    """

    round: int
    clients: tuple[int, ...]
    num_examples: tuple[int, ...]
    metrics: Mapping[str, np.ndarray]
    fields: Mapping[str, torch.Tensor] = field(default_factory=lambda: _frozen({}))
    messages: tuple[Message, ...] = ()
    weights: np.ndarray | None = None
    field_bytes: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: _frozen({}))
    layout: tuple[tuple[str, int], ...] = ()
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: _frozen({}))

    def __len__(self) -> int:
        return len(self.clients)

    @property
    def row_bytes(self) -> list[int]:
        """Bytes each client sent (read after the transport aggregated)."""
        if self.messages:
            return [int(m.nbytes) for m in self.messages]
        out = [0] * len(self.clients)
        for sizes in self.field_bytes.values():
            out = [a + int(b) for a, b in zip(out, sizes)]
        return out

    @property
    def nbytes(self) -> int:
        return int(sum(self.row_bytes))


@dataclass(frozen=True, eq=False)
class Received:
    """What the server can read of a round's :class:`Sent`.

    ``kind`` is ``"plaintext"`` (``rows`` holds each client's declared
    fields) or ``"aggregate"`` (a transport: ``sums`` holds the (weighted)
    sum of the deltas under ``"delta"`` and the plain sum of each summed
    field; no individual row is readable, except the coordinates a partial
    encryption sends in the clear, ``readable``). Everything is a copy.

    The attribute names of :class:`~fedmedbench.Updates` work on the
    plaintext kind (``delta``, ``extra``, ``num_examples``, ``metrics``,
    ``clients``); under a transport ``delta`` and ``extra`` raise
    :class:`RowsHidden` naming the transport, and :meth:`sum` gives what is
    readable.
    """

    round: int
    kind: str
    clients: tuple[int, ...]
    num_examples: tuple[int, ...]
    metrics: Mapping[str, np.ndarray]
    rows: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    sums: Mapping[str, torch.Tensor] = field(default_factory=lambda: _frozen({}))
    readable: Mapping[int, tuple[np.ndarray, torch.Tensor]] = field(
        default_factory=lambda: _frozen({}))
    weights: np.ndarray | None = None
    transport: str | None = None
    #: clients of the round whose input did not reach the sum (the network twin's
    #: dropouts under a transport; the server knows who sent no input)
    dropped: tuple[int, ...] = ()
    #: per client, how many server updates happened since the model it trained
    #: from was sent (asynchronous protocols; the server knows it); empty otherwise
    staleness: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.clients)

    @property
    def contributors(self) -> tuple[int, ...]:
        """The clients whose update reached what the server applies
        (:attr:`clients` less :attr:`dropped`)."""
        if not self.dropped:
            return self.clients
        out = set(self.dropped)
        return tuple(c for c in self.clients if c not in out)

    def _hidden(self, what: str) -> RowsHidden:
        return RowsHidden(
            f"received.{what}: under {self.transport} the server reads only sums, not each "
            f"client's rows; use received.sum(field) (declare the field in the algorithm's "
            f"`summed`), or run without a transport")

    @property
    def delta(self) -> torch.Tensor:
        """Each client's delta, (k, D) (plaintext only)."""
        if self.kind != "plaintext":
            raise self._hidden("delta")
        if "delta" not in self.rows:
            raise AttributeError("the clients of this cell send no delta (the algorithm's "
                                 "`sends` does not list it)")
        return self.rows["delta"]

    @property
    def extra(self) -> Mapping[str, Any]:
        """Each client's other sent fields, by name (plaintext only)."""
        if self.kind != "plaintext":
            raise self._hidden("extra")
        return _frozen({k: v for k, v in self.rows.items() if k != "delta"})

    def sum(self, name: str) -> torch.Tensor:
        """The sum over the round's clients of field ``name`` (the delta's
        is weighted by the aggregation weights under a transport)."""
        if name in self.sums:
            return self.sums[name]
        if self.kind == "plaintext" and name in self.rows:
            return self.rows[name].sum(0)
        raise KeyError(f"received has no field {name!r}; the clients sent "
                       f"{sorted({*self.rows, *self.sums})}")

    def rows_of(self, idx: Sequence[int]) -> Received:
        """The plaintext messages of positions ``idx`` only."""
        if self.kind != "plaintext":
            raise self._hidden("rows_of")
        sel = list(idx)
        return Received(
            round=self.round, kind=self.kind, clients=tuple(self.clients[i] for i in sel),
            num_examples=tuple(self.num_examples[i] for i in sel),
            metrics=_frozen({k: np.asarray(v)[sel] for k, v in self.metrics.items()}),
            rows=_frozen({k: (v[sel] if not isinstance(v, list) else [v[i] for i in sel])
                          for k, v in self.rows.items()}),
            weights=None if self.weights is None else np.asarray(self.weights)[sel],
            staleness=tuple(self.staleness[i] for i in sel) if self.staleness else ())


@dataclass
class ServerView:
    """What an honest-but-curious server could read in one round.

    ``kind`` is ``"plaintext"`` (``updates`` holds each client's delta as
    sent), ``"aggregate"`` (only ``aggregate``, the sum of ``len(clients)``
    weight-scaled updates, as under secure aggregation, or under HE once the
    server applies the decrypted sum) or ``"ciphertext"`` (nothing readable).
    ``readable`` (partial encryption) maps each client to a boolean mask over
    the flat parameters: the coordinates of its update the server read in
    the clear (``updates`` then holds those values and zeros elsewhere).
    ``global_params`` is the model the clients started from; ``metrics`` the
    client-side numbers sent with the updates; ``extra`` the other sent fields
    (under a transport, ``extra_sums`` their sums). ``sent`` (a partial send:
    FedBN, FedRep, FedPer) is the boolean mask of the parameters clients send
    at all (``updates`` and ``aggregate`` are zero elsewhere, and the
    personal rest never reaches the server); ``None`` when the whole model is
    sent.
    """

    round: int
    kind: str
    clients: list[int]
    global_params: torch.Tensor
    updates: dict[int, torch.Tensor] = field(default_factory=dict)
    num_examples: dict[int, int] = field(default_factory=dict)
    aggregate: torch.Tensor | None = None
    readable: dict[int, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    extra: dict[str, dict[int, Any]] = field(default_factory=dict)
    sent: np.ndarray | None = None
    extra_sums: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------
# the boundary
# --------------------------------------------------------------------------


def seal(updates: Updates, *, round: int, sharing: Sharing, sends: Sequence[str],
         summed: Sequence[str], metric_keys: set[str], algorithm: Component,
         encode: Callable[[int, torch.Tensor], Message] | None = None,
         weights: np.ndarray | None = None) -> Sent:
    """Build what the clients send from what they computed.

    Exactly the algorithm's declared fields (``sends``, with ``"buffers"``
    when :class:`Sharing` sends running statistics) cross, as copies; a
    field the update carries that is not declared is refused with the plugin
    and field named. The delta is cut to the shared parameters here, once.
    Numbers in ``updates.metrics`` cross only when ``metric_keys`` names them.

    Without ``encode``: the plaintext fields. With ``encode`` (a transport's,
    bound to the round): each client's vector — its delta's shared
    coordinates scaled by ``weights[i]``, then each ``summed`` field — is
    encoded into one :class:`Message`.
    """
    import torch

    declared = set(sharing.fields)
    undeclared = sorted(k for k in updates.extra if k not in declared
                        and k not in CLIENT_ONLY_FIELDS)
    if undeclared:
        raise PluginError(
            f"client_update put field(s) {undeclared} on the update, which the algorithm does "
            f"not declare in `sends` {tuple(sends)}; only declared fields leave a client: add "
            f"them to `sends` (and to `summed` if the server needs only their sum), or drop "
            f"them", plugin=algorithm.plugin or type(algorithm).__module__,
            component=algorithm.name, hook="client_update", exc_type="ValueError")
    missing = [k for k in sharing.fields if k not in ("delta", "buffers") and k not in updates.extra]
    if missing:
        raise PluginError(
            f"the algorithm declares {missing} in `sends`, and client_update did not return "
            f"them (return ctx.update(delta, {missing[0]}=...))",
            plugin=algorithm.plugin or type(algorithm).__module__, component=algorithm.name,
            hook="client_update", exc_type="ValueError")
    k = len(updates)
    metrics = _frozen({key: np.asarray(v, dtype=float).copy()
                       for key, v in updates.metrics.items() if key in metric_keys})
    common: dict[str, Any] = {"round": int(round), "clients": tuple(int(c) for c in updates.clients),
              "num_examples": tuple(int(n) for n in updates.num_examples), "metrics": metrics}
    if encode is None:
        fields: dict[str, Any] = {}
        sizes: dict[str, tuple[int, ...]] = {}
        for name in sharing.fields:
            if name == "delta":
                d = updates.delta.detach()
                if sharing.partial:
                    d = torch.where(torch.as_tensor(sharing.mask), d, torch.zeros_like(d))
                fields["delta"] = d.clone()
                sizes["delta"] = tuple(updates.delta_bytes or [4 * sharing.numel] * k)
            else:
                v = updates.extra[name]
                fields[name] = _copy(v)
                sizes[name] = tuple(_nbytes(x) for x in _per_row(v, k))
        return Sent(**common, fields=_frozen(fields), field_bytes=_frozen(sizes))
    if weights is None:
        raise ValueError("a transport encodes weight-scaled updates: weights are required")
    idx = sharing.index if sharing.partial else None
    parts: list[tuple[str, int]] = [("delta", sharing.numel)]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in summed:
        v = updates.extra[name]
        shapes[name] = tuple(v.shape[1:])
        parts.append((name, int(np.prod(shapes[name])) if shapes[name] else 1))
    messages = []
    for i, u in enumerate(updates.clients):
        v = updates.delta[i].detach() * float(weights[i])
        row = [v if idx is None else v[idx]]
        for name in summed:
            row.append(updates.extra[name][i].detach().reshape(-1).to(v.dtype))
        vec = row[0] if len(row) == 1 else torch.cat(row)
        messages.append(encode(int(u), vec))
    return Sent(**common, messages=tuple(messages), weights=np.asarray(weights, float).copy(),
                layout=tuple(parts), shapes=_frozen(shapes))


def _per_row(v: Any, k: int) -> list[Any]:
    return list(v) if isinstance(v, list) else [v[i] for i in range(k)]


def receive(sent: Sent, *, sharing: Sharing, numel: int,
            total: torch.Tensor | None = None, transport: str | None = None) -> Received:
    """What the server reads of ``sent``: its plaintext fields, or (``total``:
    the transport's sum of the encoded vectors) the sums, unpacked by the
    message layout, with the delta's sum back on the full parameter vector."""
    import torch

    if total is None:  # the fields are the Sent's own copies (no other party holds them)
        return Received(round=sent.round, kind="plaintext", clients=sent.clients,
                        num_examples=sent.num_examples, metrics=_frozen(sent.metrics),
                        rows=_frozen(dict(sent.fields)))
    total = total.detach().reshape(-1)
    sums: dict[str, torch.Tensor] = {}
    off = 0
    for name, n in sent.layout:
        part = total[off:off + n].clone()
        off += n
        if name == "delta":
            if sharing.partial:
                full = torch.zeros(numel, dtype=part.dtype)
                full[sharing.index] = part
                part = full
            sums["delta"] = part
        else:
            sums[name] = part.reshape(sent.shapes.get(name, (n,)))
    readable = {}
    weights = sent.weights if sent.weights is not None else np.ones(len(sent))
    for m, w in zip(sent.messages, weights):
        if m.readable is not None:  # what a partial encryption sends in the clear, per client
            mask, values = m.readable
            full = torch.zeros(numel, dtype=torch.float32)
            mask = np.asarray(mask, dtype=bool)
            scale = float(w) or 1.0  # the server knows each client's aggregation weight
            full[torch.as_tensor(mask)] = values.detach().to(torch.float32) / scale
            if sharing.partial:
                mask = mask & sharing.mask
                full = torch.where(torch.as_tensor(mask), full, torch.zeros_like(full))
            readable[int(m.client)] = (mask.copy(), full)
    return Received(round=sent.round, kind="aggregate", clients=sent.clients,
                    num_examples=sent.num_examples, metrics=_frozen(sent.metrics),
                    sums=_frozen(sums), readable=_frozen(readable),
                    weights=None if sent.weights is None else sent.weights.copy(),
                    transport=transport)


def view_of(received: Received, broadcast: Broadcast, *, sharing: Sharing,
            server_view: str | None) -> ServerView:
    """The server's view of a round: a pure function of what it received and
    the model it sent (``server_view``: the transport's declared view;
    whoever applies the decrypted aggregate reads it, so ``"ciphertext"``
    becomes ``"aggregate"``, DESIGN's threat model)."""
    sent_mask = sharing.mask.copy() if sharing.partial else None
    clients = list(received.clients)
    base: dict[str, Any] = dict(
        round=received.round, clients=clients, global_params=broadcast.params.clone(),
        num_examples=dict(zip(clients, received.num_examples)),
        metrics={k: dict(zip(clients, (float(x) for x in np.asarray(v))))
                 for k, v in received.metrics.items()},
        sent=sent_mask)
    if received.kind == "plaintext":
        view = ServerView(kind="plaintext", **base)
        if "delta" in received.rows:
            # one copy of the rows, a view of it per client (1,000 row clones cost 5 ms)
            view.updates = dict(zip(clients, received.rows["delta"].clone().unbind(0)))
            if sent_mask is not None:
                view.readable = {c: sent_mask.copy() for c in clients}
        view.extra = {k: dict(zip(clients, [_copy(x) for x in _per_row(v, len(clients))]))
                      for k, v in received.rows.items() if k != "delta"}
        return view
    view = ServerView(kind="aggregate", **base)
    if "delta" in received.sums:
        view.aggregate = received.sums["delta"].clone()
    view.extra_sums = {k: v.clone() for k, v in received.sums.items() if k != "delta"}
    for c, (mask, values) in received.readable.items():
        view.updates[c] = values.clone()
        view.readable[c] = mask.copy()
    return view
