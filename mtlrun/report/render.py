"""The comparison table as shown: its columns, their order and sorting, as a terminal table, Markdown or LaTeX."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtlrun.errors import MtlrunError
from mtlrun.report.runs import COST_COLUMNS, DELTA_M
from mtlrun.report.stats import BETTER, DIFFERS, WORSE
from mtlrun.report.table import Comparison, grouping_keys, plain

FORMATS = ("table", "csv", "markdown", "latex")
SHOWN_TOTALS = ("backward_passes", "train_seconds")  # of the runs' totals, the two a budget is read in
MARKS = {BETTER: " ▲", WORSE: " ▼", DIFFERS: " ≠"}  # a significant difference to the reference


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
    kept = ["lr kept"] if "lr kept" in table else []  # the learning rate a search kept (of how many tried)
    columns = [Column(k, k, False) for k in (*grouping_keys(table), *kept, "n_seeds", "seeds")]
    for metric in comparison.split_metrics():
        columns.append(Column(metric.split("/", 1)[1], metric, True, comparison.higher_is_better(metric)))
    if f"{DELTA_M} mean" in table and table[f"{DELTA_M} mean"].notna().any():
        columns.append(Column("Δm%", DELTA_M, True, True))
    if "wins" in table:  # --reference: the test used and the metrics won, tied and lost against the reference
        columns += [Column("test", "test", False), Column("wins/ties/losses", "wins", False)]
    return columns + [Column(c, c, True) for c in (*COST_COLUMNS, *SHOWN_TOTALS) if f"{c} mean" in table]


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


def digits(value: float) -> int:
    return 2 if abs(value) >= 1 else 4


def mean_pm_std(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "-"
    return f"{mean:.{digits(mean)}f} ± {std:.{digits(mean)}f}"


def statistics(row: pd.Series, source: str) -> str:
    """What follows a tested mean: its difference to the reference (95% interval, Holm-adjusted p, ▲ better
    or ▼ worse where significant), or on the reference row and without one, the mean's 95% interval."""
    d = digits(row[f"{source} mean"]) if not np.isnan(row[f"{source} mean"]) else 2
    if f"{source} diff" in row and not row["reference"] and not np.isnan(row[f"{source} diff"]):
        if np.isnan(row[f"{source} p_holm"]):
            return f" Δ {row[f'{source} diff']:+.{d}f} (untested: < 2 seeds)"
        return (f" Δ {row[f'{source} diff']:+.{d}f} [{row[f'{source} diff_low']:+.{d}f}, "
                f"{row[f'{source} diff_high']:+.{d}f}] p={row[f'{source} p_holm']:.2g}"
                f"{MARKS.get(row[f'{source} verdict'], '')}")
    if f"{source} ci_low" in row and not np.isnan(row[f"{source} ci_low"]):
        return f" [{row[f'{source} ci_low']:.{d}f}, {row[f'{source} ci_high']:.{d}f}]"
    return ""


def summary(row: pd.Series) -> str:
    """wins/ties/losses against the reference."""
    if row["reference"]:
        return "reference"
    return "-" if np.isnan(row["wins"]) else f"{row['wins']:.0f}/{row['ties']:.0f}/{row['losses']:.0f}"


def cells(table: pd.DataFrame, columns: list[Column]) -> tuple[list[list[tuple[str, str]]], set[tuple[int, int]]]:
    """Every cell's text as (head, tail): the head is what a best mark covers (mean ± std), the tail the
    statistics after it; and the (row, column) positions of the best mean in each column with a direction."""
    text: list[list[tuple[str, str]]] = []
    best: set[tuple[int, int]] = set()
    for j, column in enumerate(columns):
        if column.source == "wins":
            text.append([(summary(row), "") for _, row in table.iterrows()])
        elif not column.numeric:
            text.append([(plain(v), "") for v in table[column.source]])
        else:
            means, stds = table[f"{column.source} mean"], table[f"{column.source} std"]
            text.append([(mean_pm_std(m, s), statistics(row, column.source))
                         for m, s, (_, row) in zip(means, stds, table.iterrows())])
            if column.higher_is_better is not None and means.notna().any():
                target = means.max() if column.higher_is_better else means.min()
                best |= {(i, j) for i, m in enumerate(means) if m == target}
    return [list(row) for row in zip(*text)], best


LATEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
    "↑": r"$\uparrow$", "↓": r"$\downarrow$", "▲": r"$^\blacktriangle$", "▼": r"$^\blacktriangledown$",
    "≠": r"$^{\neq}$", "<": r"$<$",
}


def latex(text: str) -> str:
    return "".join(LATEX.get(ch, ch) for ch in text)


def render(table: pd.DataFrame, columns: list[Column], fmt: str) -> str:
    """The shown table as a terminal table (best marked *), or as Markdown or LaTeX (best in bold)."""
    text, best = cells(table, columns)
    headers = [c.header() for c in columns]
    if fmt == "table":
        rows = [[h + ("*" if (i, j) in best else "") + t for j, (h, t) in enumerate(row)] for i, row in enumerate(text)]
        return pd.DataFrame(rows, columns=headers).to_string(index=False)
    if fmt == "markdown":
        rows = [[(f"**{h}**" if (i, j) in best else h) + t for j, (h, t) in enumerate(row)]
                for i, row in enumerate(text)]
        lines = [headers, ["---:" if c.numeric else "---" for c in columns], *rows]
        return "\n".join("| " + " | ".join(t.replace("|", r"\|") for t in line) + " |" for line in lines)
    rows = [[(rf"\textbf{{{latex(h)}}}" if (i, j) in best else latex(h)) + latex(t) for j, (h, t) in enumerate(row)]
            for i, row in enumerate(text)]
    return "\n".join([
        r"% mtlrun-compare: mean +- std over seeds, best per metric in bold; [95% interval]; with a reference, the"
        r" difference to it; needs \usepackage{booktabs,amssymb}",
        rf"\begin{{tabular}}{{{''.join('r' if c.numeric else 'l' for c in columns)}}}",
        r"\toprule",
        " & ".join(latex(h) for h in headers) + r" \\",
        r"\midrule",
        *(" & ".join(row) + r" \\" for row in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ])
