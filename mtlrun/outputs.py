"""What a run writes to its directory (CSV logs, the results row, the checkpoint), each file replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from mtlrun.errors import MtlrunError

METRICS_CSV = "metrics.csv"
TRAIN_LOG_CSV = "train_log.csv"
DIAGNOSTICS_CSV = "diagnostics.csv"
STRATEGY_LOG_CSV = "strategy_log.csv"
RESULTS_CSV = "results.csv"
CHECKPOINT = "checkpoint.pt"


def _replace(path: Path, write) -> None:
    """Write to a sibling temporary file, then rename over `path`: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_csv(rows: list[dict], path: Path) -> None:
    _replace(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


class RunDir:
    """A run's directory and the files in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def claim(self, overwrite: bool) -> None:
        """Refuse to start a new run over an existing one unless told to, so no result is lost by accident."""
        existing = [name for name in (CHECKPOINT, RESULTS_CSV) if (self.path / name).exists()]
        if existing and not overwrite:
            raise MtlrunError(
                f"{self.path} already holds a run ({', '.join(existing)}): add resume=true to continue it, "
                f"overwrite=true to start it over, or choose another hydra.run.dir"
            )
        for name in (CHECKPOINT, RESULTS_CSV, METRICS_CSV, TRAIN_LOG_CSV, DIAGNOSTICS_CSV, STRATEGY_LOG_CSV):
            (self.path / name).unlink(missing_ok=True)

    def save(
        self, train_log: list[dict], metrics: list[dict], diagnostics: list[dict], state: dict,
        strategy_log: list[dict] = (),
    ) -> None:
        """Write the logs, then the checkpoint: a checkpoint never refers to rows the CSVs lack."""
        write_csv(train_log, self.path / TRAIN_LOG_CSV)
        write_csv(metrics, self.path / METRICS_CSV)
        if diagnostics:
            write_csv(diagnostics, self.path / DIAGNOSTICS_CSV)
        if strategy_log:
            write_csv(list(strategy_log), self.path / STRATEGY_LOG_CSV)
        _replace(self.checkpoint, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, device: torch.device) -> dict:
        try:
            return torch.load(self.checkpoint, map_location=device, weights_only=True)
        except Exception as e:  # any unreadable checkpoint gets the same advice
            raise MtlrunError(
                f"{self.checkpoint} cannot be read ({type(e).__name__}): it was not written by this mtlrun "
                f"or is damaged; restart the run with overwrite=true"
            ) from None

    def write_results(self, row: dict) -> None:
        write_csv([row], self.path / RESULTS_CSV)
