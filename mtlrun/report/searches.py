"""The learning rate each configuration kept in a `hydra/sweeper=lr_search` sweep, for `mtlrun-compare`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mtlrun.errors import MtlrunError
from mtlrun.report.runs import find_results, load_runs, plain, same, setting_columns
from mtlrun.report.table import Comparison
from mtlrun.sweeps import objective_value

LR = "lr"
SEARCHED = "optimizer.lr"
BEST = "optimization_results.yaml"  # written by the Optuna sweeper when the search ends
JOB_HYDRA = ".hydra/hydra.yaml"  # a job's Hydra settings, the sweeper's among them
DEFAULT_OBJECTIVE = "val/loss_sum"
NOT_COMPARED = (LR, "skipped_steps", "compiled_graphs")  # what may differ between the trials of one configuration


@dataclass
class Search:
    """The finished trials of one configuration in one lr search, and the learning rate it kept."""

    where: Path
    settings: dict  # the configuration's settings but the learning rate
    kept: float
    tried: list[float]
    objective: str
    value: float


def read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MtlrunError(f"{path} is not readable YAML ({type(e).__name__}); remove it or re-run the search") from None


def sweeper_of(path: Path) -> dict:
    """`hydra.sweeper` of a job's .hydra/hydra.yaml; {} where it is not an Optuna sweeper."""
    if "optuna" not in path.read_text(errors="replace"):  # most runs: no YAML to parse
        return {}
    sweeper = (read_yaml(path).get("hydra") or {}).get("sweeper") or {}
    return sweeper if "optuna" in str(sweeper.get("_target_", "")) else {}


def search_dirs(paths: list[Path]) -> list[Path]:
    """The lr search sweeps at or under `paths`: sweep directories whose Optuna sweeper searched optimizer.lr,
    known by its optimization_results.yaml (a finished search) or its trials' .hydra/hydra.yaml (also while
    it runs)."""
    found = []
    for path in paths:
        if not path.is_dir():
            continue
        found += [m.parent for m in path.rglob(BEST) if SEARCHED in (read_yaml(m).get("best_params") or {})]
        found += [m.parent.parent.parent for m in path.rglob(JOB_HYDRA)
                  if SEARCHED in (sweeper_of(m).get("params") or {})]
    return sorted(set(found))


def objective_of(run_dir: object) -> str:
    """The objective a trial reported (its `.hydra/config.yaml`; the default where absent)."""
    path = Path(str(run_dir)) / ".hydra" / "config.yaml"
    return str(read_yaml(path).get("objective", DEFAULT_OBJECTIVE)) if path.is_file() else DEFAULT_OBJECTIVE


def direction_of(trials: pd.DataFrame) -> str:
    """The search's direction, from its first trial's .hydra/hydra.yaml (minimize where it does not say)."""
    path = Path(str(trials["run_dir"].iloc[0])) / JOB_HYDRA
    return str(sweeper_of(path).get("direction", "minimize")) if path.is_file() else "minimize"


def searches(sweep: Path) -> list[Search]:
    """One Search per configuration among the sweep's finished trials: the trial with the best objective
    (the sweeper's own best where the sweep searched one configuration and wrote optimization_results.yaml)."""
    files = find_results([sweep])[0]
    if not files:
        return []
    trials = load_runs(files)
    if LR not in trials or "tasks" not in trials:
        raise MtlrunError(f"the runs under the lr search {sweep} have no lr or tasks column in their results.csv "
                          f"(written by an older mtlrun): re-run the search")
    keys = [c for c in setting_columns(trials) if c not in NOT_COMPARED]
    maximize = direction_of(trials) == "maximize"
    found = []
    for _, group in trials.groupby(keys, sort=False, dropna=False):
        objective = objective_of(group["run_dir"].iloc[0])
        values = pd.Series([objective_value(objective, row.to_dict()) for _, row in group.iterrows()], index=group.index)
        best = values.idxmax() if maximize else values.idxmin()
        found.append(Search(sweep, {k: group.at[best, k] for k in keys}, float(group.at[best, LR]),
                            sorted(group[LR].astype(float)), objective, float(values[best])))
    sweeper_best = read_yaml(sweep / BEST).get("best_params", {}).get(SEARCHED) if (sweep / BEST).is_file() else None
    if sweeper_best is not None and len(found) == 1:
        found[0].kept = float(sweeper_best)
    return found


def add_kept_rates(comparison: Comparison, paths: list[Path]) -> list[str]:
    """Name, in an `lr kept` column, the learning rate each configuration's search kept (of how many
    tried), matching a configuration to a search by every setting but the learning rate; one note per search."""
    found = [s for sweep in search_dirs(paths) for s in searches(sweep)]
    if not found:
        return []
    table, kept = comparison.table, []
    for _, row in table.iterrows():
        match = [s for s in found if all(same(row.get(k, np.nan), v) for k, v in s.settings.items())]
        kept.append(f"{plain(match[0].kept)} (of {len(match[0].tried)} tried)" if match else "-")
    table["lr kept"] = kept
    notes = []
    for s in found:
        shown = " ".join(f"{k}={plain(s.settings[k])}" for k in ("strategy", "group_size") if k in s.settings)
        notes.append(f"lr search {s.where}: {shown} kept lr={plain(s.kept)} of {len(s.tried)} tried "
                     f"({plain(min(s.tried))} to {plain(max(s.tried))}; {s.objective} = {s.value:.4g})")
    if any(k == "-" for k in kept):
        notes.append(f"{kept.count('-')} configuration(s) match no lr search (every setting but the learning rate)")
    return notes

