"""Per-pixel tasks on a whole label map, depth map or normal map: segmentation, depth and surface normals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrun.tasks.base import Meter, Metric, Task, masked_mean


# --- semantic segmentation -------------------------------------------------------------------


class Segmentation(Task):
    """Per-pixel classification: cross-entropy ignoring `ignore_index`; mIoU and pixel accuracy in %."""

    dense = True
    metrics = (Metric("miou", True), Metric("pixel_acc", True))

    def __init__(self, name: str, num_classes: int, ignore_index: int = -1) -> None:
        self.name, self.num_classes, self.ignore_index = name, num_classes, ignore_index
        self.out_channels = num_classes

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.long()
        per_pixel = F.cross_entropy(pred, target, ignore_index=self.ignore_index, reduction="none")
        return masked_mean(per_pixel, target != self.ignore_index)

    def loss_count(self, target: Tensor) -> Tensor:
        return (target.long() != self.ignore_index).sum().float()

    def meter(self) -> Meter:
        return ConfusionMeter(self.num_classes, self.ignore_index)


class ConfusionMeter(Meter):
    """A confusion matrix over every labelled pixel of the split (not an average of per-batch scores)."""

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion: Tensor | None = None

    def update(self, pred: Tensor, target: Tensor) -> None:
        labels = pred.argmax(dim=1).flatten()
        target = target.flatten().long()
        # Only labels of a known class count (as mtan's and LibMTL's metrics keep 0 <= label < n): any other
        # value, whatever ignore_index says, would shift the confusion matrix's rows.
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        index = target[valid] * self.num_classes + labels[valid]
        counts = torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, -1)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def compute(self) -> dict[str, float]:
        c = self.confusion.double().cpu() if self.confusion is not None else torch.zeros(1, 1).double()
        true_pos = c.diag()
        union = c.sum(0) + c.sum(1) - true_pos
        present = union > 0  # classes absent from both labels and predictions do not count
        miou = (true_pos[present] / union[present]).mean().item() if present.any() else 0.0
        pixel_acc = (true_pos.sum() / c.sum().clamp(min=1)).item()
        return {"miou": 100 * miou, "pixel_acc": 100 * pixel_acc}


# --- depth -----------------------------------------------------------------------------------


class Depth(Task):
    """Per-pixel depth: L1 on valid pixels (target > 0); absolute and relative error."""

    dense = True
    out_channels = 1
    metrics = (Metric("abs_err", False), Metric("rel_err", False))

    def __init__(self, name: str) -> None:
        self.name = name

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return masked_mean((pred.squeeze(1) - target).abs(), target > 0)

    def loss_count(self, target: Tensor) -> Tensor:
        return (target > 0).sum().float()

    def meter(self) -> Meter:
        return DepthMeter()


class DepthMeter(Meter):
    """Sums of absolute and relative errors over every valid pixel of the split."""

    def __init__(self) -> None:
        self.abs_sum = self.rel_sum = self.count = 0.0

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target > 0
        err = (pred.squeeze(1) - target).abs()[valid].double()
        self.abs_sum += err.sum().item()
        self.rel_sum += (err / target[valid].double()).sum().item()
        self.count += valid.sum().item()

    def compute(self) -> dict[str, float]:
        n = max(self.count, 1.0)
        return {"abs_err": self.abs_sum / n, "rel_err": self.rel_sum / n}


# --- surface normals -------------------------------------------------------------------------


class Normal(Task):
    """Per-pixel unit normals: 1 - cosine on valid pixels (non-zero target); angle errors in degrees."""

    dense = True
    out_channels = 3
    metrics = (
        Metric("mean_angle", False),
        Metric("median_angle", False),
        Metric("within_11.25", True),
        Metric("within_22.5", True),
        Metric("within_30", True),
    )

    def __init__(self, name: str) -> None:
        self.name = name

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        cosine = (F.normalize(pred, dim=1) * target).sum(dim=1)
        return masked_mean(1 - cosine, target.abs().sum(dim=1) > 0)

    def loss_count(self, target: Tensor) -> Tensor:
        return (target.abs().sum(dim=1) > 0).sum().float()

    def meter(self) -> Meter:
        return AngleMeter()


class AngleMeter(Meter):
    """Angle errors over every valid pixel; the median comes from a 0.01-degree histogram, so memory stays flat."""

    bins = 18000  # 0.01 degree each over [0, 180]
    thresholds = (11.25, 22.5, 30.0)

    def __init__(self) -> None:
        self.histogram: Tensor | None = None
        self.angle_sum = self.count = 0.0
        self.within = [0.0 for _ in self.thresholds]

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target.abs().sum(dim=1) > 0
        cosine = (F.normalize(pred.double(), dim=1) * target.double()).sum(dim=1)[valid]
        angles = torch.rad2deg(torch.acos(cosine.clamp(-1, 1)))
        hist = torch.histc(angles, bins=self.bins, min=0, max=180).cpu()
        self.histogram = hist if self.histogram is None else self.histogram + hist
        self.angle_sum += angles.sum().item()
        self.count += angles.numel()
        for i, t in enumerate(self.thresholds):
            self.within[i] += (angles < t).sum().item()

    def compute(self) -> dict[str, float]:
        n = max(self.count, 1.0)
        out = {"mean_angle": self.angle_sum / n, "median_angle": self._median()}
        for t, w in zip(self.thresholds, self.within):
            out[f"within_{t:g}"] = 100 * w / n
        return out

    def _median(self) -> float:
        if self.histogram is None or self.count == 0:
            return 0.0
        cumulative = torch.cumsum(self.histogram.double(), 0)
        half = self.count / 2
        b = int(torch.searchsorted(cumulative, torch.tensor(half, dtype=torch.float64)))
        before = cumulative[b - 1].item() if b > 0 else 0.0
        inside = self.histogram[b].item()
        width = 180 / self.bins
        # Linear interpolation inside the bin that holds the middle pixel.
        return width * (b + (half - before) / inside) if inside else width * b
