"""Maximum Roaming: per-task binary masks over the shared encoder's layers' units, roaming on a schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.strategies.base import SeededStrategy, StepContext, step_on_groups

STEPS = ("per_task", "summed")
MASKED_LAYERS = {"conv": (_ConvNd,), "conv_linear": (_ConvNd, nn.Linear)}


class MaskedLayer:
    """One layer of the encoder whose units (output channels) are masked: `name`, `units`, the module whose
    output the mask multiplies (the layer itself, or the batch norm right after it), and the dimension of
    that output holding the units."""

    def __init__(self, name: str, units: int, target: nn.Module, dim: int) -> None:
        self.name, self.units, self.target, self.dim = name, units, target, dim


def masked_layers(encoder: nn.Module, kinds: tuple[type, ...]) -> list[MaskedLayer]:
    """The encoder's layers of `kinds`, in registration order. A layer directly followed by a per-channel norm
    (batch or instance norm over its units) is masked after that norm: masked before it, the norm's shift
    would give the unit a non-zero output and a gradient."""
    leaves = [(name, m) for name, m in encoder.named_modules() if next(m.children(), None) is None]
    layers = []
    for i, (name, module) in enumerate(leaves):
        if not isinstance(module, kinds):
            continue
        conv = isinstance(module, _ConvNd)
        units = module.out_channels if conv else module.out_features
        after = leaves[i + 1][1] if i + 1 < len(leaves) else None
        if isinstance(after, _NormBase) and after.num_features == units:
            layers.append(MaskedLayer(name, units, after, 1 if conv else -1))
        elif isinstance(after, (nn.GroupNorm, nn.LayerNorm)):
            raise MtlrunError(
                f"strategy=maximum_roaming cannot mask the units of the encoder's layer {name}: the "
                f"{type(after).__name__} after it mixes its units, so a masked unit would still learn from the "
                f"task; use a model whose layers are followed by batch norm, or none"
            )
        else:
            layers.append(MaskedLayer(name, units, module, 1 if conv else -1))
    return layers


def active_units(sigma: float, units: int) -> int:
    """Units each task uses in a layer of `units`: sigma of them, rounded up to a whole unit."""
    return math.ceil(round(sigma * units, 9))


def initial_mask(tasks: int, units: int, active: int, generator: torch.Generator) -> Tensor:
    """A tasks x units boolean mask with exactly `active` units per task and every unit used by some task
    (needs tasks * active >= units): the units, in a random order, are dealt to the tasks in turn, then
    each task gets random units of the rest until it has `active`."""
    mask = torch.zeros(tasks, units, dtype=torch.bool)
    mask[torch.arange(units) % tasks, torch.randperm(units, generator=generator)] = True
    for t in range(tasks):
        free = (~mask[t]).nonzero().flatten()
        needed = active - int(mask[t].sum())
        mask[t, free[torch.randperm(len(free), generator=generator)[:needed]]] = True
    return mask


class MaximumRoaming(SeededStrategy):
    """Maximum Roaming (Pascal, Michiardi, Bost, Huet & Zuluaga, "Maximum Roaming Multi-Task Learning",
    AAAI 2021; the authors' code lucaspascal/Maximum-Roaming-Mutli-Task-Learning and lucaspascal/AITSO_MTL).

    Each task t has a binary mask over the units (output channels) of every convolution of the shared encoder
    (`masked_layers=conv_linear`: and of its linear layers); the task's forward pass, in training and in
    evaluation, multiplies each masked layer's output (after its batch norm) by its mask, so every task
    trains and is evaluated through its own sub-network. Each iteration takes, on one batch and in the
    dataset's task order, one step per task on its own loss (`steps=per_task`: the MR paper's code and
    AITSO_MTL's Cityscapes and NYUv2 code) or one step on the sum of the tasks' losses (`steps=summed`:
    AITSO_MTL's CelebA code, which accumulates the tasks' gradients); a forward pass per task either way.
    In a layer of n units, roaming swaps, for every task, `updates_size` of its active units (chosen at
    random) for as many it has never used, every max(1, updates_end // ceil(m / updates_size)) iterations
    up to iteration `updates_end`, m = n - ceil(sigma n) being the units masked for each task, so that every
    layer finishes together; a layer stops once each task has tried `update_ratio` of its m masked units.

    Guarantees (tested):
    - each task's mask of a layer of n units has exactly ceil(sigma n) active units at every iteration, and
      at the start every unit is active for at least one task (sigma >= 1/T is required for that);
    - a task's forward pass goes through its own mask: its gradient is exactly zero on the weights, bias and
      batch-norm scale and shift of the units masked for it, so with plain SGD its step (steps=per_task)
      moves none of them (Adam's moments and weight decay move them by earlier steps; a residual connection
      still carries a block's input past a masked unit);
    - with update_ratio=1 and updates_end >= ceil(m / updates_size) for the widest layer, every task has
      tried every unit of every masked layer by iteration updates_end;
    - the masks, each task's tried units, the iteration count and the random state are in `state_dict`, so a
      resumed run continues exactly.
    The authors' models keep no batch-norm running statistics (`model.running_stats=false` of unet and
    celeba_cnn); where a model keeps them, the tasks share them.
    """

    name = "maximum_roaming"

    def __init__(
        self, tasks: Sequence[str], seed: int, sigma: float = 0.8, updates_size: int = 1,
        updates_end: int = 10000, update_ratio: float = 1.0, steps: str = "per_task",
        masked_layers: str = "conv",
    ) -> None:
        super().__init__(seed)
        self.tasks = list(tasks)
        number = not isinstance(sigma, bool) and isinstance(sigma, (int, float))
        if not number or not 1 / len(self.tasks) <= sigma <= 1:
            raise MtlrunError(
                f"strategy.sigma (the share of each layer's units a task uses) must be in [1/T, 1] = "
                f"[{1 / len(self.tasks):.3g}, 1] with these {len(self.tasks)} task(s), so that every unit serves "
                f"some task; got {sigma!r}"
            )
        for key, value, least in (("updates_size", updates_size, 1), ("updates_end", updates_end, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise MtlrunError(f"strategy.{key} must be an integer >= {least}, got {value!r}")
        if (
            isinstance(update_ratio, bool) or not isinstance(update_ratio, (int, float))
            or not 0 <= update_ratio <= 1
        ):
            raise MtlrunError(f"strategy.update_ratio must be in [0, 1], got {update_ratio!r}")
        if steps not in STEPS:
            raise MtlrunError(f"strategy.steps={steps!r} is invalid; valid: {', '.join(STEPS)}")
        if masked_layers not in MASKED_LAYERS:
            raise MtlrunError(
                f"strategy.masked_layers={masked_layers!r} is invalid; valid: {', '.join(MASKED_LAYERS)}"
            )
        self.sigma, self.updates_size, self.updates_end = float(sigma), updates_size, updates_end
        self.update_ratio = float(update_ratio)
        self.steps, self.masked_layer_kinds = steps, masked_layers
        self.group_size = 1 if steps == "per_task" else len(self.tasks)
        self.iterations = 0
        self.layers: list[MaskedLayer] = []
        self.masks: list[Tensor] = []  # per layer, tasks x units, True = the task uses the unit
        self.tried: list[Tensor] = []  # per layer, tasks x units, True = the task has used the unit
        self._factors: list[Tensor] = []  # the masks as floats on the model's device, for the forward hooks
        self._device = torch.device("cpu")
        self._active: int | None = None  # the index of the task whose forward pass runs

    def attach(self, model: MultiTaskModel) -> None:
        self.layers = masked_layers(model.encoder, MASKED_LAYERS[self.masked_layer_kinds])
        if not self.layers:
            kinds = "convolutions" if self.masked_layer_kinds == "conv" else "convolutions or linear layers"
            hint = ": set strategy.masked_layers=conv_linear" if self.masked_layer_kinds == "conv" else ""
            raise MtlrunError(
                f"strategy=maximum_roaming masks the units of the encoder's {kinds}, and this model's encoder "
                f"has none{hint}"
            )
        self._device = next(model.parameters()).device
        for layer in self.layers:
            mask = initial_mask(
                len(self.tasks), layer.units, active_units(self.sigma, layer.units), self.generator
            )
            self.masks.append(mask)
            self.tried.append(mask.clone())
        self._factors = [torch.empty(0)] * len(self.masks)
        self._refresh(range(len(self.masks)))
        for i, layer in enumerate(self.layers):
            layer.target.register_forward_hook(self._mask_hook(i))
        model.task_scope = self.task_scope

    @contextmanager
    def task_scope(self, task: str) -> Iterator[None]:
        """The encoder computes `task`'s function inside this scope."""
        self._active = self.tasks.index(task)
        try:
            yield
        finally:
            self._active = None

    def _mask_hook(self, layer: int) -> Callable[[nn.Module, object, Tensor], Tensor]:
        dim = self.layers[layer].dim

        def apply_mask(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
            if self._active is None:
                raise RuntimeError("a Maximum Roaming encoder ran outside a task's scope (model.task_scope)")
            factor = self._factors[layer][self._active].to(output.dtype)
            if dim == 1:
                factor = factor.view(-1, *[1] * (output.dim() - 2))
            return output * factor

        return apply_mask

    def _refresh(self, layers: Iterable[int]) -> None:
        """New float copies of the masks of `layers` (never changed in place: a pending backward pass may
        hold the old ones)."""
        for i in layers:
            self._factors[i] = self.masks[i].to(self._device, torch.get_default_dtype())

    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        if self.steps == "per_task":
            logged = step_on_groups(ctx, [[t] for t in self.tasks], fresh_batches=False)
        else:
            logged = step_on_groups(ctx, [self.tasks], fresh_batches=False, combine=_summed_step)
        self.iterations += 1
        self.roam()
        return logged

    def update_interval(self, layer: int) -> int | None:
        """Iterations between two swaps of `layer`; None when no unit is masked there."""
        units = self.layers[layer].units
        masked = units - active_units(self.sigma, units)
        if masked == 0:
            return None
        return max(1, self.updates_end // math.ceil(masked / self.updates_size))

    def roam(self) -> None:
        """Swap units in every layer whose turn it is after `self.iterations` iterations."""
        if self.iterations > self.updates_end:
            return
        changed = []
        for i in range(len(self.layers)):
            interval = self.update_interval(i)
            if interval is not None and self.iterations % interval == 0 and self._swap(i):
                changed.append(i)
        self._refresh(changed)

    def _swap(self, layer: int) -> bool:
        """For every task still short of `update_ratio` of its masked units tried, `updates_size` random
        active units off and as many random untried units on; whether any mask changed."""
        mask, tried = self.masks[layer], self.tried[layer]
        active = active_units(self.sigma, mask.shape[1])
        goal = self.update_ratio * (mask.shape[1] - active)
        changed = False
        for t in range(len(self.tasks)):
            untried = (~tried[t]).nonzero().flatten()
            if int(tried[t].sum()) - active >= goal - 1e-9 or len(untried) == 0:
                continue
            size = min(self.updates_size, len(untried))
            on = untried[torch.randperm(len(untried), generator=self.generator)[:size]]
            used = mask[t].nonzero().flatten()
            off = used[torch.randperm(len(used), generator=self.generator)[:size]]
            mask[t, off] = False
            mask[t, on] = True
            tried[t, on] = True
            changed = True
        return changed

    def state_dict(self) -> dict:
        return {
            **super().state_dict(), "iterations": self.iterations, "masks": self.masks, "tried": self.tried
        }

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(m.shape) for m in state["masks"]]
        if shapes != [tuple(m.shape) for m in self.masks]:
            raise MtlrunError(
                f"the checkpoint's Maximum Roaming masks ({len(shapes)} layers) do not fit this model's encoder "
                f"({len(self.masks)} layers): resume with the same model and tasks"
            )
        super().load_state_dict(state)
        self.iterations = int(state["iterations"])
        self.masks = [m.cpu().bool() for m in state["masks"]]
        self.tried = [m.cpu().bool() for m in state["tried"]]
        self._refresh(range(len(self.masks)))


def _summed_step(ctx: StepContext, losses: dict[str, Tensor]) -> None:
    """One step on the sum of the tasks' losses, as gradients accumulated task by task."""
    ctx.step(list(losses), sum(losses[t] for t in ctx.task_names if t in losses))
