"""Compute budgets: what a run has spent in each unit, and when its `trainer.budget` is spent."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

from omegaconf import DictConfig

from mtlrun.run import distributed
from mtlrun.settings import BUDGET_UNITS as UNITS, TrainerSettings
from mtlrun.strategies.context import Counts

KEYS = ("trainer.budget", "trainer.budget_unit")


@dataclass(frozen=True)
class Spending:
    """A run's cumulative costs; the names are the cost columns of metrics.csv and results.csv. `images`:
    training images drawn, summed over processes; `train_seconds`: training time, evaluation excluded."""

    backward_passes: int
    forward_passes: int
    optimizer_steps: int
    images: int
    train_seconds: float

    def in_unit(self, unit: str) -> float:
        return self.train_seconds if unit == "seconds" else getattr(self, unit)

    def columns(self) -> dict[str, float]:
        return asdict(self)


class Counted(Protocol):
    counts: Counts


class Drawn(Protocol):
    batch_size: int
    batches_per_pass: int
    pass_index: int
    position: int


class Timed(Protocol):
    iteration: int
    seconds: float


class Written(Protocol):
    train_log: list[dict]


def identity_ignores(trainer: DictConfig) -> tuple[str, ...]:
    """The budget keys a run's identity leaves out: both when there is no budget (so that runs configured
    before budgets existed keep their config id), none when there is one (it changes what is computed)."""
    return KEYS if trainer.get("budget") is None else ()


class Budget:
    """The run's ledger (read from state the run saves anyway: work counts, batch position, train_log and
    the current epoch's progress, so a resumed run spends exactly as an uninterrupted one) and its budget.

    The budget is checked at iteration boundaries (`check`): an iteration is indivisible, so the run stops at
    the first boundary where spent >= budget. Without a budget every method answers as `trainer.epochs`
    says."""

    def __init__(
        self, trainer: TrainerSettings, ctx: Counted, batches: Drawn, history: Written, progress: Timed,
    ) -> None:
        self.amount, self.unit = trainer.budget, trainer.budget_unit  # None: no budget
        self.ctx, self.batches, self.history, self.progress = ctx, batches, history, progress
        self.reached = False

    @property
    def active(self) -> bool:
        return self.amount is not None

    def spent(self) -> Spending:
        counts, b = self.ctx.counts, self.batches
        seconds = sum(row["seconds"] for row in self.history.train_log)
        if self.progress.iteration:  # an epoch under way: its seconds so far (its row is not written yet)
            seconds += self.progress.seconds
        images = (b.pass_index * b.batches_per_pass + b.position) * b.batch_size
        return Spending(
            counts.backward_passes, counts.forward_passes, counts.optimizer_steps, images, seconds,
        )

    def _spent_all(self) -> bool:
        return self.active and self.spent().in_unit(self.unit) >= self.amount

    def check(self) -> bool:
        """At an iteration boundary: whether the budget is spent now (and stays so). Counts are the same on
        every process; seconds are not, so under torchrun the processes agree (any one spent: all stop)."""
        if self.active and not self.reached:
            spent = self._spent_all()
            if self.unit == "seconds":
                spent = distributed.agreed_signal(1 if spent else None) is not None
            self.reached = spent
        return self.reached

    def epochs(self, start: int, horizon: int) -> Iterable[int]:
        """The epochs to train from `start`: up to the horizon, or with a budget as many as it takes (none
        when a resumed run's budget is spent already: killed after its last checkpoint, before results)."""
        if not self.active:
            return range(start, horizon)
        return () if self._spent_all() else itertools.count(start)

    def schedule_epoch(self, epoch: int, horizon: int) -> int:
        """The epoch an epoch-based schedule is given: with a budget, epochs past `trainer.epochs` (the
        schedule's horizon) hold the schedule where it ended."""
        return min(epoch, horizon) if self.active else epoch

    def run_ends(self, epochs_done: int, horizon: int, epoch_complete: bool) -> bool:
        """Whether training ends at this boundary (`epochs_done` counting the current epoch)."""
        if self.active:
            return self.reached
        return epoch_complete and epochs_done == horizon

    def finished(self, epochs_done: int, horizon: int) -> bool:
        """Whether a resumed run's saved state is at its end (nothing left to train)."""
        return self._spent_all() if self.active else epochs_done >= horizon

    def epoch_columns(self, iterations: int, per_epoch: int) -> dict[str, bool]:
        """train_log.csv's mark of a budgeted run's rows: `complete`, false for the epoch the budget ended."""
        return {"complete": iterations == per_epoch} if self.active else {}

    def describe(self, horizon: int) -> str:
        return (f"budget: {self.amount:g} {self.unit}, to the first iteration boundary at or past it "
                f"(trainer.epochs={horizon} is the horizon of epoch-based schedules, not a limit)")

    def result_columns(self) -> dict[str, object]:
        """results.csv's costs in every unit (it has iterations and optimizer_steps) and the budget."""
        spent = self.spent().columns()
        del spent["optimizer_steps"]
        if not self.active:
            return {**spent, "budget": "", "budget_unit": ""}
        return {**spent, "budget": self.amount, "budget_unit": self.unit}
