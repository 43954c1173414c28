"""Losses and split-level metrics against values computed by hand on small tensors."""

import math

import pytest
import torch

from mtlrun.tasks import BinaryAttributes, Depth, Normal, Segmentation


def _logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is `labels` (B,H,W) -> (B,C,H,W)."""
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * 5


def test_segmentation_confusion_over_batches_not_mean_of_batches():
    task = Segmentation("seg", num_classes=3, ignore_index=-1)
    meter = task.meter()
    # batch 1: target [0 0 1 -1], prediction [0 1 1 2]; batch 2: target [2 2], prediction [2 0]
    meter.update(_logits(torch.tensor([[[0, 1, 1, 2]]]), 3), torch.tensor([[[0, 0, 1, -1]]]))
    meter.update(_logits(torch.tensor([[[2, 0]]]), 3), torch.tensor([[[2, 2]]]))
    # Counted pixels: (t,p) = (0,0) (0,1) (1,1) (2,2) (2,0); the ignored pixel is left out.
    # IoU0 = 1/(2+2-1) = 1/3, IoU1 = 1/(1+2-1) = 1/2, IoU2 = 1/(2+1-1) = 1/2.
    out = meter.compute()
    assert out["miou"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 3 / 5)


def test_segmentation_miou_skips_classes_absent_from_labels_and_predictions():
    meter = Segmentation("seg", num_classes=4).meter()
    meter.update(_logits(torch.tensor([[[0, 1]]]), 4), torch.tensor([[[0, 1]]]))
    assert meter.compute()["miou"] == pytest.approx(100.0)


def test_segmentation_loss_ignores_pixels_and_never_nans():
    task = Segmentation("seg", num_classes=2, ignore_index=-1)
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1,2,1,2)
    target = torch.tensor([[[0, -1]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert task.loss(logits, target).item() == pytest.approx(expected)
    assert task.loss(logits, torch.full((1, 1, 2), -1)).item() == 0.0


def test_depth_loss_and_errors_on_valid_pixels_only():
    task = Depth("depth")
    pred = torch.tensor([[[[1.0, 3.0, 9.0]]]])  # (1,1,1,3)
    target = torch.tensor([[[2.0, 2.0, 0.0]]])  # last pixel invalid
    assert task.loss(pred, target).item() == pytest.approx(1.0)
    # A NaN where the target is invalid must not reach the loss.
    assert task.loss(torch.tensor([[[[1.0, 3.0, float("nan")]]]]), target).item() == pytest.approx(1.0)
    meter = task.meter()
    meter.update(pred, target)
    meter.update(torch.tensor([[[[5.0]]]]), torch.tensor([[[4.0]]]))
    out = meter.compute()
    assert out["abs_err"] == pytest.approx((1 + 1 + 1) / 3)
    assert out["rel_err"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)


def test_normal_loss_and_angle_metrics():
    task = Normal("normal")
    angles = [0.0, 10.0, 20.0, 45.0]
    pred = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a)), 0.0] for a in angles])
    pred = (pred * 3).T.reshape(1, 3, 1, 4)  # unnormalized on purpose: the task normalizes
    target = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 4).clone()
    target[..., 3] = 0  # the 45-degree pixel is invalid
    expected_loss = sum(1 - math.cos(math.radians(a)) for a in angles[:3]) / 3
    assert task.loss(pred, target).item() == pytest.approx(expected_loss, abs=1e-6)
    meter = task.meter()
    meter.update(pred, target)
    out = meter.compute()
    assert out["mean_angle"] == pytest.approx(10.0, abs=1e-4)
    assert out["median_angle"] == pytest.approx(10.0, abs=0.02)
    assert out["within_11.25"] == pytest.approx(200 / 3)
    assert out["within_22.5"] == pytest.approx(100.0)
    assert out["within_30"] == pytest.approx(100.0)


def test_binary_attributes_accuracy_and_mean_f1():
    task = BinaryAttributes("attrs", ["x", "y"])
    logits = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]])
    target = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 1]], dtype=torch.uint8)
    meter = task.meter()
    meter.update(logits[:2], target[:2])
    meter.update(logits[2:], target[2:])
    # x: tp=1 fp=1 fn=1 tn=1 -> acc 0.5, f1 0.5; y: tp=2 fp=0 fn=1 tn=1 -> acc 0.75, f1 0.8
    out = meter.compute()
    assert out["accuracy"] == pytest.approx(100 * (0.5 + 0.75) / 2)
    assert out["f1"] == pytest.approx(100 * (0.5 + 0.8) / 2)
    assert out["error"] == pytest.approx(100 * (0.5 + 0.25) / 2)
    assert out["precision"] == pytest.approx(100 * (0.5 + 1.0) / 2)  # y: tp 2 / (tp + fp) 2
    assert out["recall"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)  # y: tp 2 / (tp + fn) 3
    assert set(out) == {m.name for m in task.metrics}
    assert {m.name for m in task.metrics if m.in_delta_m} == {"accuracy", "f1"}
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float()).item()
    assert task.loss(logits, target).item() == pytest.approx(expected_bce)


def test_metric_directions_are_declared_by_tasks():
    assert {m.name: m.higher_is_better for m in Depth("d").metrics} == {"abs_err": False, "rel_err": False}
    assert all(m.higher_is_better for m in Segmentation("s", 2).metrics)
    normal = {m.name: m.higher_is_better for m in Normal("n").metrics}
    assert normal["mean_angle"] is False and normal["within_30"] is True
    assert set(normal) == set(Normal("n").meter().compute())


# --- at the real datasets' shapes: NYUv2 288x384 batches of 2, CelebA's 40 attributes in batches of 256 ---


def test_nyuv2_shaped_metrics_by_construction():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(-1, 13, (4, 288, 384), generator=g)
    wrong = target.clone()
    wrong[:, :96, :] = 0  # the top third predicted as class 0
    seg = Segmentation("segmentation", 13).meter()
    for i in (0, 2):  # two batches of 2, accumulated over the split
        seg.update(_logits(wrong[i : i + 2].clamp(min=0), 13), target[i : i + 2])
    valid = target >= 0
    correct = (wrong == target) & valid
    ious = []
    for c in range(13):  # IoU per class from counts, the split as a whole
        tp = ((wrong == c) & (target == c) & valid).sum()
        union = (((wrong == c) | (target == c)) & valid).sum()
        if union:
            ious.append(tp.double() / union.double())
    out = seg.compute()
    assert out["pixel_acc"] == pytest.approx(100 * correct.sum().item() / valid.sum().item(), rel=1e-9)
    assert out["miou"] == pytest.approx(100 * torch.stack(ious).double().mean().item(), rel=1e-6)

    depth_target = torch.rand(4, 288, 384, generator=g) * 10 * (torch.rand(4, 288, 384, generator=g) > 0.2)
    depth = Depth("depth").meter()
    for i in (0, 2):
        depth.update(depth_target[i : i + 2, None] + 0.25, depth_target[i : i + 2])
    valid = depth_target > 0
    out = depth.compute()
    assert out["abs_err"] == pytest.approx(0.25, rel=1e-6)
    assert out["rel_err"] == pytest.approx((0.25 / depth_target[valid].double()).mean().item(), rel=1e-6)

    angle = math.radians(10.0)  # every prediction turned 10 degrees about the z axis
    normal_target = torch.zeros(2, 3, 288, 384)
    normal_target[:, 0], normal_target[:, 2] = 1.0, 0.0
    normal_target[:, :, :50] = 0  # invalid rows
    pred = torch.zeros_like(normal_target)
    pred[:, 0], pred[:, 1] = math.cos(angle) * 3, math.sin(angle) * 3  # not unit length: normalized first
    normals = Normal("normal").meter()
    normals.update(pred, normal_target)
    out = normals.compute()
    assert out["mean_angle"] == pytest.approx(10.0, abs=1e-3)
    assert out["median_angle"] == pytest.approx(10.0, abs=0.01)
    assert out["within_11.25"] == 100.0 and out["within_30"] == 100.0


def test_celeba_shaped_binary_metrics_against_per_attribute_counts():
    g = torch.Generator().manual_seed(1)
    target = (torch.rand(512, 40, generator=g) < torch.linspace(0.05, 0.9, 40)).to(torch.uint8)
    logits = torch.randn(512, 40, generator=g) + 2 * (target.float() - 0.5)
    meter = BinaryAttributes("attributes", [f"a{i}" for i in range(40)]).meter()
    for start in (0, 256):
        meter.update(logits[start : start + 256], target[start : start + 256])
    out = meter.compute()
    predicted, actual = (logits > 0).double(), target.double()
    tp = (predicted * actual).sum(0)
    fp = (predicted * (1 - actual)).sum(0)
    fn = ((1 - predicted) * actual).sum(0)
    accuracy = ((predicted == actual).double().mean(0))
    precision = tp / (tp + fp).clamp(min=1)
    recall = tp / (tp + fn).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    assert out["accuracy"] == pytest.approx(100 * accuracy.mean().item())
    assert out["error"] == pytest.approx(100 - 100 * accuracy.mean().item())
    assert out["precision"] == pytest.approx(100 * precision.mean().item())
    assert out["recall"] == pytest.approx(100 * recall.mean().item())
    assert out["f1"] == pytest.approx(100 * f1.mean().item())


def test_segmentation_labels_outside_the_classes_are_left_out_of_the_confusion_matrix():
    """With ignore_index=255 a -1 and a label equal to num_classes are not classes: they must not count
    (nor shift the matrix's rows, which a flat index would do)."""
    meter = Segmentation("seg", num_classes=3, ignore_index=255).meter()
    meter.update(_logits(torch.tensor([[[0, 1, 2, 0, 1]]]), 3), torch.tensor([[[0, 1, 2, -1, 3]]]))
    out = meter.compute()
    assert out["miou"] == pytest.approx(100.0) and out["pixel_acc"] == pytest.approx(100.0)
