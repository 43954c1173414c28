"""SegNet models of Liu, Johns & Davison (MTAN, CVPR 2019): `model=segnet_split` and `model=segnet_mtan`.

Both follow lorenmt/mtan `im2im_pred/model_segnet_split.py` (`--type standard`) and `model_segnet_mtan.py`,
the code Nash-MTL, CAGrad and FAMO reuse unchanged for NYUv2 and Cityscapes; layer names in comments are
mtan's. What differs from that code, and why:

- Heads return raw outputs: mtan's log-softmax (segmentation) and division by the norm (normals) belong to
  our tasks' losses (cross-entropy on logits, cosine on normalised predictions); the learned `logsigma` of
  mtan's uncertainty weighting belongs to `strategy=uncertainty`.
- Unpooling is told the size before pooling, and the attention path is upsampled to the size of the shared
  feature it meets rather than by `scale_factor=2`: identical for inputs divisible by 32 (the published
  288x384 and 128x256), and it lets any input of at least 32x32 run.
- mtan's attention-path 3x3 convs (`encoder_block_att`, `decoder_block_att`, the paper's f) are one set
  shared by all tasks, so here they are shared parameters: the encoder owns them and every task's head runs
  them on its own attention path. Only the attention masks (`encoder_att`, `decoder_att`) and the
  prediction layers belong to a task. Counts at the published widths on NYUv2's three tasks (13 classes,
  depth, normals): segnet_split 25,055,185 parameters, segnet_mtan 44,229,073 (mtan's code prints 3 more:
  its `logsigma`), 1.77x the single-task SegNet's 24,981,069 (segnet_split with the segmentation task
  alone; the count mtan divides by), as in the paper's NYUv2 table; 35,163,456 of them shared (f included).
  With the same weights, segnet_mtan's outputs equal those of mtan's `forward` (checked once, to the bit).
- With `filters[3] != filters[4]` mtan's MTAN would not run (its deepest decoder mask expects
  filters[4] + filters[3] input channels and gets 2 * filters[4]); the deepest decoder f here maps to
  filters[3], which changes nothing at the published widths.
- MGDA-UB (`strategy=mgda strategy.rep_grad=true`) needs one shared representation; the MTAN encoder's
  output is its 20 intermediate features, several computed from others, and the shared f convs act after
  them. Use MGDA-UB with `segnet_split`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task

PUBLISHED_FILTERS = (64, 128, 256, 512, 512)
STAGES = 5


def _conv(cin: int, cout: int) -> nn.Sequential:
    """mtan's `conv_layer`: conv3x3 (with bias) - BN - ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _attention(cin: int, cout: int) -> nn.Sequential:
    """mtan's `att_layer`: a soft mask in (0, 1) from conv1x1-BN-ReLU, conv1x1-BN-Sigmoid."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid(),
    )


def _prediction(cin: int, task: Task) -> nn.Module:
    """mtan's `pred_task` layers (conv3x3, conv1x1, no normalisation between) for a dense task; for a
    per-image task (not in mtan) global average pooling and a linear layer."""
    if task.dense:
        return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, task.out_channels, 1))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, task.out_channels))


def _stage_out(filters: Sequence[int], k: int) -> int:
    """Channels out of decoder stage k (stages numbered as the encoder's, 0 at full resolution)."""
    return filters[k - 1] if k > 0 else filters[0]


class Stage(nn.Module):
    """One SegNet block: mtan's `encoder_block[k]` / `decoder_block[k]` conv, then `conv_block_enc[k]` /
    `conv_block_dec[k]` (one more conv in the first two blocks, two in the others). Returns both the
    first conv's output (MTAN's attention reads it) and the block's output."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.first = _conv(cin, cout)
        self.rest = nn.Sequential(*[_conv(cout, cout) for _ in range(1 if k < 2 else 2)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        first = self.first(x)
        return first, self.rest(first)


class SegNet(nn.Module):
    """The shared SegNet of mtan's `model_segnet_split.py` / `model_segnet_mtan.py` (Liu et al., CVPR 2019):
    5 encoder blocks (2, 2, 3, 3, 3 conv3x3-BN-ReLU layers), 2x2 max-pooling with indices, and the mirrored
    decoder with max-unpooling; `forward` gives the last decoder block's output (filters[0] channels, full
    resolution), which every task's prediction layers read in the split baseline."""

    def __init__(self, filters: Sequence[int]) -> None:
        super().__init__()
        f = filters
        self.encoder = nn.ModuleList([Stage(3 if k == 0 else f[k - 1], f[k], k) for k in range(STAGES)])
        # Registered in execution order (deepest first), so the last registered conv is the last layer
        # before the heads (gradnorm's "last shared layer").
        self.decoder = nn.ModuleList([Stage(f[k], _stage_out(f, k), k) for k in reversed(range(STAGES))])

    def features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Per stage k = 0..4: the encoder's first-conv and block outputs, the decoder's unpooled input and
        block output (mtan's g_encoder[k][0], g_encoder[k][1], g_upsampl, g_decoder)."""
        if min(x.shape[-2:]) < 2**STAGES:  # five 2x2 poolings must leave at least one pixel
            raise MtlrunError(
                f"the SegNet models need images of at least {2**STAGES}x{2**STAGES} pixels, got "
                f"{x.shape[-2]}x{x.shape[-1]}: use larger images (e.g. dataset.image_size) or another model"
            )
        enc_in, enc_out, indices = [], [], []
        for stage in self.encoder:
            first, out = stage(x)
            x, index = F.max_pool2d(out, 2, 2, return_indices=True)
            enc_in.append(first), enc_out.append(out), indices.append(index)
        unpooled, dec_out = [None] * STAGES, [None] * STAGES
        for k, stage in zip(reversed(range(STAGES)), self.decoder, strict=True):
            unpooled[k] = F.max_unpool2d(x, indices[k], 2, 2, output_size=enc_out[k].shape[-2:])
            x = dec_out[k] = stage(unpooled[k])[1]
        return enc_in, enc_out, unpooled, dec_out

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[3][0]


class AttentionConvs(nn.Module):
    """MTAN's attention-path 3x3 conv blocks (mtan's `encoder_block_att`, `decoder_block_att`), one set
    shared by every task: encoder stage k maps the attended feature to the next stage's width, decoder
    stage k the upsampled attention to that stage's output width."""

    def __init__(self, filters: Sequence[int]) -> None:
        super().__init__()
        f = filters
        self.encoder = nn.ModuleList([_conv(f[k], f[min(k + 1, STAGES - 1)]) for k in range(STAGES)])
        self.decoder = nn.ModuleList([_conv(f[k], _stage_out(f, k)) for k in range(STAGES)])


class MTANEncoder(nn.Module):
    """The shared part of MTAN (mtan's `model_segnet_mtan.py`): the SegNet and the attention-path convs
    every task shares. Its output is the flat tuple of the SegNet's intermediate features
    (`SegNet.features`, 4 groups of 5) that the task-specific attention modules read."""

    def __init__(self, filters: Sequence[int]) -> None:
        super().__init__()
        self.attention_convs = AttentionConvs(filters)
        self.segnet = SegNet(filters)  # registered last, so the SegNet's last conv is the last shared layer

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(t for group in self.segnet.features(x) for t in group)


class MTANHead(nn.Module):
    """One task's attention network of MTAN (Liu, Johns & Davison, CVPR 2019; mtan's `model_segnet_mtan.py`,
    `forward`, wired as published): at encoder stage k the mask `encoder_att[k]` of [g_encoder[k][0], the
    previous attended feature] (stage 0: g_encoder[0][0] alone) multiplies g_encoder[k][1], then the shared
    f conv and 2x2 max-pooling; at decoder stage k the attended feature is upsampled (bilinear, aligned
    corners), passed through the shared f conv, and the mask `decoder_att[k]` of [g_upsampl, that]
    multiplies the decoder block's output. The prediction layers read the last attended feature."""

    def __init__(self, filters: Sequence[int], task: Task, convs: AttentionConvs) -> None:
        super().__init__()
        f = filters
        # stage 0's mask reads the shared feature alone, later ones also the previous attended feature
        self.encoder_att = nn.ModuleList([_attention(f[k] * min(k + 1, 2), f[k]) for k in range(STAGES)])
        self.decoder_att = nn.ModuleList(
            [_attention(f[k] + _stage_out(f, k), _stage_out(f, k)) for k in range(STAGES)]
        )
        self.predict = _prediction(f[0], task)
        # A plain tuple keeps the shared convs out of this head's module tree: their parameters are the
        # encoder's (shared), not this task's.
        self._shared = (convs,)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        enc_in, enc_out, unpooled, dec_out = (features[i : i + STAGES] for i in range(0, 4 * STAGES, STAGES))
        convs = self._shared[0]
        attended = None
        for k in range(STAGES):
            x = enc_in[k] if attended is None else torch.cat((enc_in[k], attended), dim=1)
            attended = F.max_pool2d(convs.encoder[k](self.encoder_att[k](x) * enc_out[k]), 2, 2)
        for k in reversed(range(STAGES)):
            up = F.interpolate(attended, size=unpooled[k].shape[-2:], mode="bilinear", align_corners=True)
            mask = self.decoder_att[k](torch.cat((unpooled[k], convs.decoder[k](up)), dim=1))
            attended = mask * dec_out[k]
        return self.predict(attended)


def _check_filters(filters: Sequence[int]) -> list[int]:
    filters = [int(c) for c in filters]
    if len(filters) != STAGES or min(filters) < 1:
        raise MtlrunError(f"model.filters must be {STAGES} positive channel counts, got {filters}")
    return filters


def _init_as_mtan(model: nn.Module) -> MultiTaskModel:
    """mtan's initialisation: Xavier-normal conv and linear weights, zero biases, BN scale 1 and shift 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def build_split(tasks: list[Task], filters: Sequence[int] = PUBLISHED_FILTERS) -> MultiTaskModel:
    """mtan's split baseline (hard parameter sharing): the whole SegNet shared, per task `pred_task`."""
    filters = _check_filters(filters)
    heads = {t.name: _prediction(filters[0], t) for t in tasks}
    return _init_as_mtan(MultiTaskModel(SegNet(filters), heads))


def build_mtan(tasks: list[Task], filters: Sequence[int] = PUBLISHED_FILTERS) -> MultiTaskModel:
    """MTAN: the shared SegNet and attention convs, per task its attention masks and `pred_task`."""
    filters = _check_filters(filters)
    encoder = MTANEncoder(filters)
    heads = {t.name: MTANHead(filters, t, encoder.attention_convs) for t in tasks}
    return _init_as_mtan(MultiTaskModel(encoder, heads))
