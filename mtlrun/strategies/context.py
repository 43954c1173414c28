"""StepContext: the one door through which a strategy takes batches, forward passes, gradients and steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mtlrun.data.loading import Batch
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


@dataclass
class RepresentationJacobian:
    """The task gradients with respect to the shared representation z of one forward pass (MGDA-UB)."""

    features: list[Tensor]  # z, as the model defines it (`MultiTaskModel.representation`)
    rows: Tensor  # T x |z|: row t is dL_t/dz on this process's share of the batch (z is per process)
    gram: Tensor  # rows @ rows.T in float64, summed over the processes: the whole batch's Gram matrix
    head_grads: dict[str, Tensor]  # each task's head gradient on this process's share (`through_representation`
    # averages them)


class StepContext:
    """What a strategy may use during one iteration: fresh batches, forward passes, gradients, optimizer steps.

    Every backward pass a strategy takes goes through `grad` (or a verb built on it: `gradients`, `step`,
    `jacobian`, `representation_jacobian`, `through_representation`), which counts it in
    `counts.backward_passes`, loss-scales it under fp16 and, under torchrun, averages the parameters'
    gradients over the processes; no strategy counts, scales or reduces by hand.

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
        """d output / d inputs (None where unreached): one backward pass, counted, loss-scaled under fp16. Under
        torchrun the gradients are averaged over the ranks here, in one all-reduce per backward pass (per
        optimizer step, or per task row of a Jacobian), so every method sees the global batch's gradients."""
        grads = self._local_grad(output, inputs, retain_graph)
        return distributed.average(grads) if distributed.active() else grads

    def _local_grad(
        self, output: Tensor, inputs: Sequence[Tensor], retain_graph: bool = False
    ) -> tuple[Tensor | None, ...]:
        """`grad` on this process's share of the batch alone: the one place a backward pass is counted."""
        self.counts.backward_passes += 1
        return self.precision.grad(output, inputs, retain_graph)

    def gradients(
        self, loss: Tensor, tasks: Sequence[str], shared: bool = True, retain_graph: bool = False
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """One backward pass of `loss`: the flat gradient of the shared parameters (None unless `shared`) and of
        each of `tasks`' own parameters (its part and head)."""
        heads = {t: self.model.task_parameters(t) for t in tasks}
        before = self._shared if shared else []
        grads = self.grad(loss, before + [p for t in tasks for p in heads[t]], retain_graph)
        return (flatten(grads[: len(before)], before) if shared else None), _split(grads[len(before) :], heads)

    def step(self, tasks: Sequence[str], loss: Tensor) -> None:
        """Backpropagate `loss` to the shared parameters and the heads of `tasks`, then take one optimizer step."""
        shared_grad, head_grads = self.gradients(loss, tasks)
        assert shared_grad is not None
        self.apply(tasks, shared_grad, head_grads)

    def jacobian(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Each task's gradient of the shared parameters (a T x P matrix, rows in the order of `losses`) and
        each task's own head gradient, from the one forward pass that produced `losses`."""
        names = list(losses)
        rows, head_grads = [], {}
        for i, task in enumerate(names):
            row, head = self.gradients(losses[task], [task], retain_graph=i < len(names) - 1)
            rows.append(row)
            head_grads.update(head)
        jacobian = torch.stack(rows)
        self._check([jacobian, *head_grads.values()])  # before a method's state sees the rows
        return jacobian, head_grads

    def representation_jacobian(self, losses: dict[str, Tensor]) -> RepresentationJacobian:
        """Each task's gradient with respect to the shared representation z of the forward pass that produced
        `losses` (`self.features`), and its head gradient: one backward pass per task, through its head only.

        z is this process's share of the batch, so the rows are not averaged over the processes: their Gram
        matrix is summed instead, and the head gradients are averaged with the shared one in
        `through_representation`. Under fp16 a non-finite row skips the step (SkippedStep) here."""
        features = self.model.representation(self.features)
        rows, head_grads = [], {}
        for t, loss in losses.items():
            head = self.model.task_parameters(t)
            grads = self._local_grad(loss, features + head, retain_graph=True)
            rows.append(flatten(grads[: len(features)], features))
            head_grads[t] = flatten(grads[len(features) :], head)
        jacobian = torch.stack(rows)
        exact = jacobian.double()
        gram = distributed.summed(exact @ exact.T) if distributed.active() else exact @ exact.T
        self._check([gram])  # summed over the processes: every process skips, or none
        return RepresentationJacobian(features, jacobian, gram, head_grads)

    def through_representation(
        self, rep: RepresentationJacobian, direction: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The shared parameters' gradient when z moves along `direction` (|z| long, in `rep.rows`' layout): one
        backward pass through the encoder, of the scalar <z, direction> so that it is loss-scaled as any other;
        with `rep`'s head gradients, all averaged over the processes in one all-reduce."""
        sizes = [f.numel() for f in rep.features]
        # full(): the product in full precision, as the task losses, so that the scale cannot overflow fp16
        inner = sum((full(f) * g.view_as(f)).sum() for f, g in zip(rep.features, direction.split(sizes)))
        assert isinstance(inner, Tensor)
        shared_grad = flatten(self._local_grad(inner, self._shared), self._shared)
        if not distributed.active():
            return shared_grad, rep.head_grads
        shared_grad, *heads = distributed.average([shared_grad, *rep.head_grads.values()])
        return shared_grad, dict(zip(rep.head_grads, heads))  # type: ignore[arg-type,return-value]

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


def _split(grads: Sequence[Tensor | None], heads: dict[str, list]) -> dict[str, Tensor]:
    """Consecutive blocks of `grads`, one per task in `heads`' order, each flattened (zeros where unreached)."""
    out, n = {}, 0
    for t, params in heads.items():
        out[t] = flatten(grads[n : n + len(params)], params)
        n += len(params)
    return out
