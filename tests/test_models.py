"""The standard MTL architectures: output shapes for every task kind, heads run on demand, the shared/task
parameter split, MTAN's attention, the dilated ResNet's stride, and ImageNet weights from local files only."""

import functools
import urllib.request
from copy import deepcopy

import pytest
import torch
import torchvision
from torch import nn

from mtlrun.errors import MtlrunError
from mtlrun.models import MODELS
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import BinaryAttributes, Depth, Normal, Segmentation, Task

TASKS = [
    Segmentation("segmentation", 5),
    Depth("depth"),
    Normal("normal"),
    BinaryAttributes("attributes", ["a", "b", "c"]),
]
SMALL_FILTERS = [4, 8, 8, 16, 16]
SETTINGS = {  # small SegNet widths keep the tests fast; the ResNets have no width setting
    "segnet_split": {"filters": SMALL_FILTERS},
    "segnet_mtan": {"filters": SMALL_FILTERS},
    "resnet50_dilated": {},
    "resnet18_multihead": {},
    "resnet18_multihead_imagenet": {"stem": "imagenet", "pooled_size": 1},
}
SIZES = {  # (H, W); the dilated ResNet-50 with three ASPP heads is the slow one, so it gets one small size
    "segnet_split": [(64, 96), (32, 32), (48, 80)],
    "segnet_mtan": [(64, 96), (32, 32), (48, 80)],
    "resnet50_dilated": [(32, 64)],
    "resnet18_multihead": [(64, 96), (32, 32)],
    "resnet18_multihead_imagenet": [(64, 96), (32, 32)],
}
CASES = [(name, size) for name, sizes in SIZES.items() for size in sizes]


def build(name: str, tasks: list[Task] = TASKS, **settings) -> MultiTaskModel:
    torch.manual_seed(0)
    return MODELS[name.removesuffix("_imagenet")](tasks, **{**SETTINGS[name], **settings})


@functools.cache
def shared_model(name: str) -> MultiTaskModel:
    """One model per configuration for the whole module: building the ResNets dominates the run time."""
    return build(name)


def targets(size: tuple[int, int], n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    normal = torch.nn.functional.normalize(torch.randn(n, 3, *size, generator=g), dim=1)
    return {
        "segmentation": torch.randint(0, 5, (n, *size), generator=g),
        "depth": torch.rand(n, *size, generator=g) + 0.1,
        "normal": normal,
        "attributes": torch.randint(0, 2, (n, 3), generator=g),
    }


def image(size: tuple[int, int]) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name,size", CASES)
def test_every_task_kind_gets_its_output_shape_and_every_parameter_a_gradient(name, size):
    model = shared_model(name)
    model.zero_grad(set_to_none=True)
    outputs = model(image(size), [t.name for t in TASKS])
    for task in TASKS:
        expected = (2, task.out_channels, *size) if task.dense else (2, task.out_channels)
        assert tuple(outputs[task.name].shape) == expected
    y = targets(size)
    sum(t.loss(outputs[t.name], y[t.name]) for t in TASKS).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", SETTINGS)
def test_forward_runs_only_the_heads_asked_for(name):
    model = shared_model(name)
    calls = {t.name: 0 for t in TASKS}

    def count(task):
        return lambda *_: calls.__setitem__(task, calls[task] + 1)

    hooks = [model.heads[t].register_forward_hook(count(t)) for t in calls]
    try:
        with torch.no_grad():
            out = model(image(SIZES[name][-1]), ["depth"])
    finally:
        for hook in hooks:
            hook.remove()
    assert list(out) == ["depth"]
    assert calls == {"segmentation": 0, "depth": 1, "normal": 0, "attributes": 0}


@pytest.mark.parametrize("name", SETTINGS)
def test_shared_and_task_parameters_partition_the_model(name):
    model = shared_model(name)
    groups = [model.shared_parameters()] + [model.task_parameters(t.name) for t in TASKS]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids))  # no parameter in two groups
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(groups)


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_a_task_loss_reaches_the_shared_parameters_and_its_own_head_only(name, task):
    model = shared_model(name)
    model.zero_grad(set_to_none=True)
    size = SIZES[name][-1]
    out = model(image(size), [task.name])[task.name]
    task.loss(out, targets(size)[task.name]).backward()
    assert all(p.grad is not None for p in model.shared_parameters())
    assert all(p.grad is not None for p in model.task_parameters(task.name))
    others = [p for t in TASKS if t.name != task.name for p in model.task_parameters(t.name)]
    assert all(p.grad is None for p in others)


# --- SegNet and MTAN -----------------------------------------------------------------------------


def test_mtan_masks_lie_strictly_between_0_and_1():
    model = shared_model("segnet_mtan")
    masks = []
    sigmoids = [m for m in model.heads["normal"].modules() if isinstance(m, nn.Sigmoid)]
    hooks = [m.register_forward_hook(lambda _m, _i, out: masks.append(out)) for m in sigmoids]
    try:
        with torch.no_grad():
            model(image((64, 96)), ["normal"])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(masks) == 10  # one mask per encoder and decoder block
    assert all(((m > 0) & (m < 1)).all() for m in masks)


def test_mtan_attention_masks_are_per_task_and_its_attention_convs_shared():
    model = shared_model("segnet_mtan")
    model.zero_grad(set_to_none=True)
    out = model(image((32, 32)), ["depth"])["depth"]
    Depth("depth").loss(out, targets((32, 32))["depth"]).backward()
    for other in ("segmentation", "normal", "attributes"):
        head = model.heads[other]
        attention = list(head.encoder_att.parameters()) + list(head.decoder_att.parameters())
        assert attention and all(p.grad is None for p in attention)
    # mtan's encoder_block_att / decoder_block_att: one set for all tasks, among the shared parameters
    convs = {id(p) for p in model.encoder.attention_convs.parameters()}
    assert convs <= {id(p) for p in model.shared_parameters()}
    assert all(p.grad is not None for p in model.encoder.attention_convs.parameters())


def test_segnet_counts_at_the_published_widths_match_mtan():
    nyuv2 = [Segmentation("segmentation", 13), Depth("depth"), Normal("normal")]

    def count(name: str, tasks: list[Task]) -> int:
        return sum(p.numel() for p in MODELS[name](tasks).parameters())

    single = count("segnet_split", nyuv2[:1])
    assert single == 24_981_069  # the single-task SegNet's count that mtan's scripts divide by
    assert round(count("segnet_mtan", nyuv2) / single, 2) == 1.77  # MTAN's #P in the paper's NYUv2 table


def test_segnet_rejects_a_filter_list_of_the_wrong_length():
    with pytest.raises(MtlrunError, match="5 positive"):
        build("segnet_split", filters=[4, 8, 16])


# --- ResNets -------------------------------------------------------------------------------------


def test_dilated_resnet50_has_output_stride_8_with_libmtl_dilations():
    trunk = shared_model("resnet50_dilated").encoder
    with torch.no_grad():
        assert tuple(trunk(torch.randn(2, 3, 64, 64)).shape) == (2, 2048, 8, 8)
    # LibMTL's _nostride_dilate: layer3/4 unstrided, their first 3x3 conv dilated 1/2, the others 2/4
    for layer, first, rest in ((trunk.layer3, 1, 2), (trunk.layer4, 2, 4)):
        assert layer[0].conv2.stride == (1, 1) and layer[0].downsample[0].stride == (1, 1)
        assert layer[0].conv2.dilation == (first, first)
        assert all(block.conv2.dilation == (rest, rest) for block in layer[1:])


def test_resnet18_cifar_stem_gives_mgda_ub_representation():
    model = shared_model("resnet18_multihead")
    with torch.no_grad():
        assert tuple(model.encoder(torch.randn(2, 3, 64, 64)).shape) == (2, 512, 8, 8)
    assert model.heads["attributes"][-1].in_features == 2048  # MGDA-UB's FaceAttributeDecoder input


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub dir, and any attempt to download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tmp_path


def _random_resnet18_file(path, drop: str | None = None) -> dict:
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    state = {k: v for k, v in state.items() if not (drop and k.endswith(drop))}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _assert_trunk_holds(model: MultiTaskModel, state: dict) -> None:
    trunk = model.encoder.state_dict()
    expected = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert expected.keys() <= trunk.keys() and all(torch.equal(trunk[k], v) for k, v in expected.items())


def test_pretrained_weights_load_from_weights_path(offline):
    path = offline / "weights" / "r18.pth"
    state = _random_resnet18_file(path)
    model = build("resnet18_multihead_imagenet", pretrained=True, weights_path=str(path))
    _assert_trunk_holds(model, state)
    assert set(model.encoder.state_dict()) == {k for k in state if not k.startswith("fc.")}


def test_pretrained_weights_load_from_the_torch_hub_cache_without_bn_counters(offline):
    # torchvision's published files predate BatchNorm's num_batches_tracked buffers
    path = offline / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    state = _random_resnet18_file(path, drop="num_batches_tracked")
    _assert_trunk_holds(build("resnet18_multihead_imagenet", pretrained=True), state)


@pytest.mark.parametrize(
    "name,file",
    [("resnet18_multihead_imagenet", "resnet18-f37072fd.pth"), ("resnet50_dilated", "resnet50-0676ba61.pth")],
)
def test_missing_weights_say_which_file_goes_where(offline, name, file):
    expected = offline / "torch" / "hub" / "checkpoints" / file
    with pytest.raises(MtlrunError) as error:
        build(name, pretrained=True)
    message = str(error.value)
    assert "\n" not in message and str(expected) in message
    assert "weights='IMAGENET1K_V1'" in message and "model.pretrained=false" in message
    assert not any(p.is_file() for p in offline.rglob("*"))  # nothing was fetched


def test_a_missing_weights_path_is_named(offline):
    with pytest.raises(MtlrunError, match=r"model\.weights_path=.*nope\.pth: no such file"):
        build("resnet18_multihead_imagenet", pretrained=True, weights_path=str(offline / "nope.pth"))


@pytest.mark.parametrize("content", ["empty", "garbage", "truncated", "other_arch", "not_a_dict"])
def test_a_bad_weights_file_stops_with_one_line(offline, content):
    path = offline / "bad.pth"
    if content in ("empty", "garbage"):
        path.write_bytes(b"" if content == "empty" else b"this is not a checkpoint")
    elif content == "truncated":
        _random_resnet18_file(path)
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "other_arch":
        torch.save(torchvision.models.resnet18(num_classes=2).layer1.state_dict(), path)
    else:
        torch.save([torch.zeros(1)], path)
    with pytest.raises(MtlrunError) as error:
        build("resnet18_multihead_imagenet", pretrained=True, weights_path=str(path))
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_resnet18_settings_are_checked():
    with pytest.raises(MtlrunError, match="stem=imagenet"):
        build("resnet18_multihead", pretrained=True)
    with pytest.raises(MtlrunError, match=r"model\.stem='vgg'"):
        build("resnet18_multihead", stem="vgg")
    with pytest.raises(MtlrunError, match=r"only with model\.pretrained=true"):
        build("resnet18_multihead_imagenet", weights_path="x.pth")


def test_a_copied_mtan_runs_its_own_shared_attention_convs():
    model = shared_model("segnet_mtan")
    copy = deepcopy(model)
    assert all(head._shared[0] is copy.encoder.attention_convs for head in copy.heads.values())
    model.eval(), copy.eval()
    try:
        with torch.no_grad():
            x = image((32, 32))
            torch.testing.assert_close(copy(x, ["depth"]), model(x, ["depth"]))
    finally:
        model.train()


@pytest.mark.parametrize("name", ["segnet_split", "segnet_mtan"])
def test_segnet_refuses_images_too_small_for_five_poolings_in_one_line(name):
    with pytest.raises(MtlrunError, match="need images of at least 32x32 pixels, got 24x64"):
        build(name)(torch.zeros(2, 3, 24, 64), ["depth"])


def test_dilated_resnet_refuses_a_training_batch_of_one_image_and_evaluates_one():
    model = build("resnet50_dilated", [Depth("depth")])
    with pytest.raises(MtlrunError, match="set trainer.batch_size >= 2"):
        model(torch.zeros(1, 3, 32, 32), ["depth"])
    assert model.eval()(torch.zeros(1, 3, 32, 32), ["depth"])["depth"].shape == (1, 1, 32, 32)


def test_dilated_resnet_upsamples_with_aligned_corners_as_libmtl_and_the_others_do_not():
    model = build("resnet50_dilated", [Depth("depth")]).eval()
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        low = model.heads["depth"](model.encoder(image))
        expected = torch.nn.functional.interpolate(low, size=(32, 48), mode="bilinear", align_corners=True)
        torch.testing.assert_close(model(image, ["depth"])["depth"], expected)
    assert not build("resnet18_multihead").align_corners
