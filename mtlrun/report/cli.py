"""`mtlrun-compare`: gather runs, group those that differ only by seed, report mean ± std, Δm% and costs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtlrun.errors import MtlrunError
from mtlrun.report.build import build
from mtlrun.report.render import FORMATS, render, shown_columns, sort_column, sort_table
from mtlrun.report.runs import metric_columns
from mtlrun.report.selection import parse_selection
from mtlrun.report.table import grouping_keys


def note(text: str) -> None:
    print(f"mtlrun-compare: {text}", file=sys.stderr)


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
            from mtlrun.report.plots import write_plots  # matplotlib is imported only when figures are asked for

            for line in write_plots(comparison, args.plot, args.plot_metric):
                note(line)
    except MtlrunError as e:
        sys.exit(f"mtlrun-compare: error: {e}")
    except OSError as e:
        sys.exit(f"mtlrun-compare: error: cannot write {e.filename}: {e.strerror}")


if __name__ == "__main__":
    main()
