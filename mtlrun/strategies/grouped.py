"""Task grouping: a random partition into groups of k tasks (drawn once, per epoch or per iteration) or groups
clustered from measured task affinity; one step per group."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.affinity import TaskAffinity, losses_as_floats
from mtlrun.strategies.base import (
    LossCombiner,
    SeededStrategy,
    StepContext,
    check_reduction,
    mean_step,
    step_on_groups,
)

REGROUP = ("once", "epoch", "iteration")
GROUPING = ("random", "affinity")


def random_partition(tasks: Sequence[str], group_size: int, generator: torch.Generator) -> list[list[str]]:
    """Shuffle the tasks and cut them into consecutive groups of `group_size` (the last may be smaller)."""
    shuffled = [tasks[i] for i in torch.randperm(len(tasks), generator=generator)]
    return [shuffled[i : i + group_size] for i in range(0, len(shuffled), group_size)]


class Grouped(SeededStrategy):
    """ceil(T/k) steps per iteration, one per group of a random partition of the tasks.

    The partition is drawn from the run's seed at the first iteration and redrawn every iteration
    (`regroup=iteration`, the default), at the first iteration of every epoch (`epoch`), or never
    (`once`: Pascal et al.'s random grouping, kept for the whole run, its groups stepped in the order
    drawn). Every partition drawn is a row of `strategy_log.csv` (epoch, iteration, groups).
    Each group's step is made by `combiner` from the group's losses: by default one step on their
    mean (`reduction=sum`: their sum, as the authors), or any loss-weighting / gradient method
    (`strategy.combine=<method>`, which then sets the step's scale itself) applied inside the group.
    With `regroup=once` and `optimizer.moments=per_task` the tasks of a group always step together, so
    they hold one optimizer state: one Adam per group, as the authors' MTL-IO with groups.
    `grouping=affinity` chooses the groups from measured inter-task affinity instead ("Selective Task
    Group Updates for Multi-Task Optimization", Jeong & Yoon, ICLR 2025): every iteration one forward
    pass of all tasks precedes the first group's step and one follows each step, on the iteration's
    batch, so a step on group G is credited with its own effect on every task t,
    A[s, t] <- (1 - decay) A[s, t] + decay (1 - L_t(after) / L_t(before)) / |G| for s in G (the paper's
    measure of a group's own step; the equal split by |G| is the reference code's; `TaskAffinity`).
    For the first `warmup` iterations every task steps alone; after that the groups are re-clustered
    every iteration by affinity propagation (`preference`: null = the median similarity) and stepped in
    a shuffled order, each iteration's groups a row of `strategy_log.csv`; `group_size` does not apply
    (the results report none) and `regroup` must stay `iteration`. Cost: G + 1 forward passes (each
    computing every task's head) and G backward passes for G groups, and a host synchronisation per
    group (the losses are read to update A). Defaults are the reference code's (wooseong97/sel-update-mtl:
    decay 0.001, warm-up 100 iterations, preference null); it sums a group's losses (`reduction=sum`).
    Where that code differs: at a group's step it compares the losses of the previous group's forward
    pass with those of its own, i.e. the change made by the previous group's step, and credits that to
    the current group (the first group of an iteration gets nothing, the last group's step is never
    measured, and a single group is stepped twice per iteration to measure anything); it treats tasks of
    one group specially (a negative self-affinity is skipped, opposite signs of s and t replaced by
    minus the larger); and when affinity propagation does not converge it uses the unconverged
    exemplars if there are any (scikit-learn's behaviour), else retries with a longer convergence
    window. None of these is done here: without convergence the last groups are kept.
    Guarantees: every task is in exactly one group per iteration; with the mean, group_size=1 gives
    exactly `alternating` (order=random) and group_size >= T exactly `averaged`, for the same seed
    (regroup=iteration); a partition changes only where `regroup` says.
    """

    name = "grouped"

    def __init__(
        self, tasks: Sequence[str], seed: int, group_size: int, batch: str = "same",
        combiner: LossCombiner | None = None, regroup: str = "iteration", reduction: str = "mean",
        grouping: str = "random", decay: float = 0.001, warmup: int = 100, preference: float | None = None,
    ) -> None:
        super().__init__(seed)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise MtlrunError(
                f"strategy.group_size must be an integer >= 1 (1 = alternating, >= {len(tasks)} = averaged), "
                f"got {group_size!r}"
            )
        if batch not in ("same", "fresh"):
            raise MtlrunError(f"strategy.batch={batch!r} is invalid; valid: same, fresh")
        if regroup not in REGROUP:
            raise MtlrunError(f"strategy.regroup={regroup!r} is invalid; valid: {', '.join(REGROUP)}")
        check_reduction(reduction)
        if grouping not in GROUPING:
            raise MtlrunError(f"strategy.grouping={grouping!r} is invalid; valid: {', '.join(GROUPING)}")
        if grouping == "affinity":
            if batch != "same":
                raise MtlrunError(
                    "strategy.grouping=affinity measures every step on the iteration's batch: "
                    "use strategy.batch=same"
                )
            if not 0 < decay <= 1:
                raise MtlrunError(f"strategy.decay must lie in (0, 1], got {decay!r}")
            if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
                raise MtlrunError(
                    f"strategy.warmup must be an integer >= 1 (iterations of single-task steps that measure "
                    f"the affinity before the first clustering), got {warmup!r}"
                )
            if regroup != "iteration":
                raise MtlrunError(
                    f"strategy.regroup={regroup} does not apply to strategy.grouping=affinity, which "
                    f"re-clusters every iteration: leave strategy.regroup=iteration"
                )
            if preference is not None and not isinstance(preference, (int, float)):
                raise MtlrunError(
                    f"strategy.preference must be a number or null (the median), got {preference!r}"
                )
        if combiner is not None and reduction != "mean":
            raise MtlrunError(
                f"strategy.reduction={reduction} applies to the plain group loss; with strategy.combine="
                f"{combiner.name} the method sets the step's scale: leave strategy.reduction=mean"
            )
        self.tasks, self.fresh_batches = list(tasks), batch == "fresh"
        # Under affinity the groups' sizes follow the clustering: no one k describes the run.
        self.group_size = min(group_size, len(tasks)) if grouping == "random" else None
        self.combiner, self.regroup, self.reduction = combiner, regroup, reduction
        self.partition: list[list[str]] | None = None
        self.epochs_done = 0
        self.history: list[dict] = []  # one row per partition drawn
        self.warmup = warmup
        self.affinity = TaskAffinity(self.tasks, decay, preference) if grouping == "affinity" else None

    def _combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        if self.combiner is not None:
            self.combiner.combine(ctx, losses)
        else:
            mean_step(ctx, losses, self.reduction)

    def _record(self, ctx: StepContext) -> None:
        self.history.append({
            "epoch": self.epochs_done + 1, "iteration": ctx.counts.iterations + 1,
            "groups": " | ".join(",".join(group) for group in self.partition),
        })

    def _affinity_iteration(self, ctx: StepContext, affinity: TaskAffinity) -> dict[str, Tensor]:
        singletons = [[t] for t in self.tasks]
        if ctx.counts.iterations < self.warmup:
            groups = singletons
        else:  # affinity propagation may not converge: the last groups are kept, as the reference code
            groups = affinity.groups() or self.partition or singletons
        self.partition = [groups[i] for i in torch.randperm(len(groups), generator=self.generator)]
        self._record(ctx)
        batch = ctx.next_batch()
        losses = ctx.losses(batch, ctx.task_names)
        logged: dict[str, Tensor] = {}
        for i, group in enumerate(self.partition):
            ordered = [t for t in ctx.task_names if t in group]
            before = losses_as_floats(losses)
            self._combine(ctx, {t: losses[t] for t in ordered})
            logged.update({t: losses[t].detach() for t in ordered})
            with torch.no_grad() if i == len(self.partition) - 1 else nullcontext():
                losses = ctx.losses(batch, ctx.task_names)  # after this step: the next step's forward too
            affinity.update(ordered, before, losses_as_floats(losses))
        return logged

    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        if self.affinity is not None:
            return self._affinity_iteration(ctx, self.affinity)
        if self.partition is None or self.regroup == "iteration":
            self.partition = random_partition(self.tasks, self.group_size, self.generator)
            self._record(ctx)
        return step_on_groups(ctx, self.partition, self.fresh_batches, self._combine)

    def epoch_end(self) -> None:
        self.epochs_done += 1
        if self.regroup == "epoch":
            self.partition = None
        if self.combiner is not None:
            self.combiner.epoch_end()

    def records(self) -> list[dict]:
        return self.history

    def task_affinity(self) -> dict[str, float] | None:
        return self.affinity.as_dict() if self.affinity is not None else None

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({"partition": self.partition, "epochs_done": self.epochs_done, "history": self.history})
        if self.affinity is not None:
            state["affinity"] = self.affinity.state_dict()
        if self.combiner is not None:
            state["combiner"] = self.combiner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.partition, self.epochs_done = state.get("partition"), state.get("epochs_done", 0)
        self.history = list(state.get("history", []))
        if self.affinity is not None:
            self.affinity.load_state_dict(state["affinity"])
        if self.combiner is not None:
            self.combiner.load_state_dict(state["combiner"])
