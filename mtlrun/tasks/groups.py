"""Per-class binary-map tasks measured together: the groups an arg-max over their maps is taken in."""

from __future__ import annotations

from collections.abc import Sequence

from mtlrun.tasks.base import Task
from mtlrun.tasks.binary_maps import BinaryMaps


def map_groups(tasks: Sequence[Task]) -> dict[str, BinaryMaps]:
    """Per segmentation task cut into per-class tasks (`dataset.binary_maps=per_class`) of which two or more
    are trained, one binary-map task holding those maps together, in the tasks' order: what an arg-max over
    all of them is measured on (the authors' pixel accuracy, `JOINT_METRICS`)."""
    members: dict[str, list[BinaryMaps]] = {}
    for task in tasks:
        if isinstance(task, BinaryMaps) and task.group is not None:
            members.setdefault(task.group, []).append(task)
    return {
        group: BinaryMaps(group, [c for t in maps for c in t.classes], maps[0].ignore_index)
        for group, maps in members.items() if len(maps) > 1
    }


# The metrics a group of per-class maps reports together (`map_groups`), out of Δm%.
JOINT_METRICS = ("pixel_acc_argmax",)
