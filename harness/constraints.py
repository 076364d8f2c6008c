"""Declarative constraints on numeric parameters and run settings.

A component states the allowed range of a numeric parameter in its
constructor annotation, with :class:`Range` inside :data:`typing.Annotated`::

    from typing import Annotated

    from fedmedbench import Algorithm, Range

    class FedProx(Algorithm):
        def __init__(self, *, mu: Annotated[float, Range(ge=0)] = 0.01) -> None:
            ...

Run settings (:class:`fedmedbench.RunSettings`) carry theirs on their
dataclass fields the same way. One description serves three readers:
validation of a matrix before anything trains (:func:`check_values`, through
``Registry.build``), the plugin table (``fedmedbench plugins --markdown``,
:func:`short_text`) and the conformance kit (:func:`violations`,
:func:`rule_problems`).

Rules beyond the range:

- every number must be finite, anywhere in a value (NaN never passes; an
  infinity only where the range says ``allow_inf=True``);
- an ``int`` annotation takes integers only (``1e12`` and ``8.0`` are
  refused) of at most 64 bits, a ``float`` annotation any number a float
  can hold (a 401-digit integer is refused, not overflowed), ``bool`` only ``true``/``false``
  and ``str`` only strings; ``X | None`` also takes ``None`` (in TOML: leave
  the key out);
- ``Literal["a", "b"]`` takes exactly one of the listed values (the plugin
  table lists them);
- a parameter whose annotation cannot be resolved (a name imported only under
  ``TYPE_CHECKING``) is checked against the type of its default, as before.

The same rules run when a matrix cell is built (``Registry.build``) and when
a component is constructed directly (``FedProx(mu=-1)``): one validation
path, so a constructor never re-checks what its annotations state (it keeps
only checks that relate several parameters).

Annotations are read with ``typing.get_type_hints(..., include_extras=True)``,
so modules may use ``from __future__ import annotations``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
import weakref
from dataclasses import dataclass
from typing import Annotated, Any

from fedmedbench.errors import ParameterError

__all__ = ["Range", "Seed", "SEED_LIMIT", "Rule", "rules_of", "check_values", "short_text",
           "violations", "rule_problems"]

#: seeds are integers in [0, SEED_LIMIT): numpy's ``default_rng`` refuses
#: negative seeds and torch's ``manual_seed`` takes at most 64 bits
SEED_LIMIT = 2**63


@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric parameter.

    Parameters
    ----------
    ge, gt : float, optional
        Lower bound, inclusive (``ge``) or exclusive (``gt``); at most one.
    le, lt : float, optional
        Upper bound, inclusive (``le``) or exclusive (``lt``); at most one.
    allow_inf : bool, default False
        Whether ``inf`` (and ``-inf``) pass; NaN never does.

    Examples
    --------
    ``Range(gt=0)`` is a positive finite number, ``Range(ge=0, lt=1)`` a
    fraction in [0, 1), ``Range(ge=1, le=16)`` (on an ``int``) an integer from
    1 to 16.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    allow_inf: bool = False

    def __post_init__(self) -> None:
        if self.ge is not None and self.gt is not None:
            raise TypeError("Range: give at most one lower bound (ge or gt)")
        if self.le is not None and self.lt is not None:
            raise TypeError("Range: give at most one upper bound (le or lt)")
        for k in ("ge", "gt", "le", "lt"):
            b = getattr(self, k)
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))
                                  or not math.isfinite(b)):
                raise TypeError(f"Range: {k}={b!r} must be a finite number")
        lo, hi = self.lower, self.upper
        if lo is not None and hi is not None and lo > hi:
            raise TypeError(f"Range: lower bound {lo} is above upper bound {hi}")

    @property
    def lower(self) -> float | None:
        return self.ge if self.ge is not None else self.gt

    @property
    def upper(self) -> float | None:
        return self.le if self.le is not None else self.lt

    def problem(self, value: float) -> str | None:
        """Why the number ``value`` is outside this range, as a phrase (``is out
        of range``), or ``None`` when it is inside."""
        if isinstance(value, float) and math.isnan(value):
            return "is not a number (NaN)"
        if isinstance(value, float) and math.isinf(value) and not self.allow_inf:
            return "is not finite"
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        return None if ok else "is out of range"

    def __str__(self) -> str:
        lo, hi = self.lower, self.upper
        if lo is not None and hi is not None:
            text = (f"in {'[' if self.ge is not None else '('}{_fmt(lo)}, {_fmt(hi)}"
                    f"{']' if self.le is not None else ')'}")
        elif lo is not None:
            text = f"{'>=' if self.ge is not None else '>'} {_fmt(lo)}"
        elif hi is not None:
            text = f"{'<=' if self.le is not None else '<'} {_fmt(hi)}"
        else:
            text = "any"
        return text + (", inf allowed" if self.allow_inf else "")


def _fmt(b: float) -> str:
    if isinstance(b, int) and b >= 2**20 and b & (b - 1) == 0:
        return f"2**{b.bit_length() - 1}"
    if isinstance(b, int):
        return str(b)
    return f"{b:g}"


#: an integer seed in [0, 2**63): ``data_seed: Seed = 0``
Seed = Annotated[int, Range(ge=0, lt=SEED_LIMIT)]

_KINDS = {int: "int", float: "float", bool: "bool", str: "str"}


@dataclass(frozen=True)
class Rule:
    """What one parameter (or run setting) accepts.

    ``kind`` is ``"int"``, ``"float"``, ``"bool"``, ``"str"`` or ``None``
    (not a scalar, or not resolvable: then ``default`` decides the type);
    ``choices`` the values of a ``Literal`` annotation.
    """

    name: str
    kind: str | None
    optional: bool
    range: Range | None
    default: Any
    #: the annotation could not be resolved (why), so only the default's type is checked
    unresolved: str | None = None
    choices: tuple[Any, ...] | None = None

    def allowed(self) -> str:
        """What the parameter takes, in words: ``an integer in [1, 16]``."""
        kind = self.kind or _kind_of(self.default)
        noun = {"int": "an integer", "float": "a finite number", "bool": "true or false",
                "str": "a string", "list": "a list", "dict": "a table"}.get(kind, "a value")
        if self.choices is not None:
            noun = "one of " + ", ".join(repr(c) for c in self.choices)
        if kind == "float" and self.range is not None and self.range.allow_inf:
            noun = "a number"
        text = f"{noun} {self.range}" if self.range is not None else noun
        if self.optional or self.default is None:
            text += " (or leave it out)"
        return text

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not accepted, as a phrase (``has type str; expected
        int``), or ``None`` when it is."""
        if value is None:
            return None if (self.optional or self.default is None) else "is null; a value is required"
        if self.choices is not None:
            ok = any(value == c and type(value) is type(c) for c in self.choices)
            return None if ok else "is not one of the choices"
        bad = _type_problem(self, value)
        if bad:
            return bad
        big = _too_large(value, self.kind or ("float" if _is_number(self.default) else None))
        if big:
            return big
        if _is_number(value):
            if self.range is not None:
                return self.range.problem(value)
            if isinstance(value, float) and not math.isfinite(value):
                return "is not a number (NaN)" if math.isnan(value) else "is not finite"
            return None
        where = _non_finite_inside(value)
        if where is not None:
            return f"holds a non-finite number at {where}"
        return None


def _kind_of(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (int, float)):
        return "float"  # an untyped numeric default takes any number
    if isinstance(default, str):
        return "str"
    if isinstance(default, (list, tuple)):
        return "list"
    if isinstance(default, dict):
        return "dict"
    return ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: integers from here on do not fit a float (``float(10**309)`` overflows)
_FLOAT_LIMIT = 2**1024
#: integers from here on do not fit the 64 bits numpy and torch take
_INT_LIMIT = 2**63


def _too_large(value: Any, kind: str | None) -> str | None:
    """Why an integer is too large for a parameter of ``kind``, or ``None``."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    if kind == "int" and abs(value) >= _INT_LIMIT:
        return "is too large (an integer parameter holds at most 64 bits, below 2**63)"
    if abs(value) >= _FLOAT_LIMIT:
        digits = len(str(abs(value))) if abs(value) < 10**4000 else 4000
        return f"is too large to be a number ({digits:,} digits; a float holds about 1.8e308)"
    return None


def _short_value(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**60:
        return f"<an integer of {len(str(abs(v))) if abs(v) < 10**4000 else 'over 4000':} digits>"
    return repr(v)


def _type_problem(rule: Rule, value: Any) -> str | None:
    kind = rule.kind
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "int"
    elif kind == "float":
        ok = _is_number(value)
        want = "a number"
    elif kind == "bool":
        ok = isinstance(value, bool)
        want = "true or false"
    elif kind == "str":
        ok = isinstance(value, str)
        want = "a string"
    else:  # the default's type decides, as it always has
        d = rule.default
        if d is None or d is inspect.Parameter.empty:
            return None
        if isinstance(d, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(d, (int, float)):
            ok, want = _is_number(value), "a number"
        elif isinstance(d, str):
            ok, want = isinstance(value, str), "a string"
        elif isinstance(d, (list, tuple)):
            ok, want = isinstance(value, (list, tuple)), "a list"
        elif isinstance(d, dict):
            ok, want = isinstance(value, dict), "a table"
        else:
            return None
    if ok:
        return None
    return f"has type {type(value).__name__}; expected {want}"


def _non_finite_inside(value: Any, path: str = "") -> str | None:
    """The first path (``[2]``, ``['site']``) to a NaN or infinity inside
    nested lists, tuples and dicts; ``None`` when there is none."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return p or "the top"
        if isinstance(v, dict):
            stack.extend((x, f"{p}[{k!r}]") for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{p}[{i}]") for i, x in enumerate(v))
    return None


def _split_hint(hint: Any) -> tuple[Any, bool, Range | None]:
    """``Annotated[float | None, Range(gt=0)]`` → ``(float, True, Range(gt=0))``;
    a ``Literal`` comes back whole (its values are the choices)."""
    rng = None
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        rngs = [m for m in meta if isinstance(m, Range)]
        rng = rngs[0] if rngs else None
        hint = base
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) == 1:
            inner, _, inner_rng = _split_hint(args[0])
            return inner, optional, rng or inner_rng
        return None, optional, rng  # a union of several types: the default decides
    return hint, optional, rng


_RULES: weakref.WeakKeyDictionary[type, dict[str, Rule]] = weakref.WeakKeyDictionary()


def rules_of(obj: type) -> dict[str, Rule]:
    """The rules of a component class (its keyword-only ``__init__``
    parameters) or of a dataclass (its fields, e.g. ``RunSettings``)."""
    try:
        return _RULES[obj]
    except KeyError:
        pass
    if dataclasses.is_dataclass(obj):
        target: Any = obj
        defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    else:
        target = inspect.unwrap(obj.__init__)  # type: ignore[misc]
        sig = inspect.signature(target)
        defaults = {n: p.default for n, p in sig.parameters.items()
                    if n != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY}
    unresolved = None
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception as exc:  # a name only imported under TYPE_CHECKING, a typo, ...
        hints, unresolved = {}, f"{type(exc).__name__}: {exc}"
    out = {}
    for name, default in defaults.items():
        base, optional, rng = _split_hint(hints.get(name))
        choices = None
        if typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            kinds = {_KINDS.get(type(c)) for c in choices}
            base = type(choices[0]) if len(kinds) == 1 else None
        out[name] = Rule(name=name, kind=_KINDS.get(base), optional=optional, range=rng,
                         default=default, unresolved=unresolved, choices=choices)
    _RULES[obj] = out
    return out


def check_values(owner: str, rules: dict[str, Rule], values: dict[str, Any], *,
                 where: str = "") -> None:
    """Raise :class:`~fedmedbench.errors.ParameterError` (a ``ConfigError``)
    for the first value a rule refuses; the message names ``owner.key``, the
    value and what is allowed."""
    for k, v in values.items():
        rule = rules.get(k)
        if rule is None:
            continue
        why = rule.problem(v)
        if why:
            raise ParameterError(f"{where}{owner}.{k} = {_show(v)} {why}; allowed: {k} is "
                                 f"{rule.allowed()}")


def _show(v: Any) -> str:
    text = _short_value(v)
    return text if len(text) <= 80 else text[:77] + "..."


def short_text(rule: Rule) -> str:
    """The constraint as the plugin table shows it next to the default
    (``>= 0``, ``in (0, 1)``, ``integer in [1, 16]``); empty when none."""
    if rule.choices is not None:
        return "one of " + ", ".join(repr(c) if c == "" else str(c) for c in rule.choices)
    if rule.range is None:
        return ""
    return f"{'integer ' if rule.kind == 'int' else ''}{rule.range}"


def violations(cls: type) -> list[tuple[str, Any]]:
    """Values every constrained parameter of ``cls`` must refuse: just below
    and just above each bound, NaN, and infinity where it is not allowed (the
    conformance kit builds each one and expects a ``ConfigError``)."""
    out: list[tuple[str, Any]] = []
    for name, rule in rules_of(cls).items():
        if rule.choices is not None:
            out.append((name, "<not one of the choices>"))
        r = rule.range
        if r is None:
            continue
        integer = rule.kind == "int"
        if r.ge is not None:
            out.append((name, int(math.ceil(r.ge)) - 1 if integer
                        else math.nextafter(float(r.ge), -math.inf)))
        if r.gt is not None:
            out.append((name, int(math.floor(r.gt)) if integer else float(r.gt)))
        if r.le is not None:
            out.append((name, int(math.floor(r.le)) + 1 if integer
                        else math.nextafter(float(r.le), math.inf)))
        if r.lt is not None:
            out.append((name, int(math.ceil(r.lt)) if integer else float(r.lt)))
        out.append((name, math.nan))
        if not r.allow_inf:
            out.append((name, math.inf))
    return out


def rule_problems(cls: type) -> list[str]:
    """What is wrong with a class's declared constraints: annotations that do
    not resolve, a ``Range`` on a parameter that is not a number, a default
    its own rule refuses."""
    rules = rules_of(cls)
    out = []
    for rule in rules.values():
        if rule.unresolved:
            out.append(f"the annotations of {cls.__name__} cannot be resolved "
                       f"({rule.unresolved}); import the names they use at module level")
            break
    for name, rule in rules.items():
        if rule.range is not None and rule.kind not in ("int", "float"):
            out.append(f"{name}: a Range needs an int or float annotation")
        if rule.default is not inspect.Parameter.empty and rule.default is not None:
            why = rule.problem(rule.default)
            if why:
                out.append(f"{name}: its default {rule.default!r} is refused by its own "
                           f"rule ({why}; allowed: {rule.allowed()})")
    return out
