"""Statistics over seeds: 95% intervals of the means, and differences to a reference configuration with tests."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtlrun.errors import MtlrunError
from mtlrun.report.runs import DELTA_M, plain
from mtlrun.report.table import Comparison, grouping_keys, table_settings

LEVEL = 0.95  # of every interval
ALPHA = 0.05  # a difference is marked where its Holm-adjusted p-value is below this
PAIRED, WELCH = "paired", "Welch"
BETTER, WORSE, TIE, DIFFERS = "better", "worse", "tie", "differs"  # `differs`: significant, direction unknown


@dataclass(frozen=True)
class Difference:
    """A configuration's mean minus the reference's, its 95% interval, p-value and which test gave them."""

    test: str  # PAIRED, WELCH, or "" where either side has fewer than 2 seeds
    diff: float
    low: float
    high: float
    p: float


def t_half_width(std: float, n: float, df: float) -> float:
    """Half the width of the Student t interval of a mean with standard error std / sqrt(n)."""
    from scipy import stats  # here: importing it takes ~1 s, which comparisons of single seeds need not pay

    return float(stats.t.ppf(0.5 + LEVEL / 2, df) * std / np.sqrt(n))


def mean_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% Student t interval of the mean over seeds; NaN, NaN below 2 values."""
    if len(values) < 2:
        return np.nan, np.nan
    mean, half = float(values.mean()), t_half_width(float(values.std(ddof=1)), len(values), len(values) - 1)
    return mean - half, mean + half


def two_sided(t: float, df: float) -> float:
    """The two-sided p-value of a t statistic (scipy.stats.ttest_rel's and ttest_ind's, without their warning
    on nearly constant differences)."""
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def exact(test: str, diff: float) -> Difference:
    """Every seed differs by the same amount: the interval is that point, p is 1 without a difference, else 0."""
    return Difference(test, diff, diff, diff, 1.0 if diff == 0 else 0.0)


def paired(a: np.ndarray, b: np.ndarray) -> Difference:
    """Paired t over seeds: the same seed means the same initial weights and batch order, so a - b per seed."""
    d = a - b
    mean, std = float(d.mean()), float(d.std(ddof=1))
    if std == 0:
        return exact(PAIRED, mean)
    half = t_half_width(std, len(d), len(d) - 1)
    return Difference(PAIRED, mean, mean - half, mean + half, two_sided(mean / (std / np.sqrt(len(d))), len(d) - 1))


def welch(a: np.ndarray, b: np.ndarray) -> Difference:
    """Welch's t: unequal variances, Welch-Satterthwaite degrees of freedom."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    if va + vb == 0:
        return exact(WELCH, diff)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    se = float(np.sqrt(va + vb))
    half = t_half_width(se, 1, df)
    return Difference(WELCH, diff, diff - half, diff + half, two_sided(diff / se, df))


def difference(values: pd.Series, reference: pd.Series) -> Difference:
    """`values` against `reference` (each indexed by seed, NaN dropped): paired where both have the same
    seeds, at least 2; Welch's where they differ; no test where either side has fewer than 2."""
    a, b = values.dropna(), reference.dropna()
    if min(len(a), len(b)) < 2:
        return Difference("", float(a.mean() - b.mean()) if len(a) and len(b) else np.nan, np.nan, np.nan, np.nan)
    if a.index.notna().all() and a.index.is_unique and set(a.index) == set(b.index):
        return paired(a.sort_index().to_numpy(float), b.sort_index().to_numpy(float))
    return welch(a.to_numpy(float), b.to_numpy(float))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN left out of the family and kept NaN)."""
    adjusted = [np.nan] * len(p_values)
    order = sorted((p, i) for i, p in enumerate(p_values) if not np.isnan(p))
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(diff: Difference, p_holm: float, higher_is_better: bool | None) -> str:
    """better / worse / tie against the reference, by the metric's direction, at ALPHA after Holm."""
    if diff.test == "" or np.isnan(p_holm) or p_holm >= ALPHA:
        return TIE if diff.test else ""
    if higher_is_better is None:
        return DIFFERS
    return BETTER if (diff.diff > 0) == higher_is_better else WORSE


def tested_columns(comparison: Comparison) -> list[str]:
    """The numbers the statistics cover: the shown split's metrics and Δm% where any run has it."""
    delta = [DELTA_M] if DELTA_M in comparison.runs and comparison.runs[DELTA_M].notna().any() else []
    return comparison.split_metrics() + delta


def per_seed(comparison: Comparison, config_id: str, column: str) -> pd.Series:
    runs = comparison.runs[comparison.runs["config_id"] == config_id]
    seeds = runs["seed"] if "seed" in runs else pd.Series(np.nan, index=runs.index)
    return pd.Series(runs[column].to_numpy(float), index=seeds.to_numpy())


def add_intervals(comparison: Comparison) -> list[str]:
    """Give every tested mean its 95% interval (`<column> ci_low`, `ci_high`); the note where one seed is all."""
    table = comparison.table
    added: dict[str, list[float]] = {}
    for column in tested_columns(comparison):
        bounds = [mean_interval(per_seed(comparison, c, column).dropna().to_numpy()) for c in table["config_id"]]
        added[f"{column} ci_low"] = [low for low, _ in bounds]
        added[f"{column} ci_high"] = [high for _, high in bounds]
    if added:  # one concat, not a column at a time (pandas warns of a fragmented frame)
        added_frame = pd.DataFrame(added, index=table.index)
        comparison.table = table = pd.concat([table.drop(columns=added_frame.columns, errors="ignore"), added_frame],
                                             axis=1)
    single = (table["n_seeds"] < 2).sum()
    if single:
        return [f"95% intervals need >= 2 seeds: {single} of {len(table)} configuration(s) have one, shown without "
                f"an interval (add seed=0,1,2 to the sweep)"]
    return []


def add_reference(comparison: Comparison, reference: int) -> list[str]:
    """Every configuration's difference to the table's row `reference` on every tested number: `<column> diff`,
    `diff_low`, `diff_high` (95%), `p`, `p_holm` (Holm over the tested numbers of that configuration) and
    `verdict`; per row the `test` used and `wins`, `ties`, `losses` over the task metrics (Δm% left out:
    it restates them); `reference` marks the row. Returns the notes the report must show."""
    table, columns = comparison.table, tested_columns(comparison)
    reference_id = table.at[reference, "config_id"]
    found: dict[str, list] = {f"{c} {part}": [] for c in columns for part in ("diff", "diff_low", "diff_high", "p",
                                                                              "p_holm", "verdict")}
    summary: dict[str, list] = {"test": [], "wins": [], "ties": [], "losses": []}
    untested = []
    for i, row in table.iterrows():
        diffs = [difference(per_seed(comparison, row["config_id"], c), per_seed(comparison, reference_id, c))
                 for c in columns]
        if i == reference:
            diffs = [Difference("", np.nan, np.nan, np.nan, np.nan) for _ in columns]
        adjusted = holm([d.p for d in diffs])
        verdicts = [verdict(d, p, comparison.higher_is_better(c)) for d, p, c in zip(diffs, adjusted, columns)]
        for c, d, p, v in zip(columns, diffs, adjusted, verdicts):
            for part, value in zip(("diff", "diff_low", "diff_high", "p", "p_holm", "verdict"),
                                   (d.diff, d.low, d.high, d.p, p, v)):
                found[f"{c} {part}"].append(value)
        tests = sorted({d.test for d in diffs if d.test}, reverse=True)
        summary["test"].append(", ".join(tests))
        if i != reference and not tests:
            untested.append(comparison.labels()[i])
        counted = [v for c, v in zip(columns, verdicts) if c != DELTA_M and comparison.higher_is_better(c) is not None]
        for key, kind in (("wins", BETTER), ("ties", TIE), ("losses", WORSE)):
            summary[key].append(np.nan if i == reference or not tests else counted.count(kind))
    # one concat, not a column at a time (pandas warns of a fragmented frame past ~100 inserts)
    added = pd.DataFrame({**found, **summary, "reference": table.index == reference}, index=table.index)
    comparison.table = pd.concat([table.drop(columns=added.columns, errors="ignore"), added], axis=1)
    notes = [f"reference: {comparison.labels()[reference]} (config_id {reference_id}); differences with 95% "
             f"intervals, paired t over seeds where both have the same seeds, Welch's t otherwise; p-values "
             f"Holm-adjusted over each configuration's {len(columns)} tested numbers; ▲ better, ▼ worse "
             f"(p_holm < {ALPHA}), else a tie"]
    if untested:
        notes.append(f"differences need >= 2 seeds on both sides; not tested: {', '.join(untested)}")
    return notes


def find_reference(comparison: Comparison, text: str) -> int:
    """The table row `--reference` names: a row number as shown (1 = first) or `key=value` settings that
    single out one configuration (`strategy=averaged`, `strategy=grouped group_size=2`)."""
    table, labels = comparison.table, comparison.labels()
    if text.strip().isdigit():
        if not 1 <= int(text) <= len(table):
            raise MtlrunError(f"--reference {text}: the table has rows 1 to {len(table)}")
        return int(text) - 1
    pairs = re.findall(r"([^\s,=]+)=([^\s,]+)", text)
    if not pairs:
        raise MtlrunError(f"--reference {text!r}: give a row number (1 to {len(table)}) or key=value settings such "
                          f"as strategy=averaged")
    settings = table_settings(table)
    for key, _ in pairs:
        if key not in settings:
            raise MtlrunError(f"--reference {text!r}: no setting {key!r}; valid: {', '.join(grouping_keys(table))}, "
                              f"or any setting column of the CSV")
    rows = [i for i, row in table.iterrows() if all(matches(row[key], value) for key, value in pairs)]
    if len(rows) != 1:
        which = "no configuration" if not rows else f"{len(rows)} configurations ({', '.join(labels[i] for i in rows)})"
        raise MtlrunError(f"--reference {text!r} matches {which}; it must single out one of: {'; '.join(labels)}")
    return rows[0]


def matches(value: object, text: str) -> bool:
    """A setting equals the text written on the command line (2 matches 2.0, 0.001 matches 1e-3)."""
    if plain(value) == text:
        return True
    try:
        return float(value) == float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
