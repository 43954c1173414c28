"""Tasks: what each task predicts, its loss, and its metrics accumulated over a whole split."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrun.errors import MtlrunError


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


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # `where`, not a product: a NaN in an invalid pixel's target must not reach the loss. A batch
    # with no valid pixel contributes a zero loss rather than 0/0 = NaN.
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


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
        return _masked_mean(per_pixel, target != self.ignore_index)

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
        return _masked_mean((pred.squeeze(1) - target).abs(), target > 0)

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
        return _masked_mean(1 - cosine, target.abs().sum(dim=1) > 0)

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


# --- binary maps cut from a label map ---------------------------------------------------------


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


# --- binary attributes -----------------------------------------------------------------------


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


def map_groups(tasks: Sequence[Task]) -> dict[str, BinaryMaps]:
    """Per segmentation task cut into per-class tasks (`dataset.binary_maps=per_class`) of which two or more
    are trained, one binary-map task holding those maps together, in the tasks' order: what an arg-max over
    all of them is measured on (the authors' pixel accuracy, `JOINT_METRICS`)."""
    members: dict[str, list[BinaryMaps]] = {}
    for task in tasks:
        if isinstance(task, BinaryMaps) and task.group is not None:
            members.setdefault(task.group, []).append(task)
    return {
        group: BinaryMaps(group, [c for t in maps for c in t.classes], maps[0].ignore_index)
        for group, maps in members.items() if len(maps) > 1
    }


# The metrics a group of per-class maps reports together (`map_groups`), out of Δm%.
JOINT_METRICS = ("pixel_acc_argmax",)


# --- building tasks from the dataset config --------------------------------------------------

TASK_KINDS = ("segmentation", "binary_map", "depth", "normal", "binary")


def build_task(name: str, spec: dict, attribute_names: list[str] | None = None) -> Task:
    """Build one task from its dataset-config entry (`kind` plus the kind's parameters)."""
    kind = spec.get("kind")
    if kind == "segmentation":
        return Segmentation(name, int(spec["num_classes"]), int(spec.get("ignore_index", -1)))
    if kind == "binary_map":
        return BinaryMaps(
            name, list(spec.get("classes") or []), int(spec.get("ignore_index", -1)), spec.get("group")
        )
    if kind == "depth":
        return Depth(name)
    if kind == "normal":
        return Normal(name)
    if kind == "binary":
        columns = spec.get("columns") or attribute_names or []
        return BinaryAttributes(name, list(columns))
    raise MtlrunError(f"task '{name}' has kind {kind!r}; valid kinds: {', '.join(TASK_KINDS)}")


def count_in_delta_m(task: Task, names: Sequence[str]) -> None:
    """Let exactly the metrics `names` of `task` enter Δm% (FAMO's CelebA Δm% counts F1 alone)."""
    chosen = [m for m in task.metrics if m.name in names]
    if not chosen:
        raise MtlrunError(
            f"dataset.delta_m_metrics={list(names)} names none of task '{task.name}''s metrics "
            f"({', '.join(m.name for m in task.metrics)}): add one of them, or set it to null"
        )
    task.metrics = tuple(replace(m, in_delta_m=m.name in names) for m in task.metrics)
