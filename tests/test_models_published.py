"""The seed paper's models: the bilinear U-Net and the CelebA CNN, at the presets' shapes, their parameter counts
from hand formulas, heads run on demand, and batch norm with or without running statistics."""

import itertools

import pytest
import torch
from torch import nn

from mtlrun.errors import MtlrunError
from mtlrun.models import MODELS
from mtlrun.models.base import MultiTaskModel
from mtlrun.strategies.gradnorm import last_shared_layer
from mtlrun.tasks import BinaryAttributes, BinaryMaps, Depth, Normal, Task

CITYSCAPES = [BinaryMaps(name, [k]) for k, name in enumerate(
    ["flat", "construction", "object", "nature", "sky", "human", "vehicle"])]
NYUV2 = [*(BinaryMaps(f"class{k}", [k]) for k in range(13)), Depth("depth"), Normal("normal")]
CELEBA = [BinaryAttributes(f"attribute{k}", [f"attribute{k}"]) for k in range(40)]


def build(name: str, tasks: list[Task], **settings) -> MultiTaskModel:
    torch.manual_seed(0)
    return MODELS[name](tasks, **settings)


def targets(tasks: list[Task], n: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 13, (n, *size), generator=g, dtype=torch.int16)
    out = {}
    for task in tasks:
        if isinstance(task, BinaryMaps):
            out[task.name] = labels
        elif isinstance(task, Depth):
            out[task.name] = torch.rand(n, *size, generator=g) + 0.1
        elif isinstance(task, Normal):
            out[task.name] = nn.functional.normalize(torch.randn(n, 3, *size, generator=g), dim=1)
        else:
            out[task.name] = torch.randint(0, 2, (n, task.out_channels), generator=g)
    return out


def forward_backward(model: MultiTaskModel, tasks: list[Task], n: int, size: tuple[int, int]) -> None:
    image = torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(2))
    outputs = model(image, [t.name for t in tasks])
    for task in tasks:
        assert outputs[task.name].shape == ((n, task.out_channels, *size) if task.dense else (n, task.out_channels))
    y = targets(tasks, n, size)
    sum(t.loss(outputs[t.name], y[t.name]) for t in tasks).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- U-Net --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks,size,n", [(NYUV2, (288, 384), 1), (CITYSCAPES, (128, 256), 2)],
                         ids=["pascal_nyuv2", "pascal_cityscapes"])
def test_unet_at_the_presets_shapes(tasks, size, n):
    # width 2 keeps this a CPU test; the shapes through the four poolings are the presets'
    forward_backward(build("unet", tasks, width=2, running_stats=False), tasks, n, size)


def test_unet_pads_odd_sizes_back_to_the_skip_connections():
    forward_backward(build("unet", [Depth("depth")], width=2), [Depth("depth")], 2, (37, 50))


def test_unet_parameter_count_at_width_64_is_the_hand_count():
    def double(cin: int, mid: int, cout: int) -> int:  # two bias-free 3x3 convs, each with a BN (scale, shift)
        return 9 * cin * mid + 2 * mid + 9 * mid * cout + 2 * cout

    encoder = double(3, 64, 64) + double(64, 128, 128) + double(128, 256, 256) + double(256, 512, 512) \
        + double(512, 512, 512) + double(1024, 512, 256) + double(512, 256, 128) + double(256, 128, 64) \
        + double(128, 64, 64)
    model = MODELS["unet"](CITYSCAPES)
    assert sum(p.numel() for p in model.shared_parameters()) == encoder == 17_262_912
    assert sum(p.numel() for p in model.task_parameters("sky")) == 64 + 1  # a 1x1 conv: the authors' OutConv


def test_unet_refuses_images_too_small_for_four_poolings_and_a_one_value_batch_norm():
    model = build("unet", [Depth("depth")], width=2)
    with pytest.raises(MtlrunError, match="at least 16x16 pixels, got 12x64"):
        model(torch.zeros(2, 3, 12, 64), ["depth"])
    with pytest.raises(MtlrunError, match="one value per channel"):
        model(torch.zeros(1, 3, 16, 20), ["depth"])


# --- CelebA CNN ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("running_stats", [False, True], ids=["pascal_celeba", "famo_celeba"])
def test_celeba_cnn_at_the_presets_shape(running_stats):
    forward_backward(build("celeba_cnn", CELEBA, running_stats=running_stats), CELEBA, 4, (64, 64))


def test_celeba_cnn_is_the_authors_seven_convs_and_two_fcs_by_hand_count():
    model = MODELS["celeba_cnn"](CELEBA)
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 256, 256, 512, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.encoder.modules()) == 3
    widths = [3, 64, 128, 128, 256, 256, 512, 512]
    conv_params = sum(9 * a * b + 2 * b for a, b in itertools.pairwise(widths))
    fc_params = 2 * (512 * 512 + 2 * 512)
    assert sum(p.numel() for p in model.shared_parameters()) == conv_params + fc_params == 5_176_640
    assert [p.shape for p in model.task_parameters("attribute0")] == [(1, 512), (1,)]  # one linear per task
    with torch.no_grad():
        assert model.encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 512)  # one representation (MGDA-UB)


@pytest.mark.parametrize("name", ["unet", "celeba_cnn"])
def test_without_running_statistics_evaluation_normalises_each_batch_by_itself(name):
    tasks = [BinaryAttributes("a", ["a"])]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for running_stats in (False, True):
        model = build(name, tasks, width=4, running_stats=running_stats).eval()
        buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for b in (m.running_mean, m.running_var)]
        assert all(b is None for b in buffers) is (not running_stats) and buffers
        with torch.no_grad():
            alone = model(images[:2], ["a"])["a"]
            together = model(images, ["a"])["a"][:2]
        # with batch statistics, the same images give other outputs in another batch; with running ones not
        assert torch.allclose(alone, together, atol=1e-6) is running_stats


def test_celeba_cnn_refuses_a_batch_of_one_where_batch_norm_needs_two():
    model = build("celeba_cnn", CELEBA[:2], width=2, running_stats=False)
    with pytest.raises(MtlrunError, match="at least 2 images"):
        model(torch.zeros(1, 3, 16, 16), ["attribute0"])
    with pytest.raises(MtlrunError, match="trainer.eval_batch_size"):
        model.eval()(torch.zeros(1, 3, 16, 16), ["attribute0"])
    evaluated = build("celeba_cnn", CELEBA[:2], width=2, running_stats=True).eval()
    assert evaluated(torch.zeros(1, 3, 16, 16), ["attribute0"])["attribute0"].shape == (1, 1)
    with pytest.raises(MtlrunError, match="at least 8x8 pixels, got 4x16"):
        model(torch.zeros(2, 3, 4, 16), ["attribute0"])


@pytest.mark.parametrize("name", ["unet", "celeba_cnn"])
def test_heads_run_on_demand_and_a_task_reaches_only_the_shared_part_and_its_own_head(name):
    tasks = [BinaryMaps("sky", [4]), Depth("depth"), BinaryAttributes("a", ["a"])]
    model = build(name, tasks, width=4)
    calls = []
    hooks = [model.heads[t.name].register_forward_hook(lambda m, i, o, t=t: calls.append(t.name)) for t in tasks]
    out = model(torch.randn(2, 3, 32, 48), ["depth"])
    for hook in hooks:
        hook.remove()
    assert list(out) == ["depth"] and calls == ["depth"]
    Depth("depth").loss(out["depth"], torch.rand(2, 32, 48) + 0.1).backward()
    convs = [p for n, p in model.encoder.named_parameters() if "fc" not in n]  # the FCs serve per-image tasks
    assert all(p.grad is not None for p in convs + model.task_parameters("depth"))
    assert last_shared_layer(model).grad is not None  # GradNorm's layer: one every task reaches
    assert all(p.grad is None for t in ("sky", "a") for p in model.task_parameters(t))
    groups = [model.shared_parameters()] + [model.task_parameters(t.name) for t in tasks]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
