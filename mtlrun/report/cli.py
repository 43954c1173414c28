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
from mtlrun.report.costs import PLOT_COSTS
from mtlrun.report.page import write_report
from mtlrun.report.searches import add_kept_rates
from mtlrun.report.stats import add_intervals, add_reference, find_reference
from mtlrun.report.table import Comparison, grouping_keys


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
                        "best:<split>/mean/<metric> (its mean over the tasks that have it), "
                        "best:val/loss (lowest summed validation loss) or mean_last:<k> (mean of the last k "
                        "evaluated epochs, Nash-MTL's reporting)")
    parser.add_argument("--reference", metavar="CONFIG",
                        help="the configuration the others are tested against: key=value settings that single it "
                        "out (strategy=averaged; 'strategy=grouped group_size=2') or its row number as shown (1 = "
                        "first): every metric's and Δm%%'s difference with a 95%% interval, a Holm-adjusted "
                        "p-value and wins/ties/losses")
    parser.add_argument("--lr-search", nargs="+", type=Path, metavar="DIR", default=[],
                        help="hydra/sweeper=lr_search sweeps whose kept learning rates the table names (searches "
                        "among the paths are read too)")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG figures to DIR")
    parser.add_argument("--plot-metric", metavar="SPLIT/TASK/METRIC",
                        help="plot this metric instead of Δm%% (tradeoff.png, budget_curves.png)")
    parser.add_argument("--plot-cost", choices=PLOT_COSTS, default="train_seconds",
                        help="the cost tradeoff.png and budget_curves.png put on their x axis (default: "
                        "%(default)s, training time without evaluation)")
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="write DIR/report.md: the table, figures (into --plot DIR, else DIR), statistics, "
                        "every configuration's overrides and config id")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for the report page's command line
    return args


def analyse(args: argparse.Namespace) -> Comparison:
    """The comparison the arguments ask for: built, sorted, with intervals, the reference's tests and the
    learning rates the searches kept."""
    comparison = build(args.paths, args.baseline, args.split, args.mean_over_tasks, parse_selection(args.select))
    if args.sort:
        comparison.table = sort_table(comparison.table, sort_column(comparison, args.sort), args.ascending)
    elif args.ascending is not None:
        raise MtlrunError("--ascending and --descending need --sort COLUMN")
    metrics = metric_columns(comparison.runs)
    if args.plot_metric and args.plot_metric not in metrics:
        raise MtlrunError(f"unknown --plot-metric {args.plot_metric!r}: valid: {', '.join(metrics)}")
    comparison.notes += add_intervals(comparison)
    if args.reference is not None:
        comparison.notes += add_reference(comparison, find_reference(comparison, args.reference))
    comparison.notes += add_kept_rates(comparison, [*args.paths, *args.lr_search])
    return comparison


def legend(comparison: Comparison) -> str:
    tested = ("Δ = difference to the reference [its 95% interval], p Holm-adjusted, ▲ better / ▼ worse "
              "(p < 0.05), wins/ties/losses over the task metrics" if "wins" in comparison.table
              else "[95% interval of the mean, Student t over seeds]")
    return (f"{comparison.split} split, mean ± std over seeds; {tested}; ↑ higher / ↓ lower is better; "
            f"* best mean in its column")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        comparison = analyse(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        comparison.table.to_csv(args.out, index=False)
        if args.format == "csv":
            comparison.table.to_csv(sys.stdout, index=False)
        else:
            print(render(comparison.table, shown_columns(comparison), args.format))
        if args.format == "table":
            print(f"\n{legend(comparison)}")
        for line in comparison.notes:
            note(line)
        keys = ", ".join(grouping_keys(comparison.table))
        note(f"{len(comparison.runs)} run(s) in {len(comparison.table)} configuration(s), grouped by config_id "
             f"(every setting but the seed), differing in {keys}; table written to {args.out}")
        figures: list[tuple[Path | None, str]] = []
        if args.plot or args.report:
            from mtlrun.report.plots import write_plots  # matplotlib is imported only when figures are asked for

            figures = write_plots(comparison, args.plot or args.report, args.plot_metric, args.plot_cost)
            for _, line in figures:
                note(line)
        if args.report:
            note(f"wrote {write_report(comparison, args.report, figures, legend(comparison), args)}")
    except MtlrunError as e:
        sys.exit(f"mtlrun-compare: error: {e}")
    except OSError as e:
        sys.exit(f"mtlrun-compare: error: cannot write {e.filename}: {e.strerror}")


if __name__ == "__main__":
    main()
