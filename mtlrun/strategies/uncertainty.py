"""Uncertainty weighting: each task's loss scaled by a learned precision exp(-s_t), plus log-variance s_t."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext
from mtlrun.strategies.task_scalars import TaskScalars


class Uncertainty(LossCombiner):
    """One step on sum_t exp(-s_t) L_t + s_t, with a learned log-variance s_t = log sigma_t^2 per task
    (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses", CVPR 2018).

    Form: the one the authors' own example uses for every task (yaringal/multi-task-learning-example:
    `exp(-log_var) * loss + log_var`, log_var starting at 0). The paper's Gaussian likelihood has a
    factor 1/2 on both terms (LibMTL's and Nash-MTL's `0.5 * (exp(-s) L + s)`): the same objective times
    1/2, so the same optimum s_t = log L_t and the same relative weights; dropping it keeps the
    model's gradient at sum_t exp(-s_t) grad L_t, the plain sum of the losses when s = 0. The paper's
    classification variant (1/sigma^2 L + log sigma) is not used: the combiner does not know task kinds.

    The s_t are the strategy's own parameters, on the model's device, moved by their own Adam (`lr`):
    their gradient 1 - exp(-s_t) L_t comes from the same loss by a second autograd.grad restricted to
    them (it never enters the model), and ctx.step takes the model's one step.
    Guarantees: for fixed losses each s_t moves towards log L_t, i.e. the weight exp(-s_t) towards 1/L_t.
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str], lr: float = 1e-3, initial_log_variance: float = 0.0) -> None:
        if not lr > 0:
            raise MtlrunError(f"strategy.lr must be > 0, got {lr!r}")
        self.log_variances = TaskScalars(tasks, initial_log_variance, lr)
        self.group_size = len(tasks)

    def task_weights(self) -> dict[str, float]:
        return {t: math.exp(-s) for t, s in self.log_variances.as_dict().items()}

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        self.log_variances.to(next(ctx.model.parameters()).device)
        s = self.log_variances.get(names).requires_grad_()
        total = (torch.exp(-s) * torch.stack([losses[t] for t in names]) + s).sum()
        # Not through the step context: this backward pass reaches only s (exp(-s) L + s, L a value here), never
        # the network, so it is no pass to count; it needs no loss scaling (float32 numbers from full-precision
        # losses) and no averaging (the losses are the global batch's on every process, so s_grad is too).
        (s_grad,) = torch.autograd.grad(total, s, retain_graph=True)
        ctx.step(names, total)
        self.log_variances.adam_step(names, s_grad)

    def state_dict(self) -> dict:
        return {"log_variances": self.log_variances.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.log_variances.load_state_dict(state["log_variances"])
