"""Building a comparison: load the runs and baselines, select their epochs, compute Δm%, group by configuration."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mtlrun.errors import MtlrunError
from mtlrun.run.rundir import CHECKPOINT, METRICS_CSV, RESULTS_CSV
from mtlrun.report.delta import delta_m
from mtlrun.report.runs import (
    DELTA_M, SINGLE_TASK, average_tasks, drop_repeated_seeds, failed_runs, find_results, load_runs,
    metric_columns, metric_definitions, metric_directions, read_csv, run_file,
)
from mtlrun.report.selection import Selection, select
from mtlrun.report.table import Comparison, compare


def build(
    paths: list[Path], baseline_paths: list[Path] | None, split: str, mean_over_tasks: bool = False,
    selection: Selection = Selection("last"),
) -> Comparison:
    """Load the runs (and the --baseline single-task runs), report each at its `selection`'s epoch(s),
    compute Δm% and group them into configurations; with `mean_over_tasks`, metrics shared by several
    tasks are shown as their mean over the tasks."""
    notes = []
    files, unfinished = find_results(paths)
    if unfinished:
        listed = ", ".join(map(str, unfinished))
        notes.append(f"skipping {len(unfinished)} unfinished run(s) without {RESULTS_CSV}: {listed}")
    if not files:
        raise MtlrunError(f"no {RESULTS_CSV} under {', '.join(map(str, paths))}: finished runs write one")
    # Every run, single-task baselines included, reports its selected epoch(s) before Δm% reads it.
    runs, repeated = drop_repeated_seeds(load_runs(files))
    runs, selected = select(runs, selection, read_csv, required=True)
    notes += repeated + selected
    if baseline_paths:
        baseline_files = find_results(baseline_paths)[0]
        given = pd.DataFrame({"strategy": []})
        if baseline_files:
            given, repeated = drop_repeated_seeds(load_runs(baseline_files))
            given, selected = select(given, selection, read_csv)
            notes += repeated + selected
        baselines = given[given["strategy"] == SINGLE_TASK]
        if baselines.empty:
            raise MtlrunError(
                f"--baseline {' '.join(map(str, baseline_paths))} holds no single-task runs (strategy == "
                f"{SINGLE_TASK}): give the runs of mtlrun -m strategy=single_task strategy.task=... instead"
            )
        new = ~(baselines["run_dir"].notna() & baselines["run_dir"].isin(runs["run_dir"]))
        runs = pd.concat([runs, baselines[new]], ignore_index=True)
        where = "under --baseline"
    else:
        baselines = runs[runs["strategy"] == SINGLE_TASK]
        where = "among the inputs"
    if not any(c.startswith(f"{split}/") for c in metric_columns(runs)):
        raise MtlrunError(f"the runs have no '{split}' metrics; use --split test or --split val")
    failed = failed_runs(paths)
    if failed:
        notes.append(f"skipping {len(failed)} run director(ies) without {RESULTS_CSV} or {CHECKPOINT} (a job that "
                     f"failed before finishing an epoch, see its mtlrun.log, or one still in its first epoch): "
                     f"{', '.join(map(str, failed))}")
    definitions = metric_definitions(runs)
    notes += without_metrics_csv(runs, definitions)
    delta, said = delta_m(runs, baselines, definitions, split, where)
    runs = runs.copy()  # consolidated: one more column on CelebA's ~200 inserted one by one would fragment it
    runs[DELTA_M] = delta
    restated = frozenset(definitions["name"][~definitions["in_delta_m"].astype(bool)])
    single_task = compare(baselines) if len(baselines) else pd.DataFrame()
    if mean_over_tasks:
        runs, definitions = average_tasks(runs, definitions)
    return Comparison(runs, compare(runs), metric_directions(definitions), split, notes + said, single_task, restated)


def without_metrics_csv(runs: pd.DataFrame, definitions: pd.DataFrame) -> list[str]:
    """The note naming runs with no metrics.csv beside their results, and the directions that leaves unknown."""
    lacking = [d if isinstance(d, str) else "(a row without run_dir)" for d in runs["run_dir"]
               if run_file(d, METRICS_CSV) is None]
    if not lacking:
        return []
    unknown = [c.split("/", 1)[1] for c in metric_columns(runs) if c.split("/", 1)[1] not in set(definitions["name"])]
    effect = (f"; no {METRICS_CSV} gives the direction of {', '.join(dict.fromkeys(unknown))}: shown without "
              f"↑/↓ and no best marked" if unknown else "")
    return [f"{len(lacking)} run(s) have no {METRICS_CSV} beside their results: {', '.join(lacking)}{effect}"]


