"""Binary maps cut from label maps (Pascal et al.'s per-category tasks): the loss and the metrics against hand
counts on label maps of the real datasets' shapes, and `dataset.binary_maps` turning NYUv2 and Cityscapes
segmentation into 13 and 7 binary tasks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.data import open_dataset, task_names
from mtlrun.data.augment import Augment
from mtlrun.data.hdf5 import write_dataset
from mtlrun.errors import MtlrunError
from mtlrun.tasks import BinaryAttributes, BinaryMaps, count_in_delta_m

CITYSCAPES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
NYUV2 = ["bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
         "wall", "window"]
SKY = CITYSCAPES.index("sky")


def street_labels() -> torch.Tensor:
    """Two 128x256 Cityscapes-shaped label maps: sky on top, construction and nature, flat at the bottom, and
    a 16-pixel ignored (-1) band on the left. Image 1 has 40 rows of sky, image 2 has 10."""
    labels = torch.full((2, 128, 256), CITYSCAPES.index("flat"), dtype=torch.int16)
    labels[:, 40:100, :128] = CITYSCAPES.index("construction")
    labels[:, 40:100, 128:] = CITYSCAPES.index("nature")
    labels[0, :40] = SKY
    labels[1, :10] = SKY
    labels[1, 10:40] = CITYSCAPES.index("construction")
    labels[:, :, :16] = -1
    return labels


def sky_logits() -> torch.Tensor:
    """Sky predicted on the top 50 rows of image 1 (everywhere, the ignored band too), nowhere on image 2."""
    logits = torch.full((2, 1, 128, 256), -3.0)
    logits[0, :, :50] = 2.0
    return logits


def test_sky_metrics_are_the_hand_counts_over_the_split_not_per_batch_means():
    task = BinaryMaps("sky", [SKY])
    meter = task.meter()
    labels, logits = street_labels(), sky_logits()
    for i in range(2):  # one image per batch: the counts add up over the split
        meter.update(logits[i : i + 1], labels[i : i + 1])
    # Labelled pixels per image: 128 x 240. Image 1: sky 40 x 240 = 9600, predicted 50 x 240 = 12000, so
    # TP 9600, FP 2400, TN 30720 - 12000 = 18720. Image 2: sky 10 x 240 = 2400, none predicted: FN 2400,
    # TN 28320. Whole split: IoU 9600 / 14400, F1 19200 / 24000, accuracy (9600 + 47040) / 61440.
    values = meter.compute()
    assert values["iou"] == pytest.approx(100 * 9600 / 14400)
    assert values["f1"] == pytest.approx(80.0)
    assert values["pixel_acc"] == pytest.approx(100 * 56640 / 61440)
    # a mean of per-image IoUs (80 and 0) would give 40


def test_a_joint_task_averages_its_maps_and_leaves_out_a_class_absent_from_labels_and_predictions():
    labels = street_labels()
    logits = torch.full((2, 3, 128, 256), -1.0)
    logits[:, 0] = sky_logits()[:, 0]
    logits[:, 1, 100:] = 1.0  # flat, exactly where it is
    # map 2 (human) is neither labelled nor predicted anywhere
    task = BinaryMaps("three", [SKY, CITYSCAPES.index("flat"), CITYSCAPES.index("human")])
    meter = task.meter()
    meter.update(logits, labels)
    values = meter.compute()
    assert values["iou"] == pytest.approx((100 * 9600 / 14400 + 100) / 2)
    assert values["f1"] == pytest.approx((80 + 100) / 2)
    human_acc = 100.0  # all labelled pixels are true negatives
    assert values["pixel_acc"] == pytest.approx((100 * 56640 / 61440 + 100 + human_acc) / 3)


def _authors_example() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two maps (classes 0 and 1; label 2 is of neither, -1 unlabelled) on 2x4 images, in two evaluation
    batches: [a1, a2] and [b1]."""
    labels = torch.tensor([
        [[0, 0, 0, 0], [2, 2, 2, -1]],  # a1: class 0 on the top row
        [[1, 1, 2, 2], [2, 2, 2, 2]],  # a2: class 1 on two pixels
        [[0, 0, 0, 0], [0, 0, 0, 0]],  # b1: class 0 everywhere
    ], dtype=torch.int16)
    map0 = torch.tensor([[[2, 2, -2, -2], [2, 2, -2, 2]], [[-2] * 4, [-2] * 4],
                         [[1, 1, 1, 1], [1, 1, -1, -1]]])
    map1 = torch.tensor([[[-1, -1, -1, 1], [-1] * 4], [[3, 1, 1, -1], [-1] * 4], [[2, -1, -1, -1], [-1] * 4]])
    logits = torch.stack([map0, map1], dim=1).float()
    return [labels[:2], labels[2:]], [logits[:2], logits[2:]]


def test_the_authors_per_image_iou_and_argmax_pixel_accuracy_are_the_hand_counts_per_batch():
    labels, logits = _authors_example()
    meter = BinaryMaps("two", [0, 1]).meter()
    for batch_labels, batch_logits in zip(labels, logits):
        meter.update(batch_logits, batch_labels)
    values = meter.compute()
    # IoU per image. Map 0: batch 1, a1 predicts 4 labelled pixels (the unlabelled one does not count), 2 of
    # the 4 of its class: 2 / 6; a2 holds no class 0 (IoU 0, not counted): 1/3. Batch 2, b1: 6 / 8 = 3/4.
    # Mean over batches 13/24. Map 1: batch 1, a1's false positive on an image without class 1 costs
    # nothing, a2: 2 / 3, one image with the class: 2/3; batch 2 holds no class 1 and is skipped: 2/3.
    assert values["iou_per_image"] == pytest.approx(100 * (13 / 24 + 2 / 3) / 2)
    # Arg-max map with background 0. Batch 1: a1 right at (0,0), (0,1) and (1,2): 3 of 7 labelled pixels
    # ((0,3): map 1's sigmoid is the larger, class 2; (0,2): none >= 0.5, background); a2 right on 7 of 8
    # ((0,2) predicts class 2 on background): 10 / 15. Batch 2: (0,0) takes map 1 (logit 2 > 1), (1,2) and
    # (1,3) are background: 5 / 8. Mean over batches.
    assert values["pixel_acc_argmax"] == pytest.approx(100 * (10 / 15 + 5 / 8) / 2)
    # The split-wide counts differ: map 0 TP 8, FP 2, FN 4; map 1 TP 2 and 3 false positives, a1's included.
    assert values["iou"] == pytest.approx(100 * (8 / 14 + 2 / 5) / 2)


def test_per_class_tasks_report_the_authors_argmax_pixel_accuracy_over_their_maps_together(monkeypatch):
    """Cityscapes as the authors train it: one task per class (`dataset.binary_maps=per_class`), their pixel
    accuracy an arg-max over all the maps; evaluate() reports it under the cut task's name, from the same
    hand counts as the two maps held by one task, while each class's own value is its one map's."""
    from mtlrun.train import evaluate as evaluation

    labels, logits = _authors_example()
    tasks = [BinaryMaps("one", [0], group="seg"), BinaryMaps("two", [1], group="seg")]

    class Fixed(torch.nn.Module):
        def forward(self, image, names):
            return {"one": image[:, :1], "two": image[:, 1:]}

    batches = [{"image": x, "one": y, "two": y} for x, y in zip(logits, labels)]
    monkeypatch.setattr(evaluation, "eval_batches", lambda split, size: iter(batches))
    scores = evaluation.evaluate(Fixed(), tasks, None, lambda b: b, 2)
    assert scores["seg"] == {"pixel_acc_argmax": pytest.approx(100 * (10 / 15 + 5 / 8) / 2)}
    assert scores["one"]["pixel_acc_argmax"] != pytest.approx(scores["seg"]["pixel_acc_argmax"])
    rows = evaluation.metric_rows(scores, tasks, 1, "test")
    (joint,) = [r for r in rows if r["task"] == "seg"]
    assert joint["higher_is_better"] is True and joint["in_delta_m"] is False


def test_the_authors_metrics_depend_on_the_evaluation_batches_as_theirs():
    labels, logits = _authors_example()
    meter = BinaryMaps("two", [0, 1]).meter()
    meter.update(torch.cat(logits), torch.cat(labels))  # one batch of three images
    values = meter.compute()
    assert values["pixel_acc_argmax"] == pytest.approx(100 * 15 / 23)
    # Map 0: (1/3 + 0 + 3/4) over its 2 images; map 1: (0 + 2/3 + 0) over its 1 image.
    assert values["iou_per_image"] == pytest.approx(100 * ((1 / 3 + 3 / 4) / 2 + 2 / 3) / 2)


def test_a_map_whose_class_no_image_holds_counts_zero_in_the_per_image_iou_as_theirs():
    labels, logits = _authors_example()
    meter = BinaryMaps("three", [0, 1, 5]).meter()  # class 5 is in no image
    meter.update(torch.cat([logits[0], torch.full((2, 1, 2, 4), -1.0)], dim=1), labels[0])
    assert meter.compute()["iou_per_image"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)


def test_the_loss_is_bce_over_labelled_pixels_and_ignored_pixels_get_no_gradient():
    labels = street_labels()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 128, 256, generator=g, dtype=torch.float64, requires_grad=True)
    task = BinaryMaps("two", [SKY, CITYSCAPES.index("nature")])
    loss = task.loss(logits, labels)
    x = logits.detach().numpy()
    y = np.stack([labels.numpy() == SKY, labels.numpy() == CITYSCAPES.index("nature")], axis=1)
    bce = np.logaddexp(0, x) - x * y  # -log sigmoid(x) for y = 1, -log(1 - sigmoid(x)) for y = 0
    labelled = np.broadcast_to((labels.numpy() >= 0)[:, None], bce.shape)
    assert loss.item() == pytest.approx(bce[labelled].mean(), rel=1e-12)
    loss.backward()
    assert torch.all(logits.grad[:, :, :, :16] == 0) and torch.all(logits.grad[:, :, :, 16:] != 0)


def test_an_image_without_a_labelled_pixel_gives_a_zero_loss_not_nan():
    task = BinaryMaps("sky", [SKY])
    loss = task.loss(torch.zeros(1, 1, 4, 4, requires_grad=True), torch.full((1, 4, 4), -1, dtype=torch.int16))
    assert loss.item() == 0.0


def test_metrics_directions_and_what_enters_delta_m():
    task = BinaryMaps("sky", [SKY])
    assert [(m.name, m.higher_is_better, m.in_delta_m) for m in task.metrics] == [
        ("iou", True, True), ("f1", True, False), ("pixel_acc", True, True), ("iou_per_image", True, False),
        ("pixel_acc_argmax", True, False)]
    attributes = BinaryAttributes("Smiling", ["Smiling"])
    count_in_delta_m(attributes, ["f1"])
    assert [m.name for m in attributes.metrics if m.in_delta_m] == ["f1"]
    assert [m.name for m in BinaryAttributes("Male", ["Male"]).metrics if m.in_delta_m] == ["accuracy", "f1"]
    with pytest.raises(MtlrunError, match="names none of task 'sky'"):
        count_in_delta_m(task, ["accuracy"])


REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "samples" / "nyuv2" / "test_labels_13"


def test_real_nyuv2_label_maps_as_13_binary_tasks_match_numpy_counts():
    files = sorted(REAL_LABELS.glob("*.png")) if REAL_LABELS.is_dir() else []
    if not files:
        pytest.skip(f"no real NYUv2 label maps in {REAL_LABELS}")
    from PIL import Image

    labels = np.stack([np.asarray(Image.open(f)).astype(np.int16) - 1 for f in files])  # 0 = unlabelled -> -1
    predicted_labels = np.roll(labels, 37, axis=2)  # a prediction off by 37 columns
    for k in range(13):
        task = BinaryMaps(NYUV2[k], [k])
        meter = task.meter()
        logits = torch.from_numpy(np.where(predicted_labels == k, 1.0, -1.0)[:, None])
        meter.update(logits, torch.from_numpy(labels))
        labelled, actual, predicted = labels >= 0, labels == k, predicted_labels == k
        tp = np.sum(labelled & actual & predicted)
        fp, fn = np.sum(labelled & ~actual & predicted), np.sum(labelled & actual & ~predicted)
        values = meter.compute()
        if tp + fp + fn:
            assert values["iou"] == pytest.approx(100 * tp / (tp + fp + fn))
            assert values["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
        assert values["pixel_acc"] == pytest.approx(100 * np.mean((actual == predicted)[labelled]))


def test_augmentation_moves_a_binary_maps_label_target_as_labels():
    task = BinaryMaps("sky", [SKY])
    labels = street_labels()
    batch = {"image": torch.zeros(2, 3, 128, 256), "sky": labels}
    out = Augment([task], [1.0], True, seed=0)(batch)
    flipped = [torch.equal(out["sky"][i], labels[i].flip(-1)) for i in range(2)]
    assert all(f or torch.equal(out["sky"][i], labels[i]) for i, f in enumerate(flipped)) and any(flipped)
    assert out["sky"].dtype == torch.int16


# --- dataset.binary_maps -----------------------------------------------------------------------------------


def _dataset(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"dataset={name}", *overrides]).dataset


def test_nyuv2_becomes_13_binary_tasks_plus_depth_and_normal_and_cityscapes_the_papers_7():
    assert task_names(_dataset("nyuv2", "dataset.binary_maps=per_class")) == [*NYUV2, "depth", "normal"]
    cityscapes = _dataset("cityscapes", "dataset.binary_maps=per_class", "dataset.tasks=[segmentation]")
    assert task_names(cityscapes) == CITYSCAPES
    assert task_names(_dataset("cityscapes", "dataset.binary_maps=per_class", "dataset.tasks=[sky,depth]")) == [
        "sky", "depth"]
    assert task_names(_dataset("nyuv2", "dataset.binary_maps=joint")) == ["segmentation", "depth", "normal"]
    assert task_names(_dataset("nyuv2")) == ["segmentation", "depth", "normal"]  # off by default


@pytest.mark.parametrize("overrides,message", [
    (["dataset.binary_maps=yes"], r"dataset.binary_maps='yes' is invalid; valid: null, per_class, joint"),
    (["dataset.binary_maps=per_class", "dataset.task_specs.segmentation.num_classes=19"],
     r"class_names lists 7 names for num_classes=19"),
    (["dataset.binary_maps=per_class", "dataset.task_specs.segmentation.class_names=[a,b,c,d,e,f,depth]"],
     r"\['depth'\] is already a task"),
    (["dataset.binary_maps=per_class", "dataset.tasks=[segmentation_3]"],
     r"names unknown tasks \['segmentation_3'\]"),
])
def test_bad_binary_map_settings_stop_with_one_line(overrides, message):
    with pytest.raises(MtlrunError, match=message):
        task_names(_dataset("cityscapes", *overrides))


def test_unnamed_classes_are_numbered():
    cfg = _dataset("cityscapes", "dataset.binary_maps=per_class", "dataset.task_specs.segmentation.class_names=null",
                   "dataset.tasks=[segmentation]")
    assert task_names(cfg) == [f"segmentation_{i}" for i in range(7)]


def _cityscapes_file(path: Path, class_names: list[str]) -> np.ndarray:
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 4), ("test", 2)):
        splits[split] = {"image": rng.integers(0, 256, (n, 32, 64, 3), dtype=np.uint8),
                         "segmentation": rng.integers(-1, 7, (n, 32, 64)).astype(np.int16),
                         "depth": rng.uniform(0.1, 1, (n, 32, 64)).astype(np.float32)}
    write_dataset(path, "cityscapes", splits, source="fixture", options={},
                  class_names={"segmentation": class_names})
    return splits["train"]["segmentation"]


def test_loaded_binary_tasks_share_one_label_array_and_cut_their_class_from_it(tmp_path):
    labels = _cityscapes_file(tmp_path / "c.h5", CITYSCAPES)
    cfg = _dataset("cityscapes", f"dataset.path={tmp_path / 'c.h5'}", "dataset.binary_maps=per_class")
    data = open_dataset(cfg)
    assert [t.name for t in data.tasks] == [*CITYSCAPES, "depth"]
    targets = data.splits["train"].targets
    assert len({targets[c].data_ptr() for c in CITYSCAPES}) == 1  # 7 tasks, one array in memory
    for task in data.tasks[:7]:
        positive, labelled = task.binary_targets(targets[task.name])
        assert torch.equal(positive[:, 0], torch.from_numpy(labels == CITYSCAPES.index(task.name)))
        assert torch.equal(labelled[:, 0], torch.from_numpy(labels >= 0))


def test_a_file_whose_classes_are_named_otherwise_is_refused(tmp_path):
    _cityscapes_file(tmp_path / "c.h5", [f"c{i}" for i in range(7)])
    cfg = _dataset("cityscapes", f"dataset.path={tmp_path / 'c.h5'}", "dataset.binary_maps=per_class")
    with pytest.raises(MtlrunError, match=r"task 'flat' is class 0 \(flat\) of 'segmentation', but .* names class 0 "
                                          r"'c0'; its classes are c0, c1") as error:
        open_dataset(cfg)
    assert "\n" not in str(error.value)


def test_every_dataset_conf_documents_the_options():
    for name in ("shapes", "nyuv2", "cityscapes"):
        conf = OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml")
        assert "binary_maps" in conf and conf.binary_maps is None
        assert len(conf.task_specs.segmentation.class_names) == conf.task_specs.segmentation.num_classes
