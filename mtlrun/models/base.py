"""The multi-task model shape every architecture shares: a shared encoder, task-specific parts, one head per task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch.nn.functional as F
from torch import Tensor, nn

from mtlrun.errors import MtlrunError


class MultiTaskModel(nn.Module):
    """Shared encoder plus task heads; `forward` runs only the heads it is asked for.

    A task may own a part of the network besides its head (`task_parts[task]`: attention masks, gates,
    its own experts or branches): it maps the encoder's output to the features that task's head reads,
    so the head's input may depend on the task. Parameters are shared exactly when they are the
    encoder's; a task's are those of its part and head. A part may run shared modules that the encoder
    owns (held without registering them), never another task's.
    Dense heads may predict at a lower resolution than the image: their output is upsampled
    bilinearly to the image size here, once for every architecture. A strategy that gives each task its own
    encoder function (Maximum Roaming's channel masks) sets `task_scope`; `forward` then runs the encoder and
    each head once per task, inside `task_scope(task)`.
    """

    def __init__(
        self, encoder: nn.Module, heads: dict[str, nn.Module], align_corners: bool = False,
        task_parts: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        # of the upsampling to the image size, as the reference code has it
        self.align_corners = align_corners
        self.task_scope: Callable[[str], AbstractContextManager[None]] | None = None
        self.task_parts = nn.ModuleDict(task_parts or {})
        self.no_representation: str | None = None  # why MGDA-UB has no representation here, where it has none

    def forward(self, image: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        if self.task_scope is None:
            return self.heads_on(self.encoder(image), tasks, image.shape[-2:])
        outputs = {}
        for task in tasks:
            with self.task_scope(task):
                outputs.update(self.heads_on(self.encoder(image), [task], image.shape[-2:]))
        return outputs

    def heads_on(self, features: object, tasks: Sequence[str], size: Sequence[int]) -> dict[str, Tensor]:
        """The outputs of `tasks` (their parts, then their heads) on the encoder's `features`, dense ones at
        the image `size`."""
        outputs = {}
        for task in tasks:
            own = self.task_parts[task](features) if task in self.task_parts else features
            out = self.heads[task](own)
            if out.dim() == 4 and tuple(out.shape[-2:]) != tuple(size):
                out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=self.align_corners)
            outputs[task] = out
        return outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        modules = [self.task_parts[task]] if task in self.task_parts else []
        return [p for m in [*modules, self.heads[task]] for p in m.parameters() if p.requires_grad]

    def representation(self, features: object) -> list[Tensor]:
        """The encoder's output as the one shared representation z that MGDA-UB differentiates: a tensor, or
        a tuple, list or dict holding exactly one tensor that needs a gradient. Every shared parameter must
        act before z and only task parameters after it; a model for which that fails refuses here.

        An encoder handing its heads several features computed from one another (segnet_mtan's 20 maps) has
        no single representation: the gradient with respect to each would count the paths through the later
        ones again, so that case is refused rather than computed wrongly; so is every model that sets
        `no_representation` (the reason, in one line).
        """
        if self.no_representation:
            raise MtlrunError(
                f"strategy.rep_grad=true (MGDA-UB) cannot run on this model: {self.no_representation}"
            )
        if isinstance(features, Tensor):
            return [features]
        values = features.values() if isinstance(features, dict) else features
        found = [f for f in values if isinstance(f, Tensor) and f.requires_grad] if values is not None else []
        if not found:
            raise MtlrunError("strategy.rep_grad=true needs the encoder's output of the step's forward pass")
        if len(found) > 1:
            raise MtlrunError(
                f"strategy.rep_grad=true (MGDA-UB) needs a model whose encoder gives its heads one representation; "
                f"this one gives {len(found)} feature maps (e.g. segnet_mtan): use strategy.rep_grad=false or "
                f"another model (segnet_split, resnet50_dilated, resnet18_multihead, convnet)"
            )
        return found

    def penalties(self) -> dict[str, Tensor]:
        """Regularisers of task parts from the last training forward pass (DSelect-k's gates), by task. They
        are no part of the task losses: `StepContext` adds each once to the step on its task."""
        return {}

    def schedule(self, epoch: int, epochs: int) -> None:
        """Called before every training epoch (0-based), for architectures with a schedule of their own (LTB)."""

    def describe(self) -> str | None:
        """A line for the log after every epoch, where the architecture has something to say (LTB's tree)."""
        return None
