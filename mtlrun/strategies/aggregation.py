"""The solvers the gradient methods use, as pure functions of the Gram matrix (torchjd's aggregators, MGDA's min-norm
point, CAGrad's dual, UPGrad's projections, FairGrad's and Nash-MTL's conditions, SDMGrad's inner steps): the one
module importing torchjd.

torchjd is pinned (pyproject.toml) because its API changes between minor releases. The weightings read
the T x T Gram matrix J J^T of the task gradients (float64, on any device) and return one weight per
row, the caller forming weights @ J; GradDrop reads J itself. torchjd draws its random numbers (PCGrad's
orders, GradDrop's thresholds) from torch's global generators, so those calls run under `seeded`, which
draws from the caller's own generator instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# torchjd (which loads cvxpy, qpsolvers and scipy.stats) and cvxpy are imported in the functions that use them:
# at module level they cost every run ~1 s of start-up.
import numpy as np
import torch
from scipy.optimize import least_squares, nnls
from torch import Tensor

from mtlrun.strategies.simplex import project_onto_simplex

# CLARABEL's tolerances for CAGrad's dual: its optimum is needed to the last digits when the worst task's
# improvement is 1e-5 of the others' (gradient norms 1e5 apart); the defaults (1e-8) give ~1e-7 relative.
CLARABEL_TIGHT = {
    "tol_gap_abs": 1e-14, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10, "max_iter": 500,
}
NASH_TOLERANCE = 1e-12  # |a_i (G a)_i - 1| at which the bargaining condition counts as solved
NASH_MAX_STEPS = 100  # Newton steps; a solvable condition needs a handful from a warm start
ZERO_DIRECTION = 1e-12  # CAGrad's g_w below this fraction of the largest gradient norm is the zero vector
# Largest residual accepted as solved, relative to the size of its terms:
# |(G w)_t - w_t^(-1/alpha)| / ((|G| w)_t + w_t^(-1/alpha)) (plain relative residuals cannot be met in float64
# where (G w)_t is a near-cancellation, e.g. a small alpha and a conflicting gradient 1e5 times smaller).
FAIR_TOLERANCE = 1e-10  # FairGrad's condition
FAIR_NEWTON_STEPS = 100
SDMGRAD_EPS = 1e-8  # added to the squared scale that divides the weights' problem, as LibMTL


@contextmanager
def seeded(generator: torch.Generator) -> Iterator[None]:
    """Run the block on torch's global generators (CPU and every CUDA device) seeded from `generator`,
    restoring them afterwards: torchjd's random draws become reproducible and checkpointable, and the
    training's own stream (dropout, augmentation) is left untouched."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for device in devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def pcgrad_weights(gram: Tensor) -> Tensor:
    """PCGrad's weights: each g_i projected on the normal plane of every g_j it conflicts with, in a random
    order per task, then summed (torchjd's PCGradWeighting; call it under `seeded`)."""
    import torchjd.aggregation as tjd  # when used: see the imports
    return tjd.PCGradWeighting()(gram)


def gram_root(gram: Tensor) -> Tensor:
    """Rows x_t with x_i . x_j = G_ij (float64, on the CPU): the gradients in a T-dimensional basis of their span,
    from the eigendecomposition G = V diag(lambda) V^T as V diag(sqrt(max(lambda, 0)))."""
    eigenvalues, vectors = torch.linalg.eigh(gram.detach().cpu().double())
    return vectors * eigenvalues.clamp(min=0).sqrt()


def relative_gram_root(gram: np.ndarray) -> np.ndarray:
    """`gram_root`'s rows, each accurate relative to its own norm however far apart the norms are: the
    eigendecomposition is taken of the correlation matrix D^-1 G D^-1 (D the norms), whose entries lie in
    [-1, 1] (UPGrad's). Kept in numpy, as UPGrad has always computed it: torch's and numpy's LAPACKs differ
    in the last bits, so computing it through `gram_root` would move UPGrad's updates by ~1e-15."""
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    norms = np.where(norms > 0, norms, 1.0)
    eigenvalues, vectors = np.linalg.eigh(gram / norms[:, None] / norms[None, :])
    return norms[:, None] * vectors * np.sqrt(np.clip(eigenvalues, 0, None))


def min_norm_weights(gram: Tensor) -> Tensor:
    """The weights w on the simplex minimising w^T G w: sum_t w_t g_t is the min-norm point of the convex
    hull of the rows whose Gram matrix is G (MGDA's).

    Solved exactly (Lawson-Hanson active set) as the non-negative least squares
    min_{u >= 0} ||R^T u||^2 + (1 - sum u)^2 with R R^T = G: for u = s w the best s gives
    ||x_w||^2 / (1 + ||x_w||^2), increasing in ||x_w||, so w = u / sum u.
    """
    root = gram_root(gram).numpy()  # row t: a point with task t's inner products
    n = root.shape[0]
    u, _ = nnls(np.vstack([root.T, np.ones((1, n))]), np.eye(n + 1)[-1])
    return torch.as_tensor(u / u.sum(), device=gram.device)


def upgrad_weights(gram: Tensor) -> Tensor:
    """UPGrad's weights (float64): (1/T) sum_i (e_i + lambda_i), where g_i + J^T lambda_i is g_i projected
    onto the dual cone {x : J x >= 0}.

    The projection's dual, lambda_i = argmin_{lambda >= 0} ||g_i + J^T lambda||, is a non-negative least
    squares problem in the T-dimensional basis of `relative_gram_root`, solved exactly (Lawson-Hanson) with each
    column scaled to unit norm. torchjd's UPGradWeighting solves a QP on the Gram matrix with 1e-4 added to
    its (trace-normalised) diagonal, which moves the update by half its norm on near-opposite gradients.
    """
    rows = relative_gram_root(gram.detach().double().cpu().numpy())
    norms = np.linalg.norm(rows, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    columns = rows.T / norms  # column j is g_j / ||g_j||: lambda_j = solution_j / ||g_j||
    weights = np.eye(len(rows))
    for i, row in enumerate(rows):
        solution, _ = nnls(columns, -row)
        weights[i] += solution / norms
    return torch.from_numpy(weights.mean(axis=0)).to(gram.device)


def imtl_g_weights(gram: Tensor) -> Tensor:
    """IMTL-G's weights, summing to 1, whose combination has the same projection on every unit gradient
    (torchjd's IMTLGWeighting: pinv(G) @ norms, normalised; a zero vector when that sum vanishes)."""
    import torchjd.aggregation as tjd  # when used: see the imports
    return tjd.IMTLGWeighting()(gram)


def cagrad_weights(gram: Tensor, c: float) -> Tensor:
    """CAGrad's weights 1/T + (c ||g0|| / ||g_w||) w, with w on the simplex minimising the paper's dual
    g_w . g0 + c ||g0|| ||g_w|| (g0 the mean gradient, g_w = sum_t w_t g_t), solved in float64 as a
    second-order cone program (cvxpy/CLARABEL at tolerances 1e-12) on a square root of the Gram matrix.

    The solver's answer is then made exact: on the tasks it supports, the optimum solves a quadratic in
    closed form (`_cagrad_on_support`), kept where it passes the optimality conditions (else the solver's
    answer stands, accurate to ~1e-7). No absolute cut-off is applied to g_w: torchjd's CAGradWeighting
    (and the authors' code, through the 1e-8 inside their square root) read a small but valid dual
    direction as zero, which falls back to the mean gradient when the task gradients differ by 1e4 or
    more in norm. Here g_w counts as zero only
    below `ZERO_DIRECTION` times the largest gradient norm (gradients summing to zero); the weights are
    then the mean's, d = g0, as the authors'.
    """
    import cvxpy as cp  # when used: see the imports
    gram = gram.detach().double().cpu()
    n = len(gram)
    root = gram_root(gram).numpy()
    mean = np.full(n, 1 / n)
    g0 = root.T @ mean
    radius = c * float(np.linalg.norm(g0))
    if radius == 0:
        return torch.from_numpy(mean)
    w = cp.Variable(n)
    problem = cp.Problem(
        cp.Minimize((root @ g0) @ w + radius * cp.norm(root.T @ w, 2)), [w >= 0, cp.sum(w) == 1]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not DPP.*")
        warnings.filterwarnings("ignore", message=".*may be inaccurate.*")  # made exact below
        problem.solve(cp.CLARABEL, **CLARABEL_TIGHT)
    if w.value is None:
        raise RuntimeError(f"CAGrad's dual could not be solved ({problem.status})")
    w_opt = np.clip(w.value, 0, None)
    w_opt /= w_opt.sum()
    g_w_norm = float(np.linalg.norm(root.T @ w_opt))
    largest = float(gram.diagonal().max()) ** 0.5
    if g_w_norm <= ZERO_DIRECTION * largest:
        return torch.from_numpy(mean)
    for cut in (1e-3, 1e-6, 1e-9, 1e-12):  # the solver's support, then exact on it
        exact = _cagrad_on_support(gram.numpy(), radius, w_opt > cut * w_opt.max())
        if exact is not None:
            return torch.from_numpy(mean + radius * exact)
    weights = mean + (radius / g_w_norm) * w_opt
    return torch.from_numpy(weights)


def _cagrad_on_support(gram: np.ndarray, radius: float, support: np.ndarray) -> np.ndarray | None:
    """CAGrad's optimum d = g0 + radius u solved exactly given the tasks S whose improvements it equalises.

    With u = J_S^T m on the unit sphere, the tasks of S all improve by z: b_S + radius G_S m = z 1 (b = J g0)
    and m^T G_S m = 1, a quadratic in z whose larger root gives m. The answer (m, zero off S) is
    returned only when it satisfies the optimality conditions: m >= 0 and no task improving less than z.
    """
    n = len(gram)
    b = gram @ np.full(n, 1 / n)
    g_s, b_s, ones = gram[np.ix_(support, support)], b[support], np.ones(int(support.sum()))
    try:
        inv_ones, inv_b = np.linalg.solve(g_s, ones), np.linalg.solve(g_s, b_s)
    except np.linalg.LinAlgError:
        return None
    qa, qb, qc = ones @ inv_ones, ones @ inv_b, b_s @ inv_b - radius**2
    disc = qb**2 - qa * qc
    if not (qa > 0 and disc >= 0):
        return None
    z = (qb + np.sqrt(disc)) / qa
    m_s = (z * inv_ones - inv_b) / radius
    m = np.zeros(n)
    m[support] = m_s
    improvements = b + radius * gram @ m
    scale = np.abs(improvements).max()
    if m_s.min() < -1e-12 * m_s.max() or improvements.min() < z - 1e-12 * scale:
        return None
    return np.clip(m, 0, None)


def aligned_mtl_weights(gram: Tensor, scale_mode: str) -> Tensor:
    """Aligned-MTL's weights B @ (1/T) with B = sqrt(lambda_scale) V Lambda^-1/2 V^T on the Gram's nonzero
    eigenpairs (torchjd's AlignedMTLWeighting; scale_mode min = the paper's smallest eigenvalue)."""
    import torchjd.aggregation as tjd  # when used: see the imports
    return tjd.AlignedMTLWeighting(scale_mode=scale_mode)(gram)


def graddrop(jacobian: Tensor, leak: float) -> Tensor:
    """GradDrop's update from the task gradients (torchjd's GradDrop, f = identity; run under `seeded`)."""
    import torchjd.aggregation as tjd  # when used: see the imports
    leaks = torch.full((jacobian.shape[0],), float(leak), dtype=jacobian.dtype, device=jacobian.device)
    return tjd.GradDrop(leak=leaks)(jacobian)


class NashMTLSolver:
    """Nash-MTL's bargaining weights for one fixed set of tasks: the alpha > 0 with G alpha = 1 / alpha.

    That condition is the stationarity of phi(a) = a^T G' a / 2 - sum_i log a_i on a > 0 (G' = G / ||G||_F,
    then alpha = a / sqrt(||G||_F)), a self-concordant function, strictly convex for a positive
    semidefinite G'. Damped Newton (step 1 / (1 + lambda) while the Newton decrement lambda > 1/4, full
    steps after) converges from any positive start and stays positive; it is warm-started from the last
    solution and stops when every a_i (G' a)_i is within `NASH_TOLERANCE` of 1. The authors' sequential
    convex program (cvxpy/ECOS, as torchjd's port) stops at a residual of 1e-3 and, in about 1 of 24 solves
    on random Jacobians, reports its linearised problem unbounded and keeps the previous weights.
    No alpha > 0 exists when a nonnegative combination of the gradients vanishes (e.g. g_2 = -g_1): the
    iteration then ends after `NASH_MAX_STEPS` at its last, large weights (the caller's clipping bounds d).
    """

    def __init__(self, n_tasks: int) -> None:
        self.n_tasks = n_tasks
        self.last: Tensor | None = None  # the last solution a, for G' (the warm start)

    def __call__(self, gram: Tensor) -> Tensor:
        gram = gram.detach().double().cpu()
        scale = float(torch.linalg.matrix_norm(gram))
        normalised = gram / scale
        a = self.last if self.last is not None else normalised.diagonal().rsqrt()
        a = a * (len(a) / float(a @ normalised @ a)) ** 0.5  # the best multiple of the start: phi's scale
        for _ in range(NASH_MAX_STEPS):
            g_a = normalised @ a
            if float((a * g_a - 1).abs().max()) < NASH_TOLERANCE:
                break
            gradient = g_a - 1 / a
            hessian = normalised + torch.diag(a.pow(-2))
            step = torch.linalg.solve(hessian, -gradient)
            decrement = float(-(gradient @ step)) ** 0.5
            a = a + (step if decrement <= 0.25 else step / (1 + decrement))
        self.last = a
        return a / scale**0.5

    @property
    def warm_start(self) -> Tensor:
        return self.last if self.last is not None else torch.zeros(0, dtype=torch.float64)

    @warm_start.setter
    def warm_start(self, a: Tensor) -> None:
        a = a.detach().cpu().double()
        self.last = a if a.numel() == self.n_tasks and bool((a > 0).all()) else None


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
    for _ in range(FAIR_NEWTON_STEPS):
        residual = g @ w - w ** (-1 / alpha)
        if float((residual.abs() / (g.abs() @ w + w ** (-1 / alpha))).max()) < FAIR_TOLERANCE:
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


def sdmgrad_weights(
    product: Tensor, start: Tensor, lamda: float, steps: int, lr: float, momentum: float,
) -> Tensor:
    """w on the simplex after `steps` projected steps of SGD with heavy-ball momentum (torch.optim.SGD's,
    restarted at each call) from `start` on (1/2) ||J w + lamda g0||^2, its gradient estimated by
    A (w + lamda / T), A = J(xi) J(xi')^T the `product` of two independent batches' Jacobians, divided
    by the square of the mean of sqrt(max(A_tt, 0)) so that `lr` does not depend on the gradients' scale."""
    scale = product.diagonal().clamp_min(0).sqrt().mean()
    a = product / (scale**2 + SDMGRAD_EPS)
    w, velocity = start, None
    for _ in range(steps):
        grad = a @ (w + lamda / len(w))
        velocity = grad if velocity is None else momentum * velocity + grad
        w = project_onto_simplex(w - lr * velocity)
    return w
