"""Diagnostics against hand computations on the tiny linear model, and that measuring changes nothing."""

import numpy as np
import pytest
import torch

from mtlrun.diagnostics import Diagnostics
from mtlrun.strategies.alternating import Alternating
from mtlrun.strategies.averaged import Averaged
from tests.helpers import batches, context, linear_model

TASKS = ["a", "b"]


def _run(with_diagnostics: bool, iterations: int = 4, strategy=None):
    model = linear_model(TASKS)
    data = batches(TASKS, count=iterations)
    probe = batches(TASKS, count=1, seed=9)[0]
    ctx = context(model, TASKS, data, lr=0.1)
    strategy = strategy or Alternating(TASKS, seed=0, order="fixed")
    initial = model.encoder.weight.detach().clone()
    diagnostics = Diagnostics(ctx, probe, every=2) if with_diagnostics else None
    snapshots = []
    for _ in range(iterations):
        snapshots.append(model.encoder.weight.detach().clone())
        if diagnostics:
            diagnostics.before_iteration(ctx)
        strategy.iteration(ctx)
        ctx.counts.iterations += 1
        if diagnostics:
            diagnostics.after_iteration(ctx, strategy, epoch=0)
    return model, initial, snapshots, diagnostics, probe, ctx


def test_distances_and_displacements_by_hand():
    model, initial, snapshots, diagnostics, _, _ = _run(True)
    assert [r["iteration"] for r in diagnostics.rows] == [2, 4]
    last = diagnostics.rows[-1]
    theta = model.encoder.weight.detach()
    assert last["distance_from_init"] == pytest.approx((theta - initial).norm().item(), rel=1e-6)
    assert last["displacement"] == pytest.approx((theta - snapshots[3]).norm().item(), rel=1e-6)
    assert last["displacement_per_step"] == pytest.approx(last["displacement"] / 2, rel=1e-6)  # two tasks, two steps


def test_gradient_norms_and_cosines_by_hand():
    model, _, _, diagnostics, probe, _ = _run(True)
    W = model.encoder.weight.detach().double().numpy()
    x = probe["image"].double().numpy()
    grads = {}
    for t in TASKS:
        a = model.heads[t].weight.detach().double().numpy()[0]
        r = (x @ W.T) @ a - probe[t].double().numpy()
        grads[t] = ((2 / len(r)) * np.outer(a, r @ x)).ravel()
    row = diagnostics.rows[-1]
    for t in TASKS:
        assert row[f"grad_norm/{t}"] == pytest.approx(np.linalg.norm(grads[t]), rel=1e-5)
    cosine = grads["a"] @ grads["b"] / np.linalg.norm(grads["a"]) / np.linalg.norm(grads["b"])
    assert row["cosine/a/b"] == pytest.approx(cosine, rel=1e-5, abs=1e-6)


def test_measuring_changes_no_parameter_and_no_count():
    with_model, _, _, _, _, with_ctx = _run(True)
    without_model, _, _, _, _, without_ctx = _run(False)
    for p, q in zip(with_model.parameters(), without_model.parameters()):
        assert torch.equal(p, q)
    assert with_ctx.counts == without_ctx.counts


def test_batch_norm_statistics_are_restored():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    from mtlrun.models.base import MultiTaskModel

    mt = MultiTaskModel(model, {t: torch.nn.Linear(3, 1) for t in TASKS})
    ctx = context(mt, TASKS, batches(TASKS))
    before = mt.encoder[1].running_mean.clone()
    Diagnostics(ctx, batches(TASKS, seed=5)[0], every=1)._gradient_stats(ctx)
    assert torch.equal(mt.encoder[1].running_mean, before)


def test_weights_of_a_weighting_strategy_are_recorded():
    _, _, _, diagnostics, _, _ = _run(True, strategy=Averaged(TASKS, weights={"a": 1.0, "b": 3.0}))
    assert diagnostics.rows[0]["weight/a"] == 1.0 and diagnostics.rows[0]["weight/b"] == 3.0


def test_lookahead_affinity_by_hand():
    """Fifty et al.'s lookahead: 1 - L_t(W - lr g_s) / L_t(W) on the probe batch, computed here in float64."""
    model, _, _, diagnostics, probe, ctx = _run(True)
    W = model.encoder.weight.detach().double().numpy()
    x = probe["image"].double().numpy()
    heads = {t: model.heads[t].weight.detach().double().numpy()[0] for t in TASKS}
    targets = {t: probe[t].double().numpy() for t in TASKS}

    def loss(w, t):
        return np.mean(((x @ w.T) @ heads[t] - targets[t]) ** 2)

    def grad(w, t):
        r = (x @ w.T) @ heads[t] - targets[t]
        return (2 / len(r)) * np.outer(heads[t], r @ x)

    row = diagnostics.rows[-1]
    for s in TASKS:
        ahead = W - ctx.optimizer.lr * grad(W, s)
        for t in TASKS:
            assert row[f"affinity/{s}/{t}"] == pytest.approx(1 - loss(ahead, t) / loss(W, t), rel=1e-4, abs=1e-6)
    assert row["affinity/a/a"] > 0 and row["affinity/b/b"] > 0  # a small step on a task lowers its own loss


def test_running_affinity_of_affinity_grouping_is_recorded():
    from mtlrun.strategies.grouped import Grouped

    strategy = Grouped(TASKS, seed=0, group_size=1, grouping="affinity", decay=0.5, warmup=1)
    _, _, _, diagnostics, _, _ = _run(True, strategy=strategy)
    last = diagnostics.rows[-1]
    for i, s in enumerate(TASKS):
        for j, t in enumerate(TASKS):
            assert last[f"running_affinity/{s}/{t}"] == strategy.affinity.matrix[i, j].item()
    assert last["running_affinity/a/a"] > 0 and last["running_affinity/b/b"] > 0  # own steps lower own loss
    plain = _run(True)[3].rows[-1]
    assert not any(k.startswith("running_affinity/") for k in plain)  # only strategies that keep one
