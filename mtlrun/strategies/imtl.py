"""IMTL-G: the combination of the task gradients with equal projections on every task's unit gradient."""

from __future__ import annotations

from torch import Tensor

from mtlrun.strategies.aggregation import imtl_g_weights
from mtlrun.strategies.gradient import GramWeighting


class IMTL(GramWeighting):
    """IMTL-G, the gradient half of IMTL (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021): weights w summing to 1 such that d = sum_t w_t g_t has the same
    projection d . g_t / ||g_t|| on every task's unit gradient. torchjd's IMTLGWeighting, the paper's
    closed form written with the pseudo-inverse of the Gram matrix, so linearly dependent gradients are
    allowed (then the weights are the least-squares ones).
    Not included: IMTL-L (learned loss scales); gradients at the shared representation instead of the
    shared parameters (LibMTL's rep_grad option).
    Scale: weights sum to 1. Guarantees: equal projections of d on every unit task gradient (for linearly
    independent gradients); invariant to each task's gradient scale.
    """

    name = "imtl"

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        return imtl_g_weights(gram)
