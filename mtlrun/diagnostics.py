"""Opt-in training diagnostics: how far the shared parameters travel, and how the tasks' gradients conflict."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from mtlrun.data.loading import Batch
from mtlrun.models.base import MultiTaskModel
from mtlrun.run import distributed
from mtlrun.strategies import StepContext, Strategy


def _shared_vector(model: MultiTaskModel) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.shared_parameters()])


class Diagnostics:
    """Every `every` iterations, one row of diagnostics.csv.

    - `distance_from_init`: ||theta - theta_0|| of the shared parameters (how far a strategy explores);
    - `displacement`: ||theta_after - theta_before|| over that iteration, and per optimizer step;
    - `grad_norm/<task>` and `cosine/<a>/<b>`: each task's gradient of the shared parameters and their
      pairwise cosine similarities (negative = conflict), on a fixed probe batch so that measuring
      never changes the training batches; batch-norm statistics are restored afterwards;
    - `affinity/<s>/<t>`: the lookahead inter-task affinity of Fifty et al. ("Efficiently Identifying Task
      Groupings for Multi-Task Learning", NeurIPS 2021): 1 - L_t(theta - lr g_s) / L_t(theta) on the probe
      batch, a plain gradient step on task s's loss alone (the current learning rate) and its relative
      effect on task t's loss (> 0: a step on s helps t); the parameters are restored afterwards;
    - `running_affinity/<s>/<t>`: the inter-task affinity a strategy keeps itself, if it keeps one
      (`grouped` with `grouping=affinity`: its running average of the training steps' own effects);
    - `weight/<task>`: the task weights a weighting strategy uses now, if it has any.
    Measurement passes are not counted in the run's forward/backward counts.
    """

    def __init__(self, ctx: StepContext, probe: Batch, every: int) -> None:
        self.probe, self.every = probe, every
        self.initial = _shared_vector(ctx.model).clone()
        self.rows: list[dict] = []
        self._before: Tensor | None = None
        self._steps_before = 0

    def before_iteration(self, ctx: StepContext) -> None:
        if (ctx.counts.iterations + 1) % self.every == 0:
            self._before = _shared_vector(ctx.model).clone()
            self._steps_before = ctx.counts.optimizer_steps

    def after_iteration(self, ctx: StepContext, strategy: Strategy, epoch: int) -> None:
        if self._before is None:
            return
        theta = _shared_vector(ctx.model)
        displacement = (theta - self._before).norm().item()
        steps = max(ctx.counts.optimizer_steps - self._steps_before, 1)
        row: dict = {
            "epoch": epoch + 1, "iteration": ctx.counts.iterations,
            "distance_from_init": (theta - self.initial).norm().item(),
            "displacement": displacement, "displacement_per_step": displacement / steps,
        }
        with distributed.local():  # the same probe on every torchrun rank: nothing to reduce
            row.update(self._gradient_stats(ctx))
        weights = strategy.task_weights()
        if weights:
            row.update({f"weight/{t}": float(w) for t, w in weights.items()})
        affinity = strategy.task_affinity()
        if affinity:
            row.update({f"running_affinity/{pair}": value for pair, value in affinity.items()})
        self.rows.append(row)
        self._before = None

    def _gradient_stats(self, ctx: StepContext) -> dict[str, float]:
        model = ctx.model
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        shared = model.shared_parameters()
        outputs = model(self.probe["image"], ctx.task_names)
        grads, losses = {}, {}
        for i, task in enumerate(ctx.task_names):
            loss = ctx.tasks[task].loss(outputs[task], self.probe[task])
            losses[task] = loss.detach()
            # Not through StepContext.grad: a measurement is no part of the run's work (uncounted), runs in full
            # precision outside autocast (nothing to scale) and on the same probe on every rank (nothing to average).
            g = torch.autograd.grad(loss, shared, retain_graph=i < len(ctx.task_names) - 1, allow_unused=True)
            grads[task] = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, shared)])
        stats = self._lookahead_affinity(ctx, grads, losses)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        stats.update({f"grad_norm/{t}": g.norm().item() for t, g in grads.items()})
        for a, b in itertools.combinations(ctx.task_names, 2):
            stats[f"cosine/{a}/{b}"] = torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0).item()
        return stats

    @torch.no_grad()
    def _lookahead_affinity(self, ctx: StepContext, grads: dict[str, Tensor], losses: dict[str, Tensor]) -> dict:
        shared = ctx.model.shared_parameters()
        saved = [p.detach().clone() for p in shared]
        sizes = [p.numel() for p in shared]
        stats = {}
        for source, grad in grads.items():
            for p, g in zip(shared, grad.split(sizes)):
                p.sub_(ctx.optimizer.lr * g.view_as(p))
            outputs = ctx.model(self.probe["image"], ctx.task_names)
            for target in ctx.task_names:
                after = ctx.tasks[target].loss(outputs[target], self.probe[target])
                stats[f"affinity/{source}/{target}"] = (1 - after / losses[target]).item()
            for p, value in zip(shared, saved):
                p.copy_(value)
        return stats

    def state_dict(self) -> dict:
        return {"initial": self.initial, "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.initial, self.rows = state["initial"].to(self.initial.device), state["rows"]
