"""MoDo: min-norm weights moved by projected steps on the product of two independent samples' gradients."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext
from mtlrun.strategies.sampling import three_samples
from mtlrun.strategies.simplex import WeightsPerTaskSet, project_onto_simplex


class MoDo(LossCombiner):
    """MoDo, multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen, "Three-Way Trade-Off
    in Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023,
    Algorithm 1): at each step, from three independent batches z1, z2, z3,

        lambda <- Proj_simplex(lambda - gamma (J(z1) J(z2)^T lambda + rho lambda)),
        the shared parameters step along J(z3)^T lambda (J: the T x P Jacobian of the shared parameters),

    lambda starting uniform. J(z1) J(z2)^T lambda is an unbiased estimate of the gradient of
    ||J lambda||^2 / 2 (one batch's J J^T would be biased), which is why two independent batches are
    needed. Batches: z3 is the batch of the losses `combine` is given (the iteration's batch, or the
    group's under `grouped`), z1 and z2 the next two batches of the training stream (`ctx.next_batch()`),
    as LibMTL's trainer draws three batches per iteration. So an epoch of floor(N / batch_size)
    iterations reads the training split three times, and each step costs 3 forward and 3T backward passes.
    Each head steps along the mean of its task's head gradients on the three batches (LibMTL).
    `gamma` and `rho` are LibMTL's defaults (the authors' code defaults to gamma = 0.1).
    State: lambda per set of tasks combined together (each group of `grouped` its own,
    `WeightsPerTaskSet`), checkpointed. Scale: lambda sums to 1.
    Guarantees: lambda stays on the simplex and moves exactly by the projected step above, built from
    two batches other than the update's. The paper's bounds (optimization, generalization and
    conflict-avoidance trade-off) hold for its step sizes under smoothness and bounded-gradient assumptions.
    """

    name = "modo"

    def __init__(self, tasks: Sequence[str], gamma: float = 1e-3, rho: float = 0.1) -> None:
        if not gamma > 0:
            raise MtlrunError(f"strategy.gamma must be > 0, got {gamma!r}")
        if not rho >= 0:
            raise MtlrunError(f"strategy.rho must be >= 0, got {rho!r}")
        self.gamma, self.rho, self.group_size = gamma, rho, len(tasks)
        self.lambdas = WeightsPerTaskSet()
        self.weights: dict[str, float] = {}

    def task_weights(self) -> dict[str, float] | None:
        return dict(self.weights) or None

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        samples = three_samples(ctx, losses)
        lam = self.lambdas.get(names)
        product = (samples.first.double() @ samples.second.double().T).cpu()
        lam = project_onto_simplex(lam - self.gamma * (product @ lam + self.rho * lam))
        self.lambdas.set(names, lam)
        self.weights.update(zip(names, lam.tolist()))
        ctx.apply(names, lam.to(samples.update) @ samples.update, samples.head_grads)

    def state_dict(self) -> dict:
        return {"lambdas": self.lambdas.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.lambdas.load_state_dict(state["lambdas"])
