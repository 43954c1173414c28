"""CGC on a chosen backbone (`model=cgc`): shared experts, and per task its own experts and a gate over both.

Customized Gate Control, the single-level form of PLE: Tang, Liu, Zhao & Gong, "Progressive Layered
Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations" (RecSys 2020);
LibMTL's `CGC`. `num_shared` trunks (shared experts) and, per task, `num_specific` trunks of its own run on
the image; task t's gate (as MMoE's: softmax of a linear map of the pooled image) weighs the shared experts
and t's own, and its head reads the mixture.

Shared: the shared experts. Task t: its own experts, its gate and its head. A step on some tasks runs the
shared experts and only their own experts and gates. MGDA-UB's representation is the stack of the
shared experts' outputs; a task's own experts read the image, not it.
Defaults: one shared expert and one per task (LibMTL's --num_experts, e.g. `1 1 1 1`, has no default);
without task experts CGC would be MMoE, so `num_specific` is at least 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mtlrun.models.backbones import build_backbone, image_channels
from mtlrun.models.base import MultiTaskModel
from mtlrun.models.mmoe import Experts, Gate, check_count, mix
from mtlrun.tasks import Task


class OwnExpertsAndGate(nn.Module):
    """One task's experts and its gate over [shared experts, its own]."""

    def __init__(self, experts: list[nn.Module], gate: Gate) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate

    def forward(self, features: tuple[Tensor, Tensor]) -> Tensor:
        shared, image = features
        own = torch.stack([expert(image) for expert in self.experts])
        return mix(self.gate(image), torch.cat([shared, own]))


def build(
    tasks: list[Task], backbone: Mapping | None = None, num_shared: int = 1, num_specific: int = 1,
    gate_pool: int = 8,
) -> MultiTaskModel:
    check_count("num_shared", num_shared), check_count("num_specific", num_specific)
    check_count("gate_pool", gate_pool)
    spec = build_backbone(backbone or {"name": "convnet"}, tasks)
    shared = Experts([spec.trunk() for _ in range(num_shared)])
    channels = image_channels(shared)
    parts = {
        t.name: OwnExpertsAndGate(
            [spec.trunk() for _ in range(num_specific)], Gate(channels, num_shared + num_specific, gate_pool)
        )
        for t in tasks
    }
    heads = {t.name: spec.head(t) for t in tasks}
    return MultiTaskModel(shared, heads, spec.align_corners, task_parts=parts)
