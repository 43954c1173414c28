"""`mtlrun-compare --plot`: the comparison's figures as PNG files, on matplotlib's Agg canvas (no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mtlrun.report.delta import relative_change
from mtlrun.report.runs import DELTA_M, SINGLE_TASK, read_csv, run_file, same, training_settings
from mtlrun.report.table import Comparison, mean_std, plain, table_settings
from mtlrun.outputs import DIAGNOSTICS_CSV, METRICS_CSV, TRAIN_LOG_CSV

AVERAGED = "averaged"
TRADEOFF_PNG = "tradeoff.png"
PER_TASK_PNG = "per_task_vs_averaged.png"
CURVES_PNG = "training_curves.png"
DIAGNOSTICS_PNG = "diagnostics.png"
AFFINITY_PNG = "affinity.png"


def write_plots(comparison: Comparison, out_dir: Path, metric: str | None = None) -> list[str]:
    """Write the figures into `out_dir`; return one line per figure: where it went, or why not."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_tradeoff(comparison, out_dir / TRADEOFF_PNG, metric),
        plot_against_averaged(comparison, out_dir / PER_TASK_PNG),
        plot_curves(comparison, out_dir / CURVES_PNG),
        plot_diagnostics(comparison, out_dir / DIAGNOSTICS_PNG),
        plot_affinity(comparison, out_dir / AFFINITY_PNG),
    ]


def direction(higher_is_better: bool | None) -> str:
    return {True: "higher is better", False: "lower is better", None: "direction unknown"}[higher_is_better]


def colours(comparison: Comparison) -> dict[str, str]:
    """One colour per configuration label, the same in every figure and subplot."""
    return {label: f"C{i % 10}" for i, label in enumerate(comparison.labels())}


def plot_tradeoff(comparison: Comparison, path: Path, metric: str | None) -> str:
    """Δm% (or `metric`) against seconds per epoch, one point per configuration with error bars over seeds,
    labelled by group size: what grouping tasks gains against what it costs."""
    table, column = comparison.table, metric or DELTA_M
    if "seconds_per_epoch mean" not in table:
        return f"{path.name} not written: the results have no seconds_per_epoch"
    shown = table[table[f"{column} mean"].notna() & table["seconds_per_epoch mean"].notna()]
    if shown.empty:
        what = "Δm% (see above); choose a metric with --plot-metric" if metric is None else metric
        return f"{path.name} not written: no configuration has {what}"
    labels = comparison.labels()
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    for strategy, group in shown.groupby("strategy", sort=False):
        x, y = group["seconds_per_epoch mean"], group[f"{column} mean"]
        ax.errorbar(x, y, xerr=group["seconds_per_epoch std"], yerr=group[f"{column} std"], fmt="o", capsize=3,
                    label=strategy)
        for i, row in group.iterrows():
            text = labels[i].removeprefix(str(strategy)).strip()
            if "k=" not in text and row["strategy"] != SINGLE_TASK and not pd.isna(row["group_size"]):
                text = f"k={plain(row['group_size'])} {text}".strip()
            ax.annotate(text, (x[i], y[i]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if metric is None:
        ax.axhline(0, color="grey", linewidth=0.8, linestyle="--", label="single-task level")
        ax.set_ylabel("Δm% against single-task (%, higher is better)")
    else:
        ax.set_ylabel(f"{metric} ({direction(comparison.higher_is_better(metric))})")
    ax.set_xlabel("seconds per epoch (s, lower is cheaper)")
    ax.set_title(f"Δm% against compute\n({comparison.split} split; mean ± std over seeds; k = group size)"
                 if metric is None else f"{metric} against compute\n(mean ± std over seeds; k = group size)")
    ax.legend(title="strategy")
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def task_change(comparison: Comparison, config_id: str, reference: pd.Series, task: str) -> tuple[float, float]:
    """Mean ± std over seeds of a configuration's change against `reference` on one task: per run, the mean
    over the task's metrics (with a direction and a non-zero reference) of the signed relative change, in %."""
    runs = comparison.runs[comparison.runs["config_id"] == config_id]
    changes = [
        relative_change(runs[m], reference[f"{m} mean"], comparison.higher_is_better(m))
        for m in comparison.split_metrics()
        if m.split("/")[1] == task and comparison.higher_is_better(m) is not None and runs[m].notna().all()
        and reference[f"{m} mean"] != 0 and not np.isnan(reference[f"{m} mean"])
    ]
    return mean_std(pd.concat(changes, axis=1).mean(axis=1)) if changes else (np.nan, np.nan)


def plot_against_averaged(comparison: Comparison, path: Path) -> str:
    """Per task, bars of each multi-task configuration's relative change against the averaged configuration
    with otherwise equal settings (else the first averaged configuration found), mean ± std over seeds."""
    table, labels = comparison.table, comparison.labels()
    averaged = table[table["strategy"] == AVERAGED]
    if averaged.empty:
        return f"{path.name} not written: no averaged configuration (strategy == {AVERAGED}) among the inputs"
    settings = training_settings(table_settings(table))
    tasks = list(dict.fromkeys(m.split("/")[1] for m in comparison.split_metrics()))
    bars: list[tuple[str, list[float], list[float]]] = []
    fallback: list[str] = []
    for i, row in table.iterrows():
        if row["strategy"] in (AVERAGED, SINGLE_TASK):
            continue
        equal = averaged[[all(same(row[s], a[s]) for s in settings) for _, a in averaged.iterrows()]]
        if equal.empty:
            fallback.append(labels[i])
        reference = (equal if len(equal) else averaged).iloc[0]
        means, stds = zip(*(task_change(comparison, row["config_id"], reference, t) for t in tasks))
        bars.append((labels[i], list(means), list(stds)))
    if not bars:
        return f"{path.name} not written: no configuration besides averaged and single-task ones to compare"
    colour = colours(comparison)
    fig = Figure(figsize=(max(6.0, 1.6 * len(tasks) * max(1, len(bars) / 2)), 4.8), layout="constrained")
    ax = fig.subplots()
    x, width = np.arange(len(tasks)), 0.8 / len(bars)
    for k, (label, means, stds) in enumerate(bars):
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=label,
               color=colour[label])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, tasks)
    ax.set_xlabel("task")
    ax.set_ylabel("change against averaged (%, higher is better)")
    ax.set_title(f"Per-task change against averaged\n({comparison.split} split; mean over each task's "
                 f"metrics, ± std over seeds)")
    ax.legend()
    fig.savefig(path, dpi=120)
    if fallback:
        first = labels[averaged.index[0]]
        return (f"wrote {path}; no averaged configuration has the other settings of {', '.join(fallback)}, "
                f"so they are compared with the first one ({first})")
    return f"wrote {path}"


def run_frames(comparison: Comparison, name: str) -> pd.DataFrame:
    """The `name` CSV of every run that has one, with its configuration's label in a `label` column and its
    directory in `run`."""
    frames = []
    for label, config_id in zip(comparison.labels(), comparison.table["config_id"]):
        for run_dir in comparison.runs.loc[comparison.runs["config_id"] == config_id, "run_dir"]:
            path = run_file(run_dir, name)
            if path is not None:
                frames.append(read_csv(path).assign(label=label, run=str(run_dir)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["label", "run", "epoch"])


def plot_mean_curves(ax: Axes, frame: pd.DataFrame, value: str, colour: dict[str, str], x: str = "epoch") -> None:
    """One line per configuration: `value` against `x`, mean over the configuration's seeds."""
    for label, rows in frame.groupby("label", sort=False):
        curve = rows.groupby(x)[value].mean().dropna()
        if len(curve):
            ax.plot(curve.index, curve.values, marker="o", markersize=3, label=label, color=colour[label])


def plot_curves(comparison: Comparison, path: Path) -> str:
    """Per task, the split's first metric of the task against epoch (top row; against iteration where every
    run evaluated every N iterations) and its mean train loss against epoch (bottom row), one line per
    configuration, mean over seeds, from each run's metrics.csv and train_log.csv."""
    metrics, logs = run_frames(comparison, METRICS_CSV), run_frames(comparison, TRAIN_LOG_CSV)
    metrics = metrics[metrics["split"] == comparison.split] if "split" in metrics else metrics
    by_iteration = "iteration" in metrics and len(metrics) > 0 and metrics["iteration"].notna().all()
    metric_x = "iteration" if by_iteration else "epoch"
    loss_tasks = [c.removeprefix("loss/") for c in logs.columns if c.startswith("loss/")]
    tasks = list(dict.fromkeys([*metrics.get("task", []), *loss_tasks]))
    if not tasks:
        return f"{path.name} not written: no run has a {METRICS_CSV} or {TRAIN_LOG_CSV} beside its results"
    colour = colours(comparison)
    fig = Figure(figsize=(3.6 * len(tasks) + 2.5, 6.5), layout="constrained")
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for j, task in enumerate(tasks):
        top, bottom = axes[0][j], axes[1][j]
        rows = metrics[metrics["task"] == task] if len(metrics) else metrics
        if len(rows):
            first = rows["metric"].iloc[0]
            plot_mean_curves(top, rows[rows["metric"] == first], "value", colour, x=metric_x)
            top.set_title(f"{task}: {comparison.split} {first}")
            top.set_ylabel(f"{first} ({direction(comparison.directions.get(f'{task}/{first}'))})")
        if f"loss/{task}" in logs:
            plot_mean_curves(bottom, logs, f"loss/{task}", colour)
        bottom.set_title(f"{task}: train loss")
        bottom.set_ylabel("mean train loss (lower is better)")
        for ax, x in ((top, metric_x), (bottom, "epoch")):
            ax.set_xlabel(x)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper")
    fig.suptitle("Training curves (mean over seeds)")
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def plot_diagnostics(comparison: Comparison, path: Path) -> str:
    """From the runs' diagnostics.csv: distance of the shared parameters from their initial values, displacement
    per optimizer step, and the mean pairwise cosine of the task gradients, against iteration, one line per
    configuration (mean over seeds): how far each strategy explores and how much its tasks conflict."""
    frame = run_frames(comparison, DIAGNOSTICS_CSV)
    if "iteration" not in frame or frame.empty:
        return f"{path.name} not written: no run has a {DIAGNOSTICS_CSV} (train with diagnostics=true)"
    cosines = [c for c in frame.columns if c.startswith("cosine/")]
    frame = frame.assign(mean_cosine=frame[cosines].mean(axis=1) if cosines else np.nan)
    panels = [
        ("distance_from_init", "distance of shared parameters from init", "L2 norm"),
        ("displacement_per_step", "displacement per optimizer step", "L2 norm"),
        ("mean_cosine", "mean pairwise cosine of task gradients", "cosine (< 0: conflict)"),
    ]
    colour = colours(comparison)
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (column, title, unit) in zip(axes, panels):
        plot_mean_curves(ax, frame, column, colour, x="iteration")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(unit)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper")
    fig.suptitle("Training diagnostics (mean over seeds)")
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


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
