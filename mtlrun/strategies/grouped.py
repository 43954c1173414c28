"""Random task grouping: a fresh random partition into groups of k tasks each iteration, one step per group."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, SeededStrategy, StepContext, mean_step, step_on_groups


def random_partition(tasks: Sequence[str], group_size: int, generator: torch.Generator) -> list[list[str]]:
    """Shuffle the tasks and cut them into consecutive groups of `group_size` (the last may be smaller)."""
    shuffled = [tasks[i] for i in torch.randperm(len(tasks), generator=generator)]
    return [shuffled[i : i + group_size] for i in range(0, len(shuffled), group_size)]


class Grouped(SeededStrategy):
    """ceil(T/k) steps per iteration, one per group of a fresh random partition of the tasks.

    Each group's step is made by `combiner` from the group's losses: by default one step on their
    mean, or any loss-weighting / gradient method (`strategy.combine=<method>`) applied inside the group.
    Guarantees: every task is in exactly one group per iteration; with the mean, group_size=1 gives
    exactly `alternating` (order=random) and group_size >= T exactly `averaged`, for the same seed.
    """

    name = "grouped"

    def __init__(
        self, tasks: Sequence[str], seed: int, group_size: int, batch: str = "same",
        combiner: LossCombiner | None = None,
    ) -> None:
        super().__init__(seed)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise MtlrunError(
                f"strategy.group_size must be an integer >= 1 (1 = alternating, >= {len(tasks)} = averaged), "
                f"got {group_size!r}"
            )
        if batch not in ("same", "fresh"):
            raise MtlrunError(f"strategy.batch={batch!r} is invalid; valid: same, fresh")
        self.tasks, self.group_size, self.fresh_batches = list(tasks), min(group_size, len(tasks)), batch == "fresh"
        self.combiner = combiner

    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        groups = random_partition(self.tasks, self.group_size, self.generator)
        combine = self.combiner.combine if self.combiner is not None else mean_step
        return step_on_groups(ctx, groups, self.fresh_batches, combine)

    def epoch_end(self) -> None:
        if self.combiner is not None:
            self.combiner.epoch_end()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.combiner is not None:
            state["combiner"] = self.combiner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.combiner is not None:
            self.combiner.load_state_dict(state["combiner"])
