"""Models by name: the table from `model=<name>` to the function that builds it for a task list."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from mtlrun.errors import MtlrunError
from mtlrun.models import celeba_cnn, convnet, resnet, segnet, unet
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task

MODELS: dict[str, Callable[..., MultiTaskModel]] = {
    "convnet": convnet.build,
    "segnet_split": segnet.build_split,
    "segnet_mtan": segnet.build_mtan,
    "resnet50_dilated": resnet.build_resnet50_dilated,
    "resnet18_multihead": resnet.build_resnet18_multihead,
    "unet": unet.build,
    "celeba_cnn": celeba_cnn.build,
}


def build_model(cfg: DictConfig, tasks: list[Task]) -> MultiTaskModel:
    """Build `cfg.name` with the remaining keys of its config as keyword arguments."""
    if cfg.name not in MODELS:
        raise MtlrunError(f"no model named {cfg.name!r}; known: {', '.join(sorted(MODELS))}")
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    return MODELS[cfg.name](tasks, **kwargs)
