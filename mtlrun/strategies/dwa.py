"""Dynamic Weight Average: task weights from how fast each task's epoch-mean loss fell in the last 2 epochs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext

TINY = 1e-8  # floor of a previous epoch's mean loss in the ratio, so a zero loss gives no 0/0


class DWA(LossCombiner):
    """One step on sum_t w_t L_t with w = K softmax(r / temperature) over the K tasks of the step, where
    r_t = (mean training loss of t in the last epoch) / (that in the epoch before)
    (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019; as lorenmt/mtan).

    Every task's weight is 1 until it has two finished epochs of history. Each step's (pre-step) batch
    losses are averaged per task over the epoch, and `epoch_end` closes the epoch. On a group of tasks
    (`grouped`) the weights are the softmax over the group, summing to its size; a task's mean is over
    the steps it took part in.
    Guarantees: the weights are positive and sum to K; a task whose loss fell more slowly gets more weight.
    """

    name = "dwa"

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        if not temperature > 0:
            raise MtlrunError(f"strategy.temperature must be > 0, got {temperature!r}")
        self.tasks, self.temperature, self.group_size = list(tasks), temperature, len(tasks)
        self.history: dict[str, list[float]] = {t: [] for t in tasks}  # each finished epoch's mean loss
        self._sums: dict[str, Tensor | float] = {t: 0.0 for t in tasks}
        self._counts = {t: 0 for t in tasks}

    def weights(self, tasks: Sequence[str]) -> dict[str, float]:
        if any(len(self.history[t]) < 2 for t in tasks):
            return {t: 1.0 for t in tasks}
        ratios = torch.tensor(
            [self.history[t][-1] / max(self.history[t][-2], TINY) for t in tasks], dtype=torch.float64
        )
        weights = len(tasks) * torch.softmax(ratios / self.temperature, dim=0)
        return dict(zip(tasks, weights.tolist()))

    def task_weights(self) -> dict[str, float]:
        return self.weights(self.tasks)

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        weights = self.weights(names)
        ctx.step(names, sum(weights[t] * losses[t] for t in names))
        for t in names:  # recorded once the step is taken (an fp16 step skipped for overflow is not)
            self._sums[t] = self._sums[t] + losses[t].detach()
            self._counts[t] += 1

    def epoch_end(self) -> None:
        for t in self.tasks:
            if self._counts[t]:
                self.history[t].append(float(self._sums[t] / self._counts[t]))
            self._sums[t], self._counts[t] = 0.0, 0

    def state_dict(self) -> dict:
        return {"history": {t: list(h) for t, h in self.history.items()}, "sums": dict(self._sums),
                "counts": dict(self._counts)}

    def load_state_dict(self, state: dict) -> None:
        self.history = {t: list(h) for t, h in state["history"].items()}
        self._sums, self._counts = dict(state["sums"]), dict(state["counts"])
