"""A tiny run of the built-in benchmark composed in process: epochs of 8 iterations (32 images, batches of 4)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes

RUN = ["dataset.image_size=32", "dataset.num_train=32", "dataset.num_val=8", "dataset.num_test=8",
       "trainer.batch_size=4", "trainer.eval_batch_size=8", "model.width=4", "trainer.epochs=2"]


def tiny_data(root: Path) -> Path:
    """`root` holding the benchmark file RUN reads."""
    build_shapes(root / "shapes-32px-32-8-8-seed0.h5", 32, 32, 8, 8, generator_seed=0)
    return root


def tiny_config(data_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*RUN, f"data_dir={data_dir}", *overrides])
