"""What a strategy sees of training (StepContext) and what it must provide (Strategy)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mtlrun.data.loading import Batch
from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.optim import MultiTaskOptimizer, flatten
from mtlrun.precision import Precision, SkippedStep, full
from mtlrun.run import distributed
from mtlrun.tasks import Task


@dataclass
class Counts:
    """Work done so far; reports divide these by iterations and epochs."""

    iterations: int = 0
    optimizer_steps: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    skipped_steps: int = 0  # fp16 steps skipped for non-finite gradients (not in optimizer_steps)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class HeldPenalty:
    """A task part's penalty from a forward pass, with its gradient, until the step on that task adds it."""

    value: Tensor  # detached
    shared: tuple[Tensor | None, ...] | None  # d penalty / d shared parameters; None where it reaches none
    own: Tensor  # d penalty / d the task's own parameters, flat


class StepContext:
    """What a strategy may use during one iteration: fresh batches, forward passes, optimizer steps.

    Architecture penalties (DSelect-k's gate regulariser: `MultiTaskModel.penalties`) stay out of the task
    losses a strategy weighs: `losses` takes each penalty's gradient at once (one partial backward pass per
    penalised task) and holds it; the next step on that task (`step`, `apply`, `apply_each`) adds it to the
    update, unweighted and once, as Keras's `add_loss` adds the reference code's regulariser to the total
    loss. A later pass on the task replaces it; the values added are summed for train_log.csv (`penalty`).
    So a strategy reading loss values (DWA, FAMO, uncertainty, GradNorm, ...) never sees a penalty.
    """

    def __init__(
        self, model: MultiTaskModel, tasks: Sequence[Task], optimizer: MultiTaskOptimizer,
        batches: Iterator[Batch], to_device: Callable[[Batch], Batch], precision: Precision | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.precision = precision if precision is not None else Precision()
        self.tasks = {t.name: t for t in tasks}
        self.task_names = tuple(self.tasks)  # the dataset's order: losses are always summed in it
        self._batches, self._to_device = batches, to_device
        self.counts = Counts()
        self._shared = model.shared_parameters()
        self.features: object = None  # the encoder's output in the last `losses` pass (MGDA-UB weighs on it)
        self.batch: Batch | None = None  # the batch of the last `losses` pass (FAMO re-evaluates on it)
        self._held: dict[str, HeldPenalty] = {}
        self._penalty_added: Tensor | None = None  # the values added to steps since `take_penalty`

    def next_batch(self) -> Batch:
        return self._to_device(next(self._batches))

    def losses(self, batch: Batch, tasks: Sequence[str]) -> dict[str, Tensor]:
        """One forward pass through the encoder and the parts and heads of `tasks` only (one per task where the
        model has a `task_scope`); the encoder's output and the batch stay in `self.features` and `self.batch`
        until the next pass. Under torchrun each loss has the value of the global batch's and the gradient of this
        rank's part (`distributed.global_losses`)."""
        self.batch = batch
        image = batch["image"]
        with self.precision.autocast():
            if self.model.task_scope is None:
                self.counts.forward_passes += 1
                self.features = self.model.encoder(image)
                outputs = self.model.heads_on(self.features, tasks, image.shape[-2:])
            else:  # an encoder function per task: one pass per task, and no one representation shared by them
                self.counts.forward_passes += len(tasks)
                self.features = None
                outputs = self.model(image, tasks)
            penalties = self.model.penalties()
        losses = {t: self.tasks[t].loss(full(outputs[t]), batch[t]) for t in tasks}
        for t, penalty in penalties.items():
            if t in losses and penalty.requires_grad:  # a pass without gradients (a look-ahead) steps nothing
                self._hold(t, full(penalty))
        if distributed.active():
            counts = {t: self.tasks[t].loss_count(batch[t]) for t in tasks}
            return distributed.global_losses(losses, counts)
        return losses

    def _hold(self, task: str, penalty: Tensor) -> None:
        own = self.model.task_parameters(task)
        grads = self.grad(penalty, self._shared + own, retain_graph=True)
        self.counts.backward_passes += 1
        n = len(self._shared)
        shared = grads[:n] if any(g is not None for g in grads[:n]) else None
        self._held[task] = HeldPenalty(penalty.detach(), shared, flatten(grads[n:], own))

    def _let_go(self, tasks: Sequence[str]) -> dict[str, HeldPenalty]:
        """The held penalties of `tasks`, no longer held; their values are counted for the log."""
        found = {t: self._held.pop(t) for t in tasks if t in self._held}
        for held in found.values():
            added = self._penalty_added
            self._penalty_added = held.value if added is None else added + held.value
        return found

    def _with_penalty(
        self, shared_grad: Tensor, head_grad: Tensor, held: HeldPenalty
    ) -> tuple[Tensor, Tensor]:
        if held.shared is not None:
            shared_grad = shared_grad + flatten(held.shared, self._shared)
        return shared_grad, head_grad + held.own

    def take_penalty(self) -> Tensor | None:
        """The sum of the penalties added to steps since the last call (None: none was), for the loop's
        log, called after every iteration: penalties held for tasks no step took are dropped."""
        added, self._penalty_added = self._penalty_added, None
        self._held.clear()
        return added

    def grad(
        self, output: Tensor, inputs: Sequence[Tensor], retain_graph: bool = False
    ) -> tuple[Tensor | None, ...]:
        """d output / d inputs (None where unreached), loss-scaled under fp16: every backward pass uses it. Under
        torchrun the gradients are averaged over the ranks here, in one all-reduce per backward pass (per
        optimizer step, or per task row of a Jacobian), so every method sees the global batch's gradients."""
        grads = self.precision.grad(output, inputs, retain_graph)
        return distributed.average(grads) if distributed.active() else grads

    def step(self, tasks: Sequence[str], loss: Tensor) -> None:
        """Backpropagate `loss` to the shared parameters and the heads of `tasks`, then take one optimizer step."""
        heads = {t: self.model.task_parameters(t) for t in tasks}
        params = self._shared + [p for t in tasks for p in heads[t]]
        grads = self.grad(loss, params)
        self.counts.backward_passes += 1
        n = len(self._shared)
        shared_grad = flatten(grads[:n], self._shared)
        head_grads = {}
        for t in tasks:
            head_grads[t] = flatten(grads[n : n + len(heads[t])], heads[t])
            n += len(heads[t])
        self.apply(tasks, shared_grad, head_grads)

    def jacobian(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Each task's gradient of the shared parameters (a T x P matrix, rows in the order of `losses`) and
        each task's own head gradient, from the one forward pass that produced `losses`."""
        names = list(losses)
        rows, head_grads = [], {}
        n = len(self._shared)
        for i, task in enumerate(names):
            head = self.model.task_parameters(task)
            last = i == len(names) - 1
            grads = self.grad(losses[task], self._shared + head, retain_graph=not last)
            self.counts.backward_passes += 1
            rows.append(flatten(grads[:n], self._shared))
            head_grads[task] = flatten(grads[n:], head)
        jacobian = torch.stack(rows)
        self._check([jacobian, *head_grads.values()])  # before a method's state sees the rows
        return jacobian, head_grads

    def apply(self, tasks: Sequence[str], shared_grad: Tensor, head_grads: dict[str, Tensor]) -> None:
        """One optimizer step on `tasks` with gradients a strategy computed itself (and held penalties')."""
        head_grads = dict(head_grads)
        for t, held in self._let_go(tasks).items():
            shared_grad, head_grads[t] = self._with_penalty(shared_grad, head_grads[t], held)
        self._check([shared_grad, *head_grads.values()])
        self.optimizer.step(tasks, shared_grad, head_grads)
        self._stepped()

    def apply_each(self, shared_grads: dict[str, Tensor], head_grads: dict[str, Tensor]) -> None:
        """One optimizer step feeding each task's own shared gradient to its own state (`step_each`)."""
        shared_grads, head_grads = dict(shared_grads), dict(head_grads)
        for t, held in self._let_go(list(shared_grads)).items():
            shared_grads[t], head_grads[t] = self._with_penalty(shared_grads[t], head_grads[t], held)
        self._check([*shared_grads.values(), *head_grads.values()])
        self.optimizer.step_each(shared_grads, head_grads)
        self._stepped()

    def _check(self, grads: Sequence[Tensor]) -> None:
        """Under fp16, a step with a non-finite gradient ends here (SkippedStep) before anything is updated."""
        try:
            self.precision.check(grads)
        except SkippedStep:
            self.counts.skipped_steps += 1
            raise

    def _stepped(self) -> None:
        self.counts.optimizer_steps += 1
        self.precision.stepped()


class Strategy(ABC):
    """How one iteration turns task losses into parameter updates; the training loop knows nothing else."""

    name: str
    group_size: int | None  # tasks per optimizer step, for reports; None where it varies (learned groups)

    @abstractmethod
    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        """Run one iteration; return each task's (detached) loss for logging."""

    def attach(self, model: MultiTaskModel) -> None:
        """Called once the run's model is built, before a resume loads this strategy's state: a strategy that
        changes the model's forward pass (Maximum Roaming's channel masks) installs itself here."""

    def trains(self, tasks: Sequence[str]) -> list[str]:
        """The tasks this strategy trains, of the dataset's `tasks`; the run builds and evaluates only these."""
        return list(tasks)

    def task_weights(self) -> dict[str, float] | None:
        """The weights the strategy currently gives the tasks, for diagnostics; None when it has none."""
        return None

    def epoch_end(self) -> None:
        """Called by the loop after every training epoch (methods that weight tasks by epoch history)."""

    def records(self) -> list[dict]:
        """Rows of the strategy's own log (`strategy_log.csv`), e.g. the task partitions it drew; [] = none."""
        return []

    def task_affinity(self) -> dict[str, float] | None:
        """The inter-task affinity the strategy keeps, `{"<s>/<t>": value}`, for diagnostics; None if none."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossCombiner(Strategy):
    """A method turning the losses of a set of tasks into one update: a loss weighting or a gradient manipulation.

    As a strategy it takes one step per iteration on every task, from one forward pass; `grouped`
    applies it inside each group of its partition, so `combine` must accept any subset of the tasks
    (in the dataset's order) and keep any state per task.
    """

    def iteration(self, ctx: StepContext) -> dict[str, Tensor]:
        losses = ctx.losses(ctx.next_batch(), ctx.task_names)
        try:
            self.combine(ctx, losses)
        except SkippedStep:  # fp16: the step was skipped whole; the losses are still logged
            pass
        return {t: loss.detach() for t, loss in losses.items()}

    @abstractmethod
    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        """Take exactly one optimizer step (`ctx.step` or `ctx.apply`) on the tasks in `losses`."""


REDUCTIONS = ("mean", "sum")  # how a step's losses are combined: divided by the sum of weights, or not


def weighted_mean(
    losses: dict[str, Tensor], order: Sequence[str], weights: dict[str, float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Sum of w_t * L_t over `losses`, divided by the sum of weights (`reduction=sum`: not divided), always
    in the dataset's task order.

    Summing in a fixed order makes a group holding every task bit-identical to the averaged loss.
    """
    names = [t for t in order if t in losses]
    w = {t: 1.0 for t in names} if weights is None else weights
    total = sum(w[t] * losses[t] for t in names)
    return total if reduction == "sum" else total / sum(w[t] for t in names)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise MtlrunError(f"strategy.reduction={reduction!r} is invalid; valid: {', '.join(REDUCTIONS)}")


def mean_step(ctx: StepContext, losses: dict[str, Tensor], reduction: str = "mean") -> None:
    """One step on the plain mean (or sum) of `losses`: how a group is combined unless a method is given."""
    ctx.step(list(losses), weighted_mean(losses, ctx.task_names, reduction=reduction))


def step_on_groups(
    ctx: StepContext, groups: Sequence[Sequence[str]], fresh_batches: bool,
    combine: Callable[[StepContext, dict[str, Tensor]], None] = mean_step,
) -> dict[str, Tensor]:
    """One optimizer step per group, made by `combine` from the group's losses; groups share one batch
    unless `fresh_batches`."""
    logged: dict[str, Tensor] = {}
    batch = None
    for group in groups:
        if batch is None or fresh_batches:
            batch = ctx.next_batch()
        ordered = [t for t in ctx.task_names if t in group]
        losses = ctx.losses(batch, ordered)
        try:
            combine(ctx, losses)
        except SkippedStep:  # this group's step only: the iteration's other steps go on
            pass
        logged.update({t: loss.detach() for t, loss in losses.items()})
    return logged


class SeededStrategy(Strategy):
    """A strategy drawing its random choices from its own generator, saved in checkpoints."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint loaded onto a GPU holds CUDA tensors
        self.generator.set_state(state["generator"].cpu())
