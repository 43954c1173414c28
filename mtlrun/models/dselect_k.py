"""DSelect-k on a chosen backbone (`model=dselect_k`): shared experts, and per task a k-sparse differentiable gate.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi, "DSelect-k: Differentiable Selection in
the Mixture of Experts with Applications to Multi-Task Learning" (NeurIPS 2021; code
google-research/dselect_k_moe); LibMTL's `DSelect_k`. As MMoE, `num_experts` trunks run on the image; task
t's gate is DSelect-k's per-example gate: `num_nonzeros` (k) single-expert selectors, selector i choosing
expert e with r_i(e) = prod_b (S(z_ib) if bit b of e is 1 else 1 - S(z_ib)) over the m = ceil(log2 E)
bits, S the cubic smooth-step of width `gamma`, and the expert weights sum_i softmax(w)_i r_i(e); z and w
are linear maps of the pooled image (as MMoE's gates here). Initialisation as the reference code: z's
maps uniform in +-gamma/100, w's in +-0.05.

Regulariser (the reference code's, as LibMTL computes it): in training each gate's penalty is
`entropy_reg` x the selectors' entropy summed over the batch (pushing each selector to one expert) plus,
when E is not a power of 2, the sum over the batch and selectors of 1 / sum_e r_i(e) (pushing selectors
off codes that name no expert). It is no part of its task's loss, which the strategies weigh: each
gate's penalty is added once, unweighted, to the step on its task (`MultiTaskModel.penalties`,
`StepContext`), as the reference code's Keras `add_loss` adds it to the total loss, and train_log.csv
logs it as `penalty`. LibMTL backpropagates it inside the forward pass, for the last task's gate only.

Shared: every expert. Task t: its gate (z and w maps) and its head. A step on some tasks runs every expert
and only their gates. MGDA-UB's representation is the stack of the experts' outputs.
Defaults: k = 2 and gamma = 1 (LibMTL's); 4 experts (LibMTL's --num_experts has no default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrun.errors import MtlrunError
from mtlrun.models.backbones import build_backbone, image_channels
from mtlrun.models.base import MultiTaskModel
from mtlrun.models.mmoe import Experts, check_count, mix
from mtlrun.tasks import Task


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """0 below -gamma/2, 1 above gamma/2, and the cubic -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 between."""
    cubic = -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectGate(nn.Module):
    """One task's DSelect-k gate; in training it keeps its regulariser of the last pass in `penalty`."""

    def __init__(
        self, channels: int, experts: int, nonzeros: int, gamma: float, entropy_reg: float, pool: int
    ) -> None:
        super().__init__()
        bits = math.ceil(math.log2(experts))
        self.nonzeros, self.bits, self.gamma, self.entropy_reg, self.pool = nonzeros, bits, gamma, entropy_reg, pool
        self.power_of_2 = experts == 2**bits
        codes = [[(e >> (bits - 1 - b)) & 1 for b in range(bits)] for e in range(experts)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)  # E x m
        inputs = channels * pool * pool
        self.z = nn.Linear(inputs, nonzeros * bits)
        self.w = nn.Linear(inputs, nonzeros)
        for param in self.z.parameters():
            nn.init.uniform_(param, -gamma / 100, gamma / 100)
        for param in self.w.parameters():
            nn.init.uniform_(param, -0.05, 0.05)
        self.penalty: Tensor | None = None

    def selectors(self, x: Tensor) -> Tensor:
        """r_i(e) for every image, selector and expert: batch x k x E."""
        steps = smooth_step(self.z(x).view(-1, self.nonzeros, 1, self.bits), self.gamma)  # B x k x 1 x m
        return torch.where(self.codes, steps, 1 - steps).prod(dim=-1)

    def forward(self, features: tuple[Tensor, Tensor]) -> Tensor:
        experts, image = features
        x = F.adaptive_avg_pool2d(image, self.pool).flatten(1)
        selectors = self.selectors(x)
        weights = torch.einsum("bk,bke->be", torch.softmax(self.w(x), dim=-1), selectors)
        self.penalty = self._regulariser(selectors) if self.training else None
        return mix(weights, experts)

    def _regulariser(self, selectors: Tensor) -> Tensor:
        penalty = -self.entropy_reg * (selectors * torch.log(selectors + 1e-6)).sum()
        if not self.power_of_2:
            penalty = penalty + (1 / selectors.sum(dim=-1)).sum()
        return penalty


class DSelectK(MultiTaskModel):
    def penalties(self) -> dict[str, Tensor]:
        """Each gate's regulariser from its last training pass, handed over once."""
        found = {}
        for task, part in self.task_parts.items():
            if part.penalty is not None:
                found[task], part.penalty = part.penalty, None
        return found


def build(
    tasks: list[Task], backbone: Mapping | None = None, num_experts: int = 4, num_nonzeros: int = 2,
    gamma: float = 1.0, entropy_reg: float = 1e-6, gate_pool: int = 8,
) -> MultiTaskModel:
    check_count("num_experts", num_experts, least=2), check_count("num_nonzeros", num_nonzeros)
    check_count("gate_pool", gate_pool)
    if not gamma > 0 or not entropy_reg >= 0:
        raise MtlrunError(f"model.gamma must be > 0 and model.entropy_reg >= 0, got {gamma!r} and {entropy_reg!r}")
    spec = build_backbone(backbone or {"name": "convnet"}, tasks)
    experts = Experts([spec.trunk() for _ in range(num_experts)])
    settings = (num_experts, num_nonzeros, float(gamma), float(entropy_reg), gate_pool)
    gates = {t.name: DSelectGate(image_channels(experts), *settings) for t in tasks}
    return DSelectK(experts, {t.name: spec.head(t) for t in tasks}, spec.align_corners, task_parts=gates)
