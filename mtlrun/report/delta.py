"""Δm%: each multi-task run's mean signed relative change against single-task runs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtlrun.run.rundir import METRICS_CSV
from mtlrun.report.runs import SINGLE_TASK, metric_columns, metric_directions, same, training_settings
from mtlrun.report.selection import evaluation_column
from mtlrun.report.table import Comparison, compare, table_settings


def relative_change(value: pd.Series, reference: float, higher_is_better: bool) -> pd.Series:
    """Signed relative change in %, positive = better: (-1)^l (value - reference) / reference * 100."""
    return (1 if higher_is_better else -1) * (value - reference) / reference * 100



def closest(config: pd.Series, candidates: pd.DataFrame) -> pd.Series:
    """The candidate configuration sharing most training settings with `config` (the first on a tie)."""
    settings = training_settings(table_settings(candidates))
    matches = [sum(same(config.get(s), row[s]) for s in settings) for _, row in candidates.iterrows()]
    return candidates.iloc[int(np.argmax(matches))]


def baseline_value(config: pd.Series, stl: pd.DataFrame, column: str) -> tuple[float, object]:
    """The single-task baseline of `column` for `config` and the model it was trained with: the mean over
    seeds of a single-task configuration of the same dataset that has this metric (the one sharing most
    training settings), of the same model where there is one, else of another (the published single-task
    reference of an MTAN is the plain SegNet, `segnet_split`); (NaN, None) if there is none."""
    if f"{column} mean" not in stl.columns:
        return np.nan, None
    rows = stl[stl[f"{column} mean"].notna()]
    rows = rows[[same(config.get("dataset"), r.get("dataset")) for _, r in rows.iterrows()]]
    own = rows[[same(config.get("model"), r.get("model")) for _, r in rows.iterrows()]]
    rows = own if len(own) else rows
    if not len(rows):
        return np.nan, None
    row = closest(config, rows)
    return row[f"{column} mean"], row.get("model")


def delta_m(runs: pd.DataFrame, baselines: pd.DataFrame, definitions: pd.DataFrame, split: str,
            where: str) -> tuple[pd.Series, list[str]]:
    """Δm% of every multi-task run (Maninis et al. 2019; Liu et al. 2022): the mean over the run's task
    metrics of (-1)^l_k (M_k - B_k) / B_k * 100, l_k = 1 where lower is better, B_k from `baseline_value`;
    positive = better than single-task. Metrics that restate another (in_delta_m false) are left out.
    Returns the values (NaN for single-task runs and where it cannot be computed) and the lines the report
    must show: which model's single-task runs served where another model had none, and, if Δm% cannot be
    computed somewhere, why (`where` names the baselines)."""
    directions = metric_directions(definitions)
    restated = set(definitions["name"][~definitions["in_delta_m"].astype(bool)])
    values = pd.Series(np.nan, index=runs.index)
    stl = compare(baselines) if len(baselines) else pd.DataFrame()
    missing: dict[tuple, list[str]] = {}  # (dataset, model) -> tasks without a single-task run
    unknown: list[str] = []  # metrics whose direction no metrics.csv gives
    zero: list[str] = []  # metrics whose baseline is 0
    borrowed: dict[tuple, list[str]] = {}  # (model, model of its single-task runs) -> tasks
    multi = runs[runs["strategy"] != SINGLE_TASK].groupby("config_id", sort=False)
    failed = 0
    for _, group in multi:
        config = group.iloc[0]
        changes, ok = [], True
        for column in [c for c in metric_columns(runs) if c.startswith(f"{split}/") and group[c].notna().any()]:
            task, name = column.split("/")[1], column.split("/", 1)[1]
            if name in restated:
                continue
            reference, model = baseline_value(config, stl, column)
            if not np.isnan(reference) and not same(model, config.get("model")):
                borrowed.setdefault((config.get("model"), model), []).append(task)
            if np.isnan(reference):
                missing.setdefault((config.get("dataset"), config.get("model")), []).append(task)
            elif name not in directions:
                unknown.append(name)
            elif reference == 0:
                zero.append(column)
            else:
                changes.append(relative_change(group[column], reference, directions[name]))
                continue
            ok = False
        if ok and changes:
            values[group.index] = pd.concat(changes, axis=1).mean(axis=1)
        else:
            failed += 1
    notes = [
        f"Δm% of model {model} uses the single-task runs of model {other} for {', '.join(dict.fromkeys(tasks))} "
        f"(none of {model} itself)"
        for (model, other), tasks in borrowed.items()
    ]
    if not failed:
        return values, notes
    reasons = _reasons(missing, unknown, zero, where)
    configurations = f"{failed} of {multi.ngroups} multi-task configuration(s)"
    return values, [*notes, f"Δm% cannot be computed for {configurations}: " + "; ".join(reasons)]


def _reasons(missing: dict[tuple, list[str]], unknown: list[str], zero: list[str], where: str) -> list[str]:
    """Why Δm% cannot be computed: single-task runs missing, metric directions unknown, baselines of 0."""
    reasons = []
    for (dataset, model), tasks in missing.items():
        tasks = list(dict.fromkeys(tasks))
        reasons.append(
            f"no single-task run of {', '.join(tasks)} for dataset {dataset}, model {model} {where} (add the runs "
            f"of mtlrun -m strategy=single_task strategy.task={','.join(tasks)} to the inputs or to --baseline)"
        )
    if unknown:
        reasons.append(f"no {METRICS_CSV} beside the results gives the direction of {', '.join(dict.fromkeys(unknown))}")
    if zero:
        reasons.append(f"the single-task value of {', '.join(dict.fromkeys(zero))} is 0: no relative change exists")
    return reasons


def evaluation_delta_m(comparison: Comparison, run: pd.Series, metrics: pd.DataFrame, split: str) -> pd.Series:
    """Δm% of one multi-task run at each of its evaluations of `split` (from its metrics.csv, against the same
    single-task baselines as its final Δm%), indexed by the metrics.csv row of each evaluation's first metric;
    empty where a baseline, a direction or a metric is missing."""
    if comparison.single_task.empty or run.get("strategy") == SINGLE_TASK:
        return pd.Series(dtype=float)
    rows = metrics[metrics["split"] == split]
    names = rows["task"].astype(str) + "/" + rows["metric"].astype(str)
    rows = rows[~names.isin(comparison.restated)]
    key = evaluation_column(rows)
    changes = []
    for (task, metric), found in rows.groupby(["task", "metric"], sort=False):
        direction = comparison.directions.get(f"{task}/{metric}")
        reference, _ = baseline_value(run, comparison.single_task, f"{split}/{task}/{metric}")
        if direction is None or np.isnan(reference) or reference == 0:
            return pd.Series(dtype=float)
        change = relative_change(found["value"].astype(float), reference, direction)
        changes.append(pd.Series(change.to_numpy(), index=found[key].to_numpy()))
    if not changes:
        return pd.Series(dtype=float)
    first_rows = rows.groupby(key, sort=False).apply(lambda r: r.index[0], include_groups=False)
    per_evaluation = pd.concat(changes, axis=1).mean(axis=1, skipna=False).dropna()
    return pd.Series(per_evaluation.to_numpy(), index=first_rows[per_evaluation.index].to_numpy())
