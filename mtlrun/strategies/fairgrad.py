"""FairGrad: task weights of the alpha-fair allocation of the update, (G w)_t = w_t^(-1/alpha), G = J J^T."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import fair_weights
from mtlrun.strategies.gradient import GradientMethod

ZERO_ROW = 1e-12  # a task whose squared gradient norm is below this fraction of the largest gets weight 0
class FairGrad(GradientMethod):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Algorithm 1): the
    shared update d = sum_t w_t g_t maximises sum_t u(g_t . d) - ||d||^2 / 2, the alpha-fair utility
    u(x) = x^(1 - alpha) / (1 - alpha) (log x at alpha = 1) of the tasks' improvements under a norm penalty
    (the paper's norm ball gives the same direction); its optimality condition is (G w)_t = w_t^(-1/alpha)
    with G = J J^T, i.e. every task gets g_t . d = w_t^(-1/alpha).
    alpha = 0 is the utilitarian sum of the gradients (w = 1: the condition's limit as alpha -> 0),
    alpha = 1 proportional fairness (Nash-MTL's G w = 1 / w), alpha -> infinity max-min fairness.
    The weights are solved to 1e-10 relative residual (`fair_weights`, where the authors run scipy's
    least_squares to its default tolerances); G is formed in float64. As the authors' code the shared
    update is clipped to norm `max_norm` (0: no clipping) and each head steps along its own task's
    gradient (`heads=weighted`: along w_t times it, unclipped). alpha = 2 is the authors' setting in their
    run scripts for all four supervised benchmarks (NYUv2, Cityscapes, CelebA, QM9); LibMTL defaults to 1.
    A task with a zero gradient cannot meet the condition: it gets weight 0 and the others are solved alone.
    Scale: set by the condition, ||d|| ~ ||g||^((1 - alpha) / (1 + alpha)) (it grows as the gradients
    shrink for alpha > 1), then clipped.
    Guarantees: wherever some direction improves every task, w > 0 and (G w)_t = w_t^(-1/alpha) to 1e-10
    relative residual, so g_t . d (before clipping) = w_t^(-1/alpha) > 0 for every task. At a
    Pareto-stationary point (a convex combination of the gradients vanishes) no such w exists, and the
    weights are the authors' least-squares compromise.
    """

    name = "fairgrad"

    def __init__(
        self, tasks: Sequence[str], alpha: float = 2.0, max_norm: float = 1.0, heads: str = "own"
    ) -> None:
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise MtlrunError(f"strategy.alpha must be a finite number >= 0, got {alpha!r}")
        if not max_norm >= 0:
            raise MtlrunError(f"strategy.max_norm must be >= 0 (0: no clipping), got {max_norm!r}")
        super().__init__(tasks, heads)
        self.alpha, self.max_norm = float(alpha), float(max_norm)

    def aggregate(self, jacobian: Tensor, losses: dict[str, Tensor]) -> Tensor:
        rows = jacobian.double()
        gram = (rows @ rows.T).cpu()
        norms = gram.diagonal()
        active = norms > ZERO_ROW * norms.max()
        w = torch.zeros(len(losses), dtype=torch.float64)
        if self.alpha == 0:
            w[active] = 1.0
        elif active.any():
            w[active] = fair_weights(gram[active][:, active], self.alpha)
        self.weights.update(zip(losses, w.tolist()))
        self.step_weights = w
        direction = w.to(jacobian) @ jacobian
        norm = direction.norm()
        if self.max_norm > 0 and norm > self.max_norm:
            return direction * (self.max_norm / norm)
        return direction
