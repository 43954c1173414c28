"""`mtlrun-compare`: gather runs' results.csv, group runs that differ only by seed, report mean ± std."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from mtlrun.errors import MtlrunError
from mtlrun.outputs import CHECKPOINT, RESULTS_CSV

COST_COLUMNS = ("steps_per_iteration", "passes_per_iteration", "seconds_per_epoch", "peak_memory_mb")
# Columns that describe one run but not its configuration.
PER_RUN_COLUMNS = ("seed", "run_dir", "config_id", "device", "iterations", "optimizer_steps")


def find_results(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """The results.csv files under `paths` (run dirs, sweep dirs, or the files), and unfinished run dirs."""
    found: list[Path] = []
    unfinished: list[Path] = []
    for path in paths:
        if not path.exists():
            raise MtlrunError(f"{path} does not exist: give run directories, sweep directories or results.csv files")
        if path.is_file():
            found.append(path)
            continue
        found += sorted(path.rglob(RESULTS_CSV))
        unfinished += sorted(c.parent for c in path.rglob(CHECKPOINT) if not (c.parent / RESULTS_CSV).exists())
    return list(dict.fromkeys(found)), unfinished


def load_results(files: list[Path]) -> pd.DataFrame:
    frames = []
    for file in files:
        try:
            frames.append(pd.read_csv(file))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise MtlrunError(f"{file} is not a results CSV ({type(e).__name__}); remove it or re-run that run") from None
    return pd.concat(frames, ignore_index=True)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Final metrics are named split/task/metric."""
    return [c for c in df.columns if c.count("/") == 2]


def compare(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: its settings, the seeds, and mean and std of every metric and cost."""
    metrics = metric_columns(df)
    costs = [c for c in COST_COLUMNS if c in df.columns]
    settings = [c for c in df.columns if c not in metrics + costs and c not in PER_RUN_COLUMNS]
    key = "config_id" if "config_id" in df.columns else settings
    rows = []
    for _, group in df.groupby(key, sort=False, dropna=False):
        row = {c: group[c].iloc[0] for c in settings}
        row["n_seeds"] = len(group)
        row["seeds"] = " ".join(str(s) for s in sorted(group["seed"])) if "seed" in group else ""
        for c in metrics + costs:
            row[f"{c} mean"] = group[c].mean()
            row[f"{c} std"] = group[c].std(ddof=1) if len(group) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def display_table(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """Settings that vary between configurations, then mean ± std of the split's metrics and the costs."""
    settings = [c for c in table.columns if not c.endswith((" mean", " std")) and c not in ("n_seeds", "seeds")]
    varying = [c for c in settings if table[c].astype(str).nunique() > 1] or ["strategy"]
    shown = table[varying + ["n_seeds"]].copy()
    for column in [c[: -len(" mean")] for c in table.columns if c.endswith(" mean")]:
        is_metric = column.count("/") == 2
        if is_metric and not column.startswith(f"{split}/"):
            continue
        name = column[len(split) + 1 :] if is_metric else column
        digits = 2 if column != "steps_per_iteration" else 1
        shown[name] = [
            f"{m:.{digits if abs(m) >= 1 else 4}f} ± {s:.{digits if abs(m) >= 1 else 4}f}"
            for m, s in zip(table[f"{column} mean"], table[f"{column} std"])
        ]
    return shown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mtlrun-compare",
        description="Compare finished mtlrun runs: mean ± std over seeds of every task metric and cost.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs, sweep dirs or results.csv files")
    parser.add_argument("--out", type=Path, default=Path("comparison.csv"), help="CSV to write (default: %(default)s)")
    parser.add_argument("--split", default="test", help="split whose metrics the terminal table shows (default: test)")
    args = parser.parse_args(argv)
    try:
        files, unfinished = find_results(args.paths)
        if unfinished:
            print(f"mtlrun-compare: skipping {len(unfinished)} unfinished run(s) without {RESULTS_CSV}: "
                  + ", ".join(map(str, unfinished)), file=sys.stderr)
        if not files:
            raise MtlrunError(f"no {RESULTS_CSV} under {', '.join(map(str, args.paths))}: finished runs write one")
        table = compare(load_results(files))
        if not any(c.startswith(f"{args.split}/") for c in table.columns):
            raise MtlrunError(f"the runs have no '{args.split}' metrics; use --split test or --split val")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    except MtlrunError as e:
        sys.exit(f"mtlrun-compare: error: {e}")
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 40):
        print(display_table(table, args.split).to_string(index=False))
    print(f"\n{len(files)} run(s) in {len(table)} configuration(s); table written to {args.out}")


if __name__ == "__main__":
    main()
