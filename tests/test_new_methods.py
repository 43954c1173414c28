"""ExcessMTL, FairGrad, MoCo, MoDo, SDMGrad and STCH: each one's defining property against independent float64
computations and hand-worked cases, and what every method must do (one step per call, any subset of the
tasks, inside `grouped`, state that resumes exactly, no NaN when degenerate)."""

import copy
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.special import logsumexp

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import fair_weights, min_norm_weights, sdmgrad_weights
from mtlrun.strategies.excess_mtl import ExcessMTL
from mtlrun.strategies.fairgrad import FairGrad
from mtlrun.strategies.moco import MoCo
from mtlrun.strategies.modo import MoDo
from mtlrun.strategies.sdmgrad import SDMGrad
from mtlrun.strategies.simplex import WeightsPerTaskSet, project_onto_simplex
from mtlrun.strategies.stch import STCH, smooth_tchebycheff
from tests.helpers import batches, context, linear_model

TASKS = ["a", "b", "c"]
CLASSES = {cls.name: cls for cls in (ExcessMTL, FairGrad, MoCo, MoDo, SDMGrad, STCH)}


def build(name: str, tasks=TASKS, **overrides):
    """The method from its conf file (conf keys = constructor keywords), as build_strategy does."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    return CLASSES[name](list(tasks), **{**cfg, **overrides})


def _random_jacobian(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _spread(rows: int, ratio: float) -> torch.Tensor:
    """Row scales from 1 to `ratio`, log-spaced: gradient norms that far apart."""
    return torch.logspace(0, math.log10(ratio), rows, dtype=torch.float64)[:, None]


def _losses(values) -> dict[str, torch.Tensor]:
    return {t: torch.tensor(float(v)) for t, v in zip(TASKS, values)}


def _project(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex by bisection on the threshold (not by sorting, as the code)."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(v - (lo + hi) / 2, 0)


def _per_batch(model, batch, tasks):
    """Each task's loss, shared-parameter gradient (float64 row) and head gradient on `batch`, on a copy."""
    model = copy.deepcopy(model).double()
    outputs = model(batch["image"].double(), tasks)
    losses, rows, heads = [], [], {}
    for t in tasks:
        loss = ((outputs[t].squeeze(-1) - batch[t].double()) ** 2).mean()
        g_w, g_h = torch.autograd.grad(loss, [model.encoder.weight, model.heads[t].weight], retain_graph=True)
        losses.append(loss.item())
        rows.append(g_w.flatten())
        heads[t] = g_h
    return np.array(losses), torch.stack(rows).numpy(), heads


def _snapshot(model, tasks):
    heads = {t: model.heads[t].weight.detach().double().clone() for t in tasks}
    return model.encoder.weight.detach().double().clone(), heads


def _assert_sgd_step(model, before, shared, heads, lr=0.1):
    """The model moved by one SGD step: the encoder along `shared` (flat), each head along `heads[t]`."""
    W, H = before
    expected = W - lr * torch.as_tensor(shared).view_as(W)
    np.testing.assert_allclose(model.encoder.weight.detach().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    for t, g in heads.items():
        expected = H[t] - lr * g
        got = model.heads[t].weight.detach().numpy()
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


# --- conf files and settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,setting,message",
    [
        ("fairgrad", {"alpha": -1.0}, "strategy.alpha"),
        ("fairgrad", {"max_norm": -1.0}, "strategy.max_norm"),
        ("stch", {"mu": 0.0}, "strategy.mu"),
        ("stch", {"warmup_epochs": 1.5}, "strategy.warmup_epochs"),
        ("excess_mtl", {"robust_step_size": 0.0}, "strategy.robust_step_size"),
        ("excess_mtl", {"baseline_epochs": -1}, "strategy.baseline_epochs"),
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


# --- the simplex --------------------------------------------------------------------------------------------


def test_projection_onto_the_simplex_matches_bisection_and_keeps_its_points():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7):
        for scale in (0.1, 1.0, 100.0):
            v = scale * torch.randn(n, generator=g, dtype=torch.float64)
            np.testing.assert_allclose(project_onto_simplex(v).numpy(), _project(v.numpy()), atol=1e-12)
    inside = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    torch.testing.assert_close(project_onto_simplex(inside), inside)
    vertex = project_onto_simplex(torch.tensor([2.0, 0.0, -1.0]))
    torch.testing.assert_close(vertex, torch.tensor([1.0, 0.0, 0.0]))


def test_weights_per_task_set_start_uniform_count_steps_and_forget_the_oldest(monkeypatch):
    import mtlrun.strategies.simplex as simplex

    monkeypatch.setattr(simplex, "KEPT_TASK_SETS", 2)
    kept = WeightsPerTaskSet()
    torch.testing.assert_close(kept.get(["a", "b"]), torch.full((2,), 0.5, dtype=torch.float64))
    assert kept.set(["a", "b"], torch.tensor([0.9, 0.1])) == 1
    assert kept.set(["a", "b"], torch.tensor([0.8, 0.2])) == 2
    kept.set(["c"], torch.tensor([1.0]))
    kept.set(["a", "b"], torch.tensor([0.7, 0.3]))  # used last: kept
    kept.set(["b", "c"], torch.tensor([0.5, 0.5]))
    assert set(kept.weights) == {("a", "b"), ("b", "c")} and kept.step_count(["a", "b"]) == 3


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
    d = build("fairgrad", max_norm=0.0, alpha=1.0).aggregate(J, _losses([1, 1, 1]))
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
        d = method.aggregate(J, _losses([1, 2, 3]))
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
    d = build("fairgrad", alpha=0.0, max_norm=0.0).aggregate(J, _losses([1, 1, 1]))
    torch.testing.assert_close(d, J.sum(dim=0))


def test_fairgrad_zero_gradient_clipping_and_a_pareto_stationary_point():
    J = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    method = build("fairgrad", alpha=2.0, max_norm=0.0)
    method.aggregate(J, _losses([1, 1, 1]))
    assert method.weights["b"] == 0 and method.weights["a"] > 0 and method.weights["c"] > 0
    clipped = build("fairgrad", max_norm=0.01).aggregate(J, _losses([1, 1, 1]))
    assert float(clipped.norm()) == pytest.approx(0.01)
    opposite = torch.tensor([[1.0, -2.0], [-1.0, 2.0]], dtype=torch.float64)  # no direction improves both
    d = build("fairgrad", alpha=1.0, max_norm=0.0).aggregate(opposite, _losses([1, 1]))
    assert d.isfinite().all() and float(d.norm()) < 1e-3


# --- STCH ---------------------------------------------------------------------------------------------------


def _stch_weights(f: torch.Tensor, mu: float) -> torch.Tensor:
    x = f.clone().requires_grad_()
    (grad,) = torch.autograd.grad(smooth_tchebycheff(x, mu), x)
    return grad


def test_smooth_tchebycheff_tends_to_the_max_and_to_the_mean():
    f = torch.tensor([0.3, -1.2, 0.9, 0.85], dtype=torch.float64)
    for mu in (1e-3, 0.1, 1.0, 10.0):
        value = float(smooth_tchebycheff(f, mu))
        assert 0.9 <= value <= 0.9 + mu * math.log(4) + 1e-12
        assert value == pytest.approx(mu * logsumexp(f.numpy() / mu), rel=1e-12)  # scipy's, independently
        weights = _stch_weights(f, mu)
        assert (weights >= 0).all() and float(weights.sum()) == pytest.approx(1.0)
    assert float(smooth_tchebycheff(f, 1e-4)) == pytest.approx(0.9, abs=1e-3)
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(_stch_weights(f, 1e-4), one_hot, atol=1e-6, rtol=0)
    mu = 1e6  # mu log sum exp(f / mu) = mean(f) + mu log T + O(1 / mu)
    assert float(smooth_tchebycheff(f, mu)) - mu * math.log(4) == pytest.approx(float(f.mean()), abs=1e-6)
    equal = torch.full((4,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(_stch_weights(f, mu), equal, atol=1e-6, rtol=0)


def test_stch_warm_up_nadir_epoch_and_smooth_tchebycheff_steps_by_hand():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    ctx = context(model, tasks, batches(tasks, count=6), lr=0.1)
    recorded, step = [], ctx.step
    ctx.step = lambda names, loss: (recorded.append(loss.item()), step(names, loss))
    method = STCH(tasks, mu=0.5, warmup_epochs=1)
    logged = []
    for epoch in range(3):  # warm-up, nadir, STCH; two iterations each
        for _ in range(2):
            logged.append(np.array([v.item() for v in method.iteration(ctx).values()], dtype=np.float64))
        method.epoch_end()
    for it in range(4):  # the mean log-loss
        assert recorded[it] == pytest.approx(np.log(logged[it] + 1e-20).mean(), rel=1e-6)
    nadir = (logged[2] + logged[3]) / 2  # the nadir epoch's mean losses
    np.testing.assert_allclose([method.nadir[t].item() for t in tasks], nadir, rtol=1e-6)
    for it in (4, 5):
        f = np.log(logged[it] / nadir + 1e-20)
        assert recorded[it] == pytest.approx(0.5 * np.log(np.exp(f / 0.5).sum()), rel=1e-5, abs=1e-6)
    weights = np.exp(f / 0.5) / np.exp(f / 0.5).sum()  # the last step's
    np.testing.assert_allclose(list(method.task_weights().values()), weights, rtol=1e-5)


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
        d = method.aggregate(J, _losses(loss_values))
        g = J.numpy()
        h = g * (loss_values / (np.linalg.norm(g, axis=1) + 1e-8))[:, None] if rescale else g
        y = y - beta / k**beta_sigma * (y - h)  # y_{k+1} = y_k - beta_k (y_k - h_k), exactly
        lam = _project(lam - gamma / k**gamma_sigma * ((y @ y.T + rho * np.eye(3)) @ lam))
        tracked = np.stack([method.tracked[t].numpy() for t in TASKS])
        np.testing.assert_allclose(tracked, y, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose([method.weights[t] for t in TASKS], lam, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(d.numpy(), lam @ y, rtol=1e-9, atol=1e-12)
        assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0)
    assert not np.allclose(lam, 1 / 3)


def test_moco_keeps_tracked_gradients_per_task_and_weights_per_task_set():
    method = build("moco", rescale_to_loss=False)
    J = _random_jacobian(3, 4, 0)
    method.aggregate(J, _losses([1, 1, 1]))
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
        before = _snapshot(model, tasks)
        samples = [_per_batch(model, data[3 * it + i], tasks) for i in range(3)]
        logged = method.iteration(ctx)
        J0, J1, J2 = (s[1] for s in samples)
        lam = _project(lam - 0.05 * (J1 @ J2.T @ lam + 0.1 * lam))
        np.testing.assert_allclose([method.weights[t] for t in tasks], lam, rtol=1e-6)
        assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0)
        heads = {t: sum(s[2][t] for s in samples) / 3 for t in tasks}
        _assert_sgd_step(model, before, lam @ J0, heads)
        np.testing.assert_allclose([v.item() for v in logged.values()], samples[0][0], rtol=1e-6)
        wrong = _project(np.full(2, 0.5) - 0.05 * (J0 @ J0.T @ np.full(2, 0.5) + 0.1 * np.full(2, 0.5)))
        assert it > 0 or not np.allclose(wrong, lam)  # the update batch's own product gives other weights
    counts = ctx.counts
    assert (counts.forward_passes, counts.backward_passes, counts.optimizer_steps) == (6, 12, 2)


def _sdmgrad_w(product: np.ndarray, w: np.ndarray, lamda: float, steps: int, lr: float, momentum: float):
    a = product / (np.sqrt(np.maximum(np.diag(product), 0)).mean() ** 2 + 1e-8)
    velocity = None
    for _ in range(steps):
        grad = a @ w + lamda * a.mean(axis=1)  # A w + lamda A 1 / T
        velocity = grad if velocity is None else momentum * velocity + grad
        w = _project(w - lr * velocity)
    return w


def test_sdmgrad_weights_from_two_fresh_batches_and_direction_from_the_first():
    model, data, ctx, tasks = _three_batches_setup()
    method = SDMGrad(tasks, lamda=0.3, inner_steps=5, inner_lr=0.5, momentum=0.5)
    w = np.full(2, 0.5)
    for it in range(2):
        before = _snapshot(model, tasks)
        samples = [_per_batch(model, data[3 * it + i], tasks) for i in range(3)]
        method.iteration(ctx)
        J0, J1, J2 = (s[1] for s in samples)
        w = _sdmgrad_w(J1 @ J2.T, w, 0.3, 5, 0.5, 0.5)
        c = (w + 0.3 / 2) / 1.3
        np.testing.assert_allclose([method.weights[t] for t in tasks], c, rtol=1e-6)
        heads = {t: sum(s[2][t] for s in samples) / 3 for t in tasks}
        _assert_sgd_step(model, before, c @ J0, heads)
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


# --- ExcessMTL ----------------------------------------------------------------------------------------------


def test_excess_mtl_weights_rise_for_the_task_with_the_larger_normalised_excess_risk():
    method = ExcessMTL(["a", "b"], robust_step_size=0.5)
    sums, log_w, baselines = np.zeros((2, 3)), np.zeros(2), None
    rows = [
        [[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]],
        [[1.0, 2.0, 0.0], [0.05, 0.0, 0.1]],
        [[3.0, 0.0, 1.0], [0.05, 0.1, 0.0]],
    ]
    for step, J in enumerate(rows):
        J = np.array(J)
        method.update(torch.tensor(J, dtype=torch.float32), ["a", "b"])
        sums += J**2
        estimates = (J**2 / np.sqrt(sums + 1e-7)).sum(axis=1)  # g^T diag(1 / sqrt(S)) g
        baselines = estimates if baselines is None else baselines
        log_w += 0.5 * estimates / baselines
        w = np.exp(log_w) / np.exp(log_w).sum()
        np.testing.assert_allclose(list(method.task_weights().values()), w, rtol=1e-5)
        if step == 0:
            np.testing.assert_allclose(w, [0.5, 0.5])  # the first step is the baseline: no change
    assert w[0] > 0.5  # task b's gradients shrank ten-fold: it is nearer convergence, a gains weight


def test_excess_mtl_step_is_the_gradient_of_the_weighted_loss():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=2)
    ctx = context(model, tasks, data, lr=0.1)
    method = ExcessMTL(tasks, robust_step_size=2.0)
    sums, log_w, baselines = np.zeros((2, 9)), np.zeros(2), None
    for it in range(2):
        before = _snapshot(model, tasks)
        _, J, heads = _per_batch(model, data[it], tasks)
        method.iteration(ctx)
        sums += J**2
        estimates = (J**2 / np.sqrt(sums + 1e-7)).sum(axis=1)
        baselines = estimates if baselines is None else baselines
        log_w += 2.0 * estimates / baselines
        w = np.exp(log_w) / np.exp(log_w).sum()
        _assert_sgd_step(model, before, w @ J, {t: wt * heads[t] for t, wt in zip(tasks, w)})
    assert not np.allclose(w, 0.5)


def test_excess_mtl_baseline_epochs_keep_equal_weights_and_average_the_baseline():
    method = ExcessMTL(["a", "b"], robust_step_size=1.0, baseline_epochs=1)
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    method.update(J, ["a", "b"])
    method.update(2 * J, ["a", "b"])
    assert method.task_weights() == {"a": 0.5, "b": 0.5}
    method.epoch_end()
    method.update(J, ["a", "b"])
    # per coordinate: S = 1, 5, 6 (times the row's scale^2); estimates 1, 4/sqrt5, 1/sqrt6 (times the scale)
    first, second = np.array([1.0, 2.0]), np.array([4.0, 8.0]) / math.sqrt(5)
    third = np.array([1.0, 2.0]) / math.sqrt(6)
    ratios = third / ((first + second) / 2)
    w = np.exp(ratios) / np.exp(ratios).sum()
    np.testing.assert_allclose(list(method.task_weights().values()), w, rtol=1e-5)
