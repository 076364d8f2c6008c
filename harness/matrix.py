"""Matrix files: parse, validate (before anything trains), expand into cells.

A matrix is TOML::

    name = "quickstart"
    rounds = 20
    seeds = [0, 1, 2]

    [axes]
    dataset   = ["heart-disease"]
    algorithm = ["centralized", "local", "fedavg", { name = "fedprox", mu = 0.01 }]
    privacy   = ["none", { name = "dp-sgd", epsilon = 3.0 }, ["dp-fedavg", "secagg"]]

    [run]                 # run settings over the dataset's defaults
    local_steps = 10
    [run.fedprox]         # overrides for cells using one component
    lr = 0.05
    [run.centralized]     # ... including their number of rounds
    rounds = 1

    [[exclude]]           # drop cells matching every key given
    algorithm = "local"
    privacy = "secagg"

    [evaluate]
    attacks = ["mia-loss"]

A cell id is a stable hash of the resolved config (component names with all
parameters, run settings, rounds, seed, the backend requested, the versions of
the plugins' distributions and the schema version).

A component may be written in its label form, ``"fedprox(mu=0.1)"`` or
``"dp-fedavg(noise_multiplier=1.0)+secagg"``, as records and ``--select``
show it (:func:`parse_label`). Every problem of a matrix is reported at once.

Cells are generated lazily (:meth:`Matrix.iter_cells`) and streamed to the
executor; :meth:`Matrix.count` counts them without generating them, and a
matrix over :data:`MAX_CELLS` is refused unless the caller raises the cap.
``--shard I/N`` keeps the cells whose id falls in shard ``I`` of ``N``
(:func:`in_shard`), so any matrix splits into ``N`` runs with no knowledge of
its axes.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from fedmedbench.constraints import SEED_LIMIT, rules_of
from fedmedbench.errors import ConfigError, DataError
from fedmedbench.registry import NONE, Registry, get_registry
from fedmedbench.schema import SCHEMA
from fedmedbench.training import RunSettings

AXES = ("dataset", "partitioner", "model", "algorithm", "aggregator", "privacy", "compressor",
        "adversary", "network")
FAMILY_OF_AXIS = {a: a for a in AXES}
OPTIONAL_AXES = ("privacy", "compressor", "adversary")
#: options in [run] that choose how a cell runs; the backend is also part of the cell's
#: config and id, because its numbers may differ from another backend's (issue 23)
#: The device too (``auto``: CUDA when torch sees one, else the CPU; it enters the config
#: and id resolved, and only when it is not the CPU, so CPU cells keep their ids).
EXECUTION_KEYS = {"backend": ("auto", "loop", "vectorized"), "device": ("cpu", "auto", "cuda")}
AXIS_DEFAULTS: dict[str, list[Any]] = {
    "partitioner": ["default"],
    "model": ["default"],
    "aggregator": ["weighted-mean"],
    "privacy": [NONE],
    "compressor": [NONE],
    "adversary": [NONE],
    "network": [{"name": "uniform"}],
}
#: the default network: this machine's speed, links of no transfer time, always online. A
#: cell on it has no ``network`` key in its config (its id and numbers are those of a cell
#: from before the twin); ``network = "none"`` turns the twin off (no clock in the record)
DEFAULT_NETWORK = {"name": "uniform"}
TOP_KEYS = {"name", "description", "rounds", "seeds", "axes", "run", "exclude", "evaluate",
            "executor"}
EVALUATE_KEYS = {"attacks", "isolate", "adversary", "targets", "target_fraction",
                 "pooled_baseline", "time_budget_h"}
#: who the record's headline ε holds against (fedmedbench.accounting.ADVERSARIES)
HEADLINE_ADVERSARIES = ("server", "client", "released")

#: a matrix with more cells is refused unless the cap is raised (``--max-cells``)
MAX_CELLS = 100_000


@dataclass
class Matrix:
    """A parsed, validated matrix. Its cells are generated on demand:
    :meth:`iter_cells` streams them, :attr:`cells` materialises a list (for
    small matrices and tests), :meth:`count` counts without generating."""

    name: str
    rounds: int
    seeds: list[int]
    axes: dict[str, list[Any]]
    run: dict[str, Any]
    run_overrides: dict[str, dict[str, Any]]
    exclude: list[dict[str, Any]]
    attacks: list[dict[str, Any]]
    source: str = "<memory>"
    execution: dict[str, Any] = field(default_factory=dict)
    #: the ``[executor]`` table, validated (see :func:`fedmedbench.executors.executor_table`)
    executor: dict[str, Any] = field(default_factory=dict)
    #: ``(I, N)``: keep only shard I of N (1-based), or ``None`` for every cell
    shard: tuple[int, int] | None = None
    #: who the records' headline ε holds against (``[evaluate] adversary``)
    headline_adversary: str = "server"
    registry: Registry | None = field(default=None, repr=False, compare=False)

    def iter_cells(self) -> Iterator[dict[str, Any]]:
        """The cells (of the shard, if one is set), generated one by one in a
        stable order. Cells of one point share their component sub-dicts
        across seeds: treat them as read-only (:attr:`cells` gives copies)."""
        return expand(self, self.registry or get_registry())

    @property
    def cells(self) -> list[dict[str, Any]]:
        """Every cell as a list of independent dicts (materialised on each access)."""
        return [copy.deepcopy(c) for c in self.iter_cells()]

    def count(self) -> int:
        """The number of cells of the whole matrix (the shard is not applied),
        computed without generating them, except when two values of one axis
        resolve to the same component (then the duplicates are found by
        generating the cells)."""
        seeds = list(dict.fromkeys(self.seeds))
        reg = self.registry or get_registry()
        if _may_collide(self, reg):
            return sum(1 for _ in expand(self, reg, shard=False))
        return _Points(self).count() * len(seeds)

    def set_shard(self, spec: str | tuple[int, int] | None) -> None:
        """Keep only shard ``I`` of ``N`` (``"I/N"``, 1-based): the cells whose
        id ``int(cell_id, 16) % N == I - 1``."""
        self.shard = parse_shard(spec) if isinstance(spec, str) else spec

    def check_size(self, max_cells: int | None = MAX_CELLS) -> int:
        """The cell count; :class:`ConfigError` when it is over ``max_cells``."""
        n = self.count()
        if max_cells is not None and n > max_cells:
            raise ConfigError(
                f"{self.source}: matrix {self.name!r} has {n:,} cells, over the cap of "
                f"{max_cells:,}; pass --max-cells {n} to run it anyway (the cap applies to "
                f"the whole matrix, also under --shard), or make it smaller with --select "
                f"or [[exclude]]")
        return n


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N``."""
    i_s, sep, n_s = str(spec).partition("/")
    try:
        i, n = int(i_s), int(n_s)
    except ValueError:
        i = n = 0
    if not sep or n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {spec!r}: expected I/N with 1 <= I <= N, e.g. --shard 1/4")
    return i, n


def in_shard(cell_id: str, shard: tuple[int, int] | None) -> bool:
    """Whether a cell id falls in shard ``(I, N)``: ``int(cell_id, 16) % N == I - 1``."""
    if shard is None:
        return True
    i, n = shard
    return int(cell_id, 16) % n == i - 1


def quickstart_path() -> Path:
    return Path(str(resources.files("fedmedbench") / "quickstart.toml"))


def load_matrix(path: str | Path | None = None, *, registry: Registry | None = None,
                select: list[str] | None = None) -> Matrix:
    """Parse and validate a matrix file (``None``: the built-in quickstart),
    apply ``select`` slices (``AXIS=NAME``), and expand its cells."""
    from fedmedbench.fileio import short_path

    p = Path(path) if path is not None else quickstart_path()
    raw = read_matrix_file(p)
    return parse_matrix(raw, registry=registry, select=select, source=str(short_path(p)))


def read_matrix_file(path: str | Path) -> dict[str, Any]:
    """The TOML of a matrix file, read with a bounded size and every failure
    a :class:`ConfigError` naming the file (not yet validated)."""
    from fedmedbench.fileio import short_path

    p = Path(path)
    sp = short_path(p)
    try:
        if p.stat().st_size > MAX_MATRIX_BYTES:
            raise ConfigError(f"matrix file {sp} is {p.stat().st_size:,} bytes, larger than a "
                              f"matrix file may be ({MAX_MATRIX_BYTES:,}); give a matrix TOML "
                              f"file")
        if not p.is_file() and not p.is_dir():
            raise ConfigError(f"matrix file {sp} is not a regular file; give the path of a "
                              f".toml file")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"matrix file {sp} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"matrix file {sp} is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                          f"at offset {exc.start}: {exc.reason}); TOML files are UTF-8: save it "
                          f"as UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"matrix file {sp} is a folder; give the path of a .toml file") from None
    except OSError as exc:
        import errno

        if exc.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"the matrix file's path {sp} is too long for the file system; "
                              f"give a shorter path") from None
        raise ConfigError(f"cannot read matrix file {sp}: {exc.strerror or exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{sp} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{sp}: arrays or tables nested too deeply to read; a matrix is a few "
                          f"levels deep") from None
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        raise ConfigError(f"{sp} is not a usable matrix: {str(exc)[:160]} (an integer of that "
                          f"many digits is no parameter value)") from None
    return raw


#: a matrix file larger than this is refused unread (a matrix is a few kB)
MAX_MATRIX_BYTES = 16 * 2**20


class _Problems:
    """Collects the configuration errors of a matrix, so that all of them are
    reported at once (each check goes on after a failure)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, exc: Exception) -> None:
        msg = str(exc)
        self.items.append(msg.removeprefix(f"{self.where}: "))

    def run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)``, or ``None`` after recording its error."""
        try:
            return fn(*args, **kw)
        except (ConfigError, DataError) as exc:
            self.add(exc)
            return None

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise ConfigError(f"{self.where}: {self.items[0]}")
        lines = "\n".join(f"  - {x}" for x in self.items)
        raise ConfigError(f"{self.where}: {len(self.items)} problems:\n{lines}")


def _did_you_mean(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_matrix(raw: dict[str, Any], *, registry: Registry | None = None,
                 select: list[str] | None = None, source: str = "<memory>") -> Matrix:
    """Validate a matrix (a dict in the matrix file's shape); every problem is
    reported at once in one :class:`ConfigError`, before anything trains."""
    reg = registry or get_registry()
    where = source
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a matrix is a table (a dict), got {type(raw).__name__}")
    errs = _Problems(where)
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        errs.add(ConfigError(
            f"unknown top-level key(s) "
            f"{', '.join(repr(k) + _did_you_mean(k, sorted(TOP_KEYS)) for k in unknown)}; "
            f"allowed: {sorted(TOP_KEYS)}"))
    name = errs.run(_typed, raw.get("name", Path(source).stem), str, "name") or "matrix"
    rounds = errs.run(_typed, raw.get("rounds", 10), int, "rounds")
    if rounds is not None and not 1 <= rounds <= MAX_ROUNDS:
        errs.add(ConfigError(f"rounds = {_show(rounds)}; it must be at least 1" if rounds < 1
                             else f"rounds = {_show(rounds)}; it must be at most {MAX_ROUNDS:,}"))
        rounds = None
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not (isinstance(seeds, list) and seeds and all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        what = " (a string, not a list)" if isinstance(seeds, str) else ""
        errs.add(ConfigError(f"seeds = {_show(seeds)}{what}; expected a non-empty list of "
                             f"integers such as [0, 1, 2]"))
        seeds = [0]
    for i, s in enumerate(seeds):
        if not 0 <= s < SEED_LIMIT:
            errs.add(ConfigError(f"seeds[{i}] = {_show(s)}: out of range; seeds are integers "
                                 f"in [0, 2**63)"))

    axes_raw = raw.get("axes")
    axes: dict[str, list[Any]] = {}
    if not isinstance(axes_raw, dict):
        errs.add(ConfigError("an [axes] table with at least `dataset` and `algorithm` lists is "
                             "required"))
        axes_raw = {}
    bad = sorted(set(axes_raw) - set(AXES))
    for b in bad:
        errs.add(ConfigError(f"unknown axis {b!r}{_did_you_mean(b, list(AXES))}; axes are "
                             f"{list(AXES)}"))
    missing = [a for a in ("dataset", "algorithm") if a not in axes_raw
               and not any(_did_you_mean(b, [a]) for b in bad)]
    if missing and isinstance(raw.get("axes"), dict):
        errs.add(ConfigError(f"the [axes] table needs {' and '.join(f'`{a}`' for a in missing)} "
                             f"(a list each)"))
    axes_ok = not missing and not bad
    for axis in AXES:
        vals = axes_raw.get(axis, AXIS_DEFAULTS.get(axis))
        if vals is None:
            axes_ok = False
            continue
        if isinstance(vals, str):
            errs.add(ConfigError(f"axes.{axis} = {json.dumps(vals)} is a string, but an axis is "
                                 f"a list: write {axis} = [{json.dumps(vals)}]"))
            axes_ok = False
            continue
        if not isinstance(vals, list) or not vals:
            errs.add(ConfigError(f"axes.{axis} must be a non-empty list, got {_show(vals)}"))
            axes_ok = False
            continue
        out = []
        for i, v in enumerate(vals):
            n = len(errs.items)
            got = errs.run(_normalize, axis, v, reg, f"axes.{axis}[{i}]")
            if len(errs.items) > n:
                axes_ok = False
            else:
                out.append(got)
        axes[axis] = out

    run_raw = raw.get("run", {})
    if not isinstance(run_raw, dict):
        errs.add(ConfigError("[run] must be a table"))
        run_raw = {}
    fields = RunSettings.fields()
    run: dict[str, Any] = {}
    overrides: dict[str, dict[str, Any]] = {}
    axis_names = {spec["name"] for vals in axes.values() for v in vals
                  for spec in (v if isinstance(v, list) else [v]) if isinstance(spec, dict)}
    for k, v in run_raw.items():
        if k in EXECUTION_KEYS:
            if v not in EXECUTION_KEYS[k]:
                errs.add(ConfigError(f"run.{k} = {_show(v)}; choose one of "
                                     f"{', '.join(EXECUTION_KEYS[k])}"))
            continue
        if isinstance(v, dict):
            if k not in axis_names:
                if axes_ok:
                    errs.add(ConfigError(f"[run.{k}] overrides run settings for component "
                                         f"{k!r}, which no axis uses"))
                continue
            good = True
            for kk, vv in v.items():
                if kk == "rounds":  # a component's cells may run their own number of rounds
                    r = errs.run(_typed, vv, int, f"run.{k}.rounds")
                    if r is None:
                        good = False
                    elif not 1 <= r <= MAX_ROUNDS:
                        errs.add(ConfigError(f"run.{k}.rounds = {_show(vv)}; it must be from 1 "
                                             f"to {MAX_ROUNDS:,}"))
                        good = False
                    continue
                n = len(errs.items)
                errs.run(_check_run_key, kk, vv, fields, f"run.{k}.{kk}")
                good = good and len(errs.items) == n
            if good:
                overrides[k] = dict(v)
        else:
            n = len(errs.items)
            errs.run(_check_run_key, k, v, fields, f"run.{k}")
            if len(errs.items) == n:
                run[k] = v

    exclude = raw.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
        errs.add(ConfigError("exclude must be an array of tables ([[exclude]])"))
        exclude = []
    for e in exclude:
        for k in e:
            if k not in AXES:
                errs.add(ConfigError(f"exclude key {k!r} is not an axis"
                                     f"{_did_you_mean(k, list(AXES))}; axes are {list(AXES)}"))

    ev = raw.get("evaluate", {})
    attacks: list[Any] = []
    if not isinstance(ev, dict) or set(ev) - EVALUATE_KEYS:
        errs.add(ConfigError(f"[evaluate] accepts only {sorted(EVALUATE_KEYS)}"))
        ev = {}
    attacks_raw = ev.get("attacks", [])
    if isinstance(attacks_raw, str):
        errs.add(ConfigError(f"evaluate.attacks = {json.dumps(attacks_raw)} is a string, but "
                             f"attacks is a list: write attacks = [{json.dumps(attacks_raw)}]"))
        attacks_raw = []
    if not isinstance(attacks_raw, list):
        errs.add(ConfigError(f"evaluate.attacks = {_show(attacks_raw)}; expected a list of "
                             f"attack names or tables"))
        attacks_raw = []
    for i, a in enumerate(attacks_raw):
        n = len(errs.items)
        got = errs.run(_normalize, "attack", a, reg, f"evaluate.attacks[{i}]")
        if len(errs.items) == n and got is not None:
            attacks.append(got)
    isolate = ev.get("isolate", False)
    if not isinstance(isolate, bool):
        errs.add(ConfigError(f"evaluate.isolate = {_show(isolate)}; write true (each cell's "
                             f"attacks run in a separate process) or false"))
        isolate = False
    adversary = ev.get("adversary", "server")
    if adversary not in HEADLINE_ADVERSARIES:
        errs.add(ConfigError(f"evaluate.adversary = {_show(adversary)}; the headline ε holds "
                             f"against one of {', '.join(HEADLINE_ADVERSARIES)} (default "
                             f"server)"))
        adversary = "server"

    clock = errs.run(_clock_table, ev) or {}

    from fedmedbench.executors import executor_table

    execu = errs.run(executor_table, raw.get("executor", {}), where="[executor]",
                     base=Path(source).parent if source != "<memory>" else None) or {}
    errs.raise_if_any()
    m = Matrix(name=name, rounds=rounds, seeds=list(seeds), axes=axes, run=run,
               run_overrides=overrides, exclude=exclude, attacks=attacks, source=source,
               execution={**{k: v for k, v in run_raw.items() if k in EXECUTION_KEYS},
                          **({"isolate_attacks": True} if isolate else {}),
                          **({"clock": clock} if clock else {})},
               headline_adversary=adversary,
               executor=execu, registry=reg)
    if select:
        _apply_select(m, select)
    check_cells_resolve(m, reg)
    if m.count() == 0:
        how = [f"{len(exclude)} [[exclude]] table(s)"] if exclude else []
        how += [f"--select {' '.join(select)}"] if select else []
        raise ConfigError(f"{where}: the matrix selects no cells (every cell is removed by "
                          f"{' and '.join(how) or 'its settings'}); loosen an [[exclude]] or a "
                          f"--select so that at least one cell remains")
    return m


#: the most rounds a cell may run
MAX_ROUNDS = 1_000_000


def _show(v: Any) -> str:
    from fedmedbench.constraints import _short_value

    text = _short_value(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_run_key(k: str, v: Any, fields: dict[str, Any], where: str) -> None:
    if k not in fields:
        import difflib

        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown run setting;{hint} run settings are: "
                          f"{', '.join(fields)}")
    rule = rules_of(RunSettings)[k]
    why = rule.problem(v)
    if why:
        raise ConfigError(f"{where} = {_show(v)} {why}; allowed: {k} is {rule.allowed()}")


def _clock_table(ev: dict[str, Any]) -> dict[str, Any]:
    """The time-to-target settings of ``[evaluate]`` (:mod:`fedmedbench.clock`):
    ``targets`` (utilities), ``target_fraction`` (of the pooled baseline,
    default 0.95), ``pooled_baseline`` (that baseline's utility, when known
    beforehand) and ``time_budget_h`` (virtual hours). They change no
    training, so they are not part of a cell's id."""
    out: dict[str, Any] = {}

    def number(k: str, v: Any, *, lo: float, hi: float | None = None) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and v > lo and (hi is None or v <= hi)
        if not ok:
            rng = f"in ({lo:g}, {hi:g}]" if hi is not None else f"> {lo:g}"
            raise ConfigError(f"evaluate.{k} = {_show(v)}; it must be a number {rng}")
        return float(v)

    if "targets" in ev:
        t = ev["targets"]
        t = [t] if isinstance(t, (int, float)) and not isinstance(t, bool) else t
        if not isinstance(t, list) or not t:
            raise ConfigError(f"evaluate.targets = {_show(ev['targets'])}; expected a list of "
                              f"utilities, e.g. targets = [0.8, 0.85]")
        out["targets"] = [number("targets[]", x, lo=-math.inf) for x in t]
    if "target_fraction" in ev:
        out["target_fraction"] = number("target_fraction", ev["target_fraction"], lo=0, hi=1)
    if "pooled_baseline" in ev:
        out["pooled_baseline"] = number("pooled_baseline", ev["pooled_baseline"], lo=-math.inf)
    if "time_budget_h" in ev:
        out["budget_s"] = 3600.0 * number("time_budget_h", ev["time_budget_h"], lo=0)
    return out


def _typed(v: Any, t: type, where: str) -> Any:
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        raise ConfigError(f"{where} = {_show(v)}: expected {t.__name__}")
    return v


def _normalize(axis: str, v: Any, reg: Registry, where: str) -> Any:
    """A matrix entry → ``{"name", **params}`` (privacy: a list of those,
    ``[]`` for none; other optional axes: ``None`` for none)."""
    if axis == "privacy":
        if v == NONE or v == []:
            return []
        if isinstance(v, str) and "+" in v:  # the label form of a stack: "dp-fedavg+secagg"
            parts = _split_top(v, "+")
            if parts is None or not all(p.strip() for p in parts):
                raise ConfigError(f"{where}: {v!r} cannot be read as a privacy stack; write it "
                                  f"as a list, e.g. [\"dp-fedavg\", \"secagg\"]")
            v = [p.strip() for p in parts]
        stack = v if isinstance(v, list) else [v]
        out = [_normalize("privacy-one", s, reg, f"{where}[{j}]") for j, s in enumerate(stack)]
        names = [s["name"] for s in out]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: privacy stack {names} names a mechanism twice")
        return out
    if axis == "network":
        if v == NONE:
            return None  # the twin off: no clock in the record
        if v == DEFAULT_NETWORK["name"] or v == DEFAULT_NETWORK:
            return dict(DEFAULT_NETWORK)  # known without a registry (plugins may be blocked)
    family = {"privacy-one": "privacy"}.get(axis, axis)
    if isinstance(v, str) and ("(" in v or "[" in v or ")" in v or "]" in v):
        spec: dict[str, Any] = parse_label(v, where)
    elif isinstance(v, str):
        spec = {"name": v}
    elif isinstance(v, dict):
        if "name" not in v or not isinstance(v["name"], str):
            raise ConfigError(f"{where}: a component table needs a string `name`, got {v!r}")
        spec = dict(v)
    else:
        raise ConfigError(f"{where}: expected a component name or a table with `name`, "
                          f"got {v!r}")
    if spec["name"] == NONE and axis in (*OPTIONAL_AXES, "attack"):
        return None
    if axis in ("partitioner", "model") and spec["name"] == "default":
        return {"name": "default"} if axis == "partitioner" else None
    info = reg.get(family, spec["name"], key=where)
    # validate parameters now (and their types) by building once
    comp = reg.build(family, spec, key=where)
    if family == "dataset":
        try:
            comp.check_files()
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        except MemoryError:
            raise DataError(f"{where}: {info.name}: checking its files ran out of memory; a "
                            f"file declares more data than this machine holds") from None
        except Exception as exc:  # a plugin's check_files with a bug: name it
            raise DataError(f"{where}: {info.name} (plugin {info.plugin!r}) raised "
                            f"{type(exc).__name__} while checking its files: {exc}") from None
    return {"name": info.name, **{k: v for k, v in spec.items() if k != "name"}}


def parse_label(text: str, where: str) -> dict[str, Any]:
    """A component written in its label form, ``fedprox(mu=0.1)`` (what
    records, tables and ``--select`` show), as ``{"name": "fedprox", "mu":
    0.1}``. Values are read as TOML values (numbers, ``true``, lists) or
    Python's spelling of them (``True``); anything else is a string. A short
    display label (``fedprox[μ=0.1]``) or text that does not parse is refused
    with the table to write instead, so no parameter is ever dropped."""
    t = text.strip()
    if "[" in t and "(" not in t:
        name = t[:t.index("[")]
        inner = t[t.index("[") + 1:].rstrip("]")
        back = {v: k for k, v in SYMBOLS.items()}
        items = []
        for it in (_split_top(inner, ",") or []):
            k, eq, val = it.partition("=")
            if eq:
                items.append(f"{back.get(k.strip(), k.strip())} = {val.strip()}")
        table = ", ".join([f'name = "{name}"', *items])
        raise ConfigError(f"{where}: {text!r} is a short label (for display: its symbols and "
                          f"rounded numbers do not name parameters); write the component as a "
                          f"table: {{ {table} }}")
    ok = t.endswith(")") and "(" in t
    name, inner = (t[:t.index("(")], t[t.index("(") + 1:-1]) if ok else (t, "")
    split = _split_top(inner, ",") if ok and inner else ([] if ok else None)
    if not ok or split is None or not name.strip():
        raise ConfigError(f"{where}: {text!r} cannot be read as a component: write a name "
                          f"(\"fedprox\"), the label form \"fedprox(mu=0.1)\", or a table "
                          f"{{ name = \"fedprox\", mu = 0.1 }}")
    spec: dict[str, Any] = {"name": name.strip()}
    for it in split:
        k, eq, val = it.partition("=")
        k = k.strip()
        if not eq or not k.isidentifier() or k == "name" or k in spec:
            raise ConfigError(f"{where}: {text!r} cannot be read as a component: {it.strip()!r} "
                              f"is not `key=value`; write a table {{ name = "
                              f"\"{name.strip()}\", key = value }}")
        spec[k] = _label_value(val.strip())
    return spec


def _label_value(text: str) -> Any:
    """One parameter value of a label: TOML's reading of it, Python's
    ``True``/``False``/``None`` spellings, else the text itself."""
    py = {"True": True, "False": False}
    if text in py:
        return py[text]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        return text


def _apply_select(m: Matrix, select: list[str]) -> None:
    """Keep the axis values (or seeds) each ``AXIS=NAME[,NAME...]`` names;
    every name must be one of the matrix's, or the slice is refused."""
    import difflib

    for s in select:
        if "=" not in s:
            raise ConfigError(f"--select {s!r}: expected AXIS=NAME (e.g. algorithm=fedavg)")
        axis, name = s.split("=", 1)
        axis = axis.strip()
        names = [n.strip() for n in name.split(",") if n.strip()]
        if not names:
            raise ConfigError(f"--select {s!r}: no name after '='; expected AXIS=NAME")
        if axis == "seed":
            try:
                wanted = [int(n) for n in names]
            except ValueError:
                raise ConfigError(f"--select {s!r}: seeds are integers") from None
            unknown = [w for w in wanted if w not in m.seeds]
            if unknown:
                raise ConfigError(f"--select {s!r}: the matrix has no seed "
                                  f"{', '.join(map(str, unknown))}; its seeds are {m.seeds}")
            m.seeds = [x for x in m.seeds if x in wanted]
            continue
        if axis not in m.axes:
            close = difflib.get_close_matches(axis, [*AXES, "seed"], n=1)
            hint = f" did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--select {s!r}: unknown axis {axis!r};{hint} axes are "
                              f"{[*AXES, 'seed']}")
        labels = [_label(v) for v in m.axes[axis]]
        known = sorted({*labels, *(_label(v, params=False) for v in m.axes[axis]),
                        *(_label(v, short=True) for v in m.axes[axis])})
        for n in names:
            if n not in known:
                close = difflib.get_close_matches(n, known, n=1, cutoff=0.5)
                hint = f" did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"--select {s!r}: axis {axis} has no {n!r};{hint} axis "
                                  f"{axis} has {labels}")
        m.axes[axis] = [v for v in m.axes[axis] if _label(v, params=False) in names
                        or _label(v) in names or _label(v, short=True) in names]


def _label(v: Any, *, params: bool = True, short: bool = False) -> str:
    """The label of an axis value: ``fedprox(mu=0.01)``, ``dp-fedavg+secagg``,
    ``none`` (parameters given in the matrix only; the record's ``labels``).
    With ``short``, its :func:`short_label` (``fedprox[μ=0.01]``)."""
    if v is None or v == []:
        return NONE
    if isinstance(v, list):
        text = "+".join(_label(s, params=params) for s in v)
        return short_label(text) if short else text
    extra = {k: x for k, x in v.items() if k != "name"}
    if not params or not extra:
        return v["name"]
    text = f"{v['name']}({','.join(f'{k}={x}' for k, x in sorted(extra.items()))})"
    return short_label(text) if short else text


def _matches(value: Any, wanted: Any) -> bool:
    wanted = wanted if isinstance(wanted, list) else [wanted]
    return (_label(value) in wanted or _label(value, params=False) in wanted
            or _label(value, short=True) in wanted)


# --------------------------------------------------------------------------
# short labels (display only)
# --------------------------------------------------------------------------

#: parameter names a short label writes as symbols (display only: records keep the names)
SYMBOLS: dict[str, str] = {
    "epsilon": "ε", "delta": "δ", "noise_multiplier": "σ", "clip": "C", "max_grad_norm": "C",
    "mu": "μ", "alpha": "α", "beta": "β", "gamma": "γ", "temperature": "T",
}
#: string values a short label abbreviates
VALUE_ABBREVIATIONS: dict[str, str] = {"distributed": "dist", "central": "central"}
#: symbols written first, in this order; other parameters follow in the label's order
_SYMBOL_ORDER = ("ε", "σ", "C", "δ", "μ")


def resolved_device(device: str) -> str:
    """``cpu`` or ``cuda``: what ``device`` (``cpu``, ``auto``, ``cuda``) trains
    on here; ``auto`` is CUDA when torch sees a device, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _split_top(text: str, sep: str) -> list[str] | None:
    """``text`` split at ``sep`` outside brackets; ``None`` if brackets do not balance."""
    out: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return None
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        return None
    out.append("".join(cur))
    return out


def _short_value(v: str) -> tuple[bool, str]:
    """(is a flag, text): numbers in their shortest form (``1.0`` → ``1``),
    known words abbreviated; a plain word is a flag (shown without its key)."""
    if v in ("True", "False"):
        return False, v
    try:
        x = float(v)
    except ValueError:
        if v.isidentifier() or v.replace("-", "").isalnum():
            return True, VALUE_ABBREVIATIONS.get(v, v)
        return False, v.replace(" ", "")
    if v.lower() in ("nan", "inf", "-inf", "infinity"):
        return False, v
    return False, f"{x:g}"


def short_label(label: str) -> str:
    """A short display label of a record label: ``dp-fedavg(clip=0.1,
    noise=distributed,noise_multiplier=1.0)`` → ``dp-fedavg[σ=1,C=0.1,dist]``.

    Parameters become symbols where :data:`SYMBOLS` has one (ε, δ, σ, C, μ,
    ...), numbers their shortest form, string values stand alone
    (abbreviated by :data:`VALUE_ABBREVIATIONS`); stacks keep their ``+``.
    The same label always gives the same short label. A label that is not of
    the form ``name(key=value,...)`` comes back unchanged. Short labels are
    for display (tables, figures, the terminal); the report's legend maps
    each back to the full configuration, and the record keeps ``labels`` and
    ``config`` unchanged."""
    parts = _split_top(label, "+")
    if parts is None or len(parts) > 1 and any(not p for p in parts):
        return label
    return "+".join(_short_part(p) for p in parts)


def _short_part(part: str) -> str:
    if not part.endswith(")") or "(" not in part:
        return part
    name, inner = part[:part.index("(")], part[part.index("(") + 1:-1]
    items = _split_top(inner, ",") if inner else None
    if not name or items is None:
        return part
    keyed: list[tuple[str, str]] = []
    flags: list[str] = []
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or not k.strip().isidentifier():
            return part
        flag, text = _short_value(v.strip())
        if flag:
            flags.append(text)
        else:
            keyed.append((SYMBOLS.get(k.strip(), k.strip()), text))
    order = {s: i for i, s in enumerate(_SYMBOL_ORDER)}
    keyed.sort(key=lambda kv: order.get(kv[0], len(order)))  # stable: the rest keep their order
    return f"{name}[{','.join([*(f'{k}={v}' for k, v in keyed), *flags])}]"


class _Points:
    """The points of the product (one value per axis, seeds apart) that no
    ``[[exclude]]`` rule drops, enumerated and counted without building the
    product: each value carries the bit mask of the rules it does not escape,
    and a point is dropped when some rule's bit survives every axis."""

    def __init__(self, m: Matrix, allowed: list[list[int]] | None = None) -> None:
        self.values = [m.axes[a] for a in AXES]
        self.allowed = allowed or [list(range(len(v))) for v in self.values]
        self.full = (1 << len(m.exclude)) - 1
        self.cover = [[sum(1 << j for j, e in enumerate(m.exclude)
                           if a not in e or _matches(v, e[a])) for v in vals]
                      for a, vals in zip(AXES, self.values)]
        self._memo: dict[tuple[int, int], int] = {}

    def _count(self, depth: int, mask: int) -> int:
        if depth == len(AXES):
            return 0 if mask else 1
        if not mask:  # no rule can match any more: every completion is kept
            n = 1
            for ix in self.allowed[depth:]:
                n *= len(ix)
            return n
        key = (depth, mask)
        if key not in self._memo:
            cover = self.cover[depth]
            self._memo[key] = sum(self._count(depth + 1, mask & cover[i])
                                  for i in self.allowed[depth])
        return self._memo[key]

    def count(self) -> int:
        return self._count(0, self.full)

    def indices(self) -> Iterator[tuple[int, ...]]:
        """Index tuples of the kept points, in product order."""
        def walk(depth: int, mask: int, prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
            if depth == len(AXES):
                yield prefix
                return
            if not mask:
                yield from (prefix + rest for rest in itertools.product(*self.allowed[depth:]))
                return
            cover = self.cover[depth]
            for i in self.allowed[depth]:
                m2 = mask & cover[i]
                if self._count(depth + 1, m2):
                    yield from walk(depth + 1, m2, prefix + (i,))

        return walk(0, self.full, ())


def _component_key(family: str, v: Any, reg: Registry) -> str:
    if v is None or v == []:
        return NONE
    if family == "network":
        return json.dumps(network_config(v, reg), sort_keys=True, default=str)
    specs = v if isinstance(v, list) else [v]
    return json.dumps([reg.build(family, s).config() for s in specs], sort_keys=True,
                      default=str)


def _may_collide(m: Matrix, reg: Registry) -> bool:
    """Whether two values of one axis resolve to the same component (``fedavg``
    written out with a default parameter, the dataset's default partitioner
    also listed by name), so that two points could be the same cell."""
    for axis in AXES:
        if axis == "partitioner":
            continue
        keys = [_component_key(FAMILY_OF_AXIS[axis], v, reg) for v in m.axes[axis]]
        if len(set(keys)) != len(keys):
            return True
    parts = m.axes["partitioner"]
    if len(parts) > 1:
        for ds in m.axes["dataset"]:
            default = reg.get("dataset", ds["name"]).cls.default_partitioner
            keys = [_component_key("partitioner", default if p["name"] == "default" else p, reg)
                    for p in parts]
            if len(set(keys)) != len(keys):
                return True
    return False


def _seed_ids(cfg: dict[str, Any], seeds: list[int]) -> list[str]:
    """:func:`cell_id` of ``cfg`` under each seed, hashing the part of the
    config that all seeds share once (checked against :func:`cell_id`)."""
    mark = "\x00seed\x00"
    blob = json.dumps({"schema": SCHEMA, **cfg, "seed": mark}, sort_keys=True,
                      separators=(",", ":"), default=str)
    pre, sep, post = blob.partition(json.dumps(mark))
    if sep and json.dumps(mark) not in post:
        head = hashlib.sha256(pre.encode())
        ids = []
        for s in seeds:
            h = head.copy()
            h.update(f"{json.dumps(s)}{post}".encode())
            ids.append(h.hexdigest()[:16])
        if ids[0] == cell_id({**cfg, "seed": seeds[0]}):
            return ids
    return [cell_id({**cfg, "seed": s}) for s in seeds]


def expand(m: Matrix, reg: Registry, *, shard: bool = True) -> Iterator[dict[str, Any]]:
    """The cells of the product, generated lazily in a stable order (axes in
    :data:`AXES` order, seeds innermost), with resolved configs; a point that
    resolves to a cell already generated is dropped. With ``shard``, only
    the cells of ``m.shard``."""
    seeds = list(dict.fromkeys(m.seeds))
    points = _Points(m)
    labels = [["default" if a == "model" and v is None else _label(v) for v in m.axes[a]]
              for a in AXES]
    dedupe = _may_collide(m, reg)
    seen: set[str] = set()
    part = m.shard if shard else None
    for ix in points.indices():
        point = {a: m.axes[a][i] for a, i in zip(AXES, ix)}
        cfg = resolve(point, seeds[0], m, reg)
        ids = _seed_ids(cfg, seeds)
        if dedupe:
            if ids[0] in seen:
                continue
            seen.add(ids[0])
        lab = {a: labels[k][i] for k, (a, i) in enumerate(zip(AXES, ix))}
        for s, cid in zip(seeds, ids):
            if part is None or in_shard(cid, part):
                yield {"cell_id": cid, "matrix": m.name, "config": {**cfg, "seed": s},
                       **m.execution, "labels": dict(lab)}


def check_cells_resolve(m: Matrix, reg: Registry) -> None:
    """Resolve one cell of every class of cells whose run settings can differ,
    so that a bad combination is a :class:`ConfigError` before anything
    trains, without generating every cell. The run settings of a cell depend
    on its dataset and on which components with a ``[run.NAME]`` table it
    uses; one kept point per combination of those is resolved."""
    over = set(m.run_overrides)

    def sig(axis: str, v: Any) -> tuple[str, ...]:
        if v is None or v == []:
            return ()
        if axis == "partitioner" and v["name"] == "default":
            return ("default",)  # its resolved name follows the dataset, part of the class
        names = [s["name"] for s in (v if isinstance(v, list) else [v])]
        return tuple(n for n in names if n in over or axis == "dataset")

    classes = []
    for axis in AXES:
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, v in enumerate(m.axes[axis]):
            groups.setdefault(sig(axis, v), []).append(i)
        classes.append(list(groups.values()))
    for allowed in itertools.product(*classes):
        first = next(_Points(m, list(allowed)).indices(), None)
        if first is not None:
            resolve({a: m.axes[a][i] for a, i in zip(AXES, first)}, m.seeds[0], m, reg)


def resolve(point: dict[str, Any], seed: int, m: Matrix, reg: Registry) -> dict[str, Any]:
    ds_info = reg.get("dataset", point["dataset"]["name"])
    ds = reg.build("dataset", point["dataset"])
    part = point["partitioner"]
    if part["name"] == "default":
        part = dict(ds_info.cls.default_partitioner)
    comps = {
        "dataset": ds.config(),
        "partitioner": reg.build("partitioner", part).config(),
        "model": reg.build("model", point["model"]).config() if point["model"] else None,
        "algorithm": reg.build("algorithm", point["algorithm"]).config(),
        "aggregator": reg.build("aggregator", point["aggregator"]).config(),
        "privacy": [reg.build("privacy", p).config() for p in point["privacy"]],
        "compressor": reg.build("compressor", point["compressor"]).config()
        if point["compressor"] else None,
        "adversary": reg.build("adversary", point["adversary"]).config()
        if point["adversary"] else None,
        "attacks": [reg.build("attack", a).config() for a in m.attacks],
    }
    network = point.get("network", DEFAULT_NETWORK)
    net_cfg = network_config(network, reg)
    # run settings: defaults < the dataset's < what the cell's other components' guarantees
    # assume (dp-fedavg: Poisson client sampling) < the matrix [run] < [run.<component>]
    comp_defaults: dict[str, Any] = {}
    for fam, spec in (("algorithm", point["algorithm"]), ("aggregator", point["aggregator"]),
                      *(("privacy", p) for p in point["privacy"])):
        comp_defaults.update(getattr(reg.get(fam, spec["name"]).cls, "run_defaults", {}))
    run = {**RunSettings.fields(), **ds_info.cls.run_defaults, **comp_defaults, **m.run}
    names = [comps["dataset"]["name"], comps["partitioner"]["name"], comps["algorithm"]["name"],
             comps["aggregator"]["name"], *(p["name"] for p in comps["privacy"]),
             *(comps[a]["name"] for a in ("compressor", "adversary") if comps[a]),
             *([net_cfg["name"]] if net_cfg else [])]
    for n in names:
        run.update(m.run_overrides.get(n, {}))
    rounds = int(run.pop("rounds", m.rounds))
    problems = RunSettings(**run).problems()
    if problems:
        raise ConfigError(f"{m.source}: run settings for {comps['dataset']['name']} / "
                          f"{comps['algorithm']['name']}: {'; '.join(problems)}")
    # how clients train is part of what a cell is: backends may differ (float order, batching)
    backend = m.execution.get("backend", "auto")
    extra: dict[str, Any] = ({"headline_adversary": m.headline_adversary}
             if m.headline_adversary != "server" else {})
    if network is None or net_cfg is not None:  # the default network leaves no key: the cell
        extra["network"] = net_cfg  # is the one of before the twin (same id, same numbers)
    device = resolved_device(m.execution.get("device", "cpu"))
    if device != "cpu":  # a CUDA cell's float order differs from the CPU reference's
        extra["device"] = device
    return {**comps, **extra, "run": run, "rounds": rounds, "seed": seed, "backend": backend,
            "versions": plugin_versions({**comps, "network": net_cfg}, reg)}


#: the distribution name of plugins that are not installed (``FEDMEDBENCH_PLUGINS`` modules)
UNVERSIONED = "(not installed)"


def plugin_versions(comps: dict[str, Any], reg: Registry) -> dict[str, str]:
    """``{distribution: version}`` of the installed distributions whose
    plugins provide the components ``comps`` names (dataset, partitioner,
    model, algorithm, aggregator, privacy mechanisms, compressor, adversary,
    attacks). It is part of the cell's config, so a new version of a plugin's
    distribution gives its cells new ids and they run again instead of
    reusing results of the old code. Built-ins all come from ``fedmedbench``;
    a plugin that is not installed (a module named in ``FEDMEDBENCH_PLUGINS``)
    has no version and is left out: after changing its code, rerun with
    ``--force``."""
    fams = {"dataset": "dataset", "partitioner": "partitioner", "model": "model",
            "algorithm": "algorithm", "aggregator": "aggregator", "privacy": "privacy",
            "compressor": "compressor", "adversary": "adversary", "attacks": "attack",
            "network": "network"}
    out: dict[str, str] = {}
    for key, family in fams.items():
        v = comps.get(key)
        for spec in (v if isinstance(v, list) else [v]):
            if not isinstance(spec, dict) or "name" not in spec:
                continue
            info = reg.get(family, spec["name"])
            if info.distribution != UNVERSIONED and info.version:
                out[info.distribution] = info.version
    return dict(sorted(out.items()))


def network_config(v: Any, reg: Registry) -> dict[str, Any] | None:
    """A network axis value's config for a cell: ``None`` for the default
    (``uniform`` with its defaults: the config then has no ``network`` key)
    and for ``none`` (the caller tells them apart: ``none`` is written as
    ``"network": null``)."""
    if v is None or v == DEFAULT_NETWORK:
        return None
    cfg = reg.build("network", v).config()
    if cfg["name"] == DEFAULT_NETWORK["name"] and all(x is None for k, x in cfg.items()
                                                      if k != "name"):
        return None
    return cfg


def cell_id(cfg: dict[str, Any]) -> str:
    """A stable 16-hex-digit hash of the resolved config (which holds the
    plugin distributions' versions, :func:`plugin_versions`) and the schema."""
    blob = json.dumps({"schema": SCHEMA, **cfg}, sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
