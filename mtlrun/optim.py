"""Adam, AdamW and SGD for multi-task steps, with the shared parameters' state kept per task or shared.

With `moments=per_task` every task owns a full optimizer state (Adam moments, step count for bias
correction, SGD momentum) for the shared parameters. A step taken on a group of tasks feeds that
step's gradient to the state of each task in the group and moves the shared parameters along the
mean of those tasks' update directions; for a group of one task this is exactly that task's own
optimizer. With `moments=shared` there is one state, i.e. the plain optimizer. Task-specific
parameters (a task's head) only ever get a state of their own and are moved only by their task
(unless `idle_params=step`, below).

Tasks whose states have seen exactly the same steps hold one state object between them (copied on the
first step that sets them apart), so steps on all tasks at once (averaged and every baseline method)
keep a single state and cost one update, not T identical ones: the same numbers, T times less memory.

Two settings reproduce code written for PyTorch 1.2 (the seed paper's, lucaspascal/AITSO_MTL).
`eps_placement=kingma` adds Adam's eps to the raw sqrt(v), before bias correction:
p -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps), Kingma & Ba's "efficient version" and
torch.optim.Adam's arithmetic up to 1.2; `modern` (today's torch) adds it to sqrt(v / (1 - b2^t)).
`idle_params=step` makes a step with shared moments also step every head whose task is not in the
step and that has a state (its task has stepped before), on a zero gradient: what torch's optimizers do
after `zero_grad()` leaves zero tensors (1.2's only behaviour, `set_to_none=False` today). A parameter
whose gradient was never computed has none and is skipped, as there. The idle head moves on its decayed
moments (Adam, AdamW), its momentum buffer (SGD) and weight decay, and its step count t advances.
With per-task moments a task's state covers the shared parameters and its own head only, so no head is
idle: the authors' one Adam per task over all parameters moves another task's head by exactly zero (its
moments of that head stay zero; weight decay would shrink it there, not here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrun.settings import OptimizerSettings, SchedulerSettings

__all__ = ["MultiTaskOptimizer", "OptimizerSettings", "lr_factor"]

class ParameterBlock:
    """Parameters updated together; their optimizer state is kept as flat vectors, one set per slot."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.slots: dict[str, dict] = {}

    def flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def apply(self, update: Tensor) -> None:
        chunks = [u.view_as(p) for u, p in zip(update.split(self.sizes), self.params)]
        torch._foreach_add_([p.data for p in self.params], chunks)


def flatten(grads: Sequence[Tensor | None], params: Sequence[nn.Parameter]) -> Tensor:
    """One flat gradient vector; a parameter the loss does not reach gets zeros."""
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


class MultiTaskOptimizer:
    """Steps on groups of tasks; see the module docstring for how state is kept and combined."""

    def __init__(
        self, shared: Sequence[nn.Parameter], heads: dict[str, Sequence[nn.Parameter]],
        settings: OptimizerSettings,
    ) -> None:
        self.settings = settings
        self.lr = settings.lr
        self.shared = ParameterBlock(shared)
        self.heads = {task: ParameterBlock(params) for task, params in heads.items()}

    @torch.no_grad()
    def step(self, tasks: Sequence[str], shared_grad: Tensor, head_grads: dict[str, Tensor]) -> None:
        """One step on `tasks`: `shared_grad` for the shared parameters, one flat gradient per task head."""
        slots = list(tasks) if self.settings.moments == "per_task" else ["shared"]
        self._update(self.shared, shared_grad, slots)
        for task, grad in head_grads.items():
            self._update(self.heads[task], grad, [task])
        self._step_idle_heads(head_grads)

    @torch.no_grad()
    def step_each(self, shared_grads: dict[str, Tensor], head_grads: dict[str, Tensor]) -> None:
        """One step in which each task's own gradient of the shared parameters feeds that task's own state
        and the shared parameters move along the sum of the tasks' directions (AdaTask); heads as `step`.

        Weight decay: Adam's L2 term joins every task's gradient; AdamW's decoupled decay shrinks the
        shared parameters once per step, as for any other step.
        """
        s, block = self.settings, self.shared
        if s.weight_decay and s.name == "adamw":
            torch._foreach_mul_([p.data for p in block.params], 1 - self.lr * s.weight_decay)
        update = torch.zeros_like(next(iter(shared_grads.values())))
        l2 = s.weight_decay * block.flat_params() if s.weight_decay and s.name != "adamw" else None
        for task, grad in shared_grads.items():
            if l2 is not None:
                grad = grad + l2
            ((slot, _),) = _states_to_step(block.slots, [task])
            slot["step"] += 1
            self._adam_direction(slot, grad, update, -self.lr)
        block.apply(update)
        for task, grad in head_grads.items():
            self._update(self.heads[task], grad, [task])
        self._step_idle_heads(head_grads)

    def _step_idle_heads(self, stepped: dict[str, Tensor]) -> None:
        """`idle_params=step` with shared moments: every head given no gradient in this step that has a state
        steps on a zero gradient (see the module docstring)."""
        if self.settings.idle_params != "step" or self.settings.moments != "shared":
            return
        for task, block in self.heads.items():
            if task not in stepped and task in block.slots:
                self._update(block, torch.zeros(sum(block.sizes), dtype=block.params[0].dtype,
                                                device=block.params[0].device), [task])

    @torch.no_grad()
    def step_owned(self, params: Sequence[Tensor], grad: Tensor, state: dict) -> None:
        """One step of tensors a strategy owns (GradNorm's task weights) by this optimizer's rule and current
        learning rate, as if they were parameters of the model; their state is `state`, kept by the caller."""
        block = ParameterBlock(params)
        block.slots = state
        self._update(block, grad, ["owned"])

    def _update(self, block: ParameterBlock, grad: Tensor, slot_keys: list[str]) -> None:
        s, lr = self.settings, self.lr
        if s.weight_decay and s.name == "adamw":
            torch._foreach_mul_([p.data for p in block.params], 1 - lr * s.weight_decay)
        elif s.weight_decay:
            grad = grad + s.weight_decay * block.flat_params()
        update = torch.zeros_like(grad)
        for slot, holders in _states_to_step(block.slots, slot_keys):
            slot["step"] += 1
            # The step moves along the mean of the keys' directions; keys sharing a state share a direction.
            scale = -lr * holders / len(slot_keys)
            if s.name in ("adam", "adamw"):
                self._adam_direction(slot, grad, update, scale)
            else:
                self._sgd_direction(slot, grad, update, scale)
        block.apply(update)

    def _adam_direction(self, slot: dict, grad: Tensor, update: Tensor, scale: float) -> None:
        beta1, beta2 = self.settings.betas
        if "exp_avg" not in slot:
            slot["exp_avg"], slot["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        exp_avg, exp_avg_sq, step = slot["exp_avg"], slot["exp_avg_sq"], slot["step"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        if self.settings.eps_placement == "kingma":
            denom = exp_avg_sq.sqrt().add_(self.settings.eps)
            update.addcdiv_(exp_avg, denom, value=scale * math.sqrt(bias_correction2) / bias_correction1)
            return
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(self.settings.eps)
        update.addcdiv_(exp_avg, denom, value=scale / bias_correction1)

    def _sgd_direction(self, slot: dict, grad: Tensor, update: Tensor, scale: float) -> None:
        momentum = self.settings.momentum
        direction = grad
        if momentum:
            if "momentum_buffer" not in slot:
                slot["momentum_buffer"] = grad.clone()
            else:
                slot["momentum_buffer"].mul_(momentum).add_(grad)
            buffer = slot["momentum_buffer"]
            direction = grad.add(buffer, alpha=momentum) if self.settings.nesterov else buffer
        update.add_(direction, alpha=scale)

    def state_dict(self) -> dict:
        # One torch.save keeps states shared between tasks shared: pickling stores each object once.
        return {
            "lr": self.lr, "shared": self.shared.slots, "heads": {t: b.slots for t, b in self.heads.items()}
        }

    def load_state_dict(self, state: dict) -> None:
        self.lr = state["lr"]
        self.shared.slots = state["shared"]
        for task, slots in state["heads"].items():
            self.heads[task].slots = slots


def _states_to_step(slots: dict[str, dict], keys: list[str]) -> list[tuple[dict, int]]:
    """The distinct states a step on `keys` updates, each with how many of the keys hold it.

    Keys without a state yet get one new state between them (all start equal). A state also held by a
    key outside the step is copied for the step's keys first, so the others keep theirs unchanged.
    """
    fresh = [k for k in keys if k not in slots]
    if fresh:
        new: dict = {"step": 0}
        slots.update({k: new for k in fresh})
    by_state: dict[int, list[str]] = {}
    for key in keys:
        by_state.setdefault(id(slots[key]), []).append(key)
    stepped = []
    for holders in by_state.values():
        state = slots[holders[0]]
        if any(slots[k] is state for k in slots if k not in keys):
            state = {name: v.clone() if isinstance(v, Tensor) else v for name, v in state.items()}
            slots.update({k: state for k in holders})
        stepped.append((state, len(holders)))
    return stepped


def lr_factor(s: SchedulerSettings, epoch: int, epochs: int) -> float:
    """The learning-rate multiplier for `epoch` (0-based) under the `scheduler` settings."""
    if s.name == "step":
        return s.gamma ** (epoch // s.step_size)
    if s.name == "cosine":
        progress = epoch / max(epochs, 1)
        return s.min_factor + (1 - s.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0
