"""MoCo: each task's gradient tracked by a running average, min-norm weights followed by projected steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.gradient import GradientMethod
from mtlrun.strategies.simplex import WeightsPerTaskSet, project_onto_simplex

EPS = 1e-8  # added to a gradient's norm before rescaling it to its loss, as LibMTL


class MoCo(GradientMethod):
    """MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective
    Learning: A Provably Convergent Approach", ICLR 2023, Algorithm 1), at the k-th step:

    - each task's tracked gradient y_t <- y_t - beta_k (y_t - h_t), with h_t the step's stochastic
      gradient and beta_k = beta / k^beta_sigma (y_t starts at 0);
    - the weights lambda <- Proj_simplex(lambda - gamma_k (Y Y^T + rho I) lambda), with
      gamma_k = gamma / k^gamma_sigma: one projected gradient step on MGDA's min-norm problem written on
      the tracked gradients Y;
    - the shared parameters step along Y^T lambda; each head along its own task's gradient.
    With `rescale_to_loss` (LibMTL's port of the authors' code, the default) h_t is g_t rescaled to norm L_t,
    g_t L_t / (||g_t|| + 1e-8); false: h_t = g_t, the paper's Algorithm 1. The step sizes and rho are
    LibMTL's defaults (the paper proves convergence for decaying beta_k, gamma_k). The weights are
    projected onto the simplex as the paper and the authors' code; LibMTL's port takes a softmax instead.
    State: y_t per task (its own k), lambda per set of tasks combined together (its own k; each group
    of `grouped` its own, `WeightsPerTaskSet`); all checkpointed.
    Scale: lambda sums to 1 (a convex combination of the tracked gradients).
    Guarantees: the tracking update and lambda's projected step hold exactly as written; lambda stays on
    the simplex. Unlike the other gradient methods, a zero Jacobian need not give a zero update: the
    tracked gradients carry the past steps. The paper's convergence (the bias of the stochastic MGDA
    direction vanishing, an epsilon-Pareto-stationary point) assumes smooth objectives, bounded gradients
    and its decaying step sizes, not LibMTL's rescaling.
    """

    name = "moco"

    def __init__(
        self, tasks: Sequence[str], beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
        gamma_sigma: float = 0.5, rho: float = 0.0, rescale_to_loss: bool = True,
    ) -> None:
        if not 0 < beta <= 1:
            raise MtlrunError(f"strategy.beta must lie in (0, 1], got {beta!r}")
        settings = {"gamma": gamma, "beta_sigma": beta_sigma, "gamma_sigma": gamma_sigma, "rho": rho}
        for key, value in settings.items():
            if not value >= 0:
                raise MtlrunError(f"strategy.{key} must be >= 0, got {value!r}")
        super().__init__(tasks)
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma = beta, beta_sigma, gamma, gamma_sigma
        self.rho, self.rescale_to_loss = rho, bool(rescale_to_loss)
        self.tracked: dict[str, Tensor] = {}  # y_t, the tracked gradient of each task
        self.steps = {t: 0 for t in tasks}  # updates of each task's y_t
        self.lambdas = WeightsPerTaskSet()

    def aggregate(self, jacobian: Tensor, losses: dict[str, Tensor]) -> Tensor:
        names = list(losses)
        if self.rescale_to_loss:
            loss_values = torch.stack([losses[t].detach() for t in names]).to(jacobian)
            jacobian = jacobian * (loss_values / (jacobian.norm(dim=1) + EPS))[:, None]
        for t, h in zip(names, jacobian):
            self.steps[t] += 1
            y = self.tracked.get(t, torch.zeros_like(h))
            self.tracked[t] = y - (self.beta / self.steps[t] ** self.beta_sigma) * (y - h)
        tracked = torch.stack([self.tracked[t] for t in names])
        k = self.lambdas.step_count(names) + 1
        lam = self.lambdas.get(names)
        y64 = tracked.double()
        gram = (y64 @ y64.T).cpu() + self.rho * torch.eye(len(names), dtype=torch.float64)
        lam = project_onto_simplex(lam - (self.gamma / k**self.gamma_sigma) * (gram @ lam))
        self.lambdas.set(names, lam)
        self.weights.update(zip(names, lam.tolist()))
        return lam.to(tracked) @ tracked

    def state_dict(self) -> dict:
        return {"tracked": {t: y.clone() for t, y in self.tracked.items()}, "steps": dict(self.steps),
                "lambdas": self.lambdas.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracked = {t: y.clone() for t, y in state["tracked"].items()}
        self.steps = dict(state["steps"])
        self.lambdas.load_state_dict(state["lambdas"])
