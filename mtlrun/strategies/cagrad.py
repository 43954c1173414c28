"""CAGrad: the update within a ball around the mean gradient that best serves the worst-served task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import cagrad_weights
from mtlrun.strategies.gradient import GramWeighting


class CAGrad(GramWeighting):
    """CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021): d = argmax_{||d - g0|| <= c ||g0||} min_t g_t . d, with g0 the mean gradient; through
    the paper's dual, d = g0 + (c ||g0|| / ||g_w||) g_w with g_w = sum_t w_t g_t and w on the simplex
    minimising g_w . g0 + c ||g0|| ||g_w||. torchjd's CAGradWeighting (cvxpy/CLARABEL; the authors use
    scipy's SLSQP). `c` = 0.4 as the authors' NYUv2 runs; `rescale` divides d by 1 + c^2 as their code's
    default rescale=1 (false: the paper's d).
    Scale: mean-gradient scale (c = 0: the mean gradient); the authors' code then multiplies by T to
    match their summed-loss baseline, which is not done here (our baseline is the mean loss).
    Where the dual's g_w vanishes (a zero task gradient, gradients summing to zero) d = g0, as the
    authors' code (torchjd returns 0 there, which would stop training on a batch where one task's
    gradient is zero).
    Guarantees: d maximises the smallest task improvement g_t . d over the ball; c = 0 gives g0.
    """

    name = "cagrad"

    def __init__(self, tasks: Sequence[str], c: float = 0.4, rescale: bool = True) -> None:
        if not c >= 0:
            raise MtlrunError(f"strategy.c must be >= 0, got {c!r}")
        super().__init__(tasks)
        self.c, self.rescale = float(c), bool(rescale)

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        weights = cagrad_weights(gram, self.c)
        if not weights.sum() > 0:  # torchjd's answer where g_w vanishes: the authors' code then gives g0
            weights = torch.full_like(weights, 1 / len(weights))
        return weights / (1 + self.c**2) if self.rescale else weights
