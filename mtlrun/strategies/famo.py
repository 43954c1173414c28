"""FAMO: task weights learned from how much each step decreased each task's log-loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext
from mtlrun.strategies.task_scalars import TaskScalars

EPS = 1e-8  # added to every loss before its log, as the reference code (no NaN for a zero loss)


class FAMO(LossCombiner):
    """Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023), as its reference
    code (Cranial-XIX/FAMO, famo.py and the trainers):

    - weights z = softmax(xi) of per-task logits xi (starting at 0);
    - one step on sum_t z_t log(L_t + eps) / c with c = sum_t z_t / (L_t + eps) held constant, i.e. the
      gradient sum_t (z_t / (c (L_t + eps))) grad L_t, whose weights sum to 1;
    - after the step, one more forward pass (no gradient, counted in ctx.counts.forward_passes) gives
      the losses L'_t on the same batch, delta_t = log(L_t + eps) - log(L'_t + eps), and the logits
      take one Adam step (`lr`, L2 weight decay `gamma`) along J_softmax(xi)^T delta = z * (delta - z.delta).
    Not taken from the reference: clipping the shared gradient to norm 1 (its trainers' max_norm), which
    would set FAMO apart from every other strategy here (LibMTL's port does not clip either); and
    min_losses, which the reference leaves at 0.

    The logits live on the model's device. On a group of tasks (`grouped`) the softmax is over the group.
    The re-evaluation uses the batch of the forward pass that produced the losses (`ctx.batch`), so it
    works alone and inside `grouped`, with the same or fresh batches.
    Guarantees: the step's loss weights are positive and sum to 1; a task whose log-loss fell less than
    the weighted average in a step gains logit.
    """

    name = "famo"

    def __init__(self, tasks: Sequence[str], lr: float = 0.025, gamma: float = 0.01) -> None:
        if not lr > 0:
            raise MtlrunError(f"strategy.lr must be > 0, got {lr!r}")
        if not gamma >= 0:
            raise MtlrunError(f"strategy.gamma must be >= 0, got {gamma!r}")
        self.logits = TaskScalars(tasks, 0.0, lr, weight_decay=gamma)
        self.group_size = len(tasks)

    def task_weights(self) -> dict[str, float]:
        names = list(self.logits.values)
        return dict(zip(names, torch.softmax(self.logits.get(names), dim=0).tolist()))

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        batch = ctx.batch
        names = list(losses)
        self.logits.to(next(ctx.model.parameters()).device)
        z = torch.softmax(self.logits.get(names), dim=0)
        shifted = torch.stack([losses[t] for t in names]) + EPS
        c = (z / shifted.detach()).sum()
        ctx.step(names, (z * shifted.log()).sum() / c)
        with torch.no_grad():
            after = ctx.losses(batch, names)
        delta = shifted.detach().log() - (torch.stack([after[t] for t in names]) + EPS).log()
        self.logits.adam_step(names, z * (delta - (z * delta).sum()))

    def state_dict(self) -> dict:
        return {"logits": self.logits.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.logits.load_state_dict(state["logits"])
