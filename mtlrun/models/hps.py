"""Hard parameter sharing on a chosen backbone (`model=hps`): one trunk for all tasks, one head per task.

Caruana, "Multitask Learning: A Knowledge-Based Source of Inductive Bias" (ICML 1993); LibMTL's `HPS`.
Shared: the whole trunk (`encoder`). Task t: its head only. The reference the other architectures'
costs are measured against (docs/models.md, Architectures). With the same backbone settings and seed it builds
exactly the backbone's own model (`model=convnet`, `resnet18_multihead`, `resnet50_dilated`, `segnet_split`).
MGDA-UB's representation is the trunk's output.
"""

from __future__ import annotations

from collections.abc import Mapping

from mtlrun.models import segnet
from mtlrun.models.backbones import build_backbone
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task


def build(tasks: list[Task], backbone: Mapping | None = None) -> MultiTaskModel:
    spec = build_backbone(backbone or {"name": "convnet"}, tasks)
    if spec.name == "segnet":  # initialised as a whole, as mtan's
        return segnet.build_split(tasks, dict(backbone).get("filters", segnet.PUBLISHED_FILTERS))
    trunk = spec.trunk()
    return MultiTaskModel(trunk, {t.name: spec.head(t) for t in tasks}, align_corners=spec.align_corners)
