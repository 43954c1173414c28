"""The simplex (mtlrun/strategies/simplex.py): the Euclidean projection onto it, and weights kept per task set."""

import numpy as np
import torch

from mtlrun.strategies import simplex
from mtlrun.strategies.simplex import WeightsPerTaskSet, project_onto_simplex


def project_by_bisection(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex by bisection on the threshold (not by sorting, as the code)."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(v - (lo + hi) / 2, 0)


def test_projection_onto_the_simplex_matches_bisection_and_keeps_its_points():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7):
        for scale in (0.1, 1.0, 100.0):
            v = scale * torch.randn(n, generator=g, dtype=torch.float64)
            np.testing.assert_allclose(project_onto_simplex(v).numpy(), project_by_bisection(v.numpy()), atol=1e-12)
    inside = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    torch.testing.assert_close(project_onto_simplex(inside), inside)
    vertex = project_onto_simplex(torch.tensor([2.0, 0.0, -1.0]))
    torch.testing.assert_close(vertex, torch.tensor([1.0, 0.0, 0.0]))


def test_weights_per_task_set_start_uniform_count_steps_and_forget_the_oldest(monkeypatch):

    monkeypatch.setattr(simplex, "KEPT_TASK_SETS", 2)
    kept = WeightsPerTaskSet()
    torch.testing.assert_close(kept.get(["a", "b"]), torch.full((2,), 0.5, dtype=torch.float64))
    assert kept.set(["a", "b"], torch.tensor([0.9, 0.1])) == 1
    assert kept.set(["a", "b"], torch.tensor([0.8, 0.2])) == 2
    kept.set(["c"], torch.tensor([1.0]))
    kept.set(["a", "b"], torch.tensor([0.7, 0.3]))  # used last: kept
    kept.set(["b", "c"], torch.tensor([0.5, 0.5]))
    assert set(kept.weights) == {("a", "b"), ("b", "c")} and kept.step_count(["a", "b"]) == 3
