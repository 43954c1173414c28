"""Inter-task affinity measured from the training steps themselves, and task groups clustered from it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def affinity_propagation(
    similarity: np.ndarray, preference: float | None = None, damping: float = 0.5, max_iter: int = 200,
    convergence_iter: int = 50,
) -> list[int] | None:
    """Frey & Dueck's affinity propagation (Science 2007): each item's exemplar index, or None when the
    exemplars have not stayed the same for `convergence_iter` iterations within `max_iter`.

    Responsibilities and availabilities are exchanged with `damping` as in the paper, exemplars refined
    within their clusters at the end as in its reference code. `preference` (the diagonal of the
    similarity; None: the median of `similarity`, as scikit-learn, which the reference code calls) sets
    how readily items become exemplars: higher, more clusters. Defaults: scikit-learn's, with the
    reference code's `convergence_iter`.
    """
    n = len(similarity)
    s = similarity.astype(np.float64).copy()
    s[np.diag_indices(n)] = np.median(similarity) if preference is None else preference
    # Exact ties (two symmetric items) make the messages oscillate for ever: break them with noise far
    # below any real difference, from a fixed generator so the clustering stays deterministic.
    noise = np.random.default_rng(0).standard_normal((n, n))
    s += (np.finfo(np.float64).eps * np.abs(s) + np.finfo(np.float64).tiny * 100) * noise
    responsibility, availability = np.zeros((n, n)), np.zeros((n, n))
    rows = np.arange(n)
    exemplars, stable = None, 0
    for _ in range(max_iter):
        scores = availability + s
        best = scores.argmax(axis=1)
        first = scores[rows, best]
        scores[rows, best] = -np.inf
        second = scores.max(axis=1)
        new = s - first[:, None]
        new[rows, best] = s[rows, best] - second
        responsibility = damping * responsibility + (1 - damping) * new
        positive = np.maximum(responsibility, 0)
        positive[rows, rows] = responsibility[rows, rows]
        new = positive.sum(axis=0)[None, :] - positive
        self_availability = new[rows, rows].copy()
        new = np.minimum(new, 0)
        new[rows, rows] = self_availability
        availability = damping * availability + (1 - damping) * new
        current = (availability[rows, rows] + responsibility[rows, rows]) > 0
        stable = stable + 1 if exemplars is not None and np.array_equal(current, exemplars) else 0
        exemplars = current
        if stable >= convergence_iter and exemplars.any():
            break
    else:
        return None
    labels = _nearest_exemplar(s, np.flatnonzero(exemplars))
    # Frey & Dueck's last step (also scikit-learn's): in each cluster, the member with the largest summed
    # similarity from the cluster (its preference counting for itself) becomes the exemplar; then reassign.
    clusters = [np.flatnonzero(labels == centre) for centre in np.unique(labels)]
    refined = np.array([members[s[np.ix_(members, members)].sum(axis=0).argmax()] for members in clusters])
    return _nearest_exemplar(s, refined).tolist()


def _nearest_exemplar(similarity: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Each item's most similar exemplar among `centres` (an exemplar is its own)."""
    labels = centres[similarity[:, centres].argmax(axis=1)]
    labels[centres] = centres
    return labels


class TaskAffinity:
    """A[s, t]: how a step on a group holding task s changes task t's loss on the same batch, an
    exponential average of (1 - L_t(after) / L_t(before)) / |group| (the group's effect shared among its
    tasks), `decay` the weight of each new measurement. Groups come from affinity propagation on
    the symmetrised, self-normalised matrix: N[s, t] = A[s, t] / A[t, t] (where A[t, t] > 0),
    S = (N + N^T) / 2.
    """

    def __init__(self, tasks: Sequence[str], decay: float, preference: float | None) -> None:
        self.tasks = list(tasks)
        self.decay, self.preference = decay, preference
        self.matrix = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)

    def update(self, group: Sequence[str], before: dict[str, float], after: dict[str, float]) -> None:
        rows = [self.tasks.index(t) for t in group]
        for j, task in enumerate(self.tasks):
            if not before[task] > 0:
                continue  # a zero loss cannot shrink: no information
            effect = (1 - after[task] / before[task]) / len(group)
            self.matrix[rows, j] = (1 - self.decay) * self.matrix[rows, j] + self.decay * effect

    def groups(self) -> list[list[str]] | None:
        matrix = self.matrix.clone()
        own = matrix.diagonal().clone()
        positive = own > 0
        matrix[:, positive] /= own[positive]
        similarity = ((matrix + matrix.T) / 2).numpy()
        labels = affinity_propagation(similarity, self.preference)
        if labels is None:
            return None
        clusters: dict[int, list[str]] = {}
        for task, label in zip(self.tasks, labels):
            clusters.setdefault(label, []).append(task)
        return list(clusters.values())

    def state_dict(self) -> dict:
        return {"matrix": self.matrix}

    def load_state_dict(self, state: dict) -> None:
        self.matrix = state["matrix"].detach().cpu().double().clone()

    def as_dict(self) -> dict[str, float]:
        tasks = list(enumerate(self.tasks))
        return {f"{s}/{t}": float(self.matrix[i, j]) for i, s in tasks for j, t in tasks}


def losses_as_floats(losses: dict[str, Tensor]) -> dict[str, float]:
    values = torch.stack([loss.detach() for loss in losses.values()]).tolist()
    return dict(zip(losses, values))
