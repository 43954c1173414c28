"""Tiny models and tasks for checking the maths by hand."""

from __future__ import annotations

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
