"""What a strategy must provide (Strategy, LossCombiner) and the step helpers several strategies share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.precision import SkippedStep
from mtlrun.strategies.context import Counts, StepContext

# Counts and StepContext live in context.py; the loop and tests still import them from here
__all__ = [
    "REDUCTIONS", "Counts", "LossCombiner", "SeededStrategy", "StepContext", "Strategy", "check_reduction",
    "mean_step", "step_on_groups", "weighted_mean",
]


class Strategy(ABC):
    """How one iteration turns task losses into parameter updates; the training loop knows nothing else."""

    name: str
    group_size: int | None  # tasks per optimizer step, for reports; None where it varies (learned groups)

    @abstractmethod
    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        """Run one iteration; return each task's (detached) loss for logging."""

    def attach(self, model: MultiTaskModel) -> None:
        """Called once the run's model is built, before a resume loads this strategy's state: a strategy that
        changes the model's forward pass (Maximum Roaming's channel masks) installs itself here."""

    def trains(self, tasks: Sequence[str]) -> list[str]:
        """The tasks this strategy trains, of the dataset's `tasks`; the run builds and evaluates only these."""
        return list(tasks)

    def task_weights(self) -> dict[str, float] | None:
        """The weights the strategy currently gives the tasks, for diagnostics; None when it has none."""
        return None

    def epoch_end(self) -> None:
        """Called by the loop after every training epoch (methods that weight tasks by epoch history)."""

    def records(self) -> list[dict]:
        """Rows of the strategy's own log (`strategy_log.csv`), e.g. the task partitions it drew; [] = none."""
        return []

    def task_affinity(self) -> dict[str, float] | None:
        """The inter-task affinity the strategy keeps, `{"<s>/<t>": value}`, for diagnostics; None if none."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossCombiner(Strategy):
    """A method turning the losses of a set of tasks into one update: a loss weighting or a gradient manipulation.

    As a strategy it takes one step per iteration on every task, from one forward pass; `grouped`
    applies it inside each group of its partition, so `combine` must accept any subset of the tasks
    (in the dataset's order) and keep any state per task.
    """

    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        losses = ctx.losses(ctx.next_batch(), ctx.task_names)
        try:
            self.combine(ctx, losses)
        except SkippedStep:  # fp16: the step was skipped whole; the losses are still logged
            pass
        return {t: loss.detach() for t, loss in losses.items()}

    @abstractmethod
    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        """Take exactly one optimizer step (`ctx.step` or `ctx.apply`) on the tasks in `losses`."""


REDUCTIONS = ("mean", "sum")  # how a step's losses are combined: divided by the sum of weights, or not


def weighted_mean(
    losses: dict[str, Tensor], order: Sequence[str], weights: dict[str, float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Sum of w_t * L_t over `losses`, divided by the sum of weights (`reduction=sum`: not divided), always
    in the dataset's task order.

    Summing in a fixed order makes a group holding every task bit-identical to the averaged loss.
    """
    names = [t for t in order if t in losses]
    w = {t: 1.0 for t in names} if weights is None else weights
    total = sum(w[t] * losses[t] for t in names)
    return total if reduction == "sum" else total / sum(w[t] for t in names)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise MtlrunError(f"strategy.reduction={reduction!r} is invalid; valid: {', '.join(REDUCTIONS)}")


def mean_step(ctx: StepContext, losses: dict[str, Tensor], reduction: str = "mean") -> None:
    """One step on the plain mean (or sum) of `losses`: how a group is combined unless a method is given."""
    ctx.step(list(losses), weighted_mean(losses, ctx.task_names, reduction=reduction))


def step_on_groups(
    ctx: StepContext, groups: Sequence[Sequence[str]], fresh_batches: bool,
    combine: Callable[[StepContext, dict[str, Tensor]], None] = mean_step,
) -> dict[str, Tensor]:
    """One optimizer step per group, made by `combine` from the group's losses; groups share one batch
    unless `fresh_batches`."""
    logged: dict[str, Tensor] = {}
    batch = None
    for group in groups:
        if batch is None or fresh_batches:
            batch = ctx.next_batch()
        ordered = [t for t in ctx.task_names if t in group]
        losses = ctx.losses(batch, ordered)
        try:
            combine(ctx, losses)
        except SkippedStep:  # this group's step only: the iteration's other steps go on
            pass
        logged.update({t: loss.detach() for t, loss in losses.items()})
    return logged


class SeededStrategy(Strategy):
    """A strategy drawing its random choices from its own generator, saved in checkpoints."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint loaded onto a GPU holds CUDA tensors
        self.generator.set_state(state["generator"].cpu())
