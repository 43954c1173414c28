"""The multi-task model shape every architecture shares: one shared encoder, one head per task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch.nn.functional as F
from torch import Tensor, nn


class MultiTaskModel(nn.Module):
    """Shared encoder plus task heads; `forward` runs only the heads it is asked for.

    Dense heads may predict at a lower resolution than the image: their output is upsampled
    bilinearly to the image size here, once for every architecture. A strategy that gives each task its own
    encoder function (Maximum Roaming's channel masks) sets `task_scope`; `forward` then runs the encoder and
    each head once per task, inside `task_scope(task)`.
    """

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module], align_corners: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.align_corners = align_corners  # of the upsampling to the image size, as the reference code has it
        self.task_scope: Callable[[str], AbstractContextManager[None]] | None = None

    def forward(self, image: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        if self.task_scope is None:
            return self.heads_on(self.encoder(image), tasks, image.shape[-2:])
        outputs = {}
        for task in tasks:
            with self.task_scope(task):
                outputs.update(self.heads_on(self.encoder(image), [task], image.shape[-2:]))
        return outputs

    def heads_on(self, features: object, tasks: Sequence[str], size: Sequence[int]) -> dict[str, Tensor]:
        """The outputs of the heads of `tasks` on the encoder's `features`, dense ones at the image `size`."""
        outputs = {}
        for task in tasks:
            out = self.heads[task](features)
            if out.dim() == 4 and tuple(out.shape[-2:]) != tuple(size):
                out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=self.align_corners)
            outputs[task] = out
        return outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [p for p in self.heads[task].parameters() if p.requires_grad]
