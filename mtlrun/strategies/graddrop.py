"""GradDrop: per coordinate, only the positive or only the negative task gradients, drawn by sign purity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import graddrop, seeded
from mtlrun.strategies.base import SeededStrategy
from mtlrun.strategies.gradient import GradientMethod


class GradDrop(GradientMethod, SeededStrategy):
    """GradDrop (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1 with f = identity): per
    coordinate, the positive sign purity P = (1 + sum_t g_t / sum_t |g_t|) / 2; one uniform U per
    coordinate keeps the positive entries where P > U and the negative ones where P < U; the update is
    sum_t (leak + (1 - leak) M_t) g_t. torchjd's GradDrop; U comes from the strategy's own seeded
    generator, saved in checkpoints.
    Deviation: applied to the gradients of the shared parameters (as the CAGrad authors' GradDrop
    baseline), not at an activation layer as the paper's GradDrop layer.
    Scale: a sum of gradients (leak = 1, or no sign conflict: the gradient of the sum of the losses).
    Guarantees (leak 0): per coordinate the update has one sign, the sum of the kept entries; coordinates
    where all tasks agree keep their sum; the positive side is kept with probability P.
    """

    name = "graddrop"

    def __init__(self, tasks: Sequence[str], seed: int, leak: float = 0.0) -> None:
        if not 0 <= leak <= 1:
            raise MtlrunError(f"strategy.leak must lie in [0, 1], got {leak!r}")
        GradientMethod.__init__(self, tasks)
        SeededStrategy.__init__(self, seed)
        self.leak = float(leak)

    def aggregate(self, jacobian: Tensor, losses: dict[str, Tensor]) -> Tensor:
        if not torch.any(jacobian != 0):
            return torch.zeros_like(jacobian[0])
        with seeded(self.generator):
            return graddrop(jacobian, self.leak)
