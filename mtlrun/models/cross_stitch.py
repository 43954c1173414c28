"""Cross-stitch networks on a chosen backbone (`model=cross_stitch`): a column per task, mixed after every stage.

Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for Multi-task Learning" (CVPR 2016); LibMTL's
`Cross_stitch`. Each task has its own copy of the backbone's trunk (a column). After every stage k a
cross-stitch unit, a learned T x T matrix alpha^k, replaces the output of column t by
sum_j alpha^k[t, j] * (output of column j); the next stage of column t reads that mixture (and, in a
U-Net, the mixtures of the same column's earlier stages). Task t's head reads the mixture of the last
unit's row t.

Shared and task parameters, by which tasks' losses reach them: every column and every unit but the last
are shared, since through the units every task's loss reaches every column (with weight alpha, so also
where alpha[t, j] is 0: a zero gradient, not none). Task t owns row t of the last unit and its head. So
per-task optimizer state, alternating steps and the gradient methods' Jacobians treat the columns as
shared; a step on some tasks runs every column (all of them feed those tasks) and only their rows.
MGDA-UB's representation is the stack of the columns' last outputs, which only the task rows read.

Defaults: units start with alpha[t, t] = `self_weight` = 0.9 and alpha[t, j] = 0.1 / (T - 1) elsewhere,
the paper's best initialisation for two tasks (rows sum to 1); `self_weight=1` makes the columns start
independent. Not taken: the paper's 10^2-10^3 times larger learning rate for the units (LibMTL does not
scale it either; here every parameter has the optimizer's learning rate), LibMTL's all-ones units, and
LibMTL's placement (units after layer1-3 only, each column's layer4 its task's): a unit after the last
stage, as the paper's after fc7, keeps one representation for every backbone, U-Nets included. On ResNets
the stem runs with layer1 as one stage, so the units sit after layer1..layer4 (LibMTL's place none after
the stem either); with T tasks that is 4 T^2 unit weights, as many as LibMTL's (of which it uses 3 T^2).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mtlrun.errors import MtlrunError
from mtlrun.models.backbones import Stage, build_backbone
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task


def initial_unit(tasks: int, self_weight: float) -> Tensor:
    """A cross-stitch unit with `self_weight` on the diagonal and the rest of each row spread evenly."""
    if tasks == 1:
        return torch.ones(1, 1)
    unit = torch.full((tasks, tasks), (1 - self_weight) / (tasks - 1))
    return unit.fill_diagonal_(self_weight)


class Columns(nn.Module):
    """The columns and every cross-stitch unit but the last (shared); gives the stack of the columns' last
    outputs, T x batch x C x H x W."""

    def __init__(self, columns: list[list[Stage]], self_weight: float) -> None:
        super().__init__()
        stages, tasks = len(columns[0]), len(columns)
        # Registered before the columns, so the last shared weight matrix is a conv (gradnorm's last shared layer).
        self.units = nn.Parameter(initial_unit(tasks, self_weight).repeat(stages - 1, 1, 1))
        self.columns = nn.ModuleList(nn.ModuleList(column) for column in columns)

    def forward(self, image: Tensor) -> Tensor:
        histories = [[image] for _ in self.columns]
        for k in range(len(self.columns[0])):
            outputs = torch.stack([column[k](history)[1] for column, history in zip(self.columns, histories)])
            if k == len(self.columns[0]) - 1:
                return outputs
            mixed = torch.einsum("tj,j...->t...", self.units[k], outputs)
            for history, output in zip(histories, mixed):
                history.append(output)
        raise AssertionError("a backbone has at least one stage")


class StitchRow(nn.Module):
    """Task t's row of the last cross-stitch unit: its head reads sum_j w_j * (column j's last output)."""

    def __init__(self, row: Tensor) -> None:
        super().__init__()
        self.row = nn.Parameter(row.clone())

    def forward(self, columns: Tensor) -> Tensor:
        return torch.einsum("j,j...->...", self.row, columns)


def build(tasks: list[Task], backbone: Mapping | None = None, self_weight: float = 0.9) -> MultiTaskModel:
    if not 0 <= self_weight <= 1:
        raise MtlrunError(f"model.self_weight must lie in [0, 1], got {self_weight!r}")
    spec = build_backbone(backbone or {"name": "convnet"}, tasks)
    columns = [spec.stages("cross_stitch", stem_apart=False) for _ in tasks]
    unit = initial_unit(len(tasks), float(self_weight))
    rows = {t.name: StitchRow(unit[i]) for i, t in enumerate(tasks)}
    heads = {t.name: spec.head(t) for t in tasks}
    return MultiTaskModel(Columns(columns, float(self_weight)), heads, spec.align_corners, task_parts=rows)
