"""The training loop of one run: build its parts, then for each epoch the strategy's iterations over the batches,
the evaluation, the save; at the end the results row."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from mtlrun.budgets import Budget
from mtlrun.loggers import Loggers, build_logger
from mtlrun.optim import lr_factor
from mtlrun.precision import run_dtype
from mtlrun.run import distributed
from mtlrun.run.run import Run
from mtlrun.run.rundir import RunDir
from mtlrun.settings import Settings, TrainerSettings
from mtlrun.train.build import Parts, build_diagnostics, build_run, pick_device, seed_everything, trainer_settings
from mtlrun.train.epoch import train_epoch
from mtlrun.train.evaluate import Evaluation, evaluation_due, last_evaluation, results_row, summary_table

log = logging.getLogger("mtlrun")


def train(cfg: DictConfig, directory: RunDir | Path) -> dict | None:
    """Train as `cfg` says in `directory` (held by the CLI: `rundir.hold`, or a path); return the results row, or
    None when stopped early on purpose (trainer.stop_after_epochs) and on every torchrun rank but 0: rank 0 alone
    evaluates and writes. A signal ends the run at the next iteration boundary with a checkpoint
    (StoppedBySignal); resume=true on a finished run raises RunFinished and changes nothing."""
    checked = Settings.from_config(cfg)  # once, before any file is written: every group's one-line error
    settings = trainer_settings(checked)
    with Run(cfg, directory, settings) as run, ExitStack() as cleanup:
        cleanup.enter_context(run_dtype(settings["dtype"]))
        seed_everything(checked.run.seed, settings["deterministic"])
        device = distributed.device(pick_device(checked.trainer.device))
        parts = build_run(cfg, device, settings["epochs"], settings["batch_size"], checked)
        cleanup.callback(parts.batches.close)  # however the run ends: its DataLoader workers end with it
        diagnostics = build_diagnostics(parts, settings)
        budget = Budget(checked.trainer, parts.ctx, parts.batches, run.history, run.progress)
        run.open(
            device, parts.batches.batches_per_pass, budget, model=parts.model, optimizer=parts.optimizer,
            strategy=parts.strategy, batches=parts.batches, augment=parts.augment, counts=parts.ctx.counts,
            diagnostics=diagnostics, loss_scaler=parts.precision.scaler,
        )
        evaluation = Evaluation(parts, settings["eval_batch_size"], settings["epochs"], budget)
        logger = build_logger(cfg, run.path, run.resumed, checked.logger) if run.main else Loggers({})
        epochs = settings["epochs"]
        log.info("training %d epoch(s) of %d iterations in %s", epochs, run.iterations_per_epoch, run.path)
        if budget.active:  # trainer.epochs is then the horizon of epoch-based schedules
            log.info("%s", budget.describe(epochs))
        for epoch in budget.epochs(run.start_epoch, epochs):
            if run.should_stop(epoch):
                logger.close()
                return None
            scheduled = budget.schedule_epoch(epoch, epochs)  # past trainer.epochs a budget holds the schedule
            parts.optimizer.lr = parts.optimizer.settings.lr * lr_factor(checked.scheduler, scheduled, epochs)
            parts.model.schedule(scheduled, epochs)  # an architecture's own schedule (LTB's temperature)
            boundary = partial(at_iteration_boundary, run, parts, evaluation, settings)
            row = train_epoch(
                parts.ctx, parts.strategy, run.progress, run.iterations_per_epoch, epoch, epochs,
                settings["progress"], device, diagnostics, boundary, run.first_losses,
            )
            run.epoch_trained({**row, **budget.epoch_columns(row["iterations"], run.iterations_per_epoch)})
            parts.strategy.epoch_end()
            end = budget.run_ends(epoch + 1, epochs, True)
            if not settings["eval_every_iterations"] and evaluation_due(settings, epoch + 1, end,
                                                                        bool(run.history.metrics)):
                run.history.metrics.extend(evaluation(epoch + 1))
            if note := parts.model.describe():
                log.info("epoch %d/%d: %s", epoch + 1, epochs, note)
            new_metrics = [r for r in run.history.metrics if r["epoch"] == epoch + 1]  # mid-epoch ones too
            new_diagnostics = [r for r in diagnostics.rows if r["epoch"] == epoch + 1] if diagnostics else []
            logger.log_epoch(epoch + 1, run.history.train_log[-1], new_metrics, new_diagnostics)
            run.end_of_epoch(end)
            if end:
                break
        return finish(cfg, checked.trainer, run, parts, device, logger) if run.main else None


def at_iteration_boundary(run: Run, parts: Parts, evaluation: Evaluation, settings: dict) -> bool:
    """After every iteration: the budget's check, an evaluation where trainer.eval_every_iterations sets the
    cadence, then the run's checkpoint and stop signals; True ends the epoch (a spent budget)."""
    run.budget.check()
    last = run.progress.iteration == run.iterations_per_epoch
    end = run.budget.run_ends(run.history.epoch + 1, settings["epochs"], last)
    done = parts.ctx.counts.iterations
    if settings["eval_every_iterations"] and evaluation_due(settings, done, end, bool(run.history.metrics)):
        run.history.metrics.extend(evaluation(run.history.epoch + 1, done))
        parts.model.train()  # evaluation left the model in eval mode, mid-epoch
    return run.at_iteration_boundary(done)


def finish(
    cfg: DictConfig, trainer: TrainerSettings, run: Run, parts: Parts, device: torch.device, logger: Loggers,
) -> dict:
    """Write the run's results row (rank 0), hand it to the loggers, and log the final metrics."""
    metrics = run.history.metrics
    results = results_row(
        cfg, trainer, run.path, run.config_id, parts.strategy, parts.data.tasks, run.history.train_log, metrics,
        parts.ctx.counts, device,
    )
    results.update(run.budget.result_columns())
    run.finish(results)
    logger.log_results(results)
    logger.close()
    final = last_evaluation(metrics)
    at = f", iteration {final[0]['iteration']}" if "iteration" in final[0] else ""
    log.info("final metrics (epoch %d%s):\n%s", final[0]["epoch"], at, summary_table(final))
    log.info("run directory: %s", run.path)
    return results
