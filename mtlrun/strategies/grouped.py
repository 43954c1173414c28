"""Random task grouping: a random partition into groups of k tasks (drawn once, per epoch or per iteration), one step per group."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import (
    LossCombiner, SeededStrategy, StepContext, check_reduction, mean_step, step_on_groups,
)

REGROUP = ("once", "epoch", "iteration")


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
    Guarantees: every task is in exactly one group per iteration; with the mean, group_size=1 gives
    exactly `alternating` (order=random) and group_size >= T exactly `averaged`, for the same seed
    (regroup=iteration); a partition changes only where `regroup` says.
    """

    name = "grouped"

    def __init__(
        self, tasks: Sequence[str], seed: int, group_size: int, batch: str = "same",
        combiner: LossCombiner | None = None, regroup: str = "iteration", reduction: str = "mean",
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
        if combiner is not None and reduction != "mean":
            raise MtlrunError(
                f"strategy.reduction={reduction} applies to the plain group loss; with strategy.combine="
                f"{combiner.name} the method sets the step's scale: leave strategy.reduction=mean"
            )
        self.tasks, self.group_size, self.fresh_batches = list(tasks), min(group_size, len(tasks)), batch == "fresh"
        self.combiner, self.regroup, self.reduction = combiner, regroup, reduction
        self.partition: list[list[str]] | None = None
        self.epochs_done = 0
        self.history: list[dict] = []  # one row per partition drawn

    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        if self.partition is None or self.regroup == "iteration":
            self.partition = random_partition(self.tasks, self.group_size, self.generator)
            self.history.append({
                "epoch": self.epochs_done + 1, "iteration": ctx.counts.iterations + 1,
                "groups": " | ".join(",".join(group) for group in self.partition),
            })
        if self.combiner is not None:
            return step_on_groups(ctx, self.partition, self.fresh_batches, self.combiner.combine)
        return step_on_groups(
            ctx, self.partition, self.fresh_batches, lambda c, losses: mean_step(c, losses, self.reduction)
        )

    def epoch_end(self) -> None:
        self.epochs_done += 1
        if self.regroup == "epoch":
            self.partition = None
        if self.combiner is not None:
            self.combiner.epoch_end()

    def records(self) -> list[dict]:
        return self.history

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({"partition": self.partition, "epochs_done": self.epochs_done, "history": self.history})
        if self.combiner is not None:
            state["combiner"] = self.combiner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.partition, self.epochs_done = state.get("partition"), state.get("epochs_done", 0)
        self.history = list(state.get("history", []))
        if self.combiner is not None:
            self.combiner.load_state_dict(state["combiner"])
