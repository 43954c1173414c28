"""GradNorm: learned task weights that equalise the tasks' gradient norms at the last shared layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.strategies.base import LossCombiner, StepContext
from mtlrun.strategies.uncertainty import TaskScalars

TINY = 1e-8  # floor of initial and mean loss ratios, so zero losses give no 0/0
MIN_WEIGHT = 1e-6  # weights are kept positive before renormalising


def last_shared_layer(model: MultiTaskModel) -> nn.Parameter:
    """The last shared weight matrix or kernel (the last shared parameter with >= 2 dimensions, in
    registration order), i.e. the weights of the encoder's last layer rather than a norm layer's
    scale or a bias; the last shared parameter if none has 2 dimensions."""
    shared = model.shared_parameters()
    return ([p for p in shared if p.dim() >= 2] or shared)[-1]


def weight_gradient(weights: Tensor, grad_norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """The gradient in w of L_grad = sum_t |w_t n_t - mean_j(w_j n_j) r_t^alpha|, the target held constant,
    where n_t = ||grad_W L_t|| and r_t = loss_ratio_t / mean_j loss_ratio_j (loss_ratio_t = L_t / L_t(0))."""
    inverse_rates = loss_ratios / loss_ratios.mean().clamp_min(TINY)
    w = weights.clone().requires_grad_()
    norms = w * grad_norms
    target = (norms.mean() * inverse_rates**alpha).detach()
    return torch.autograd.grad((norms - target).abs().sum(), w)[0]


class GradNorm(LossCombiner):
    """One step on sum_t w_t L_t, then one update of the weights w by gradient descent on
    L_grad = sum_t |G_t - mean(G) r_t^alpha| (the target held constant), where G_t = ||grad_W w_t L_t||
    at the last shared layer W (`last_shared_layer`), r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0)),
    and L_t(0) is task t's loss at its first step; then w is renormalised to sum to K
    (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, Algorithm 1).

    The weights start at 1, live on the model's device and are moved by their own Adam (`lr`; the paper
    trains them with the network's optimizer); the model's step uses the weights before their update.
    G_t needs one partial backward pass per task down to W, counted in ctx.counts.backward_passes.
    On a group of tasks (`grouped`) everything is over the group, whose weights are renormalised to
    sum to its size. A weight is kept >= 1e-6 before renormalising (the paper does not say what to do
    when a step would make one negative).
    Guarantees: the weights stay positive and sum to K; the update's direction lowers the weight of a
    task whose G_t is above its target and raises that of one below.
    """

    name = "gradnorm"

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 1e-3) -> None:
        if not alpha >= 0:
            raise MtlrunError(f"strategy.alpha must be >= 0, got {alpha!r}")
        if not lr > 0:
            raise MtlrunError(f"strategy.lr must be > 0, got {lr!r}")
        self.alpha, self.group_size = alpha, len(tasks)
        self.weights = TaskScalars(tasks, 1.0, lr)
        self.initial_losses: dict[str, Tensor] = {}

    def task_weights(self) -> dict[str, float]:
        return self.weights.as_dict()

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        self.weights.to(next(ctx.model.parameters()).device)
        for t in names:
            self.initial_losses.setdefault(t, losses[t].detach().clone())
        layer = last_shared_layer(ctx.model)
        grads = [ctx.grad(losses[t], layer, retain_graph=True)[0] for t in names]
        if any(g is None for g in grads):
            raise MtlrunError(
                "strategy=gradnorm weighs the tasks' gradients at the last shared layer, which some of these tasks "
                "do not reach (a model.tree whose tasks share no node all together): choose another strategy"
            )
        grad_norms = torch.stack([g.norm() for g in grads])
        ctx.counts.backward_passes += len(names)
        weights = self.weights.get(names)
        current = torch.stack([losses[t] for t in names])
        ctx.step(names, (weights * current).sum())

        ratios = current.detach() / torch.stack([self.initial_losses[t] for t in names]).clamp_min(TINY)
        self.weights.adam_step(names, weight_gradient(weights, grad_norms, ratios, self.alpha))
        updated = self.weights.get(names).clamp_min(MIN_WEIGHT)
        self.weights.set(names, len(names) * updated / updated.sum())

    def state_dict(self) -> dict:
        return {"weights": self.weights.state_dict(), "initial_losses": dict(self.initial_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["weights"])
        self.initial_losses = dict(state["initial_losses"])
