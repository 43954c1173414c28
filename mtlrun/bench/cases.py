"""What the bench times: its cases (mtlrun's strategies and two hand-written PyTorch loops), each built as a run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError
from mtlrun.train.build import Parts, build_run, seed_everything

DEFAULT_METHODS = ("pcgrad", "cagrad", "nash_mtl", "famo")
HAND_AVERAGED, HAND_PER_TASK = "hand-written averaged", "hand-written per-task"


@dataclass
class Case:
    """One timed configuration of a workload: a strategy of mtlrun, or a hand-written loop."""

    label: str
    overrides: list[str]
    moments: str
    hand: str | None = None  # HAND_AVERAGED or HAND_PER_TASK: time that loop on the run's model and batches


def cases(methods: list[str], group_size: int) -> list[Case]:
    """The core strategies with both kinds of optimizer state, the chosen methods (one state: they step on all
    tasks at once, so per-task and shared state are the same single state), then the hand-written loops."""
    grouped = ["strategy=grouped", f"strategy.group_size={group_size}"]
    # Each hand-written loop right after the case it is compared with: a ratio of neighbours drifts least.
    return [
        Case("averaged", ["strategy=averaged"], "per_task"),
        Case(HAND_AVERAGED, ["strategy=averaged"], "shared", HAND_AVERAGED),
        Case("averaged", ["strategy=averaged"], "shared"),
        Case("alternating", ["strategy=alternating"], "per_task"),
        Case(HAND_PER_TASK, ["strategy=alternating", "strategy.order=fixed"], "per_task", HAND_PER_TASK),
        Case("alternating", ["strategy=alternating"], "shared"),
        Case(f"grouped k={group_size}", grouped, "per_task"),
        Case(f"grouped k={group_size}", grouped, "shared"),
        *(Case(name, [f"strategy={name}"], "per_task") for name in methods),
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class HandAveraged:
    """A plain PyTorch iteration on the run's model and batches: torch.optim.Adam on the mean of the task losses."""

    def __init__(self, run: Parts) -> None:
        self.run, self.names = run, list(run.ctx.task_names)
        self.optimizers = [_adam([p for p in run.model.parameters() if p.requires_grad], run)]

    def __call__(self) -> None:
        run, model, tasks = self.run, self.run.model, self.run.ctx.tasks
        batch = run.ctx.next_batch()
        with run.precision.autocast():
            outputs = model(batch["image"], self.names)
            penalties = model.penalties()
        losses = [tasks[t].loss(outputs[t].float(), batch[t]) for t in self.names]
        self.optimizers[0].zero_grad(set_to_none=True)
        # the architecture's penalties once, unweighted, as StepContext adds them
        (sum(losses) / len(self.names) + sum(penalties.values(), 0.0)).backward()
        self.optimizers[0].step()


class HandPerTask:
    """A plain PyTorch iteration of alternating steps: one torch.optim.Adam per task over the shared parameters
    and its own, one step per task on one batch, in the dataset's order."""

    def __init__(self, run: Parts) -> None:
        self.run, self.names = run, list(run.ctx.task_names)
        shared = run.model.shared_parameters()
        self.optimizers = [_adam(shared + run.model.task_parameters(t), run) for t in self.names]

    def __call__(self) -> None:
        run, model, tasks = self.run, self.run.model, self.run.ctx.tasks
        batch = run.ctx.next_batch()
        for t, optimizer in zip(self.names, self.optimizers):
            with run.precision.autocast():
                output = model(batch["image"], [t])[t]
                penalty = model.penalties().get(t, 0.0)
            optimizer.zero_grad(set_to_none=True)
            (tasks[t].loss(output.float(), batch[t]) + penalty).backward()
            optimizer.step()


HandLoop = HandAveraged | HandPerTask


def _adam(params: list[torch.nn.Parameter], run: Parts) -> torch.optim.Adam:
    s = run.optimizer.settings
    if s.name != "adam":
        raise MtlrunError(f"bench: the hand-written loops use torch.optim.Adam; optimizer={s.name} has no counterpart "
                          f"there: use optimizer=adam")
    return torch.optim.Adam(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)


def build_case(case: Case, overrides: list[str], device: torch.device) -> tuple[Parts, Callable[[], None]]:
    """The case's run, built from the seed as a training run is, and what one of its iterations is."""
    cfg = compose_config([*overrides, *case.overrides, f"optimizer.moments={case.moments}"])
    if cfg.trainer.compile:
        # Each case compiles its own graphs, as its own run would: graphs a previous case compiled (for a
        # backward pass that frees its buffers) would otherwise serve a method that backpropagates twice.
        torch._dynamo.reset()
    seed_everything(0, deterministic=False)
    run = build_run(cfg, device, epochs=1, batch_size=cfg.trainer.batch_size)
    run.model.train()
    if case.hand == HAND_AVERAGED:
        return run, HandAveraged(run)
    if case.hand == HAND_PER_TASK:
        return run, HandPerTask(run)
    return run, lambda: run.strategy.iteration(run.ctx)
