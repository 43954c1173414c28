"""AdaTask against T hand-written torch.optim.Adam states, and its refusals."""

import pytest
import torch

from mtlrun.errors import MtlrunError
from mtlrun.strategies.adatask import AdaTask
from mtlrun.strategies.grouped import Grouped
from tests.helpers import batches, context, linear_model

TASKS = ["a", "b", "c"]


def _by_hand(model, data, lr, weight_decay=0.0):
    """One torch.optim.Adam per task for the shared W (each fed only its task's gradient; the directions
    summed) and one per head, over the same batches."""
    W = model.encoder.weight.detach().clone()
    heads = {t: model.heads[t].weight.detach().clone().requires_grad_() for t in TASKS}
    shadows = {t: W.clone().requires_grad_() for t in TASKS}  # each state's copy of W: its direction alone
    shared_opts = {t: torch.optim.Adam([shadows[t]], lr=lr, weight_decay=weight_decay) for t in TASKS}
    head_opts = {t: torch.optim.Adam([heads[t]], lr=lr, weight_decay=weight_decay) for t in TASKS}
    for batch in data:
        w = W.clone().requires_grad_()
        features = batch["image"] @ w.T
        losses = {t: ((features @ heads[t].T).squeeze(-1) - batch[t]).pow(2).mean() for t in TASKS}
        update = torch.zeros_like(W)
        for t in TASKS:
            g_w, g_head = torch.autograd.grad(losses[t], [w, heads[t]], retain_graph=True)
            with torch.no_grad():
                shadows[t].copy_(W)
            shadows[t].grad = g_w
            shared_opts[t].step()
            update += shadows[t].detach() - W
            heads[t].grad = g_head
            head_opts[t].step()
        W = W + update
    return W, {t: h.detach() for t, h in heads.items()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adatask_equals_one_adam_per_task_with_summed_directions(weight_decay):
    data = batches(TASKS, count=4)
    model = linear_model(TASKS)
    expected_w, expected_heads = _by_hand(model, data, lr=0.01, weight_decay=weight_decay)
    ctx = context(model, TASKS, data, name="adam", lr=0.01, weight_decay=weight_decay)
    method = AdaTask(TASKS)
    for _ in data:
        method.iteration(ctx)
    torch.testing.assert_close(model.encoder.weight.detach(), expected_w, rtol=1e-5, atol=1e-6)
    for t in TASKS:
        torch.testing.assert_close(model.heads[t].weight.detach(), expected_heads[t], rtol=1e-5, atol=1e-6)
    states = ctx.optimizer.shared.slots
    assert len({id(states[t]) for t in TASKS}) == 3 and all(states[t]["step"] == 4 for t in TASKS)
    assert ctx.counts.forward_passes == 4 and ctx.counts.backward_passes == 12 and ctx.counts.optimizer_steps == 4


@pytest.mark.parametrize("optimizer", [{"name": "sgd"}, {"name": "adam", "moments": "shared"}])
def test_adatask_refuses_settings_without_per_task_adam_moments(optimizer):
    data = batches(TASKS, count=1)
    ctx = context(linear_model(TASKS), TASKS, data, **optimizer)
    with pytest.raises(MtlrunError, match="optimizer.moments=per_task"):
        AdaTask(TASKS).iteration(ctx)


def test_adatask_inside_groups_keeps_every_task_state_apart():
    data = batches(TASKS, count=2)
    ctx = context(linear_model(TASKS), TASKS, data, name="adam", lr=0.01)
    method = Grouped(TASKS, seed=0, group_size=2, combiner=AdaTask(TASKS))
    for _ in data:
        method.iteration(ctx)
    states = ctx.optimizer.shared.slots
    assert len({id(states[t]) for t in TASKS}) == 3 and all(states[t]["step"] == 2 for t in TASKS)
    assert ctx.counts.optimizer_steps == 4  # two groups per iteration
