"""Aligned-MTL: the task gradients made orthogonal and of equal norm (condition number 1), then combined."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.aggregation import aligned_mtl_weights
from mtlrun.strategies.gradient import GramWeighting

SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(GramWeighting):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023, Algorithm 1): with J = U S V^T (rank r), the aligned gradients are
    J_hat = sigma U V^T, i.e. every principal component rescaled to the same singular value sigma
    (scale_mode min: the smallest nonzero one, as the paper; median; rmse: the root mean square, as
    the authors' code); the update is their mean, d = J_hat^T 1/T. torchjd's AlignedMTLWeighting.
    Scale: the mean of the aligned gradients. Guarantees: the aligned gradients are orthogonal with equal
    norm sigma (condition number 1), so in the principal basis every component of d has magnitude
    sigma |(U^T 1/T)_k|: d = sigma V U^T 1/T; unchanged when all gradients are scaled together.
    """

    name = "aligned_mtl"

    def __init__(self, tasks: Sequence[str], scale_mode: str = "min", heads: str = "own") -> None:
        if scale_mode not in SCALE_MODES:
            valid = ", ".join(SCALE_MODES)
            raise MtlrunError(f"strategy.scale_mode={scale_mode!r} is invalid; valid: {valid}")
        super().__init__(tasks, heads)
        self.scale_mode = scale_mode

    def gram_weights(self, gram: Tensor, losses: dict[str, Tensor]) -> Tensor:
        return aligned_mtl_weights(gram, self.scale_mode)
