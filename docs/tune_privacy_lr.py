"""Choose matrices/privacy.toml's learning rates on the validation split.

    python docs/tune_privacy_lr.py            # about 5 minutes on 2 cores

Every cell carves ``[run] validation = 0.1`` of each site's training rows
(seeded, never trained on) and the record's ``utility.validation.global`` —
the final model scored on those rows — is what is compared; the test split
is not read. For each (dataset, optimiser family) the grid below runs the
privacy.toml cell it tunes for 3 seeds and prints the mean validation
metric per learning rate (`python docs/tune_privacy_lr.py synthetic-ehr`: only the
rows whose label holds that text); what privacy.toml uses is the smallest rate whose mean is
within ``TOLERANCE`` (0.002) of the best: 3 seeds do not separate rates on a
plateau, and the smallest one keeps the choice off the grid's edge (where one
setting serves several rows, ``SHARED``, the same rule on the mean over them).
"""

from __future__ import annotations

import statistics
import tomllib
from pathlib import Path

from fedmedbench.engine import run_cell
from fedmedbench.matrix import parse_matrix

ROOT = Path(__file__).resolve().parent.parent
BASE = tomllib.loads((ROOT / "matrices" / "privacy.toml").read_text())

#: (label, dataset entry, privacy entry, run settings held fixed, learning rates tried)
GRID = [
    ("heart-disease, SGD (no DP)", "heart-disease", "none", {"optimizer": "sgd"},
     [0.01, 0.05, 0.2]),
    ("heart-disease, DP-SGD eps=3", "heart-disease",
     {"name": "dp-sgd", "epsilon": 3.0, "delta": 1e-5}, {"optimizer": "sgd"}, [0.1, 0.5, 1.0]),
    ("synthetic-imaging, Adam (no DP)", "synthetic-imaging", "none", {"optimizer": "adam"},
     [0.001, 0.003, 0.01, 0.03]),
    ("synthetic-imaging, SGD (no DP)", "synthetic-imaging", "none", {"optimizer": "sgd"},
     [0.01, 0.05]),
    ("synthetic-imaging, DP-SGD eps=3", "synthetic-imaging",
     {"name": "dp-sgd", "epsilon": 3.0, "delta": 1e-5}, {"optimizer": "sgd"}, [0.1, 0.5, 1.0]),
    ("synthetic-ehr 50 hospitals, SGD (no DP)", {"name": "synthetic-ehr", "n_hospitals": 50},
     "none", {"optimizer": "sgd", "clients_per_round": 25}, [0.03, 0.1, 0.3, 1.0]),
    ("synthetic-ehr 50 hospitals, DP-FedAvg eps=3", {"name": "synthetic-ehr", "n_hospitals": 50},
     {"name": "dp-fedavg", "epsilon": 3.0, "clip": 1.0, "delta": 1e-5},
     {"optimizer": "sgd", "clients_per_round": 25}, [0.1, 0.3, 1.0, 3.0, 10.0, 30.0]),
]

#: a rate within this much of the best mean validation score counts as tied with it
TOLERANCE = 0.002


def choose(scores: dict[float, float]) -> float:
    """The smallest rate within :data:`TOLERANCE` of the best mean."""
    top = max(scores.values())
    return min(lr for lr, v in scores.items() if v >= top - TOLERANCE)


#: rows that share one setting of privacy.toml ([run.dp-sgd] serves both datasets):
#: its value is the best mean over those rows
SHARED = {"DP-SGD (one [run.dp-sgd] lr for both datasets)": (
    "heart-disease, DP-SGD eps=3", "synthetic-imaging, DP-SGD eps=3")}


def main(only: str = "") -> None:
    """Every row of :data:`GRID` (or those whose label contains ``only``)."""
    table: dict[str, dict[float, float]] = {}
    for label, dataset, privacy, fixed, lrs in GRID:
        if only not in label:
            continue
        scores = {}
        for lr in lrs:
            raw = {"name": "tune", "rounds": BASE["rounds"], "seeds": BASE["seeds"],
                   "axes": {"dataset": [dataset], "algorithm": BASE["axes"]["algorithm"],
                            "aggregator": BASE["axes"]["aggregator"], "privacy": [privacy]},
                   "run": {**{k: v for k, v in BASE.get("run", {}).items()
                              if not isinstance(v, dict)}, **fixed, "lr": lr}}
            vals = []
            for cell in parse_matrix(raw).cells:
                rec = run_cell(cell)
                assert rec["status"] == "ok", rec["error"]
                vals.append(rec["metrics"]["utility"]["validation"]["global"])
            scores[lr] = statistics.mean(vals)
        table[label] = scores
        best = choose(scores)
        row = ", ".join(f"lr {lr:g}: {v:.4f}" for lr, v in scores.items())
        print(f"{label}: {row} -> {best:g}", flush=True)
    for label, rows in SHARED.items():
        if not all(r in table for r in rows):
            continue
        lrs = [lr for lr in table[rows[0]] if all(lr in table[r] for r in rows)]
        mean = {lr: statistics.mean(table[r][lr] for r in rows) for lr in lrs}
        best = choose(mean)
        row = ", ".join(f"lr {lr:g}: {v:.4f}" for lr, v in mean.items())
        print(f"{label}: {row} -> {best:g}", flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else "")
