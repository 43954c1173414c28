"""The torchjd aggregators the gradient methods use, behind small functions: the one module importing torchjd.

torchjd is pinned (pyproject.toml) because its API changes between minor releases. The weightings read
the T x T Gram matrix J J^T of the task gradients (float64, on any device) and return one weight per
row, the caller forming weights @ J; GradDrop reads J itself. torchjd draws its random numbers (PCGrad's
orders, GradDrop's thresholds) from torch's global generators, so those calls run under `seeded`, which
draws from the caller's own generator instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torchjd.aggregation as tjd
from torch import Tensor


@contextmanager
def seeded(generator: torch.Generator) -> Iterator[None]:
    """Run the block on torch's global generators (CPU and every CUDA device) seeded from `generator`,
    restoring them afterwards: torchjd's random draws become reproducible and checkpointable, and the
    training's own stream (dropout, augmentation) is left untouched."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for device in devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def pcgrad_weights(gram: Tensor) -> Tensor:
    """PCGrad's weights: each g_i projected on the normal plane of every g_j it conflicts with, in a random
    order per task, then summed (torchjd's PCGradWeighting; call it under `seeded`)."""
    return tjd.PCGradWeighting()(gram)


def upgrad_weights(gram: Tensor) -> Tensor:
    """UPGrad's weights: the mean of each g_i projected onto the dual cone of the rows (torchjd's
    UPGradWeighting, quadprog on the Gram normalised by its trace, plus 1e-4 on its diagonal)."""
    return tjd.UPGradWeighting()(gram)


def imtl_g_weights(gram: Tensor) -> Tensor:
    """IMTL-G's weights, summing to 1, whose combination has the same projection on every unit gradient
    (torchjd's IMTLGWeighting: pinv(G) @ norms, normalised; a zero vector when that sum vanishes)."""
    return tjd.IMTLGWeighting()(gram)


def cagrad_weights(gram: Tensor, c: float) -> Tensor:
    """CAGrad's weights: 1/T + (c ||g0|| / ||g_w||) w, with w solving the paper's dual on the simplex
    (torchjd's CAGradWeighting, cvxpy/CLARABEL instead of the authors' scipy SLSQP)."""
    return tjd.CAGradWeighting(c=c)(gram)


def aligned_mtl_weights(gram: Tensor, scale_mode: str) -> Tensor:
    """Aligned-MTL's weights B @ (1/T) with B = sqrt(lambda_scale) V Lambda^-1/2 V^T on the Gram's nonzero
    eigenpairs (torchjd's AlignedMTLWeighting; scale_mode min = the paper's smallest eigenvalue)."""
    return tjd.AlignedMTLWeighting(scale_mode=scale_mode)(gram)


def graddrop(jacobian: Tensor, leak: float) -> Tensor:
    """GradDrop's update from the task gradients (torchjd's GradDrop, f = identity; run under `seeded`)."""
    leaks = torch.full((jacobian.shape[0],), float(leak), dtype=jacobian.dtype, device=jacobian.device)
    return tjd.GradDrop(leak=leaks)(jacobian)


class NashMTLSolver:
    """Nash-MTL's weights for one fixed set of tasks: torchjd's weighting, which runs the authors' sequential
    convex program (cvxpy/ECOS, `optim_niter` rounds, warm-started from its last solution).

    Its input is a T x T square root of the Gram matrix (the weighting only reads M M^T), so the
    P-dimensional Jacobian never leaves its device. Norm clipping and the update schedule are the caller's.
    """

    def __init__(self, n_tasks: int, optim_niter: int) -> None:
        aggregator = tjd.NashMTL(n_tasks, max_norm=0.0, update_weights_every=1, optim_niter=optim_niter)
        self._weighting = aggregator.weighting

    def __call__(self, gram: Tensor) -> Tensor:
        eigenvalues, vectors = torch.linalg.eigh(gram.cpu())
        root = vectors * eigenvalues.clamp(min=0).sqrt()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not DPP.*")  # cvxpy's note on speed
            return self._weighting(root).to(gram.device)

    @property
    def warm_start(self) -> Tensor:
        return torch.as_tensor(np.asarray(self._weighting.prvs_alpha, dtype=np.float64))

    @warm_start.setter
    def warm_start(self, alpha: Tensor) -> None:
        self._weighting.prvs_alpha = alpha.detach().cpu().double().numpy()
