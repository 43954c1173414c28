"""PCGrad: each task gradient stripped of its components that conflict with the other tasks' gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import pcgrad_weights, seeded
from mtlrun.strategies.base import SeededStrategy, StepContext, check_reduction
from mtlrun.strategies.gradient import GramWeighting

SCOPES = ("shared", "all")  # what a task's gradient is: of the shared parameters, or of every parameter


class PCGrad(GramWeighting, SeededStrategy):
    """PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, Algorithm 1): for each task i, going through the other tasks j in a fresh random order,
    g_i <- g_i - min(g_i . g_j, 0) / ||g_j||^2 g_j (g_j the original gradient); the update is the sum of
    the projected g_i (`reduction=mean`: their mean). torchjd's PCGradWeighting on the Gram matrix; the
    random orders come from the strategy's own seeded generator, saved in checkpoints.
    `scope=shared`: g_t is task t's gradient of the shared parameters, and each head steps along its own
    gradient (`heads=own`) or its weight times it (`heads=weighted`). `scope=all` (needs `heads=weighted`):
    g_t is the gradient of every parameter, heads included (zero on the other tasks' heads), as the code of
    Pascal et al. (lucaspascal/AITSO_MTL `*/models/pcgrad.py`, after tianheyu927/PCGrad) flattens it. The
    projections then see G + diag(||h_t||^2) (h_t task t's head gradient), and as the projected g_i are
    combinations of the original rows, head t steps along its task's weight times h_t.
    Scale: a sum of gradients, as the paper (no conflict: the gradient of the sum of the losses); the mean
    with `reduction=mean`, as Pascal et al.'s code. Guarantees: a pair that does not conflict is left
    untouched; with two tasks, each projected gradient is orthogonal to the other task's gradient wherever
    the pair conflicts (of the shared parameters' gradients, or of the whole ones with `scope=all`).
    """

    name = "pcgrad"

    def __init__(
        self, tasks: Sequence[str], seed: int, scope: str = "shared", reduction: str = "sum",
        heads: str = "own",
    ) -> None:
        if scope not in SCOPES:
            raise MtlrunError(f"strategy.scope={scope!r} is invalid; valid: {', '.join(SCOPES)}")
        check_reduction(reduction)
        if scope == "all" and heads != "weighted":
            raise MtlrunError(
                "strategy.scope=all projects the heads' gradients too, so each head moves by its task's weight: "
                "add strategy.heads=weighted"
            )
        GramWeighting.__init__(self, tasks, heads)
        SeededStrategy.__init__(self, seed)
        self.scope, self.reduction = scope, reduction

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        if self.scope == "shared":
            super().combine(ctx, losses)
            return
        jacobian, head_grads = ctx.jacobian(losses)
        exact = jacobian.double()
        # heads are disjoint: task t's head adds ||h_t||^2 to its diagonal, and nothing off it
        head_norms = torch.stack([head_grads[t].double().square().sum() for t in losses]).to(exact.device)
        gram = exact @ exact.T + torch.diag(head_norms)
        shared_grad = self.aggregate(jacobian, losses, gram)
        ctx.apply(list(losses), shared_grad, self.head_steps(head_grads))

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        with seeded(self.generator):
            weights = pcgrad_weights(gram)
        return weights / len(weights) if self.reduction == "mean" else weights
