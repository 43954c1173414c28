"""Data parallelism over the processes torchrun starts: the process group, the averaged losses and gradients, batch norm over the global batch, and rank 0's say."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from mtlrun.errors import MtlrunError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

T = TypeVar("T")
# A rank waits this long in a collective, e.g. while rank 0 alone evaluates or writes a checkpoint.
TIMEOUT = timedelta(minutes=30)


class _World:
    def __init__(self, rank: int, size: int, local_rank: int) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.synced = True  # False inside `local()`


_world: _World | None = None


def _env_int(key: str) -> int:
    value = os.environ.get(key, "")
    try:
        return int(value)
    except ValueError:
        raise MtlrunError(f"{key}={value!r} in the environment is not an integer (torchrun sets it)") from None


def launched() -> bool:
    """Whether this process is one of several that torchrun started (WORLD_SIZE > 1)."""
    return "WORLD_SIZE" in os.environ and _env_int("WORLD_SIZE") > 1


def init() -> None:
    """Join the process group torchrun's environment describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): gloo for CPU tensors, NCCL for CUDA ones where there is a GPU. Does nothing in a
    single process, which never imports torch.distributed."""
    global _world
    if _world is not None or not launched():
        return
    import torch
    import torch.distributed as dist

    rank, size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)
    _world = _World(rank, size, local_rank)


def close() -> None:
    global _world
    if _world is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
        _world = None


def size() -> int:
    return 1 if _world is None else _world.size


def rank() -> int:
    return 0 if _world is None else _world.rank


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files, evaluates and logs."""
    return _world is None or _world.rank == 0


def active() -> bool:
    """Whether losses, gradients and batch norm statistics are reduced across processes now."""
    return _world is not None and _world.synced


@contextmanager
def local() -> Iterator[None]:
    """Nothing is reduced inside the block (the diagnostics' probe: every rank computes it alike)."""
    if _world is None:
        yield
        return
    before, _world.synced = _world.synced, False
    try:
        yield
    finally:
        _world.synced = before


def device(name: torch.device) -> torch.device:
    """The device of this rank: its own GPU (LOCAL_RANK) where `name` is CUDA."""
    import torch

    if _world is None or name.type != "cuda":
        return name
    if name.index is not None:
        raise MtlrunError(
            f"trainer.device={name} names one GPU, but torchrun started {_world.size} processes: each takes the "
            f"GPU of its LOCAL_RANK; give trainer.device=auto or cuda (and CUDA_VISIBLE_DEVICES to choose GPUs)"
        )
    return torch.device("cuda", torch.cuda.current_device())


def check_batch_size(batch_size: int) -> None:
    if batch_size % size():
        raise MtlrunError(
            f"trainer.batch_size={batch_size} is the global batch, split evenly over the {size()} processes torchrun "
            f"started: make it a multiple of {size()}"
        )


def shard(count: int) -> slice:
    """This rank's part of `count` items split evenly (`count` a multiple of the world size)."""
    part = count // size()
    return slice(rank() * part, (rank() + 1) * part)


def average(tensors: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
    """The tensors averaged over the ranks, in one all-reduce (None stays None: every rank has the same ones)."""
    import torch
    import torch.distributed as dist

    if not active():
        return tuple(tensors)
    present = [t for t in tensors if t is not None]
    if not present:
        return tuple(tensors)
    buffer = torch.cat([t.reshape(-1) for t in present])
    dist.all_reduce(buffer)
    buffer /= size()
    parts = iter(buffer.split([t.numel() for t in present]))
    return tuple(None if t is None else next(parts).view_as(t) for t in tensors)


def summed(tensor: Tensor) -> Tensor:
    """`tensor` summed over the ranks (a new tensor)."""
    import torch.distributed as dist

    if not active():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def global_losses(losses: dict[str, Tensor], counts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each loss with the value of the global batch's loss and a gradient that, averaged over the ranks, is the
    global batch's gradient: a loss averaging `counts[t]` values on this rank (valid pixels, samples) weighs by
    its share of all ranks' values, so masked means are exact too; a method reading loss values sees the global
    ones, and its gradients are the global batch's also through a weighting nonlinear in the losses."""
    import torch

    if not active() or not losses:
        return losses
    names = list(losses)
    local_counts = torch.stack([counts[t].to(torch.get_default_dtype()) for t in names])
    sums = torch.stack([losses[t].detach() for t in names]) * local_counts
    (total,) = average([torch.cat([sums, local_counts])])
    total_sums, total_counts = total.split(len(names))
    values = total_sums / total_counts.clamp(min=torch.finfo(total.dtype).tiny)
    shares = local_counts / total_counts.clamp(min=torch.finfo(total.dtype).tiny)  # W n_r / N: its mean over the ranks is 1
    return {
        t: values[i] + shares[i] * (losses[t] - losses[t].detach()) for i, t in enumerate(names)
    }


def agreed_signal(received: int | None) -> int | None:
    """A stop signal any rank received (the largest number), so that every rank stops at the same iteration."""
    import torch
    import torch.distributed as dist

    if _world is None:
        return received
    flag = torch.tensor([received or 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) or None


def from_rank0(work: Callable[[], T]) -> T:
    """`work()` run on rank 0 alone (the only process: run as is), its result sent to every rank; its MtlrunError
    is raised on every rank, so a refusal ends them all with the same line."""
    if _world is None:
        return work()
    import torch.distributed as dist

    message: list = [None]
    if _world.rank == 0:
        try:
            message = [("ok", work())]
        except MtlrunError as e:
            message = [("error", str(e))]
        except BaseException as e:
            message = [("error", f"rank 0 failed: {type(e).__name__}: {e}")]
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    kind, value = message[0]
    if kind == "error":
        raise MtlrunError(value)
    return value


def synchronise_batch_norm(model: nn.Module) -> None:
    """Make every batch norm layer of `model` normalise by the statistics of the global batch while training
    (in place: names, parameters and buffers unchanged), so the running statistics match a single process too."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if _world is None:
        return
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, _GlobalBatchNorm):
            module.__class__ = _global_class(type(module))


class _GlobalBatchNorm:
    """Batch norm over the global batch: each rank's per-channel mean and summed squared deviations, gathered in
    one differentiable all-reduce and combined exactly (Chan et al.'s parallel variance); the gradient flows back
    through every rank's statistics as through one batch's."""

    def forward(self, x: Tensor) -> Tensor:
        import torch
        import torch.distributed.nn.functional as dist_nn

        from mtlrun.precision import full

        if not (self.training and active()):
            return super().forward(x)  # evaluation: rank 0 alone, as one process would
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        values = full(x)  # autocast's half-precision activations: statistics in full precision
        count = values.numel() // values.shape[1]  # per rank; every rank holds an equal part of the batch
        mean = values.mean(dims)
        deviations = ((values - mean.view(shape)) ** 2).sum(dims)
        slots = [torch.zeros_like(torch.stack([mean, deviations])) for _ in range(size())]
        slots[rank()] = torch.stack([mean, deviations])
        gathered = dist_nn.all_reduce(torch.stack(slots))
        means, squares = gathered[:, 0], gathered[:, 1]
        global_mean = means.mean(0)
        total = count * size()
        variance = (squares.sum(0) + count * ((means - global_mean) ** 2).sum(0)) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - factor).add_(global_mean.detach(), alpha=factor)
                unbiased = variance.detach() * total / max(total - 1, 1)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        out = (values - global_mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


_global_classes: dict[type, type] = {}


def _global_class(cls: type) -> type:
    if cls not in _global_classes:
        _global_classes[cls] = type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {})
    return _global_classes[cls]
