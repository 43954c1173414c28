"""GradNorm: learned task weights that equalise the tasks' gradient norms at the last shared layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.strategies.base import LossCombiner, StepContext
from mtlrun.strategies.task_scalars import TaskScalars

TINY = 1e-8  # floor of initial and mean loss ratios, so zero losses give no 0/0
MIN_WEIGHT = 1e-6  # weights are kept positive before renormalising
WEIGHTS_OPTIMIZERS = ("own", "model")


def last_shared_layer(model: MultiTaskModel) -> nn.Parameter:
    """The last shared weight matrix or kernel (the last shared parameter with >= 2 dimensions, in
    registration order), i.e. the weights of the encoder's last layer rather than a norm layer's
    scale or a bias; the last shared parameter if none has 2 dimensions."""
    shared = model.shared_parameters()
    return ([p for p in shared if p.dim() >= 2] or shared)[-1]


def shared_layers(model: MultiTaskModel) -> dict[str, nn.Parameter]:
    """The shared layers GradNorm's W may be, by module name (`model.named_modules()`): every shared
    module with a weight of >= 2 dimensions (a convolution's kernel, a linear layer's matrix), in
    registration order."""
    shared = {id(p) for p in model.shared_parameters()}
    layers = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2 and id(weight) in shared:
            layers[name] = weight
    return layers


def layer_weight(model: MultiTaskModel, layer: str | None) -> nn.Parameter:
    """W: the weight of the shared module named `layer`, or if None the last shared layer."""
    if layer is None:
        return last_shared_layer(model)
    layers = shared_layers(model)
    if layer not in layers:
        known = ", ".join(layers)
        raise MtlrunError(f"strategy.layer={layer!r} is not a shared layer here; shared layers: {known}")
    return layers[layer]


def weight_gradient(weights: Tensor, grad_norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """The gradient in w of L_grad = sum_t |w_t n_t - mean_j(w_j n_j) r_t^alpha|, the target held constant,
    where n_t = ||grad_W L_t|| and r_t = loss_ratio_t / mean_j loss_ratio_j (loss_ratio_t = L_t / L_t(0))."""
    inverse_rates = loss_ratios / loss_ratios.mean().clamp_min(TINY)
    w = weights.clone().requires_grad_()
    norms = w * grad_norms
    target = (norms.mean() * inverse_rates**alpha).detach()
    # Not through the step context: a derivative of T numbers (w, from the norms already taken), not a
    # backward pass through the network; nothing to count, scale (float32) or average (the same on every rank).
    return torch.autograd.grad((norms - target).abs().sum(), w)[0]


class GradNorm(LossCombiner):
    """One step on sum_t w_t L_t, then one update of the weights w by gradient descent on
    L_grad = sum_t |G_t - mean(G) r_t^alpha| (the target held constant), where G_t = ||grad_W w_t L_t||
    at a shared layer W, r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0)),
    and L_t(0) is task t's loss at its first step; then w is renormalised to sum to K
    (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, Algorithm 1).

    W is the weight of the shared module named `layer` (e.g. `encoder.convs.21`, the CelebA CNN's seventh
    conv, Pascal et al.'s choice), by default the last shared layer (`last_shared_layer`: on the CelebA CNN
    the second FC, on the U-Net the last conv, which is also the authors' W there).
    The weights start at 1 and live on the model's device. `weights_optimizer=own` moves them by their own
    Adam (`lr`, default betas and eps); `model` by the model's optimizer: its rule (Adam, AdamW or SGD, with
    its betas, eps, momentum and weight decay) at its current learning rate, each weight with a state of its
    own that steps with its task (as a head's, whatever `optimizer.moments`), as the paper's and the authors'
    code, where the weights are parameters of the network's optimizer: with every task in every step, the
    same as that optimizer over the vector of weights (`lr` is then unused). The model's step uses the
    weights before their update.
    G_t needs one partial backward pass per task down to W (`ctx.grad`: counted, scaled, averaged).
    On a group of tasks (`grouped`) everything is over the group, whose weights are renormalised to
    sum to its size. A weight is kept >= 1e-6 before renormalising (the paper does not say what to do
    when a step would make one negative).
    Guarantees: the weights stay positive and sum to K; the update's direction lowers the weight of a
    task whose G_t is above its target and raises that of one below.
    """

    name = "gradnorm"

    def __init__(
        self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 1e-3, layer: str | None = None,
        weights_optimizer: str = "own",
    ) -> None:
        if not alpha >= 0:
            raise MtlrunError(f"strategy.alpha must be >= 0, got {alpha!r}")
        if not lr > 0:
            raise MtlrunError(f"strategy.lr must be > 0, got {lr!r}")
        if weights_optimizer not in WEIGHTS_OPTIMIZERS:
            valid = ", ".join(WEIGHTS_OPTIMIZERS)
            raise MtlrunError(f"strategy.weights_optimizer={weights_optimizer!r} is invalid; valid: {valid}")
        if layer is not None and not isinstance(layer, str):
            raise MtlrunError(f"strategy.layer must be a module name, e.g. encoder.convs.21, got {layer!r}")
        self.alpha, self.group_size = alpha, len(tasks)
        self.layer, self.weights_optimizer = layer, weights_optimizer
        self.weights = TaskScalars(tasks, 1.0, lr)
        self.weight_states: dict[str, dict] = {}  # weights_optimizer=model: each weight's optimizer state
        self.initial_losses: dict[str, Tensor] = {}

    def attach(self, model: MultiTaskModel) -> None:
        layer_weight(model, self.layer)  # an unknown layer fails before training starts

    def task_weights(self) -> dict[str, float]:
        return self.weights.as_dict()

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        self.weights.to(next(ctx.model.parameters()).device)
        for t in names:
            self.initial_losses.setdefault(t, losses[t].detach().clone())
        layer = layer_weight(ctx.model, self.layer)
        grads = [ctx.grad(losses[t], layer, retain_graph=True)[0] for t in names]
        if any(g is None for g in grads):
            where = "the last shared layer" if self.layer is None else f"strategy.layer={self.layer}"
            raise MtlrunError(
                f"strategy=gradnorm weighs the tasks' gradients at {where}, which some of these tasks do not "
                "reach (a model.tree whose tasks share no node all together, or a layer only some tasks "
                "use): choose another layer or strategy"
            )
        grad_norms = torch.stack([g.norm() for g in grads])
        weights = self.weights.get(names)
        current = torch.stack([losses[t] for t in names])
        ctx.step(names, (weights * current).sum())

        ratios = current.detach() / torch.stack([self.initial_losses[t] for t in names]).clamp_min(TINY)
        weight_grad = weight_gradient(weights, grad_norms, ratios, self.alpha)
        if self.weights_optimizer == "own":
            self.weights.adam_step(names, weight_grad)
        else:
            values = weights.detach().clone()
            for t, value, grad in zip(names, values.split(1), weight_grad.split(1)):
                ctx.optimizer.step_owned([value], grad, self.weight_states.setdefault(t, {}))
            self.weights.set(names, values)
        updated = self.weights.get(names).clamp_min(MIN_WEIGHT)
        self.weights.set(names, len(names) * updated / updated.sum())

    def state_dict(self) -> dict:
        return {
            "weights": self.weights.state_dict(), "initial_losses": dict(self.initial_losses),
            "weight_states": self.weight_states,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["weights"])
        self.initial_losses = dict(state["initial_losses"])
        self.weight_states = state.get("weight_states", {})
