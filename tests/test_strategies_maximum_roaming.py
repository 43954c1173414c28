"""Maximum Roaming: the masks' sharing ratio, the roaming schedule, masked steps, evaluation and exact resume."""

import io
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mtlrun.errors import MtlrunError
from mtlrun.models import celeba_cnn, convnet, resnet, segnet, unet
from mtlrun.models.base import MultiTaskModel
from mtlrun.strategies import build_strategy
from mtlrun.strategies.maximum_roaming import MaximumRoaming, active_units
from mtlrun.tasks import BinaryAttributes, Depth, Segmentation
from tests.helpers import batches, context

TASKS = ["a", "b", "c"]


def tiny_model(seed: int = 0, group_norm: bool = False) -> MultiTaskModel:
    """conv(3->6)-BN-ReLU, conv(6->5)-ReLU (no norm: masked at the conv), pooled; a linear head per task."""
    torch.manual_seed(seed)
    norm = nn.GroupNorm(2, 6) if group_norm else nn.BatchNorm2d(6)
    encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return MultiTaskModel(encoder, {t: nn.Linear(5, 1) for t in TASKS})


def image_batches(count: int = 20, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(4, 3, 6, 6, generator=g), **{t: torch.randn(4, generator=g) for t in TASKS}}
            for _ in range(count)]


def attached(model: MultiTaskModel, tasks=TASKS, **settings) -> MaximumRoaming:
    strategy = MaximumRoaming(tasks, seed=3, **settings)
    strategy.attach(model)
    return strategy


def by_hand(plain: MultiTaskModel, strategy: MaximumRoaming, index: int, task: str, image: torch.Tensor):
    """Task `index`'s output from `plain` (tiny_model's weights, no hooks), its masks applied by hand: after the
    first conv's batch norm, and at the second conv, which has no norm."""
    e = plain.encoder
    x = e[2](e[1](e[0](image)) * strategy.masks[0][index].view(-1, 1, 1))
    x = e[4](e[3](x) * strategy.masks[1][index].view(-1, 1, 1))
    return plain.heads[task](e[6](e[5](x)))


def run_iterations(strategy: MaximumRoaming, n: int) -> list[int]:
    """Advance the roaming schedule n iterations without training; the iterations at which a mask changed."""
    changed = []
    for _ in range(n):
        before = [m.clone() for m in strategy.masks]
        strategy.iterations += 1
        strategy.roam()
        if any(not torch.equal(a, b) for a, b in zip(before, strategy.masks)):
            changed.append(strategy.iterations)
    return changed


def real_model(name: str) -> MultiTaskModel:
    """One of mtlrun's models, small, for a segmentation, a depth and a per-image task."""
    tasks = [Segmentation("seg", 3), Depth("depth"), BinaryAttributes("attr", ["x", "y"])]
    torch.manual_seed(0)
    build = {
        "convnet": lambda: convnet.build(tasks, width=4),
        "segnet_split": lambda: segnet.build_split(tasks, filters=[4, 4, 8, 8, 8]),
        "segnet_mtan": lambda: segnet.build_mtan(tasks, filters=[4, 4, 8, 8, 8]),
        "resnet18_multihead": lambda: resnet.build_resnet18_multihead(tasks),
        "unet": lambda: unet.build(tasks, width=2),
        "celeba_cnn": lambda: celeba_cnn.build(tasks, width=2, running_stats=False),
    }
    return build[name]()


@pytest.mark.parametrize("sigma", [0.8, 0.5, 1 / 3, 1.0])
def test_masks_hold_the_sharing_ratio_and_cover_every_unit(sigma):
    model = real_model("convnet")
    strategy = attached(model, sigma=sigma, updates_end=30)
    assert [layer.units for layer in strategy.layers] == [4, 8, 8, 16, 16, 8, 4]  # convnet width 4: every conv
    for mask in strategy.masks:
        assert mask.any(dim=0).all()  # every unit serves some task at the start
    run_iterations(strategy, 40)
    for layer, mask in zip(strategy.layers, strategy.masks):
        n = layer.units
        assert (mask.sum(dim=1) == math.ceil(round(sigma * n, 9))).all()  # exactly sigma n, rounded up, always
        assert abs(mask.sum(dim=1).float().mean() / n - sigma) < 1 / n
    if sigma < 1:
        assert any(not torch.equal(m, t) for m, t in zip(strategy.masks, strategy.tried))  # it did roam


def test_every_unit_is_tried_by_the_end_on_the_schedule():
    model = real_model("convnet")
    end = 60
    strategy = attached(model, sigma=0.5, updates_end=end, updates_size=1)
    widest = max(range(len(strategy.layers)), key=lambda i: strategy.layers[i].units)  # 16 units, 8 masked
    interval = strategy.update_interval(widest)
    assert interval == end // 8 == 7
    changed = run_iterations(strategy, end + 20)
    assert set(range(interval, 8 * interval + 1, interval)) <= set(changed)  # the widest layer's swaps
    assert max(changed) <= end  # nothing after updates_end
    for tried in strategy.tried:
        assert tried.all()  # every task has used every unit of every layer
    # one swap per task and update: the widest layer had untried units until its last swap
    fresh = attached(real_model("convnet"), sigma=0.5, updates_end=end)
    run_iterations(fresh, 7 * interval)
    assert not fresh.tried[widest].all() and (fresh.tried[widest].sum(dim=1) == 8 + 7).all()


def test_update_ratio_stops_roaming_early():
    strategy = attached(real_model("convnet"), sigma=0.5, updates_end=60, update_ratio=0.5)
    run_iterations(strategy, 80)
    for layer, tried in zip(strategy.layers, strategy.tried):
        masked = layer.units - active_units(0.5, layer.units)
        assert (tried.sum(dim=1) - active_units(0.5, layer.units) == math.ceil(0.5 * masked)).all()


@pytest.mark.parametrize("name", ["convnet", "segnet_split", "segnet_mtan", "resnet18_multihead", "unet", "celeba_cnn"])
def test_a_task_gradient_is_zero_on_its_masked_units(name):
    model = real_model(name)
    tasks = list(model.heads)
    strategy = attached(model, tasks, sigma=0.5)
    assert strategy.layers  # the model's convolutions were found
    model.train()
    image = torch.randn(2, 3, 32, 32)
    task, index = tasks[2], 2  # the per-image task: its head is the cheapest
    out = model(image, [task])[task]
    grads = torch.autograd.grad(out.square().mean(), model.shared_parameters(), allow_unused=True)
    grad_of = {id(p): g for p, g in zip(model.shared_parameters(), grads)}
    convs = {layer.name: dict(model.encoder.named_modules())[layer.name] for layer in strategy.layers}
    for layer, mask in zip(strategy.layers, strategy.masks):
        conv, off = convs[layer.name], ~mask[index]
        owned = [conv.weight, conv.bias] + ([layer.target.weight, layer.target.bias] if layer.target is not conv else [])
        for p in [p for p in owned if p is not None]:
            assert (grad_of[id(p)][off] == 0).all(), layer.name  # masked units get nothing
        assert grad_of[id(conv.weight)][mask[index]].abs().sum() > 0, layer.name  # the task's own units learn


def test_with_sgd_a_task_step_moves_only_its_unmasked_units():
    model = tiny_model()
    strategy = attached(model, sigma=0.5)
    ctx = context(model, TASKS, image_batches())
    batch = ctx.next_batch()
    conv, bn, conv2 = model.encoder[0], model.encoder[1], model.encoder[3]
    for index, task in enumerate(TASKS):
        before = [p.detach().clone() for p in (conv.weight, conv.bias, bn.weight, bn.bias, conv2.weight, conv2.bias)]
        ctx.step([task], ctx.losses(batch, [task])[task])
        after = [conv.weight, conv.bias, bn.weight, bn.bias, conv2.weight, conv2.bias]
        first, second = strategy.masks[0][index], strategy.masks[1][index]
        for i, (old, new, on) in enumerate(zip(before, after, [first] * 4 + [second] * 2)):
            assert torch.equal(old[~on], new[~on])  # masked units stay where they were
            if i != 1:  # a bias before batch norm has no gradient at all
                assert not torch.equal(old[on], new[on])  # the task's own units move


def test_every_forward_pass_goes_through_its_task_mask():
    model, plain = tiny_model(), tiny_model()  # the same weights; `plain` has no masks
    strategy = attached(model, sigma=0.5)
    model.eval(), plain.eval()
    image = image_batches()[0]["image"]
    outputs = model(image, TASKS)
    for index, task in enumerate(TASKS):
        with torch.no_grad():
            expected = by_hand(plain, strategy, index, task, image)
        torch.testing.assert_close(outputs[task], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(outputs["a"], outputs["b"])
    with pytest.raises(RuntimeError, match="outside a task's scope"):
        model.encoder(image)


@pytest.mark.parametrize("steps", ["per_task", "summed"])
def test_steps_per_task_or_one_summed_step_as_the_authors(steps):
    model = tiny_model()
    strategy = attached(model, sigma=0.5, steps=steps)
    data = image_batches()
    ctx = context(model, TASKS, data)
    reference = tiny_model()
    reference.load_state_dict(model.state_dict())
    strategy.iteration(ctx)
    # by hand: the authors' loop, fixed task order, a masked forward per task on the same batch, plain SGD
    params = dict(reference.named_parameters())
    batch = data[0]
    total = {}
    for index, task in enumerate(TASKS):
        loss = ((by_hand(reference, strategy, index, task, batch["image"]).squeeze(-1) - batch[task]) ** 2).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        if steps == "per_task":
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    if g is not None:
                        p -= 0.1 * g
        else:
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    total[name] = total.get(name, 0) + g
    with torch.no_grad():
        for name, g in total.items():
            params[name] -= 0.1 * g
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=1e-5, atol=1e-6)
    assert ctx.counts.forward_passes == 3
    assert ctx.counts.optimizer_steps == (3 if steps == "per_task" else 1) and strategy.group_size == (1 if steps == "per_task" else 3)


def test_resume_continues_exactly():
    def start(skip: int = 0):
        model = tiny_model()
        strategy = attached(model, sigma=0.5, updates_end=12)  # swaps at 4, 6, 8 and 12: across the resume
        return model, strategy, context(model, TASKS, image_batches(count=12)[skip:], momentum=0.9)

    model, strategy, ctx = start()
    for _ in range(12):
        strategy.iteration(ctx)
    straight = [p.detach().clone() for p in model.parameters()]

    model, strategy, ctx = start()
    for _ in range(5):
        strategy.iteration(ctx)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
                "strategy": strategy.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as train() reads checkpoints
    model, strategy, ctx = start(skip=5)
    model.load_state_dict(saved["model"])
    ctx.optimizer.load_state_dict(saved["optimizer"])
    strategy.load_state_dict(saved["strategy"])
    for _ in range(7):
        strategy.iteration(ctx)
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)
    assert strategy.iterations == 12


@pytest.mark.parametrize(
    "settings,message",
    [({"sigma": 0.2}, r"must be in \[1/T, 1\]"), ({"sigma": 1.5}, "sigma"), ({"updates_size": 0}, "updates_size"),
     ({"updates_end": -1}, "updates_end"), ({"update_ratio": 2}, "update_ratio"), ({"steps": "all"}, "strategy.steps"),
     ({"masked_layers": "bn"}, "masked_layers")],
)
def test_bad_settings_are_refused(settings, message):
    cfg = {"name": "maximum_roaming", **settings}
    with pytest.raises(MtlrunError, match=message):
        build_strategy(OmegaConf.create(cfg), TASKS, seed=0)


def test_models_it_cannot_mask_are_refused_in_one_line():
    with pytest.raises(MtlrunError, match="GroupNorm after it mixes its units"):
        attached(tiny_model(group_norm=True))
    linear = MultiTaskModel(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), {t: nn.Linear(4, 1) for t in TASKS})
    with pytest.raises(MtlrunError, match="has none: set strategy.masked_layers=conv_linear"):
        attached(linear)
    strategy = attached(linear, masked_layers="conv_linear")
    ctx = context(linear, TASKS, batches(TASKS))
    strategy.iteration(ctx)
    assert [layer.units for layer in strategy.layers] == [4] and ctx.counts.optimizer_steps == 3


@pytest.mark.parametrize("idle_params", ["step", "skip"])
def test_one_adam_with_idle_steps_is_the_authors_torch_adam(idle_params):
    """The authors' per-task Maximum Roaming steps under one Adam for all tasks (their PyTorch 1.2: zero_grad
    leaves zero tensors, so every step moves the other tasks' heads on their moments too): with
    `optimizer.idle_params=step` mtlrun's steps are torch.optim.Adam's over all parameters, float64, for three
    iterations; with `skip` (the default) the idle heads stay behind."""
    model = tiny_model().double()
    strategy = attached(model, sigma=0.5)
    data = [{k: v.double() for k, v in batch.items()} for batch in image_batches(3)]
    ctx = context(model, TASKS, data, name="adam", lr=0.01, moments="shared", idle_params=idle_params)
    reference = tiny_model().double()
    reference.load_state_dict(model.state_dict())
    adam = torch.optim.Adam(reference.parameters(), lr=0.01)
    for batch in data:
        strategy.iteration(ctx)
        for index, task in enumerate(TASKS):  # masks stay put: the first roaming comes much later
            adam.zero_grad(set_to_none=False)
            out = by_hand(reference, strategy, index, task, batch["image"])
            ((out.squeeze(-1) - batch[task]) ** 2).mean().backward()
            adam.step()
    mine, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    if idle_params == "skip":
        assert not torch.allclose(mine["heads.a.weight"], theirs["heads.a.weight"], rtol=1e-6)
        return
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-10, atol=1e-13)
