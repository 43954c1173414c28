"""ExcessMTL: task weights raised multiplicatively by each task's estimated excess risk."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext

EPS = 1e-7  # added to the accumulated squared gradients before their square root, as the authors' code


class ExcessMTL(LossCombiner):
    """ExcessMTL (He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
    Risks", ICML 2024; as the authors' code, yifei-he/ExcessMTL, ported unchanged to LibMTL):

    - each task's excess risk L_t(x) - L_t(x*) is estimated by a second-order Taylor expansion with a
      diagonal curvature accumulated as AdaGrad does: E_t = sum_p g_tp^2 / sqrt(S_tp + 1e-7),
      S_t the running sum of g_t^2 over all the task's steps so far (this one included);
    - scale processing: E_t is divided by its baseline, the estimate at the task's first step, so tasks
      of different loss scales compare (`baseline_epochs` > 0: the mean estimate over that many epochs
      of equal weights instead, the warm-up the torchjd port reads in the paper's Appendix C.1);
    - exponentiated-gradient ascent on the weights: w_t <- w_t exp(eta E_t / E_t^0), renormalised, so
      the task further from convergence gains weight; then one step on sum_t w_t L_t.
    The weights start equal and sum to 1, as the paper's simplex (the authors' code: sum to T, their
    summed-loss baseline; ours is the mean loss). eta = `robust_step_size` = 0.01, the authors' code's
    and LibMTL's default (their README's Office-Home example: 1). Kept per task as log-weights, so on a
    group of tasks (`grouped`) the weights are the softmax over the group and each task's statistics
    are its own. A task's baseline is taken at its first step with a nonzero estimate (its ratio is 0
    until then: a zero gradient gives no estimate to compare with).
    Uses ctx.jacobian (one backward pass per task) for the per-task gradients of the shared parameters,
    and steps along exactly the gradient of sum_t w_t L_t (heads included). S_t is one P-sized tensor
    per task, on the model's device. State (checkpointed): S_t, baselines, log-weights, epochs seen.
    Guarantees: the weights are positive and sum to 1; per step, log(w_a / w_b) grows by exactly
    eta (E_a / E_a^0 - E_b / E_b^0), so the task with the larger normalised excess risk gains weight.
    The paper's convergence and Pareto-stationarity results are for convex losses with exact excess
    risks; the Taylor/AdaGrad estimate is a heuristic for networks.
    """

    name = "excess_mtl"

    def __init__(
        self, tasks: Sequence[str], robust_step_size: float = 0.01, baseline_epochs: int = 0,
    ) -> None:
        if not robust_step_size > 0:
            raise MtlrunError(f"strategy.robust_step_size must be > 0, got {robust_step_size!r}")
        if isinstance(baseline_epochs, bool) or not isinstance(baseline_epochs, int) or baseline_epochs < 0:
            raise MtlrunError(f"strategy.baseline_epochs must be an integer >= 0, got {baseline_epochs!r}")
        self.robust_step_size, self.baseline_epochs = robust_step_size, baseline_epochs
        self.tasks, self.group_size = list(tasks), len(tasks)
        self.squared_sums: dict[str, Tensor] = {}  # S_t
        self.log_weights = {t: 0.0 for t in tasks}
        self.baseline_sums = {t: 0.0 for t in tasks}  # estimates summed over the baseline epochs
        self.baseline_counts = {t: 0 for t in tasks}
        self.baselines: dict[str, float] = {}  # E_t^0
        self.epochs = 0  # finished epochs

    def weights(self, tasks: Sequence[str]) -> dict[str, float]:
        """The current weights of `tasks`: the softmax of their log-weights."""
        w = torch.softmax(torch.tensor([self.log_weights[t] for t in tasks], dtype=torch.float64), dim=0)
        return dict(zip(tasks, w.tolist()))

    def task_weights(self) -> dict[str, float]:
        return self.weights(self.tasks)

    def excess_risks(self, jacobian: Tensor, tasks: Sequence[str]) -> list[float]:
        """Accumulate each task's squared gradient (row of `jacobian`) into S_t; return each E_t."""
        estimates = []
        for t, g in zip(tasks, jacobian.detach()):
            squared = g * g
            self.squared_sums[t] = self.squared_sums[t] + squared if t in self.squared_sums else squared
            estimates.append((squared / (self.squared_sums[t] + EPS).sqrt()).sum())
        return torch.stack(estimates).tolist()  # one device sync for all tasks

    def update(self, jacobian: Tensor, tasks: Sequence[str]) -> None:
        """One step of the weights of `tasks` from the Jacobian of the step (row t: task t's gradient)."""
        for t, estimate in zip(tasks, self.excess_risks(jacobian, tasks)):
            if self.epochs < self.baseline_epochs:
                self.baseline_sums[t] += estimate
                self.baseline_counts[t] += 1
                continue
            if not self.baselines.get(t, 0.0) > 0:
                total, count = self.baseline_sums[t], self.baseline_counts[t]
                self.baselines[t] = total / count if total > 0 else estimate
            ratio = estimate / self.baselines[t] if self.baselines[t] > 0 else 0.0
            self.log_weights[t] += self.robust_step_size * ratio

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        jacobian, head_grads = ctx.jacobian(losses)
        self.update(jacobian, names)
        w = self.weights(names)
        coefficients = torch.tensor([w[t] for t in names], dtype=jacobian.dtype, device=jacobian.device)
        ctx.apply(names, coefficients @ jacobian, {t: w[t] * head_grads[t] for t in names})

    def epoch_end(self) -> None:
        self.epochs += 1

    def state_dict(self) -> dict:
        return {
            "squared_sums": {t: s.clone() for t, s in self.squared_sums.items()},
            "log_weights": dict(self.log_weights), "baseline_sums": dict(self.baseline_sums),
            "baseline_counts": dict(self.baseline_counts), "baselines": dict(self.baselines),
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.squared_sums = {t: s.clone() for t, s in state["squared_sums"].items()}
        self.log_weights, self.baselines = dict(state["log_weights"]), dict(state["baselines"])
        self.baseline_sums = dict(state["baseline_sums"])
        self.baseline_counts = dict(state["baseline_counts"])
        self.epochs = int(state["epochs"])
