"""Geometric loss strategy: one step on the geometric mean of the task losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.strategies.base import LossCombiner, StepContext

TINY = 1e-8  # losses are floored here: at a zero loss the geometric mean's gradient is infinite


class GLS(LossCombiner):
    """One step on (prod_t L_t)^(1/K) over the K tasks of the step (Chennupati, Sistu, Yogamani &
    Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning", CVPR Workshops 2019; as LibMTL's GLS).

    Computed as exp(mean_t log max(L_t, 1e-8)), which neither under- nor overflows with many tasks; a
    loss below 1e-8 counts as 1e-8 and sends no gradient. On a group of tasks (`grouped`) the mean is
    over the group; with one task it is that task's loss.
    Guarantees: the gradient is sum_t (G / (K L_t)) grad L_t with G the geometric mean, i.e. each task
    weighted by the inverse of its loss; multiplying a task's loss by a constant only rescales the step.
    """

    name = "gls"

    def __init__(self, tasks: Sequence[str]) -> None:
        self.group_size = len(tasks)

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        floored = torch.stack([losses[t] for t in names]).clamp_min(TINY)
        ctx.step(names, floored.log().mean().exp())
