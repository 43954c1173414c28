"""What a run spent: its totals and its cumulative costs at each evaluation, read or estimated for older runs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtlrun.outputs import TRAIN_LOG_CSV
from mtlrun.report.runs import read_csv, run_file

# The costs a figure can put on its x axis; results.csv totals and metrics.csv rows carry them (the cost columns
# contract), except `iterations`, which metrics.csv has only where the run evaluated every N iterations.
PLOT_COSTS = ("train_seconds", "backward_passes", "forward_passes", "optimizer_steps", "images", "iterations")
AXIS_LABELS = {
    "train_seconds": "training time (s, evaluation excluded)",
    "backward_passes": "backward passes",
    "forward_passes": "forward passes",
    "optimizer_steps": "optimizer steps",
    "images": "training images",
    "iterations": "iterations",
}
# train_log.csv's per-epoch column for each cost (images: iterations x batch size).
LOG_COLUMNS = {"train_seconds": "seconds", "backward_passes": "backward_passes", "forward_passes": "forward_passes",
               "optimizer_steps": "optimizer_steps", "iterations": "iterations"}


def epoch_costs(run: pd.Series) -> pd.DataFrame | None:
    """A run's cumulative costs at the end of each epoch from its train_log.csv (runs written before the cost
    columns); images as iterations x batch size (one process). None without a train_log.csv."""
    path = run_file(run.get("run_dir"), TRAIN_LOG_CSV)
    if path is None:
        return None
    log = read_csv(path).drop_duplicates("epoch", keep="last").set_index("epoch").sort_index()
    costs = pd.DataFrame(index=log.index)
    for cost, column in LOG_COLUMNS.items():
        if column in log:
            costs[cost] = log[column].cumsum()
    if "iterations" in costs and not pd.isna(run.get("batch_size", np.nan)):
        costs["images"] = costs["iterations"] * float(run["batch_size"])
    return costs


def total_cost(run: pd.Series, cost: str) -> tuple[float, str]:
    """A run's total `cost` and, where estimated from older columns, how (else "")."""
    if cost in run and not pd.isna(run[cost]):
        return float(run[cost]), ""
    per_epoch = epoch_costs(run)
    if per_epoch is not None and cost in per_epoch and len(per_epoch):
        return float(per_epoch[cost].iloc[-1]), f"summed from train_log.csv ({LOG_COLUMNS.get(cost, 'iterations x batch_size')})"
    estimates = {
        "train_seconds": ("seconds_per_epoch", "epochs"),
        "backward_passes": ("backward_passes_per_iteration", "iterations"),
        "forward_passes": ("passes_per_iteration", "iterations"),
        "images": ("iterations", "batch_size"),
    }
    factors = estimates.get(cost)
    if factors and all(f in run and not pd.isna(run[f]) for f in factors):
        return float(run[factors[0]]) * float(run[factors[1]]), f"estimated as {factors[0]} x {factors[1]}"
    return np.nan, ""


def run_totals(runs: pd.DataFrame, cost: str) -> tuple[pd.Series, list[str]]:
    """Every run's total `cost`, and a note on the runs whose total had to be estimated."""
    found = [total_cost(run, cost) for _, run in runs.iterrows()]
    how = sorted({h for _, h in found if h})
    notes = [f"{sum(1 for _, h in found if h)} run(s) written before results.csv recorded {cost}: {'; '.join(how)}"]
    return pd.Series([v for v, _ in found], index=runs.index), notes if how else []


def cumulative_costs(run: pd.Series, metrics: pd.DataFrame, cost: str) -> tuple[pd.Series, str]:
    """The cumulative `cost` at each row of a run's metrics.csv, and how it was found where the row does not
    carry it (older runs: per epoch from train_log.csv, "" where it does)."""
    if cost in metrics and metrics[cost].notna().all():
        return metrics[cost].astype(float), ""
    if cost == "iterations" and "iteration" in metrics and metrics["iteration"].notna().all():
        return metrics["iteration"].astype(float), ""
    per_epoch = epoch_costs(run)
    if per_epoch is None or cost not in per_epoch:
        return pd.Series(np.nan, index=metrics.index), ""
    return metrics["epoch"].map(per_epoch[cost]).astype(float), "per epoch from train_log.csv"
