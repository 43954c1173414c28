"""The averaged loss: one step per iteration on the weighted mean (or sum) of all task losses."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext, check_reduction, weighted_mean


class Averaged(LossCombiner):
    """One forward and one optimizer step per iteration on sum_t w_t L_t / sum_t w_t (equal weights by default);
    `reduction=sum` steps on sum_t w_t L_t itself (Pascal et al.'s MTL-SUS and LibMTL's EW), whose
    gradient is sum_t w_t times the mean's.

    Guarantees: every parameter moves once per iteration; with moments=per_task every task's state
    receives the same gradient, so the result equals the plain optimizer.
    """

    name = "averaged"

    def __init__(
        self, tasks: Sequence[str], weights: dict[str, float] | None = None, reduction: str = "mean",
    ) -> None:
        check_reduction(reduction)
        if weights is not None:
            unknown = sorted(set(weights) - set(tasks))
            missing = [t for t in tasks if t not in weights]
            if unknown or missing:
                raise MtlrunError(
                    f"strategy.weights must give one weight per task ({', '.join(tasks)}); "
                    f"unknown: {unknown}, missing: {missing}"
                )
            if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise MtlrunError(f"strategy.weights must be >= 0 with a positive sum, got {weights}")
        self.weights, self.reduction = weights, reduction
        self.group_size = len(tasks)

    def task_weights(self) -> dict[str, float] | None:
        return self.weights

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        ctx.step(list(losses), weighted_mean(losses, ctx.task_names, self.weights, self.reduction))
