"""`mtlrun-compare --plot`'s heat maps of inter-task affinity, from the runs' diagnostics.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mtlrun.outputs import DIAGNOSTICS_CSV
from mtlrun.report.figures import run_frames
from mtlrun.report.table import Comparison


AFFINITY_KINDS = {  # column prefix in diagnostics.csv -> what its heat map shows
    "affinity/": "lookahead (Fifty et al.), run mean",
    "running_affinity/": "running (grouping=affinity), last row",
}


def affinity_matrices(comparison: Comparison, prefix: str = "affinity/") -> dict[str, pd.DataFrame]:
    """Per configuration, the `<prefix><s>/<t>` columns of its runs' diagnostics.csv as a matrix (rows s,
    columns t), mean over seeds of each run's mean over its rows (`affinity/`, a per-interval measurement)
    or of its last row (`running_affinity/`, already a running average)."""
    frame = run_frames(comparison, DIAGNOSTICS_CSV)
    columns = [c for c in frame.columns if c.startswith(prefix)]
    matrices = {}
    for label, rows in frame.groupby("label", sort=False):
        rows = rows.dropna(subset=columns, how="all")
        if rows.empty:
            continue
        per_run = rows.groupby("run", sort=False)[columns]
        means = (per_run.mean() if prefix == "affinity/" else per_run.last()).mean()
        pairs = {
            tuple(c.removeprefix(prefix).split("/")): means[c] for c in columns if not np.isnan(means[c])
        }
        tasks = list(dict.fromkeys(t for pair in pairs for t in pair))
        matrix = pd.DataFrame(np.nan, index=tasks, columns=tasks)
        for (source, target), value in pairs.items():
            matrix.loc[source, target] = value
        matrices[label] = matrix
    return matrices


def plot_affinity(comparison: Comparison, path: Path) -> str:
    """Heat maps of inter-task affinity, one column per configuration: the lookahead affinity of every run
    with diagnostics (top) and the running affinity of grouping=affinity runs (bottom). Row s, column t:
    how a step on s changes t's loss (> 0: s helps t). Each map has its own colour scale, set by the
    off-diagonal entries (a task's effect on itself, far larger, saturates)."""
    kinds = {prefix: affinity_matrices(comparison, prefix) for prefix in AFFINITY_KINDS}
    kinds = {prefix: matrices for prefix, matrices in kinds.items() if matrices}
    if not kinds:
        return (f"{path.name} not written: no run has affinity columns in its {DIAGNOSTICS_CSV} "
                f"(train with diagnostics=true)")
    labels = list(dict.fromkeys(label for matrices in kinds.values() for label in matrices))
    size = max(len(m) for matrices in kinds.values() for m in matrices.values())
    annotate = size <= 6
    side = min(max(5.0, (0.9 if annotate else 0.28) * size + 2.5), 14.0)
    fig = Figure(figsize=(side * len(labels), side * len(kinds)), layout="constrained")
    axes = fig.subplots(len(kinds), len(labels), squeeze=False)
    for row, (prefix, matrices) in enumerate(kinds.items()):
        for col, label in enumerate(labels):
            ax = axes[row][col]
            if label not in matrices:
                ax.set_axis_off()
                continue
            values = matrices[label].to_numpy()
            off_diagonal = values[~np.eye(len(values), dtype=bool)]
            finite = np.abs(off_diagonal[np.isfinite(off_diagonal)])
            if finite.size and finite.max() > 0:
                bound = float(finite.max())
            else:
                bound = float(np.nanmax(np.abs(values))) or 1.0
            image = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound)
            ticks = range(len(values))
            font = 8 if len(values) <= 12 else 5
            ax.set_xticks(ticks, matrices[label].columns, rotation=90, fontsize=font)
            ax.set_yticks(ticks, matrices[label].index, fontsize=font)
            if annotate:
                for (i, j), value in np.ndenumerate(values):
                    ink = "white" if abs(value) > 0.6 * bound else "black"
                    ax.text(j, i, f"{value:.1e}", ha="center", va="center", fontsize=6, color=ink)
            ax.set_title(f"{label}\n{AFFINITY_KINDS[prefix]}", fontsize=9)
            ax.set_xlabel("task t (loss measured)")
            ax.set_ylabel("task s (step taken)")
            fig.colorbar(image, ax=ax, shrink=0.8, label="affinity (> 0: s helps t)")
    fig.suptitle("Inter-task affinity 1 - L_t(after a step on s) / L_t(before), mean over seeds")
    fig.savefig(path, dpi=120)
    return f"wrote {path}"
