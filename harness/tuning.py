"""Hyperparameter selection inside the budget (``fedmedbench tune``).

A learning rate picked on the same hospitals' rows that the published cell
then trains and is scored on is a release about those rows that no ε
covers. :func:`tune` selects under one stated rule, ``separate-rows``:

1. each site's training rows are split once, with the tuning seed (never a
   cell seed), into **tuning rows** (``fraction`` of them) and **the rest**;
2. every trial — a point of the grid, run for each tuning seed — trains and
   is validated on the tuning rows only (``[run] validation`` carved inside
   them), on seeds the published cells do not use;
3. the grid point with the best mean validation score wins (the first in
   grid order among those within ``tolerance`` of the best);
4. the published cells train on the rest, with the chosen values, and their
   config carries the protocol (``config.tuning``: rule, grid, trials,
   seeds, the choice, and the ε covering selection).

So selection reads no row the published cell trains or is scored on: the ε
covering selection, for the published cell's rows, is 0. The tuning rows
are another matter, and the record says so: with DP trials their training
steps compose (basic composition over the trials) but the validation scores
that pick the winner are not noised, so the tuning rows used for
validation are not protected; without DP nothing protects them.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmedbench.errors import ConfigError

__all__ = ["TuneSpec", "TuningResult", "tune", "RULES", "TUNING_SEED"]

RULES = ("separate-rows",)
#: the seed of the tuning/rest split of every site's training rows
TUNING_SEED = 20_261_206


@dataclass(frozen=True)
class TuneSpec:
    """What to tune and how.

    Attributes
    ----------
    params : dict of str to list
        The grid: run settings by name (``lr``, ``local_steps``) or a
        component's parameter as ``"<component>.<parameter>"`` (``"dp-sgd.
        max_grad_norm"``, ``"fedprox.mu"``).
    seeds : list of int
        The trials' seeds; none may be a seed of the matrix.
    fraction : float
        Share of each site's training rows reserved for tuning.
    validation : float
        Share of the tuning rows carved out for the trials' validation score.
    tolerance : float
        A grid point within this of the best mean score ties with it; the
        first tied point in grid order wins.
    rule : str
        ``"separate-rows"`` (:data:`RULES`).
    """

    params: dict[str, list[Any]]
    seeds: list[int] = field(default_factory=lambda: [1001, 1002])
    fraction: float = 0.2
    validation: float = 0.25
    tolerance: float = 0.0
    rule: str = "separate-rows"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"tune: rule = {self.rule!r}; choose one of {', '.join(RULES)}")
        if not self.params or not all(isinstance(v, list) and v for v in self.params.values()):
            raise ConfigError("tune: give at least one parameter with a non-empty list of "
                              "values, e.g. --param lr=0.01,0.1")
        if not 0 < self.fraction < 1:
            raise ConfigError(f"tune: fraction = {self.fraction!r}; it must be in (0, 1)")
        if not 0 < self.validation < 1:
            raise ConfigError(f"tune: validation = {self.validation!r}; it must be in (0, 1)")
        if not self.seeds:
            raise ConfigError("tune: give at least one tuning seed")

    def grid(self) -> list[dict[str, Any]]:
        keys = list(self.params)
        return [dict(zip(keys, combo)) for combo in itertools.product(
            *(self.params[k] for k in keys))]


@dataclass
class TuningResult:
    """The choice per cell group (cells that differ only in their seed), the
    trials' log, and the matrix the published cells run."""

    matrix: dict[str, Any]
    choices: list[dict[str, Any]]
    log: list[dict[str, Any]]


def _apply(raw: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the grid ``point`` set: run settings in ``[run]``,
    component parameters in ``[run.<component>]``... for components the
    matrix names, their axis entries."""
    out = copy.deepcopy(raw)
    run = out.setdefault("run", {})
    for key, value in point.items():
        if "." in key:
            comp, param = key.split(".", 1)
            found = False
            for axis, vals in out["axes"].items():
                new = []
                for v in vals:
                    items = v if isinstance(v, list) else [v]
                    moved = []
                    for it in items:
                        spec = {"name": it} if isinstance(it, str) else dict(it)
                        if spec.get("name") == comp:
                            spec[param], found = value, True
                        moved.append(spec)
                    new.append(moved if isinstance(v, list) else moved[0])
                out["axes"][axis] = new
            if not found:
                raise ConfigError(f"tune: parameter {key!r} names component {comp!r}, which no "
                                  f"axis of the matrix uses")
        else:
            run[key] = value
    return out


def _groups(raw: dict[str, Any], registry: Any) -> list[dict[str, Any]]:
    """One single-point matrix per group of cells that differ only in seed."""
    from fedmedbench.matrix import AXES, parse_matrix

    m = parse_matrix(raw, registry=registry)
    seen, out = set(), []
    for cell in m.iter_cells():
        cfg = {k: v for k, v in cell["config"].items() if k != "seed"}
        key = json.dumps(cfg, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        labels = cell.get("labels", {})
        point = {a: [_entry(cell["config"], a)] for a in AXES if a in raw.get("axes", {})}
        out.append({"labels": labels, "axes": point})
    return out


def _for_group(raw: dict[str, Any], axes: dict[str, list[Any]]) -> dict[str, Any]:
    """``raw`` as the single-group matrix of ``axes``: the ``[run.<component>]``
    tables of components the group does not use are left out (the matrix
    refuses a table no axis uses)."""
    names = set()
    stack: list[Any] = [v for vals in axes.values() for v in vals]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            names.add(v)
        elif isinstance(v, dict) and isinstance(v.get("name"), str):
            names.add(v["name"])
    run = {k: v for k, v in (raw.get("run") or {}).items()
           if not isinstance(v, dict) or k in names}
    return {**raw, "axes": axes, "run": run}


def _entry(cfg: dict[str, Any], axis: str) -> Any:
    v: Any = cfg.get(axis)
    if axis == "privacy" and isinstance(v, list):
        return v if len(v) != 1 else v[0]
    if axis == "network":  # not in the config: the default network; None: the twin off
        return "none" if axis in cfg and v is None else (v or "uniform")
    if v is None:  # the axis's default ("default": the dataset's own model, partitioner)
        from fedmedbench.matrix import AXIS_DEFAULTS

        return AXIS_DEFAULTS.get(axis, [None])[0]
    return v


def tune(raw: dict[str, Any], spec: TuneSpec, *, registry: Any = None,
         run: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> TuningResult:
    """Select ``spec``'s grid for each cell group of matrix ``raw`` under
    ``spec.rule``, and return the matrix of the published cells (each group
    with its choice and its ``tuning`` block) with the trials' log."""
    from fedmedbench.engine import run_cell
    from fedmedbench.matrix import parse_matrix
    from fedmedbench.registry import get_registry

    reg = registry or get_registry()
    run = run or (lambda cell: run_cell(cell, registry=reg))
    seeds = list(raw.get("seeds", [0]))
    clash = sorted(set(seeds) & set(spec.seeds))
    if clash:
        raise ConfigError(f"tune: seeds {clash} are both the matrix's and the tuning's; the "
                          f"published cells must use seeds the trials did not see")
    grid = spec.grid()
    base = {"seed": TUNING_SEED, "fraction": spec.fraction}
    log: list[dict[str, Any]] = []
    choices: list[dict[str, Any]] = []
    published = []
    for group in _groups(raw, reg):
        scores: list[float] = []
        eps_trials: list[tuple[float, float]] = []
        for point in grid:
            trial = _apply({**_for_group(raw, group["axes"]), "seeds": spec.seeds}, point)
            trial.setdefault("run", {})["validation"] = spec.validation
            vals = []
            for cell in parse_matrix(trial, registry=reg).iter_cells():
                cell = _with_tuning(cell, {**base, "role": "tune"}, reg)
                rec = run(cell)
                v = ((rec.get("metrics") or {}).get("utility") or {}).get("validation") or {}
                score = v.get("global") if isinstance(v, dict) else None
                p = (rec.get("metrics") or {}).get("privacy") or {}
                if p.get("epsilon") is not None:
                    eps_trials.append((float(p["epsilon"]), float(p.get("delta") or 0.0)))
                log.append({"group": group["labels"], "point": point, "seed":
                            cell["config"]["seed"], "status": rec["status"],
                            "validation": score})
                if rec["status"] == "ok" and score is not None and math.isfinite(score):
                    vals.append(float(score))
            scores.append(sum(vals) / len(vals) if vals else float("-inf"))
        best = max(scores)
        if not math.isfinite(best):
            raise ConfigError(f"tune: no trial of {group['labels']} finished with a validation "
                              f"score; see the log")
        pick = next(i for i, s in enumerate(scores) if s >= best - spec.tolerance)
        eps_sum = sum(e for e, _ in eps_trials)
        delta_sum = sum(d for _, d in eps_trials)
        block = {
            **base, "role": "rest", "rule": spec.rule, "grid": spec.params,
            "trials": len(grid) * len(spec.seeds), "tuning_seeds": list(spec.seeds),
            "validation": spec.validation, "tolerance": spec.tolerance,
            "chosen": grid[pick], "mean_validation": scores[pick],
            "epsilon_selection": 0.0,
            "protocol": (
                f"separate rows: {spec.fraction:g} of each site's training rows (seed "
                f"{TUNING_SEED}) are the tuning rows; {len(grid)} grid points x "
                f"{len(spec.seeds)} seeds trained and validated on them only; the best mean "
                f"validation score chose {grid[pick]}; this cell trains on the other rows, "
                f"so selection read none of its rows (epsilon covering selection: 0)"),
            "tuning_rows": (
                (f"the trials' DP training steps compose to epsilon <= {eps_sum:.6g} at delta "
                 f"<= {delta_sum:.3g} on the tuning rows (basic composition over "
                 f"{len(eps_trials)} trials); their validation scores are not noised, so the "
                 f"tuning rows used for validation are not protected") if eps_trials else
                "no privacy mechanism protects the tuning rows (they are used only for "
                "selection)")}
        choices.append({"group": group["labels"], "chosen": grid[pick],
                        "scores": dict(zip(map(json.dumps, grid), scores))})
        published.append((_apply(_for_group(raw, group["axes"]), grid[pick]), block,
                          group["labels"]))
    return TuningResult(matrix={"groups": published}, choices=choices, log=log)


def _with_tuning(cell: dict[str, Any], block: dict[str, Any], reg: Any) -> dict[str, Any]:
    """``cell`` with ``config.tuning`` set and its id recomputed."""
    from fedmedbench.matrix import cell_id

    cfg = {**cell["config"], "tuning": block}
    return {**cell, "config": cfg, "cell_id": cell_id(cfg)}


def published_cells(result: TuningResult, *, registry: Any = None) -> list[dict[str, Any]]:
    """The published cells: each group's matrix with its choice, on the
    matrix's own seeds, with its ``tuning`` block (role ``rest``)."""
    from fedmedbench.matrix import parse_matrix
    from fedmedbench.registry import get_registry

    reg = registry or get_registry()
    out = []
    for raw, block, labels in result.matrix["groups"]:
        for cell in parse_matrix(raw, registry=reg).iter_cells():
            # the labels the matrix gave the group (its one-point matrix spells every
            # parameter out)
            out.append({**_with_tuning(cell, block, reg), "labels": dict(labels)})
    return out


def choose(scores: Sequence[float], tolerance: float) -> int:
    """The first index within ``tolerance`` of the best score."""
    best = max(scores)
    return next(i for i, s in enumerate(scores) if s >= best - tolerance)
