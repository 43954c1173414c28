"""Training-time augmentation on the device: mtan's random scale-crop and the horizontal flip."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrun.data.loading import Batch
from mtlrun.errors import MtlrunError
from mtlrun.settings import AugmentSettings
from mtlrun.tasks import BinaryMaps, Depth, Normal, Segmentation, Task


class Augment:
    """Random scale-crop and horizontal flip of a batch already on the device, aligned across every target.

    Scale-crop as mtan's `RandomScaleCrop` (Liu et al. 2019, used unchanged by Nash-MTL, CAGrad and FAMO): per
    sample a scale s drawn uniformly from `scales`, a crop of (int(H/s), int(W/s)) pixels at a uniform
    position, resized back to (H, W): image and normals bilinearly (align_corners=True, as mtan), labels
    and depth by nearest neighbour, and depth divided by s (the scene seen s times closer). Flip: with
    probability 1/2 per sample, left-right, negating the normals' x component (channel 0), as mtan's loader.
    Per-image targets are left as they are.
    The random draws come from the augmentation's own generator (on the CPU, checkpointed with the run), so
    a resumed run crops exactly as an uninterrupted one, whatever the device. With `shard` (torchrun's
    processes, each holding its slice of the global batch) the draws are made for the global batch and each
    process uses its slice of them: the crops are a single process's.
    """

    def __init__(self, tasks: Sequence[Task], scales: Sequence[float], flip: bool, seed: int) -> None:
        self.scales = AugmentSettings.check("scales", list(scales))
        self.flip = bool(flip)
        self.kinds = {t.name: _kind(t) for t in tasks}
        self.generator = torch.Generator().manual_seed(seed)
        self.shard: tuple[slice, int] | None = None  # (this process's slice, the number of processes)

    @property
    def active(self) -> bool:
        return self.flip or any(s != 1 for s in self.scales)

    def __call__(self, batch: Batch) -> Batch:
        n, _, height, width = batch["image"].shape
        part, processes = self.shard if self.shard is not None else (slice(0, n), 1)
        scale_index = torch.randint(len(self.scales), (n * processes,), generator=self.generator)[part]
        # float32 draws whatever the run's dtype: a float64 run (trainer.dtype) crops as its float32 twin
        corners = torch.rand(n * processes, 2, generator=self.generator, dtype=torch.float32)[part]
        flips = (torch.rand(n * processes, generator=self.generator, dtype=torch.float32) < 0.5)[part]
        out = dict(batch)
        if any(self.scales[i] != 1 for i in scale_index.tolist()):
            samples = [
                self._scale_crop({k: v[i] for k, v in batch.items()}, self.scales[s], corners[i], height, width)
                for i, s in enumerate(scale_index.tolist())
            ]
            out = {k: torch.stack([s[k] for s in samples]) for k in batch}
        if self.flip and flips.any():
            out = self._flip(out, flips.to(out["image"].device))
        return out

    def _scale_crop(self, sample: dict[str, Tensor], scale: float, corner: Tensor, height: int, width: int) -> dict:
        h, w = int(height / scale), int(width / scale)
        i, j = int(corner[0] * (height - h + 1)), int(corner[1] * (width - w + 1))
        out = {"image": _resize(sample["image"][:, i : i + h, j : j + w], height, width, "bilinear")}
        for name, kind in self.kinds.items():
            target = sample[name]
            if kind == "label":
                crop = target[i : i + h, j : j + w][None].float()
                out[name] = _resize(crop, height, width, "nearest")[0].to(target.dtype)
            elif kind == "depth":
                # Zooming in by s brings the scene s times nearer: depth / s. Cityscapes stores disparity, which
                # would scale by s instead; mtan's and CAGrad's Cityscapes code divides it too, and so do we,
                # to train as the published numbers were trained.
                out[name] = _resize(target[i : i + h, j : j + w][None], height, width, "nearest")[0] / scale
            elif kind == "normal":
                out[name] = _resize(target[:, i : i + h, j : j + w], height, width, "bilinear")
            else:
                out[name] = target
        return out

    def _flip(self, batch: Batch, flips: Tensor) -> Batch:
        out = {"image": _where(flips, batch["image"].flip(-1), batch["image"])}
        for name, kind in self.kinds.items():
            target = batch[name]
            if kind == "image_level":
                out[name] = target
                continue
            flipped = target.flip(-1)
            if kind == "normal":
                flipped = torch.cat([-flipped[:, :1], flipped[:, 1:]], dim=1)
            out[name] = _where(flips, flipped, target)
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())  # a checkpoint loaded onto a GPU holds CUDA tensors


def _kind(task: Task) -> str:
    if isinstance(task, (Segmentation, BinaryMaps)):  # a binary map's target is the label map it is cut from
        return "label"
    if isinstance(task, Depth):
        return "depth"
    if isinstance(task, Normal):
        return "normal"
    if task.dense:
        raise MtlrunError(f"task '{task.name}' is dense, and augmentation does not know how to move its target")
    return "image_level"


def _resize(x: Tensor, height: int, width: int, mode: str) -> Tensor:
    align = {"align_corners": True} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=(height, width), mode=mode, **align)[0]


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)
