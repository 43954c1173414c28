"""Typed settings: one frozen dataclass per config group, built once from the composed config; each field's
constraint is declared beside it, and every default is stated only in conf/ (the YAML the user reads)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError
from mtlrun.settings.declare import (
    Choice,
    Flag,
    Group,
    Integer,
    Number,
    Numbers,
    Pair,
    Text,
    declared,
    option_defaults,
)

# The keys outside a run's identity, stated once: conf/config.yaml's list of keys left out of run directory
# names. They change how a run is executed or reported, or where it reads and writes, not what it computes.
RUN_CONTROL_KEYS: tuple[str, ...] = tuple(
    OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
# What the identity hashes (config_id, resume_id) leave out. data_dir stays in: the hash holds the resolved
# dataset.path, which holds data_dir, since mtlrun cannot tell two paths hold the same file; leaving the
# key itself out too would guard nothing more and change every id saved so far.
IDENTITY_IGNORES: tuple[str, ...] = tuple(k for k in RUN_CONTROL_KEYS if k != "data_dir")


LOSS_SUM = "loss_sum"
SPLITS = ("val", "test")


def check_objective(key: object) -> str:
    """`objective` names what a run reports to an optimizing sweeper: `<split>/loss_sum` or a metric column
    of results.csv, `<split>/<task>/<metric>`, with split val (or test)."""
    parts = key.split("/") if isinstance(key, str) else []
    if not (len(parts) == 2 and parts[1] == LOSS_SUM or len(parts) == 3 and all(parts)) or parts[0] not in SPLITS:
        raise MtlrunError(
            f"objective must be val/{LOSS_SUM} (the sum of the tasks' validation losses) or a metric of "
            f"results.csv such as val/segmentation/miou, got {key!r}"
        )
    return key


def _objective(key: str, value: object) -> object:
    return check_objective(value)


@dataclass(frozen=True)
class RunSettings(Group):
    """The top-level keys of conf/config.yaml."""

    GROUP, PREFIX = "", ""
    seed: int = declared(Integer(0))
    deterministic: bool = declared(Flag)
    resume: bool = declared(Flag)
    overwrite: bool = declared(Flag)
    data_dir: str = declared(Text)
    output_root: str = declared(Text)
    diagnostics: bool = declared(Flag)
    diagnostics_every: int = declared(Integer(1))
    objective: str = declared(_objective)


BUDGET_UNITS = ("backward_passes", "optimizer_steps", "forward_passes", "images", "seconds")


def _budget_unit(key: str, value: object) -> object:
    if value not in BUDGET_UNITS:
        raise MtlrunError(f"{key} must be one of {', '.join(BUDGET_UNITS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainerSettings(Group):
    """`trainer.*`: epochs, batches, evaluation cadence, device, precision, checkpoints."""

    GROUP, PREFIX = "trainer", "trainer."
    epochs: int = declared(Integer(1))
    batch_size: int = declared(Integer(1))
    eval_batch_size: int = declared(Integer(1))
    eval_every: int = declared(Integer(1))
    eval_every_iterations: int | None = declared(Integer(1, nullable=True))
    eval_at_end: bool = declared(Flag)
    device: str = declared(Text)  # read by pick_device, which knows the devices
    progress: object = declared(Choice(("auto", True, False), form="or", spelled=("auto", "true", "false")))
    stop_after_epochs: int | None = declared(Integer(1, nullable=True))
    workers: int = declared(Integer(0))
    dtype: str = declared(Choice(("float32", "float64")))
    precision: str = declared(Choice(("fp32", "bf16", "fp16")))
    channels_last: bool = declared(Flag)
    compile: bool = declared(Flag)
    compile_backend: str = declared(Text)  # checked against torch.compile's list where torch is loaded
    checkpoint_every: int | None = declared(Integer(1, nullable=True, unit="iterations"))
    budget: float | None = declared(Text)  # a number > 0 or null, said in budget_unit: check_together
    budget_unit: str = declared(_budget_unit)

    def check_together(self, prefix: str) -> None:
        amount = self.budget
        if amount is not None and (
            not isinstance(amount, (int, float)) or isinstance(amount, bool) or not math.isfinite(amount) or amount <= 0
        ):
            raise MtlrunError(f"trainer.budget must be null or a number > 0 (in trainer.budget_unit="
                              f"{self.budget_unit}), got {amount!r}")
        if self.eval_every_iterations is not None and self.eval_every != 1:
            raise MtlrunError(
                f"trainer.eval_every={self.eval_every} (epochs) and trainer.eval_every_iterations="
                f"{self.eval_every_iterations} both set a cadence: keep one (eval_every=1 is the default)"
            )


OPTIMIZERS = ("adam", "adamw", "sgd")
_ADAM, _SGD = option_defaults("optimizer", "adam"), option_defaults("optimizer", "sgd")
_UNIT = Number("in [0, 1)")


@dataclass(frozen=True)
class OptimizerSettings(Group):
    """`optimizer.*`. A config's missing key takes its option's YAML value; code building settings directly
    gets the default option's (adam.yaml; sgd.yaml for SGD's own keys)."""

    GROUP, PREFIX = "optimizer", "optimizer."
    name: str = declared(Choice(OPTIMIZERS, form="unknown", example="adam"))
    lr: float = declared(Number("> 0"))
    weight_decay: float = declared(Number(">= 0"), default=_ADAM["weight_decay"])
    betas: tuple[float, float] = declared(Pair(_UNIT, "in [0, 1), e.g. [0.9,0.999],"),
                                          default=tuple(_ADAM["betas"]))
    eps: float = declared(Number("> 0"), default=_ADAM["eps"])
    momentum: float = declared(_UNIT, default=0.0)  # no momentum: plain SGD (sgd.yaml chooses 0.9)
    nesterov: bool = declared(Flag, default=_SGD["nesterov"])
    moments: str = declared(Choice(("per_task", "shared"), example="per_task"), default=_ADAM["moments"])
    eps_placement: str = declared(Choice(("modern", "kingma"), example="modern"),
                                  default=_ADAM["eps_placement"])
    idle_params: str = declared(Choice(("skip", "step"), example="skip"), default=_ADAM["idle_params"])

    def check_together(self, prefix: str) -> None:
        if self.eps_placement == "kingma" and self.name != "adam":
            raise MtlrunError(
                f"optimizer.eps_placement=kingma (PyTorch 1.2's Adam arithmetic) applies to optimizer=adam "
                f"only; with optimizer={self.name} leave optimizer.eps_placement=modern"
            )


@dataclass(frozen=True)
class SchedulerSettings(Group):
    """`scheduler.*`: each key belongs to one option (null under the others)."""

    GROUP, PREFIX = "scheduler", "scheduler."
    name: str = declared(Choice(("none", "step", "cosine"), form="unknown", example="step"))
    step_size: int | None = declared(Integer(1, unit="epochs"))
    gamma: float | None = declared(Number("> 0", finite=False))
    min_factor: float | None = declared(Number("in [0, 1]", finite=False))


LOGGERS = ("csv", "mlflow", "tensorboard", "wandb")


@dataclass(frozen=True)
class TensorBoardSettings(Group):
    """`logger.tensorboard.*` (conf/logger/tensorboard.yaml)."""

    GROUP, PREFIX = "logger", "logger.tensorboard."
    subdir: str = declared(Text)


@dataclass(frozen=True)
class LoggerSettings:
    """`logger`: the loggers chosen (`logger=[csv,mlflow]`), each option's settings under its own name; the
    trackers' nodes (wandb, mlflow) are checked where they start (mtlrun/trackers.py), which knows their APIs."""

    names: tuple[str, ...]
    tensorboard: TensorBoardSettings | None

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> LoggerSettings:
        names = tuple(str(name) for name in cfg) if cfg else ()
        for name in names:
            if name not in LOGGERS:
                raise MtlrunError(
                    f"logger {name!r} is unknown; valid: {', '.join(LOGGERS)} (several: logger=[csv,mlflow])"
                )
        board = None
        if "tensorboard" in names:
            defaults = option_defaults("logger", "tensorboard")["tensorboard"]
            board = TensorBoardSettings.from_config(cfg["tensorboard"], defaults=defaults)
        return cls(names, board)


_SHAPES = option_defaults("dataset", "shapes")
MIN_IMAGE_SIZE = 8  # the built-in convnet halves the image three times


@dataclass(frozen=True)
class AugmentSettings(Group):
    """`dataset.augment.*`; a dataset without the node trains unaugmented (shapes.yaml's values)."""

    GROUP, PREFIX = "dataset", "dataset.augment."
    scales: list[float] = declared(Numbers(None, "the scale-crop factors drawn from", least=1,
                                           example="[1.0,1.2,1.5]"))
    flip: bool = declared(Flag)

    @classmethod
    def of(cls, value: object) -> AugmentSettings:
        return cls.from_config(value or {}, defaults=_SHAPES["augment"])


IMAGE_CHANNELS = 3  # every dataset file stores RGB images (hdf5.py's schema)
_CHANNELS = "one per input channel (R, G, B)"


@dataclass(frozen=True)
class DatasetSettings(Group):
    """`dataset.*` every dataset has; its tasks (`tasks`, `task_specs`, `binary_maps`) are checked against
    each other by mtlrun.data.task_specs."""

    GROUP, PREFIX = "dataset", "dataset."
    name: str = declared(Text)  # mtlrun.data.DATASETS says which exist
    path: str = declared(Text)
    mean: list[float] = declared(Numbers(IMAGE_CHANNELS, _CHANNELS, example="[0.5,0.5,0.5]"))
    std: list[float] = declared(Numbers(IMAGE_CHANNELS, _CHANNELS, above=0, example="[0.25,0.25,0.25]"))
    in_memory: object = declared(Choice(("auto", True, "host", False), form="one_of",
                                        spelled=("auto", "true", "host", "false")))
    augment: AugmentSettings = declared(lambda key, value: AugmentSettings.of(value))
    tasks: list[str] | None = declared(Text)
    binary_maps: str | None = declared(Choice((None, "per_class", "joint")))
    delta_m_metrics: list[str] | None = declared(Text)
    task_specs: dict = declared(Text)


@dataclass(frozen=True)
class ShapesSettings(Group):
    """The built-in benchmark's own `dataset.*` keys (dataset=shapes), checked before it is generated."""

    GROUP, PREFIX = "dataset", "dataset."
    image_size: int = declared(Integer(MIN_IMAGE_SIZE))
    num_train: int = declared(Integer(1))
    num_val: int = declared(Integer(0))
    num_test: int = declared(Integer(1))
    generator_seed: int = declared(Integer(0))


def _positive_integers(key: str, value: object) -> object:
    counts = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in counts):
        raise MtlrunError(f"{key} must be positive integers, got {value!r}")
    return value


# The channel counts and sizes any model may take, each declared once (the builders' signatures say the rest).
MODEL_SIZES = {"width": Integer(1), "filters": _positive_integers, "pooled_size": Integer(1)}


@dataclass(frozen=True)
class Settings:
    """Every group's settings of one run. Models and strategies take theirs as keyword arguments checked
    against their builders' and constructors' signatures (mtlrun.models.check_model, build_strategy)."""

    run: RunSettings
    trainer: TrainerSettings
    dataset: DatasetSettings
    optimizer: OptimizerSettings
    scheduler: SchedulerSettings
    logger: LoggerSettings

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        """Every group checked at once: a run builds this once, at its start, and hands the groups down."""
        chosen = cfg.get("logger")  # `logger=[]` composes to an empty list, no logger key to none
        return cls(
            RunSettings.from_config(cfg), TrainerSettings.from_config(cfg.trainer),
            DatasetSettings.from_config(cfg.dataset), OptimizerSettings.from_config(cfg.optimizer),
            SchedulerSettings.from_config(cfg.scheduler),
            LoggerSettings.from_config(chosen if isinstance(chosen, DictConfig) else None),
        )
