"""Uncertainty weighting: each task's loss scaled by a learned precision exp(-s_t), plus log-variance s_t."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext


class TaskScalars:
    """One learnable number per task, each moved by its own Adam (torch.optim.Adam's update, L2 weight decay).

    Kept per task name, as 0-d tensors: a step moves only the tasks it is given, and each task counts its
    own steps for Adam's bias correction, so a method applied to groups of tasks keeps every task's
    state apart. Reading and updating never copy from the host, so a step adds no device sync.
    Shared by the learned weightings (uncertainty, gradnorm, famo); `to` moves them to the model's device.
    """

    def __init__(
        self, tasks: Sequence[str], initial: float, lr: float, weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    ) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.values = {t: torch.tensor(float(initial)) for t in tasks}
        self.exp_avg = {t: torch.tensor(0.0) for t in tasks}
        self.exp_avg_sq = {t: torch.tensor(0.0) for t in tasks}
        self.steps = {t: torch.tensor(0.0) for t in tasks}

    def _slots(self) -> tuple[dict[str, Tensor], ...]:
        return self.values, self.exp_avg, self.exp_avg_sq, self.steps

    def to(self, device: torch.device) -> None:
        for slot in self._slots():
            for t, x in slot.items():
                slot[t] = x.to(device)

    def get(self, tasks: Sequence[str]) -> Tensor:
        """The values of `tasks`, in their order (a new vector)."""
        return torch.stack([self.values[t] for t in tasks])

    def set(self, tasks: Sequence[str], values: Tensor) -> None:
        self.values.update(zip(tasks, values.detach().unbind()))

    @torch.no_grad()
    def adam_step(self, tasks: Sequence[str], grad: Tensor) -> None:
        """One Adam step on the values of `tasks` along `grad` (one entry per task, in their order)."""
        beta1, beta2 = self.betas
        value, exp_avg, exp_avg_sq, step = (torch.stack([slot[t] for t in tasks]) for slot in self._slots())
        if self.weight_decay:
            grad = grad + self.weight_decay * value
        step = step + 1
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        denom = exp_avg_sq.sqrt() / (1 - beta2**step).sqrt() + self.eps
        value = value - self.lr / (1 - beta1**step) * exp_avg / denom
        for slot, new in zip(self._slots(), (value, exp_avg, exp_avg_sq, step)):
            slot.update(zip(tasks, new.unbind()))

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.values, self.get(list(self.values)).tolist()))

    def state_dict(self) -> dict:
        names = ("values", "exp_avg", "exp_avg_sq", "steps")
        return {name: {t: x.clone() for t, x in slot.items()} for name, slot in zip(names, self._slots())}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.exp_avg, self.exp_avg_sq, self.steps = (
            {t: x.clone() for t, x in state[name].items()}
            for name in ("values", "exp_avg", "exp_avg_sq", "steps")
        )


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
        (s_grad,) = torch.autograd.grad(total, s, retain_graph=True)
        ctx.step(names, total)
        self.log_variances.adam_step(names, s_grad)

    def state_dict(self) -> dict:
        return {"log_variances": self.log_variances.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.log_variances.load_state_dict(state["log_variances"])
