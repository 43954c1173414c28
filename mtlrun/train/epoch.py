"""One epoch of training: the strategy's iterations over the epoch's batches, the losses summed on the device, and
the epoch's row of train_log.csv; a diverging loss stops the run."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from mtlrun.diagnostics import Diagnostics
from mtlrun.errors import MtlrunError
from mtlrun.precision import SkippedStep
from mtlrun.run import distributed
from mtlrun.run.state import EpochProgress
from mtlrun.strategies import StepContext, Strategy

# A task's mean training loss this many times its first loss stops the run, as a non-finite one does.
LOSS_EXPLOSION_FACTOR = 1e6


def train_epoch(
    ctx: StepContext, strategy: Strategy, progress: EpochProgress, iterations: int, epoch: int, epochs: int,
    show_bar: bool, device: torch.device, diagnostics: Diagnostics | None = None,
    at_iteration_boundary: Callable[[], bool] | None = None, initial_losses: dict[str, float] | None = None,
) -> dict:
    """Run the epoch's `iterations` strategy iterations from where `progress` stands; return its row of
    train_log.csv. `at_iteration_boundary` is called after every iteration (checkpoints, stop signals) and ends
    the epoch early by returning True (a spent budget: the row then has fewer `iterations`);
    `initial_losses` (the run's first loss of each task, filled in by its first iteration) is what an
    exploding loss is judged by."""
    ctx.model.train()
    if progress.iteration == 0:
        progress.begin(ctx.counts, ctx.task_names, device)
    start = time.perf_counter()
    bar = tqdm(range(progress.iteration, iterations), initial=progress.iteration, total=iterations,
               desc=f"epoch {epoch + 1}/{epochs}", disable=not show_bar, leave=False, file=sys.stderr)
    for i in bar:
        _iteration(ctx, strategy, progress, epoch, diagnostics, initial_losses)
        if (i + 1) % 25 == 0:  # one device sync every 25 iterations, not every step
            means = _mean_losses(progress, i + 1)
            _check_finite(means, epoch, i)
            _check_explosion(means, initial_losses or {}, epoch, i)
            bar.set_postfix({t: f"{v:.3f}" for t, v in means.items()}, refresh=False)
        progress.iteration = i + 1
        progress.seconds += time.perf_counter() - start
        ends = at_iteration_boundary is not None and at_iteration_boundary()
        start = time.perf_counter()  # the boundary's evaluations and checkpoints are not training time
        if ends:
            break
    bar.close()
    done = progress.iteration
    means = _mean_losses(progress, done)
    _check_finite(means, epoch, done - 1)
    _check_explosion(means, initial_losses or {}, epoch, done - 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _epoch_row(ctx, progress, means, epoch, done, start)


def _iteration(
    ctx: StepContext, strategy: Strategy, progress: EpochProgress, epoch: int, diagnostics: Diagnostics | None,
    initial_losses: dict[str, float] | None,
) -> None:
    """One strategy iteration; its losses (and an architecture's penalty) are added to the epoch's sums."""
    if diagnostics is not None:
        diagnostics.before_iteration(ctx)
    try:
        losses = strategy.iteration(ctx)
    except SkippedStep:  # a strategy whose one step was skipped under fp16: nothing to log
        losses = {}
    for task, loss in losses.items():
        progress.loss_sums[task] += loss
    penalty = ctx.take_penalty()
    if penalty is not None:
        progress.penalty_sum = penalty if progress.penalty_sum is None else progress.penalty_sum + penalty
    if initial_losses is not None and not losses.keys() <= initial_losses.keys():
        initial_losses.update({t: float(v) for t, v in losses.items() if t not in initial_losses})
    ctx.counts.iterations += 1
    if diagnostics is not None:
        diagnostics.after_iteration(ctx, strategy, epoch)


def _mean_losses(progress: EpochProgress, iterations: int) -> dict[str, float]:
    """Each task's mean loss over the epoch's first `iterations` iterations (one device sync)."""
    sums = progress.loss_sums
    return {t: v / iterations for t, v in zip(sums, torch.stack(list(sums.values())).tolist())}


def _epoch_row(
    ctx: StepContext, progress: EpochProgress, means: dict[str, float], epoch: int, iterations: int, start: float
) -> dict:
    """The epoch's row of train_log.csv: learning rate, mean losses, the penalty, seconds and work counts."""
    before = progress.counts_at_start
    row = {"epoch": epoch + 1, "lr": ctx.optimizer.lr}
    row.update({f"loss/{t}": v for t, v in means.items()})
    if progress.penalty_sum is not None:  # the architecture's penalty, apart from the task losses
        penalty_sum = progress.penalty_sum
        if distributed.active():  # each rank's own batch share: the mean, as of the gradients
            penalty_sum = distributed.average([penalty_sum])[0]
        row["penalty"] = float(penalty_sum) / iterations
    row.update({
        "seconds": progress.seconds + time.perf_counter() - start,
        "iterations": ctx.counts.iterations - before["iterations"],
        "optimizer_steps": ctx.counts.optimizer_steps - before["optimizer_steps"],
        "forward_passes": ctx.counts.forward_passes - before["forward_passes"],
        "backward_passes": ctx.counts.backward_passes - before["backward_passes"],
        "skipped_steps": ctx.counts.skipped_steps - before.get("skipped_steps", 0),
    })
    return row


def _check_finite(mean_losses: dict[str, float], epoch: int, iteration: int) -> None:
    bad = {t: v for t, v in mean_losses.items() if not np.isfinite(v)}
    if bad:
        task, value = next(iter(bad.items()))
        raise MtlrunError(
            f"the loss of task '{task}' became {value} in epoch {epoch + 1} (by iteration {iteration + 1}): "
            f"training diverged; lower optimizer.lr (or change strategy); files of finished epochs are kept"
        )


def _check_explosion(mean_losses: dict[str, float], initial_losses: dict[str, float], epoch: int, iteration: int) -> None:
    """Stop as for a NaN when a task's mean loss exceeds LOSS_EXPLOSION_FACTOR times its first loss: no sound run
    grows a loss a million-fold, while a diverging one can stay finite for many epochs."""
    for task, value in mean_losses.items():
        first = initial_losses.get(task, 0.0)
        if first > 0 and value > LOSS_EXPLOSION_FACTOR * first:
            raise MtlrunError(
                f"the loss of task '{task}' grew from {first:.4g} to {value:.4g} (over {LOSS_EXPLOSION_FACTOR:.0e} "
                f"times) by iteration {iteration + 1} of epoch {epoch + 1}: training diverged; lower optimizer.lr "
                f"(or change strategy); files of finished epochs are kept"
            )
