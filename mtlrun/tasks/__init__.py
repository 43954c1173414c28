"""Tasks (what each predicts, its loss, its metrics over a split); `build_task` makes one from config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mtlrun.errors import MtlrunError
from mtlrun.tasks.attributes import BinaryAttributes, BinaryMeter
from mtlrun.tasks.base import Meter, Metric, Task
from mtlrun.tasks.binary_maps import BinaryMapMeter, BinaryMaps
from mtlrun.tasks.dense import AngleMeter, ConfusionMeter, Depth, DepthMeter, Normal, Segmentation
from mtlrun.tasks.groups import JOINT_METRICS, map_groups

__all__ = [
    "JOINT_METRICS", "TASK_KINDS", "AngleMeter", "BinaryAttributes", "BinaryMapMeter", "BinaryMaps",
    "BinaryMeter", "ConfusionMeter", "Depth", "DepthMeter", "Meter", "Metric", "Normal", "Segmentation",
    "Task", "build_task", "count_in_delta_m", "map_groups",
]

TASK_KINDS = ("segmentation", "binary_map", "depth", "normal", "binary")


def build_task(name: str, spec: dict, attribute_names: list[str] | None = None) -> Task:
    """Build one task from its dataset-config entry (`kind` plus the kind's parameters)."""
    kind = spec.get("kind")
    if kind == "segmentation":
        return Segmentation(name, int(spec["num_classes"]), int(spec.get("ignore_index", -1)))
    if kind == "binary_map":
        return BinaryMaps(
            name, list(spec.get("classes") or []), int(spec.get("ignore_index", -1)), spec.get("group")
        )
    if kind == "depth":
        return Depth(name)
    if kind == "normal":
        return Normal(name)
    if kind == "binary":
        columns = spec.get("columns") or attribute_names or []
        return BinaryAttributes(name, list(columns))
    raise MtlrunError(f"task '{name}' has kind {kind!r}; valid kinds: {', '.join(TASK_KINDS)}")


def count_in_delta_m(task: Task, names: Sequence[str]) -> None:
    """Let exactly the metrics `names` of `task` enter Δm% (FAMO's CelebA Δm% counts F1 alone)."""
    chosen = [m for m in task.metrics if m.name in names]
    if not chosen:
        raise MtlrunError(
            f"dataset.delta_m_metrics={list(names)} names none of task '{task.name}''s metrics "
            f"({', '.join(m.name for m in task.metrics)}): add one of them, or set it to null"
        )
    task.metrics = tuple(replace(m, in_delta_m=m.name in names) for m in task.metrics)
