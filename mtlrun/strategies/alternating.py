"""Alternating independent steps: one optimizer step per task and iteration, on that task's loss alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import SeededStrategy, StepContext, step_on_groups


class Alternating(SeededStrategy):
    """T steps per iteration, task t's step using only grad L_t (Pascal et al., arXiv 2109.11678).

    Guarantees: each task steps exactly once per iteration, in an order reshuffled every iteration
    (`order=random`) or the dataset's order (`order=fixed`); all steps use the same batch
    (`batch=same`) or each draws the next one (`batch=fresh`); each head moves only on its own step
    (with `optimizer.idle_params=step` and shared moments, on every step: PyTorch 1.2's zero_grad).
    """

    name = "alternating"
    group_size = 1

    def __init__(self, tasks: Sequence[str], seed: int, order: str = "random", batch: str = "same") -> None:
        super().__init__(seed)
        if order not in ("random", "fixed"):
            raise MtlrunError(f"strategy.order={order!r} is invalid; valid: random, fixed")
        if batch not in ("same", "fresh"):
            raise MtlrunError(f"strategy.batch={batch!r} is invalid; valid: same, fresh")
        self.tasks, self.order, self.fresh_batches = list(tasks), order, batch == "fresh"

    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        if self.order == "random":
            sequence = [self.tasks[i] for i in torch.randperm(len(self.tasks), generator=self.generator)]
        else:
            sequence = self.tasks
        return step_on_groups(ctx, [[t] for t in sequence], self.fresh_batches)
