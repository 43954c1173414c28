"""Random Loss Weighting: fresh random task weights every step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, SeededStrategy, StepContext

DISTRIBUTIONS = ("normal", "uniform")


class RLW(LossCombiner, SeededStrategy):
    """One step on sum_t w_t L_t with w = softmax(z), z drawn afresh for every step from `distribution`:
    `normal` (z_t ~ N(0, 1), the paper's default and LibMTL's) or `uniform` (z_t ~ U(0, 1))
    (Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022, first as arXiv 2111.10603).

    The draws come from the strategy's own generator (the run's seed, saved in checkpoints); on a group
    of tasks (`grouped`) one weight per task of the group is drawn.
    Guarantees: the weights are positive and sum to 1; with `normal`, log(w_a / w_b) ~ N(0, 2).
    """

    name = "rlw"

    def __init__(self, tasks: Sequence[str], seed: int, distribution: str = "normal") -> None:
        super().__init__(seed)
        if distribution not in DISTRIBUTIONS:
            raise MtlrunError(
                f"strategy.distribution={distribution!r} is invalid; valid: {', '.join(DISTRIBUTIONS)}"
            )
        self.distribution, self.group_size = distribution, len(tasks)
        self.last_weights: dict[str, float] | None = None

    def draw(self, count: int) -> Tensor:
        """`count` weights, softmax of fresh samples (on the CPU, from the strategy's generator)."""
        # float32 draws whatever the run's dtype: a float64 run (trainer.dtype) weighs as its float32 twin
        if self.distribution == "normal":
            z = torch.randn(count, generator=self.generator, dtype=torch.float32)
        else:
            z = torch.rand(count, generator=self.generator, dtype=torch.float32)
        return torch.softmax(z.to(torch.get_default_dtype()), dim=0)

    def task_weights(self) -> dict[str, float] | None:
        return self.last_weights

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        self.last_weights = dict(zip(names, self.draw(len(names)).tolist()))
        ctx.step(names, sum(self.last_weights[t] * losses[t] for t in names))
