"""Models by name: the table from `model=<name>` to the function that builds it for a task list."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from omegaconf import DictConfig

from mtlrun.errors import MtlrunError
from mtlrun.settings import MODEL_SIZES
from mtlrun.settings.declare import plain
from mtlrun.models import (
    celeba_cnn,
    cgc,
    convnet,
    cross_stitch,
    dselect_k,
    hps,
    ltb,
    mmoe,
    mtan,
    ple,
    resnet,
    segnet,
    unet,
)
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
# Architectures over a chosen backbone (`model/backbone=`): how the network is shared between tasks.
ARCHITECTURES: dict[str, Callable[..., MultiTaskModel]] = {
    "hps": hps.build,
    "cross_stitch": cross_stitch.build,
    "mtan": mtan.build,
    "mmoe": mmoe.build,
    "cgc": cgc.build,
    "ple": ple.build,
    "dselect_k": dselect_k.build,
    "ltb": ltb.build,
}
MODELS.update(ARCHITECTURES)


def build_model(cfg: DictConfig, tasks: list[Task]) -> MultiTaskModel:
    """Build `cfg.name` with the remaining keys of its config as keyword arguments."""
    check_model(cfg)
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    return MODELS[cfg.name](tasks, **kwargs)


def check_model(cfg: DictConfig) -> None:
    """The model's settings, checked before any data is read: a known model, keys its builder takes, and
    channel counts (width, filters) and pooled sizes that are positive integers."""
    if cfg.name not in MODELS:
        raise MtlrunError(f"no model named {cfg.name!r}; known: {', '.join(sorted(MODELS))}")
    parameters = inspect.signature(MODELS[cfg.name]).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    settings = [k for k in parameters if k != "tasks"]
    for key, value in cfg.items():
        if key != "name" and key not in parameters and not takes_any:
            raise MtlrunError(
                f"model.{key} is not a setting of model {cfg.name}; its settings: {', '.join(settings)}"
            )
        if key in MODEL_SIZES:
            MODEL_SIZES[key](f"model.{key}", plain(value))
