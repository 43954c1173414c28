"""MTAN on a chosen backbone (`model=mtan`): a shared trunk, and per task soft attention masks at every stage.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention" (CVPR 2019); on ResNets as LibMTL's
`MTAN`. The trunk runs once; each task has an attention path beside it. At stage k a task's mask
a_k, in (0, 1) (conv1x1-BN-ReLU, conv1x1-BN-sigmoid), reads the stage's intermediate feature (the output
of all its layers but the last) and, from stage 1 on, the task's previous attended feature after the
shared block f_k brought to the stage's resolution (max-pooling down, bilinear with aligned corners up,
as mtan); it multiplies the stage's output. The head reads the last attended feature.

f_k, as LibMTL's on ResNets: a residual block of the trunk's kind at stride 1 with a conv1x1-BN projection
shortcut (a basic block on ResNet-18; a bottleneck block of width out/4 on ResNet-50); on the convnet mtan's
conv block (conv3x3-BN-ReLU), LibMTL's MTAN having no such backbone. Masks are as LibMTL's (intermediate
width out/4 on the bottleneck ResNet-50, out elsewhere). On ResNets the stem runs with layer1 as one stage
(LibMTL's masks start at layer1), so the masks sit at layer1..layer4.

Shared: the trunk and the f blocks (one set for all tasks, as mtan's and LibMTL's code; the encoder owns
them and each task's path runs them). Task t: its masks and its head. A step on some tasks runs the
trunk and only their attention paths. MGDA-UB has no representation here: the shared f blocks act after
the trunk's output, on each task's attended features; it refuses.

On `model/backbone=segnet` this is mtan's own SegNet-MTAN (`model=segnet_mtan`, decoder attention
included).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrun.models import segnet
from mtlrun.models.backbones import Stage, build_backbone, stage_channels
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task

NO_REPRESENTATION = (
    "model=mtan's shared attention blocks act after the trunk's output, on each task's attended features, so "
    "no one representation separates shared from task parameters: use strategy.rep_grad=false or model=hps"
)


def _attention(cin: int, width: int, cout: int) -> nn.Sequential:
    """A soft mask in (0, 1): conv1x1-BN-ReLU to `width`, conv1x1-BN-sigmoid to `cout`."""
    return nn.Sequential(
        nn.Conv2d(cin, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid(),
    )


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] > size[0]:
        return F.adaptive_max_pool2d(x, tuple(size))
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class AttendedTrunk(nn.Module):
    """The shared part: the f blocks and the trunk's stages; gives every stage's (mid, out) features, flat."""

    def __init__(
        self, stages: list[Stage], channels: list[tuple[int, int]], block: Callable[[int, int], nn.Module]
    ) -> None:
        super().__init__()
        outs = [out for _, out in channels]
        self.attention_convs = nn.ModuleList(block(a, b) for a, b in itertools.pairwise(outs))
        self.stages = nn.ModuleList(stages)  # registered last: the trunk's last conv is the last shared layer

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        history, features = [image], []
        for stage in self.stages:
            mid, out = stage(history)
            history.append(out)
            features += [mid, out]
        return tuple(features)


class AttentionPath(nn.Module):
    """One task's masks, run on the trunk's features with the shared f blocks."""

    def __init__(self, channels: list[tuple[int, int]], reduction: int, convs: nn.ModuleList) -> None:
        super().__init__()
        self.masks = nn.ModuleList(
            _attention(mid + (out if k else 0), max(out // reduction, 1), out)
            for k, (mid, out) in enumerate(channels)
        )
        self._shared = (convs,)  # a plain tuple keeps the encoder's convs out of this task's parameters

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        convs = self._shared[0]
        attended = None
        for k, mask in enumerate(self.masks):
            mid, out = features[2 * k], features[2 * k + 1]
            if attended is not None:
                mid = torch.cat([mid, _resize(convs[k - 1](attended), out.shape[-2:])], dim=1)
            attended = mask(mid) * out
        return attended


def build(tasks: list[Task], backbone: Mapping | None = None) -> MultiTaskModel:
    spec = build_backbone(backbone or {"name": "convnet"}, tasks)
    if spec.name == "segnet":
        return segnet.build_mtan(tasks, dict(backbone).get("filters", segnet.PUBLISHED_FILTERS))
    stages = spec.stages("mtan", stem_apart=False)
    channels = stage_channels(stages)
    trunk = AttendedTrunk(stages, channels, spec.attention_conv)
    paths = {t.name: AttentionPath(channels, spec.attention_reduction, trunk.attention_convs) for t in tasks}
    model = MultiTaskModel(trunk, {t.name: spec.head(t) for t in tasks}, spec.align_corners, task_parts=paths)
    model.no_representation = NO_REPRESENTATION
    return model
