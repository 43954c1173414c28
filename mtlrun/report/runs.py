"""Reading finished runs for `mtlrun-compare`: their results rows, metric definitions and settings."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pathlib import Path

from mtlrun.errors import MtlrunError
from mtlrun.outputs import CHECKPOINT, METRICS_CSV, RESULTS_CSV, TRAIN_LOG_CSV

SINGLE_TASK = "single_task"
DELTA_M = "delta_m"  # Δm% in the comparison CSV; shown and sorted as "Δm%"
COST_COLUMNS = (
    "steps_per_iteration", "passes_per_iteration", "backward_passes_per_iteration", "seconds_per_epoch",
    "peak_memory_mb",
)
# A run's totals at its end (results.csv, the cost columns contract; runs written before it lack them).
TOTAL_COLUMNS = ("backward_passes", "forward_passes", "images", "train_seconds")
# Columns that describe one run but not its configuration.
PER_RUN_COLUMNS = ("seed", "run_dir", "config_id", "device", "iterations", "optimizer_steps", "selected_epochs",
                   "selected_iterations")
# Settings that say which strategy ran; every other setting (dataset, model, optimizer, lr, ...) says how.
STRATEGY_SETTINGS = ("strategy", "group_size", "num_tasks")


def find_results(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """The results.csv files under `paths` (run dirs, sweep dirs, or the files), and unfinished run dirs."""
    found: list[Path] = []
    unfinished: list[Path] = []
    for path in paths:
        if not path.exists():
            raise MtlrunError(
                f"{path} does not exist: give run directories, sweep directories or results.csv files"
            )
        if path.is_file():
            found.append(path)
            continue
        found += sorted(path.rglob(RESULTS_CSV))
        unfinished += sorted(c.parent for c in path.rglob(CHECKPOINT) if not (c.parent / RESULTS_CSV).is_file())
    return list(dict.fromkeys(found)), unfinished


def failed_runs(paths: list[Path]) -> list[Path]:
    """Run directories under `paths` with neither results nor a checkpoint: jobs that failed before finishing
    their first epoch, or are still in it (mtlrun removes the directories of jobs that failed before starting)."""
    failed = []
    for path in paths:
        if path.is_dir():
            made = {p.parent for p in path.rglob(".hydra") if p.is_dir()} | set(
                p.parent for p in path.rglob("mtlrun.log"))
            failed += [d for d in made if not (d / RESULTS_CSV).exists() and not (d / CHECKPOINT).exists()]
    return sorted(set(failed))


def read_results(path: Path) -> pd.DataFrame:
    """A results CSV, refused in one line when empty or cut short (a copy or a disk that stopped mid-write)."""
    frame = read_csv(path)
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 1))
        ends_a_line = f.read(1) in (b"\n", b"\r")
    if frame.empty or not ends_a_line:
        raise MtlrunError(
            f"{path} is {'empty' if frame.empty else 'cut short (no line break at its end)'}: remove it or re-run "
            f"that run"
        )
    return frame


def read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise MtlrunError(
            f"{path} is not a readable CSV ({type(e).__name__}); remove it or re-run that run"
        ) from None


def run_file(run_dir: object, name: str) -> Path | None:
    """A file of a run's directory, or None when the run has no known directory or the file is missing."""
    path = Path(run_dir) / name if isinstance(run_dir, str) else None
    return path if path is not None and path.is_file() else None


def load_runs(files: list[Path]) -> pd.DataFrame:
    """One row per run: its results row, `run_dir` set to where its files are now (a results.csv of one run
    sits in its run directory, wherever that was moved), a `config_id` for every run, and backward passes
    per iteration from its train_log.csv."""
    frames = []
    for file in files:
        frame = read_results(file)
        if "strategy" not in frame.columns:
            raise MtlrunError(f"{file} is not an mtlrun results CSV (no 'strategy' column)")
        if len(frame) == 1 and file.name == RESULTS_CSV:
            frame["run_dir"] = str(file.parent)
        frames.append(frame)
    runs = pd.concat(frames, ignore_index=True)
    for column in ("config_id", "run_dir"):
        if column not in runs.columns:
            runs[column] = np.nan
    # Results written without a config_id are grouped by their settings.
    by_settings = ["|".join(map(str, row)) for row in runs[setting_columns(runs)].itertuples(index=False)]
    runs["config_id"] = runs["config_id"].astype(object).where(runs["config_id"].notna(), by_settings)
    if "backward_passes_per_iteration" not in runs.columns:
        runs["backward_passes_per_iteration"] = [backward_passes_per_iteration(d) for d in runs["run_dir"]]
    return runs


def drop_repeated_seeds(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Runs of one configuration with the same seed repeat one experiment: the first (in the order found) is
    kept, so a mean ± std counts each seed once; the note names the others."""
    if "seed" not in runs.columns:
        return runs, []
    repeated = runs["seed"].notna() & runs.duplicated(subset=["config_id", "seed"], keep="first")
    if not repeated.any():
        return runs, []
    kept = runs[~repeated]
    said = []
    for index, row in runs[repeated].iterrows():
        first = kept[(kept["config_id"] == row["config_id"]) & (kept["seed"] == row["seed"])].iloc[0]
        said.append(f"{plain(row['run_dir'])} (= {plain(first['run_dir'])})")
    return kept.reset_index(drop=True), [
        f"counting each seed once: {int(repeated.sum())} run(s) repeat the configuration and seed of another "
        f"and are left out: {', '.join(said)}"
    ]


def backward_passes_per_iteration(run_dir: object) -> float:
    path = run_file(run_dir, TRAIN_LOG_CSV)
    if path is None:
        return np.nan
    log = read_csv(path)
    if not {"backward_passes", "iterations"} <= set(log.columns) or log["iterations"].sum() == 0:
        return np.nan
    return float(log["backward_passes"].sum() / log["iterations"].sum())


def metric_definitions(runs: pd.DataFrame) -> pd.DataFrame:
    """task, metric, higher_is_better, in_delta_m of every metric, as the runs' metrics.csv took them from the
    task's metric definition (in_delta_m true where an older metrics.csv does not say)."""
    frames = []
    for run_dir in runs["run_dir"]:
        path = run_file(run_dir, METRICS_CSV)
        if path is None:
            continue
        rows = read_csv(path)
        if not {"task", "metric", "higher_is_better"} <= set(rows.columns):
            raise MtlrunError(f"{path} has no task, metric and higher_is_better columns; re-run that run")
        if "in_delta_m" not in rows:
            rows["in_delta_m"] = True
        frames.append(rows[["task", "metric", "higher_is_better", "in_delta_m"]].drop_duplicates())
    columns = ["name", "higher_is_better", "in_delta_m"]
    if not frames:
        return pd.DataFrame(columns=columns)
    found = pd.concat(frames, ignore_index=True)
    found["name"] = found["task"].astype(str) + "/" + found["metric"].astype(str)
    for flag in ("higher_is_better", "in_delta_m"):
        found[flag] = found[flag].map(lambda v: str(v).strip().lower() == "true")
    found = found[columns].drop_duplicates()
    disagree = found["name"][found["name"].duplicated()]
    if len(disagree):
        raise MtlrunError(
            f"the runs' {METRICS_CSV} files disagree on whether higher is better for {disagree.iloc[0]}"
        )
    return found


def metric_directions(definitions: pd.DataFrame) -> dict[str, bool]:
    """`task/metric` -> whether higher is better."""
    return dict(zip(definitions["name"], definitions["higher_is_better"]))


def average_tasks(runs: pd.DataFrame, definitions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replace, in every split, the metrics that several tasks share (CelebA's 40 attributes) by their mean
    over those tasks, as `<split>/mean/<metric>`; the definitions gain `mean/<metric>` (directions agree)."""
    by_metric: dict[str, list[str]] = {}
    for name in definitions["name"]:
        by_metric.setdefault(name.split("/")[1], []).append(name)
    runs, added = runs.copy(), []
    for metric, names in by_metric.items():
        rows = definitions[definitions["name"].isin(names)]
        if len(names) < 2 or rows["higher_is_better"].nunique() > 1:
            continue
        for split in {c.split("/")[0] for c in metric_columns(runs)}:
            columns = [f"{split}/{n}" for n in names if f"{split}/{n}" in runs]
            if columns:
                runs[f"{split}/mean/{metric}"] = runs[columns].mean(axis=1)
                runs = runs.drop(columns=columns)
        added.append({"name": f"mean/{metric}", "higher_is_better": rows["higher_is_better"].iloc[0],
                      "in_delta_m": bool(rows["in_delta_m"].iloc[0])})
    return runs, pd.concat([definitions, pd.DataFrame(added)], ignore_index=True)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Final metrics are named split/task/metric."""
    return [c for c in df.columns if c.count("/") == 2]


def setting_columns(runs: pd.DataFrame) -> list[str]:
    numbers = set(metric_columns(runs)) | {DELTA_M, *COST_COLUMNS, *TOTAL_COLUMNS, *PER_RUN_COLUMNS}
    return [c for c in runs.columns if c not in numbers]


def training_settings(columns: list[str]) -> list[str]:
    """The settings saying how a strategy was trained: all but the strategy's own."""
    return [c for c in columns if c not in STRATEGY_SETTINGS and not c.startswith("strategy.")]


def same(a: object, b: object) -> bool:
    """Equal settings, a missing one equal to a missing one."""
    return bool(pd.isna(a) and pd.isna(b)) or bool(a == b)


def plain(value: object) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


