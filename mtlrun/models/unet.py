"""`model=unet`: the bilinear U-Net of Pascal et al.'s NYUv2 and Cityscapes runs, shared, a 1x1 conv per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrun.constraints import integer
from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.models.resnet import pooled_linear
from mtlrun.tasks import Task

POOLINGS = 4


def double_conv(cin: int, cout: int, mid: int, running_stats: bool) -> nn.Sequential:
    """Twice conv3x3-BN-ReLU. The convs have no bias: the batch norm after them removes any constant."""

    def conv(a: int, b: int) -> list[nn.Module]:
        norm = nn.BatchNorm2d(b, track_running_stats=running_stats)
        return [nn.Conv2d(a, b, 3, padding=1, bias=False), norm, nn.ReLU(inplace=True)]

    return nn.Sequential(*conv(cin, mid), *conv(mid, cout))


class Up(nn.Module):
    """x2 bilinear upsampling (aligned corners), padded to the skip connection's size, concatenated after it,
    then a double conv halving the channels in its middle."""

    def __init__(self, cin: int, cout: int, running_stats: bool) -> None:
        super().__init__()
        self.conv = double_conv(cin, cout, cin // 2, running_stats)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNetEncoder(nn.Module):
    """The U-Net of Ronneberger et al. (2015) with bilinear upsampling, as in the authors' code
    (lucaspascal/AITSO_MTL `nyuv2/models/unet.py`, `cityscapes/models/unet.py`): four max-pooling levels of
    double convs with width, 2, 4, 8 and 8 times width channels, four upsampling levels back to the input
    resolution with skip connections; its output (width channels, full resolution) is shared by every head."""

    def __init__(self, width: int, running_stats: bool) -> None:
        super().__init__()
        w, self.running_stats = width, running_stats
        self.inc = double_conv(3, w, w, running_stats)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), double_conv(a, b, b, running_stats))
            for a, b in ((w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w), (8 * w, 8 * w))
        )
        self.ups = nn.ModuleList(
            Up(a, b, running_stats) for a, b in ((16 * w, 4 * w), (8 * w, 2 * w), (4 * w, w), (2 * w, w))
        )
        self.out_channels = w

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return x

    def _check(self, x: Tensor) -> None:
        height, width = x.shape[-2:]
        if min(height, width) < 2**POOLINGS:
            raise MtlrunError(
                f"model=unet pools {POOLINGS} times and needs images of at least {2**POOLINGS}x{2**POOLINGS} "
                f"pixels, got {height}x{width}"
            )
        per_channel = x.shape[0] * (height // 2**POOLINGS) * (width // 2**POOLINGS)
        if per_channel == 1 and (self.training or not self.running_stats):
            raise MtlrunError(
                f"model=unet's deepest batch norm would see one value per channel (one {height}x{width} image): "
                f"use batches of at least 2 images, or images of at least {2 ** (POOLINGS + 1)} pixels a side"
            )


def build(tasks: list[Task], width: int = 64, running_stats: bool = True) -> MultiTaskModel:
    """The shared U-Net and per task a 1x1 conv on its output (the authors' `OutConv`; the sigmoid or
    normalisation they apply after it is in the task's loss here); per-image tasks get a pooled linear head."""
    integer("model.width", width, 1)
    encoder = UNetEncoder(int(width), bool(running_stats))
    c = encoder.out_channels
    heads = {
        t.name: nn.Conv2d(c, t.out_channels, 1) if t.dense else pooled_linear(c, t.out_channels)
        for t in tasks
    }
    return MultiTaskModel(encoder, heads)
