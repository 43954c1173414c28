"""What a checkpoint holds: the run state (every part's `state_dict()` under its name) and the parts that belong to
the run itself: its history, the current epoch's progress, the first losses and the random generators."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.context import Counts


class Stateful(Protocol):
    """What a part of a run that a checkpoint holds provides (as torch's modules and optimizers do)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RunState:
    """Everything a run must save and restore: each part registers once by name; a checkpoint holds every
    part's `state_dict()` under its name, and resuming loads each one back from the same list."""

    def __init__(self) -> None:
        self.parts: dict[str, Stateful] = {}

    def register(self, name: str, part: Stateful | None) -> None:
        """Add `part` under `name`; None (a part this run does not have, e.g. no augmentation) is skipped."""
        if name in self.parts:
            raise ValueError(f"a run state part named {name!r} is registered already")
        if part is not None:
            self.parts[name] = part

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict, source: Path) -> None:
        missing = [name for name in self.parts if name not in state]
        if missing:
            raise MtlrunError(
                f"{source} holds no state for {', '.join(missing)}: it was written by another version of "
                f"mtlrun; restart the run with overwrite=true"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


@dataclass
class History:
    """What the run has written so far: epochs finished and the rows of train_log.csv and metrics.csv."""

    epoch: int = 0
    train_log: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "train_log": self.train_log, "metrics": self.metrics}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.train_log, self.metrics = state["epoch"], state["train_log"], state["metrics"]


class RandomState:
    """The global torch generator (and the device's, on CUDA): dropout and any other unseeded draw."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if self.device.type == "cuda" and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)


class EpochProgress:
    """How far the current epoch has got: iterations done, the losses summed so far, the work counts and
    seconds at its start. Saved with the run state, so an epoch stopped at an iteration boundary resumes
    where it stopped and its train_log row is the one an uninterrupted epoch writes."""

    def __init__(self) -> None:
        self.iteration = 0
        self.loss_sums: dict[str, Tensor] = {}
        self.penalty_sum: Tensor | None = None  # the architecture's penalties added to the steps (None: none)
        self.counts_at_start: dict[str, int] = {}
        self.seconds = 0.0

    def begin(self, counts: Counts, tasks: tuple[str, ...], device: torch.device) -> None:
        self.iteration, self.seconds = 0, 0.0
        self.loss_sums = {t: torch.zeros((), device=device) for t in tasks}
        self.penalty_sum = None
        self.counts_at_start = asdict(counts)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "loss_sums": self.loss_sums, "counts_at_start": self.counts_at_start,
                "seconds": self.seconds, "penalty_sum": self.penalty_sum}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.loss_sums = state["iteration"], state["loss_sums"]
        self.counts_at_start, self.seconds = state["counts_at_start"], state["seconds"]
        self.penalty_sum = state.get("penalty_sum")


class FirstLosses(dict):
    """Each task's loss at the run's first iteration (task -> value), the yardstick of an exploding loss; kept in
    the checkpoint, so a resumed run judges by the same values."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        self.update(state)
