"""MMoE on a chosen backbone (`model=mmoe`): shared experts, and per task a gate mixing them.

Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts" (KDD 2018); LibMTL's `MMoE`. `num_experts` copies of the backbone's trunk (the
experts, each initialised on its own) run on the image; task t's gate softmax(W_t pool(x) + b_t) weighs
them per image, and its head reads sum_e g_t(x)_e * expert_e(x).

Shared: every expert. Task t: its gate and its head. A step on some tasks runs every expert and only
their gates. MGDA-UB's representation is the stack of the experts' outputs (the gates read the image,
not it). With one expert every gate is 1 and MMoE is hard parameter sharing.

Gates: the paper's gate is linear in the input, and LibMTL's a linear map of the whole flattened image
(so it needs the image size in advance: 331,776 inputs per expert at NYUv2's 288x384). Here the image is
first average-pooled to `gate_pool` x `gate_pool` cells (default 8: 192 inputs), so one model serves any
image size. LibMTL has no default number of experts (its --num_experts is required); 4 here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrun.constraints import integer
from mtlrun.models.backbones import build_backbone, image_channels
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task


def check_count(name: str, value: object, least: int = 1) -> int:
    return integer(f"model.{name}", value, least)


class Gate(nn.Module):
    """softmax(W pool(x) + b): `x` average-pooled to pool x pool cells and flattened, one weight per expert."""

    def __init__(self, channels: int, experts: int, pool: int) -> None:
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(channels * pool * pool, experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(F.adaptive_avg_pool2d(x, self.pool).flatten(1)), dim=-1)


def mix(weights: Tensor, experts: Tensor) -> Tensor:
    """Per image b, sum_e weights[b, e] * experts[e, b]: a batch of mixtures from E x batch x ... outputs."""
    return torch.einsum("be,eb...->b...", weights, experts)


class Experts(nn.Module):
    """Experts run on the image; gives (their stacked outputs, E x batch x C x H x W; the image)."""

    def __init__(self, experts: list[nn.Module]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return torch.stack([expert(image) for expert in self.experts]), image


class GatedMixture(nn.Module):
    """One task's gate over the shared experts."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, features: tuple[Tensor, Tensor]) -> Tensor:
        experts, image = features
        return mix(self.gate(image), experts)


def build(tasks: list[Task], backbone: Mapping | None = None, num_experts: int = 4, gate_pool: int = 8) -> MultiTaskModel:
    check_count("num_experts", num_experts), check_count("gate_pool", gate_pool)
    spec = build_backbone(backbone or {"name": "convnet"}, tasks)
    experts = Experts([spec.trunk() for _ in range(num_experts)])
    channels = image_channels(experts)
    gates = {t.name: GatedMixture(Gate(channels, num_experts, gate_pool)) for t in tasks}
    heads = {t.name: spec.head(t) for t in tasks}
    return MultiTaskModel(experts, heads, spec.align_corners, task_parts=gates)
