"""CAGrad: the update within a ball around the mean gradient that best serves the worst-served task."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import cagrad_weights
from mtlrun.strategies.gradient import GramWeighting


class CAGrad(GramWeighting):
    """CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021): d = argmax_{||d - g0|| <= c ||g0||} min_t g_t . d, with g0 the mean gradient; through
    the paper's dual, d = g0 + (c ||g0|| / ||g_w||) g_w with g_w = sum_t w_t g_t and w on the simplex
    minimising g_w . g0 + c ||g0|| ||g_w||, solved in float64 (cvxpy/CLARABEL at tight tolerances; the
    authors use scipy's SLSQP) with no absolute cut-off on g_w, so gradients 1e5 apart in norm still
    get the optimum (torchjd's CAGradWeighting and the authors' 1e-8 fall back to the mean there). `c` = 0.4 as the authors' NYUv2 runs; `rescale` divides d by 1 + c^2 as their code's
    default rescale=1 (false: the paper's d).
    Scale: mean-gradient scale (c = 0: the mean gradient); the authors' code then multiplies by T to
    match their summed-loss baseline, which is not done here (our baseline is the mean loss).
    Where the dual's g_w vanishes (below 1e-12 of the largest gradient norm: a zero task gradient,
    gradients summing to zero) d = g0, as the authors' code.
    Guarantees: d maximises the smallest task improvement g_t . d over the ball, to ~1e-10 relative
    (checked against the paper's primal at gradient norms up to 1e5 apart, T = 2..5); c = 0 gives g0.
    """

    name = "cagrad"

    def __init__(
        self, tasks: Sequence[str], c: float = 0.4, rescale: bool = True, heads: str = "own"
    ) -> None:
        if not c >= 0:
            raise MtlrunError(f"strategy.c must be >= 0, got {c!r}")
        super().__init__(tasks, heads)
        self.c, self.rescale = float(c), bool(rescale)

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        weights = cagrad_weights(gram, self.c)
        return weights / (1 + self.c**2) if self.rescale else weights
