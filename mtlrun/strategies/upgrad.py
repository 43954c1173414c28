"""UPGrad: the mean of the task gradients, each first projected onto the dual cone of all of them."""

from __future__ import annotations

from torch import Tensor

from mtlrun.strategies.aggregation import upgrad_weights
from mtlrun.strategies.gradient import GramWeighting


class UPGrad(GramWeighting):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232, 2024):
    every g_i is projected onto the dual cone {x : J x >= 0} of the task gradients and the projections
    are averaged. Each projection is solved exactly in float64 (`upgrad_weights`: non-negative least
    squares on the projection's dual); the paper's reference implementation, torchjd's UPGradWeighting,
    adds 1e-4 to the normalised Gram's diagonal for its QP solver, which moves the update by 5e-4 of its
    norm at cosine -0.5 but by half its norm on near-opposite gradients (cosine -1 + 1e-6).
    Scale: the mean of the projected gradients (no conflict: the mean gradient).
    Guarantees (the paper's, to float64 precision relative to the gradients' norms): non-conflicting,
    J d >= 0, so no task's loss increases to first order; linear under scaling,
    d(diag(a c1 + b c2) J) = a d(diag(c1) J) + b d(diag(c2) J) for c >= 0; invariant to the order of the
    tasks; the mean gradient when no pair of gradients conflicts.
    """

    name = "upgrad"

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        return upgrad_weights(gram)
