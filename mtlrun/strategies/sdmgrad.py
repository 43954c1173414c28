"""SDMGrad: the min-norm direction pulled towards the mean gradient, weighted from two independent batches."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import sdmgrad_weights
from mtlrun.strategies.base import LossCombiner, StepContext
from mtlrun.strategies.sampling import three_samples
from mtlrun.strategies.simplex import WeightsPerTaskSet


class SDMGrad(LossCombiner):
    """SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao, Ban & Ji,
    "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms", NeurIPS 2023,
    Algorithm 1): the update d = (J^T w + lamda g0) / (1 + lamda), with g0 the mean gradient and w on the
    simplex minimising (1/2) ||J^T w + lamda g0||^2, i.e. MGDA's min-norm problem pulled towards g0.
    From three independent batches: w takes `inner_steps` projected SGD steps (`sdmgrad_weights`, warm-started
    from the set's last w) on the gradient estimate J(xi) J(xi')^T (w + lamda / T), unbiased because xi
    and xi' are independent; d is formed from the third batch's J(zeta).
    Batches: zeta is the batch of the losses `combine` is given (the iteration's, or the group's under
    `grouped`), xi and xi' the next two batches of the training stream (`ctx.next_batch()`), as LibMTL's
    trainer. An epoch of floor(N / batch_size) iterations reads the training split three times; each step
    costs 3 forward and 3T backward passes. Each head steps along the mean of its task's head gradients on
    the three batches (as LibMTL's MoDo; the authors' code and LibMTL's SDMGrad sum them: a step three
    times larger).
    Settings: lamda = 0.3 and inner_steps = 20 as the authors' NYUv2 and Cityscapes runs; inner_lr = 5 and
    momentum 0.5 as LibMTL (the authors' code: lr 10). Not taken from the authors' code: multiplying d by
    T (their summed-loss baseline; ours is the mean loss) and clipping it to norm 1; and its three
    Jacobian buffers, which alias one tensor so that all three hold the last batch's gradients.
    State: w per set of tasks combined together (`WeightsPerTaskSet`), checkpointed.
    Scale: mean-gradient scale, d = J^T c with c = (w + lamda / T) / (1 + lamda) summing to 1.
    Guarantees: d - g0 = (J^T w - g0) / (1 + lamda), so ||d - g0|| <= max_t ||g_t - g0|| / (1 + lamda):
    d tends to the mean gradient as lamda grows; lamda = 0 with xi = xi' = zeta and an inner_lr small
    enough for the inner steps to converge gives MGDA's min-norm direction. The paper's convergence to a
    Pareto-stationary point holds for its step sizes under smoothness assumptions.
    """

    name = "sdmgrad"

    def __init__(
        self, tasks: Sequence[str], lamda: float = 0.3, inner_steps: int = 20, inner_lr: float = 5.0,
        momentum: float = 0.5,
    ) -> None:
        if not lamda >= 0:
            raise MtlrunError(f"strategy.lamda must be >= 0, got {lamda!r}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise MtlrunError(f"strategy.inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not inner_lr > 0:
            raise MtlrunError(f"strategy.inner_lr must be > 0, got {inner_lr!r}")
        if not 0 <= momentum < 1:
            raise MtlrunError(f"strategy.momentum must lie in [0, 1), got {momentum!r}")
        self.lamda, self.inner_steps = float(lamda), inner_steps
        self.inner_lr, self.momentum = float(inner_lr), float(momentum)
        self.group_size = len(tasks)
        self.simplex_weights = WeightsPerTaskSet()
        self.weights: dict[str, float] = {}  # each task's coefficient c_t in the last update

    def task_weights(self) -> dict[str, float] | None:
        return dict(self.weights) or None

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        samples = three_samples(ctx, losses)
        product = (samples.first.double() @ samples.second.double().T).cpu()
        w = sdmgrad_weights(product, self.simplex_weights.get(names), self.lamda, self.inner_steps,
                            self.inner_lr, self.momentum)
        self.simplex_weights.set(names, w)
        coefficients = (w + self.lamda / len(names)) / (1 + self.lamda)
        self.weights.update(zip(names, coefficients.tolist()))
        ctx.apply(names, coefficients.to(samples.update) @ samples.update, samples.head_grads)

    def state_dict(self) -> dict:
        return {"simplex_weights": self.simplex_weights.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.simplex_weights.load_state_dict(state["simplex_weights"])
