"""A small U-Net-style encoder with light task heads, sized for the built-in benchmark on a CPU."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetEncoder(nn.Module):
    """Three downsampling stages and a decoder back to half the input resolution, with skip connections."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.stem = _conv(3, w, stride=2)  # 1/2
        self.down1 = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))  # 1/4
        self.down2 = nn.Sequential(_conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w))  # 1/8
        self.up1 = _conv(4 * w + 2 * w, 2 * w)
        self.up2 = _conv(2 * w + w, w)
        self.out_channels = w

    def forward(self, x: Tensor) -> Tensor:
        s1 = self.stem(x)
        s2 = self.down1(s1)
        s3 = self.down2(s2)
        u = nn.functional.interpolate(s3, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        u = self.up1(torch.cat([u, s2], dim=1))
        u = nn.functional.interpolate(u, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        return self.up2(torch.cat([u, s1], dim=1))


def dense_head(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(_conv(cin, cin), nn.Conv2d(cin, cout, 1))


def image_head(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(
        _conv(cin, cin, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, cout)
    )


def build(tasks: list[Task], width: int = 16) -> MultiTaskModel:
    encoder = UNetEncoder(width)
    c = encoder.out_channels
    heads = {t.name: (dense_head if t.dense else image_head)(c, t.out_channels) for t in tasks}
    return MultiTaskModel(encoder, heads)
