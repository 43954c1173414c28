"""Nash-MTL: task weights from the Nash bargaining solution, G alpha = 1 / alpha on the gradients' Gram."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import NashMTLSolver
from mtlrun.strategies.base import StepContext
from mtlrun.strategies.gradient import GradientMethod, weighted_gradients

ZERO_ROW = 1e-12  # a task whose squared gradient norm is below this fraction of the largest gets weight 0
# Sets of tasks whose schedule, weights and solver are kept. Random groups of many tasks (CelebA's 40) rarely
# repeat, so older sets are forgotten, least recently used first: memory and checkpoints stay bounded.
KEPT_TASK_SETS = 64


class NashMTL(GradientMethod):
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022, Algorithm 1): d = sum_t alpha_t g_t with alpha > 0 solving the bargaining
    condition G alpha = 1 / alpha (G = J J^T), i.e. every task gets g_t . d = 1 / alpha_t.
    The condition is solved by damped Newton in float64 to 1e-12 (`NashMTLSolver`, warm-started from the
    previous solution) instead of the authors' sequential convex program (cvxpy/ECOS, stopped at a
    residual of 1e-3 and, on about 1 solve in 24, keeping the previous weights when its linearised problem
    is reported unbounded): the weights are the bargaining solution itself, not an approximation of it.
    As the authors' code, the weights are recomputed every `update_weights_every` steps (in between, no
    Jacobian: one backward pass of sum_t alpha_t L_t) and the shared update is clipped to norm `max_norm`
    (0: no clipping); defaults are their NYUv2 settings.
    State per set of tasks combined together (each group of `grouped` has its own schedule, weights and
    warm start, keyed by task names; the `KEPT_TASK_SETS` most recently used sets are kept, so a group
    seen long ago starts afresh). A task with a zero gradient cannot satisfy the condition: it gets
    weight 0 and the others are solved alone. Checkpointed: schedule, weights, warm starts.
    Heads step along their own task's gradient (`heads=own`), or along alpha_t times it (`heads=weighted`,
    unclipped: the authors' code backpropagates sum_t alpha_t L_t and clips the shared gradient only).
    Scale: set by the bargaining (||d|| grows as the gradients shrink), then clipped.
    Guarantees: alpha > 0 and every alpha_t (G alpha)_t within 1e-12 of 1 (where a solution exists: not
    when a nonnegative combination of the gradients vanishes, e.g. g_2 = -g_1), so each task's
    improvement g_t . d (before clipping) is the reciprocal of its weight; ||d|| <= max_norm.
    """

    name = "nash_mtl"

    def __init__(
        self, tasks: Sequence[str], update_weights_every: int = 1, max_norm: float = 1.0, heads: str = "own",
    ) -> None:
        value = update_weights_every
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MtlrunError(f"strategy.update_weights_every must be an integer >= 1, got {value!r}")
        if not max_norm >= 0:
            raise MtlrunError(f"strategy.max_norm must be >= 0 (0: no clipping), got {max_norm!r}")
        super().__init__(tasks, heads)
        self.update_weights_every = update_weights_every
        self.max_norm = float(max_norm)
        self.solvers: dict[tuple[str, ...], NashMTLSolver] = {}  # per set of tasks with nonzero gradients
        self.calls: dict[tuple[str, ...], int] = {}  # combine calls per set of tasks: the update schedule
        self.alphas: dict[tuple[str, ...], Tensor] = {}  # last weights per set of tasks

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        tasks = tuple(losses)
        call = self.calls.get(tasks, 0)
        if call % self.update_weights_every == 0 or tasks not in self.alphas:
            super().combine(ctx, losses)
        else:
            self.step_weights = self.alphas[tasks]
            shared_grad, head_grads = weighted_gradients(ctx, losses, self.step_weights)
            ctx.apply(list(tasks), self._clipped(shared_grad), self.head_steps(head_grads))
        # Counted once the step is taken (an fp16 step skipped for overflow is not); re-inserted, so the
        # dict's order is the order of last use.
        self.calls.pop(tasks, None)
        self.calls[tasks] = call + 1
        self._forget_old_sets()

    def aggregate(self, jacobian: Tensor, losses: dict[str, Tensor]) -> Tensor:
        tasks = tuple(losses)
        exact = jacobian.double()  # the Gram matrix and the combination in float64, as GramWeighting
        gram = exact @ exact.T
        norms = gram.diagonal()
        active = norms > ZERO_ROW * norms.max()
        alpha = torch.zeros(len(tasks), dtype=torch.float64, device=gram.device)
        if active.any():
            solved = tuple(t for t, a in zip(tasks, active.tolist()) if a)
            alpha[active] = self._solve(solved, gram[active][:, active])
        self.alphas.pop(tasks, None)
        self.alphas[tasks] = alpha
        self.weights.update(zip(tasks, alpha.tolist()))
        self.step_weights = alpha
        return self._clipped(alpha @ exact).to(jacobian.dtype)

    def _solve(self, tasks: tuple[str, ...], gram: Tensor) -> Tensor:
        if len(tasks) == 1:  # the condition in closed form, alpha = 1 / ||g|| (the solver needs T >= 2)
            return gram.diagonal().rsqrt()
        if tasks not in self.solvers:
            self.solvers[tasks] = NashMTLSolver(len(tasks))
        self.solvers[tasks] = self.solvers.pop(tasks)  # most recently used last
        return self.solvers[tasks](gram)

    def _forget_old_sets(self) -> None:
        for kept in (self.calls, self.alphas, self.solvers):
            while len(kept) > KEPT_TASK_SETS:
                kept.pop(next(iter(kept)))

    def _clipped(self, direction: Tensor) -> Tensor:
        norm = direction.norm()
        if self.max_norm > 0 and norm > self.max_norm:
            return direction * (self.max_norm / norm)
        return direction

    def state_dict(self) -> dict:
        return {
            "calls": [[list(k), n] for k, n in self.calls.items()],
            "alphas": [[list(k), a.cpu()] for k, a in self.alphas.items()],
            "warm_starts": [[list(k), s.warm_start] for k, s in self.solvers.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.calls = {tuple(k): int(n) for k, n in state["calls"]}
        self.alphas = {tuple(k): a.clone() for k, a in state["alphas"]}
        self.solvers = {}
        for key, warm_start in state["warm_starts"]:
            self.solvers[tuple(key)] = NashMTLSolver(len(key))
            self.solvers[tuple(key)].warm_start = warm_start
