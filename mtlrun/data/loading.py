"""In-memory splits, reproducible endless mini-batch streams, and moving batches to the device."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

Batch = dict[str, Tensor]  # "image" plus one target per task name


@dataclass
class Split:
    """One split held in memory: uint8 images (N,H,W,3) and each task's targets, indexed by sample."""

    name: str
    images: Tensor
    targets: dict[str, Tensor]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: Tensor) -> Batch:
        out = {"image": self.images[index]}
        out.update({task: target[index] for task, target in self.targets.items()})
        return out

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """The whole split in order, for evaluation."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))


class BatchStream:
    """Endless shuffled mini-batches of a split.

    Pass p uses the permutation drawn from (seed, p) alone, so the stream is fully described by
    (pass, position) and a resumed run sees exactly the batches an uninterrupted one would.
    Incomplete last batches are dropped, as the averaged baselines of the literature do.
    """

    def __init__(self, split: Split, batch_size: int, seed: int) -> None:
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.batches_per_pass = len(split) // batch_size
        self.pass_index, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, pass_index: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        return torch.randperm(len(self.split), generator=generator)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self.position == self.batches_per_pass:
            self.pass_index, self.position = self.pass_index + 1, 0
            self._order = self._permutation(self.pass_index)
        start = self.position * self.batch_size
        self.position += 1
        return self.split.batch(self._order[start : start + self.batch_size])

    def state_dict(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_index, self.position = state["pass_index"], state["position"]
        self._order = self._permutation(self.pass_index)


class ToDevice:
    """Moves a batch to the device and turns uint8 images into normalized float tensors there."""

    def __init__(self, device: torch.device, mean: list[float], std: list[float]) -> None:
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch: Batch) -> Batch:
        non_blocking = self.device.type == "cuda"
        out = {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}
        image = out["image"].permute(0, 3, 1, 2).float()
        out["image"] = ((image - self.mean) / self.std).contiguous()
        for key, value in out.items():
            if value.is_floating_point() and key != "image":
                out[key] = value.float()
        return out
