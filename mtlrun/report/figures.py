"""What every figure of `mtlrun-compare --plot` shares: colours per configuration, directions, the runs' CSVs."""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes

from mtlrun.report.runs import read_csv, run_file
from mtlrun.report.table import Comparison


def direction(higher_is_better: bool | None) -> str:
    return {True: "higher is better", False: "lower is better", None: "direction unknown"}[higher_is_better]


def colours(comparison: Comparison) -> dict[str, str]:
    """One colour per configuration label, the same in every figure and subplot."""
    return {label: f"C{i % 10}" for i, label in enumerate(comparison.labels())}


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


