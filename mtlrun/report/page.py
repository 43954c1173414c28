"""`mtlrun-compare --report DIR`: DIR/report.md, the comparison as a page to paste into a lab notebook."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

import mtlrun
from mtlrun.report.render import render, shown_columns
from mtlrun.report.runs import plain
from mtlrun.report.stats import tested_columns
from mtlrun.report.table import Comparison, grouping_keys, table_settings

REPORT_MD = "report.md"


def overrides(run_dir: object) -> str:
    """The command-line overrides a run was started with (its .hydra/overrides.yaml)."""
    path = Path(str(run_dir)) / ".hydra" / "overrides.yaml"
    if not isinstance(run_dir, str) or not path.is_file():
        return "(no .hydra/overrides.yaml beside its results)"
    listed = yaml.safe_load(path.read_text()) or []
    return " ".join(map(str, listed)) or "(none: the defaults)"


def configurations(comparison: Comparison) -> list[str]:
    """Per configuration: its label, config id, seeds, every setting, and each run's overrides and directory."""
    lines = []
    settings = table_settings(comparison.table)
    for label, (_, row) in zip(comparison.labels(), comparison.table.iterrows()):
        lines += [f"### {label}", "", f"- config id: `{row['config_id']}`; seeds: {row['seeds'] or '-'}",
                  "- settings: " + " ".join(f"`{s}={plain(row[s])}`" for s in settings if not pd.isna(row[s]))]
        for _, run in comparison.runs[comparison.runs["config_id"] == row["config_id"]].iterrows():
            seed = plain(run.get("seed", np.nan))
            lines.append(f"- seed {seed}: `{plain(run['run_dir'])}`, overrides: `{overrides(run['run_dir'])}`")
        lines.append("")
    return lines


def statistics(comparison: Comparison) -> list[str]:
    """The tested numbers per configuration: against the reference (difference, interval, p, Holm-adjusted p,
    verdict, test) or, without one, the mean's 95% interval."""
    table, labels = comparison.table, comparison.labels()
    against = "wins" in table
    header = (["configuration", "number", "difference", "95% interval", "p", "p (Holm)", "verdict", "test"]
              if against else ["configuration", "number", "mean", "95% interval", "seeds"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, (_, row) in zip(labels, table.iterrows()):
        if against and row["reference"]:
            continue
        for c in tested_columns(comparison):
            name = "Δm%" if c == "delta_m" else c
            if np.isnan(row[f"{c} mean"]):
                continue
            if against:
                cells = [row[f"{c} diff"], f"[{row[f'{c} diff_low']:.4g}, {row[f'{c} diff_high']:.4g}]",
                         row[f"{c} p"], row[f"{c} p_holm"], row[f"{c} verdict"] or "-", row["test"] or "-"]
            else:
                cells = [row[f"{c} mean"], f"[{row[f'{c} ci_low']:.4g}, {row[f'{c} ci_high']:.4g}]", row["n_seeds"]]
            shown = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells]
            lines.append("| " + " | ".join([label, name, *shown]).replace("[nan, nan]", "-") + " |")
    return lines


def write_report(comparison: Comparison, out_dir: Path, figures: list[tuple[Path | None, str]], legend: str,
                 args: argparse.Namespace) -> Path:
    """Write out_dir/report.md and return its path; figures are linked relative to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["mtlrun-compare", *map(str, getattr(args, "argv", sys.argv[1:]))])
    figure_lines = []
    for path, line in figures:
        if path is None:
            figure_lines += [f"- {line}", ""]
        else:
            figure_lines += [f"![{path.stem}]({Path(os.path.relpath(path, out_dir)).as_posix()})", ""]
    lines = [
        "# mtlrun comparison", "",
        f"mtlrun {mtlrun.__version__}, written {datetime.now().isoformat(timespec='seconds')} by `{command}`", "",
        f"{len(comparison.runs)} run(s) in {len(comparison.table)} configuration(s), grouped by config id (every "
        f"setting but the seed); grouping keys (the settings that differ): "
        f"{', '.join(f'`{k}`' for k in grouping_keys(comparison.table))}.", "",
        "## Table", "", render(comparison.table, shown_columns(comparison), "markdown"), "", legend, "",
        "## Statistics", "", *statistics(comparison), "",
        *(["## Notes", "", *(f"- {n}" for n in comparison.notes), ""] if comparison.notes else []),
        "## Figures", "", *figure_lines,
        "## Configurations", "", *configurations(comparison),
    ]
    path = out_dir / REPORT_MD
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
