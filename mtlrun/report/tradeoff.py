"""tradeoff.png and budget_curves.png: what each configuration buys with what it spends, intervals over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mtlrun.outputs import METRICS_CSV
from mtlrun.report.delta import evaluation_delta_m
from mtlrun.report.costs import AXIS_LABELS, cumulative_costs, run_totals
from mtlrun.report.figures import colours, direction
from mtlrun.report.runs import DELTA_M, SINGLE_TASK, plain, read_csv, run_file
from mtlrun.report.stats import LEVEL, mean_interval, t_half_width
from mtlrun.report.table import Comparison

GRID = 50  # points of the common cost grid each seed's curve is interpolated onto
DELTA_M_PANEL = "Δm%"  # budget_curves.png's panel of Δm% at every evaluation, against the final baselines


def error(values: pd.Series) -> tuple[float, list[float]]:
    """The mean and its 95% interval as matplotlib's asymmetric error (0 where fewer than 2 seeds)."""
    present = values.dropna().to_numpy(float)
    mean = float(present.mean())
    low, high = mean_interval(present)
    return mean, [0.0, 0.0] if np.isnan(low) else [mean - low, high - mean]


def plot_tradeoff(comparison: Comparison, path: Path, metric: str | None, cost: str) -> str:
    """Δm% (or `metric`) against the runs' total `cost`, one point per configuration with 95% intervals over
    seeds on both axes, labelled by group size: what grouping tasks gains against what it costs."""
    column, runs = metric or DELTA_M, comparison.runs
    totals, said = run_totals(runs, cost)
    points = []
    for i, row in comparison.table.iterrows():
        rows = runs.index[runs["config_id"] == row["config_id"]]
        if totals[rows].notna().any() and runs.loc[rows, column].notna().any():
            points.append((i, row, error(totals[rows]), error(runs.loc[rows, column])))
    if not points:
        what = "Δm% (see above); choose a metric with --plot-metric" if metric is None else metric
        return f"{path.name} not written: no configuration has both {what} and a {cost} total"
    labels = comparison.labels()
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    colour = {s: f"C{k % 10}" for k, s in enumerate(dict.fromkeys(str(r["strategy"]) for _, r, _, _ in points))}
    for i, row, (x, xerr), (y, yerr) in points:
        strategy = str(row["strategy"])
        ax.errorbar([x], [y], xerr=[[xerr[0]], [xerr[1]]], yerr=[[yerr[0]], [yerr[1]]], fmt="o", capsize=3,
                    color=colour[strategy], label=strategy)
        text = labels[i].removeprefix(strategy).strip()
        if "k=" not in text and strategy != SINGLE_TASK and not pd.isna(row.get("group_size", np.nan)):
            text = f"k={plain(row['group_size'])} {text}".strip()
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if metric is None:
        ax.axhline(0, color="grey", linewidth=0.8, linestyle="--", label="single-task level")
        ax.set_ylabel("Δm% against single-task (%, higher is better)")
    else:
        ax.set_ylabel(f"{metric} ({direction(comparison.higher_is_better(metric))})")
    ax.set_xlabel(f"{AXIS_LABELS[cost]} per run (lower is cheaper)")
    what = "Δm%" if metric is None else metric
    ax.set_title(f"{what} against {AXIS_LABELS[cost]}\n({comparison.split} split; mean and {LEVEL:.0%} interval "
                 f"over seeds, Student t; k = group size)")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(list(unique.values()), list(unique.keys()), title="strategy")
    fig.savefig(path, dpi=120)
    return "; ".join([f"wrote {path}", *said])


def seed_curves(comparison: Comparison, config_id: str, panel: str, cost: str) -> tuple[list[pd.Series], set[str]]:
    """Each run's `panel` metric (split/task/metric) against its cumulative `cost`, from its metrics.csv, and
    how costs were found where rows do not carry them."""
    curves, how = [], set()
    for _, run in comparison.runs[comparison.runs["config_id"] == config_id].iterrows():
        path = run_file(run["run_dir"], METRICS_CSV)
        if path is None:
            continue
        metrics = read_csv(path)
        values = panel_values(comparison, run, metrics, panel)
        x, found = cumulative_costs(run, metrics, cost)
        curve = pd.Series(values.to_numpy(float), index=x[values.index].to_numpy()).dropna()
        curve = curve[curve.index.notna()].groupby(level=0).last().sort_index()
        if len(curve):
            curves.append(curve)
            how |= {found} - {""}
    return curves, how


def band(curves: list[pd.Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' curves (value indexed by cost) interpolated linearly onto GRID points over the cost range all of
    them reach: the grid, the mean over seeds and the half width of its 95% interval (Student t)."""
    low, high = max(c.index.min() for c in curves), min(c.index.max() for c in curves)
    grid = np.linspace(low, high, GRID) if high > low else np.array([low])
    values = np.array([np.interp(grid, c.index.to_numpy(float), c.to_numpy(float)) for c in curves])
    std = values.std(axis=0, ddof=1)
    return grid, values.mean(axis=0), np.array([t_half_width(s, len(curves), len(curves) - 1) for s in std])


def panel_values(comparison: Comparison, run: pd.Series, metrics: pd.DataFrame, panel: str) -> pd.Series:
    """A panel's value at each evaluation of a run, indexed by its metrics.csv row: `<split>/Δm%` or a metric."""
    split, rest = panel.split("/", 1)
    if rest == DELTA_M_PANEL:
        return evaluation_delta_m(comparison, run, metrics, split)
    task, metric = rest.split("/")
    rows = metrics[(metrics["split"] == split) & (metrics["task"] == task) & (metrics["metric"] == metric)]
    return rows["value"].astype(float)


def draw_band(ax: Axes, curves: list[pd.Series], label: str, colour: str) -> None:
    """One seed: its curve. Several: their mean on a common cost grid with its 95% band (`band`)."""
    if len(curves) == 1:
        ax.plot(curves[0].index, curves[0].values, marker="o", markersize=3, label=label, color=colour)
        return
    grid, mean, half = band(curves)
    ax.plot(grid, mean, label=label, color=colour)
    ax.fill_between(grid, mean - half, mean + half, color=colour, alpha=0.2, linewidth=0)


def budget_panels(comparison: Comparison, metric: str | None) -> list[str]:
    """`metric`, else Δm% (where the runs have it) and per task the first validation metric (the shown split's
    where no run has val)."""
    if metric is not None:
        return [metric]
    columns = [c for c in comparison.runs.columns if c.count("/") == 2]
    split = "val" if any(c.startswith("val/") for c in columns) else comparison.split
    has_delta_m = DELTA_M in comparison.runs and comparison.runs[DELTA_M].notna().any()
    first: dict[str, str] = {"": f"{split}/{DELTA_M_PANEL}"} if has_delta_m else {}
    for c in columns:
        if c.startswith(f"{split}/") and not c.endswith("/loss"):
            first.setdefault(c.split("/")[1], c)
    return list(first.values())


def plot_budget_curves(comparison: Comparison, path: Path, metric: str | None, cost: str) -> str:
    """Per panel (a validation metric of each task, or `metric`), every configuration's value against its
    cumulative `cost`, one line per configuration with a 95% band over seeds: who is ahead at any budget."""
    panels, colour, labels = budget_panels(comparison, metric), colours(comparison), comparison.labels()
    drawn, how = [], set()
    for panel in panels:
        lines = []
        for label, config_id in zip(labels, comparison.table["config_id"]):
            curves, found = seed_curves(comparison, config_id, panel, cost)
            how |= found
            if curves:
                lines.append((label, curves))
        if lines:
            drawn.append((panel, lines))
    if not drawn:
        return f"{path.name} not written: no run's {METRICS_CSV} has {', '.join(panels) or 'a metric'} with a {cost}"
    fig = Figure(figsize=(5.2 * len(drawn) + 2.5, 4.6), layout="constrained")
    axes = fig.subplots(1, len(drawn), squeeze=False)[0]
    for ax, (panel, lines) in zip(axes, drawn):
        for label, curves in lines:
            draw_band(ax, curves, label, colour[label])
        ax.set_title(panel)
        ax.set_xlabel(f"cumulative {AXIS_LABELS[cost]}")
        delta = panel.endswith(DELTA_M_PANEL)
        ax.set_ylabel(f"{panel.split('/', 1)[1]} ({direction(True if delta else comparison.higher_is_better(panel))})")
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper")
    fig.suptitle(f"Value against cumulative {AXIS_LABELS[cost]}\n(mean over seeds, each seed interpolated onto "
                 f"a common cost grid; band: {LEVEL:.0%} interval, Student t)")
    fig.savefig(path, dpi=120)
    found = f"; {cost} {' and '.join(sorted(how))} (runs written before metrics.csv recorded it)" if how else ""
    return f"wrote {path}{found}"
