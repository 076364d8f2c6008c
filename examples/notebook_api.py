"""fedmedbench from Python, notebook style: run a small matrix, plot from the DataFrame.

Run it as a script (each ``# %%`` block is a notebook cell)::

    python examples/notebook_api.py [OUT_DIR]      # default: results/notebook

It runs 8 cells (heart-disease, 4 real hospitals; local training and FedAvg,
FedAvg also under DP-SGD at ε = 1 and 8; 5 rounds; 2 seeds; about 20 s on
2 cores), prints the per-cell DataFrame, draws utility against ε with
matplotlib into ``OUT_DIR/utility_vs_epsilon.png`` and writes the full
report into ``OUT_DIR/report/``. Running it again reuses the finished cells.
"""

# %% imports
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; in a notebook leave this out
import matplotlib.pyplot as plt  # noqa: E402

import fedmedbench as fmb  # noqa: E402

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/notebook")

# %% a matrix is a dict in the shape of a matrix file (or a path, or None for the quickstart)
matrix = {
    "name": "notebook",
    "rounds": 5,
    "seeds": [0, 1],
    "axes": {
        "dataset": ["heart-disease"],
        "algorithm": ["local", "fedavg"],
        "privacy": ["none", {"name": "dp-sgd", "epsilon": 1.0},
                    {"name": "dp-sgd", "epsilon": 8.0}],
    },
    "exclude": [{"algorithm": "local", "privacy": "dp-sgd"}],
}
results = fmb.run(matrix, out=out / "results", progress=False)
print(results)

# %% one row per cell: labels, utility, per-site utility, ε, bytes, attack metrics
df = results.frame()
print(df[["method", "privacy", "seed", "utility", "worst_site", "epsilon", "unit",
          "bytes_per_round"]].to_string(index=False))

# %% the report's tables are DataFrames too
summary = results.tables()["summary"]
print(summary[["method", "privacy", "utility_mean", "utility_std", "worst_site_mean",
               "epsilon"]].to_string(index=False))

# %% utility against ε, one series per method (no DP drawn as a dashed line)
ok = df[df["status"] == "ok"]
fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
for i, (method, g) in enumerate(ok.groupby("method")):
    color = f"C{i}"
    dp = g[g["epsilon"].notna()].groupby("epsilon")["utility"].agg(["mean", "std"])
    if len(dp):
        ax.errorbar(dp.index, dp["mean"], yerr=dp["std"], marker="o", capsize=3,
                    color=color, label=f"{method}, DP-SGD")
    plain = g[g["privacy"] == "none"]["utility"]
    if len(plain):
        ax.axhline(plain.mean(), color=color, ls="--", lw=1, label=f"{method}, no privacy")
ax.set_xscale("log")
eps = sorted(ok["epsilon"].dropna().round(1).unique())
ax.set_xticks(eps, [f"{e:g}" for e in eps])
ax.minorticks_off()
ax.set_xlabel("sample-level ε (δ = 1e-5)")
ax.set_ylabel(f"{ok['metric'].iloc[0]} on the pooled test set")
ax.set_title("heart-disease: what DP-SGD costs (mean ± std over 2 seeds)")
ax.legend(frameon=False, fontsize=8)
png = out / "utility_vs_epsilon.png"
fig.savefig(png, dpi=120)
print(f"wrote {png}")

# %% and the full report (markdown, csv, json, figures, one HTML page)
paths = results.report(out / "report")
print(f"wrote {len(paths)} report files into {out / 'report'}")
