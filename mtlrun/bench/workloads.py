"""The bench's workloads: the built-in benchmark, or an experiment read from a file of random real-shaped arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mtlrun.bench.cases import compose_config
from mtlrun.data.hdf5 import write_dataset
from mtlrun.errors import MtlrunError

# Image sizes (H, W) of the converted real datasets: the converters' defaults (data_scripts/*.py --size).
REAL_SIZES = {"nyuv2": (288, 384), "cityscapes": (128, 256), "celeba": (64, 64)}
# What a GPU run times unless told otherwise: the built-in benchmark and each real dataset with its usual model.
GPU_WORKLOADS = ("shapes", "nyuv2_segnet_mtan", "cityscapes_segnet_mtan", "celeba_resnet18")


def workload_overrides(name: str, folder: Path, batch_size: int | None, overrides: list[str]) -> list[str]:
    """The config overrides of workload `name` ("shapes" or an experiment of conf/experiment/); for a real dataset,
    a file of random arrays of its real shapes is written in `folder` and the run reads it as it reads the dataset."""
    base = [] if name == "shapes" else [f"experiment={name}"]
    if batch_size is not None:
        base.append(f"trainer.batch_size={batch_size}")
    cfg = compose_config([*base, *overrides])
    if cfg.model.get("pretrained"):  # random weights time the same as pretrained ones, and need no file
        base.append("model.pretrained=false")
    if cfg.dataset.name == "shapes":
        return [*base, *overrides]
    if cfg.dataset.name not in REAL_SIZES:
        raise MtlrunError(f"bench: no real image size known for dataset {cfg.dataset.name!r}; known: {', '.join(REAL_SIZES)}")
    path = folder / f"{name}.h5"
    write_random_dataset(cfg.dataset, path, REAL_SIZES[cfg.dataset.name], 4 * cfg.trainer.batch_size)
    return [*base, f"dataset.path={path}", *overrides]


def write_random_dataset(cfg: DictConfig, path: Path, size: tuple[int, int], count: int, seed: int = 0) -> None:
    """A dataset file of `count` training images (and one test image) of `size`, with random targets of every
    array the dataset's task specs read, in the dtypes the converters write."""
    rng = np.random.default_rng(seed)
    height, width = size
    specs = OmegaConf.to_container(cfg.task_specs, resolve=True)
    columns = [c for spec in specs.values() if spec["kind"] == "binary" for c in spec.get("columns") or []]

    def arrays(n: int) -> dict[str, np.ndarray]:
        out = {"image": rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)}
        for spec in specs.values():
            kind, key = spec["kind"], spec["key"]
            if kind == "segmentation":
                out[key] = rng.integers(0, spec["num_classes"], (n, height, width)).astype(np.int16)
            elif kind == "depth":
                out[key] = rng.uniform(0.5, 10.0, (n, height, width)).astype(np.float32)
            elif kind == "normal":
                normal = rng.standard_normal((n, height, width, 3)).astype(np.float32)
                out[key] = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
            elif kind == "binary":
                out[key] = rng.integers(0, 2, (n, len(columns)), dtype=np.uint8)
            else:
                raise MtlrunError(f"bench: cannot make random targets of kind {kind!r}")
        return out

    write_dataset(path, cfg.name, {"train": arrays(count), "test": arrays(1)}, source="random (mtlrun.bench)",
                  options={"size": list(size)}, attribute_names=columns or None)
