"""The optimizer against torch's own optimizers and against the per-task-moments formulation by hand."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from mtlrun.optim import MultiTaskOptimizer, OptimizerSettings, lr_factor
from mtlrun.settings import SchedulerSettings


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
    step = SchedulerSettings.from_config(OmegaConf.create({"name": "step", "step_size": 100, "gamma": 0.5}))
    assert [lr_factor(step, e, 200) for e in (0, 99, 100, 199)] == [1.0, 1.0, 0.5, 0.5]
    cosine = SchedulerSettings.from_config(OmegaConf.create({"name": "cosine", "min_factor": 0.1}))
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


# --- PyTorch 1.2's Adam (eps_placement=kingma) and steps of idle heads (idle_params=step) -------------------


def _kingma_by_hand(grads: list[torch.Tensor], lr: float, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8) -> list[torch.Tensor]:
    """Each step's displacement: -lr sqrt(1 - b2^t) / (1 - b1^t) m_t / (sqrt(v_t) + eps), written out."""
    m, v, out = torch.zeros_like(grads[0]), torch.zeros_like(grads[0]), []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps))
    return out


def _tiny_grads(count: int, size: int, seed: int) -> list[torch.Tensor]:
    """Gradient entries from 1e-9 to 1e-1: near eps, where the two placements part."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g, dtype=torch.float64)
            * 10.0 ** -torch.randint(1, 10, (size,), generator=g) for _ in range(count)]


def test_kingma_eps_placement_is_the_formula_by_hand_with_shared_moments():
    lr, grads = 1e-3, _tiny_grads(5, 40, seed=0)
    p = torch.nn.Parameter(torch.zeros(40, dtype=torch.float64))
    settings = OptimizerSettings(name="adam", lr=lr, moments="shared", eps_placement="kingma")
    opt = MultiTaskOptimizer([p], {}, settings)
    modern = torch.nn.Parameter(torch.zeros(40, dtype=torch.float64))
    reference = torch.optim.Adam([modern], lr=lr)
    for g, displacement in zip(grads, _kingma_by_hand(grads, lr)):
        before = p.detach().clone()
        opt.step(["a"], g.clone(), {})
        torch.testing.assert_close(p.detach() - before, displacement, rtol=1e-12, atol=1e-20)
        modern.grad = g.clone()
        reference.step()
    # today's arithmetic parts from it by far more than rounding (eps 1e-8 / sqrt(1 - b2) = 3e-7 at step 1)
    assert (p.detach() - modern.detach()).abs().max() > 1e-5


def test_kingma_eps_placement_is_the_formula_by_hand_with_per_task_moments():
    """Task a steps alone, then a and b together (mean of their directions), then b alone; and in a
    `step_each` step (AdaTask) each task's own gradient feeds its own moments and the directions add."""
    lr, grads = 1e-3, _tiny_grads(4, 30, seed=1)
    p = torch.nn.Parameter(torch.zeros(30, dtype=torch.float64))
    settings = OptimizerSettings(name="adam", lr=lr, moments="per_task", eps_placement="kingma")
    opt = MultiTaskOptimizer([p], {}, settings)
    opt.step(["a"], grads[0].clone(), {})
    opt.step(["a", "b"], grads[1].clone(), {})
    opt.step(["b"], grads[2].clone(), {})
    a = _kingma_by_hand([grads[0], grads[1]], lr)
    b = _kingma_by_hand([grads[1], grads[2]], lr)
    torch.testing.assert_close(p.detach(), a[0] + (a[1] + b[0]) / 2 + b[1], rtol=1e-12, atol=1e-20)
    q = torch.nn.Parameter(torch.zeros(30, dtype=torch.float64))
    each = MultiTaskOptimizer([q], {}, settings)
    each.step_each({"a": grads[0].clone(), "b": grads[1].clone()}, {})
    each.step_each({"a": grads[2].clone(), "b": grads[3].clone()}, {})
    a, b = _kingma_by_hand([grads[0], grads[2]], lr), _kingma_by_hand([grads[1], grads[3]], lr)
    torch.testing.assert_close(q.detach(), a[0] + b[0] + a[1] + b[1], rtol=1e-12, atol=1e-20)


def _idle_run(settings: OptimizerSettings, sequence: list[list[str]], torch_cls=None, **torch_kwargs):
    """Shared parameter w and heads a, b, c stepped per `sequence` (a step's heads get gradients, the others
    none); beside them, if `torch_cls`, that torch optimizer over all parameters with zero_grad to zeros
    (PyTorch 1.2's zero_grad): a head's gradient is None until its task's first backward, zero after."""
    g = torch.Generator().manual_seed(5)
    ours = {k: torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64)) for k in "wabc"}
    theirs = {k: torch.nn.Parameter(v.detach().clone()) for k, v in ours.items()}
    opt = MultiTaskOptimizer([ours["w"]], {t: [ours[t]] for t in "abc"}, settings)
    ref = torch_cls(list(theirs.values()), lr=settings.lr, **torch_kwargs) if torch_cls else None
    for tasks in sequence:
        grads = {k: torch.randn(3, generator=g, dtype=torch.float64) for k in ["w", *tasks]}
        opt.step(tasks, grads["w"].clone(), {t: grads[t].clone() for t in tasks})
        if ref is not None:
            ref.zero_grad(set_to_none=False)
            for k, grad in grads.items():
                theirs[k].grad = grad.clone()
            ref.step()
    return ours, theirs, opt, ref


SEQUENCE = [["a"], ["b"], ["a"], ["a", "b"], ["c"], ["b"], ["a"], ["c"]]  # c's first gradient at step 5


@pytest.mark.parametrize(
    "name,torch_cls,kwargs",
    [
        ("adam", torch.optim.Adam, {}),
        ("adam", torch.optim.Adam, {"weight_decay": 0.1}),
        ("adamw", torch.optim.AdamW, {"weight_decay": 0.1}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ],
)
def test_idle_heads_step_as_torch_after_zero_grad_to_zeros(name, torch_cls, kwargs):
    """idle_params=step with shared moments: every parameter moves exactly as under one torch optimizer whose
    zero_grad leaves zero tensors, the step counts t of every head included; skip leaves idle heads still."""
    settings = OptimizerSettings(name=name, lr=0.05, moments="shared", idle_params="step", **kwargs)
    ours, theirs, opt, ref = _idle_run(settings, SEQUENCE, torch_cls, **kwargs)
    for k in "wabc":
        torch.testing.assert_close(ours[k].detach(), theirs[k].detach(), rtol=1e-12, atol=1e-14)
    if name != "sgd":  # c's state began at its first gradient (step 5) and counted every step since
        assert [opt.heads[t].slots[t]["step"] for t in "abc"] == [8, 7, 4]
        assert [int(ref.state[theirs[t]]["step"]) for t in "abc"] == [8, 7, 4]
    skipped, _, _, _ = _idle_run(OptimizerSettings(name=name, lr=0.05, moments="shared", **kwargs), SEQUENCE)
    assert not torch.allclose(skipped["a"], ours["a"])  # a was idle at steps 2, 5, 6 and 8


@pytest.mark.parametrize("kwargs", [{"name": "adam"}, {"name": "adam", "eps_placement": "kingma"},
                                    {"name": "sgd", "momentum": 0.9}])
def test_idle_params_change_nothing_with_per_task_moments(kwargs):
    """Per-task moments: a task's own moments of another task's head are zero, so stepping it would move
    nothing; the option leaves every number as it was, and matches one torch.optim.Adam per task over all
    parameters (the authors' MTL-IO), where a head's gradient is zero under every other task's Adam."""
    runs = [_idle_run(OptimizerSettings(lr=0.05, moments="per_task", idle_params=idle, **kwargs), SEQUENCE)
            for idle in ("skip", "step")]
    for k in "wabc":
        torch.testing.assert_close(runs[0][0][k], runs[1][0][k], rtol=0, atol=0)
    if kwargs != {"name": "adam"}:
        return
    single = [t for t in SEQUENCE if len(t) == 1]  # a step on two tasks is no one torch step
    g = torch.Generator().manual_seed(5)
    params = {k: torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64)) for k in "wabc"}
    adams = {t: torch.optim.Adam(list(params.values()), lr=0.05) for t in "abc"}
    for (task,) in single:
        grads = {k: torch.randn(3, generator=g, dtype=torch.float64) for k in ["w", task]}
        adams[task].zero_grad(set_to_none=False)
        for k, grad in grads.items():
            params[k].grad = grad.clone()
        adams[task].step()
        others = [s for p, s in adams[task].state.items() if p is not params["w"] and p is not params[task]]
        assert all(not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in others)
    assert len(adams["c"].state) == 4  # c's Adam stepped the heads of a and b on zero gradients
    alone = _idle_run(OptimizerSettings(lr=0.05, moments="per_task", idle_params="step", **kwargs), single)[0]
    for k in "wabc":
        torch.testing.assert_close(alone[k].detach(), params[k].detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key,value,match", [
    ("eps_placement", "tf", "eps_placement='tf' is invalid; valid: modern, kingma"),
    ("idle_params", "never", "idle_params='never' is invalid; valid: skip, step"),
])
def test_bad_placement_or_idle_setting_is_one_line(key, value, match):
    from mtlrun.errors import MtlrunError

    with pytest.raises(MtlrunError, match=match):
        OptimizerSettings.from_config(OmegaConf.create({"name": "adam", "lr": 0.1, key: value}))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_kingma_placement_is_refused_outside_adam(name):
    from mtlrun.errors import MtlrunError

    with pytest.raises(MtlrunError, match=f"applies to optimizer=adam only; with optimizer={name} leave"):
        OptimizerSettings.from_config(OmegaConf.create({"name": name, "lr": 0.1, "eps_placement": "kingma"}))
