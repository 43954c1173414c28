"""The solvers of mtlrun/strategies/aggregation.py through their methods, on adversarial Jacobians (norms 1e5 apart,
near-parallel rows) against float64 definitions."""

import math

import numpy as np
import pytest
import torch

from mtlrun.strategies.aggregation import NashMTLSolver
from mtlrun.strategies.aligned_mtl import AlignedMTL
from mtlrun.strategies.cagrad import CAGrad
from mtlrun.strategies.imtl import IMTL
from mtlrun.strategies.nash_mtl import NashMTL
from mtlrun.strategies.upgrad import UPGrad

TASKS = ["a", "b", "c", "d", "e"]


def _losses(n: int) -> dict[str, torch.Tensor]:
    return {t: torch.tensor(1.0) for t in TASKS[:n]}


def _spread_jacobian(norms: list[float], cols: int, seed: int) -> torch.Tensor:
    """Random unit directions scaled to the given norms (float64)."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(len(norms), cols, generator=g, dtype=torch.float64)
    return J / J.norm(dim=1, keepdim=True) * torch.tensor(norms, dtype=torch.float64)[:, None]


def _cagrad_two_task_optimum(J: torch.Tensor, c: float) -> float:
    """max over ||d - g0|| <= c ||g0|| of min(g_1 . d, g_2 . d), in float64, by a search over the circle.

    The optimum lies in g0 + span(g_1, g_2) on the ball's boundary (c > 0), so d = g0 + r (cos t e_1 +
    sin t e_2) with an orthonormal basis e of the span; a 1e6-point grid, then golden-section refinement
    between the best point's neighbours.
    """
    g0 = J.mean(0)
    radius = c * float(g0.norm())
    basis, _ = torch.linalg.qr(J.T)  # P x 2, orthonormal
    coords = J @ basis  # each gradient in the basis
    base = J @ g0

    def worst(angle: np.ndarray) -> np.ndarray:
        direction = np.stack([np.cos(angle), np.sin(angle)])
        return np.min(base.numpy()[:, None] + radius * coords.numpy() @ direction, axis=0)

    grid = np.linspace(0, 2 * math.pi, 1_000_001)
    best = int(np.argmax(worst(grid)))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if worst(np.array([a]))[0] < worst(np.array([b]))[0]:
            lo = a
        else:
            hi = b
    return float(worst(np.array([(lo + hi) / 2]))[0])


@pytest.mark.parametrize("apart", [1e4, 1e5])
def test_cagrad_reaches_the_papers_optimum_with_norms_far_apart(apart):
    c = 0.4
    J = _spread_jacobian([1.0, 1 / apart], 50, seed=0)
    d = CAGrad(["a", "b"], c=c, rescale=False).aggregate(J, _losses(2))
    g0 = J.mean(0)
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)
    optimum = _cagrad_two_task_optimum(J, c)
    assert optimum > 0  # the mean gradient itself would make the small task worse here
    assert abs(float((J @ d).min()) - optimum) <= 1e-4 * abs(optimum)


@pytest.mark.parametrize(("tasks", "seed"), [(3, 0), (4, 1), (5, 2)])
def test_cagrad_closes_the_duality_gap_on_spread_norms(tasks, seed):
    """Weak duality certifies the optimum: for d feasible and any w on the simplex,
    min_t g_t . d <= optimum <= g_w . g0 + c ||g0|| ||g_w||; both ends agree to 1e-9 relative."""
    c = 0.5
    J = _spread_jacobian([10.0 ** -k for k in range(tasks)][::-1], 40, seed)
    method = CAGrad(TASKS[:tasks], c=c, rescale=False)
    d = method.aggregate(J, _losses(tasks))
    g0 = J.mean(0)
    radius = c * float(g0.norm())
    weights = torch.tensor([method.weights[t] for t in TASKS[:tasks]], dtype=torch.float64)
    w = weights - 1 / tasks  # = (radius / ||g_w||) w_dual
    w = w / w.sum()
    assert float(w.min()) >= -1e-12
    g_w = w @ J
    dual = float(g_w @ g0) + radius * float(g_w.norm())
    primal = float((J @ d).min())
    assert float((d - g0).norm()) <= radius * (1 + 1e-9)
    assert primal <= dual * (1 + 1e-12) and dual - primal <= 1e-9 * abs(dual)


def _near_parallel(tasks: int, seed: int) -> torch.Tensor:
    """Float32 rows of different norms whose pairwise cosines are about 1 - 1e-6."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, generator=g, dtype=torch.float64)
    base /= base.norm()
    rows = []
    for t in range(tasks):
        noise = torch.randn(64, generator=g, dtype=torch.float64)
        noise -= (noise @ base) * base
        rows.append((1 + t) * (base + math.sqrt(1e-6) * noise / noise.norm()))
    J = torch.stack(rows).float()
    cosines = torch.nn.functional.cosine_similarity(J.double()[:, None], J.double()[None], dim=2)
    assert float(cosines.min()) > 1 - 1e-5 and float(cosines.min()) < 1 - 1e-7
    return J


@pytest.mark.parametrize(("tasks", "seed"), [(2, 0), (3, 1)])
def test_aligned_mtl_on_near_parallel_gradients_matches_its_float64_definition(tasks, seed):
    J = _near_parallel(tasks, seed)
    exact = J.double()
    U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
    expected = S[-1] * Vh.T @ U.T @ torch.full((tasks,), 1 / tasks, dtype=torch.float64)
    d = AlignedMTL(TASKS[:tasks]).aggregate(J, _losses(tasks))
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.norm()))


@pytest.mark.parametrize(("tasks", "seed"), [(2, 0), (3, 1)])
def test_imtl_g_on_near_parallel_gradients_matches_its_float64_definition(tasks, seed):
    J = _near_parallel(tasks, seed)
    exact = J.double()
    G, norms = exact @ exact.T, exact.norm(dim=1)
    # w sums to 1 and d = J^T w projects equally on every unit gradient: w^T G (e_1/n_1 - e_t/n_t) = 0
    system = torch.zeros(tasks, tasks, dtype=torch.float64)
    system[0] = 1
    for t in range(1, tasks):
        system[t] = G[:, 0] / norms[0] - G[:, t] / norms[t]
    rhs = torch.zeros(tasks, dtype=torch.float64)
    rhs[0] = 1
    weights = torch.linalg.solve(system, rhs)
    method = IMTL(TASKS[:tasks])
    d = method.aggregate(J, _losses(tasks))
    got = torch.tensor([method.weights[t] for t in TASKS[:tasks]], dtype=torch.float64)
    torch.testing.assert_close(got, weights, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d.double(), weights @ exact, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("tasks", "seed"), [(2, 0), (3, 1)])
def test_upgrad_on_near_parallel_gradients_is_their_mean(tasks, seed):
    J = _near_parallel(tasks, seed)  # no pair conflicts: every g_i is in the dual cone already
    d = UPGrad(TASKS[:tasks]).aggregate(J, _losses(tasks))
    torch.testing.assert_close(d.double(), J.double().mean(0), rtol=1e-4, atol=1e-6)


def test_nash_mtl_solves_the_bargaining_condition_on_every_draw():
    """48 draws (T = 2..5, norms up to 1e3 apart, some near-parallel rows): each solve, warm-started from the
    previous one as in training, ends with alpha > 0 and every alpha_t (G alpha)_t = 1 to 1e-9."""
    g = torch.Generator().manual_seed(7)
    solvers = {t: NashMTLSolver(t) for t in range(2, 6)}
    for draw in range(48):
        tasks = 2 + draw % 4
        J = torch.randn(tasks, 20, generator=g, dtype=torch.float64)
        J *= 10 ** (3 * torch.rand(tasks, 1, generator=g, dtype=torch.float64))
        if draw % 5 == 0:
            J[1] = J[0] * 2 + 1e-3 * J[1] / J[1].norm() * J[0].norm()
        G = J @ J.T
        alpha = solvers[tasks](G)
        assert (alpha > 0).all(), draw
        residual = (alpha * (G @ alpha) - 1).abs().max()
        assert float(residual) < 1e-9, (draw, float(residual))


def test_nash_mtl_strategy_weights_give_each_task_the_reciprocal_improvement():
    J = _spread_jacobian([1.0, 1e-2, 1e2], 30, seed=3)
    method = NashMTL(TASKS[:3], max_norm=0.0)
    d = method.aggregate(J.float(), _losses(3))
    alpha = torch.tensor([method.weights[t] for t in TASKS[:3]], dtype=torch.float64)
    improvements = J.float().double() @ d.double()
    torch.testing.assert_close(improvements, 1 / alpha, rtol=1e-5, atol=0)


# --- near-opposite gradients, and CAGrad / Nash-MTL on pairs of every kind -----------------------------------


def _pair(cosine: float, norms: tuple[float, float], seed: int, dtype=torch.float64) -> torch.Tensor:
    """Two gradients in R^16 with exactly the given cosine and norms (in float64), then rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(2, 16, generator=g, dtype=torch.float64)
    u = u / u.norm()
    v = v - (v @ u) * u
    v = v / v.norm()
    return torch.stack([norms[0] * u, norms[1] * (cosine * u + math.sqrt(1 - cosine**2) * v)]).to(dtype)


def _relative_error(d: torch.Tensor, expected: torch.Tensor) -> float:
    return float((d.double() - expected).norm() / expected.norm())


NEAR_OPPOSITE = -(1 - 1e-6)


def test_upgrad_on_near_opposite_gradients_is_its_float64_definition():
    """A conflicting pair: each g_i loses its component along the other, g_i - (g_i . g_j / ||g_j||^2) g_j
    being g_i's projection onto the dual cone. torchjd's regularised QP was 51% off here."""
    J = _pair(NEAR_OPPOSITE, (1.0, 3.0), seed=7, dtype=torch.float32)
    g1, g2 = J.double()
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2 + g2 - (g1 @ g2) / (g1 @ g1) * g1) / 2
    d = UPGrad(TASKS[:2]).aggregate(J, _losses(2))
    assert _relative_error(d, expected) < 1e-6
    assert float((J.double() @ d.double()).min()) >= -1e-6 * float(d.double().norm())  # non-conflicting


def test_aligned_mtl_and_imtl_g_on_near_opposite_gradients_match_their_float64_definitions():
    J = _pair(NEAR_OPPOSITE, (1.0, 3.0), seed=7, dtype=torch.float32)
    exact = J.double()
    U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
    aligned = S[-1] * Vh.T @ U.T @ torch.full((2,), 0.5, dtype=torch.float64)
    assert _relative_error(AlignedMTL(TASKS[:2]).aggregate(J, _losses(2)), aligned) < 1e-6
    units = exact / exact.norm(dim=1, keepdim=True)
    system = torch.stack([(units[0] - units[1]) @ exact.T, torch.ones(2, dtype=torch.float64)])
    w = torch.linalg.solve(system, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert _relative_error(IMTL(TASKS[:2]).aggregate(J, _losses(2)), w @ exact) < 1e-6


@pytest.mark.parametrize("cosine", [0.3, -0.4, 0.8])
@pytest.mark.parametrize("norms", [(1.0, 1e4), (1e5, 1.0)])
def test_cagrad_reaches_the_optimum_for_either_order_and_any_angle(cosine, norms):
    c = 0.4
    J = _pair(cosine, norms, seed=1)
    d = CAGrad(TASKS[:2], c=c, rescale=False).aggregate(J, _losses(2))
    g0 = J.mean(0)
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)
    optimum = _cagrad_two_task_optimum(J, c)
    assert abs(float((J @ d).min()) - optimum) <= 1e-4 * abs(optimum)


@pytest.mark.parametrize(
    ("cosine", "apart"), [(1 - 1e-6, 1.0), (NEAR_OPPOSITE, 1.0), (0.3, 1e5), (-0.6, 1e5)]
)
def test_nash_mtl_two_task_bargaining_solution_in_closed_form(cosine, apart):
    """For two tasks G alpha = 1 / alpha gives alpha_t = 1 / (||g_t|| sqrt(1 + cos)): near-parallel,
    near-opposite and far-apart gradients."""
    J = _pair(cosine, (1.0, apart), seed=3)
    alpha = NashMTLSolver(2)(J @ J.T)
    torch.testing.assert_close(alpha, 1 / (J.norm(dim=1) * math.sqrt(1 + cosine)), rtol=1e-9, atol=0)
