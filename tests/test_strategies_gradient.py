"""Each gradient method's defining property, on hand-worked cases and small random Jacobians, and its step."""

import copy
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.precision import LossScaler, Precision
from mtlrun.strategies.aggregation import fair_weights, min_norm_weights, sdmgrad_weights
from mtlrun.strategies.aligned_mtl import AlignedMTL
from mtlrun.strategies.base import SeededStrategy
from mtlrun.strategies.cagrad import CAGrad
from mtlrun.strategies.fairgrad import FairGrad
from mtlrun.strategies.graddrop import GradDrop
from mtlrun.strategies.gradvac import GradVac
from mtlrun.strategies.imtl import IMTL
from mtlrun.strategies.mgda import MGDA
from mtlrun.strategies.moco import MoCo
from mtlrun.strategies.modo import MoDo
from mtlrun.strategies.nash_mtl import NashMTL
from mtlrun.strategies.pcgrad import PCGrad
from mtlrun.strategies.sdmgrad import SDMGrad
from mtlrun.strategies.upgrad import UPGrad
from tests.helpers import assert_sgd_step, batches, context, linear_model, per_batch_float64, snapshot
from tests.test_strategies_simplex import project_by_bisection

TASKS = ["a", "b", "c"]
CLASSES = {
    "mgda": MGDA, "pcgrad": PCGrad, "gradvac": GradVac, "cagrad": CAGrad, "nash_mtl": NashMTL,
    "imtl": IMTL, "aligned_mtl": AlignedMTL, "graddrop": GradDrop, "upgrad": UPGrad,
}
BUILDABLE = {**CLASSES, "fairgrad": FairGrad, "moco": MoCo, "modo": MoDo, "sdmgrad": SDMGrad}  # own tests below
# Every method with its conf defaults, plus the variants with a code path of their own.
VARIANTS = [(name, {}) for name in CLASSES] + [
    ("mgda", {"rep_grad": True}),
    ("mgda", {"normalization": "loss+"}),
    ("nash_mtl", {"update_weights_every": 2}),
]
STATEFUL = ["pcgrad", "gradvac", "graddrop", "nash_mtl"]


def build(name: str, tasks=TASKS, seed: int = 0, **overrides):
    """The method from its conf file (conf keys = constructor keywords), as build_strategy does."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    cls = BUILDABLE[name]
    extra = {"seed": seed} if issubclass(cls, SeededStrategy) else {}
    return cls(list(tasks), **{**cfg, **overrides}, **extra)


def _losses(n: int) -> dict[str, torch.Tensor]:
    return {t: torch.tensor(1.0 + i) for i, t in enumerate(TASKS[:n])}


def _random_jacobian(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64)


def _spread(rows: int, ratio: float) -> torch.Tensor:
    """Row scales from 1 to `ratio`, log-spaced: gradient norms that far apart."""
    return torch.logspace(0, math.log10(ratio), rows, dtype=torch.float64)[:, None]


def _loss_values(values) -> dict[str, torch.Tensor]:
    return {t: torch.tensor(float(v)) for t, v in zip(TASKS, values)}


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,setting,message",
    [
        ("mgda", {"normalization": "l1"}, "strategy.normalization"),
        ("cagrad", {"c": -0.1}, "strategy.c"),
        ("aligned_mtl", {"scale_mode": "max"}, "strategy.scale_mode"),
        ("gradvac", {"beta": 1.5}, "strategy.beta"),
        ("graddrop", {"leak": -1.0}, "strategy.leak"),
        ("nash_mtl", {"update_weights_every": 0}, "strategy.update_weights_every"),
        ("nash_mtl", {"max_norm": -1.0}, "strategy.max_norm"),
        ("mgda", {"heads": "shared"}, "strategy.heads='shared' is invalid; valid: own, weighted"),
        ("fairgrad", {"alpha": -1.0}, "strategy.alpha"),
        ("fairgrad", {"max_norm": -1.0}, "strategy.max_norm"),
        ("moco", {"beta": 0.0}, "strategy.beta"),
        ("moco", {"gamma_sigma": -1.0}, "strategy.gamma_sigma"),
        ("modo", {"gamma": 0.0}, "strategy.gamma"),
        ("sdmgrad", {"lamda": -0.1}, "strategy.lamda"),
        ("sdmgrad", {"inner_steps": 0}, "strategy.inner_steps"),
        ("sdmgrad", {"momentum": 1.0}, "strategy.momentum"),
    ],
)
def test_bad_settings_are_refused(name, setting, message):
    with pytest.raises(MtlrunError, match=message):
        build(name, **setting)


# --- each method's defining property -----------------------------------------------------------------------


def test_pcgrad_removes_exactly_the_conflicting_component():
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1
    # g1 - (g1.g2 / |g2|^2) g2 = (1, 0) + (-1, 1) / 2 = (0.5, 0.5); g2 - (g1.g2 / |g1|^2) g1 = (0, 1)
    d = build("pcgrad").aggregate(J, _losses(2))
    torch.testing.assert_close(d, torch.tensor([0.5, 1.5]))
    no_conflict = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(build("pcgrad").aggregate(no_conflict, _losses(2)), no_conflict.sum(0))


def test_pcgrad_projected_gradients_no_longer_conflict_with_two_tasks():
    J = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 1.0]])
    d = build("pcgrad").aggregate(J, _losses(2))
    g1_pc = J[0] - (J[0] @ J[1]) / (J[1] @ J[1]) * J[1]
    g2_pc = J[1] - (J[0] @ J[1]) / (J[0] @ J[0]) * J[0]
    assert abs(float(g1_pc @ J[1])) < 1e-5 and abs(float(g2_pc @ J[0])) < 1e-5
    torch.testing.assert_close(d, g1_pc + g2_pc)


def _grid_min_norm(gram: torch.Tensor, step: float) -> float:
    """min of w^T G w over a grid of the simplex (T = 2 or 3)."""
    ticks = torch.arange(0, 1 + step / 2, step, dtype=torch.float64)
    if gram.shape[0] == 2:
        w = torch.stack([ticks, 1 - ticks], dim=1)
    else:
        a, b = torch.meshgrid(ticks, ticks, indexing="ij")
        keep = a + b <= 1 + 1e-12
        w = torch.stack([a[keep], b[keep], (1 - a[keep] - b[keep]).clamp(min=0)], dim=1)
    return float(torch.einsum("ni,ij,nj->n", w, gram, w).min())


@pytest.mark.parametrize("tasks,seed", [(2, 0), (2, 1), (3, 2), (3, 3), (3, 4)])
def test_mgda_is_the_min_norm_point_of_the_convex_hull(tasks, seed):
    J = _random_jacobian(tasks, 4, seed)
    J[0] += 2 * J[1]  # correlated rows so the optimum is sometimes interior, sometimes on a face
    method = build("mgda", TASKS[:tasks])
    d = method.aggregate(J, _losses(tasks))
    w = torch.tensor([method.weights[t] for t in TASKS[:tasks]], dtype=torch.float64)
    assert (w >= -1e-12).all() and abs(float(w.sum()) - 1) < 1e-9
    torch.testing.assert_close(d, w @ J)
    gram = J @ J.T
    norm2 = float(d @ d)
    grid = _grid_min_norm(gram, 1e-4 if tasks == 2 else 2e-3)
    assert grid - 1e-2 * grid <= norm2 <= grid + 1e-9  # no grid point beats it; the grid comes close
    # optimality (KKT): g_t . d >= |d|^2 for every task, with equality on the support
    inner = J @ d
    assert (inner >= norm2 - 1e-9 * max(norm2, 1)).all()
    assert torch.allclose(inner[w > 1e-9], torch.full_like(inner[w > 1e-9], norm2), rtol=1e-7, atol=1e-10)


def test_min_norm_weights_by_hand():
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(min_norm_weights(orthogonal), torch.tensor([0.5, 0.5], dtype=torch.float64))
    aligned = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # g2 = 2 g1: the shorter one alone
    torch.testing.assert_close(min_norm_weights(aligned), torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "normalization,expected",
    [
        ("none", [0.4, 0.8]),  # min-norm point of (2, 0), (0, 1): w = (1/5, 4/5)
        ("l2", [1.0, 0.5]),  # unit gradients: w = (1/2, 1/2), applied to the raw gradients
        ("loss", [1.0, 0.5]),  # losses 2 and 1 make them unit too
        ("loss+", [1.6, 0.2]),  # (2, 0) / (2 * 2), (0, 1) / (1 * 1): w = (4/5, 1/5)
    ],
)
def test_mgda_normalizations_follow_the_authors_code(normalization, expected):
    J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(1.0)}
    d = build("mgda", ["a", "b"], normalization=normalization).aggregate(J, losses)
    torch.testing.assert_close(d, torch.tensor(expected))


def test_mgda_ub_weights_come_from_the_representation_and_the_step_is_their_weighted_loss():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=1)
    W = model.encoder.weight.detach().double().clone()
    heads = {t: model.heads[t].weight.detach().double()[0].clone() for t in tasks}
    ctx = context(model, tasks, data, lr=0.1)
    build("mgda", tasks, rep_grad=True).iteration(ctx)
    x, n = data[0]["image"].double(), len(data[0]["image"])
    z = x @ W.T
    residual = {t: z @ heads[t] - data[0][t].double() for t in tasks}
    dz = {t: (2 / n) * torch.outer(residual[t], heads[t]) for t in tasks}  # dL_t / dz, n x d
    z1, z2 = dz["a"].flatten(), dz["b"].flatten()
    w1 = float(((z2 - z1) @ z2 / ((z1 - z2) @ (z1 - z2))).clamp(0, 1))  # two-point min-norm in closed form
    dW = {t: dz[t].T @ x for t in tasks}
    expected_W = W - 0.1 * (w1 * dW["a"] + (1 - w1) * dW["b"])
    torch.testing.assert_close(model.encoder.weight.detach().double(), expected_W, rtol=1e-5, atol=1e-6)
    for t in tasks:  # each head: its own gradient, unweighted
        expected = heads[t] - 0.1 * (2 / n) * (residual[t] @ z)
        torch.testing.assert_close(model.heads[t].weight.detach().double()[0], expected, rtol=1e-5, atol=1e-6)
    assert 0 < w1 < 1 and ctx.counts.optimizer_steps == 1 and ctx.counts.forward_passes == 1
    assert ctx.counts.backward_passes == 3  # one per task through its head, one through the encoder


def _scaled_context(model, tasks, data, scale: float):
    """A step context whose fp16 loss scaler (`Precision.grad`, as on a GPU) records every scale it applies."""
    precision = Precision(scaler=LossScaler(scale=scale))
    ctx = context(model, tasks, data, lr=0.1)
    ctx.precision, ctx.scales = precision, []
    door = precision.grad

    def recorded(output, inputs, retain_graph=False):
        ctx.scales.append(precision.scaler.scale)
        return door(output, inputs, retain_graph)

    precision.grad = recorded
    return ctx


def test_mgda_ub_under_fp16_loss_scaling_scales_every_pass_and_unscales_exactly():
    """fp16 with strategy.rep_grad=true: the T passes through the heads and the one through the encoder are
    loss-scaled as every other backward pass; a power-of-two scale unscales exactly (the fp32 run's bits)."""
    tasks = ["a", "b", "c"]
    data = batches(tasks, count=3)
    plain, scaled = linear_model(tasks), linear_model(tasks)
    plain_ctx, scaled_ctx = context(plain, tasks, data, lr=0.1), _scaled_context(scaled, tasks, data, 2.0**12)
    for model, ctx in ((plain, plain_ctx), (scaled, scaled_ctx)):
        method = build("mgda", tasks, rep_grad=True)
        for _ in data:
            method.iteration(ctx)
    assert scaled_ctx.scales == [2.0**12] * 12 and scaled_ctx.counts.backward_passes == 12
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), scaled.parameters()))


def test_mgda_ub_skips_a_step_whose_scaled_representation_gradients_overflow():
    """Task b's targets make its gradient finite unscaled (~1e36) but not once scaled: what fp16 overflow looks
    like. The step is skipped whole (nothing moves, the scale halves), as any other method's."""
    tasks = ["a", "b"]
    data = batches(tasks, count=1)
    data[0]["b"] = torch.full_like(data[0]["b"], 1e37)
    model = linear_model(tasks)
    before = [p.detach().clone() for p in model.parameters()]
    ctx = _scaled_context(model, tasks, data, 1024.0)
    build("mgda", tasks, rep_grad=True).iteration(ctx)
    assert ctx.counts.skipped_steps == 1 and ctx.counts.optimizer_steps == 0
    assert ctx.precision.scaler.scale == 512.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _TwoFeatures(torch.nn.Module):
    """An encoder handing its heads two maps, the second computed from the first (as segnet_mtan's)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False)

    def forward(self, x):
        a = self.first(x)
        return a, self.second(a)


class _ReadsBoth(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Linear(3, 1, bias=False)

    def forward(self, features):
        return self.out(features[0] + features[1])


def test_mgda_ub_refuses_an_encoder_without_one_representation():
    """The gradient w.r.t. each of several dependent feature maps would count shared paths twice."""
    tasks = ["a", "b"]
    model = MultiTaskModel(_TwoFeatures(), {t: _ReadsBoth() for t in tasks})
    ctx = context(model, tasks, batches(tasks, count=1))
    with pytest.raises(MtlrunError, match="needs a model whose encoder gives its heads one representation"):
        build("mgda", tasks, rep_grad=True).iteration(ctx)
    assert ctx.counts.optimizer_steps == 0


@pytest.mark.parametrize("tasks,seed", [(2, 0), (3, 1), (3, 2)])
def test_imtl_g_projects_equally_on_every_unit_gradient(tasks, seed):
    J = _random_jacobian(tasks, 6, seed) * torch.tensor([1.0, 5.0, 0.2][:tasks], dtype=torch.float64)[:, None]
    method = build("imtl", TASKS[:tasks])
    d = method.aggregate(J, _losses(tasks))
    projections = (J @ d) / J.norm(dim=1)
    torch.testing.assert_close(projections, projections[:1].expand(tasks), rtol=1e-6, atol=1e-9)
    assert abs(sum(method.weights.values()) - 1) < 1e-9 and float(projections[0]) > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nash_mtl_weights_solve_the_bargaining_condition(seed):
    J = _random_jacobian(3, 10, seed) * torch.tensor([[1.0], [3.0], [0.3]], dtype=torch.float64)
    method = build("nash_mtl", max_norm=0.0)
    d = method.aggregate(J, _losses(3))
    alpha = torch.tensor([method.weights[t] for t in TASKS], dtype=torch.float64)
    assert (alpha > 0).all()
    torch.testing.assert_close((J @ J.T) @ alpha, 1 / alpha, rtol=1e-4, atol=0)  # G alpha = 1 / alpha
    torch.testing.assert_close(d, alpha @ J)
    clipped = build("nash_mtl", max_norm=0.5).aggregate(J, _losses(3))
    assert float(d.norm()) > 0.5 and abs(float(clipped.norm()) - 0.5) < 1e-9
    torch.testing.assert_close(clipped / clipped.norm(), d / d.norm())


def test_cagrad_closed_form_for_two_symmetric_tasks():
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # equal norms: by symmetry w = (1/2, 1/2), g_w = g0
    g0 = J.mean(0)
    for c in (0.0, 0.4, 1.0):
        plain = build("cagrad", ["a", "b"], c=c, rescale=False).aggregate(J, _losses(2))
        torch.testing.assert_close(plain, (1 + c) * g0)  # d = g0 + c |g0| g0 / |g0|
        rescaled = build("cagrad", ["a", "b"], c=c).aggregate(J, _losses(2))
        torch.testing.assert_close(rescaled, (1 + c) / (1 + c**2) * g0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", [0.2, 0.4, 0.8])
def test_cagrad_maximises_the_worst_improvement_in_the_ball(c):
    J = torch.tensor([[1.0, 0.2], [-0.6, 1.0]], dtype=torch.float64)
    d = build("cagrad", ["a", "b"], c=c, rescale=False).aggregate(J, _losses(2))
    g0 = J.mean(0)
    radius = c * g0.norm()
    angles = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
    candidates = g0 + radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # optimum: on the circle
    worst = (candidates @ J.T).min(dim=1).values
    best = candidates[worst.argmax()]
    assert float((d - g0).norm()) <= float(radius) + 1e-4
    assert float((J @ d).min()) >= float(worst.max()) - 1e-4
    torch.testing.assert_close(d, best, rtol=0, atol=2e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upgrad_is_non_conflicting_permutation_invariant_and_linear_under_scaling(seed):
    J = _random_jacobian(3, 5, seed)
    method = build("upgrad")
    d = method.aggregate(J, _losses(3))
    assert (J @ d >= -1e-12 * float(d.norm() * J.norm(dim=1).max())).all()  # non-conflicting
    for permutation in ([1, 2, 0], [2, 0, 1], [1, 0, 2]):
        torch.testing.assert_close(method.aggregate(J[permutation], _losses(3)), d, rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(100 + seed)
    c1, c2 = torch.rand(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
    a, b = 0.7, 1.9
    combined = method.aggregate(torch.diag(a * c1 + b * c2) @ J, _losses(3))
    separate = a * method.aggregate(torch.diag(c1) @ J, _losses(3))
    separate += b * method.aggregate(torch.diag(c2) @ J, _losses(3))
    assert float((combined - separate).norm()) <= 1e-9 * float(separate.norm())  # exact projections


def test_upgrad_is_the_mean_without_conflict_and_fixes_a_conflict():
    agreeing = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.2, 0.3, 1.0]], dtype=torch.float64)
    assert (agreeing @ agreeing.T >= 0).all()
    d = build("upgrad").aggregate(agreeing, _losses(3))
    torch.testing.assert_close(d, agreeing.mean(0), rtol=1e-12, atol=1e-14)
    conflicting = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    assert float((conflicting @ conflicting.mean(0)).min()) < 0  # the mean hurts task a
    d = build("upgrad", ["a", "b"]).aggregate(conflicting, _losses(2))
    assert float((conflicting @ d).min()) >= -1e-12 and float(d.norm()) > 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_aligned_mtl_rescales_every_principal_component_to_the_smallest_singular_value(seed):
    J = _random_jacobian(3, 5, seed) * torch.tensor([[1.0], [4.0], [0.5]], dtype=torch.float64)
    d = build("aligned_mtl").aggregate(J, _losses(3))
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    weights = torch.full((3,), 1 / 3, dtype=torch.float64)
    aligned = S[-1] * U @ Vh  # the aligned gradients: orthogonal, all of norm sigma_min
    torch.testing.assert_close(aligned @ aligned.T, S[-1] ** 2 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(d, aligned.T @ weights)
    principal = Vh @ d  # d's coordinates in the principal basis: sigma_min (U^T w)_k, whatever S_k
    torch.testing.assert_close(principal, S[-1] * (U.T @ weights))
    torch.testing.assert_close(build("aligned_mtl").aggregate(7 * J, _losses(3)), 7 * d)


def test_graddrop_keeps_one_sign_per_coordinate_with_probability_its_purity():
    J = torch.tensor([[1.0, -2.0, 3.0, 1.0, 0.0], [2.0, -1.0, -1.0, -3.0, 0.0]])
    # column 0: all positive -> 3; column 1: all negative -> -3; column 2: P = (1 + 2/4) / 2 = 0.75, +3 or -1;
    # column 3: P = (1 - 2/4) / 2 = 0.25, +1 or -3; column 4: nothing to keep
    method = build("graddrop", ["a", "b"])
    draws = torch.stack([method.aggregate(J, _losses(2)) for _ in range(2000)])
    assert (draws[:, 0] == 3).all() and (draws[:, 1] == -3).all() and (draws[:, 4] == 0).all()
    assert set(draws[:, 2].tolist()) == {3.0, -1.0} and set(draws[:, 3].tolist()) == {1.0, -3.0}
    assert abs(float((draws[:, 2] > 0).double().mean()) - 0.75) < 0.04
    assert abs(float((draws[:, 3] > 0).double().mean()) - 0.25) < 0.04
    torch.testing.assert_close(build("graddrop", ["a", "b"], leak=1.0).aggregate(J, _losses(2)), J.sum(0))
    replay = build("graddrop", ["a", "b"])
    torch.testing.assert_close(torch.stack([replay.aggregate(J, _losses(2)) for _ in range(5)]), draws[:5])


@pytest.mark.parametrize("name", ["pcgrad", "graddrop", "gradvac"])
def test_random_methods_draw_from_their_own_generator_only(name):
    J = _random_jacobian(3, 6, 0)
    before = torch.get_rng_state()
    first = [build(name, seed=5).aggregate(J, _losses(3)) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)  # the run's global stream is untouched
    torch.manual_seed(123)  # and the global stream does not matter
    torch.testing.assert_close(build(name, seed=5).aggregate(J, _losses(3)), first[0], rtol=0, atol=0)


def test_nash_mtl_reuses_its_weights_between_updates_without_the_jacobian():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=2)
    ctx = context(model, tasks, data, lr=0.1)
    method = build("nash_mtl", tasks, update_weights_every=2, max_norm=0.0)
    method.iteration(ctx)
    alpha = torch.tensor([method.weights[t] for t in tasks])
    W = model.encoder.weight.detach().clone()
    replica = copy.deepcopy(model)
    outputs = replica(data[1]["image"], tasks)
    jacobian = torch.stack([
        torch.autograd.grad(((outputs[t].squeeze(-1) - data[1][t]) ** 2).mean(), replica.encoder.weight,
                            retain_graph=True)[0].flatten()
        for t in tasks
    ])
    passes = ctx.counts.backward_passes
    method.iteration(ctx)
    assert ctx.counts.backward_passes == passes + 2  # the weighted loss, then the heads: no Jacobian
    torch.testing.assert_close(model.encoder.weight.detach().flatten(), W.flatten() - 0.1 * alpha @ jacobian)
    assert torch.equal(torch.tensor([method.weights[t] for t in tasks]), alpha)


def test_nash_mtl_keeps_the_state_of_a_bounded_number_of_task_sets(monkeypatch):
    """Random groups of many tasks rarely repeat: only the most recently used sets keep their state."""
    import mtlrun.strategies.nash_mtl as nash

    monkeypatch.setattr(nash, "KEPT_TASK_SETS", 2)
    model = linear_model(TASKS)
    ctx = context(model, TASKS, batches(TASKS, count=4))
    method = build("nash_mtl", TASKS)
    for subset in (["a", "b"], ["b", "c"], ["a", "b"], ["a", "c"]):
        method.combine(ctx, ctx.losses(ctx.next_batch(), subset))
    for kept in (method.calls, method.alphas, method.solvers):
        assert list(kept) == [("a", "b"), ("a", "c")]  # ("b", "c") was the least recently used
    assert method.calls[("a", "b")] == 2


def test_gradvac_corrects_towards_the_pair_targets_by_hand():
    method = build("gradvac", ["a", "b"], beta=0.5)
    first = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # cosine 0.7071 > target 0: kept
    torch.testing.assert_close(method.aggregate(first, _losses(2)), first.sum(0))
    target = 0.5 * math.sqrt(0.5)
    assert method.targets == {"a": {"b": pytest.approx(target)}, "b": {"a": pytest.approx(target)}}
    second = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # cosine 0 < target 0.3536
    k = target / math.sqrt(1 - target**2)  # g_i + |g_i| phi_hat / (|g_j| sqrt(1 - phi_hat^2)) g_j
    g1 = second[0] + 1 * k / 2 * second[1]
    g2 = second[1] + 2 * k / 1 * second[0]
    torch.testing.assert_close(method.aggregate(second, _losses(2)), g1 + g2)
    for corrected, other in ((g1, second[1]), (g2, second[0])):
        assert float(corrected @ other / (corrected.norm() * other.norm())) == pytest.approx(target)
    assert method.targets["a"]["b"] == pytest.approx(0.5 * target)


def test_gradvac_with_zero_targets_is_pcgrad():
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    d = build("gradvac", ["a", "b"]).aggregate(J, _losses(2))
    torch.testing.assert_close(d, torch.tensor([0.5, 1.5]))


# --- degenerate Jacobians ----------------------------------------------------------------------------------

DEGENERATE = {
    "one task": torch.tensor([[0.5, -1.0, 2.0, 0.0]]),
    "zero row": torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, -1.0]]),
    "identical rows": torch.tensor([[0.5, -1.0, 2.0, 0.0]] * 3),
    "opposite rows": torch.tensor([[0.5, -1.0, 2.0, 0.0], [-0.5, 1.0, -2.0, 0.0], [1.0, 1.0, 0.0, -1.0]]),
    "tiny gradients": 1e-7 * torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 0.0, -1.0]]),
    "all zero": torch.zeros(3, 4),
}


@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_degenerate_jacobians_give_finite_updates(name, overrides, case):
    J = DEGENERATE[case]
    method = build(name, **overrides)
    for _ in range(2):  # twice: stateful methods then read the state the first call left
        d = method.aggregate(J, _losses(J.shape[0]))
        assert d.shape == (4,) and d.dtype == J.dtype and d.isfinite().all()
    if case == "all zero":
        assert (d == 0).all()
    if case == "tiny gradients" and name != "graddrop":  # scale-free weightings still act
        assert float(d.norm()) > 0
    if case == "identical rows":  # every method moves along the one gradient
        assert float(d @ J[0]) > 0 and torch.linalg.matrix_rank(torch.stack([d, J[0]]).double()) == 1


# --- steps through StepContext ------------------------------------------------------------------------------


def _own_head_grads(model, batch, tasks):
    """Each task's gradient of its head, by a separate backward pass on a copy of the model."""
    model = copy.deepcopy(model)
    outputs = model(batch["image"], tasks)
    grads = {}
    for t in tasks:
        loss = ((outputs[t].squeeze(-1) - batch[t]) ** 2).mean()
        (grads[t],) = torch.autograd.grad(loss, model.heads[t].weight, retain_graph=True)
    return grads


def _assert_stepped(weight, before, grad, lr=0.1):
    """One SGD step along exactly `grad`."""
    torch.testing.assert_close(weight.detach(), before - lr * grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_each_iteration_is_one_step_moving_shared_weights_and_each_head_by_its_own_gradient(name, overrides):
    model = linear_model(TASKS)
    data = batches(TASKS, count=2)
    ctx = context(model, TASKS, data, lr=0.1)
    method = build(name, **overrides)
    for it in range(2):
        W = model.encoder.weight.detach().clone()
        heads = {t: model.heads[t].weight.detach().clone() for t in TASKS}
        own = _own_head_grads(model, data[it], TASKS)
        logged = method.iteration(ctx)
        assert list(logged) == TASKS
        assert ctx.counts.optimizer_steps == it + 1 and ctx.counts.forward_passes == it + 1
        assert not torch.equal(model.encoder.weight, W)
        for t in TASKS:
            _assert_stepped(model.heads[t].weight, heads[t], own[t])
    assert method.group_size == 3


WEIGHTED_HEADS = [  # every method taking heads=weighted, with the variants of its own code paths; unclipped
    (name, {**o, "heads": "weighted", **({"max_norm": 0.0} if name in ("nash_mtl", "fairgrad") else {})})
    for name, o in [*VARIANTS, ("fairgrad", {})] if name != "graddrop"
] + [("pcgrad", {"heads": "weighted", "scope": "all", "reduction": "mean"})]


@pytest.mark.parametrize("name,overrides", WEIGHTED_HEADS)
def test_weighted_heads_make_the_step_the_gradient_of_the_weighted_loss(name, overrides):
    """heads=weighted: on a subset of tasks, each head moves by its task's weight in the shared update times its
    own gradient, the shared parameters by the same weights' combination of the task gradients (the rows of
    the representation's Jacobian for MGDA-UB, whose rows are not the shared gradients): the step is the
    gradient of sum_t w_t L_t."""
    tasks = ["a", "c"]
    model = linear_model(TASKS)
    data = batches(TASKS, count=2)
    ctx = context(model, TASKS, data, lr=0.1)
    method = build(name, **overrides)
    for batch in data:  # nash_mtl with update_weights_every=2 reuses its weights in the second step
        W = model.encoder.weight.detach().clone()
        heads = {t: model.heads[t].weight.detach().clone() for t in TASKS}
        own = _own_head_grads(model, batch, tasks)
        replica = copy.deepcopy(model)
        outputs = replica(batch["image"], tasks)
        losses = [((outputs[t].squeeze(-1) - batch[t]) ** 2).mean() for t in tasks]
        method.combine(ctx, ctx.losses(batch, tasks))
        w = method.step_weights.tolist()
        assert w == [method.weights[t] for t in tasks]
        (shared,) = torch.autograd.grad(sum(wt * loss for wt, loss in zip(w, losses)), replica.encoder.weight)
        _assert_stepped(model.encoder.weight, W, shared)
        for t, wt in zip(tasks, w):
            _assert_stepped(model.heads[t].weight, heads[t], wt * own[t])
        assert torch.equal(model.heads["b"].weight, heads["b"])


@pytest.mark.parametrize("name", [n for n in [*CLASSES, "fairgrad"] if n != "graddrop"])
def test_weighted_heads_differ_from_own_heads(name):
    model = linear_model(TASKS)
    steps = {}
    for heads in ("own", "weighted"):
        replica = copy.deepcopy(model)
        build(name, heads=heads).iteration(context(replica, TASKS, batches(TASKS, count=1), lr=0.1))
        steps[heads] = replica.heads["a"].weight.detach()
    assert not torch.allclose(steps["own"], steps["weighted"])


@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_combine_on_a_subset_steps_only_those_tasks(name, overrides):
    model = linear_model(TASKS)
    data = batches(TASKS, count=4)
    ctx = context(model, TASKS, data, lr=0.1)
    method = build(name, **overrides)
    for subset in (["a", "c"], ["b"], ["a", "c"]):
        batch = ctx.next_batch()
        W = model.encoder.weight.detach().clone()
        heads = {t: model.heads[t].weight.detach().clone() for t in TASKS}
        own = _own_head_grads(model, batch, subset)
        steps = ctx.counts.optimizer_steps
        method.combine(ctx, ctx.losses(batch, subset))
        assert ctx.counts.optimizer_steps == steps + 1 and not torch.equal(model.encoder.weight, W)
        for t in TASKS:
            if t in subset:
                _assert_stepped(model.heads[t].weight, heads[t], own[t])
            else:
                assert torch.equal(model.heads[t].weight, heads[t])
    if method.task_weights() is not None:
        assert set(method.task_weights()) <= set(TASKS)


# --- FairGrad -----------------------------------------------------------------------------------------------

ADVERSARIAL = {
    "random": lambda T, s: _random_jacobian(T, 12, s),
    "norms 1e5 apart": lambda T, s: _random_jacobian(T, 12, s) * _spread(T, 1e5),
    "near-parallel": lambda T, s: _random_jacobian(1, 12, s) + 1e-3 * _random_jacobian(T, 12, s + 100),
    "tiny": lambda T, s: 1e-7 * _random_jacobian(T, 12, s),
}


def _fair_residual(G: torch.Tensor, w: torch.Tensor, alpha: float) -> float:
    """|(G w)_t - w_t^(-1/alpha)| relative to the size of its terms, in float64."""
    target = w ** (-1 / alpha)
    return float(((G @ w - target).abs() / (G.abs() @ w + target)).max())


@pytest.mark.parametrize("case", ADVERSARIAL)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_weights_solve_the_fairness_condition(case, alpha):
    for T in (2, 3, 5):
        for seed in range(4):
            J = ADVERSARIAL[case](T, seed)
            G = J @ J.T
            w = fair_weights(G, alpha)
            assert (w > 0).all() and _fair_residual(G, w, alpha) < 1e-9


def test_fairgrad_closed_forms_for_orthogonal_gradients_and_alpha_one_is_nash():
    """Orthogonal g_t: (G w)_t = n_t^2 w_t = w_t^(-1/alpha), so w_t = n_t^(-2 alpha / (1 + alpha)); at
    alpha = 1 that is Nash-MTL's 1 / ||g_t|| and every task improves by g_t . d = 1 / w_t = ||g_t||."""
    J = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 20.0]], dtype=torch.float64)
    norms = torch.tensor([3.0, 0.5, 20.0], dtype=torch.float64)
    for alpha in (0.5, 1.0, 2.0, 5.0):
        torch.testing.assert_close(fair_weights(J @ J.T, alpha), norms ** (-2 * alpha / (1 + alpha)))
    d = build("fairgrad", max_norm=0.0, alpha=1.0).aggregate(J, _loss_values([1, 1, 1]))
    torch.testing.assert_close(J @ d, norms)
    # two conflicting tasks at alpha = 1: G = [[1, -0.5], [-0.5, 4]] and G w = 1 / w
    G = torch.tensor([[1.0, -0.5], [-0.5, 4.0]], dtype=torch.float64)
    w = fair_weights(G, 1.0)
    torch.testing.assert_close(G @ w, 1 / w, rtol=1e-9, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_fairgrad_update_maximises_the_alpha_fair_utility(seed):
    """d is the maximiser of sum_t u_alpha(g_t . d) - ||d||^2 / 2 (whose stationarity condition is the
    fairness condition): no perturbation does better, and each improvement is w_t^(-1/alpha) > 0."""
    J = _random_jacobian(3, 6, seed) * torch.tensor([[1.0], [4.0], [0.3]], dtype=torch.float64)
    for alpha in (0.5, 1.0, 2.0):
        method = build("fairgrad", alpha=alpha, max_norm=0.0)
        d = method.aggregate(J, _loss_values([1, 2, 3]))
        w = torch.tensor([method.weights[t] for t in TASKS], dtype=torch.float64)
        torch.testing.assert_close(J @ d, w ** (-1 / alpha), rtol=1e-8, atol=0)

        def objective(x):
            improvements = J @ x
            utility = improvements.log() if alpha == 1 else improvements ** (1 - alpha) / (1 - alpha)
            return float(utility.sum() - x @ x / 2)

        perturbations = _random_jacobian(50, 6, seed + 10)
        for v in perturbations:
            x = d + 1e-3 * v * d.norm()
            assert not (J @ x > 0).all() or objective(x) <= objective(d) + 1e-12


def test_fairgrad_alpha_to_zero_gives_equal_weights_and_alpha_zero_the_sum():
    J = _random_jacobian(3, 6, 1) * torch.tensor([[1.0], [3.0], [0.5]], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(fair_weights(J @ J.T, 1e-4), ones, rtol=0, atol=1e-2)
    d = build("fairgrad", alpha=0.0, max_norm=0.0).aggregate(J, _loss_values([1, 1, 1]))
    torch.testing.assert_close(d, J.sum(dim=0))


def test_fairgrad_zero_gradient_clipping_and_a_pareto_stationary_point():
    J = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    method = build("fairgrad", alpha=2.0, max_norm=0.0)
    method.aggregate(J, _loss_values([1, 1, 1]))
    assert method.weights["b"] == 0 and method.weights["a"] > 0 and method.weights["c"] > 0
    clipped = build("fairgrad", max_norm=0.01).aggregate(J, _loss_values([1, 1, 1]))
    assert float(clipped.norm()) == pytest.approx(0.01)
    opposite = torch.tensor([[1.0, -2.0], [-1.0, 2.0]], dtype=torch.float64)  # no direction improves both
    d = build("fairgrad", alpha=1.0, max_norm=0.0).aggregate(opposite, _loss_values([1, 1]))
    assert d.isfinite().all() and float(d.norm()) < 1e-3


# --- MoCo ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
def test_moco_tracks_each_gradient_and_takes_projected_steps_on_the_simplex(rescale):
    beta, beta_sigma, gamma, gamma_sigma, rho = 0.5, 0.5, 0.3, 0.5, 0.1
    method = build("moco", beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho,
                   rescale_to_loss=rescale)
    y, lam = np.zeros((3, 5)), np.full(3, 1 / 3)
    for k in (1, 2, 3):
        J = _random_jacobian(3, 5, k) * torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)
        loss_values = np.array([0.5, 2.0, 1.5]) * k
        d = method.aggregate(J, _loss_values(loss_values))
        g = J.numpy()
        h = g * (loss_values / (np.linalg.norm(g, axis=1) + 1e-8))[:, None] if rescale else g
        y = y - beta / k**beta_sigma * (y - h)  # y_{k+1} = y_k - beta_k (y_k - h_k), exactly
        lam = project_by_bisection(lam - gamma / k**gamma_sigma * ((y @ y.T + rho * np.eye(3)) @ lam))
        tracked = np.stack([method.tracked[t].numpy() for t in TASKS])
        np.testing.assert_allclose(tracked, y, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose([method.weights[t] for t in TASKS], lam, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(d.numpy(), lam @ y, rtol=1e-9, atol=1e-12)
        assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0)
    assert not np.allclose(lam, 1 / 3)


def test_moco_keeps_tracked_gradients_per_task_and_weights_per_task_set():
    method = build("moco", rescale_to_loss=False)
    J = _random_jacobian(3, 4, 0)
    method.aggregate(J, _loss_values([1, 1, 1]))
    method.aggregate(J[[0, 2]], {"a": torch.tensor(1.0), "c": torch.tensor(1.0)})
    assert method.steps == {"a": 2, "b": 1, "c": 2}
    assert set(method.lambdas.weights) == {("a", "b", "c"), ("a", "c")}
    # y_a after two steps of beta_k = 0.5 / sqrt(k) towards the same gradient: 1 - (1 - 0.5)(1 - 0.5 / sqrt 2)
    torch.testing.assert_close(method.tracked["a"], (1 - 0.5 * (1 - 0.5 / math.sqrt(2))) * J[0])
    torch.testing.assert_close(method.tracked["b"], 0.5 * J[1])


# --- MoDo and SDMGrad: three batches a step -----------------------------------------------------------------


def _three_batches_setup(tasks=("a", "b")):
    tasks = list(tasks)
    model = linear_model(tasks)
    data = batches(tasks, count=6)
    ctx = context(model, tasks, data, lr=0.1)
    return model, data, ctx, tasks


def test_modo_steps_lambda_with_two_fresh_batches_and_the_model_with_the_first():
    model, data, ctx, tasks = _three_batches_setup()
    method = MoDo(tasks, gamma=0.05, rho=0.1)
    lam = np.full(2, 0.5)
    for it in range(2):
        before = snapshot(model, tasks)
        samples = [per_batch_float64(model, data[3 * it + i], tasks) for i in range(3)]
        logged = method.iteration(ctx)
        J0, J1, J2 = (s[1] for s in samples)
        lam = project_by_bisection(lam - 0.05 * (J1 @ J2.T @ lam + 0.1 * lam))
        np.testing.assert_allclose([method.weights[t] for t in tasks], lam, rtol=1e-6)
        assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0)
        heads = {t: sum(s[2][t] for s in samples) / 3 for t in tasks}
        assert_sgd_step(model, before, lam @ J0, heads)
        np.testing.assert_allclose([v.item() for v in logged.values()], samples[0][0], rtol=1e-6)
        wrong = project_by_bisection(np.full(2, 0.5) - 0.05 * (J0 @ J0.T @ np.full(2, 0.5) + 0.1 * np.full(2, 0.5)))
        assert it > 0 or not np.allclose(wrong, lam)  # the update batch's own product gives other weights
    counts = ctx.counts
    assert (counts.forward_passes, counts.backward_passes, counts.optimizer_steps) == (6, 12, 2)


def _sdmgrad_w(product: np.ndarray, w: np.ndarray, lamda: float, steps: int, lr: float, momentum: float):
    a = product / (np.sqrt(np.maximum(np.diag(product), 0)).mean() ** 2 + 1e-8)
    velocity = None
    for _ in range(steps):
        grad = a @ w + lamda * a.mean(axis=1)  # A w + lamda A 1 / T
        velocity = grad if velocity is None else momentum * velocity + grad
        w = project_by_bisection(w - lr * velocity)
    return w


def test_sdmgrad_weights_from_two_fresh_batches_and_direction_from_the_first():
    model, data, ctx, tasks = _three_batches_setup()
    method = SDMGrad(tasks, lamda=0.3, inner_steps=5, inner_lr=0.5, momentum=0.5)
    w = np.full(2, 0.5)
    for it in range(2):
        before = snapshot(model, tasks)
        samples = [per_batch_float64(model, data[3 * it + i], tasks) for i in range(3)]
        method.iteration(ctx)
        J0, J1, J2 = (s[1] for s in samples)
        w = _sdmgrad_w(J1 @ J2.T, w, 0.3, 5, 0.5, 0.5)
        c = (w + 0.3 / 2) / 1.3
        np.testing.assert_allclose([method.weights[t] for t in tasks], c, rtol=1e-6)
        heads = {t: sum(s[2][t] for s in samples) / 3 for t in tasks}
        assert_sgd_step(model, before, c @ J0, heads)
    assert ctx.counts.forward_passes == 6 and ctx.counts.backward_passes == 12


def test_sdmgrad_lamda_pulls_the_direction_to_the_mean_and_zero_gives_mgda():
    J = _random_jacobian(3, 6, 4) * torch.tensor([[1.0], [3.0], [0.5]], dtype=torch.float64)
    G = J @ J.T
    mean = J.mean(dim=0)
    spread = float((J - mean).norm(dim=1).max())
    start = torch.full((3,), 1 / 3, dtype=torch.float64)
    for lamda in (0.3, 10.0, 1000.0):
        w = sdmgrad_weights(G, start, lamda, 20, 5.0, 0.5)
        d = ((w + lamda / 3) / (1 + lamda)) @ J
        torch.testing.assert_close(d - mean, (w @ J - mean) / (1 + lamda))
        assert float((d - mean).norm()) <= spread / (1 + lamda) + 1e-12
    w = sdmgrad_weights(G, start, 0.0, 3000, 0.05, 0.5)  # a small step: the inner problem is solved
    torch.testing.assert_close(w @ J, min_norm_weights(G) @ J, rtol=0, atol=1e-6)
