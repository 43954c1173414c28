"""The comparison table as shown: its columns, their order and sorting, as a terminal table, Markdown or LaTeX."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtlrun.errors import MtlrunError
from mtlrun.report.runs import COST_COLUMNS, DELTA_M
from mtlrun.report.table import Comparison, grouping_keys, plain

FORMATS = ("table", "csv", "markdown", "latex")


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


