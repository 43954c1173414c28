"""Everything a run trains with, built from the composed config after its settings are checked: the data, the
model, the strategy, the optimizer and the batch stream; the device and the seeds."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from mtlrun.data import MultiTaskData, open_dataset, task_names
from mtlrun.data.augment import Augment
from mtlrun.data.loading import BatchStream, Split, ToDevice, on_device
from mtlrun.diagnostics import Diagnostics
from mtlrun.errors import MtlrunError
from mtlrun.models import build_model, check_model
from mtlrun.models.base import MultiTaskModel
from mtlrun.optim import MultiTaskOptimizer
from mtlrun.precision import Precision, run_dtype
from mtlrun.run import distributed
from mtlrun.settings import AugmentSettings, Settings
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


def trainer_settings(settings: Settings) -> dict:
    """The top-level and trainer settings the loop reads (checked by their declarations: Settings.from_config),
    with the batch size checked against the processes and `progress` decided."""
    run, trainer = settings.run, settings.trainer
    distributed.check_batch_size(trainer.batch_size)
    progress = sys.stderr.isatty() if trainer.progress == "auto" else bool(trainer.progress)
    return {**asdict(run), **asdict(trainer), "progress": progress}


def build_run(
    cfg: DictConfig, device: torch.device, epochs: int, batch_size: int, settings: Settings | None = None,
) -> Parts:
    """Dataset, model, optimizer, strategy and batch stream; settings are checked before the data is opened.
    `settings`: the run's, checked once at its start (a program's own call leaves it out: checked here).

    The typed groups (`settings`) say everything declared; `cfg` stays for the nodes that are open by design:
    the strategy's and the model's keyword arguments, checked against their constructors' and builders'
    signatures (mtlrun.constraints, check_model), and the dataset's task specs and file options."""
    settings = settings or Settings.from_config(cfg)
    strategy = build_strategy(cfg.strategy, task_names(cfg.dataset), settings.run.seed)
    names = strategy.trains(task_names(cfg.dataset))
    check_model(cfg.model)
    trainer = settings.trainer
    precision = Precision(trainer.precision, device.type)
    channels_last, compile_ = trainer.channels_last, trainer.compile
    data = open_dataset(cfg.dataset, names, settings=settings.dataset)
    data.splits = on_device(data.splits, device, settings.dataset.in_memory)
    with run_dtype("float32"):  # a float64 run (trainer.dtype) starts from the float32 run's initial weights
        model = build_model(cfg.model, data.tasks)
    model = model.to(device, torch.get_default_dtype())
    distributed.synchronise_batch_norm(model)  # under torchrun: statistics of the global batch, as one process
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    strategy.attach(model)  # before compiling: the strategy's hooks are part of the graphs
    if compile_:
        compile_model(model, _compile_backend(trainer.compile_backend))
    optimizer = MultiTaskOptimizer(
        model.shared_parameters(), {t: model.task_parameters(t) for t in names}, settings.optimizer
    )
    workers = trainer.workers
    train_split = data.splits["train"]
    if isinstance(train_split, Split) and train_split.images.device.type != "cpu":
        workers = 0  # already on the GPU: nothing to read ahead
    shard = distributed.shard(batch_size) if distributed.size() > 1 else None
    batches = BatchStream(data.splits["train"], batch_size, settings.run.seed, workers, shard)
    if batches.batches_per_pass == 0:
        raise MtlrunError(f"trainer.batch_size={batch_size} exceeds the {len(data.splits['train'])} training samples")
    augment = _augment(settings.dataset.augment, data, settings.run.seed)
    if augment is not None and shard is not None:
        augment.shard = (shard, distributed.size())
    to_device = ToDevice(device, data.mean, data.std, augment, channels_last)
    ctx = StepContext(model, data.tasks, optimizer, batches, to_device, precision)
    evaluation_to_device = ToDevice(device, data.mean, data.std, channels_last=channels_last)
    return Parts(data, model, optimizer, strategy, batches, evaluation_to_device, augment, ctx, precision)


def _compile_backend(backend: str) -> str:
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


def _augment(settings: AugmentSettings, data: MultiTaskData, seed: int) -> Augment | None:
    """The dataset's training augmentation (`dataset.augment`), or None when it changes nothing."""
    augment = Augment(data.tasks, settings.scales, settings.flip, seed)
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
        if torch.are_deterministic_algorithms_enabled():  # the call alone imports torch's compiler (~2 s of start-up)
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
