"""The comparison table: one row per configuration (runs differing only by seed), means and stds of every number."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mtlrun.report.runs import (
    COST_COLUMNS, DELTA_M, SINGLE_TASK, TOTAL_COLUMNS, metric_columns, plain, same, setting_columns,
)

# The columns of a comparison table that are not settings: parts of a number's statistics, and per-row facts.
NUMBER_PARTS = (" mean", " std", " ci_low", " ci_high", " diff", " diff_low", " diff_high", " p", " p_holm", " verdict")
PER_CONFIGURATION = ("config_id", "n_seeds", "seeds", "test", "wins", "ties", "losses", "reference", "lr kept")


def mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of the values present; NaN, NaN when none is."""
    present = values.dropna()
    if present.empty:
        return np.nan, np.nan
    return float(present.mean()), (float(present.std(ddof=1)) if len(present) > 1 else 0.0)


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: its settings, config_id, the seeds, and mean and std of every number."""
    numbers = metric_columns(runs) + [c for c in (DELTA_M, *COST_COLUMNS, *TOTAL_COLUMNS) if c in runs.columns]
    settings = setting_columns(runs)
    rows = []
    for config_id, group in runs.groupby("config_id", sort=False):
        row = {c: group[c].iloc[0] for c in settings}
        row["config_id"] = config_id
        row["n_seeds"] = len(group)
        row["seeds"] = " ".join(str(s) for s in sorted(group["seed"])) if "seed" in group else ""
        for c in numbers:
            row[f"{c} mean"], row[f"{c} std"] = mean_std(group[c])
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class Comparison:
    """The runs, their configurations, and what a report needs to read them."""

    runs: pd.DataFrame  # one row per run, with its Δm% (delta_m)
    table: pd.DataFrame  # one row per configuration: settings, config_id, n_seeds, every number's mean and std
    directions: dict[str, bool]  # task/metric -> higher is better
    split: str
    notes: list[str] = field(default_factory=list)  # what the report must say about these runs
    single_task: pd.DataFrame = field(default_factory=pd.DataFrame)  # the Δm% baselines' configurations
    restated: frozenset[str] = frozenset()  # task/metric names left out of Δm% (in_delta_m false)

    def higher_is_better(self, column: str) -> bool | None:
        """A metric's (split/task/metric) direction, None if unknown; Δm% higher; None for other columns."""
        if column == DELTA_M:
            return True
        return self.directions.get(column.split("/", 1)[1]) if column.count("/") == 2 else None

    def split_metrics(self) -> list[str]:
        return [c for c in metric_columns(self.runs) if c.startswith(f"{self.split}/")]

    def labels(self) -> list[str]:
        """A short name per configuration from its grouping keys: 'grouped k=2', 'single_task task=depth'."""
        keys = [k for k in grouping_keys(self.table) if k != "num_tasks"]
        names = []
        for _, row in self.table.iterrows():
            parts = []
            for key in keys:
                if pd.isna(row[key]) or (key == "group_size" and row.get("strategy") == SINGLE_TASK):
                    continue
                name = {"strategy": "", "group_size": "k="}.get(key, f"{key.removeprefix('strategy.')}=")
                parts.append(f"{name}{plain(row[key])}")
            names.append(" ".join(parts) or str(row["config_id"]))
        repeated = {n for n in names if names.count(n) > 1}  # told apart only by settings not in the labels
        return [f"{n} ({c})" if n in repeated else n for n, c in zip(names, self.table["config_id"])]


def table_settings(table: pd.DataFrame) -> list[str]:
    """The settings columns of a comparison table."""
    return [c for c in table.columns if not c.endswith(NUMBER_PARTS) and c not in PER_CONFIGURATION]


def grouping_keys(table: pd.DataFrame) -> list[str]:
    """The settings that tell configurations apart; a strategy's own setting (strategy.<key>) only where it
    varies among the configurations that have it and does not repeat <key> (as strategy.group_size does)."""
    keys = []
    for column in table_settings(table):
        own = column.startswith("strategy.")
        values = table[column].dropna() if own else table[column]
        repeated = column.removeprefix("strategy.")
        if values.map(str).nunique() <= 1 or (
            own and repeated in table and all(same(v, table.at[i, repeated]) for i, v in values.items())
        ):
            continue
        keys.append(column)
    return keys or ["strategy"]
