"""The seed paper's presets and FAMO's CelebA preset, each run end to end from the CLI on fixture-sized files in
the datasets' layouts (with their real class and attribute names), and FAMO's CelebA Δm% on F1 alone against
its published single-task F1 (mtlrun/references/famo_celeba_single_task.csv)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.report.build import build
from mtlrun.report.runs import DELTA_M
from mtlrun.data.hdf5 import write_dataset
from tests.test_run_cli import mtlrun

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FAMO_REFERENCE = REPO / "mtlrun" / "references" / "famo_celeba_single_task.csv"
ATTRIBUTES = list(OmegaConf.load(CONF_DIR / "dataset/celeba.yaml").task_specs)
CATEGORIES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
NYUV2_CLASSES = list(OmegaConf.load(CONF_DIR / "dataset/nyuv2.yaml").task_specs.segmentation.class_names)
PRESETS = ["pascal_cityscapes", "pascal_nyuv2", "pascal_celeba", "famo_celeba"]


def _write(path: Path, dataset: str, size: tuple[int, int], splits: dict[str, int],
           classes: list[str] | None = None, depth: bool = False, normal: bool = False) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in splits.items():
        out = {"image": rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)}
        if classes:
            out["segmentation"] = rng.integers(-1, len(classes), (n, *size)).astype(np.int16)
        if depth:
            out["depth"] = rng.uniform(0.1, 10, (n, *size)).astype(np.float32)
        if normal:
            vectors = rng.normal(size=(n, *size, 3)).astype(np.float32)
            out["normal"] = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
        if dataset == "celeba":
            out["attributes"] = rng.integers(0, 2, (n, len(ATTRIBUTES))).astype(np.uint8)
        arrays[split] = out
    write_dataset(path, dataset, arrays, source="fixture", options={},
                  attribute_names=ATTRIBUTES if dataset == "celeba" else None,
                  class_names={"segmentation": classes} if classes else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every preset, trained for one epoch on tiny files at each preset's default path, in one sweep (one start)."""
    root = tmp_path_factory.mktemp("presets")
    _write(root / "data/cityscapes.h5", "cityscapes", (32, 64), {"train": 8, "test": 4}, CATEGORIES, depth=True)
    _write(root / "data/nyuv2.h5", "nyuv2", (32, 48), {"train": 8, "test": 4}, NYUV2_CLASSES, depth=True,
           normal=True)
    _write(root / "data/celeba.h5", "celeba", (16, 16), {"train": 8, "val": 4, "test": 4})
    result = mtlrun("-m", f"experiment={','.join(PRESETS)}", "strategy=grouped", "strategy.group_size=5",
                    "optimizer.lr=5e-4", "model.width=2", "trainer.epochs=1", "trainer.batch_size=4",
                    "trainer.eval_batch_size=4", "hydra.sweep.dir=sweep", cwd=root)
    assert result.returncode == 0, result.stderr
    jobs = sorted((root / "sweep").glob("*/results.csv"), key=lambda p: int(p.parent.name.split("_")[0]))
    assert len(jobs) == len(PRESETS)
    return {preset: job.parent for preset, job in zip(PRESETS, jobs)}


def _read(run: Path) -> tuple[pd.DataFrame, pd.Series]:
    return pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "results.csv").iloc[0]


def test_pascal_cityscapes_trains_the_seven_categories_as_binary_tasks(runs):
    metrics, results = _read(runs["pascal_cityscapes"])
    categories = metrics[metrics.task != "segmentation"]  # their pixel accuracy over the 7 maps: the cut task's
    assert list(dict.fromkeys(categories.task)) == CATEGORIES
    assert set(metrics.metric[metrics.task == "segmentation"]) == {"pixel_acc_argmax"}
    assert set(metrics.metric) == {"iou", "f1", "pixel_acc", "iou_per_image", "pixel_acc_argmax", "loss"}
    assert np.isfinite(metrics.value).all()
    assert set(metrics.metric[metrics.in_delta_m]) == {"iou", "pixel_acc"}  # theirs beside, out of Δm%
    assert (results.dataset, results.model, results.lr) == ("cityscapes", "unet", 5e-4)
    assert results.steps_per_iteration == 2  # 7 tasks in groups of 5


def test_pascal_nyuv2_trains_13_binary_maps_as_one_task_beside_depth_and_normals(runs):
    metrics, results = _read(runs["pascal_nyuv2"])
    assert list(dict.fromkeys(metrics.task)) == ["segmentation", "depth", "normal"]  # their default, T = 3
    assert (results.dataset, results.steps_per_iteration) == ("nyuv2", 1) and np.isfinite(metrics.value).all()


def test_pascal_celeba_trains_the_40_attributes_with_the_cnn(runs):
    metrics, results = _read(runs["pascal_celeba"])
    assert list(dict.fromkeys(metrics.task)) == ATTRIBUTES and set(metrics.split) == {"val", "test"}
    assert (results.dataset, results.model, results.steps_per_iteration) == ("celeba", "celeba_cnn", 8)
    assert set(metrics.metric[metrics.in_delta_m]) == {"accuracy", "f1"}


def test_famo_celeba_delta_m_is_on_f1_alone_against_famos_single_task_f1(runs):
    metrics, results = _read(runs["famo_celeba"])
    assert set(metrics.metric[metrics.in_delta_m]) == {"f1"}
    reference = pd.read_csv(FAMO_REFERENCE).iloc[0]
    f1 = np.array([results[f"test/{a}/f1"] for a in ATTRIBUTES])
    stl = np.array([reference[f"test/{a}/f1"] for a in ATTRIBUTES])
    comparison = build([runs["famo_celeba"]], [FAMO_REFERENCE], "test")
    delta_m = comparison.runs.loc[comparison.runs.strategy == "grouped", DELTA_M].item()
    assert delta_m == pytest.approx(np.mean((f1 - stl) / stl * 100), rel=1e-9)
