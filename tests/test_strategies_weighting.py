"""Loss-weighting methods: each update checked by hand on tiny linear models, plus what every method must do
(one optimizer step per call, any subset of tasks, state that resumes identically, no NaN when degenerate)."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import SeededStrategy
from mtlrun.strategies.db_mtl import DBMTL
from mtlrun.strategies.dwa import DWA
from mtlrun.strategies.excess_mtl import ExcessMTL
from mtlrun.strategies.famo import FAMO
from mtlrun.strategies.gls import GLS
from mtlrun.strategies.gradnorm import GradNorm, weight_gradient
from mtlrun.strategies.rlw import RLW
from mtlrun.strategies.stch import STCH, smooth_tchebycheff
from mtlrun.strategies.task_scalars import TaskScalars
from mtlrun.strategies.uncertainty import Uncertainty
from tests.helpers import assert_sgd_step, batches, context, linear_model, per_batch_float64, snapshot

TASKS = ["a", "b", "c"]
METHODS = {cls.name: cls for cls in (Uncertainty, DWA, RLW, GradNorm, FAMO, DBMTL, GLS)}


def _make(name: str, tasks: list[str], seed: int = 0):
    cls = METHODS[name]
    return cls(tasks, seed=seed) if issubclass(cls, SeededStrategy) else cls(tasks)


def _combine(strategy, ctx, batch, tasks) -> None:
    strategy.combine(ctx, ctx.losses(batch, tasks))


# ---- by hand: L_t = mean_i (a_t W x_i - y_i)^2 on the linear model of tests/helpers.py ----


def _params(model, tasks):
    W = model.encoder.weight.detach().double().numpy().copy()
    return W, {t: model.heads[t].weight.detach().double().numpy()[0].copy() for t in tasks}


def _xy(batch, task):
    return batch["image"].double().numpy(), batch[task].double().numpy()


def _loss(W, a, x, y):
    return float(np.mean((x @ W.T @ a - y) ** 2))


def _grads(W, a, x, y):
    """(dL/dW, dL/da)."""
    h = x @ W.T
    r = h @ a - y
    return (2 / len(y)) * np.outer(a, r @ x), (2 / len(y)) * (r @ h)


class _Adam:
    """torch.optim.Adam's update with L2 weight decay, in numpy."""

    def __init__(self, x, lr, weight_decay=0.0):
        self.x, self.lr, self.weight_decay = np.array(x, dtype=float), lr, weight_decay
        self.m, self.v, self.k = np.zeros_like(self.x), np.zeros_like(self.x), 0

    def step(self, g):
        g = g + self.weight_decay * self.x
        self.k += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        denom = np.sqrt(self.v) / np.sqrt(1 - 0.999**self.k) + 1e-8
        self.x = self.x - self.lr / (1 - 0.9**self.k) * self.m / denom


def _record_losses(ctx) -> list[float]:
    recorded, original = [], ctx.step

    def step(tasks, loss):
        recorded.append(loss.item())
        original(tasks, loss)

    ctx.step = step
    return recorded


def _assert_model(model, W, heads):
    np.testing.assert_allclose(model.encoder.weight.detach().numpy(), W, rtol=1e-5, atol=1e-6)
    for t, a in heads.items():
        np.testing.assert_allclose(model.heads[t].weight.detach().numpy()[0], a, rtol=1e-5, atol=1e-6)


def test_task_scalars_take_torch_adam_steps_per_task():
    scalars = TaskScalars(TASKS, 0.3, lr=0.05, weight_decay=0.01)
    params = {t: torch.tensor(0.3, requires_grad=True) for t in TASKS}
    optimizers = {t: torch.optim.Adam([params[t]], lr=0.05, weight_decay=0.01) for t in TASKS}
    for names, grad in [("ac", [0.5, -1.0]), ("b", [2.0]), ("abc", [0.1, -0.3, 0.7]), ("ac", [-0.2, 0.4])]:
        scalars.adam_step(list(names), torch.tensor(grad))
        for t, g in zip(names, grad):
            params[t].grad = torch.tensor(g)
            optimizers[t].step()
    torch.testing.assert_close(scalars.get(TASKS), torch.stack([params[t].detach() for t in TASKS]))
    assert [scalars.steps[t].item() for t in TASKS] == [3, 2, 3]


def test_uncertainty_loss_and_log_variance_gradient_by_hand():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=2)
    W, heads = _params(model, tasks)
    ctx = context(model, tasks, data, lr=0.1)
    strategy = Uncertainty(tasks, lr=0.05)
    state = strategy.state_dict()
    state["log_variances"]["values"] = {"a": torch.tensor(0.5), "b": torch.tensor(-0.2)}
    strategy.load_state_dict(state)
    recorded = _record_losses(ctx)
    s = _Adam([0.5, -0.2], lr=0.05)
    for it in range(2):
        strategy.iteration(ctx)
        L = np.array([_loss(W, heads[t], *_xy(data[it], t)) for t in tasks])
        grads = [_grads(W, heads[t], *_xy(data[it], t)) for t in tasks]
        assert recorded[it] == pytest.approx(float(np.sum(np.exp(-s.x) * L + s.x)), rel=1e-5)
        precision = np.exp(-s.x)
        W = W - 0.1 * sum(p * g[0] for p, g in zip(precision, grads))
        heads = {t: heads[t] - 0.1 * p * g[1] for t, p, g in zip(tasks, precision, grads)}
        s.step(1 - precision * L)  # d/ds_t of exp(-s_t) L_t + s_t
    _assert_model(model, W, heads)
    np.testing.assert_allclose(strategy.log_variances.get(tasks).numpy(), s.x, rtol=1e-5)
    assert ctx.counts.optimizer_steps == 2 and ctx.counts.backward_passes == 2


def test_dwa_weights_from_loss_histories_by_hand():
    model = linear_model(TASKS)
    ctx = context(model, TASKS, batches(TASKS))
    seen = []
    ctx.step = lambda tasks, loss: seen.append((tuple(tasks), loss.item()))
    strategy = DWA(TASKS, temperature=2.0)

    def step(**losses):
        strategy.combine(ctx, {t: torch.tensor(v) for t, v in losses.items()})
        return seen[-1][1]

    assert step(a=3.0, b=1.0, c=4.0) == pytest.approx(8.0)  # weights 1 for the first two epochs
    step(a=1.0, b=1.0, c=4.0)
    strategy.epoch_end()  # epoch means: a 2, b 1, c 4
    assert step(a=1.0, b=1.0, c=2.0) == pytest.approx(4.0)
    strategy.epoch_end()  # epoch means: a 1, b 1, c 2; ratios 1/2, 1/1, 2/4
    e = [math.exp(0.5 / 2), math.exp(1.0 / 2), math.exp(0.5 / 2)]
    w = [3 * v / sum(e) for v in e]
    assert strategy.task_weights() == pytest.approx(dict(zip(TASKS, w)))
    assert sum(strategy.task_weights().values()) == pytest.approx(3.0)
    assert step(a=2.0, b=3.0, c=5.0) == pytest.approx(w[0] * 2 + w[1] * 3 + w[2] * 5)
    e = [math.exp(0.5 / 2), math.exp(0.5 / 2)]  # a group of two: softmax over the group, summing to 2
    assert step(a=2.0, c=5.0) == pytest.approx(2 * (e[0] * 2 + e[1] * 5) / sum(e))


def test_rlw_weights_are_the_softmax_of_seeded_standard_normal_draws():
    model = linear_model(TASKS)
    ctx = context(model, TASKS, batches(TASKS))
    seen = []
    ctx.step = lambda tasks, loss: seen.append(loss.item())
    strategy = RLW(TASKS, seed=5)
    reference = torch.Generator().manual_seed(5)
    losses = {"a": 1.0, "b": 2.0, "c": 4.0}
    for _ in range(2):
        strategy.combine(ctx, {t: torch.tensor(v) for t, v in losses.items()})
        w = torch.softmax(torch.randn(3, generator=reference), dim=0).tolist()
        assert seen[-1] == pytest.approx(sum(wt * losses[t] for wt, t in zip(w, TASKS)))
        assert strategy.task_weights() == pytest.approx(dict(zip(TASKS, w)))


@pytest.mark.parametrize("distribution,variance", [("normal", 2.0), ("uniform", 1 / 6)])
def test_rlw_draws_are_positive_sum_to_one_and_have_the_stated_distribution(distribution, variance):
    strategy = RLW(TASKS, seed=0, distribution=distribution)
    draws = torch.stack([strategy.draw(2) for _ in range(4000)])
    assert (draws > 0).all()
    torch.testing.assert_close(draws.sum(dim=1), torch.ones(4000))
    log_ratio = (draws[:, 0] / draws[:, 1]).log()  # = z_a - z_b
    assert abs(log_ratio.mean().item()) < 0.06
    assert log_ratio.var().item() == pytest.approx(variance, rel=0.08)
    if distribution == "uniform":
        assert log_ratio.abs().max() < 1


def test_rlw_is_seeded_and_its_state_resumes_the_draws():
    a, b, c = RLW(TASKS, seed=3), RLW(TASKS, seed=3), RLW(TASKS, seed=4)
    assert torch.equal(a.draw(3), b.draw(3)) and not torch.equal(a.draw(3), c.draw(3))
    resumed = RLW(TASKS, seed=99)
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(a.draw(3), resumed.draw(3))


def test_gradnorm_weight_update_on_a_two_task_linear_example_by_hand():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=2)
    W, heads = _params(model, tasks)
    ctx = context(model, tasks, data, lr=0.1)
    strategy = GradNorm(tasks, alpha=1.5, lr=0.1)
    adam, weights, initial = _Adam([1.0, 1.0], lr=0.1), np.ones(2), None
    for it in range(2):
        strategy.iteration(ctx)
        L = np.array([_loss(W, heads[t], *_xy(data[it], t)) for t in tasks])
        grads = [_grads(W, heads[t], *_xy(data[it], t)) for t in tasks]
        norms = np.array([np.linalg.norm(g[0]) for g in grads])  # ||grad_W L_t||, W the only shared layer
        W = W - 0.1 * sum(w * g[0] for w, g in zip(weights, grads))  # the step uses the weights before update
        heads = {t: heads[t] - 0.1 * w * g[1] for t, w, g in zip(tasks, weights, grads)}
        initial = L if initial is None else initial
        ratios = L / initial
        G = weights * norms
        target = G.mean() * (ratios / ratios.mean()) ** 1.5
        adam.x = weights
        adam.step(np.sign(G - target) * norms)  # d/dw_t of sum_t |w_t ||g_t|| - target_t|
        weights = 2 * adam.x / adam.x.sum()
    _assert_model(model, W, heads)
    assert not np.allclose(weights, 1.0)
    np.testing.assert_allclose(list(strategy.task_weights().values()), weights, rtol=1e-5)
    assert ctx.counts.optimizer_steps == 2 and ctx.counts.backward_passes == 2 * (2 + 1)


@pytest.mark.parametrize("alpha,signs", [(1.5, [-1, 1]), (1.0, [1, -1])])
def test_gradnorm_weight_gradient_by_hand(alpha, signs):
    """n = (1.17, 1.03), loss ratios (1, 0.9): r = (1.0526, 0.9474), mean(w n) = 1.1, so the targets
    1.1 r^alpha are (1.188, 1.014) for alpha 1.5 and (1.158, 1.042) for alpha 1: the signs flip."""
    grad = weight_gradient(torch.ones(2), torch.tensor([1.17, 1.03]), torch.tensor([1.0, 0.9]), alpha)
    torch.testing.assert_close(grad, torch.tensor(signs) * torch.tensor([1.17, 1.03]))
    doubled = weight_gradient(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), alpha)
    torch.testing.assert_close(doubled, torch.tensor([1.0, -1.0]))  # equal rates: the larger G_t is pulled down


def test_famo_logit_update_after_each_step_by_hand():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=2)
    W, heads = _params(model, tasks)
    ctx = context(model, tasks, data, lr=0.1)
    strategy = FAMO(tasks, lr=0.1, gamma=0.01)
    logits = _Adam([0.0, 0.0], lr=0.1, weight_decay=0.01)
    for it in range(2):
        strategy.iteration(ctx)
        xy = {t: _xy(data[it], t) for t in tasks}
        D = np.array([_loss(W, heads[t], *xy[t]) for t in tasks]) + 1e-8
        grads = [_grads(W, heads[t], *xy[t]) for t in tasks]
        z = np.exp(logits.x) / np.exp(logits.x).sum()
        coef = z / ((z / D).sum() * D)  # the gradient of sum_t z_t log D_t / c with c held constant
        W = W - 0.1 * sum(k * g[0] for k, g in zip(coef, grads))
        heads = {t: heads[t] - 0.1 * k * g[1] for t, k, g in zip(tasks, coef, grads)}
        after = np.array([_loss(W, heads[t], *xy[t]) for t in tasks]) + 1e-8  # same batch, after the step
        delta = np.log(D) - np.log(after)
        logits.step(z * (delta - (z * delta).sum()))  # J_softmax^T delta
    _assert_model(model, W, heads)
    np.testing.assert_allclose(strategy.logits.get(tasks).numpy(), logits.x, rtol=1e-4, atol=1e-7)
    assert np.abs(logits.x).min() > 0.05
    assert ctx.counts.optimizer_steps == 2 and ctx.counts.forward_passes == 4 and ctx.counts.backward_passes == 2


def test_db_mtl_per_task_gradient_scaling_by_hand():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=2)
    W, heads = _params(model, tasks)
    ctx = context(model, tasks, data, lr=0.1)
    strategy = DBMTL(tasks, beta=0.9, beta_sigma=0.5)
    averages = np.zeros((2, 9))
    for it in range(2):
        strategy.iteration(ctx)
        L = np.array([_loss(W, heads[t], *_xy(data[it], t)) for t in tasks])
        grads = [_grads(W, heads[t], *_xy(data[it], t)) for t in tasks]
        log_grads = np.stack([g[0].ravel() / (loss + 1e-8) for g, loss in zip(grads, L)])  # grad log(L + eps)
        beta = 0.9 / (it + 1) ** 0.5
        averages = log_grads + beta * (averages - log_grads)
        norms = np.linalg.norm(averages, axis=1)
        scales = norms.max() / (norms + 1e-8)
        W = W - 0.1 * (scales[:, None] * averages).sum(axis=0).reshape(3, 3)
        heads = {t: heads[t] - 0.1 * g[1] / (loss + 1e-8) for t, g, loss in zip(tasks, grads, L)}
    _assert_model(model, W, heads)
    assert not np.allclose(scales, 1.0)
    np.testing.assert_allclose(list(strategy.task_weights().values()), scales, rtol=1e-5)
    assert ctx.counts.optimizer_steps == 2 and ctx.counts.backward_passes == 4


def test_db_mtl_step_ignores_a_constant_factor_on_a_task_loss():
    data = batches(TASKS, count=1)
    models = [linear_model(TASKS), linear_model(TASKS)]
    for model, factor in zip(models, (1.0, 100.0)):
        ctx = context(model, TASKS, data, lr=0.1)
        losses = ctx.losses(data[0], TASKS)
        losses["b"] = factor * losses["b"]
        DBMTL(TASKS).combine(ctx, losses)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_gls_loss_is_the_geometric_mean_and_its_gradient_by_hand():
    model = linear_model(TASKS)
    data = batches(TASKS, count=1)
    W, heads = _params(model, TASKS)
    ctx = context(model, TASKS, data, lr=0.1)
    recorded = _record_losses(ctx)
    GLS(TASKS).iteration(ctx)
    L = np.array([_loss(W, heads[t], *_xy(data[0], t)) for t in TASKS])
    grads = [_grads(W, heads[t], *_xy(data[0], t)) for t in TASKS]
    G = np.prod(L) ** (1 / 3)
    assert recorded[0] == pytest.approx(G, rel=1e-6)
    coef = G / (3 * L)  # d G / d L_t
    _assert_model(
        model, W - 0.1 * sum(k * g[0] for k, g in zip(coef, grads)),
        {t: heads[t] - 0.1 * k * g[1] for t, k, g in zip(TASKS, coef, grads)},
    )


# ---- what every method must do ----

def _subset_state_ok(name, strategy) -> bool:
    """After one step on tasks a and c: task b's state is as it started, the group's weights are the group's."""
    state = strategy.state_dict()
    scalars = {"uncertainty": "log_variances", "gradnorm": "weights", "famo": "logits"}
    if name in scalars:
        s = state[scalars[name]]
        steps = [s["steps"][t].item() for t in TASKS]
        return steps == [1, 0, 1] and s["values"]["b"].item() == (1.0 if name == "gradnorm" else 0.0)
    if name == "db_mtl":
        return state["steps"] == {"a": 1, "b": 0, "c": 1} and set(state["averages"]) == {"a", "c"}
    if name == "dwa":
        return state["counts"] == {"a": 1, "b": 0, "c": 1}
    if name == "rlw":  # one weight per task of the group, summing to 1
        weights = strategy.task_weights()
        return set(weights) == {"a", "c"} and math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6)
    return state == {}


@pytest.mark.parametrize("name", METHODS)
def test_combine_on_a_subset_steps_only_its_tasks(name):
    model = linear_model(TASKS)
    ctx = context(model, TASKS, batches(TASKS), name="adam", lr=0.01)
    heads = {t: model.heads[t].weight.detach().clone() for t in TASKS}
    encoder = model.encoder.weight.detach().clone()
    strategy = _make(name, TASKS)
    _combine(strategy, ctx, ctx.next_batch(), ["a", "c"])
    assert ctx.counts.optimizer_steps == 1
    assert torch.equal(model.heads["b"].weight, heads["b"])
    assert not torch.equal(model.heads["a"].weight, heads["a"]) and not torch.equal(model.heads["c"].weight, heads["c"])
    assert not torch.equal(model.encoder.weight, encoder)
    assert _subset_state_ok(name, strategy)
    if name == "gradnorm":  # renormalised within the group
        assert sum(strategy.task_weights()[t] for t in "ac") == pytest.approx(2.0)


@pytest.mark.parametrize(
    "cls,settings,message",
    [
        (Uncertainty, {"lr": 0.0}, "strategy.lr must be > 0"),
        (DWA, {"temperature": 0.0}, "strategy.temperature must be > 0"),
        (RLW, {"seed": 0, "distribution": "dirichlet"}, "strategy.distribution='dirichlet' is invalid"),
        (GradNorm, {"alpha": -1.0}, "strategy.alpha must be >= 0"),
        (FAMO, {"gamma": -0.1}, "strategy.gamma must be >= 0"),
        (DBMTL, {"beta": 1.0}, r"strategy.beta must lie in \[0, 1\)"),
        (STCH, {"mu": 0.0}, "strategy.mu"),
        (STCH, {"warmup_epochs": 1.5}, "strategy.warmup_epochs"),
        (ExcessMTL, {"robust_step_size": 0.0}, "strategy.robust_step_size"),
        (ExcessMTL, {"baseline_epochs": -1}, "strategy.baseline_epochs"),
    ],
)
def test_bad_settings_are_refused(cls, settings, message):
    with pytest.raises(MtlrunError, match=message):
        cls(TASKS, **settings)


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
        before = snapshot(model, tasks)
        _, J, heads = per_batch_float64(model, data[it], tasks)
        method.iteration(ctx)
        sums += J**2
        estimates = (J**2 / np.sqrt(sums + 1e-7)).sum(axis=1)
        baselines = estimates if baselines is None else baselines
        log_w += 2.0 * estimates / baselines
        w = np.exp(log_w) / np.exp(log_w).sum()
        assert_sgd_step(model, before, w @ J, {t: wt * heads[t] for t, wt in zip(tasks, w)})
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
