"""One short `mtlrun` run per real dataset, on fixture files in its HDF5 layout, with its conf file."""

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.data.hdf5 import write_dataset
from tests.test_run_cli import _one_line_error, mtlrun

pytestmark = pytest.mark.slow

CELEBA_ATTRIBUTES = list(OmegaConf.load(CONF_DIR / "dataset/celeba.yaml").task_specs)


def _split(rng: np.random.Generator, n: int, size: tuple[int, int], classes: dict[str, int], depth: bool,
           normal: bool, attributes: int = 0) -> dict[str, np.ndarray]:
    arrays = {"image": rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)}
    for key, k in classes.items():
        arrays[key] = rng.integers(-1, k, (n, *size)).astype(np.int16)
    if depth:
        arrays["depth"] = rng.uniform(0, 10, (n, *size)).astype(np.float32) * (rng.uniform(size=(n, *size)) > 0.1)
    if normal:
        vectors = rng.normal(size=(n, *size, 3)).astype(np.float32)
        arrays["normal"] = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    if attributes:
        arrays["attributes"] = rng.integers(0, 2, (n, attributes)).astype(np.uint8)
    return arrays


def _write(path, dataset: str, splits: dict[str, int], **kinds) -> None:
    rng = np.random.default_rng(0)
    # The names the dataset's conf gives (a file names its classes as the conf does), c<i> for other arrays.
    conf = OmegaConf.load(CONF_DIR / f"dataset/{dataset}.yaml").task_specs
    named = {spec.key: list(spec.class_names) for spec in conf.values() if spec.get("class_names")}
    class_names = {key: named.get(key, [f"c{i}" for i in range(k)])
                   for key, k in kinds.get("classes", {}).items()}
    write_dataset(
        path, dataset, {s: _split(rng, n, **kinds) for s, n in splits.items()}, source="fixture", options={},
        attribute_names=CELEBA_ATTRIBUTES if kinds.get("attributes") else None, class_names=class_names or None,
    )


FIXTURES = {
    "nyuv2": dict(splits={"train": 8, "test": 4}, size=(32, 48), classes={"segmentation": 13}, depth=True,
                  normal=True),
    "cityscapes": dict(splits={"train": 8, "test": 4}, size=(32, 64), depth=True, normal=False,
                       classes={"segmentation": 7, "segmentation_19": 19}),
    "celeba": dict(splits={"train": 8, "val": 4, "test": 4}, size=(32, 32), classes={}, depth=False,
                   normal=False, attributes=len(CELEBA_ATTRIBUTES)),
}
RUN = ["model=convnet", "model.width=4", "trainer.epochs=1", "trainer.batch_size=4", "trainer.eval_batch_size=4"]


@pytest.mark.parametrize("dataset", list(FIXTURES))
def test_short_run_on_each_dataset(tmp_path, dataset):
    kinds = FIXTURES[dataset]
    path = tmp_path / f"{dataset}.h5"
    _write(path, dataset, kinds["splits"], **{k: v for k, v in kinds.items() if k != "splits"})
    extra = {"nyuv2": ["dataset.augment.scales=[1.0,1.5]", "dataset.augment.flip=true"],
             "cityscapes": ["dataset.in_memory=false", "trainer.workers=1", "strategy=grouped"],
             "celeba": ["dataset.tasks=[Smiling,Male,Young]", "strategy=averaged"]}[dataset]
    result = mtlrun(f"dataset={dataset}", f"dataset.path={path}", *RUN, *extra, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = pd.read_csv(tmp_path / "run/metrics.csv")
    expected_tasks = {"nyuv2": {"segmentation", "depth", "normal"}, "cityscapes": {"segmentation", "depth"},
                      "celeba": {"Smiling", "Male", "Young"}}[dataset]
    assert set(metrics.task) == expected_tasks
    assert np.isfinite(metrics.value).all()
    results = pd.read_csv(tmp_path / "run/results.csv").iloc[0]
    assert results.dataset == dataset and results.epochs == 1


def test_cityscapes_19_classes_from_its_own_array(tmp_path):
    path = tmp_path / "cityscapes.h5"
    kinds = FIXTURES["cityscapes"]
    _write(path, "cityscapes", kinds["splits"], **{k: v for k, v in kinds.items() if k != "splits"})
    wrong = mtlrun("dataset=cityscapes", f"dataset.path={path}", *RUN, "dataset.task_specs.segmentation.key=segmentation_19",
                   "hydra.run.dir=bad", cwd=tmp_path)
    assert "expects 7 classes but" in _one_line_error(wrong) and "num_classes=19" in wrong.stderr
    nineteen = ["dataset.task_specs.segmentation.key=segmentation_19",
                "dataset.task_specs.segmentation.num_classes=19"]
    named = mtlrun("dataset=cityscapes", f"dataset.path={path}", *RUN, *nineteen, "hydra.run.dir=named",
                   cwd=tmp_path)
    line = _one_line_error(named)
    assert "names its classes [flat, construction" in line and "stores [c0, c1" in line
    result = mtlrun("dataset=cityscapes", f"dataset.path={path}", *RUN, *nineteen,
                    "dataset.task_specs.segmentation.class_names=null", "hydra.run.dir=run19", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = OmegaConf.load(tmp_path / "run19/.hydra/config.yaml").dataset.task_specs.segmentation
    assert spec.key == "segmentation_19" and spec.num_classes == 19


def test_nyuv2_file_without_normals_names_the_fix(tmp_path):
    path = tmp_path / "nyuv2.h5"
    _write(path, "nyuv2", {"train": 4, "test": 2}, size=(32, 32), classes={"segmentation": 13}, depth=True,
           normal=False)
    line = _one_line_error(mtlrun("dataset=nyuv2", f"dataset.path={path}", *RUN, "hydra.run.dir=x", cwd=tmp_path))
    assert "no 'train/normal' array" in line and "dataset.tasks=[segmentation,depth]" in line
