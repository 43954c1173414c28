"""FairGrad: task weights of the alpha-fair allocation of the update, (G w)_t = w_t^(-1/alpha), G = J J^T."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import least_squares
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.gradient import GradientMethod

ZERO_ROW = 1e-12  # a task whose squared gradient norm is below this fraction of the largest gets weight 0
# Largest residual accepted as solved, relative to the size of its terms:
# |(G w)_t - w_t^(-1/alpha)| / ((|G| w)_t + w_t^(-1/alpha)) (plain relative residuals cannot be met in float64
# where (G w)_t is a near-cancellation, e.g. a small alpha and a conflicting gradient 1e5 times smaller).
TOLERANCE = 1e-10
NEWTON_STEPS = 100


def fair_weights(gram: Tensor, alpha: float) -> Tensor:
    """The w > 0 with (G w)_t = w_t^(-1/alpha) for every t (float64; G = J J^T with nonzero diagonal).

    The condition is the stationarity condition of the strictly convex
    phi(w) = w^T G w / 2 + sum_t psi(w_t), psi' (w) = -w^(-1/alpha) (psi = -log w at alpha = 1), so it is
    solved by damped Newton steps on phi, which stay in w > 0 and converge wherever phi has a minimiser:
    exactly when some direction improves every task (no convex combination of the gradients vanishes).
    G is first divided by its mean diagonal s (the solution for s G is s^(-alpha/(1+alpha)) times that for
    G) and Newton starts from the solution for orthogonal gradients. Where no solution exists, the
    weights are those of the authors' solver: scipy's least_squares on the residual over w >= 0 from 1/T.
    """
    n = gram.shape[0]
    scale = float(gram.diagonal().mean())
    g = gram.double().cpu() / scale
    w = g.diagonal() ** (-alpha / (1 + alpha))
    for _ in range(NEWTON_STEPS):
        residual = g @ w - w ** (-1 / alpha)
        if float((residual.abs() / (g.abs() @ w + w ** (-1 / alpha))).max()) < TOLERANCE:
            return w * scale ** (-alpha / (1 + alpha))
        hessian = g + torch.diag(w ** (-1 / alpha - 1) / alpha)
        try:
            step = -torch.linalg.solve(hessian, residual)
        except torch.linalg.LinAlgError:  # w running off to infinity: no solution
            break
        shrinking = step < 0
        t = min(1.0, 0.99 * float((-w[shrinking] / step[shrinking]).min())) if shrinking.any() else 1.0
        slope, phi = float(residual @ step), _phi(g, w, alpha)
        if -slope > 1e-12 * (1 + abs(phi)):  # near the solution phi's change is rounding: full Newton steps
            while t > 1e-12 and not _phi(g, w + t * step, alpha) <= phi + 1e-4 * t * slope:
                t /= 2
        w = w + t * step
    a = g.numpy()
    solved = least_squares(lambda x: a @ x - np.power(x, -1 / alpha), np.full(n, 1 / n), bounds=(0, np.inf)).x
    return torch.as_tensor(solved) * scale ** (-alpha / (1 + alpha))


def _phi(g: Tensor, w: Tensor, alpha: float) -> float:
    quadratic = 0.5 * float(w @ g @ w)
    if alpha == 1:
        return quadratic - float(w.log().sum())
    p = 1 - 1 / alpha
    return quadratic - float((w**p).sum()) / p


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
