"""Jacobians on three independent batches, the stochastic estimates MoDo and SDMGrad weigh their tasks with."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mtlrun.strategies.context import StepContext


@dataclass
class ThreeSamples:
    """The Jacobians of the shared parameters (T x P, rows in the order of the losses) on three independent
    batches, and each task's head gradient averaged over the three."""

    update: Tensor  # the batch of the losses handed to `combine`: the one the shared step is made from
    first: Tensor  # two batches drawn afresh from the stream: the weights' update
    second: Tensor
    head_grads: dict[str, Tensor]


def three_samples(ctx: StepContext, losses: dict[str, Tensor]) -> ThreeSamples:
    """The Jacobian of `losses` (its graph freed first), then two more batches drawn with `ctx.next_batch()`,
    each one forward pass and one backward pass per task: 3 forward and 3T backward passes in all."""
    names = list(losses)
    update, heads = ctx.jacobian(losses)
    jacobians, head_sums = [], dict(heads)
    for _ in range(2):
        jacobian, heads = ctx.jacobian(ctx.losses(ctx.next_batch(), names))
        jacobians.append(jacobian)
        head_sums = {t: head_sums[t] + heads[t] for t in names}
    return ThreeSamples(update, *jacobians, {t: g / 3 for t, g in head_sums.items()})
