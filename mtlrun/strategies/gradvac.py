"""GradVac: each task gradient pulled towards a target cosine with every other, targets averaged over time."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import SeededStrategy
from mtlrun.strategies.gradient import GramWeighting

EPS = 1e-8  # added to the correction's denominator, as torchjd (the Gram matrix is trace-normalised)


class GradVac(GramWeighting, SeededStrategy):
    """Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1): for each task i,
    going through the other tasks j in a random order, with phi the cosine of the current g_i and the
    original g_j and phi_hat the pair's target:
    if phi < phi_hat, g_i <- g_i + ||g_i|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
    / (||g_j|| sqrt(1 - phi_hat^2)) g_j, which makes the cosine exactly phi_hat; then
    phi_hat <- (1 - beta) phi_hat + beta phi. The update is the sum of the g_i.
    Own code on the Gram matrix (the same algebra as torchjd's GradVacWeighting) because the targets are
    kept per ordered pair of task names, starting at 0, so any subset of the tasks (a group) uses and
    updates its own pairs; torchjd keeps them per row position and resets them when T changes.
    Orders come from the strategy's own seeded generator; targets and generator are checkpointed.
    Deviations: one "whole model" granularity (the paper also applies it per layer); a pair where either
    gradient is zero is skipped (no correction, target unchanged).
    Scale: a sum of gradients. Guarantees: after its correction, g_i's cosine with g_j equals the pair's
    target; with zero targets (the first step) it is PCGrad.
    """

    name = "gradvac"

    def __init__(self, tasks: Sequence[str], seed: int, beta: float = 0.01, heads: str = "own") -> None:
        if not 0 <= beta <= 1:
            raise MtlrunError(f"strategy.beta must lie in [0, 1], got {beta!r}")
        GramWeighting.__init__(self, tasks, heads)
        SeededStrategy.__init__(self, seed)
        self.beta = float(beta)
        self.targets: dict[str, dict[str, float]] = {}  # targets[i][j]: phi_hat of g_i towards g_j

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        tasks, G = list(losses), gram.cpu()
        n = len(tasks)
        coefficients = torch.eye(n, dtype=G.dtype)  # row i: g_i = sum_k coefficients[i, k] g_k (original)
        for i in range(n):
            inner = coefficients[i] @ G  # g_i . g_k for every original g_k
            others = [j for j in range(n) if j != i]
            for j in (others[k] for k in torch.randperm(len(others), generator=self.generator).tolist()):
                norm_i = math.sqrt(max(float(inner @ coefficients[i]), 0.0))
                norm_j = math.sqrt(max(float(G[j, j]), 0.0))
                if norm_i == 0 or norm_j == 0:
                    continue
                phi = min(max(float(inner[j]) / (norm_i * norm_j), -1.0), 1.0)
                target = self.targets.get(tasks[i], {}).get(tasks[j], 0.0)
                if phi < target:
                    root_phi, root_target = math.sqrt(1 - phi**2), math.sqrt(max(1 - target**2, 0.0))
                    w = norm_i * (target * root_phi - phi * root_target) / (norm_j * root_target + EPS)
                    coefficients[i, j] += w
                    inner = inner + w * G[j]
                self.targets.setdefault(tasks[i], {})[tasks[j]] = (1 - self.beta) * target + self.beta * phi
        return coefficients.sum(dim=0).to(gram.device)

    def state_dict(self) -> dict:
        targets = {i: dict(row) for i, row in self.targets.items()}
        return {**SeededStrategy.state_dict(self), "targets": targets}

    def load_state_dict(self, state: dict) -> None:
        SeededStrategy.load_state_dict(self, state)
        self.targets = {i: dict(row) for i, row in state["targets"].items()}
