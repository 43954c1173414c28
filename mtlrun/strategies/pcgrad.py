"""PCGrad: each task gradient stripped of its components that conflict with the other tasks' gradients."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrun.strategies.aggregation import pcgrad_weights, seeded
from mtlrun.strategies.base import SeededStrategy
from mtlrun.strategies.gradient import GramWeighting


class PCGrad(GramWeighting, SeededStrategy):
    """PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, Algorithm 1): for each task i, going through the other tasks j in a fresh random order,
    g_i <- g_i - min(g_i . g_j, 0) / ||g_j||^2 g_j (g_j the original gradient); the update is the sum of
    the projected g_i. torchjd's PCGradWeighting on the Gram matrix; the random orders come from the
    strategy's own seeded generator, saved in checkpoints.
    Scale: a sum of gradients, as the paper (no conflict: the gradient of the sum of the losses).
    Guarantees: a pair that does not conflict is left untouched; with two tasks, each projected gradient
    is orthogonal to the other task's gradient wherever the pair conflicts.
    """

    name = "pcgrad"

    def __init__(self, tasks: Sequence[str], seed: int) -> None:
        GramWeighting.__init__(self, tasks)
        SeededStrategy.__init__(self, seed)

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        with seeded(self.generator):
            return pcgrad_weights(gram)
