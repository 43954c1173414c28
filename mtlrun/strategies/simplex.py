"""Task weights on the probability simplex: the Euclidean projection onto it, and weights per task set."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Sets of tasks whose weights are kept. Random groups of many tasks (CelebA's 40) rarely repeat, so older
# sets are forgotten, least recently used first: memory and checkpoints stay bounded (as Nash-MTL's state).
KEPT_TASK_SETS = 64


def project_onto_simplex(v: Tensor) -> Tensor:
    """The point of {w >= 0, sum_i w_i = 1} closest to v in Euclidean distance: w = max(v - theta, 0) with
    the threshold theta read off the sorted entries (Held, Wolfe & Crowder 1974; Duchi et al., ICML 2008)."""
    u = v.sort(descending=True).values
    excess = u.cumsum(0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    kept = int((u - excess / k > 0).nonzero().max())  # the last sorted entry that stays positive
    return (v - excess[kept] / (kept + 1)).clamp_min(0)


class WeightsPerTaskSet:
    """One weight vector on the simplex per set of tasks combined together (each group of `grouped` its
    own), starting uniform; the `KEPT_TASK_SETS` most recently used sets are kept, so a set seen long ago
    starts afresh. Vectors are float64 on the CPU (T numbers each), with a step count per set."""

    def __init__(self) -> None:
        self.weights: dict[tuple[str, ...], Tensor] = {}
        self.steps: dict[tuple[str, ...], int] = {}

    def get(self, tasks: Sequence[str]) -> Tensor:
        key = tuple(tasks)
        return self.weights.get(key, torch.full((len(key),), 1 / len(key), dtype=torch.float64))

    def set(self, tasks: Sequence[str], weights: Tensor) -> int:
        """Store the set's new weights; return how many times they have now been set (this step's k)."""
        key = tuple(tasks)
        self.weights.pop(key, None)
        self.weights[key] = weights.detach().double().cpu()  # re-inserted: the dict is in order of use
        self.steps[key] = self.steps.pop(key, 0) + 1
        while len(self.weights) > KEPT_TASK_SETS:
            oldest = next(iter(self.weights))
            del self.weights[oldest], self.steps[oldest]
        return self.steps[key]

    def step_count(self, tasks: Sequence[str]) -> int:
        return self.steps.get(tuple(tasks), 0)

    def state_dict(self) -> list:
        return [[list(k), w.clone(), self.steps[k]] for k, w in self.weights.items()]

    def load_state_dict(self, state: list) -> None:
        self.weights = {tuple(k): w.double().cpu() for k, w, _ in state}  # checkpoints may load onto a GPU
        self.steps = {tuple(k): int(n) for k, _, n in state}
