"""DB-MTL: log-transformed losses, and every task's (averaged) gradient scaled to the largest norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext

EPS = 1e-8  # added to every loss before its log and to every norm before dividing, as LibMTL


class DBMTL(LossCombiner):
    """Dual-balancing MTL (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for Multi-Task
    Learning", arXiv 2308.12029, 2023; as LibMTL's DB_MTL, maintained by the authors):

    - loss-scale balancing: task t's gradient is that of log(L_t + eps);
    - an exponential average of it per task, g_t <- grad_t + beta_k (g_t - grad_t) with
      beta_k = beta / k^beta_sigma at the task's k-th step, starting from 0 (no bias correction);
    - gradient-magnitude balancing: the shared parameters step along sum_t (max_j ||g_j|| / ||g_t||) g_t,
      i.e. every task's averaged gradient rescaled to the largest norm;
    - each head steps along its own task's grad log(L_t + eps), unaveraged and unscaled, as LibMTL.
    Uses ctx.jacobian (one backward pass per task) and ctx.apply. The averages live on the model's device;
    on a group of tasks (`grouped`) the scaling is within the group and each task counts its own steps.
    Guarantees: every task contributes a shared direction of the same norm; multiplying a task's loss by
    a constant changes nothing (up to the eps).
    """

    name = "db_mtl"

    def __init__(self, tasks: Sequence[str], beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        if not 0 <= beta < 1:
            raise MtlrunError(f"strategy.beta must lie in [0, 1), got {beta!r}")
        if not beta_sigma >= 0:
            raise MtlrunError(f"strategy.beta_sigma must be >= 0, got {beta_sigma!r}")
        self.beta, self.beta_sigma, self.group_size = beta, beta_sigma, len(tasks)
        self.steps = {t: 0 for t in tasks}
        self.averages: dict[str, Tensor] = {}  # each task's averaged shared gradient, from its first step
        self._scales: dict[str, Tensor] = {}

    def task_weights(self) -> dict[str, float] | None:
        return {t: s.item() for t, s in self._scales.items()} or None

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        jacobian, head_grads = ctx.jacobian({t: torch.log(losses[t] + EPS) for t in names})
        for t, grad in zip(names, jacobian):
            self.steps[t] += 1
            previous = self.averages.get(t, torch.zeros_like(grad))
            self.averages[t] = torch.lerp(grad, previous, self.beta / self.steps[t] ** self.beta_sigma)
        averaged = torch.stack([self.averages[t] for t in names])
        norms = averaged.norm(dim=1)
        scales = norms.max() / (norms + EPS)
        self._scales = dict(zip(names, scales))
        ctx.apply(names, (scales[:, None] * averaged).sum(dim=0), head_grads)

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "averages": {t: g.clone() for t, g in self.averages.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = dict(state["steps"])
        self.averages = {t: g.clone() for t, g in state["averages"].items()}
