"""Splits (in memory or read lazily from HDF5), reproducible endless mini-batch streams, moving batches to the device."""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - its exit function must be registered before ours (it runs after)
import os
import signal
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mtlrun.errors import MtlrunError

Batch = dict[str, Tensor]  # "image" plus one target per task name
TargetTransform = Callable[[np.ndarray], np.ndarray]  # from the stored array's rows to the task's target


class SplitSource(Protocol):
    """What a stream and the evaluation read from: a sized split whose samples come as batches."""

    name: str

    def __len__(self) -> int: ...

    def batch(self, index: Tensor) -> Batch: ...


@dataclass
class Split:
    """One split held in memory: uint8 images (N,H,W,3) and each task's targets, indexed by sample."""

    name: str
    images: Tensor
    targets: dict[str, Tensor]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, *self.targets.values()))

    def to(self, device: torch.device) -> Split:
        return Split(self.name, self.images.to(device), {t: v.to(device) for t, v in self.targets.items()})

    def batch(self, index: Tensor) -> Batch:
        out = {"image": self.images[index]}
        out.update({task: target[index] for task, target in self.targets.items()})
        return out


class LazySplit:
    """One split read from the HDF5 file batch by batch instead of held in memory.

    Each process opens its own file handle on first use (h5py handles must not cross a fork), so
    DataLoader workers read in parallel. `targets` maps each task to its stored array and the transform
    that turns that array's rows into the task's target (the same one the in-memory load applies).
    """

    def __init__(self, name: str, path: Path, targets: dict[str, tuple[str, TargetTransform]]) -> None:
        self.name, self.path, self.targets = name, path, targets
        self._file: h5py.File | None = None
        self._pid = -1
        with h5py.File(path, "r") as f:
            self._length = len(f[name]["image"])

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}

    def _group(self) -> h5py.Group:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file[self.name]

    def batch(self, index: Tensor) -> Batch:
        try:
            group = self._group()
            # h5py reads increasing indices only: read them sorted, then put the rows back in the asked order.
            rows, inverse = np.unique(index.numpy(), return_inverse=True)
            arrays = {key: group[key][rows][inverse] for key in {"image", *(k for k, _ in self.targets.values())}}
        except OSError as e:  # the file changed or broke since it was opened and checked
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MtlrunError(
                f"{self.path} is corrupt: reading split '{self.name}' failed ({line}): convert the dataset "
                f"again (or delete the file, for the built-in benchmark)"
            ) from None
        out = {"image": torch.from_numpy(arrays["image"])}
        for task, (key, transform) in self.targets.items():
            out[task] = torch.from_numpy(np.ascontiguousarray(transform(arrays[key])))
        return out


def fits_on_device(needed: int, free: int) -> bool:
    """In-memory splits go to the GPU when they take under half its free memory: the rest is for training."""
    return needed < free / 2


def on_device(splits: dict[str, SplitSource], device: torch.device, setting: object) -> dict[str, SplitSource]:
    """The splits, with the in-memory ones moved to a CUDA `device` when `dataset.in_memory` is true or auto and
    they fit there (`fits_on_device`): batches are then indexed where the model runs, with no copy per step.
    CPU runs, lazy splits and `in_memory=host` stay as they are."""
    held = [s for s in splits.values() if isinstance(s, Split)]
    if device.type != "cuda" or setting not in (True, "auto") or not held:
        return splits
    free, _ = torch.cuda.mem_get_info(device)
    if not fits_on_device(sum(s.nbytes for s in held), free):
        return splits
    return {name: s.to(device) if isinstance(s, Split) else s for name, s in splits.items()}


def eval_batches(split: SplitSource, batch_size: int) -> Iterator[Batch]:
    """The whole split in order, for evaluation."""
    for start in range(0, len(split), batch_size):
        yield split.batch(torch.arange(start, min(start + batch_size, len(split))))


class _ByIndex(torch.utils.data.Dataset):
    """A split as a dataset whose items are whole batches: item = a tensor of sample indices."""

    def __init__(self, split: SplitSource) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: Tensor) -> Batch:
        return self.split.batch(index)


_OPEN_STREAMS: weakref.WeakSet[BatchStream] = weakref.WeakSet()  # streams whose workers may be running


@atexit.register
def _close_open_streams() -> None:
    """End every stream's workers when the process exits. Registered after multiprocessing's own exit
    function (imported above), so it runs before it: that one ends daemon workers with SIGTERM, which
    they ignore, and would then wait for them forever."""
    for stream in list(_OPEN_STREAMS):
        stream.close()


def _leave_stop_signals_to_the_run(worker_id: int) -> None:
    """A scheduler signals every process of the job: workers ignore SIGTERM/SIGUSR1/SIGUSR2 so that the training
    process can finish its iteration and checkpoint (it ends the workers itself); a worker forked inside a
    submitit job must not run submitit's requeue handler either."""
    for stop in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(stop, signal.SIG_IGN)


class BatchStream:
    """Endless shuffled mini-batches of a split.

    Pass p uses the permutation drawn from (seed, p) alone, so the stream is fully described by
    (pass, position) and a resumed run sees exactly the batches an uninterrupted one would, with or
    without workers. Incomplete last batches are dropped, so every step sees `batch_size` images (LibMTL
    drops them too; mtan, Nash-MTL and CAGrad keep them: 1 of NYUv2's 795 images a pass at batch 2).
    With `workers > 0`, a DataLoader of that many processes reads the batches of the current pass ahead
    (each with its own file handle for a lazy split); the order is the same as without.
    `shard` (torchrun's processes): every process draws the same batches of `batch_size` and reads only its
    slice of each.
    """

    def __init__(
        self, split: SplitSource, batch_size: int, seed: int, workers: int = 0, shard: slice | None = None
    ) -> None:
        self.split, self.batch_size, self.seed, self.workers = split, batch_size, seed, workers
        self.shard = shard
        self.batches_per_pass = len(split) // batch_size
        self.pass_index, self.position = 0, 0
        self._reader: Iterator[Batch] | None = None

    def _pass_batches(self, pass_index: int, start: int) -> list[Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        order = torch.randperm(len(self.split), generator=generator)
        b = self.batch_size
        batches = [order[i * b : (i + 1) * b] for i in range(start, self.batches_per_pass)]
        return batches if self.shard is None else [batch[self.shard] for batch in batches]

    def _open_pass(self) -> Iterator[Batch]:
        indices = self._pass_batches(self.pass_index, self.position)
        if self.workers == 0:
            return (self.split.batch(index) for index in indices)
        loader = DataLoader(
            _ByIndex(self.split), sampler=indices, batch_size=None, num_workers=self.workers,
            pin_memory=torch.cuda.is_available(), prefetch_factor=4,
            worker_init_fn=_leave_stop_signals_to_the_run,
        )
        _OPEN_STREAMS.add(self)
        return iter(loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self.position == self.batches_per_pass:
            self.pass_index, self.position, self._reader = self.pass_index + 1, 0, None
        if self._reader is None:
            self._reader = self._open_pass()
        self.position += 1
        return next(self._reader)

    def close(self) -> None:
        """End the reading processes now. They ignore SIGTERM (`_leave_stop_signals_to_the_run`), the signal
        Python's exit would end them with, so a run left holding a reader would wait for them forever."""
        reader, self._reader = self._reader, None
        shutdown = getattr(reader, "_shutdown_workers", None)  # a DataLoader's iterator: its own clean shutdown
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_index, self.position, self._reader = state["pass_index"], state["position"], None


class ToDevice:
    """Moves a batch to the device, turns uint8 images into normalized float tensors there, and applies
    the training augmentation when given one; images leave in channels-last layout when asked."""

    def __init__(
        self, device: torch.device, mean: Sequence[float], std: Sequence[float],
        augment: Callable[[Batch], Batch] | None = None, channels_last: bool = False,
    ) -> None:
        self.device, self.augment = device, augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch: Batch) -> Batch:
        non_blocking = self.device.type == "cuda"
        out = {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}
        image = out["image"].permute(0, 3, 1, 2).to(torch.get_default_dtype())
        out["image"] = ((image - self.mean) / self.std).contiguous()
        for key, value in out.items():
            if value.is_floating_point() and key != "image":
                out[key] = value.to(torch.get_default_dtype())  # float32, or float64 (trainer.dtype)
        if self.augment is not None:
            out = self.augment(out)
        if self.memory_format is torch.channels_last:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out
