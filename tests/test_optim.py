"""The optimizer against torch's own optimizers and against the per-task-moments formulation by hand."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from mtlrun.optim import MultiTaskOptimizer, OptimizerSettings, lr_factor


def _grads(count: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g) for _ in range(count)]


@pytest.mark.parametrize(
    "name,torch_cls,kwargs",
    [
        ("adam", torch.optim.Adam, {"weight_decay": 0.1}),
        ("adamw", torch.optim.AdamW, {"weight_decay": 0.1}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ],
)
def test_shared_moments_equal_torch_optimizer(name, torch_cls, kwargs):
    """moments=shared is the plain optimizer, whichever tasks each step names."""
    p_ours = torch.nn.Parameter(torch.randn(5))
    p_ref = torch.nn.Parameter(p_ours.detach().clone())
    ours = MultiTaskOptimizer([p_ours], {}, OptimizerSettings(name=name, lr=0.05, moments="shared", **kwargs))
    ref = torch_cls([p_ref], lr=0.05, **kwargs)
    for i, g in enumerate(_grads(6, 5)):
        ours.step(["a"] if i % 2 else ["a", "b"], g.clone(), {})
        p_ref.grad = g.clone()
        ref.step()
    torch.testing.assert_close(p_ours.detach(), p_ref.detach(), rtol=1e-6, atol=1e-7)


def test_per_task_moments_equal_separate_adams():
    """Single-task steps with moments=per_task: each task's moments and step count are those of its own Adam."""
    tasks = ["a", "b", "c"]
    shared = torch.nn.Parameter(torch.randn(4))
    start = shared.detach().clone()
    opt = MultiTaskOptimizer([shared], {}, OptimizerSettings(name="adam", lr=0.01, moments="per_task"))
    copies = {t: torch.nn.Parameter(start.clone()) for t in tasks}
    separate = {t: torch.optim.Adam([copies[t]], lr=0.01) for t in tasks}
    sequence = ["a", "b", "a", "c", "a", "b"]
    for task, g in zip(sequence, _grads(len(sequence), 4, seed=3)):
        opt.step([task], g.clone(), {})
        copies[task].grad = g.clone()
        separate[task].step()
    for t in tasks:
        ref_state = separate[t].state[copies[t]]
        slot = opt.shared.slots[t]
        assert slot["step"] == int(ref_state["step"])
        torch.testing.assert_close(slot["exp_avg"], ref_state["exp_avg"])
        torch.testing.assert_close(slot["exp_avg_sq"], ref_state["exp_avg_sq"])
    # Adam's update does not depend on the parameter, so the shared parameter moved by the sum of
    # the separate optimizers' displacements.
    expected = start + sum(copies[t].detach() - start for t in tasks)
    torch.testing.assert_close(shared.detach(), expected)


def test_group_step_moves_along_mean_of_task_directions():
    """A step on {a, b} updates both tasks' moments with the step's gradient and averages their directions."""
    shared = torch.nn.Parameter(torch.zeros(2))
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    opt = MultiTaskOptimizer([shared], {}, OptimizerSettings(name="adam", lr=lr, eps=eps, moments="per_task"))
    g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    opt.step(["a"], g1.clone(), {})
    after_first = shared.detach().clone()
    opt.step(["a", "b"], g2.clone(), {})
    # By hand: task a has seen g1 then g2 (step 2), task b only g2 (step 1).
    m_a = (1 - b1) * (b1 * g1 + g2)
    v_a = (1 - b2) * (b2 * g1**2 + g2**2)
    d_a = (m_a / (1 - b1**2)) / ((v_a / (1 - b2**2)).sqrt() + eps)
    m_b, v_b = (1 - b1) * g2, (1 - b2) * g2**2
    d_b = (m_b / (1 - b1)) / ((v_b / (1 - b2)).sqrt() + eps)
    torch.testing.assert_close(shared.detach(), after_first - lr * (d_a + d_b) / 2)
    assert opt.shared.slots["a"]["step"] == 2 and opt.shared.slots["b"]["step"] == 1


def test_heads_move_only_with_their_task():
    shared = torch.nn.Parameter(torch.zeros(2))
    head_a, head_b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = MultiTaskOptimizer(
        [shared], {"a": [head_a], "b": [head_b]},
        OptimizerSettings(name="adamw", lr=0.1, weight_decay=0.5, moments="per_task"),
    )
    opt.step(["a"], torch.ones(2), {"a": torch.ones(2)})
    assert head_a.abs().sum() > 0
    assert head_b.abs().sum() == 0  # not even weight decay touches a head whose task did not step
    assert "b" not in opt.heads["b"].slots


def test_sgd_without_momentum_per_task_equals_shared():
    ps = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    opts = [MultiTaskOptimizer([p], {}, OptimizerSettings(name="sgd", lr=0.1, moments=m)) for p, m in zip(ps, ["per_task", "shared"])]
    for i, g in enumerate(_grads(4, 3)):
        for opt in opts:
            opt.step(["a", "b"] if i % 2 else ["b"], g.clone(), {})
    torch.testing.assert_close(ps[0].detach(), ps[1].detach())


def test_state_dict_round_trip_continues_identically():
    def run(split_at: int | None) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(3))
        opt = MultiTaskOptimizer([p], {}, OptimizerSettings(name="adam", lr=0.1))
        for i, g in enumerate(_grads(6, 3)):
            if i == split_at:
                state = opt.state_dict()
                opt = MultiTaskOptimizer([p], {}, OptimizerSettings(name="adam", lr=0.1))
                opt.load_state_dict(state)
            opt.step(["a"] if i % 2 else ["b"], g.clone(), {})
        return p.detach()

    torch.testing.assert_close(run(None), run(3), rtol=0, atol=0)


def test_schedules():
    step = OmegaConf.create({"name": "step", "step_size": 100, "gamma": 0.5})
    assert [lr_factor(step, e, 200) for e in (0, 99, 100, 199)] == [1.0, 1.0, 0.5, 0.5]
    cosine = OmegaConf.create({"name": "cosine", "min_factor": 0.1})
    assert lr_factor(cosine, 0, 10) == pytest.approx(1.0)
    assert lr_factor(cosine, 5, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cosine, 9, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def _per_task_state(steps: list[list[str]], grads: list[torch.Tensor], separate: bool):
    """The shared parameter and its per-task states after `steps`; `separate` makes every task's state its
    own object up front (the plain formulation), otherwise states are shared until steps set them apart."""
    shared = torch.nn.Parameter(torch.arange(4.0))
    opt = MultiTaskOptimizer([shared], {}, OptimizerSettings(name="adam", lr=0.01, moments="per_task"))
    if separate:
        opt.shared.slots = {t: {"step": 0} for t in "abc"}
    for tasks, g in zip(steps, grads):
        opt.step(tasks, g.clone(), {})
    return shared.detach(), opt


def test_tasks_stepped_together_share_one_state_with_the_same_numbers():
    steps = [["a", "b", "c"], ["a", "b", "c"], ["a"], ["b", "c"], ["a", "b", "c"], ["c"]]
    grads = _grads(len(steps), 4, seed=7)
    param, opt = _per_task_state(steps[:2], grads, separate=False)
    slots = opt.shared.slots
    assert slots["a"] is slots["b"] is slots["c"] and slots["a"]["step"] == 2  # one state, stepped once per step
    ref = torch.nn.Parameter(torch.arange(4.0))  # all-task steps with per-task moments are plain Adam
    adam = torch.optim.Adam([ref], lr=0.01)
    for g in grads[:2]:
        ref.grad = g.clone()
        adam.step()
    torch.testing.assert_close(param, ref.detach(), rtol=0, atol=1e-7)
    shared_param, shared_opt = _per_task_state(steps, grads, separate=False)
    plain_param, plain_opt = _per_task_state(steps, grads, separate=True)
    torch.testing.assert_close(shared_param, plain_param, rtol=0, atol=1e-7)
    for t in "abc":  # each task's state is exactly the one it would own alone
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(torch.as_tensor(shared_opt.shared.slots[t][key]),
                                       torch.as_tensor(plain_opt.shared.slots[t][key]), rtol=0, atol=0)
    s = shared_opt.shared.slots
    assert s["a"] is not s["b"] and s["b"] is not s["c"]  # set apart by the steps on a and on c alone
    # The step on a alone copied the common state: b and c kept theirs (2 steps) until their own step.
    assert [s[t]["step"] for t in "abc"] == [4, 4, 5]


def test_shared_states_stay_shared_through_a_checkpoint(tmp_path):
    _, opt = _per_task_state([["a", "b", "c"], ["a"]], _grads(2, 4), separate=False)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)["shared"]
    assert loaded["b"] is loaded["c"] and loaded["a"] is not loaded["b"]
    torch.testing.assert_close(loaded["b"]["exp_avg"], opt.shared.slots["b"]["exp_avg"])
