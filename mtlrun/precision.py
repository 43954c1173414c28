"""Mixed precision (`trainer.precision`): autocast for forward passes and, for fp16, dynamic loss scaling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.settings import TrainerSettings

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# `trainer.dtype`: what parameters, activations, optimizer state and every tensor a strategy makes are held in.
RUN_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


@contextmanager
def run_dtype(name: str) -> Iterator[None]:
    """Inside the block torch's default dtype is the run's (`trainer.dtype`), so the model, the data and every
    tensor a strategy or optimizer creates are float64 in a float64 run without a cast in each place (a
    float32 weight vector times a float64 loss would silently compute in float32); restored after it."""
    TrainerSettings.check("dtype", name)
    before = torch.get_default_dtype()
    torch.set_default_dtype(RUN_DTYPES[name])
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def full(x: Tensor) -> Tensor:
    """`x` in full precision: autocast's bf16/fp16 outputs go up to the run's dtype; float32 and float64 (a
    float64 run's, or a model turned to float64 by a test) stay as they are."""
    return x.to(torch.get_default_dtype()) if x.dtype in (torch.float16, torch.bfloat16) else x


class SkippedStep(Exception):
    """An optimizer step whose gradients were not finite under fp16: nothing it would have fed was updated."""


class LossScaler:
    """Dynamic loss scaling for fp16, as torch.amp.GradScaler, for the gradients mtlrun takes itself.

    Every backward pass differentiates `scale * loss` and divides the gradients by `scale` again, so small
    gradients survive fp16's range. A step whose gradients hold an inf or NaN is skipped whole: no
    parameter, no task's optimizer state (per-task moments included) and no state of the strategy is
    touched, and the scale halves; after `growth_interval` finite steps in a row it doubles. The scale is a
    Python number, so scaling never waits for the device; the finiteness check does, once per step.
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale, self.growth_interval = scale, growth_interval
        self.finite_steps = 0

    def finite(self, grads: Sequence[Tensor]) -> bool:
        """Whether every gradient is finite; when not, the scale halves and the good steps count restarts."""
        ok = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        if not ok:
            self.scale, self.finite_steps = self.scale / 2, 0
        return ok

    def stepped(self) -> None:
        """One more step taken; the scale doubles after `growth_interval` of them in a row."""
        self.finite_steps += 1
        if self.finite_steps == self.growth_interval:
            self.scale, self.finite_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "finite_steps": self.finite_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.finite_steps = state["scale"], state["finite_steps"]


class Precision:
    """How forward passes run and gradients are taken: fp32; bf16 autocast; fp16 autocast with loss scaling.

    Parameters, gradients and the optimizer's state (every task's moments) stay in the run's dtype (fp32, or
    float64 where `trainer.dtype=float64`, which allows fp32 only); only the operations inside `autocast()` run
    in the lower precision.
    """

    def __init__(
        self, name: str = "fp32", device_type: str = "cpu", scaler: LossScaler | None = None
    ) -> None:
        TrainerSettings.check("precision", name)
        if DTYPES[name] is not None and torch.get_default_dtype() != torch.float32:
            raise MtlrunError(f"trainer.precision={name} autocasts a float32 run: it needs trainer.dtype=float32")
        self.name, self.device_type, self.dtype = name, device_type, DTYPES[name]
        self.scaler = scaler if scaler is not None else (LossScaler() if name == "fp16" else None)

    def autocast(self) -> AbstractContextManager:
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def grad(
        self, output: Tensor, inputs: Sequence[Tensor], retain_graph: bool = False
    ) -> tuple[Tensor | None, ...]:
        """d output / d inputs (None where not reached), taken on the scaled output under loss scaling."""
        if self.scaler is None:
            return torch.autograd.grad(output, inputs, retain_graph=retain_graph, allow_unused=True)
        scale = self.scaler.scale
        grads = torch.autograd.grad(output * scale, inputs, retain_graph=retain_graph, allow_unused=True)
        # Unscaled in full precision: a gradient with respect to fp16 activations (MGDA-UB's representation
        # gradients) divided in fp16 would flush its small entries to zero.
        return tuple(full(g) / scale if g is not None else None for g in grads)

    def check(self, grads: Sequence[Tensor]) -> None:
        """Under loss scaling, raise SkippedStep (the scale lowered) unless every gradient is finite."""
        if self.scaler is not None and not self.scaler.finite(grads):
            raise SkippedStep

    def stepped(self) -> None:
        if self.scaler is not None:
            self.scaler.stepped()
