"""Figure lint (issue 20.5), over every figure the report makes:

- attack panels on fixed scales anchored at chance (AUC 0.5–1, TPR at a
  fixed FPR and the ROC on log axes 10⁻⁴–1), whatever the data;
- a distinct (marker, colour) per configuration (method × privacy) in each
  figure, full and partial HE included;
- one colour per method across every figure of the report;
- no text outside the canvas.

The lint is itself tested against figures that break each rule.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from report_fixtures import (
    clipped_texts,
    run,
    seal,
    with_many_sites,
    with_network_clock,
    with_privacy_and_attacks,
    with_sample_level_dp,
)

from fedmedbench.results import load_records


def entry_styles(fig) -> dict[tuple[str, str], set[tuple[str, str, bool]]]:
    """``{(method, privacy): {(colour, marker, hollow)}}`` of the markers drawn
    for each entry (lines without a marker are the series' joins)."""
    out: dict[tuple[str, str], set[tuple[str, str, bool]]] = {}
    for ln in fig.findobj(Line2D):
        e = getattr(ln, "_fmb_entry", None)
        if e is None or ln.get_marker() in ("", "None", None):
            continue
        hollow = to_hex(ln.get_markerfacecolor()) == "#ffffff"
        out.setdefault(e, set()).add((to_hex(ln.get_color()), str(ln.get_marker()), hollow))
    return out


def lint(figs: dict[str, tuple[str, str, Figure]]) -> list[str]:
    """Every rule broken by ``figs`` (``{stem: (dataset, kind, figure)}``)."""
    from fedmedbench.plugins.reporters.figures import METRIC_RANGE, ROC_RANGE

    problems: list[str] = []
    method_colour: dict[str, set[str]] = {}
    for stem, (_ds, kind, fig) in figs.items():
        for t in clipped_texts(fig):
            problems.append(f"{stem}: text outside the canvas: {t}")
        for ax in fig.axes:
            metric = getattr(ax, "_fmb_metric", None)
            if kind in ("attacks", "roc") and ax.get_visible() and ax.lines and metric is None:
                problems.append(f"{stem}: an attack panel without a fixed scale "
                                f"({ax.get_title()!r})")
            if metric is None:
                continue
            lo, hi, log = (*ROC_RANGE, True) if metric == "roc" else METRIC_RANGE[metric]
            ylim = tuple(round(float(v), 6) for v in ax.get_ylim())
            if not all(math.isclose(a, b) for a, b in zip(ylim, (lo, hi))):
                problems.append(f"{stem}: {metric} panel at {ylim}, not {(lo, hi)}")
            if (ax.get_yscale() == "log") != log:
                problems.append(f"{stem}: {metric} panel on a {ax.get_yscale()} axis")
            if metric == "roc" and ax.get_xscale() != "log":
                problems.append(f"{stem}: ROC with a linear FPR axis")
        styles = entry_styles(fig)
        seen: dict[tuple[str, str, bool], tuple[str, str]] = {}
        for entry, st in styles.items():
            if len(st) > 1:
                problems.append(f"{stem}: {entry} drawn in {len(st)} styles {sorted(st)}")
            for x in st:
                if x in seen and seen[x] != entry:
                    problems.append(f"{stem}: {entry} and {seen[x]} share {x}")
                seen.setdefault(x, entry)
                method_colour.setdefault(entry[0], set()).add(x[0])
    for m, cs in method_colour.items():
        if len(cs) > 1:
            problems.append(f"method {m!r} has {len(cs)} colours across figures: {sorted(cs)}")
    return problems


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Records of every kind of figure: DP at both units, full and partial
    HE, attacks with ROC curves and reconstructions, 50 sites, a simulated
    network's virtual clock."""
    base = tmp_path_factory.mktemp("lint")
    assert run(base / "whole") == 0
    recs, _ = load_records([base / "whole"])
    res = base / "results"
    out = with_privacy_and_attacks(recs, res / "images", rel=res)
    out += with_sample_level_dp(recs) + with_many_sites(recs, 50) + with_network_clock(recs)
    for r in list(out):  # full and partial CKKS: two configurations of one mechanism
        if r["config"]["algorithm"]["name"] == "fedavg" and r["labels"]["privacy"] == "none" \
                and r["labels"]["dataset"].startswith("synthetic"):
            for lab, cfg in (("he-ckks", {"name": "he-ckks"}),
                             ("he-ckks(layers=['0'])", {"name": "he-ckks", "layers": ["0"]})):
                c = copy.deepcopy(r)
                c["labels"]["privacy"] = lab
                c["config"]["privacy"] = [cfg]
                c["metrics"]["attacks"]["gradinv-idlg"]["psnr"] = 28.4 if "layers" in lab \
                    else 13.2
                out.append(seal(c))
    return [{**r, "_dirs": [str(res)]} for r in out]


def test_every_figure_of_the_report_passes_the_lint(rich: list[dict]) -> None:
    from fedmedbench.plugins.reporters.figures import figures, render
    from fedmedbench.report import build

    data = build(rich)
    figs = figures(data)
    kinds = {k for _, k, _ in figs.values()}
    assert kinds == {"tradeoff", "attacks", "roc", "convergence", "sites", "reconstructions",
                     "clock"}, kinds
    for stem in figs:
        render(data, stem, "svg")
    assert lint(figs) == []
    # full and partial HE: one entry each, different markers
    (ds, _, trade), = [v for v in figs.values() if v[1] == "tradeoff"
                       and v[0].startswith("synthetic")]
    st = entry_styles(trade)
    full, part = st[("fedavg", "he-ckks")], st[("fedavg", "he-ckks[layers=['0']]")]
    assert full != part
    # the attack panels of AUC and TPR@0.1% FPR sit on their fixed scales
    att = next(f for d, k, f in figs.values() if k == "attacks" and d == ds)
    metrics = {getattr(ax, "_fmb_metric", None) for ax in att.axes if ax.get_visible()}
    assert {"auc", "tpr_at_0.1pct_fpr", "psnr"} <= metrics
    # the clock figure only for the simulated network's records
    assert {d for d, k, _ in figs.values() if k == "clock"} == {"clocked"}


def _bad_figures() -> dict[str, tuple[str, str, Figure]]:
    from fedmedbench.plugins.reporters.figures import tag

    same = Figure(figsize=(4, 3), layout="constrained")
    ax = same.add_subplot()
    tag(ax.plot([1], [1], marker="o", color="C0")[0], "fedavg", "he-ckks")
    tag(ax.plot([2], [1], marker="o", color="C0")[0], "fedavg", "he-ckks[layers]")
    zoom = Figure(figsize=(4, 3), layout="constrained")
    ax = zoom.add_subplot()
    tag(ax.plot([1], [0.505], marker="s", color="C1")[0], "fedprox", "none")
    ax.set_ylim(0.500, 0.507)
    ax._fmb_metric = "auc"
    loose = Figure(figsize=(4, 3), layout="constrained")
    loose.add_subplot().plot([1], [1])
    cut = Figure(figsize=(4, 3))
    cut.text(0.9, 0.5, "a note that runs past the right edge")
    return {"same": ("d", "tradeoff", same), "zoom": ("d", "attacks", zoom),
            "loose": ("d", "attacks", loose), "cut": ("d", "sites", cut)}


def test_the_lint_catches_each_broken_rule() -> None:
    problems = lint(_bad_figures())
    text = "\n".join(problems)
    assert "('fedavg', 'he-ckks[layers]') and ('fedavg', 'he-ckks') share" in text \
        or "('fedavg', 'he-ckks') and ('fedavg', 'he-ckks[layers]') share" in text
    assert "zoom: auc panel at (0.5, 0.507)" in text
    assert "loose: an attack panel without a fixed scale" in text
    assert "cut: text outside the canvas" in text
    assert "method 'fedavg' has" not in text
    # one method in two colours across figures
    from fedmedbench.plugins.reporters.figures import tag

    a, b = Figure(), Figure()
    tag(a.add_subplot().plot([1], [1], marker="o", color="C0")[0], "fedavg", "none")
    tag(b.add_subplot().plot([1], [1], marker="o", color="C3")[0], "fedavg", "none")
    assert any("method 'fedavg' has 2 colours" in p
               for p in lint({"a": ("d", "sites", a), "b": ("d", "sites", b)}))


def test_tests_folder_is_importable() -> None:  # the lint helpers are used by the browser test
    assert Path(__file__).with_name("report_fixtures.py").is_file()
