"""PLE on a chosen backbone (`model=ple`): CGC at every stage, with a shared gate feeding the next shared experts.

Progressive Layered Extraction: Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations" (RecSys 2020); LibMTL's `PLE`. Each stage
of the backbone is an extraction level (as LibMTL's: on ResNets the stem and layer1..layer4, 5 levels). At
level j there are `num_shared` shared experts and `num_specific` experts per task (copies of stage j), and
a path per task and a shared path, each with its history (the image, then its gated outputs). Task t's
gate (softmax of a linear map of its path's pooled input) mixes the shared experts and t's own, the
experts run on the histories of their own path; below the last level a shared gate mixes all experts of
the level (shared and every task's) into the shared path, whose history the next level's shared experts
read. Task t's head reads its path's last mixture.

Shared and task parameters, by which tasks' losses reach them: through the shared gates every task's loss
reaches every expert below the last level, every shared gate and every task gate below the last two
levels, so those are shared, task experts included (the paper's design; LibMTL drops the shared gates and runs the shared experts on every
task's path instead). Task t owns its experts at the last level, its gates at the last two levels and its
head; the last level's shared experts are shared and run once, on the shared path. A step on some
tasks runs every path below the last two levels (the shared gates need them all) and only their own
parts above. MGDA-UB has no representation here (the last shared experts act on features that the task
parts also read); it refuses. Defaults: one shared expert and one per task (LibMTL has none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlrun.errors import MtlrunError
from mtlrun.models.backbones import Stage, build_backbone, image_channels, stage_channels
from mtlrun.models.base import MultiTaskModel
from mtlrun.models.mmoe import Gate, check_count, mix
from mtlrun.tasks import Task

NO_REPRESENTATION = (
    "model=ple's shared experts of the last level act after features its task parts read as well, so no one "
    "representation separates shared from task parameters: use strategy.rep_grad=false or model=cgc"
)


def run_experts(experts: Sequence[Stage], history: list[Tensor]) -> Tensor:
    return torch.stack([expert(history)[1] for expert in experts])


class Level(nn.Module):
    """One level's gates and experts, any of them possibly absent (they live where their owner is)."""

    def __init__(self, gates: dict[str, Gate], experts: dict[str, list[Stage]]) -> None:
        super().__init__()
        self.gates = nn.ModuleDict(gates)  # registered before the experts (gradnorm's last shared layer)
        self.experts = nn.ModuleDict({k: nn.ModuleList(v) for k, v in experts.items()})


class Extraction(nn.Module):
    """The shared part: all levels but the last two in full, at the second-to-last the experts and the
    shared gate, at the last the shared experts; gives every task path's history and experts' outputs
    at the second-to-last level, the shared experts' there, and the last level's shared experts' outputs."""

    def __init__(self, levels: list[Level], tasks: list[str]) -> None:
        super().__init__()
        self.levels, self.tasks = nn.ModuleList(levels), tasks

    def forward(self, image: Tensor) -> dict:
        paths = {name: [image] for name in ["shared", *self.tasks]}
        *lower, second, last = self.levels
        for level in [*lower, second]:
            outputs = {name: run_experts(experts, paths[name]) for name, experts in level.experts.items()}
            everything = torch.cat([outputs["shared"], *(outputs[t] for t in self.tasks)])
            shared_input = paths["shared"][-1]
            if level is second:
                break
            for t in self.tasks:
                paths[t].append(mix(level.gates[t](paths[t][-1]), torch.cat([outputs["shared"], outputs[t]])))
            paths["shared"].append(mix(level.gates["shared"](shared_input), everything))
        paths["shared"].append(mix(second.gates["shared"](shared_input), everything))
        top = run_experts(last.experts["shared"], paths["shared"])
        return {"paths": paths, "second": outputs, "top": top}


class TaskLevels(nn.Module):
    """One task's gates at the last two levels and its experts at the last."""

    def __init__(self, task: str, second_gate: Gate, last_gate: Gate, last_experts: list[Stage]) -> None:
        super().__init__()
        self.task = task
        self.second_gate, self.last_gate = second_gate, last_gate
        self.experts = nn.ModuleList(last_experts)

    def forward(self, features: dict) -> Tensor:
        history, second = list(features["paths"][self.task]), features["second"]
        mixed = mix(self.second_gate(history[-1]), torch.cat([second["shared"], second[self.task]]))
        history.append(mixed)
        own = run_experts(self.experts, history)
        return mix(self.last_gate(mixed), torch.cat([features["top"], own]))


def build(
    tasks: list[Task], backbone: Mapping | None = None, num_shared: int = 1, num_specific: int = 1,
    gate_pool: int = 8,
) -> MultiTaskModel:
    check_count("num_shared", num_shared), check_count("num_specific", num_specific)
    check_count("gate_pool", gate_pool)
    spec = build_backbone(backbone or {"name": "convnet"}, tasks)
    names = [t.name for t in tasks]
    copies = {name: [spec.stages("ple") for _ in range(n)] for name, n in
              [("shared", num_shared)] + [(t, num_specific) for t in names]}
    depth = len(copies["shared"][0])
    if depth < 2:
        raise MtlrunError("model=ple needs a backbone of at least two stages")
    first = copies["shared"][0]
    inputs = [image_channels(first[0])] + [out for _, out in stage_channels(first)][:-1]  # each level's input
    every = num_shared + num_specific * len(names)

    def experts(name: str, j: int) -> list[Stage]:
        return [stages[j] for stages in copies[name]]

    def gate(j: int, n: int) -> Gate:
        return Gate(inputs[j], n, gate_pool)

    levels = []
    for j in range(depth):
        owned = j >= depth - 2  # the task gates of the last two levels belong to their tasks
        gates = {} if owned else {t: gate(j, num_shared + num_specific) for t in names}
        if j < depth - 1:
            gates["shared"] = gate(j, every)
        level_experts = {"shared": experts("shared", j)}
        if j < depth - 1:
            level_experts.update({t: experts(t, j) for t in names})
        levels.append(Level(gates, level_experts))
    parts = {
        t: TaskLevels(t, gate(depth - 2, num_shared + num_specific), gate(depth - 1, num_shared + num_specific),
                      experts(t, depth - 1))
        for t in names
    }
    model = MultiTaskModel(Extraction(levels, names), {t.name: spec.head(t) for t in tasks}, spec.align_corners,
                           task_parts=parts)
    model.no_representation = NO_REPRESENTATION
    return model
