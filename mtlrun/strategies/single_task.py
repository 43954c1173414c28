"""Single-task training: the baseline that the multi-task measure Δm% is computed against."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import StepContext, Strategy


class SingleTask(Strategy):
    """Trains the same model on one task alone (`strategy.task`), one step per iteration.

    Guarantees: only that task's head is built and evaluated (`trains` restricts the run's tasks),
    so a run's results hold exactly one task's metrics. `-m strategy.task=a,b,c` gives the full
    single-task baseline in one sweep.
    """

    name = "single_task"
    group_size = 1

    def __init__(self, tasks: Sequence[str], task: str | None = None) -> None:
        if task not in tasks:
            raise MtlrunError(
                f"strategy.task={task!r} must name one task of the dataset: {', '.join(tasks)} "
                f"(all of them: mtlrun -m strategy=single_task strategy.task={','.join(tasks)})"
            )
        self.task = task

    def trains(self, tasks: Sequence[str]) -> list[str]:
        return [self.task]

    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        losses = ctx.losses(ctx.next_batch(), [self.task])
        ctx.step([self.task], losses[self.task])
        return {self.task: losses[self.task].detach()}
