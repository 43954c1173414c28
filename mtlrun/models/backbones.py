"""Backbones the architectures are built on (`model.backbone`): a trunk, its split into stages, and its heads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrun.constraints import integer
from mtlrun.errors import MtlrunError
from mtlrun.models import convnet, resnet, segnet
from mtlrun.tasks import Task

BACKBONES = ("convnet", "resnet18", "resnet50", "segnet")
STAGED = ("convnet", "resnet18", "resnet50")  # the backbones split into stages (SegNet unpools across them)


class Stage(nn.Module):
    """One stage of a trunk, run on its path's history: the image, then the outputs of the earlier stages of
    the same path (a cross-stitch column, a branch of a tree, an expert's path). It reads the last of them
    and, in a U-Net's decoder, one earlier output (`skip`: the last is upsampled to its size and
    concatenated). Returns (mid, out): `out` the stage's output and `mid` that of all its layers but the
    last, which MTAN's attention reads (`out` again for a one-layer stage)."""

    def __init__(self, layers: Sequence[nn.Module], skip: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.skip = skip

    def forward(self, history: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        x = history[-1]
        if self.skip is not None:
            earlier = history[self.skip]
            x = F.interpolate(x, size=earlier.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, earlier], dim=1)
        for layer in self.layers[:-1]:
            x = layer(x)
        out = self.layers[-1](x)
        return (x if len(self.layers) > 1 else out), out


def run_stages(stages: Sequence[Stage], image: Tensor) -> list[Tensor]:
    """The history of one path through `stages`: [image, output of stage 0, ..., output of the last]."""
    history = [image]
    for stage in stages:
        history.append(stage(history)[1])
    return history


def _convnet_stages(trunk: convnet.UNetEncoder) -> list[Stage]:
    """stem (1/2), down1 (1/4), down2 (1/8), up1 (1/4, reads down1's output), up2 (1/2, reads the stem's)."""
    return [
        Stage([trunk.stem]), Stage(list(trunk.down1)), Stage(list(trunk.down2)),
        Stage([trunk.up1], skip=2), Stage([trunk.up2], skip=1),
    ]


def _resnet_stages(trunk: resnet.ResNetTrunk) -> list[Stage]:
    """The stem (conv1, bn1, relu, maxpool), then layer1, layer2, layer3 and layer4: the five stages of
    LibMTL's ResNet encoders in its PLE and LTB."""
    stem = [trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool]
    return [Stage(stem), Stage(list(trunk.layer1)), Stage(list(trunk.layer2)), Stage(list(trunk.layer3)),
            Stage(list(trunk.layer4))]


def _conv_block(cin: int, cout: int) -> nn.Module:
    """conv3x3-BN-ReLU: mtan's conv block (the paper's shared f)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@dataclass
class Backbone:
    """What an architecture needs of a backbone: new trunks (each initialised on its own, from ImageNet
    weights where asked), their split into stages (None where the backbone has none), one head per task
    on the trunk's `channels`, and how dense outputs are upsampled. `stem`: the first stage is a stem
    (a ResNet's conv1 to maxpool) that Cross-stitch and MTAN run together with the next stage, as LibMTL's
    place no unit and no mask after it. `attention_conv(cin, cout)`: MTAN's shared f on this backbone."""

    name: str
    trunk: Callable[[], nn.Module]
    head: Callable[[Task], nn.Module]
    channels: int
    split: Callable[[nn.Module], list[Stage]] | None = None
    align_corners: bool = False
    attention_reduction: int = 1  # MTAN's mask width divisor: LibMTL's 4 for bottleneck ResNets
    attention_conv: Callable[[int, int], nn.Module] = _conv_block
    stem: bool = False

    def stages(self, architecture: str, stem_apart: bool = True) -> list[Stage]:
        """A new trunk split into stages (with `stem_apart=False` the stem joined to the stage after it), or
        one line saying this backbone has none."""
        if self.split is None:
            raise MtlrunError(
                f"model={architecture} runs the backbone stage by stage, which {self.name} cannot (its decoder "
                f"unpools with its encoder's indices): choose model/backbone={' or model/backbone='.join(STAGED)}"
            )
        stages = self.split(self.trunk())
        if self.stem and not stem_apart:
            return [Stage([*stages[0].layers, *stages[1].layers]), *stages[2:]]
        return stages


def build_backbone(settings: Mapping, tasks: Sequence[Task]) -> Backbone:
    """The backbone named by `settings["name"]`, its other keys being that backbone's own settings."""
    settings = dict(settings)
    name = settings.pop("name", None)
    builders = {"convnet": _convnet, "resnet18": _resnet18, "resnet50": _resnet50, "segnet": _segnet}
    if name not in builders:
        raise MtlrunError(
            f"no backbone named {name!r}; known: {', '.join(BACKBONES)} (model/backbone=convnet)"
        )
    try:
        return builders[name](**settings)
    except TypeError as error:
        raise MtlrunError(f"model.backbone={name} got an unexpected setting: {error}") from None


def _convnet(width: int = 16) -> Backbone:
    integer("model.backbone.width", width, 1)

    def head(task: Task) -> nn.Module:
        return (convnet.dense_head if task.dense else convnet.image_head)(width, task.out_channels)

    return Backbone("convnet", lambda: convnet.UNetEncoder(width), head, width, _convnet_stages)


def _resnet18(
    pretrained: bool = False, weights_path: str | None = None, stem: str = "cifar", pooled_size: int = 2
) -> Backbone:
    size = resnet.check_resnet18_settings(pretrained, stem, pooled_size)
    return Backbone(
        "resnet18", lambda: resnet.resnet18_trunk(pretrained, weights_path, stem),
        lambda task: resnet.resnet18_head(512, task, size), 512, _resnet_stages,
        attention_conv=resnet.residual_block, stem=True,
    )


def _resnet50(pretrained: bool = False, weights_path: str | None = None) -> Backbone:
    return Backbone(
        "resnet50", lambda: resnet.resnet50_dilated_trunk(pretrained, weights_path),
        lambda task: resnet.resnet50_dilated_head(2048, task), 2048, _resnet_stages,
        align_corners=True, attention_reduction=4, attention_conv=resnet.bottleneck_block, stem=True,
    )


def _segnet(filters: Sequence[int] = segnet.PUBLISHED_FILTERS) -> Backbone:
    filters = segnet._check_filters(filters)
    return Backbone(
        "segnet", lambda: segnet._init_as_mtan(segnet.SegNet(filters)),
        lambda task: segnet._init_as_mtan(segnet._prediction(filters[0], task)), filters[0],
    )


def image_channels(trunk: nn.Module) -> int:
    """The channels of the image a trunk (or its stages) reads: its first convolution's input, which the
    gates reading the same image take too."""
    return next(m for m in trunk.modules() if isinstance(m, nn.Conv2d)).in_channels


@torch.no_grad()
def stage_channels(stages: Sequence[Stage]) -> list[tuple[int, int]]:
    """Each stage's (mid, out) channels, from one pass on a small image in eval mode (no statistics change)."""
    modes = [m.training for m in stages]
    for stage in stages:
        stage.eval()
    history, channels = [torch.zeros(1, image_channels(nn.ModuleList(stages)), 32, 32)], []
    for stage in stages:
        mid, out = stage(history)
        history.append(out)
        channels.append((mid.shape[1], out.shape[1]))
    for stage, mode in zip(stages, modes):
        stage.train(mode)
    return channels
