"""Realistic result records for the report tests: a small real matrix run,
and copies of its records altered to carry DP accounting, attack results,
reconstruction images, odd strings, or to reach benchmark scale."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

MATRIX = """
name = "report-test"
rounds = 3
seeds = [0, 1]

[axes]
dataset = [{ name = "synthetic-tabular", n_samples = 400 }]
algorithm = ["centralized", "local", "fedavg"]
"""


def run(out: Path, *select: str, matrix: str = MATRIX) -> int:
    """``fedmedbench run`` of ``matrix`` into ``out`` (in-process)."""
    from fedmedbench.cli import main

    mfile = out.parent / f"{out.name}.toml"
    mfile.write_text(textwrap.dedent(matrix))
    args = ["run", str(mfile), "--out", str(out), "--no-progress", "--no-report"]
    for s in select:
        args += ["--select", s]
    return main(args)


def seal(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` with the cell id of its (altered) config, as ``run`` would have
    written it: ``report`` refuses a record whose id is not its config's hash."""
    from fedmedbench.matrix import cell_id

    rec["cell_id"] = cell_id(rec["config"])
    return rec


def _png(path: Path, seed: int, noise: float, rel: Path | None) -> str:
    from matplotlib.image import imsave

    rng = np.random.default_rng(seed)
    img = np.clip(np.kron(rng.random((4, 4)), np.ones((4, 4))) + noise * rng.normal(size=(16, 16)),
                  0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, img, cmap="gray", vmin=0, vmax=1)
    return str(path.relative_to(rel)) if rel is not None else str(path)


def with_privacy_and_attacks(records: list[dict[str, Any]], img_dir: Path | None = None,
                             rel: Path | None = None) -> list[dict[str, Any]]:
    """The ok records, plus for every federated one copies under DP at ε = 0.5,
    3 and 20 (utility lowered as ε shrinks), and membership-inference and
    gradient-inversion results on all of them (gradient inversion not applicable
    to centralized training). Reconstruction PNGs go under ``img_dir``, named
    relative to ``rel`` when given (as an attack storing them beside its
    records would)."""
    out = []
    for r in records:
        if r["status"] != "ok":
            continue
        alg = r["config"]["algorithm"]["name"]
        variants: list[float | None] = [None] + ([0.5, 3.0, 20.0] if alg == "fedavg" else [])
        for eps in variants:
            c = copy.deepcopy(r)
            u = c["metrics"]["utility"]
            if eps is not None:
                c["labels"]["privacy"] = f"dp-fedavg(epsilon={eps:g})"
                c["config"]["privacy"] = [{"name": "dp-fedavg", "epsilon": eps}]
                seal(c)
                drop = 0.2 / (1 + eps)
                u["global"] -= drop
                u["per_site"] = {k: v - drop for k, v in u["per_site"].items()}
                u["worst_site"] = min(u["per_site"].values())
                c["metrics"]["privacy"] = {
                    "level": "dp", "epsilon": eps, "delta": 1e-5, "accountant": "rdp",
                    "noise_multiplier": 1.0 / eps, "unit": "client",
                    "mechanisms": {"dp-fedavg": {"epsilon": eps, "delta": 1e-5}}}
                for h in c["history"]:
                    h["epsilon"] = eps * h["round"] / len(c["history"])
            e = 1.0 if eps is None else eps / (1 + eps)
            seed = c["config"]["seed"]
            att: dict[str, Any] = {
                "mia-loss": {"auc": 0.5 + 0.1 * e + 0.01 * seed, "advantage": 0.12 * e,
                             "tpr_at_1pct_fpr": 0.02 * e, "tpr_at_0.1pct_fpr": 0.002 * e,
                             "audit": {"epsilon_lower_bound": 0.4 * e},
                             "roc": {"fpr": [0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0],
                                     "tpr": [0.0, 1e-4 + 0.002 * e, 1e-3 + 0.01 * e,
                                             1e-2 + 0.05 * e, 0.1 + 0.1 * e, 1.0]},
                             "seconds": 0.5}}
            if alg == "centralized":
                att["gradinv-idlg"] = {"not_applicable": "centralized training sends no "
                                                          "updates to a server"}
            else:
                g = {"mse": 0.05 / e, "psnr": 13 + 5 * e, "ssim": 0.3 * e,
                     "label_accuracy": e}
                if img_dir is not None and seed == 0:
                    base = img_dir / c["cell_id"]
                    g["originals"] = [_png(base / f"orig{i}.png", i, 0, rel) for i in range(2)]
                    g["reconstructions"] = [_png(base / f"recon{i}.png", i, 0.6 * (1 - e), rel)
                                            for i in range(2)]
                att["gradinv-idlg"] = g
            c["metrics"]["attacks"] = att
            out.append(c)
    return out


def scaled(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` records made from copies of ``records`` spread over 5 datasets,
    extra seeds and methods, with distinct cell ids."""
    out = []
    i = 0
    while len(out) < n:
        for r in records:
            if len(out) >= n:
                break
            c = copy.deepcopy(r)
            k = i // len(records)
            c["labels"]["dataset"] = f"dataset-{k % 5}"
            c["config"]["dataset"] = {"name": f"dataset-{k % 5}"}
            c["config"]["seed"] = 100 + k // 5  # one seed per copy: no seed counted twice
            c["labels"]["algorithm"] = f"{c['labels']['algorithm']}-v{k // 20 % 5}"
            c["config"]["algorithm"] = {**c["config"]["algorithm"], "variant": k // 20 % 5}
            seal(c)
            u = c["metrics"]["utility"]
            u["global"] = float(u["global"]) * (1 - 0.01 * (k % 7))
            out.append(c)
            i += 1
    return out


def with_sample_level_dp(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the ok federated records under sample-level DP-SGD at ε = 1
    and 8 (unit ``record``), with a membership-inference result."""
    out = []
    for r in records:
        if r["status"] != "ok" or r["config"]["algorithm"]["name"] != "fedavg" \
                or r["config"]["privacy"]:
            continue
        for eps in (1.0, 8.0):
            c = copy.deepcopy(r)
            c["labels"]["privacy"] = f"dp-sgd(epsilon={eps})"
            c["config"]["privacy"] = [{"name": "dp-sgd", "epsilon": eps}]
            seal(c)
            u = c["metrics"]["utility"]
            drop = 0.1 / (1 + eps)
            u["global"] -= drop
            u["per_site"] = {k: v - drop for k, v in u["per_site"].items()}
            u["worst_site"] = min(u["per_site"].values())
            c["metrics"]["privacy"] = {
                "level": "dp", "epsilon": eps, "delta": 1e-5, "accountant": "rdp",
                "noise_multiplier": 1.0, "unit": "record",
                "mechanisms": {"dp-sgd": {"epsilon": eps, "delta": 1e-5}}}
            c["metrics"]["attacks"] = {"mia-loss": {"auc": 0.5 + 0.01 * eps / (1 + eps),
                                                    "advantage": 0.01}}
            out.append(c)
    return out


def with_many_sites(records: list[dict[str, Any]], n_sites: int) -> list[dict[str, Any]]:
    """Copies of the ok records as dataset ``sites-<n_sites>`` with
    ``n_sites`` sites of spread-out utility (one clearly the worst)."""
    out = []
    for r in records:
        if r["status"] != "ok":
            continue
        c = copy.deepcopy(r)
        c["labels"]["dataset"] = f"sites-{n_sites}"
        c["config"]["dataset"] = {"name": f"sites-{n_sites}"}
        seal(c)
        rng = np.random.default_rng(int(c["cell_id"][:8], 16))
        u = c["metrics"]["utility"]
        vals = np.clip(u["global"] + rng.normal(0, 0.05, n_sites), 0, 1)
        vals[n_sites // 3] = max(0.0, u["global"] - 0.35)
        u["per_site"] = {f"hospital-{i:03d}": float(v) for i, v in enumerate(vals)}
        u["worst_site"] = float(vals.min())
        out.append(c)
    return out


def with_network_clock(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the ok federated records as dataset ``clocked`` run on a
    simulated network (``config.network``), with a virtual clock in their
    history (``clock_s``) and, for FedAvg, a secure-aggregation twin whose
    rounds take longer."""
    out = []
    for r in records:
        if r["status"] != "ok" or r["config"]["algorithm"]["name"] != "fedavg":
            continue
        for priv, slow in (("none", 1.0), ("secagg", 2.5)):
            c = copy.deepcopy(r)
            c["labels"]["dataset"] = "clocked"
            c["config"]["dataset"] = {"name": "clocked"}
            c["config"]["network"] = {"name": "hospital-mix"}
            c["labels"]["privacy"] = priv
            c["config"]["privacy"] = [] if priv == "none" else [{"name": priv}]
            seal(c)
            for h in c["history"]:
                h["clock_s"] = 1800.0 * slow * h["round"]
            out.append(c)
    return out


def clipped_texts(fig) -> list[str]:
    """What of a figure is drawn outside it: empty when the box of everything
    drawn (titles, labels, tick labels in view, legends, texts) lies inside
    the figure; else that box and the texts that stick out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    tight = fig.get_tightbbox(r)  # inches, drawn artists only
    w, h = fig.get_size_inches()
    if tight.x0 >= -0.01 and tight.y0 >= -0.01 and tight.x1 <= w + 0.01 \
            and tight.y1 <= h + 0.01:
        return []
    out = [f"drawn content {[round(x, 2) for x in tight.extents]} in a {w:g} x {h:g} in figure"]
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible()):
            b = t.get_window_extent(r)
            if b.x0 < -1 or b.y0 < -1 or b.x1 > fig.bbox.width + 1 or b.y1 > fig.bbox.height + 1:
                out.append(repr(t.get_text()[:60]))
    return out
