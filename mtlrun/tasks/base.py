"""What every task is: its metrics' names and directions, its meter over a split, its loss."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Metric:
    """A metric's name and the direction that counts as better; reports ask this, never a list of their own.

    `in_delta_m` is false for a metric that restates another of the same task (a binary task's error is
    100 - accuracy): counting it again would weigh that quantity twice in Δm%.
    """

    name: str
    higher_is_better: bool
    in_delta_m: bool = True


class Meter(ABC):
    """Accumulates a task's metric statistics over batches; `compute` gives the whole split's values."""

    @abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...


class Task(ABC):
    """A task bundles its name, the width of its head's output, its loss and its metrics."""

    name: str
    out_channels: int
    dense: bool  # per-pixel output (upsampled to the image size) or one output per image
    metrics: tuple[Metric, ...]

    @abstractmethod
    def loss(self, pred: Tensor, target: Tensor) -> Tensor: ...

    def loss_count(self, target: Tensor) -> Tensor:
        """How many values `loss` averages over for `target` (a float tensor): the valid pixels of a masked mean,
        the samples of a mean over the batch. Data parallelism weighs each process's loss by it, so the losses
        and gradients are those of the whole batch."""
        return torch.tensor(float(len(target)), device=target.device)

    @abstractmethod
    def meter(self) -> Meter: ...


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # `where`, not a product: a NaN in an invalid pixel's target must not reach the loss. A batch
    # with no valid pixel contributes a zero loss rather than 0/0 = NaN.
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)
