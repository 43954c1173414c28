"""Everything a run trains with, built from the composed config after its settings are checked: the data, the
model, the strategy, the optimizer and the batch stream; the device and the seeds."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from mtlrun.constraints import flag, integer
from mtlrun.data import MultiTaskData, open_dataset, task_names
from mtlrun.data.augment import Augment
from mtlrun.data.loading import BatchStream, Split, ToDevice, on_device
from mtlrun.diagnostics import Diagnostics
from mtlrun.errors import MtlrunError
from mtlrun.models import build_model, check_model
from mtlrun.models.base import MultiTaskModel
from mtlrun.optim import MultiTaskOptimizer, OptimizerSettings, lr_factor
from mtlrun.precision import Precision, run_dtype
from mtlrun.run import distributed
from mtlrun.strategies import StepContext, Strategy, build_strategy


@dataclass
class Parts:
    """The objects one run trains with, built from the composed config."""

    data: MultiTaskData
    model: MultiTaskModel
    optimizer: MultiTaskOptimizer
    strategy: Strategy
    batches: BatchStream
    to_device: ToDevice  # for evaluation and diagnostics: no augmentation
    augment: Augment | None
    ctx: StepContext
    precision: Precision


def trainer_settings(cfg: DictConfig) -> dict:
    t = cfg.trainer
    settings = {
        "epochs": t.epochs, "batch_size": t.batch_size, "eval_batch_size": t.eval_batch_size,
        "eval_every": t.eval_every, "stop_after_epochs": t.stop_after_epochs,
        "diagnostics_every": cfg.diagnostics_every, "eval_every_iterations": t.get("eval_every_iterations"),
    }
    for key, value in settings.items():
        if value is None and key in ("stop_after_epochs", "eval_every_iterations"):
            continue
        integer(key if key == "diagnostics_every" else f"trainer.{key}", value, least=1)
    every = t.get("checkpoint_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise MtlrunError(f"trainer.checkpoint_every must be null or an integer >= 1 (iterations), got {every!r}")
    settings["checkpoint_every"] = every
    settings["dtype"] = t.get("dtype", "float32")
    if settings["eval_every_iterations"] is not None and t.eval_every != 1:
        raise MtlrunError(
            f"trainer.eval_every={t.eval_every} (epochs) and trainer.eval_every_iterations="
            f"{settings['eval_every_iterations']} both set a cadence: keep one (eval_every=1 is the default)"
        )
    settings["eval_at_end"] = flag("trainer.eval_at_end", t.get("eval_at_end", True))
    distributed.check_batch_size(t.batch_size)
    if t.progress not in ("auto", True, False):
        raise MtlrunError(f"trainer.progress must be auto, true or false, got {t.progress!r}")
    settings["progress"] = sys.stderr.isatty() if t.progress == "auto" else bool(t.progress)
    if cfg.seed is None or isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise MtlrunError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    settings["deterministic"] = flag("deterministic", cfg.deterministic)
    settings["diagnostics"] = flag("diagnostics", cfg.diagnostics)
    return settings


def build_run(cfg: DictConfig, device: torch.device, epochs: int, batch_size: int) -> Parts:
    """Dataset, model, optimizer, strategy and batch stream; settings are checked before the data is opened."""
    strategy = build_strategy(cfg.strategy, task_names(cfg.dataset), cfg.seed)
    names = strategy.trains(task_names(cfg.dataset))
    optimizer_settings = OptimizerSettings.from_config(cfg.optimizer)
    lr_factor(cfg.scheduler, 0, epochs)
    check_model(cfg.model)
    precision = Precision(cfg.trainer.get("precision", "fp32"), device.type)
    channels_last, compile_ = (
        flag(f"trainer.{key}", cfg.trainer.get(key, False)) for key in ("channels_last", "compile")
    )
    data = open_dataset(cfg.dataset, names)
    data.splits = on_device(data.splits, device, cfg.dataset.get("in_memory", True))
    with run_dtype("float32"):  # a float64 run (trainer.dtype) starts from the float32 run's initial weights
        model = build_model(cfg.model, data.tasks)
    model = model.to(device, torch.get_default_dtype())
    distributed.synchronise_batch_norm(model)  # under torchrun: statistics of the global batch, as one process
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    strategy.attach(model)  # before compiling: the strategy's hooks are part of the graphs
    if compile_:
        compile_model(model, _compile_backend(cfg.trainer))
    optimizer = MultiTaskOptimizer(
        model.shared_parameters(), {t: model.task_parameters(t) for t in names}, optimizer_settings
    )
    workers = cfg.trainer.get("workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise MtlrunError(f"trainer.workers must be an integer >= 0, got {workers!r}")
    train_split = data.splits["train"]
    if isinstance(train_split, Split) and train_split.images.device.type != "cpu":
        workers = 0  # already on the GPU: nothing to read ahead
    shard = distributed.shard(batch_size) if distributed.size() > 1 else None
    batches = BatchStream(data.splits["train"], batch_size, cfg.seed, workers, shard)
    if batches.batches_per_pass == 0:
        raise MtlrunError(f"trainer.batch_size={batch_size} exceeds the {len(data.splits['train'])} training samples")
    augment = _augment(cfg.dataset, data, cfg.seed)
    if augment is not None and shard is not None:
        augment.shard = (shard, distributed.size())
    to_device = ToDevice(device, data.mean, data.std, augment, channels_last)
    ctx = StepContext(model, data.tasks, optimizer, batches, to_device, precision)
    evaluation_to_device = ToDevice(device, data.mean, data.std, channels_last=channels_last)
    return Parts(data, model, optimizer, strategy, batches, evaluation_to_device, augment, ctx, precision)


def _compile_backend(trainer: DictConfig) -> str:
    backend = trainer.get("compile_backend", "inductor")
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise MtlrunError(f"trainer.compile_backend={backend!r} is not a torch.compile backend; known: {', '.join(known)}")
    return backend


def compile_model(model: MultiTaskModel, backend: str = "inductor") -> None:
    """torch.compile the encoder, every task part (an architecture's attention masks, gates, own experts) and
    every head apart, in place (parameter names unchanged): a step on any subset of the tasks runs graphs
    compiled once, never a new graph per subset."""
    model.encoder.compile(backend=backend)
    for module in [*model.task_parts.values(), *model.heads.values()]:
        module.compile(backend=backend)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (recompilations included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _augment(cfg: DictConfig, data: MultiTaskData, seed: int) -> Augment | None:
    """The dataset's training augmentation (`dataset.augment`), or None when it changes nothing."""
    settings = cfg.get("augment") or {}
    augment = Augment(data.tasks, list(settings.get("scales", [1.0])), settings.get("flip", False), seed)
    return augment if augment.active else None


def build_diagnostics(parts: Parts, settings: dict) -> Diagnostics | None:
    """The diagnostics (`diagnostics=true`), probed on the first training batch; None when off."""
    if not settings["diagnostics"]:
        return None
    train = parts.data.splits["train"]
    probe = parts.to_device(train.batch(torch.arange(min(settings["batch_size"], len(train)))))
    return Diagnostics(parts.ctx, probe, settings["diagnostics_every"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some ops the models need have no deterministic kernel (max_unpool2d on the CPU,
        # interpolate's and adaptive pooling's backward on CUDA); they warn instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MtlrunError(f"trainer.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MtlrunError("trainer.device asks for CUDA but this PyTorch sees no GPU: use trainer.device=auto or cpu")
    return device
