"""The training loop: build the run from the composed config, iterate, evaluate, and write the run's files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from mtlrun import budgets, distributed
from mtlrun.data import MultiTaskData, open_dataset, task_names
from mtlrun.data.augment import Augment
from mtlrun.data.loading import BatchStream, Split, SplitSource, ToDevice, eval_batches, on_device
from mtlrun.diagnostics import Diagnostics
from mtlrun.errors import MtlrunError, RunFinished, StoppedBySignal
from mtlrun.identity import different_configuration
from mtlrun.loggers import Loggers, build_logger
from mtlrun.models import build_model, check_model
from mtlrun.models.base import MultiTaskModel
from mtlrun.optim import MultiTaskOptimizer, OptimizerSettings, lr_factor
from mtlrun.outputs import RunDir
from mtlrun.precision import Precision, SkippedStep, full, run_dtype
from mtlrun.rundirs import resume_hint
from mtlrun.settings import IDENTITY_IGNORES, AugmentSettings, DatasetSettings, RunSettings, TrainerSettings
from mtlrun.strategies import StepContext, Strategy, build_strategy
from mtlrun.strategies.base import Counts
from mtlrun.tasks import JOINT_METRICS, Task, map_groups

log = logging.getLogger("mtlrun")

RUN_CONTROL_KEYS = IDENTITY_IGNORES  # what config_id and resume_id leave out (mtlrun.settings says why)
# A task's mean training loss this many times its first loss stops the run, as a non-finite one does.
LOSS_EXPLOSION_FACTOR = 1e6


@dataclass
class Run:
    """The objects one run trains with, built from the composed config."""

    data: MultiTaskData
    model: MultiTaskModel
    optimizer: MultiTaskOptimizer
    strategy: Strategy
    batches: BatchStream
    to_device: ToDevice  # for evaluation and diagnostics: no augmentation
    augment: Augment | None
    ctx: StepContext
    precision: Precision


class Stateful(Protocol):
    """What a part of a run that a checkpoint holds provides (as torch's modules and optimizers do)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RunState:
    """Everything a run must save and restore: each part registers once by name; a checkpoint holds every
    part's `state_dict()` under its name, and resuming loads each one back from the same list."""

    def __init__(self) -> None:
        self.parts: dict[str, Stateful] = {}

    def register(self, name: str, part: Stateful | None) -> None:
        """Add `part` under `name`; None (a part this run does not have, e.g. no augmentation) is skipped."""
        if name in self.parts:
            raise ValueError(f"a run state part named {name!r} is registered already")
        if part is not None:
            self.parts[name] = part

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict, source: Path) -> None:
        missing = [name for name in self.parts if name not in state]
        if missing:
            raise MtlrunError(
                f"{source} holds no state for {', '.join(missing)}: it was written by another version of "
                f"mtlrun; restart the run with overwrite=true"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


@dataclass
class History:
    """What the run has written so far: epochs finished and the rows of train_log.csv and metrics.csv."""

    epoch: int = 0
    train_log: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "train_log": self.train_log, "metrics": self.metrics}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.train_log, self.metrics = state["epoch"], state["train_log"], state["metrics"]


class CountsState:
    """The step context's work counts as a part of the run state."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def state_dict(self) -> dict:
        return asdict(self.ctx.counts)

    def load_state_dict(self, state: dict) -> None:
        self.ctx.counts = Counts(**state)


class RandomState:
    """The global torch generator (and the device's, on CUDA): dropout and any other unseeded draw."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if self.device.type == "cuda" and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)


class EpochProgress:
    """How far the current epoch has got: iterations done, the losses summed so far, the work counts and
    seconds at its start. Saved with the run state, so an epoch stopped at an iteration boundary resumes
    where it stopped and its train_log row is the one an uninterrupted epoch writes."""

    def __init__(self) -> None:
        self.iteration = 0
        self.loss_sums: dict[str, Tensor] = {}
        self.penalty_sum: Tensor | None = None  # the architecture's penalties added to the steps (None: none)
        self.counts_at_start: dict[str, int] = {}
        self.seconds = 0.0

    def begin(self, counts: Counts, tasks: tuple[str, ...], device: torch.device) -> None:
        self.iteration, self.seconds = 0, 0.0
        self.loss_sums = {t: torch.zeros((), device=device) for t in tasks}
        self.penalty_sum = None
        self.counts_at_start = asdict(counts)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "loss_sums": self.loss_sums, "counts_at_start": self.counts_at_start,
                "seconds": self.seconds, "penalty_sum": self.penalty_sum}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.loss_sums = state["iteration"], state["loss_sums"]
        self.counts_at_start, self.seconds = state["counts_at_start"], state["seconds"]
        self.penalty_sum = state.get("penalty_sum")


class StopSignals:
    """SIGTERM and SIGUSR1 (what SLURM and most schedulers send before they stop or preempt a job) and SIGUSR2
    (submitit's signal before a timeout or preemption) ask the run to stop: the handler only records the
    signal; the loop writes a checkpoint at the next iteration boundary and ends. Handlers are installed for
    the duration of the `with` block, from the main thread only (Python allows no other), and the previous
    ones are put back after it (submitit's, which then requeues the job: hydra_plugins/mtlrun_launchers)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def build_run(cfg: DictConfig, device: torch.device, epochs: int, batch_size: int) -> Run:
    """Dataset, model, optimizer, strategy and batch stream; settings are checked before the data is opened."""
    strategy = build_strategy(cfg.strategy, task_names(cfg.dataset), cfg.seed)
    names = strategy.trains(task_names(cfg.dataset))
    optimizer_settings = OptimizerSettings.from_config(cfg.optimizer)
    lr_factor(cfg.scheduler, 0, epochs)
    check_model(cfg.model)
    trainer = TrainerSettings.from_config(cfg.trainer)
    precision = Precision(trainer.precision, device.type)
    channels_last, compile_ = trainer.channels_last, trainer.compile
    data = open_dataset(cfg.dataset, names)
    data.splits = on_device(data.splits, device, DatasetSettings.from_config(cfg.dataset).in_memory)
    with run_dtype("float32"):  # a float64 run (trainer.dtype) starts from the float32 run's initial weights
        model = build_model(cfg.model, data.tasks)
    model = model.to(device, torch.get_default_dtype())
    distributed.synchronise_batch_norm(model)  # under torchrun: statistics of the global batch, as one process
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    strategy.attach(model)  # before compiling: the strategy's hooks are part of the graphs
    if compile_:
        compile_model(model, _compile_backend(trainer.compile_backend))
    optimizer = MultiTaskOptimizer(
        model.shared_parameters(), {t: model.task_parameters(t) for t in names}, optimizer_settings
    )
    workers = trainer.workers
    train_split = data.splits["train"]
    if isinstance(train_split, Split) and train_split.images.device.type != "cpu":
        workers = 0  # already on the GPU: nothing to read ahead
    shard = distributed.shard(batch_size) if distributed.size() > 1 else None
    batches = BatchStream(data.splits["train"], batch_size, cfg.seed, workers, shard)
    if batches.batches_per_pass == 0:
        raise MtlrunError(f"trainer.batch_size={batch_size} exceeds the {len(data.splits['train'])} training samples")
    augment = _augment(cfg.dataset, data, cfg.seed)
    if augment is not None and shard is not None:
        augment.shard = (shard, distributed.size())
    to_device = ToDevice(device, data.mean, data.std, augment, channels_last)
    ctx = StepContext(model, data.tasks, optimizer, batches, to_device, precision)
    evaluation_to_device = ToDevice(device, data.mean, data.std, channels_last=channels_last)
    return Run(data, model, optimizer, strategy, batches, evaluation_to_device, augment, ctx, precision)


def _compile_backend(backend: str) -> str:
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise MtlrunError(f"trainer.compile_backend={backend!r} is not a torch.compile backend; known: {', '.join(known)}")
    return backend


def compile_model(model: MultiTaskModel, backend: str = "inductor") -> None:
    """torch.compile the encoder, every task part (an architecture's attention masks, gates, own experts) and
    every head apart, in place (parameter names unchanged): a step on any subset of the tasks runs graphs
    compiled once, never a new graph per subset."""
    model.encoder.compile(backend=backend)
    for module in [*model.task_parts.values(), *model.heads.values()]:
        module.compile(backend=backend)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (recompilations included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _augment(cfg: DictConfig, data: MultiTaskData, seed: int) -> Augment | None:
    """The dataset's training augmentation (`dataset.augment`), or None when it changes nothing."""
    settings = AugmentSettings.of(cfg.get("augment"))
    augment = Augment(data.tasks, settings.scales, settings.flip, seed)
    return augment if augment.active else None


def train(cfg: DictConfig, run_dir: Path | RunDir) -> dict | None:
    """Train as `cfg` says in `run_dir` (a path, or a RunDir the caller holds); return the results row, or None
    when stopped early on purpose (and on every torchrun rank but 0: rank 0 alone evaluates and writes).

    SIGTERM, SIGUSR1 or SIGUSR2 ends the run at the next iteration boundary with a checkpoint
    (StoppedBySignal); resume=true on a finished run raises RunFinished and changes nothing."""
    with StopSignals() as stop, ExitStack() as cleanup:
        return _train(cfg, run_dir, stop, cleanup)


def _train(cfg: DictConfig, run_dir: Path | RunDir, stop: StopSignals, cleanup: ExitStack) -> dict | None:
    settings = _trainer_settings(cfg)
    cleanup.enter_context(run_dtype(settings["dtype"]))
    seed_everything(cfg.seed, settings["deterministic"])
    device = distributed.device(pick_device(cfg.trainer.device))
    parts = build_run(cfg, device, settings["epochs"], settings["batch_size"])
    data, model, optimizer, strategy, batches, ctx = (
        parts.data, parts.model, parts.optimizer, parts.strategy, parts.batches, parts.ctx
    )
    cleanup.callback(batches.close)  # however the run ends: its DataLoader workers end with it
    diagnostics = None
    if settings["diagnostics"]:
        train = data.splits["train"]
        probe = parts.to_device(train.batch(torch.arange(min(settings["batch_size"], len(train)))))
        diagnostics = Diagnostics(ctx, probe, settings["diagnostics_every"])
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_dir = run.path
    unbudgeted = budgets.identity_ignores(cfg.trainer)
    # runs differing only by seed share the config id
    config_id = config_hash(cfg, ignore=("seed", *RUN_CONTROL_KEYS, *unbudgeted))
    resume_id = config_hash(cfg, ignore=(*RUN_CONTROL_KEYS, *unbudgeted))
    history, progress, first_losses = History(), EpochProgress(), FirstLosses()
    budget = budgets.Budget(cfg.trainer, ctx, batches, history, progress)
    state = RunState()
    state.register("model", model)
    state.register("optimizer", optimizer)
    state.register("strategy", strategy)
    state.register("batches", batches)
    state.register("augment", parts.augment)
    state.register("counts", CountsState(ctx))
    state.register("rng", RandomState(device))
    state.register("diagnostics", diagnostics)
    state.register("history", history)
    state.register("first_losses", first_losses)
    state.register("epoch_progress", progress)
    state.register("loss_scaler", parts.precision.scaler)

    def save() -> None:
        if not distributed.is_main():  # every rank holds the same state: rank 0 writes it
            return
        diagnostic_rows = diagnostics.rows if diagnostics is not None else []
        snapshot = {
            "resume_id": resume_id, "config": OmegaConf.to_container(cfg, resolve=True), **state.state_dict(),
        }
        run.save(history.train_log, history.metrics, diagnostic_rows, snapshot, strategy.records())

    def evaluate_now(epoch: int, iteration: int | None) -> list[dict]:
        """Rows of metrics.csv for val and test now (`iteration`: the run's iterations so far, where the
        cadence is in iterations); rank 0 evaluates the whole splits, exactly as one process."""
        rows: list[dict] = []
        if distributed.is_main():
            for split in ("val", "test"):
                if split in data.splits:
                    scores = evaluate(
                        model, data.tasks, data.splits[split], parts.to_device, settings["eval_batch_size"],
                        parts.precision,
                    )
                    rows += metric_rows(scores, data.tasks, epoch, split, iteration)
            rows = [{**row, **budget.spent().columns()} for row in rows]
            history.metrics.extend(rows)
            at = f", iteration {iteration}" if iteration is not None else ""
            log.info("epoch %d/%d%s: %s", epoch, settings["epochs"], at, _brief(rows))
        return rows

    def at_iteration_boundary() -> bool:
        """Evaluations and checkpoints due now, and a stop signal; True: the budget is spent, end the epoch."""
        every = settings["checkpoint_every"]
        last = progress.iteration == batches.batches_per_pass
        budget.check()
        end = budget.run_ends(history.epoch + 1, settings["epochs"], last)
        done = ctx.counts.iterations
        if settings["eval_every_iterations"] and evaluation_due(settings, done, end, bool(history.metrics)):
            evaluate_now(history.epoch + 1, done)
            model.train()  # evaluation left the model in eval mode, mid-epoch
        if budget.reached:  # the epoch's end saves; a stop signal waits the few seconds to the results
            return True
        due = every is not None and ctx.counts.iterations % every == 0 and not last
        stop.received = distributed.agreed_signal(stop.received)  # every rank stops at the same iteration
        if stop.received is not None or due:  # an epoch's last iteration is saved with the epoch
            save()
        if stop.received is not None:
            iterations = batches.batches_per_pass
            raise StoppedBySignal(stop.received, run_dir, history.epoch, progress.iteration, iterations)
        return False

    def open_run() -> str:
        """Resume from the checkpoint, or claim the directory for a new run: "resumed", "new", or "finished"
        (a resume of a finished run: nothing to do, and no file is touched)."""
        if cfg.resume and run.checkpoint.exists():
            checkpoint = run.load_checkpoint(device)
            if checkpoint["resume_id"] != resume_id:
                raise MtlrunError(different_configuration(run.checkpoint, checkpoint, cfg, RUN_CONTROL_KEYS))
            state.load_state_dict(checkpoint, run.checkpoint)
            if budget.finished(history.epoch, settings["epochs"]) and run.finished:
                return "finished"
            where = f" at iteration {progress.iteration}" if progress.iteration else ""
            log.info("resuming %s after epoch %d%s", run_dir, history.epoch, where)
            opened = "resumed"
        else:
            run.claim(overwrite=cfg.overwrite, resume=cfg.resume)
            opened = "new"
        run.accept()
        return opened

    # Under torchrun rank 0 decides and writes; the others load the checkpoint it resumed from (it writes the next
    # one only after an iteration, which waits for them).
    opened = distributed.from_rank0(open_run)
    if opened == "finished":
        raise RunFinished(
            f"{run_dir} holds a finished run (epoch {settings['epochs']} of {settings['epochs']}, "
            f"results.csv): nothing to do, no file changed; to train it again give overwrite=true instead of "
            f"resume=true"
        )
    if opened == "resumed" and not distributed.is_main():
        state.load_state_dict(run.load_checkpoint(device), run.checkpoint)

    logger = build_logger(cfg, run_dir, resumed=opened == "resumed") if distributed.is_main() else Loggers({})
    epochs, stop_after, start_epoch = settings["epochs"], settings["stop_after_epochs"], history.epoch
    train_log, metrics = history.train_log, history.metrics
    log.info("training %d epoch(s) of %d iterations in %s", epochs, batches.batches_per_pass, run_dir)
    if budget.active:
        log.info("%s", budget.describe(epochs))
    for epoch in budget.epochs(start_epoch, epochs):
        if stop_after is not None and epoch - start_epoch >= stop_after:
            log.info("stopped after %d epoch(s) as asked; continue with resume=true %s", stop_after,
                     resume_hint("hydra.run.dir", run_dir))
            logger.close()
            return None
        scheduled = budget.schedule_epoch(epoch, epochs)
        optimizer.lr = optimizer.settings.lr * lr_factor(cfg.scheduler, scheduled, epochs)
        model.schedule(scheduled, epochs)  # an architecture's own schedule (LTB's temperature)
        row = train_epoch(
            ctx, strategy, progress, batches.batches_per_pass, epoch, epochs, settings["progress"], device,
            diagnostics, at_iteration_boundary, first_losses,
        )
        progress.iteration = 0
        row.update(budget.epoch_columns(row["iterations"], batches.batches_per_pass))
        train_log.append(row)
        strategy.epoch_end()
        end = budget.run_ends(epoch + 1, epochs, True)
        if not settings["eval_every_iterations"] and evaluation_due(settings, epoch + 1, end, bool(metrics)):
            evaluate_now(epoch + 1, None)
        new_metrics = [r for r in metrics if r["epoch"] == epoch + 1]  # this epoch's, mid-epoch ones too
        if note := model.describe():
            log.info("epoch %d/%d: %s", epoch + 1, epochs, note)
        history.epoch = epoch + 1
        diagnostic_rows = diagnostics.rows if diagnostics is not None else []
        logger.log_epoch(epoch + 1, row, new_metrics, [r for r in diagnostic_rows if r["epoch"] == epoch + 1])
        save()
        stop.received = distributed.agreed_signal(stop.received)
        if stop.received is not None and not end:
            raise StoppedBySignal(stop.received, run_dir, history.epoch, 0, batches.batches_per_pass)
        if end:
            break
    if not distributed.is_main():
        return None

    results = results_row(cfg, run_dir, config_id, strategy, data.tasks, train_log, metrics, ctx.counts, device)
    results.update(budget.result_columns())
    run.write_results(results)
    logger.log_results(results)
    logger.close()
    final = last_evaluation(metrics)
    at = f", iteration {final[0]['iteration']}" if "iteration" in final[0] else ""
    log.info("final metrics (epoch %d%s):\n%s", final[0]["epoch"], at, summary_table(final))
    log.info("run directory: %s", run_dir)
    return results


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
    loss_sums = progress.loss_sums
    start = time.perf_counter()
    bar = tqdm(range(progress.iteration, iterations), initial=progress.iteration, total=iterations,
               desc=f"epoch {epoch + 1}/{epochs}", disable=not show_bar, leave=False, file=sys.stderr)
    for i in bar:
        if diagnostics is not None:
            diagnostics.before_iteration(ctx)
        try:
            losses = strategy.iteration(ctx)
        except SkippedStep:  # a strategy whose one step was skipped under fp16: nothing to log
            losses = {}
        for task, loss in losses.items():
            loss_sums[task] += loss
        penalty = ctx.take_penalty()
        if penalty is not None:
            progress.penalty_sum = penalty if progress.penalty_sum is None else progress.penalty_sum + penalty
        if initial_losses is not None and not losses.keys() <= initial_losses.keys():
            initial_losses.update({t: float(v) for t, v in losses.items() if t not in initial_losses})
        ctx.counts.iterations += 1
        if diagnostics is not None:
            diagnostics.after_iteration(ctx, strategy, epoch)
        if (i + 1) % 25 == 0:  # one device sync every 25 iterations, not every step
            means = {t: v / (i + 1) for t, v in zip(loss_sums, torch.stack(list(loss_sums.values())).tolist())}
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
    means = {t: v / done for t, v in zip(loss_sums, torch.stack(list(loss_sums.values())).tolist())}
    _check_finite(means, epoch, done - 1)
    _check_explosion(means, initial_losses or {}, epoch, done - 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    before = progress.counts_at_start
    row = {"epoch": epoch + 1, "lr": ctx.optimizer.lr}
    row.update({f"loss/{t}": v for t, v in means.items()})
    if progress.penalty_sum is not None:  # the architecture's penalty, apart from the task losses
        penalty_sum = progress.penalty_sum
        if distributed.active():  # each rank's own batch share: the mean, as of the gradients
            penalty_sum = distributed.average([penalty_sum])[0]
        row["penalty"] = float(penalty_sum) / done
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


LOSS = "loss"  # the metric name of a task's evaluated loss: never in Δm%, lower is better


class FirstLosses(dict):
    """Each task's loss at the run's first iteration (task -> value), the yardstick of an exploding loss; kept in
    the checkpoint, so a resumed run judges by the same values."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        self.update(state)


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


@torch.no_grad()
def evaluate(
    model: MultiTaskModel, tasks: list[Task], split: SplitSource, to_device: ToDevice, batch_size: int,
    precision: Precision | None = None,
) -> dict:
    """Every task's metrics over the whole split, and its training loss (the mean of the per-batch losses,
    weighted by batch size; model selection reads it): {task: {metric: value, "loss": value}}; and, under the
    name of each segmentation task cut into per-class tasks, their maps' metrics together (`map_groups`)."""
    model.eval()
    names = [t.name for t in tasks]
    meters = {t.name: t.meter() for t in tasks}
    groups = map_groups(tasks)
    members = {g: [t.name for t in tasks if getattr(t, "group", None) == g] for g in groups}
    joint = {g: task.meter() for g, task in groups.items()}
    loss_sums: dict[str, Tensor | float] = dict.fromkeys(names, 0.0)  # summed on the device, read once
    samples = 0
    for raw in eval_batches(split, batch_size):
        batch = to_device(raw)
        with (precision or Precision()).autocast():
            outputs = model(batch["image"], names)
        outputs = {name: full(out) for name, out in outputs.items()}
        count = len(batch["image"])
        samples += count
        for task in tasks:
            meters[task.name].update(outputs[task.name], batch[task.name])
            loss_sums[task.name] += task.loss(outputs[task.name], batch[task.name]).double() * count
        for group, meter in joint.items():  # the sibling maps' labels are one label map
            meter.update(torch.cat([outputs[t] for t in members[group]], dim=1), batch[members[group][0]])
    scores = {
        name: {**meter.compute(), LOSS: float(loss_sums[name]) / max(samples, 1)} for name, meter in meters.items()
    }
    for group, meter in joint.items():
        scores[group] = {m: v for m, v in meter.compute().items() if m in JOINT_METRICS}
    return scores


def metric_rows(
    scores: dict, tasks: list[Task], epoch: int, split: str, iteration: int | None = None
) -> list[dict]:
    """Tidy rows for metrics.csv; each carries its metric's direction, so reports never guess it. `epoch` is
    the epoch evaluated in or after; `iteration` (the run's iterations so far) names an evaluation where the
    cadence is in iterations (`trainer.eval_every_iterations`), and only then is a column."""
    defined = {(t.name, m.name): (m.higher_is_better, m.in_delta_m) for t in tasks for m in t.metrics}
    defined.update({(t.name, LOSS): (False, False) for t in tasks})
    defined.update({(g, m.name): (m.higher_is_better, False) for g, task in map_groups(tasks).items()
                    for m in task.metrics})
    at = {"epoch": epoch} if iteration is None else {"epoch": epoch, "iteration": iteration}
    return [
        {**at, "split": split, "task": task, "metric": metric, "value": value,
         "higher_is_better": defined[task, metric][0], "in_delta_m": defined[task, metric][1]}
        for task, values in scores.items()
        for metric, value in values.items()
    ]


def evaluation_due(settings: dict, count: int, end: bool, evaluated_before: bool) -> bool:
    """Whether to evaluate after `count` epochs, or iterations where `trainer.eval_every_iterations` sets the
    cadence; at the end of training (`end`) also when `trainer.eval_at_end` asks, or nothing was evaluated yet
    (a run always reports metrics)."""
    every = settings["eval_every_iterations"] or settings["eval_every"]
    return count % every == 0 or (end and (settings["eval_at_end"] or not evaluated_before))


def last_evaluation(metrics: list[dict]) -> list[dict]:
    """The rows of the run's last evaluation (by epoch, then by iteration where rows carry one)."""
    def when(row: dict) -> tuple[int, int]:
        return row["epoch"], row.get("iteration") or 0

    last = max(when(r) for r in metrics)
    return [r for r in metrics if when(r) == last]


def results_row(
    cfg: DictConfig, run_dir: Path, config_id: str, strategy: Strategy, tasks: list[Task], train_log: list[dict],
    metrics: list[dict], counts: Counts, device: torch.device,
) -> dict:
    """The run as one row: its configuration, final metrics and costs; rows of many runs concatenate."""
    trainer = TrainerSettings.from_config(cfg.trainer)
    row: dict = {
        "dataset": cfg.dataset.name, "model": cfg.model.name, "strategy": cfg.strategy.name,
        "group_size": strategy.group_size, "num_tasks": len(tasks), "tasks": " ".join(t.name for t in tasks), "optimizer": cfg.optimizer.name,
        "moments": cfg.optimizer.moments, "lr": cfg.optimizer.lr, "scheduler": cfg.scheduler.name,
        "epochs": cfg.trainer.epochs, "batch_size": cfg.trainer.batch_size, "seed": cfg.seed,
    }
    if "backbone" in cfg.model:  # an architecture over a chosen backbone
        row["backbone"] = cfg.model.backbone.name
    for key, value in OmegaConf.to_container(cfg.strategy, resolve=True).items():
        if key != "name":
            row[f"strategy.{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
    for r in last_evaluation(metrics):
        row[f"{r['split']}/{r['task']}/{r['metric']}"] = r["value"]
    row.update({
        "iterations": counts.iterations,
        "optimizer_steps": counts.optimizer_steps,
        "steps_per_iteration": counts.optimizer_steps / max(counts.iterations, 1),
        "passes_per_iteration": counts.forward_passes / max(counts.iterations, 1),
        "backward_passes_per_iteration": counts.backward_passes / max(counts.iterations, 1),
        "seconds_per_epoch": float(np.mean([r["seconds"] for r in train_log])),
        "peak_memory_mb": peak_memory_mb(device),
        "precision": trainer.precision,
        "dtype": trainer.dtype,
        "skipped_steps": counts.skipped_steps,
        "compiled_graphs": compiled_graphs() if trainer.compile else 0,
        "device": str(device),
        "config_id": config_id,
        "run_dir": str(run_dir),
    })
    return row


def summary_table(rows: list[dict]) -> str:
    """One evaluation's rows as a task x metric table, a column per split."""
    final = pd.DataFrame(rows)
    table = final.pivot_table(index=["task", "metric"], columns="split", values="value", sort=False)
    return table.to_string(float_format=lambda v: f"{v:.4f}")


def _brief(rows: list[dict]) -> str:
    """The first metric of each task on the last split of one evaluation's rows, for its log line."""
    split = rows[-1]["split"]
    seen: dict[str, str] = {}
    for r in rows:
        if r["split"] == split and r["task"] not in seen:
            seen[r["task"]] = f"{r['task']} {r['metric']} {r['value']:.4f}"
    return f"{split}: " + ", ".join(seen.values())


def config_hash(cfg: DictConfig, ignore: tuple[str, ...]) -> str:
    """A short hash of the resolved config without the `ignore` keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ignore:
        node = container
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha1(json.dumps(container, sort_keys=True).encode()).hexdigest()[:12]


def _trainer_settings(cfg: DictConfig) -> dict:
    """The top-level and trainer settings the loop reads, checked by their declarations (mtlrun.settings)."""
    run, trainer = RunSettings.from_config(cfg), TrainerSettings.from_config(cfg.trainer)
    distributed.check_batch_size(trainer.batch_size)
    progress = sys.stderr.isatty() if trainer.progress == "auto" else bool(trainer.progress)
    return {**asdict(run), **asdict(trainer), "progress": progress}


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some ops the models need have no deterministic kernel (max_unpool2d on the CPU,
        # interpolate's and adaptive pooling's backward on CUDA); they warn instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MtlrunError(f"trainer.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MtlrunError("trainer.device asks for CUDA but this PyTorch sees no GPU: use trainer.device=auto or cpu")
    return device


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
