"""Per-image binary attributes (CelebA's, the built-in benchmark's) and their metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.tasks.base import Meter, Metric, Task


class BinaryAttributes(Task):
    """One or more per-image binary attributes: BCE on logits; accuracy, error, precision, recall and F1, each
    the mean over the task's attributes of that attribute's value, in %. Δm% counts accuracy and F1; error,
    precision and recall restate them."""

    dense = False
    metrics = (
        Metric("accuracy", True),
        Metric("error", False, in_delta_m=False),
        Metric("precision", True, in_delta_m=False),
        Metric("recall", True, in_delta_m=False),
        Metric("f1", True),
    )

    def __init__(self, name: str, attributes: list[str]) -> None:
        if not attributes:
            raise MtlrunError(f"task '{name}' selects no attribute: list at least one in its `columns`")
        self.name, self.attributes = name, list(attributes)
        self.out_channels = len(attributes)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))

    def meter(self) -> Meter:
        return BinaryMeter(len(self.attributes))


class BinaryMeter(Meter):
    """True/false positive/negative counts per attribute over the split."""

    def __init__(self, num_attributes: int) -> None:
        self.counts = torch.zeros(4, num_attributes, dtype=torch.float64)  # tp, fp, fn, tn

    def update(self, pred: Tensor, target: Tensor) -> None:
        predicted = pred > 0
        actual = target > 0.5
        stacked = torch.stack(
            [predicted & actual, predicted & ~actual, ~predicted & actual, ~predicted & ~actual]
        )
        self.counts += stacked.sum(dim=1).double().cpu()

    def compute(self) -> dict[str, float]:
        tp, fp, fn, tn = self.counts
        accuracy = (tp + tn) / (tp + fp + fn + tn).clamp(min=1)
        # A ratio with nothing to count (no positive predicted, present, or either) is 0, as sklearn's
        # zero_division=0.
        precision = tp / (tp + fp).clamp(min=1)
        recall = tp / (tp + fn).clamp(min=1)
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        values = {"accuracy": accuracy, "error": 1 - accuracy, "precision": precision, "recall": recall, "f1": f1}
        return {name: 100 * v.mean().item() for name, v in values.items()}
