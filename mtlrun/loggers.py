"""Loggers that mirror a run's CSVs (logger=tensorboard|wandb|mlflow, or a list); a failing one is dropped."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mtlrun.errors import MtlrunError
from mtlrun.scalars import Logger, epoch_scalars
from mtlrun.settings import LoggerSettings

log = logging.getLogger("mtlrun")


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
        for name, value, _, step in epoch_scalars(epoch, train_row, metric_rows, diagnostic_rows):
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_results(self, results: dict) -> None:
        pass  # TensorBoard has no place for a run's summary beside its scalars; results.csv holds it

    def close(self) -> None:
        self.writer.close()


class Loggers:
    """Several loggers as one. A logger whose call raises (disk full, server down) is named in one warning and
    dropped for the rest of the run; the loop, and the CSVs it writes, go on."""

    def __init__(self, loggers: dict[str, Logger]) -> None:
        self.loggers = dict(loggers)

    def _each(self, call: str, *args: object) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                getattr(logger, call)(*args)
            except Exception as e:  # a mirror's failure, whatever its kind, must not end the run
                del self.loggers[name]
                log.warning("logger=%s failed (%s: %s) and is dropped for the rest of this run; the run and its "
                            "CSVs go on", name, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                if call != "close":
                    _close_quietly(logger)

    def log_epoch(self, epoch: int, train_row: dict, metric_rows: list[dict], diagnostic_rows: list[dict]) -> None:
        self._each("log_epoch", epoch, train_row, metric_rows, diagnostic_rows)

    def log_results(self, results: dict) -> None:
        self._each("log_results", results)

    def close(self) -> None:
        self._each("close")


def _close_quietly(logger: Logger) -> None:
    try:
        logger.close()
    except Exception:  # already reported as failed once
        pass




def logger_names(cfg: DictConfig) -> list[str]:
    """The loggers chosen: the keys of `logger` (one per option of the group selected; none: csv alone)."""
    return list(_logger_settings(cfg).names)


def _logger_settings(cfg: DictConfig) -> LoggerSettings:
    chosen = cfg.get("logger")
    return LoggerSettings.from_config(chosen if isinstance(chosen, DictConfig) else None)


def build_logger(
    cfg: DictConfig, run_dir: Path, resumed: bool = False, chosen: LoggerSettings | None = None,
) -> Loggers:
    """Every logger the run's config chose, for rank 0 (`csv` adds none: the run directory's CSVs are the
    record). `resumed`: the run continues from its checkpoint, so trackers continue the tracker run whose id
    the run directory keeps. `chosen`: the run's checked `logger` group (left out: read from `cfg`); the
    trackers still get their own nodes and the whole `cfg`, open by design (mtlrun/trackers.py checks them)."""
    from mtlrun import trackers

    chosen = chosen or _logger_settings(cfg)
    loggers: dict[str, Logger] = {}
    for name in chosen.names:
        if name == "tensorboard" and chosen.tensorboard is not None:
            loggers[name] = TensorBoard(run_dir / chosen.tensorboard.subdir)
        elif name in ("wandb", "mlflow"):
            tracker = trackers.start(name, cfg.logger[name], cfg, run_dir, resumed)
            if tracker is not None:
                loggers[name] = tracker
    return Loggers(loggers)
