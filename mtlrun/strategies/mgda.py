"""MGDA: the shared update is the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import min_norm_weights
from mtlrun.strategies.base import StepContext
from mtlrun.strategies.gradient import GramWeighting

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GramWeighting):
    """MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018): the
    shared update is sum_t w_t g_t with w on the simplex minimising ||sum_t w_t g_t||, the min-norm point
    of the convex hull of the task gradients (solved exactly, `min_norm_weights`, where the authors' code
    runs Frank-Wolfe / projected gradient to 1e-5).

    `rep_grad=True` is MGDA-UB, the paper's upper bound: the weights come from the gradients of the losses
    with respect to the shared representation z (the encoder's output, batch and all), and the shared
    parameters get the gradient of sum_t w_t L_t through the encoder: one pass per task through its head
    for dL_t/dz (and its head gradient), then one pass through the encoder with sum_t w_t dL_t/dz.
    It reads the representation of the forward pass that made `losses` (`ctx.features`), as the model
    defines it (`MultiTaskModel.representation`: architectures without one refuse in one line). Both kinds
    of pass go through the step context (`representation_jacobian`, `through_representation`): counted,
    loss-scaled under fp16, and under torchrun, where each rank holds its share of z, the Gram matrix sums
    the ranks' ones and the update averages them.
    `normalization` divides each task's gradient by 1 (none, the paper), its norm (l2), its loss (loss) or
    both (loss+) before solving, as the authors' `gradient_normalizers` (their sample config uses loss+
    with MGDA-UB); as in their code the weights then multiply the unnormalised gradients. A non-positive
    normaliser (zero gradient, zero loss) is replaced by 1.
    Heads step along their own task's gradient (`heads=own`), or along w_t times it (`heads=weighted`: the
    authors' code backpropagates sum_t w_t L_t, heads included; Sener & Koltun's and Pascal et al.'s).
    Scale: weights sum to 1. Guarantees: the update d (with normalization none) has the smallest norm in
    the convex hull, equivalently g_t . d >= ||d||^2 for every task, with equality where w_t > 0; it is 0
    exactly when some convex combination of the gradients vanishes (Pareto-stationary).
    """

    name = "mgda"

    def __init__(
        self, tasks: Sequence[str], rep_grad: bool = False, normalization: str = "none", heads: str = "own",
    ) -> None:
        if normalization not in NORMALIZATIONS:
            valid = ", ".join(NORMALIZATIONS)
            raise MtlrunError(f"strategy.normalization={normalization!r} is invalid; valid: {valid}")
        super().__init__(tasks, heads)
        self.rep_grad, self.normalization = bool(rep_grad), normalization

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        norms = gram.diagonal().clamp(min=0).sqrt()
        loss_values = torch.stack([loss.detach() for loss in losses.values()]).to(gram)
        ones = torch.ones_like(norms)
        divisors = {"none": ones, "l2": norms, "loss": loss_values, "loss+": loss_values * norms}
        scale = divisors[self.normalization]
        scale = torch.where(scale > 0, scale, ones)
        return min_norm_weights(gram / scale[:, None] / scale[None, :])

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        if not self.rep_grad:
            super().combine(ctx, losses)
            return
        rep = ctx.representation_jacobian(losses)
        shared_grad, head_grads = ctx.through_representation(rep, self.aggregate(rep.rows, losses, rep.gram))
        ctx.apply(list(losses), shared_grad, self.head_steps(head_grads))
