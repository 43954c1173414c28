"""Tiny models and tasks for checking the maths by hand."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from mtlrun.models.base import MultiTaskModel
from mtlrun.optim import MultiTaskOptimizer, OptimizerSettings
from mtlrun.strategies.base import StepContext
from mtlrun.tasks import Meter, Metric, Task


class Regression(Task):
    """Mean squared error on a scalar output: gradients are easy to write down."""

    dense = False
    out_channels = 1
    metrics = (Metric("mse", False),)

    def __init__(self, name: str) -> None:
        self.name = name

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return ((pred.squeeze(-1) - target) ** 2).mean()

    def meter(self) -> Meter:
        raise NotImplementedError


def linear_model(tasks: list[str], dim: int = 3, seed: int = 0) -> MultiTaskModel:
    """Shared linear map W (dim x dim, no bias) and one linear head a_t (1 x dim, no bias) per task."""
    torch.manual_seed(seed)
    encoder = nn.Linear(dim, dim, bias=False)
    heads = {t: nn.Linear(dim, 1, bias=False) for t in tasks}
    return MultiTaskModel(encoder, heads)


def batches(tasks: list[str], n: int = 8, dim: int = 3, count: int = 50, seed: int = 1) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(n, dim, generator=g), **{t: torch.randn(n, generator=g) for t in tasks}}
        for _ in range(count)
    ]


def context(model: MultiTaskModel, tasks: list[str], data: list[dict], **optimizer) -> StepContext:
    settings = OptimizerSettings(**{"name": "sgd", "lr": 0.1, **optimizer})
    opt = MultiTaskOptimizer(model.shared_parameters(), {t: model.task_parameters(t) for t in tasks}, settings)
    return StepContext(model, [Regression(t) for t in tasks], opt, iter(data), lambda b: b)


def per_batch_float64(model: MultiTaskModel, batch: dict, tasks: list[str]) -> tuple:
    """Each task's loss, shared-parameter gradient (float64 row) and head gradient on `batch`, on a copy."""
    model = copy.deepcopy(model).double()
    outputs = model(batch["image"].double(), tasks)
    losses, rows, heads = [], [], {}
    for t in tasks:
        loss = ((outputs[t].squeeze(-1) - batch[t].double()) ** 2).mean()
        g_w, g_h = torch.autograd.grad(loss, [model.encoder.weight, model.heads[t].weight], retain_graph=True)
        losses.append(loss.item())
        rows.append(g_w.flatten())
        heads[t] = g_h
    return np.array(losses), torch.stack(rows).numpy(), heads


def snapshot(model, tasks):
    heads = {t: model.heads[t].weight.detach().double().clone() for t in tasks}
    return model.encoder.weight.detach().double().clone(), heads


def assert_sgd_step(model, before, shared, heads, lr=0.1):
    """The model moved by one SGD step: the encoder along `shared` (flat), each head along `heads[t]`."""
    W, H = before
    expected = W - lr * torch.as_tensor(shared).view_as(W)
    np.testing.assert_allclose(model.encoder.weight.detach().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    for t, g in heads.items():
        expected = H[t] - lr * g
        got = model.heads[t].weight.detach().numpy()
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
