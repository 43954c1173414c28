"""The common frame of the gradient-manipulation methods: Jacobian, aggregated shared update, one step."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext

HEADS = ("own", "weighted")  # how the heads step: along their own task's gradient, or times its task's weight


class GradientMethod(LossCombiner):
    """A method turning the task gradients of the shared parameters into one shared update.

    `combine` takes one forward pass's losses, gets each task's gradient of the shared parameters (the
    rows of the T x P Jacobian, one backward pass per task, `ctx.jacobian`) and each task's head
    gradient, and takes exactly one optimizer step (`ctx.apply`): the shared parameters along
    `aggregate(jacobian, losses)`, every head along its own task's gradient, unweighted (`heads=own`).
    A method whose update is sum_t w_t g_t (it sets `step_weights`) may take `heads=weighted`: each head
    then steps along w_t times its gradient, i.e. the whole step is the gradient of sum_t w_t L_t, as the
    authors' code of MGDA-UB and Nash-MTL backpropagates its weighted loss (`head_steps`).
    Subclasses define `aggregate`; per-task or per-pair state is keyed by task names, so `combine`
    accepts any subset of the tasks (a group of `grouped`) in any call.

    With `optimizer.moments=per_task` a step covers every task handed to `combine`, so each of those
    tasks' optimizer states receives the same aggregated direction: well defined, and when the step
    holds all tasks (no grouping) the same as one shared state; inside `grouped`, the tasks of a group
    share their group's direction and the groups' states stay apart.
    Scale: each method's update has its paper's scale (a sum of task gradients for PCGrad, GradVac and
    GradDrop; a convex or mean-like combination for the others), stated in its docstring.
    Guarantees (every method): a finite update of the shared parameters' size for any Jacobian,
    including one task, a zero row, identical rows and the all-zero Jacobian (update zero).
    """

    def __init__(self, tasks: Sequence[str], heads: str = "own") -> None:
        if heads not in HEADS:
            raise MtlrunError(f"strategy.heads={heads!r} is invalid; valid: {', '.join(HEADS)}")
        self.group_size, self.heads = len(tasks), heads
        self.weights: dict[str, float] = {}  # each task's weight in its last aggregated update
        # This step's weights w in its update sum_t w_t g_t, in the order of its losses (float64)
        self.step_weights: Tensor | None = None

    def task_weights(self) -> dict[str, float] | None:
        return dict(self.weights) or None

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        jacobian, head_grads = ctx.jacobian(losses)
        shared_grad = self.aggregate(jacobian, losses)
        ctx.apply(list(losses), shared_grad, self.head_steps(head_grads))

    def head_steps(self, head_grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """The heads' gradients for this step (in the order of its losses): their own (`heads=own`), or each
        times its task's weight in the step's shared update (`heads=weighted`)."""
        if self.heads == "own":
            return head_grads
        assert self.step_weights is not None, "heads=weighted needs the step's weights (aggregate first)"
        return {t: w.to(g) * g for (t, g), w in zip(head_grads.items(), self.step_weights)}

    @abstractmethod
    def aggregate(self, jacobian: Tensor, losses: dict[str, Tensor]) -> Tensor:
        """The shared update from the Jacobian (row t: task t's gradient, rows in the order of `losses`)."""


class GramWeighting(GradientMethod):
    """A method whose update is sum_t w_t g_t with weights read from the T x T Gram matrix G = J J^T.

    G and the combination sum_t w_t g_t are computed in float64 from the (float32) task gradients, so G is
    the exact Gram matrix of the gradients the model produced: on near-parallel gradients (cosine
    1 - 1e-6) a float32 G loses the small eigenvalue the methods divide by. G is divided by its trace,
    which leaves these weights unchanged (they do not depend on a common scale of the gradients) but
    keeps solver tolerances meaningful however small the gradients get. The all-zero Jacobian gives the zero
    update without calling the method (its weights are then 0, for `heads=weighted`).
    """

    def aggregate(self, jacobian: Tensor, losses: dict[str, Tensor], gram: Tensor | None = None) -> Tensor:
        """`gram`: the rows' Gram matrix where the step context formed it (MGDA-UB's representation gradients:
        under torchrun each rank holds its share of the batch, so the Gram sums the ranks' ones)."""
        exact = jacobian.double()
        gram = exact @ exact.T if gram is None else gram
        trace = gram.trace()
        if not trace > 0:
            self.step_weights = torch.zeros(len(losses), dtype=torch.float64, device=exact.device)
            return torch.zeros_like(jacobian[0])
        weights = self.gram_weights(gram / trace, losses).to(exact.device)
        self.weights.update(zip(losses, weights.tolist()))
        self.step_weights = weights
        return (weights @ exact).to(jacobian.dtype)

    @abstractmethod
    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        """One weight per task (float64) from the trace-normalised Gram matrix of the tasks in `losses`."""


def weighted_gradients(
    ctx: StepContext, losses: dict[str, Tensor], weights: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The gradient of sum_t w_t L_t for the shared parameters (one backward pass) and each task's own
    head gradient (a second pass, through the heads only): a weighted step without the Jacobian."""
    total = sum(w * losses[t] for w, t in zip(weights.tolist(), losses))
    shared_grad, _ = ctx.gradients(total, [], retain_graph=True)
    _, head_grads = ctx.gradients(sum(losses.values()), list(losses), shared=False)
    assert shared_grad is not None
    return shared_grad, head_grads
