"""Which evaluation(s) a run's reported metrics come from: `mtlrun-compare --select`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mtlrun.errors import MtlrunError
from mtlrun.outputs import METRICS_CSV

FORMS = "last, best:<split>/<task>/<metric>, best:<split>/mean/<metric>, best:<split>/loss or mean_last:<k>"
MEAN = "mean"  # best:<split>/mean/<metric>: the metric's mean over every task that has it


@dataclass(frozen=True)
class Selection:
    """`last`; `best` on one metric (task None: the sum of the tasks' losses); `mean_last` over k epochs."""

    kind: str
    split: str = ""
    task: str | None = None
    metric: str = ""
    k: int = 1

    def __str__(self) -> str:
        if self.kind == "best":
            return f"best:{self.split}/{self.task + '/' if self.task else ''}{self.metric}"
        return f"mean_last:{self.k}" if self.kind == "mean_last" else "last"


def parse_selection(text: str) -> Selection:
    if text == "last":
        return Selection("last")
    if match := re.fullmatch(r"mean_last:(\d+)", text):
        if int(match.group(1)) < 1:
            raise MtlrunError(f"--select {text}: k must be >= 1")
        return Selection("mean_last", k=int(match.group(1)))
    if match := re.fullmatch(r"best:([^/]+)/loss", text):
        return Selection("best", match.group(1), None, "loss")
    if match := re.fullmatch(r"best:([^/]+)/([^/]+)/([^/]+)", text):
        return Selection("best", *match.groups())
    raise MtlrunError(f"--select {text!r} is not understood; valid forms: {FORMS}")


def selection_rows(metrics: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """The rows of a metrics.csv that a `best` selection reads (none: the run lacks that metric)."""
    rows = metrics[(metrics["split"] == selection.split) & (metrics["metric"] == selection.metric)]
    return rows[rows["task"] == selection.task] if selection.task not in (None, MEAN) else rows


def evaluation_column(metrics: pd.DataFrame) -> str:
    """What names an evaluation in a metrics.csv: `iteration` where the run evaluated every N iterations
    (`trainer.eval_every_iterations`, several evaluations an epoch possible), else `epoch`."""
    return "iteration" if "iteration" in metrics and metrics["iteration"].notna().any() else "epoch"


def selected_epochs(metrics: pd.DataFrame, selection: Selection) -> tuple[list[int], str | None]:
    """The evaluations whose metrics a run reports under `selection` (epochs, or iterations where the run's
    metrics.csv has an `iteration` column: `evaluation_column`), and a note where it could not be followed.

    Only evaluations count (`trainer.eval_every` may skip epochs). `best` takes the metric's best
    value by its direction (ties: the earliest), `best:<split>/mean/<metric>` its mean over the
    tasks (FAMO's CelebA rule: mean validation F1); `best:<split>/loss` the lowest sum of the tasks'
    evaluated losses; `mean_last:k` the last k evaluations (all, where fewer were made).
    """
    column = evaluation_column(metrics)
    evaluated = sorted(int(e) for e in metrics[column].dropna().unique())
    if selection.kind == "last":
        return evaluated[-1:], None
    if selection.kind == "mean_last":
        note = None
        if len(evaluated) < selection.k:
            note = f"only {len(evaluated)} evaluated {column}(s), fewer than {selection.k}"
        return evaluated[-selection.k :], note
    rows = selection_rows(metrics, selection)
    if rows.empty:
        return evaluated[-1:], f"no {selection} in its metrics.csv: the last {column} is reported"
    per_epoch = rows.groupby(column)["value"]
    per_epoch = per_epoch.mean() if selection.task == MEAN else per_epoch.sum()
    higher = str(rows["higher_is_better"].iloc[0]).strip().lower() == "true"
    best = per_epoch.max() if higher else per_epoch.min()
    return [int(per_epoch[per_epoch == best].index.min())], None


def select(
    runs: pd.DataFrame, selection: Selection, read_csv, required: bool = False
) -> tuple[pd.DataFrame, list[str]]:
    """`runs` with every `<split>/<task>/<metric>` column replaced by the selected evaluation's value (the
    mean over the selected ones), a `selected_epochs` column (and `selected_iterations` where a run
    evaluated every N iterations), and notes on runs it could not follow. With `required`, a `best` metric
    that no run's metrics.csv has is an error naming what they have (a typo)."""
    if selection.kind == "last":
        return runs, []
    runs = runs.copy()
    runs["selected_epochs"] = ""
    missing, notes = [], []
    read = {index: read_csv(Path(d) / METRICS_CSV) for index, d in runs["run_dir"].items()
            if isinstance(d, str) and (Path(d) / METRICS_CSV).is_file()}
    if required and selection.kind == "best" and read and all(selection_rows(m, selection).empty
                                                             for m in read.values()):
        raise MtlrunError(f"--select {selection}: no run has that metric; {available(list(read.values()))}")
    for index, run_dir in runs["run_dir"].items():
        if index not in read:
            missing.append(str(run_dir))
            continue
        metrics = read[index]
        chosen_ones, note = selected_epochs(metrics, selection)
        if note:
            notes.append(f"{run_dir}: {note}")
        column = evaluation_column(metrics)
        chosen = metrics[metrics[column].isin(chosen_ones)]
        values = chosen.groupby(["split", "task", "metric"])["value"].mean()
        for (split, task, metric), value in values.items():
            runs.loc[index, f"{split}/{task}/{metric}"] = value
        runs.loc[index, "selected_epochs"] = " ".join(map(str, sorted(chosen["epoch"].astype(int).unique())))
        if column == "iteration":
            if "selected_iterations" not in runs:
                runs["selected_iterations"] = ""
            runs.loc[index, "selected_iterations"] = " ".join(map(str, chosen_ones))
    if missing:
        notes.append(f"--select {selection}: {len(missing)} run(s) without metrics.csv report their last epoch: "
                     f"{', '.join(missing)}")
    return runs, notes


def available(frames: list[pd.DataFrame]) -> str:
    """What the runs' metrics.csv files hold, for `best:<split>/<task>/<metric>`."""
    rows = pd.concat(frames, ignore_index=True)
    return (f"their metrics.csv files have splits {', '.join(map(str, rows['split'].unique()))}; tasks "
            f"{', '.join(map(str, rows['task'].unique()))} (or {MEAN}: the mean over tasks); metrics "
            f"{', '.join(map(str, rows['metric'].unique()))} (e.g. --select best:{rows['split'].iloc[0]}/"
            f"{rows['task'].iloc[0]}/{rows['metric'].iloc[0]}, or best:<split>/loss)")
