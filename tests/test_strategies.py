"""Each strategy's guarantees, checked on tiny linear models against updates computed by hand."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtlrun.errors import MtlrunError
from mtlrun.strategies import STRATEGIES, build_strategy
from mtlrun.strategies.alternating import Alternating
from mtlrun.strategies.averaged import Averaged
from mtlrun.strategies.grouped import Grouped, random_partition
from tests.helpers import batches, context, linear_model

TASKS = ["a", "b", "c"]


def _grads_by_hand(W, a, x, y):
    """L = mean_i (a W x_i - y_i)^2: returns (dL/dW, dL/da)."""
    h = x @ W.T  # n x d
    r = h @ a - y  # n
    n = len(y)
    return (2 / n) * np.outer(a, r @ x), (2 / n) * (r @ h)


def test_two_alternating_sgd_steps_equal_sequential_per_task_updates():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=2)
    W = model.encoder.weight.detach().double().numpy().copy()
    heads = {t: model.heads[t].weight.detach().double().numpy()[0].copy() for t in tasks}
    lr = 0.1
    ctx = context(model, tasks, data, lr=lr)
    strategy = Alternating(tasks, seed=0, order="fixed")
    for it in range(2):
        strategy.iteration(ctx)
        x = data[it]["image"].double().numpy()
        for t in tasks:  # a then b, each on the same batch, each from the parameters the previous step left
            gW, ga = _grads_by_hand(W, heads[t], x, data[it][t].double().numpy())
            W, heads[t] = W - lr * gW, heads[t] - lr * ga
    np.testing.assert_allclose(model.encoder.weight.detach().numpy(), W, rtol=1e-5, atol=1e-6)
    for t in tasks:
        np.testing.assert_allclose(model.heads[t].weight.detach().numpy()[0], heads[t], rtol=1e-5, atol=1e-6)
    assert ctx.counts.optimizer_steps == 4 and ctx.counts.forward_passes == 4 and ctx.counts.backward_passes == 4


def test_averaged_sgd_step_is_the_weighted_mean_gradient():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=1)
    W = model.encoder.weight.detach().double().numpy().copy()
    heads = {t: model.heads[t].weight.detach().double().numpy()[0].copy() for t in tasks}
    ctx = context(model, tasks, data, lr=0.1)
    Averaged(tasks, weights={"a": 1.0, "b": 3.0}).iteration(ctx)
    x = data[0]["image"].double().numpy()
    grads = {t: _grads_by_hand(W, heads[t], x, data[0][t].double().numpy()) for t in tasks}
    expected_W = W - 0.1 * (1 * grads["a"][0] + 3 * grads["b"][0]) / 4
    np.testing.assert_allclose(model.encoder.weight.detach().numpy(), expected_W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.heads["b"].weight.detach().numpy()[0], heads["b"] - 0.1 * 3 / 4 * grads["b"][1], rtol=1e-5)
    assert ctx.counts.optimizer_steps == 1 and ctx.counts.forward_passes == 1


def test_fresh_batches_give_each_step_the_next_batch():
    tasks = ["a", "b"]
    model = linear_model(tasks)
    data = batches(tasks, count=2)
    W = model.encoder.weight.detach().double().numpy().copy()
    heads = {t: model.heads[t].weight.detach().double().numpy()[0].copy() for t in tasks}
    ctx = context(model, tasks, data, lr=0.1)
    Alternating(tasks, seed=0, order="fixed", batch="fresh").iteration(ctx)
    for i, t in enumerate(tasks):
        gW, ga = _grads_by_hand(W, heads[t], data[i]["image"].double().numpy(), data[i][t].double().numpy())
        W, heads[t] = W - 0.1 * gW, heads[t] - 0.1 * ga
    np.testing.assert_allclose(model.encoder.weight.detach().numpy(), W, rtol=1e-5, atol=1e-6)


def _train(strategy, optimizer: dict, iterations: int = 5) -> list[torch.Tensor]:
    model = linear_model(TASKS)
    ctx = context(model, TASKS, batches(TASKS), **optimizer)
    for _ in range(iterations):
        strategy.iteration(ctx)
    return [p.detach().clone() for p in model.parameters()]


OPTIMIZERS = [
    {"name": "adam", "lr": 0.01, "moments": "per_task"},
    {"name": "adam", "lr": 0.01, "moments": "shared"},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "moments": "per_task"},
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_grouped_size_one_is_exactly_alternating(optimizer):
    grouped = _train(Grouped(TASKS, seed=7, group_size=1), optimizer)
    alternating = _train(Alternating(TASKS, seed=7, order="random"), optimizer)
    for g, a in zip(grouped, alternating):
        torch.testing.assert_close(g, a, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("group_size", [3, 5])
def test_grouped_size_at_least_tasks_is_exactly_averaged(optimizer, group_size):
    grouped = _train(Grouped(TASKS, seed=7, group_size=group_size), optimizer)
    averaged = _train(Averaged(TASKS), optimizer)
    for g, a in zip(grouped, averaged):
        torch.testing.assert_close(g, a, rtol=0, atol=0)


def test_grouped_size_two_differs_from_both():
    optimizer = OPTIMIZERS[0]
    grouped = _train(Grouped(TASKS, seed=7, group_size=2), optimizer)
    averaged = _train(Averaged(TASKS), optimizer)
    assert not all(torch.equal(g, a) for g, a in zip(grouped, averaged))


@pytest.mark.parametrize("num_tasks,group_size", [(1, 1), (4, 1), (4, 2), (5, 2), (7, 3), (4, 4), (3, 8)])
def test_random_partition_covers_every_task_exactly_once(num_tasks, group_size):
    tasks = [f"t{i}" for i in range(num_tasks)]
    generator = torch.Generator().manual_seed(0)
    partitions = set()
    for _ in range(50):
        groups = random_partition(tasks, group_size, generator)
        flat = [t for g in groups for t in g]
        assert sorted(flat) == sorted(tasks)
        assert all(len(g) == group_size for g in groups[:-1]) and 1 <= len(groups[-1]) <= group_size
        assert len(groups) == -(-num_tasks // group_size)
        partitions.add(tuple(tuple(sorted(g)) for g in groups))
    if 1 < group_size < num_tasks:
        assert len(partitions) > 1  # fresh every iteration, not fixed once


def test_alternating_random_order_changes_and_each_task_steps_once():
    model = linear_model(TASKS)
    ctx = context(model, TASKS, batches(TASKS))
    strategy = Alternating(TASKS, seed=0)
    orders = set()
    original = ctx.step

    def record(tasks, loss):
        record.seen.append(tuple(tasks))
        original(tasks, loss)

    ctx.step = record
    for _ in range(10):
        record.seen = []
        strategy.iteration(ctx)
        assert sorted(t for (t,) in record.seen) == TASKS
        orders.add(tuple(t for (t,) in record.seen))
    assert len(orders) > 1


def test_strategy_state_round_trip_reproduces_choices():
    a = Grouped(TASKS, seed=3, group_size=2)
    for _ in range(3):
        random_partition(TASKS, 2, a.generator)
    b = Grouped(TASKS, seed=99, group_size=2)
    b.load_state_dict(a.state_dict())
    assert random_partition(TASKS, 2, a.generator) == random_partition(TASKS, 2, b.generator)


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"name": "grouped", "group_size": 0, "batch": "same"}, "group_size must be an integer >= 1"),
        ({"name": "grouped", "group_size": 1.5, "batch": "same"}, "strategy.group_size must be an integer"),
        ({"name": "alternating", "order": "sorted", "batch": "same"}, "strategy.order"),
        ({"name": "alternating", "order": "random", "batch": "new"}, "strategy.batch"),
        ({"name": "averaged", "weights": {"a": 1.0}}, "one weight per task"),
        ({"name": "averaged", "weights": {"a": -1.0, "b": 1.0, "c": 1.0}}, ">= 0"),
        ({"name": "nope"}, "known: adatask, aligned_mtl, alternating, averaged, cagrad"),
    ],
)
def test_bad_settings_are_refused(cfg, message):
    with pytest.raises(MtlrunError, match=message):
        build_strategy(OmegaConf.create(cfg), TASKS, seed=0)


def test_every_strategy_has_a_conf_file():
    from mtlrun.run.overrides import config_groups

    assert sorted(STRATEGIES) == config_groups()["strategy"]


def test_jacobian_rows_equal_separate_backward_passes():
    model = linear_model(TASKS)
    data = batches(TASKS, count=1)
    ctx = context(model, TASKS, data)
    batch = ctx.next_batch()
    jacobian, heads = ctx.jacobian(ctx.losses(batch, TASKS))
    assert jacobian.shape == (3, 9)
    for i, t in enumerate(TASKS):
        model.zero_grad()
        ctx.losses(batch, [t])[t].backward()
        torch.testing.assert_close(jacobian[i], model.encoder.weight.grad.flatten())
        torch.testing.assert_close(heads[t], model.heads[t].weight.grad.flatten())
    assert ctx.counts.backward_passes == 3


def test_grouped_combine_builds_the_method_from_its_conf_and_averaged_equals_mean():
    cfg = {"name": "grouped", "group_size": 2, "batch": "same", "combine_settings": {}}
    plain = build_strategy(OmegaConf.create({**cfg, "combine": None}), TASKS, seed=4)
    weighted = build_strategy(
        OmegaConf.create({**cfg, "combine": "averaged", "combine_settings": {"weights": {"a": 1, "b": 1, "c": 1}}}),
        TASKS, seed=4,
    )
    assert isinstance(weighted.combiner, Averaged) and weighted.combiner.weights == {"a": 1, "b": 1, "c": 1}
    for g, a in zip(_train(plain, OPTIMIZERS[0]), _train(weighted, OPTIMIZERS[0])):
        torch.testing.assert_close(g, a, rtol=0, atol=0)


def test_grouped_combine_applies_the_method_inside_each_group():
    weights = {"a": 1.0, "b": 3.0, "c": 0.5}
    grouped = Grouped(TASKS, seed=1, group_size=2, combiner=Averaged(TASKS, weights=weights))
    seen = []
    model = linear_model(TASKS)
    ctx = context(model, TASKS, batches(TASKS))
    ctx.step = lambda tasks, loss: seen.append((tuple(tasks), loss.item()))
    batch = batches(TASKS)[0]
    losses = {t: v.item() for t, v in ctx.losses(batch, TASKS).items()}
    grouped.iteration(ctx)
    assert sorted(t for group, _ in seen for t in group) == TASKS
    for group, loss in seen:  # each group's loss is its own weighted mean
        expected = sum(weights[t] * losses[t] for t in group) / sum(weights[t] for t in group)
        assert loss == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "combine,settings,message",
    [("alternating", {}, "not a method to combine"), ("averaged", {"c": 1}, "does not know")],
)
def test_grouped_combine_refuses_bad_methods(combine, settings, message):
    cfg = {"name": "grouped", "group_size": 2, "batch": "same", "combine": combine, "combine_settings": settings}
    with pytest.raises(MtlrunError, match=message):
        build_strategy(OmegaConf.create(cfg), TASKS, seed=0)


def test_single_task_steps_only_its_task():
    strategy = build_strategy(OmegaConf.create({"name": "single_task", "task": "b"}), TASKS, seed=0)
    assert strategy.trains(TASKS) == ["b"]
    model = linear_model(TASKS)
    heads_before = {t: model.heads[t].weight.detach().clone() for t in TASKS}
    ctx = context(model, TASKS, batches(TASKS))
    assert list(strategy.iteration(ctx)) == ["b"]
    assert not torch.equal(model.heads["b"].weight, heads_before["b"])
    assert torch.equal(model.heads["a"].weight, heads_before["a"]) and ctx.counts.optimizer_steps == 1
    with pytest.raises(MtlrunError, match="strategy.task=None must name one task"):
        build_strategy(OmegaConf.create({"name": "single_task", "task": None}), TASKS, seed=0)
