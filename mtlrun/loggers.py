"""Loggers beside the CSVs (`logger=<name>`): the CSVs stay the source of truth, a logger only mirrors them."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mtlrun.errors import MtlrunError
from mtlrun.settings import LoggerSettings


class CsvOnly:
    """Writes nothing more: the run directory's CSVs are the record."""

    def log_epoch(self, epoch: int, train_row: dict, metric_rows: list[dict], diagnostic_rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard:
    """Mirrors each epoch's train losses, lr, seconds, metrics and diagnostics as TensorBoard scalars."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MtlrunError(
                "logger=tensorboard needs the tensorboard package: pip install tensorboard (or logger=csv)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_epoch(self, epoch: int, train_row: dict, metric_rows: list[dict], diagnostic_rows: list[dict]) -> None:
        for key, value in train_row.items():
            if key != "epoch":
                self.writer.add_scalar(f"train/{key}", value, epoch)
        for row in metric_rows:  # an evaluation every N iterations is logged at its iteration, as diagnostics
            step = row.get("iteration", epoch)
            self.writer.add_scalar(f"{row['split']}/{row['task']}/{row['metric']}", row["value"], step)
        for row in diagnostic_rows:
            for key, value in row.items():
                if key not in ("epoch", "iteration"):
                    self.writer.add_scalar(f"diagnostics/{key}", value, row["iteration"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_logger(cfg: LoggerSettings | DictConfig, run_dir: Path) -> CsvOnly | TensorBoard:
    settings = cfg if isinstance(cfg, LoggerSettings) else LoggerSettings.from_config(cfg)
    if settings.name == "tensorboard":
        return TensorBoard(run_dir / settings.subdir)
    return CsvOnly()
