"""`mtlrun-compare --plot`: the comparison's figures as PNG files, on matplotlib's Agg canvas (no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mtlrun.outputs import DIAGNOSTICS_CSV, METRICS_CSV, TRAIN_LOG_CSV
from mtlrun.report.affinity import plot_affinity
from mtlrun.report.delta import relative_change
from mtlrun.report.figures import colours, direction, plot_mean_curves, run_frames
from mtlrun.report.runs import SINGLE_TASK, same, training_settings
from mtlrun.report.table import Comparison, mean_std, table_settings
from mtlrun.report.tradeoff import plot_budget_curves, plot_tradeoff

AVERAGED = "averaged"
TRADEOFF_PNG = "tradeoff.png"
BUDGET_PNG = "budget_curves.png"
PER_TASK_PNG = "per_task_vs_averaged.png"
CURVES_PNG = "training_curves.png"
DIAGNOSTICS_PNG = "diagnostics.png"
AFFINITY_PNG = "affinity.png"


def write_plots(comparison: Comparison, out_dir: Path, metric: str | None = None,
                cost: str = "train_seconds") -> list[tuple[Path | None, str]]:
    """Write the figures into `out_dir`; return per figure its path (None where not written) and one line:
    where it went, or why not."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (
        (TRADEOFF_PNG, lambda path: plot_tradeoff(comparison, path, metric, cost)),
        (BUDGET_PNG, lambda path: plot_budget_curves(comparison, path, metric, cost)),
        (PER_TASK_PNG, lambda path: plot_against_averaged(comparison, path)),
        (CURVES_PNG, lambda path: plot_curves(comparison, path)),
        (DIAGNOSTICS_PNG, lambda path: plot_diagnostics(comparison, path)),
        (AFFINITY_PNG, lambda path: plot_affinity(comparison, path)),
    ):
        line = draw(out_dir / name)
        written.append((out_dir / name if line.startswith("wrote") else None, line))
    return written


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


