"""Per-pixel binary maps cut from a segmentation label map, one map per class, and their metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.tasks.base import Meter, Metric, Task


class BinaryMaps(Task):
    """Per-pixel binary maps cut from a segmentation label map, map k being "the pixel's label is classes[k]"
    (Pascal et al. 2021 train each Cityscapes category and each NYUv2 class so, as its own task). BCE on logits
    over the labelled pixels (label >= 0 and != ignore_index; ignored pixels count in neither loss nor metric);
    IoU, F1 and pixel accuracy in %, each the mean over the task's maps of that map's value over the whole
    split. Δm% counts IoU and pixel accuracy; F1 = 2 IoU / (1 + IoU) restates IoU. Beside them, out of Δm%,
    the authors' per-batch metrics (AITSO_MTL `*/metrics.py`): `iou_per_image` and `pixel_acc_argmax`
    (BinaryMapMeter)."""

    dense = True
    metrics = (
        Metric("iou", True),
        Metric("f1", True, in_delta_m=False),
        Metric("pixel_acc", True),
        Metric("iou_per_image", True, in_delta_m=False),
        Metric("pixel_acc_argmax", True, in_delta_m=False),
    )

    def __init__(self, name: str, classes: Sequence[int], ignore_index: int = -1, group: str | None = None) -> None:
        if not classes or any(int(c) < 0 for c in classes):
            raise MtlrunError(f"task '{name}' needs `classes`: a list of label values >= 0, got {list(classes)}")
        self.name, self.classes, self.ignore_index = name, [int(c) for c in classes], ignore_index
        self.out_channels = len(self.classes)
        self.group = group  # the segmentation task that `dataset.binary_maps=per_class` cut into this one

    def binary_targets(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(positive, labelled) masks of shape N x K x H x W and N x 1 x H x W from N x H x W labels."""
        labels = labels.long()
        classes = torch.tensor(self.classes, device=labels.device).view(1, -1, 1, 1)
        labelled = ((labels >= 0) & (labels != self.ignore_index)).unsqueeze(1)
        return labels.unsqueeze(1) == classes, labelled

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        positive, labelled = self.binary_targets(target)
        # Unlabelled pixels weigh 0; a batch without a labelled pixel gives a zero loss rather than 0/0.
        total = F.binary_cross_entropy_with_logits(
            pred, positive.to(pred.dtype), weight=labelled.to(pred.dtype), reduction="sum"
        )
        return total / (labelled.sum() * self.out_channels).clamp(min=1)

    def loss_count(self, target: Tensor) -> Tensor:
        return (self.binary_targets(target)[1].sum() * self.out_channels).float()

    def meter(self) -> Meter:
        return BinaryMapMeter(self)


class BinaryMapMeter(Meter):
    """True/false positive/negative pixel counts per map over the split (a logit > 0 predicts the class), and
    the authors' per-batch metrics, for which each `update` is one evaluation batch (their values depend on
    `trainer.eval_batch_size` and on the split's order; with theirs, the same batches give their numbers):

    - `iou_per_image`: per map and batch, the sum of the images' IoUs divided by the number of images that
      contain the class (an image without it adds IoU 0 and is not counted: its false positives cost
      nothing); per map the mean over the batches that contain the class; then the mean over the task's
      maps, a map whose class no image contains counting 0 (their `compute_ious` and `Metric`).
    - `pixel_acc_argmax`: per batch, the share of pixels whose arg-max class (of the maps' sigmoids, 0 =
      background where no sigmoid reaches 0.5) is the labelled one (0 where the pixel is of no map's class);
      the mean over batches (their `compute_seg_metrics`). Over a task's maps together, so their pixel
      accuracy where the task holds every class (`dataset.binary_maps=joint`).

    Only labelled pixels count in either, as in every metric here (theirs count unlabelled pixels as
    negatives of every map); probabilities are compared as theirs, sigmoid(logit) >= 0.5 in float32."""

    def __init__(self, task: BinaryMaps) -> None:
        self.task = task
        self.counts = torch.zeros(4, task.out_channels, dtype=torch.float64)  # tp, fp, fn, tn
        self.iou_batch_sums = torch.zeros(task.out_channels, dtype=torch.float64)
        self.iou_batches = torch.zeros(task.out_channels, dtype=torch.float64)  # batches holding the class
        self.argmax_acc_sum, self.argmax_batches = 0.0, 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        actual, labelled = self.task.binary_targets(target)
        predicted = pred > 0
        cases = [predicted & actual, predicted & ~actual, ~predicted & actual, ~predicted & ~actual]
        self.counts += torch.stack([(c & labelled).sum(dim=(0, 2, 3)) for c in cases]).double().cpu()
        self._update_per_batch(torch.sigmoid(pred.float()), actual & labelled, labelled)

    def _update_per_batch(self, probability: Tensor, actual: Tensor, labelled: Tensor) -> None:
        predicted = (probability >= 0.5) & labelled
        intersection = (predicted & actual).sum(dim=(2, 3)).double()  # N x K
        union = (predicted | actual).sum(dim=(2, 3)).double()
        images = actual.any(dim=(2, 3)).sum(dim=0).double()  # per map: images containing the class
        image_ious = (intersection / union.clamp(min=1)).sum(dim=0)
        present = images > 0
        self.iou_batch_sums += torch.where(present, image_ious / images.clamp(min=1), 0.0).cpu()
        self.iou_batches += present.double().cpu()
        pixels = labelled[:, 0]
        if pixels.any():
            guessed = torch.where(predicted.any(dim=1), probability.argmax(dim=1) + 1, 0)
            truth = torch.where(actual.any(dim=1), actual.byte().argmax(dim=1) + 1, 0)
            self.argmax_acc_sum += ((guessed == truth) & pixels).sum().item() / pixels.sum().item()
            self.argmax_batches += 1

    def compute(self) -> dict[str, float]:
        tp, fp, fn, tn = self.counts
        union = tp + fp + fn
        # A map whose class is neither labelled nor predicted anywhere in the split has no IoU or F1; it is
        # left out of their means, as an absent class is of mIoU (0 when no map is left).
        present = union > 0
        iou = (tp[present] / union[present]).mean().item() if present.any() else 0.0
        f1 = (2 * tp[present] / (union + tp)[present]).mean().item() if present.any() else 0.0
        pixel_acc = ((tp + tn) / (union + tn).clamp(min=1)).mean().item()
        iou_per_image = (self.iou_batch_sums / self.iou_batches.clamp(min=1)).mean().item()
        pixel_acc_argmax = self.argmax_acc_sum / max(self.argmax_batches, 1)
        return {"iou": 100 * iou, "f1": 100 * f1, "pixel_acc": 100 * pixel_acc,
                "iou_per_image": 100 * iou_per_image, "pixel_acc_argmax": 100 * pixel_acc_argmax}
