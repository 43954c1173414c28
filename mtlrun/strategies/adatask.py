"""AdaTask: one forward pass, each task's gradient through its own Adam moments, the directions summed."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext


class AdaTask(LossCombiner):
    """AdaTask (Yang, Pan, Wang, Yu, Shen, Chen, Xiao, Jiang & Guo, "AdaTask: A Task-Aware Adaptive
    Learning Rate Approach to Multi-Task Learning", AAAI 2023, arXiv 2211.15055, Algorithm 1): from one
    forward pass, each task's gradient g_t of the shared parameters (one backward pass per task) updates
    that task's own Adam moments m_t, v_t, and the shared parameters move by
    -lr * sum_t m_hat_t / (sqrt(v_hat_t) + eps); each head steps along its own task's gradient with its
    own state, as in every strategy.
    It is the per-task-moment idea of `alternating` with `optimizer.moments=per_task` at the cost of one
    forward and T backward passes per iteration, and one optimizer step.
    Needs `optimizer=adam` or `adamw` and `optimizer.moments=per_task` (its moments are per task by
    definition); other settings are refused in one line. Inside `grouped` (`strategy.combine=adatask`)
    each group's step sums its tasks' directions; every task keeps its own moments throughout.
    Guarantees: exactly T independent Adam states for the shared parameters, each fed only its own
    task's gradients (bias corrections by each state's own step count), and the shared update their sum.
    """

    name = "adatask"

    def __init__(self, tasks: Sequence[str]) -> None:
        self.group_size = len(tasks)

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        settings = ctx.optimizer.settings
        if settings.name not in ("adam", "adamw") or settings.moments != "per_task":
            raise MtlrunError(
                f"strategy=adatask keeps Adam moments per task: use optimizer=adam (or adamw) with "
                f"optimizer.moments=per_task, not optimizer={settings.name} with moments={settings.moments}"
            )
        jacobian, head_grads = ctx.jacobian(losses)
        ctx.apply_each(dict(zip(losses, jacobian)), head_grads)
