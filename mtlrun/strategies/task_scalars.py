"""TaskScalars: one learnable number per task with its own Adam (uncertainty's, GradNorm's and FAMO's)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
