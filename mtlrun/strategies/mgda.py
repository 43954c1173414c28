"""MGDA: the shared update is the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.optim import flatten
from mtlrun.run import distributed
from mtlrun.strategies.base import StepContext
from mtlrun.strategies.gradient import GramWeighting

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def min_norm_weights(gram: Tensor) -> Tensor:
    """The weights w on the simplex minimising w^T G w: sum_t w_t g_t is the min-norm point of the convex
    hull of the rows whose Gram matrix is G.

    Solved exactly (Lawson-Hanson active set) as the non-negative least squares
    min_{u >= 0} ||R^T u||^2 + (1 - sum u)^2 with R R^T = G: for u = s w the best s gives
    ||x_w||^2 / (1 + ||x_w||^2), increasing in ||x_w||, so w = u / sum u.
    """
    eigenvalues, vectors = torch.linalg.eigh(gram.detach().cpu().double())
    root = (vectors * eigenvalues.clamp(min=0).sqrt()).numpy()  # row t: a point with task t's inner products
    n = root.shape[0]
    u, _ = nnls(np.vstack([root.T, np.ones((1, n))]), np.eye(n + 1)[-1])
    return torch.as_tensor(u / u.sum(), device=gram.device)


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
    defines it (`MultiTaskModel.representation`: architectures without one refuse in one line).
    Under torchrun each rank holds its share of z: the Gram matrix sums the ranks' ones, the update averages them.
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
        tasks = list(losses)
        features = ctx.model.representation(ctx.features)
        rows, head_grads = [], {}
        for t in tasks:
            head = ctx.model.task_parameters(t)
            grads = torch.autograd.grad(losses[t], features + head, retain_graph=True, allow_unused=True)
            ctx.counts.backward_passes += 1
            rows.append(flatten(grads[: len(features)], features))
            head_grads[t] = flatten(grads[len(features) :], head)
        jacobian = torch.stack(rows)
        gram = distributed.summed(jacobian.double() @ jacobian.double().T) if distributed.active() else None
        feature_direction = self.aggregate(jacobian, losses, gram)
        sizes = [f.numel() for f in features]
        grad_outputs = [g.view_as(f) for g, f in zip(feature_direction.split(sizes), features)]
        shared = ctx.model.shared_parameters()
        shared_grad = flatten(
            torch.autograd.grad(features, shared, grad_outputs=grad_outputs, allow_unused=True), shared
        )
        ctx.counts.backward_passes += 1
        if distributed.active():  # taken with torch.autograd.grad on this rank's share of the batch
            shared_grad, *heads = distributed.average([shared_grad, *head_grads.values()])
            head_grads = dict(zip(head_grads, heads))
        ctx.apply(tasks, shared_grad, self.head_steps(head_grads))

