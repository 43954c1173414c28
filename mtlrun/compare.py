"""`mtlrun-compare`: gather runs, group those that differ only by seed, report mean ± std, Δm% and costs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mtlrun.errors import MtlrunError
from mtlrun.outputs import CHECKPOINT, METRICS_CSV, RESULTS_CSV, TRAIN_LOG_CSV
from mtlrun.selection import Selection, parse_selection, select

SINGLE_TASK = "single_task"
DELTA_M = "delta_m"  # Δm% in the comparison CSV; shown and sorted as "Δm%"
COST_COLUMNS = (
    "steps_per_iteration", "passes_per_iteration", "backward_passes_per_iteration", "seconds_per_epoch",
    "peak_memory_mb", "backward_passes", "forward_passes", "images", "train_seconds",  # totals (budgets.Spending)
)
# Columns that describe one run but not its configuration.
PER_RUN_COLUMNS = ("seed", "run_dir", "config_id", "device", "iterations", "optimizer_steps", "selected_epochs",
                   "selected_iterations")
# Settings that say which strategy ran; every other setting (dataset, model, optimizer, lr, ...) says how.
STRATEGY_SETTINGS = ("strategy", "group_size", "num_tasks")
FORMATS = ("table", "csv", "markdown", "latex")


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
    numbers = set(metric_columns(runs)) | {DELTA_M, *COST_COLUMNS, *PER_RUN_COLUMNS}
    return [c for c in runs.columns if c not in numbers]


def training_settings(columns: list[str]) -> list[str]:
    """The settings saying how a strategy was trained: all but the strategy's own."""
    return [c for c in columns if c not in STRATEGY_SETTINGS and not c.startswith("strategy.")]


def same(a: object, b: object) -> bool:
    """Equal settings, a missing one equal to a missing one."""
    return bool(pd.isna(a) and pd.isna(b)) or bool(a == b)


def relative_change(value: pd.Series, reference: float, higher_is_better: bool) -> pd.Series:
    """Signed relative change in %, positive = better: (-1)^l (value - reference) / reference * 100."""
    return (1 if higher_is_better else -1) * (value - reference) / reference * 100


def mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of the values present; NaN, NaN when none is."""
    present = values.dropna()
    if present.empty:
        return np.nan, np.nan
    return float(present.mean()), (float(present.std(ddof=1)) if len(present) > 1 else 0.0)


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: its settings, config_id, the seeds, and mean and std of every number."""
    numbers = metric_columns(runs) + [c for c in (DELTA_M, *COST_COLUMNS) if c in runs.columns]
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
    configurations = f"{failed} of {multi.ngroups} multi-task configuration(s)"
    return values, [*notes, f"Δm% cannot be computed for {configurations}: " + "; ".join(reasons)]


@dataclass
class Comparison:
    """The runs, their configurations, and what a report needs to read them."""

    runs: pd.DataFrame  # one row per run, with its Δm% (delta_m)
    table: pd.DataFrame  # one row per configuration: settings, config_id, n_seeds, every number's mean and std
    directions: dict[str, bool]  # task/metric -> higher is better
    split: str
    notes: list[str] = field(default_factory=list)  # what the report must say about these runs

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
    per_configuration = ("config_id", "n_seeds", "seeds")
    return [c for c in table.columns if not c.endswith((" mean", " std")) and c not in per_configuration]


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


@dataclass
class Column:
    """A column of the shown table: `name` as shown and sorted by, `source` its column in the comparison CSV
    (for numbers, without ' mean'/' std'), and for metrics and Δm% whether higher is better."""

    name: str
    source: str
    numeric: bool
    higher_is_better: bool | None = None

    def header(self) -> str:
        return self.name + {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]


def shown_columns(comparison: Comparison) -> list[Column]:
    """Grouping keys, seeds, the split's metrics, Δm% (where any configuration has it), then the costs."""
    table = comparison.table
    columns = [Column(k, k, False) for k in (*grouping_keys(table), "n_seeds", "seeds")]
    for metric in comparison.split_metrics():
        columns.append(Column(metric.split("/", 1)[1], metric, True, comparison.higher_is_better(metric)))
    if f"{DELTA_M} mean" in table and table[f"{DELTA_M} mean"].notna().any():
        columns.append(Column("Δm%", DELTA_M, True, True))
    return columns + [Column(c, c, True) for c in COST_COLUMNS if f"{c} mean" in table]


def sort_column(comparison: Comparison, name: str) -> Column:
    """What `--sort NAME` means: a column as shown (depth/abs_err, Δm%) or any column of the comparison CSV."""
    shown = shown_columns(comparison)
    if name in ("Δm%", DELTA_M):
        return Column("Δm%", DELTA_M, True, True)
    for column in shown:
        if name in (column.name, column.source):
            return column
    base = name.removesuffix(" mean")
    if f"{base} mean" in comparison.table:
        return Column(base, base, True, comparison.higher_is_better(base))
    if name in comparison.table.columns:
        return Column(name, name, False)
    raise MtlrunError(
        f"unknown --sort column {name!r}: valid: {', '.join(c.name for c in shown)}, or any column of the CSV"
    )


def sort_table(table: pd.DataFrame, column: Column, ascending: bool | None) -> pd.DataFrame:
    """Rows by `column`, best first for a metric or Δm% unless `ascending` says; missing values last."""
    if ascending is None:
        ascending = column.higher_is_better is not True
    key = f"{column.source} mean" if column.numeric else column.source
    return table.sort_values(key, ascending=ascending, na_position="last", kind="stable", ignore_index=True)


def plain(value: object) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def mean_pm_std(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "-"
    digits = 2 if abs(mean) >= 1 else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def cells(table: pd.DataFrame, columns: list[Column]) -> tuple[list[list[str]], set[tuple[int, int]]]:
    """Every cell's text, and the (row, column) positions of the best value in each column with a direction."""
    text: list[list[str]] = []
    best: set[tuple[int, int]] = set()
    for j, column in enumerate(columns):
        if not column.numeric:
            text.append([plain(v) for v in table[column.source]])
            continue
        means, stds = table[f"{column.source} mean"], table[f"{column.source} std"]
        text.append([mean_pm_std(m, s) for m, s in zip(means, stds)])
        if column.higher_is_better is not None and means.notna().any():
            target = means.max() if column.higher_is_better else means.min()
            best |= {(i, j) for i, m in enumerate(means) if m == target}
    return [list(row) for row in zip(*text)], best


LATEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
    "↑": r"$\uparrow$", "↓": r"$\downarrow$",
}


def latex(text: str) -> str:
    return "".join(LATEX.get(ch, ch) for ch in text)


def render(table: pd.DataFrame, columns: list[Column], fmt: str) -> str:
    """The shown table as a terminal table (best marked *), or as Markdown or LaTeX (best in bold)."""
    text, best = cells(table, columns)
    headers = [c.header() for c in columns]
    if fmt == "table":
        rows = [[t + "*" if (i, j) in best else t for j, t in enumerate(row)] for i, row in enumerate(text)]
        return pd.DataFrame(rows, columns=headers).to_string(index=False)
    if fmt == "markdown":
        rows = [[f"**{t}**" if (i, j) in best else t for j, t in enumerate(row)] for i, row in enumerate(text)]
        lines = [headers, ["---:" if c.numeric else "---" for c in columns], *rows]
        return "\n".join("| " + " | ".join(t.replace("|", r"\|") for t in line) + " |" for line in lines)
    rows = [[rf"\textbf{{{latex(t)}}}" if (i, j) in best else latex(t) for j, t in enumerate(row)]
            for i, row in enumerate(text)]
    return "\n".join([
        r"% mtlrun-compare: mean +- std over seeds, best per metric in bold; needs \usepackage{booktabs}",
        rf"\begin{{tabular}}{{{''.join('r' if c.numeric else 'l' for c in columns)}}}",
        r"\toprule",
        " & ".join(latex(h) for h in headers) + r" \\",
        r"\midrule",
        *(" & ".join(row) + r" \\" for row in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ])


def note(text: str) -> None:
    print(f"mtlrun-compare: {text}", file=sys.stderr)


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
    lacking = [d if isinstance(d, str) else "(a row without run_dir)" for d in runs["run_dir"]
               if run_file(d, METRICS_CSV) is None]
    if lacking:
        unknown = [c.split("/", 1)[1] for c in metric_columns(runs)
                   if c.split("/", 1)[1] not in set(definitions["name"])]
        effect = (f"; no {METRICS_CSV} gives the direction of {', '.join(dict.fromkeys(unknown))}: shown without "
                  f"↑/↓ and no best marked" if unknown else "")
        notes.append(f"{len(lacking)} run(s) have no {METRICS_CSV} beside their results: "
                     f"{', '.join(lacking)}{effect}")
    runs[DELTA_M], said = delta_m(runs, baselines, definitions, split, where)
    if mean_over_tasks:
        runs, definitions = average_tasks(runs, definitions)
    return Comparison(runs, compare(runs), metric_directions(definitions), split, notes + said)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mtlrun-compare",
        description="Compare finished mtlrun runs: mean ± std over seeds of every task metric, Δm% against "
        "single-task runs and the costs, one row per configuration.",
    )
    parser.error = lambda message: sys.exit(f"mtlrun-compare: error: {message}")  # one line, like every error
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs, sweep dirs or results.csv files")
    parser.add_argument("--baseline", nargs="+", type=Path, metavar="PATH",
                        help="single-task runs to measure Δm%% against, instead of those among the paths")
    parser.add_argument("--split", default="test", help="split whose metrics are shown (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("comparison.csv"),
                        help="CSV to write, every split (default: %(default)s)")
    parser.add_argument("--sort", metavar="COLUMN", help="sort rows by a column, best first for metrics and Δm%%")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="ascending", action="store_const", const=True, help="force ascending")
    order.add_argument("--descending", dest="ascending", action="store_const", const=False,
                       help="force descending")
    parser.add_argument("--mean-over-tasks", action="store_true",
                        help="show each metric that several tasks share as its mean over them (CelebA's 40 "
                        "attributes), as mean/<metric>")
    parser.add_argument("--select", default="last", metavar="RULE",
                        help="the epoch(s) each run reports: last (default), best:<split>/<task>/<metric>, "
                        "best:val/loss (lowest summed validation loss) or mean_last:<k> (mean of the last k "
                        "evaluated epochs, Nash-MTL's reporting)")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG figures to DIR")
    parser.add_argument("--plot-metric", metavar="SPLIT/TASK/METRIC",
                        help="plot this metric against seconds per epoch instead of Δm%%")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        comparison = build(args.paths, args.baseline, args.split, args.mean_over_tasks, parse_selection(args.select))
        columns = shown_columns(comparison)
        if args.sort:
            comparison.table = sort_table(comparison.table, sort_column(comparison, args.sort), args.ascending)
        elif args.ascending is not None:
            raise MtlrunError("--ascending and --descending need --sort COLUMN")
        metrics = metric_columns(comparison.runs)
        if args.plot_metric and args.plot_metric not in metrics:
            raise MtlrunError(f"unknown --plot-metric {args.plot_metric!r}: valid: {', '.join(metrics)}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        comparison.table.to_csv(args.out, index=False)
        if args.format == "csv":
            comparison.table.to_csv(sys.stdout, index=False)
        else:
            print(render(comparison.table, columns, args.format))
        if args.format == "table":
            print(f"\n{args.split} split, mean ± std over seeds; ↑ higher / ↓ lower is better; * best in its column")
        for line in comparison.notes:
            note(line)
        keys = ", ".join(grouping_keys(comparison.table))
        note(f"{len(comparison.runs)} run(s) in {len(comparison.table)} configuration(s), grouped by config_id "
             f"(every setting but the seed), differing in {keys}; table written to {args.out}")
        if args.plot:
            from mtlrun.plots import write_plots  # matplotlib is imported only when figures are asked for

            for line in write_plots(comparison, args.plot, args.plot_metric):
                note(line)
    except MtlrunError as e:
        sys.exit(f"mtlrun-compare: error: {e}")
    except OSError as e:
        sys.exit(f"mtlrun-compare: error: cannot write {e.filename}: {e.strerror}")


if __name__ == "__main__":
    main()
